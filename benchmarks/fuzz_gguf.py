"""Seeded mutation fuzzing of model loading: damaged GGUF files must load or fail with one line.

    python benchmarks/fuzz_gguf.py --cases 5000 --seed 1 [--jobs 1] [--source PATH ...]

Each case takes one source model (the demo model, the llama.cpp-converted fixtures, a split set
written by runtime.testmodel) and damages it in one seeded way: a truncation inside a chosen region
(header, metadata key, value, tokenizer array, tensor table, padding, data), flipped or random bytes
there, an integer field (count, length, dim, type, offset) set to an edge value, or a structural
change written back as a well-formed GGUF (keys renamed, dropped or duplicated, values of another
type or out of range, tokenizer arrays edited, tensor names/dims/types/offsets that lie, odd
alignments, split counts and numbers that disagree, a split part missing or swapped). Then it runs
`runtime.load` on it and tokenizes a short text, as `nextn run` would.

A case passes when that works, or fails with one `NextnError` whose message is one line of at most
MAX_MESSAGE characters naming one of the case's files, within TIMEOUT_S. Anything else is a
failure: another exception (a MemoryError from a size that lies included: workers run under an
address-space limit), a crash (segfault, abort), a hang. Cases run in worker processes, so a crash
ends only its worker; the case is recorded and a new worker continues. Prints a summary, the
failures with their seeds (`--case SEED` reruns one in-process with its traceback) and the
distinct error messages (numbers, quoted values and paths abstracted).

Case seeds are derived from --seed and the case number, so a run is reproducible and any case can
be rerun alone.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TIMEOUT_S = 10.0
MAX_MESSAGE = 400
EXTRA_AS_BYTES = 4 << 30  # address space a worker may add after its imports: a lying size hits it

# ----------------------------------------------------------------------------- GGUF structure

SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class Parsed:
    """A valid GGUF taken apart: metadata [(key, vtype, value, etype)], tensors [name, dims, type,
    offset], the data section, and byte regions [(kind, start, end)] of the original file."""

    def __init__(self, data: bytes):
        self.version = struct.unpack_from("<I", data, 4)[0]
        self.regions: list[tuple[str, int, int]] = [("magic", 0, 4), ("int:version", 4, 8)]
        pos = 8
        n_t, n_kv = struct.unpack_from("<QQ", data, pos)
        self.regions += [("int:n_tensors", 8, 16), ("int:n_kv", 16, 24)]
        pos = 24

        def string(kind):
            nonlocal pos
            (n,) = struct.unpack_from("<Q", data, pos)
            self.regions.append((f"int:{kind}_len", pos, pos + 8))
            self.regions.append((kind, pos + 8, pos + 8 + n))
            s = data[pos + 8:pos + 8 + n].decode("utf-8", errors="replace")
            pos += 8 + n
            return s

        def scalar(fmt, kind):
            nonlocal pos
            k = struct.calcsize(fmt)
            v = struct.unpack_from(fmt, data, pos)[0]
            self.regions.append((kind, pos, pos + k))
            pos += k
            return v

        self.kvs = []
        for _ in range(n_kv):
            key = string("key")
            tag = "tok" if key.startswith("tokenizer.") else "value"
            vt = scalar("<I", "int:vtype")
            if vt == ARRAY:
                et = scalar("<I", "int:array_type")
                cnt = scalar("<Q", "int:array_count")
                start = pos
                if et == STRING:
                    val = [string(f"{tag}_item") for _ in range(cnt)]
                    del self.regions[len(self.regions) - 2 * cnt:]  # one region for the whole array
                else:
                    k = struct.calcsize(SCALAR[et])
                    val = list(struct.unpack_from(f"<{cnt}{SCALAR[et][1]}", data, pos)) if cnt else []
                    pos += k * cnt
                self.regions.append((f"{tag}_array", start, pos))
            elif vt == STRING:
                et, val = None, string(tag)
            else:
                et, val = None, scalar(SCALAR[vt], f"int:{tag}" if SCALAR[vt][1] not in "fd?" else tag)
            self.kvs.append([key, vt, val, et])
        self.tensors = []
        for _ in range(n_t):
            name = string("tensor_name")
            nd = scalar("<I", "int:ndim")
            dims = [scalar("<Q", "int:dim") for _ in range(nd)]
            tt = scalar("<I", "int:ttype")
            off = scalar("<Q", "int:offset")
            self.tensors.append([name, dims, tt, off])
        align = dict((k, v) for k, _, v, _ in self.kvs).get("general.alignment", 32)
        start = (pos + align - 1) // align * align
        self.regions.append(("padding", pos, start))
        self.regions.append(("data", start, len(data)))
        self.data = data[start:]
        self.size = len(data)

    def copy(self) -> "Parsed":
        import copy

        return copy.deepcopy(self)


def _enc_value(vt, v, et=None) -> bytes:
    if vt == STRING:
        b = v.encode("utf-8", errors="replace") if isinstance(v, str) else bytes(v)
        return struct.pack("<Q", len(b)) + b
    if vt == ARRAY:
        out = [struct.pack("<IQ", et, len(v))]
        out += [_enc_value(et, x) for x in v]
        return b"".join(out)
    fmt = SCALAR[vt]
    try:
        return struct.pack(fmt, v)
    except (struct.error, OverflowError, TypeError):  # a value that does not fit: its low bytes
        return (int(v) & ((1 << (8 * struct.calcsize(fmt))) - 1)).to_bytes(struct.calcsize(fmt), "little") \
            if not isinstance(v, float) else struct.pack(fmt, 0)


def serialize(p: Parsed, *, pad_align: int | None = None) -> bytes:
    """A well-formed GGUF from the parts (whatever values they now hold)."""
    head = [b"GGUF", struct.pack("<IQQ", p.version, len(p.tensors), len(p.kvs))]
    for key, vt, val, et in p.kvs:
        head.append(_enc_value(STRING, key) + struct.pack("<I", vt) + _enc_value(vt, val, et))
    for name, dims, tt, off in p.tensors:
        head.append(_enc_value(STRING, name) + struct.pack("<I", len(dims))
                    + b"".join(struct.pack("<Q", d & (2**64 - 1)) for d in dims)
                    + struct.pack("<IQ", tt & 0xFFFFFFFF, off & (2**64 - 1)))
    h = b"".join(head)
    a = pad_align
    if a is None:
        a = dict((k, v) for k, _, v, _ in p.kvs).get("general.alignment", 32)
        if not isinstance(a, int) or isinstance(a, bool) or a <= 0 or a > 1 << 16:
            a = 32
    return h + b"\0" * (-len(h) % a) + p.data


# ----------------------------------------------------------------------------- mutations

EDGE = [0, 1, 2, 3, 7, 31, 33, 63, 64, 255, 256, 4095, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
        2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def _edge(rng: random.Random, orig: int, size: int) -> int:
    c = rng.random()
    if c < 0.5:
        return rng.choice(EDGE)
    if c < 0.7:
        return size + rng.choice([-1, 0, 1, 8, 4096])
    return max(0, orig + rng.choice([-2, -1, 1, 2, 32, -32, 1000]))


def _rand_str(rng: random.Random, n: int | None = None) -> str:
    n = rng.choice([0, 1, 3, 8, 40, 200]) if n is None else n
    alpha = "abcxyz.Ġ_0123456789 <|>" + "\u00e9\u4e2d\ufffd"
    return "".join(rng.choice(alpha) for _ in range(n))


def mutate_bytes(data: bytes, rng: random.Random, p: Parsed) -> tuple[bytes, str]:
    """Damage bytes in one region of the original file."""
    op = rng.choice(["truncate", "truncate", "flip", "bytes", "int", "int"])
    regions = [r for r in p.regions if r[2] > r[1]]
    if op == "int":
        regions = [r for r in regions if r[0].startswith("int:")]
    elif op != "truncate":  # data bytes rarely matter: weight the header
        regions = [r for r in regions if r[0] != "data" or rng.random() < 0.05]
    kind, start, end = rng.choice(regions)
    b = bytearray(data)
    if op == "truncate":
        cut = rng.randint(start, end)
        return bytes(b[:cut]), f"truncate at {cut} in {kind}"
    if op == "flip":
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(start, end)
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b), f"flip bits in {kind} {start}..{end}"
    if op == "bytes":
        i = rng.randrange(start, end)
        n = min(end - i, rng.randint(1, 16))
        b[i:i + n] = bytes(rng.randrange(256) for _ in range(n))
        return bytes(b), f"random bytes at {i} in {kind}"
    width = end - start
    orig = int.from_bytes(b[start:end], "little")
    v = _edge(rng, orig, len(data)) & ((1 << (8 * width)) - 1)
    b[start:end] = v.to_bytes(width, "little")
    return bytes(b), f"{kind} at {start} = {v} (was {orig})"


def _kv(p: Parsed, key: str):
    for kv in p.kvs:
        if kv[0] == key:
            return kv
    return None


def mutate_struct(p: Parsed, rng: random.Random) -> tuple[bytes, str]:
    """A structural change written back as a well-formed file."""
    q = p.copy()
    op = rng.choice(["key", "type", "value", "tok", "tok", "tensor", "tensor", "align", "version"])
    if op == "tok" and not any(kv[0].startswith("tokenizer.") for kv in q.kvs):
        op = "value"  # a split's later parts hold no tokenizer
    if op == "tensor" and not q.tensors:
        op = "key"
    if op == "key":
        kv = rng.choice(q.kvs)
        c = rng.randrange(4)
        if c == 0:
            q.kvs.remove(kv)
            return serialize(q), f"drop key {kv[0]}"
        if c == 1:
            other = rng.choice(q.kvs)[0]
            d = f"rename key {kv[0]} to {other}"
            kv[0] = other
            return serialize(q), d
        if c == 2:
            q.kvs.append(list(kv))
            return serialize(q), f"duplicate key {kv[0]}"
        kv[0] = _rand_str(rng)
        return serialize(q), "rename key to random"
    if op == "type":
        kv = rng.choice(q.kvs)
        new = rng.choice(list(SCALAR) + [STRING, ARRAY])
        if new == STRING:
            val, et = str(kv[2])[:1000], None
        elif new == ARRAY:
            et = rng.choice(list(SCALAR) + [STRING, ARRAY])
            base = kv[2] if isinstance(kv[2], list) else [kv[2]]
            if et == ARRAY:
                val, et2 = [], None  # an array of (empty) arrays
                q.kvs[q.kvs.index(kv)] = [kv[0], ARRAY, [], ARRAY]
                data = serialize(q)
                return data, f"key {kv[0]} as array of arrays"
            val = [str(x) for x in base[:500]] if et == STRING else [x if not isinstance(x, str) else len(x) for x in base[:500]]
            if et in (6, 12):
                val = [float(x) for x in val]
            elif et != STRING:
                val = [int(x) if not isinstance(x, float) or x == x else 0 for x in val]
        else:
            v = kv[2]
            if isinstance(v, list):
                v = len(v)
            if isinstance(v, str):
                v = len(v)
            val, et = (float(v) if new in (6, 12) else bool(v) if new == 7 else int(v)), None
        d = f"key {kv[0]}: type {kv[1]} -> {new}"
        kv[1], kv[2], kv[3] = new, val, et
        return serialize(q), d
    if op == "value":
        kvs = [kv for kv in q.kvs if kv[1] in SCALAR]
        kv = rng.choice(kvs)
        if kv[1] in (6, 12):
            kv[2] = rng.choice([0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e30, 1e-45])
        elif kv[1] == 7:
            kv[2] = not kv[2]
        else:
            signed = kv[1] in (1, 3, 5, 11)
            v = rng.choice([0, 1, -1, 2, 3, 1000, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 10**6])
            kv[2] = v if signed or v >= 0 else 2**64 - 1
        return serialize(q), f"key {kv[0]} = {kv[2]!r}"
    if op == "tok":
        arrays = [kv for kv in q.kvs if kv[0].startswith("tokenizer.")]
        kv = rng.choice(arrays)
        key, vt, val = kv[0], kv[1], kv[2]
        if vt != ARRAY:
            if vt == STRING:
                kv[2] = rng.choice(["", "llama", "glm4", _rand_str(rng, 5000), "{% if %}", "{{ raise_exception('x') }}"])
            elif kv[1] in SCALAR and kv[1] not in (6, 7, 12):
                kv[2] = rng.choice([0, 1, 2**31 - 1, len(_kv(q, "tokenizer.ggml.tokens")[2]), 2**32 - 1]) & (
                    (1 << (8 * struct.calcsize(SCALAR[kv[1]]))) - 1)
            return serialize(q), f"{key} = {short_repr(kv[2])}"
        val = list(val)
        c = rng.randrange(6)
        i = rng.randrange(len(val)) if val else 0
        if c == 0 and val:
            d = f"{key}: drop item {i}"
            del val[i]
        elif c == 1 and val:
            x = _rand_str(rng) if kv[3] == STRING else rng.choice([-1, 0, 3, 6, 7, 100, 2**31 - 1])
            d = f"{key}[{i}] = {short_repr(x)}"
            val[i] = x
        elif c == 2 and val:
            j = rng.randrange(len(val))
            d = f"{key}[{i}] = {key}[{j}]"
            val[i] = val[j]
        elif c == 3:
            x = _rand_str(rng) if kv[3] == STRING else 1
            d = f"{key}: append {short_repr(x)}"
            val.append(x)
        elif c == 4 and kv[3] == STRING:
            x = rng.choice(["", " ", "a", "a b c", "Ġ Ġ", _rand_str(rng, 3) + " " + _rand_str(rng, 3), "\0"])
            d = f"{key}[{i}] = {short_repr(x)}"
            if val:
                val[i] = x
            else:
                val.append(x)
        else:
            d = f"{key}: emptied"
            val = []
        kv[2] = val
        return serialize(q), d
    if op == "tensor":
        t = rng.choice(q.tensors)
        c = rng.randrange(8)
        if c == 0:
            q.tensors.remove(t)
            return serialize(q), f"drop tensor {t[0]} from the table"
        if c == 1:
            other = rng.choice(q.tensors)[0]
            d = f"rename tensor {t[0]} to {other}"
            t[0] = other if rng.random() < 0.5 else _rand_str(rng, rng.choice([5, 63, 64, 300]))
            return serialize(q), d
        if c == 2 and t[1]:
            k = rng.randrange(len(t[1]))
            v = rng.choice([0, 1, t[1][k] * 2, t[1][k] + 1, 2**32, 2**62, 2**63, 2**64 - 1])
            t[1][k] = v
            return serialize(q), f"tensor {t[0]} dim {k} = {v}"
        if c == 3:
            t[1] = list(reversed(t[1])) if rng.random() < 0.5 else t[1] + [1] * rng.choice([1, 2, 5])
            return serialize(q), f"tensor {t[0]} dims {t[1]}"
        if c == 4:
            t[2] = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20, 23, 29, 30, 31, 39, 40, 1000])
            return serialize(q), f"tensor {t[0]} type {t[2]}"
        if c == 5:
            t[3] = rng.choice([0, t[3] + 1, t[3] + 32, max(0, t[3] - 32), len(q.data), len(q.data) + 32,
                               2**40, 2**63, 2**64 - 32])
            return serialize(q), f"tensor {t[0]} offset {t[3]}"
        if c == 6:
            q.tensors.append(list(t))
            return serialize(q), f"tensor {t[0]} listed twice"
        cut = rng.randrange(len(q.data) + 1)
        q.data = q.data[:cut]
        return serialize(q), f"data section cut to {cut} bytes"
    if op == "align":
        a = rng.choice([0, 1, 2, 3, 7, 8, 16, 24, 64, 4096, 2**20, 2**31, 2**32 - 1])
        vt = rng.choice([4, 4, 4, 10, 5, STRING])
        kv = _kv(q, "general.alignment")
        val = str(a) if vt == STRING else a
        if vt == 5:
            val = a if a < 2**31 else -1
        if kv is None:
            q.kvs.insert(rng.randrange(len(q.kvs) + 1), ["general.alignment", vt, val, None])
        else:
            kv[1], kv[2] = vt, val
        pad = a if isinstance(a, int) and 0 < a <= 4096 and rng.random() < 0.7 else None
        return serialize(q, pad_align=pad), f"general.alignment = {val!r} (type {vt}, padded to {pad})"
    q.version = rng.choice([0, 1, 2, 4, 2**31])
    return serialize(q), f"version {q.version}"


def mutate_split(files: dict[str, bytes], rng: random.Random, parsed: dict) -> tuple[dict, str]:
    """Damage a split set as a whole: a part missing, swapped, cut short, or its split keys wrong."""
    names = sorted(files)
    c = rng.randrange(5)
    out = dict(files)
    if c == 0:
        n = rng.choice(names[1:])
        del out[n]
        return out, f"part {n} missing"
    if c == 1:
        a, b = rng.sample(names, 2)
        out[a], out[b] = files[b], files[a]
        return out, f"parts {a} and {b} swapped"
    if c == 2:
        n = rng.choice(names)
        out[n] = files[rng.choice(names)] if rng.random() < 0.5 else files[n][:rng.randrange(len(files[n]))]
        return out, f"part {n} replaced or cut"
    n = rng.choice(names)
    q = parsed[n].copy()
    key = rng.choice(["split.count", "split.no", "split.tensors.count"])
    kv = _kv(q, key)
    v = rng.choice([0, 1, 2, 3, 5, 2**16 - 1, 2**31])
    if kv is None:
        q.kvs.append([key, 4, v, None])
    else:
        kv[2] = v & ((1 << (8 * struct.calcsize(SCALAR[kv[1]]))) - 1) if kv[1] in SCALAR else v
    out[n] = serialize(q)
    return out, f"{n}: {key} = {v}"


def short_repr(x, n: int = 40) -> str:
    r = repr(x)
    return r if len(r) <= n else r[:n] + "..."


# ----------------------------------------------------------------------------- cases

class Sources:
    """Source models: name -> {file name: bytes}, with each file taken apart once."""

    def __init__(self, paths: list[list[Path]]):
        self.sets = []
        for group in paths:
            files = {p.name: p.read_bytes() for p in group}
            parsed = {n: Parsed(b) for n, b in files.items()}
            self.sets.append((group[0].name, files, parsed))


def make_case(src: Sources, case_seed: int) -> tuple[str, dict[str, bytes], str, str]:
    """(source name, files to write, file to open, description) for one seeded case."""
    rng = random.Random(case_seed)
    name, files, parsed = src.sets[rng.randrange(len(src.sets))]
    first = sorted(files)[0]
    if len(files) > 1 and rng.random() < 0.3:
        out, desc = mutate_split(files, rng, parsed)
        return name, out, first, desc
    target = rng.choice(sorted(files)) if len(files) > 1 and rng.random() < 0.5 else first
    if rng.random() < 0.5:
        data, desc = mutate_bytes(files[target], rng, parsed[target])
    else:
        data, desc = mutate_struct(parsed[target], rng)
    out = dict(files)
    out[target] = data
    return name, out, first, f"{target}: {desc}"


def case_seed(seed: int, i: int) -> int:
    return (seed * 1_000_003 + i) & 0x7FFFFFFF


def run_case(src: Sources, cs: int, workdir: Path) -> dict:
    """Write the case's files, load them as `nextn run` does, classify the outcome."""
    import runtime
    from runtime.errors import NextnError

    name, files, first, desc = make_case(src, cs)
    d = workdir / f"case{cs}"
    d.mkdir(parents=True, exist_ok=True)
    for n, b in files.items():
        (d / n).write_bytes(b)
    t0 = time.perf_counter()
    res = {"seed": cs, "source": name, "desc": desc}
    try:
        eng = runtime.load(d / first, progress=False)
        eng.tokenize("Hello, world! 123")
        res["outcome"] = "ok"
        del eng
    except NextnError as e:
        msg = str(e)
        problems = []
        if "\n" in msg:
            problems.append("more than one line")
        if len(msg) > MAX_MESSAGE:
            problems.append(f"{len(msg)} characters")
        if not any(n in msg for n in list(files) + [first]):
            problems.append("names no file")
        res["outcome"] = "error" if not problems else "bad-message"
        res["message"] = msg if not problems else msg[:300]
        if problems:
            res["problems"] = problems
    except BaseException as e:  # noqa: BLE001 - anything else is a finding
        import traceback

        if isinstance(e, KeyboardInterrupt):
            raise
        tb = traceback.extract_tb(e.__traceback__)
        res["outcome"] = "exception"
        res["message"] = f"{type(e).__name__}: {str(e)[:200]}"
        res["where"] = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in tb[-4:]]
    res["seconds"] = round(time.perf_counter() - t0, 3)
    shutil.rmtree(d, ignore_errors=True)
    return res


def normalize(msg: str) -> str:
    """An error message with its particulars abstracted, to count distinct kinds."""
    s = re.sub(r"(/[^\s:,]+)+", "<file>", msg)
    s = re.sub(r"[A-Za-z0-9_.-]+\.gguf", "<file>", s)
    s = re.sub(r"b?'[^']*?\.\.\.( \(\d+ chars\))?|b?'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "'…'", s)
    s = re.sub(r"(?<![A-Za-z_])-?\d+(\.\d+)?(e[-+]?\d+)?", "N", s)
    s = re.sub(r"\[[^\]]*\]", "[…]", s)
    return s


# ----------------------------------------------------------------------------- processes

def worker_main(source_groups: list[list[str]]) -> int:
    """Read case seeds on stdin, answer one JSON line per case (after a 'start' line)."""
    import resource

    import runtime  # noqa: F401 - imports before the limit: it bounds what loading allocates
    import cpu_kernels

    cpu_kernels.set_threads(1)
    src = Sources([[Path(p) for p in g] for g in source_groups])
    # the address space now plus a margin: a size field that lies makes a MemoryError, not a swap storm
    vm = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vm + EXTRA_AS_BYTES, resource.RLIM_INFINITY))
    work = Path(tempfile.mkdtemp(prefix="fuzz_gguf_"))
    try:
        for line in sys.stdin:
            cs = int(line)
            print(json.dumps({"start": cs}), flush=True)
            print(json.dumps(run_case(src, cs, work)), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


class Worker:
    def __init__(self, groups: list[list[str]]):
        env = dict(os.environ, OMP_NUM_THREADS="1", NEXTN_TORCH_THREADS="1", PYTHONFAULTHANDLER="1")
        self.p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(groups)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env, cwd=str(ROOT))
        self.buf = ""

    def line(self, timeout: float) -> str | None:
        """The next stdout line, or None if none came within `timeout` (or the worker died)."""
        end = time.monotonic() + timeout
        while "\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.p.stdout], [], [], left)
            if not r:
                return None
            chunk = os.read(self.p.stdout.fileno(), 65536).decode(errors="replace")
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split("\n", 1)
        return line

    def kill(self) -> str:
        self.p.kill()
        try:
            _, err = self.p.communicate(timeout=10)
        except Exception:  # noqa: BLE001
            err = ""
        return err or ""


def run_cases(seeds: list[int], groups: list[list[str]], jobs: int = 1, progress=None) -> list[dict]:
    """Run the cases in `jobs` worker processes; a worker that crashes or hangs is replaced."""
    pending = collections.deque(seeds)
    results = []
    workers: list[dict] = []

    def start():
        w = Worker(groups)
        return {"w": w, "case": None, "since": None, "ready": False}

    for _ in range(max(1, min(jobs, len(seeds)))):
        workers.append(start())
    startup_s = 180.0  # imports (torch) on a busy machine
    while pending or any(s["case"] is not None for s in workers):
        for slot in workers:
            w = slot["w"]
            if slot["case"] is None:
                if not pending:
                    continue
                cs = pending.popleft()
                try:
                    w.p.stdin.write(f"{cs}\n")
                    w.p.stdin.flush()
                except BrokenPipeError:
                    pass
                slot["case"], slot["since"], slot["started"] = cs, time.monotonic(), False
            limit = TIMEOUT_S if slot["started"] else startup_s + TIMEOUT_S
            line = w.line(min(0.2, max(0.0, slot["since"] + limit - time.monotonic())))
            if line is None:
                dead = w.p.poll() is not None
                if dead or time.monotonic() - slot["since"] > limit:
                    err = w.kill()
                    cs = slot["case"]
                    if dead:
                        results.append({"seed": cs, "outcome": "crash", "message": f"worker exit {w.p.returncode}",
                                        "where": err.strip().splitlines()[-6:]})
                    else:
                        results.append({"seed": cs, "outcome": "hang",
                                        "message": f"no answer in {TIMEOUT_S:.0f} s"})
                    if progress:
                        progress(results[-1])
                    slot.update(start())
                continue
            msg = json.loads(line)
            if "start" in msg:
                slot["started"], slot["since"] = True, time.monotonic()
                continue
            if msg.get("seconds", 0) > TIMEOUT_S:
                msg["outcome"] = "slow"
            results.append(msg)
            if progress:
                progress(msg)
            slot["case"] = None
    for slot in workers:
        try:
            slot["w"].p.stdin.close()
            slot["w"].p.wait(timeout=30)
        except Exception:  # noqa: BLE001
            slot["w"].kill()
    return results


def default_sources(workdir: Path) -> list[list[Path]]:
    """The demo model, the fixtures where present, and a split set written by runtime.testmodel."""
    from runtime.api import DEMO_MODEL
    from runtime.testmodel import TestModelSpec, write_test_model

    groups = [[DEMO_MODEL]]
    for base in (ROOT / "shared", ROOT.parent / "shared", ROOT.parent.parent / "shared"):
        d = base / "fixtures" / "glm4moe-tiny"
        if d.exists():
            groups += [[p] for p in sorted(d.glob("*.gguf"))]
            break
    tm = write_test_model(TestModelSpec(), workdir / "split", types="Q8_0", split_max_tensors=20,
                          save_hf_dir=False)
    groups.append(list(tm.gguf_paths))
    return groups


FAIL = ("exception", "bad-message", "crash", "hang", "slow")


def summarize(results: list[dict]) -> tuple[str, int]:
    counts = collections.Counter(r["outcome"] for r in results)
    lines = [f"{len(results)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))]
    secs = sorted(r.get("seconds", 0) for r in results if "seconds" in r)
    if secs:
        lines.append(f"seconds per case: median {secs[len(secs) // 2]:.3f}, max {secs[-1]:.3f}")
    fails = [r for r in results if r["outcome"] in FAIL]
    for r in fails[:50]:
        lines.append(f"FAIL {r['outcome']} seed {r['seed']} {r.get('desc', '')}: {r.get('message', '')} "
                     f"{r.get('problems', '')} {r.get('where', '')}")
    kinds = collections.Counter(normalize(r["message"]) for r in results if r["outcome"] == "error")
    lines.append(f"{len(kinds)} distinct error messages:")
    lines += [f"{n:6d}  {k}" for k, n in kinds.most_common()]
    return "\n".join(lines), len(fails)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--source", action="append", default=None,
                    help="a GGUF to mutate (repeatable; a split set: its files joined by commas); "
                         "default: the demo, the fixtures and a split set")
    ap.add_argument("--case", type=int, help="run one case seed in this process and show its outcome")
    ap.add_argument("--json", help="write every case's result to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker_main(json.loads(a.worker))
    tmp = Path(tempfile.mkdtemp(prefix="fuzz_src_"))
    try:
        groups = ([[Path(x) for x in s.split(",")] for s in a.source] if a.source else default_sources(tmp))
        gs = [[str(p) for p in g] for g in groups]
        if a.case is not None:
            src = Sources(groups)
            print(json.dumps(run_case(src, a.case, tmp), indent=1))
            return 0
        print("sources: " + "; ".join(",".join(Path(p).name for p in g) for g in gs), flush=True)
        seeds = [case_seed(a.seed, i) for i in range(a.cases)]
        t0 = time.perf_counter()
        done = [0]

        def progress(r):
            done[0] += 1
            if r["outcome"] in FAIL:
                print(f"  FAIL {r['outcome']} seed {r['seed']}: {r.get('message', '')}", flush=True)
            if done[0] % 500 == 0:
                print(f"  {done[0]}/{len(seeds)} cases, {time.perf_counter() - t0:.0f} s", flush=True)

        results = run_cases(seeds, gs, a.jobs, progress)
        text, n_fail = summarize(results)
        print(text)
        print(f"wall {time.perf_counter() - t0:.0f} s, {a.jobs} worker(s)")
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=0))
        return 1 if n_fail else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
