"""Reading GGUF files: metadata in bulk, tensors as views of a memory map.

We parse the header ourselves instead of using `gguf.GGUFReader`: the reader builds one numpy
view per array element, which on a real GLM vocabulary (151,552 tokens, ~318k merges) costs
about 11 s; a bulk parse of the same arrays takes well under a second. Tensor data is never
read into RAM here: `TensorInfo.raw()` is a view of an `np.memmap` of the file.

Split models (`NAME-00001-of-00003.gguf`, as llama.cpp's gguf-split writes them) are opened
from the first file's path and behave as one file: metadata from the first split, tensors from
all of them.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ModelFileError, short

try:  # the C kernels' decoder, where the extension is built (tests and tools run without it too)
    import cpu_kernels as _ck

    _ck.active_path()
    _CK_TYPES = {int(t) for t in _ck.SUPPORTED_TYPES}
except ImportError:
    _ck, _CK_TYPES = None, set()


GGUF_MAGIC = b"GGUF"

# GGUF value types -> (struct format, numpy dtype) for scalars and arrays.
_SCALAR = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# ggml's limits, which llama.cpp's reader enforces too: a name longer than this, more dims or an
# alignment that is not a power of two cannot come from a working writer.
MAX_NAME = 63  # GGML_MAX_NAME (64) less the terminating NUL
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 1 << 60  # a tensor's element count must stay far from int64 overflow


@dataclass
class TensorInfo:
    """One tensor of the model: where its bytes lie and how to read them."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: shape[-1] is the contiguous (row) dimension
    nbytes: int
    path: Path
    _mmap: np.memmap
    _offset: int  # absolute byte offset in the file

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    def raw(self) -> np.ndarray:
        """Bytes as uint8 [*shape[:-1], row_bytes]: a view of the memory map, no copy."""
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        row_bytes = self.shape[-1] // block * size
        flat = self._mmap[self._offset:self._offset + self.nbytes]
        if self._offset % 4:  # general.alignment 1 or 2: the C kernels read F32/F16 words, so copy
            flat = np.array(flat)
        return flat.reshape(*self.shape[:-1], row_bytes)

    def release_pages(self) -> None:
        """Tell the OS this tensor's file bytes will not be read again (the loader calls it after
        copying them into a repacked layout): they leave this process's resident set and the page
        cache, rather than sit there beside the copy (twice the model in `top`, and in a
        container's memory count). A later raw() still reads them, from the file. The pages wholly
        inside the tensor only; a no-op where the OS lacks the calls."""
        page = mmap.PAGESIZE
        start = -(-self._offset // page) * page
        end = (self._offset + self.nbytes) // page * page
        if end <= start:
            return
        mm = getattr(self._mmap, "_mmap", None)  # numpy's memmap keeps its mmap.mmap here
        try:
            if mm is not None and hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            if hasattr(os, "posix_fadvise"):
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        except (OSError, ValueError, AttributeError):
            pass  # advice only: the pages stay where they are

    def dequantize(self, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 numpy array of `shape` (a new array), or with `rows` (indices along the first
        axis of a 2-D tensor: an embedding lookup) those rows. Decoded by the C kernels where they
        are built and support the type: the values of gguf's reference decoder, bit for bit
        (tests/test_cpu_kernels.py), 10-100x faster, which is most of a GPU model's load time;
        else by gguf itself."""
        if rows is not None and len(self.shape) != 2:
            raise ValueError(f"{self.name}: rows of a {len(self.shape)}-D tensor (a 2-D one expected)")
        kv = self._kernel_view()
        if kv is not None:
            out = _ck.dequantize_rows(kv, rows=rows)
            return out if rows is not None else out.reshape(self.shape)
        from gguf.quants import dequantize

        raw = self.raw() if rows is None else self.raw()[np.asarray(rows)]
        if self.ggml_type == GGMLQuantizationType.F32:
            out = np.array(raw.view(np.float32))
        else:
            out = dequantize(raw, self.ggml_type)
        shape = self.shape if rows is None else (len(rows), self.shape[-1])
        return np.ascontiguousarray(out.reshape(shape), dtype=np.float32)

    def _kernel_view(self):
        """The tensor as a cpu_kernels.ExpertTensor (E, R, C) over the map, made once; None for F32
        (a copy is all it needs) and where the kernels are not built, do not know the type, or the
        bytes are misaligned."""
        kv = self.__dict__.get("_kv", False)
        if kv is False:
            kv = None
            if (_ck is not None and len(self.shape) in (2, 3) and self.ggml_type != GGMLQuantizationType.F32
                    and int(self.ggml_type) in _CK_TYPES):
                shape = self.shape if len(self.shape) == 3 else (1, *self.shape)
                try:
                    kv = _ck.ExpertTensor(self.raw(), int(self.ggml_type), shape)
                except ValueError:  # e.g. an odd offset: gguf decodes it
                    kv = None
            self.__dict__["_kv"] = kv
        return kv


def _read_header(path: Path) -> tuple[dict, list[tuple], int, np.memmap]:
    """Parse one GGUF file: (metadata, [(name, dims, type, rel_offset)], data_start, memmap)."""
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise ModelFileError(f"{path}: is a directory, expected a .gguf file")
        if size < 24:
            raise ModelFileError(f"{path}: not a GGUF file (only {size} bytes)")
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:  # permissions, a FIFO or device, a file that shrank
        raise ModelFileError(f"{path}: cannot read: {e.strerror if isinstance(e, OSError) and e.strerror else e}") from None
    if bytes(mm[:4]) != GGUF_MAGIC:
        raise ModelFileError(f"{path}: not a GGUF file (bad magic {bytes(mm[:4])!r})")
    version = int(np.frombuffer(mm[4:8], "<u4")[0])
    if version not in (2, 3):
        raise ModelFileError(f"{path}: unsupported GGUF version {version} (expected 3)")
    # Read the header through a bytes object that grows as needed: metadata sits at the start.
    # Every length is checked against the bytes there before anything of that size is made.
    cap = min(size, 1 << 24)
    while True:
        buf = bytes(mm[:cap])
        try:
            return (*_parse(buf, path, size), mm)
        except _NeedMore as e:
            if cap >= size:
                raise ModelFileError(f"{path}: truncated GGUF header ({e.args[0] if e.args else 'ends early'})") from None
            cap = min(size, cap * 4)


class _NeedMore(Exception):
    pass


def _parse(buf: bytes, path: Path, file_size: int):
    pos = 8
    n = len(buf)
    what = "the header"  # the item being read, for the message if the file ends inside it

    def need(k):
        if pos + k > n:
            raise _NeedMore(f"the file ends inside {what}")

    def scalar(fmt: str):
        nonlocal pos
        k = struct.calcsize(fmt)
        need(k)
        v = struct.unpack_from(fmt, buf, pos)[0]
        pos += k
        return v

    def u64():
        return scalar("<Q")

    def u32():
        return scalar("<I")

    def string():
        nonlocal pos
        length = u64()
        if length > file_size - pos:
            raise ModelFileError(f"{path}: corrupt GGUF header ({what}: a string of {length} bytes "
                                 f"at offset {pos - 8}, the file has {file_size})")
        need(length)
        s = buf[pos:pos + length].decode("utf-8", errors="replace")
        pos += length
        return s

    def value(vtype):
        nonlocal pos
        if vtype in _SCALAR:
            return scalar(_SCALAR[vtype][0])
        if vtype == _STRING:
            return string()
        if vtype == _ARRAY:
            etype, count = u32(), u64()
            item = np.dtype(_SCALAR[etype][1]).itemsize if etype in _SCALAR else 8
            if etype == _ARRAY:  # llama.cpp's reader refuses them too; no writer makes them
                raise ModelFileError(f"{path}: corrupt GGUF header ({what}: an array of arrays)")
            if etype not in _SCALAR and etype != _STRING:
                raise ModelFileError(f"{path}: corrupt GGUF header ({what}: unknown array item type {etype})")
            if count * item > file_size - pos:
                raise ModelFileError(f"{path}: corrupt GGUF header ({what}: an array of {count} items "
                                     f"at offset {pos - 12}, the file has {file_size} bytes)")
            if etype in _SCALAR:  # bulk read
                _, dt = _SCALAR[etype]
                k = np.dtype(dt).itemsize * count
                need(k)
                arr = np.frombuffer(buf, dtype=np.dtype(dt).newbyteorder("<"), count=count, offset=pos)
                pos += k
                return arr.tolist()
            if etype == _STRING:
                out = []
                unpack = struct.unpack_from
                for _ in range(count):
                    need(8)
                    length = unpack("<Q", buf, pos)[0]
                    if length > file_size - pos:
                        raise ModelFileError(f"{path}: corrupt GGUF header ({what}: item {len(out)} is a string "
                                             f"of {length} bytes, the file has {file_size})")
                    need(8 + length)
                    out.append(buf[pos + 8:pos + 8 + length].decode("utf-8", errors="replace"))
                    pos += 8 + length
                return out
        raise ModelFileError(f"{path}: corrupt GGUF header ({what}: unknown value type {vtype})")

    n_tensors = u64()
    n_kv = u64()
    if n_tensors > 1 << 24 or n_kv > 1 << 20:
        raise ModelFileError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
    meta = {}
    for i in range(n_kv):
        what = f"metadata key {i} of {n_kv}"
        key = string()
        what = f"metadata key {short(key)}"
        if key in meta:
            raise ModelFileError(f"{path}: corrupt GGUF header (duplicate metadata key {short(key)})")
        meta[key] = value(u32())
    infos = []
    seen = set()
    for i in range(n_tensors):
        what = f"tensor {i} of {n_tensors}"
        name = string()
        what = f"tensor {short(name)}"
        if len(name.encode()) > MAX_NAME:
            raise ModelFileError(f"{path}: corrupt GGUF header (tensor {i} has a name of {len(name.encode())} bytes, "
                                 f"the ggml limit is {MAX_NAME}: {short(name, 40)})")
        if name in seen:
            raise ModelFileError(f"{path}: duplicate tensor {short(name)}")
        seen.add(name)
        ndim = u32()
        if ndim > MAX_DIMS:
            raise ModelFileError(f"{path}: corrupt GGUF header (tensor {short(name)} has {ndim} dims, at most {MAX_DIMS})")
        dims = [u64() for _ in range(ndim)]
        elements = 1
        for d in dims:
            elements *= d
        if elements > MAX_ELEMENTS:
            raise ModelFileError(f"{path}: corrupt GGUF header (tensor {short(name)} has dims {dims})")
        ttype = u32()
        offset = u64()
        infos.append((name, dims, ttype, offset))
    align = meta.get("general.alignment", 32)
    if type(align) is not int or align <= 0 or align & (align - 1) or align > 1 << 20:
        raise ModelFileError(f"{path}: general.alignment is {short(align)}; expected a power of two (default 32)")
    data_start = (pos + align - 1) // align * align
    for name, _, _, offset in infos:
        if offset % align:
            raise ModelFileError(f"{path}: tensor {short(name)} data offset {offset} is not a multiple of the "
                                 f"alignment {align}")
    return meta, infos, data_start


def _meta_int(path: Path, meta: dict, key: str, default=None, lo: int = 0, hi: int = 1 << 62):
    """An integer metadata value in lo..hi, or a one-line error naming the key."""
    v = meta.get(key, default)
    if v is None:
        return None
    if type(v) is not int or not lo <= v <= hi:
        raise ModelFileError(f"{path}: {key} is {short(v)}; expected a whole number in {lo}..{hi}")
    return v


def split_paths(path: Path, meta: dict) -> list[Path]:
    """All files of a split model, given its first file (or [path] for a single file)."""
    count = _meta_int(path, meta, "split.count", 1, 0, 99999)  # gguf-split names have 5 digits
    if count <= 1:
        return [path]
    m = SPLIT_RE.match(path.name)
    if not m:
        raise ModelFileError(f"{path}: split.count is {count} but the name is not NAME-00001-of-{count:05d}.gguf")
    if int(m["no"]) != 1:
        first = path.with_name(f"{m['stem']}-00001-of-{int(m['count']):05d}.gguf")
        raise ModelFileError(f"{path}: this is split {int(m['no'])} of {int(m['count'])}; open the first one: {first}")
    if int(m["count"]) != count:
        raise ModelFileError(f"{path}: split.count is {count} but the name says {int(m['count'])} splits")
    return [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


class GGUFFile:
    """A GGUF model (one file or all splits): `metadata` dict and `tensors` by name."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta, infos, data_start, mm = _read_header(self.path)
        self.metadata: dict = meta
        self.tensors: dict[str, TensorInfo] = {}
        self.paths = split_paths(self.path, meta)
        self._add(self.path, infos, data_start, mm)
        for i, p in enumerate(self.paths[1:], start=2):
            if not p.exists():
                raise ModelFileError(f"{p}: missing split {i} of {len(self.paths)} (opened {self.path.name})")
            m2, infos2, start2, mm2 = _read_header(p)
            no = _meta_int(p, m2, "split.no", i - 1, 0, 99999)
            if no != i - 1:
                raise ModelFileError(f"{p}: split.no is {no}, expected {i - 1}")
            count2 = _meta_int(p, m2, "split.count", len(self.paths), 0, 99999)
            if count2 != len(self.paths):
                raise ModelFileError(f"{p}: split.count is {count2}, the first split says {len(self.paths)}")
            self._add(p, infos2, start2, mm2)
        expect = _meta_int(self.path, meta, "split.tensors.count")
        if expect is not None and expect != len(self.tensors):
            raise ModelFileError(
                f"{self.path}: split.tensors.count is {expect} but the splits hold {len(self.tensors)} tensors")

    def _add(self, path: Path, infos, data_start: int, mm: np.memmap) -> None:
        size = mm.shape[0]
        for name, dims, ttype, offset in infos:
            try:
                gtype = GGMLQuantizationType(ttype)
            except ValueError:
                raise ModelFileError(f"{path}: tensor {short(name)} has unknown ggml type {ttype}") from None
            if gtype not in GGML_QUANT_SIZES:
                raise ModelFileError(f"{path}: tensor {short(name)} has unsupported type {gtype.name}")
            shape = tuple(int(d) for d in reversed(dims))
            block, bsize = GGML_QUANT_SIZES[gtype]
            if shape and shape[-1] % block:
                raise ModelFileError(f"{path}: tensor {short(name)} row length {shape[-1]} is not a multiple of "
                                     f"{gtype.name} block {block}")
            elements = 1
            for d in shape:  # Python ints: a lying dim cannot wrap around
                elements *= d
            nbytes = elements // block * bsize if shape else bsize
            start = data_start + offset
            if start + nbytes > size:
                raise ModelFileError(
                    f"{path}: truncated: tensor {short(name)} needs bytes {start}..{start + nbytes} but the file has {size}")
            if name in self.tensors:
                raise ModelFileError(f"{path}: duplicate tensor {short(name)}")
            self.tensors[name] = TensorInfo(name, gtype, shape, nbytes, path, mm, start)

    @property
    def architecture(self) -> str:
        v = self.metadata.get("general.architecture", "?")
        return v if isinstance(v, str) else "?"

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
