# The cffi build hook lives here: `pip install -e .` (or a wheel build) compiles the CPU expert
# kernels from cpu_kernels/build.py in cffi API mode. Everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["cpu_kernels/build.py:ffibuilder"])
