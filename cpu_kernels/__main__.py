"""`python -m cpu_kernels`: print the chosen SIMD path, available paths, OpenMP threads, build flags."""
import cpu_kernels

info = cpu_kernels.build_info()
print(f"cpu_kernels path      : {info['active_path']}")
print(f"available paths       : {', '.join(info['available_paths'])}")
print(f"expert threads        : {info['threads']} (OpenMP max {info['omp_max_threads']}, procs {info['omp_num_procs']})")
print(f"build flags           : {info['build_flags']}")
print(f"supported ggml types  : {', '.join(t.name for t in cpu_kernels.SUPPORTED_TYPES)}")
