"""The plan: a YAML file of data only, read into plain dataclasses with every value checked.

Every error names the file, the line, the key and what was expected, in one line:
    configs/x.yaml:12: placement.routed_experts.defualt: unknown key (did you mean 'default'?)
Line numbers come from the YAML node tree (`yaml.compose`), not from a second parse.

The same settings can be overridden from the CLI or `runtime.load(**overrides)` with flat keys
(`apply_overrides`); those errors read `override 'key': ...`.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import regex
import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from runtime.errors import NextnError, short


class PlanError(NextnError):
    """A plan file or a plan override is invalid, or the plan cannot be executed on this model."""


SIDES = ("gpu", "cpu")
GPU_DTYPES = ("auto", "float32", "float16", "bfloat16")
# the KV cache's element type: auto (the attention side's dtype: float32 on the CPU, gpu_dtype on
# CUDA) or float16 (half the memory and, on the CPU, half the bytes attention reads per token)
KV_CACHE_TYPES = ("auto", "float32", "float16")
DEFAULT_CONTEXT = 4096  # context when the plan leaves it out: the model's, capped at this
# Upper bounds that catch a stray digit before it becomes a million OpenMP threads or a KV cache
# of petabytes (the model's own context_length caps the context again at load).
MAX_THREADS = 1024
MAX_CONTEXT = 1 << 24

LAYER_GROUPS = ("attention", "dense_ffn", "shared_experts", "routed_experts")
GROUP_NAMES = ("token_embd", "output") + LAYER_GROUPS + ("mtp",)


# ----------------------------------------------------------------------------------------------
# The plan as data


@dataclass
class LayerRange:
    first: int
    last: int  # inclusive
    side: str
    where: str  # "file:line: key" of the entry, for resolve-time errors


@dataclass
class LayerGroup:
    """Where a per-layer group lives: `n_cpu` first blocks on cpu (llama.cpp --n-cpu-moe) or
    explicit layer ranges, else `default`."""

    default: str
    ranges: list[LayerRange] = field(default_factory=list)
    n_cpu: int | None = None
    where: str = ""

    def side_for(self, layer: int) -> str:
        if self.n_cpu is not None:
            return "cpu" if layer < self.n_cpu else "gpu"
        for r in self.ranges:
            if r.first <= layer <= r.last:
                return r.side
        return self.default


@dataclass
class MtpGroup:
    """The whole MTP (nextn) layer; its routed experts may be placed apart (None: with the layer,
    or per routed_experts.n_cpu when that reaches the nextn block, like llama.cpp)."""

    side: str = "gpu"
    routed_experts: str | None = None
    where: str = ""


@dataclass
class Groups:
    token_embd: str = "gpu"
    output: str = "gpu"
    attention: LayerGroup = field(default_factory=lambda: LayerGroup("gpu"))
    dense_ffn: LayerGroup = field(default_factory=lambda: LayerGroup("gpu"))
    shared_experts: LayerGroup = field(default_factory=lambda: LayerGroup("gpu"))
    routed_experts: LayerGroup = field(default_factory=lambda: LayerGroup("cpu"))
    mtp: MtpGroup = field(default_factory=MtpGroup)
    where: dict[str, str] = field(default_factory=dict)  # group name -> "file:line: key"


# A tensor-name pattern must finish against one name within this (a GLM name is < 64 characters;
# an ordinary pattern takes microseconds). Patterns are compiled by the `regex` module, which takes
# the same syntax as `re` and, unlike `re` (whose matcher cannot be interrupted short of killing a
# process), stops a match at a timeout; its matcher also avoids most exponential backtracking
# (`^([a-z._0-9]|[a-z._0-9])*!` never finishes under `re` against a tensor name, here it takes
# microseconds). A worker process per check would cost more than the whole resolve.
REGEX_TIMEOUT_S = 0.1
# names every pattern is tried against when the plan is read (the model's names at resolve)
_PROBE_NAMES = ("token_embd.weight", "blk.10.ffn_gate_exps.weight", "blk.46.nextn.shared_head_head.weight",
                "blk.92.attn_output.weight")


@dataclass
class Override:
    pattern: str
    side: str
    regex: regex.Pattern
    where: str  # "file:line: overrides[i]" or "override 'override_tensor'[i]"

    def search(self, name: str):
        """regex.search(name), refused (PlanError) if it does not finish in REGEX_TIMEOUT_S."""
        return bounded_search(self.regex, name, self.where)


def bounded_search(rx, name: str, where: str):
    try:
        return rx.search(name, timeout=REGEX_TIMEOUT_S)
    except TimeoutError:
        _fail(where, f"regular expression {short(rx.pattern)} did not finish against tensor name {short(name)} "
                     f"in {REGEX_TIMEOUT_S * 1000:.0f} ms (catastrophic backtracking); simplify it, e.g. "
                     f"'blk\\.[0-9]+\\.ffn_.*_exps=cpu'")


# The longest draft a step may make, for plans, --draft-max, the API and the server: 0..DRAFT_MAX_LIMIT
# (0 drafts nothing: MTP off).
DRAFT_MAX_LIMIT = 16


@dataclass
class Speculative:
    mtp: bool | None = None  # None ("auto"): on when the model has a nextn layer
    draft_max: int = 1
    p_min: float = 0.0
    adaptive: bool = True
    draft_ahead: bool | None = None  # None ("auto"): off (it lost on the GPU check, BENCHMARKS.md)


@dataclass
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    repeat_penalty: float = 1.0  # 1: off (runtime/sampling.py)
    repeat_last_n: int = 64


@dataclass
class Server:
    """`nextn serve` settings (llama-server's names; the command line overrides them)."""

    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 1  # slots
    ctx_size: int | None = None  # context of all slots together (None: the plan's context)
    api_key: str | None = None
    alias: str | None = None  # the model id clients see (None: the model file's name)
    queue: int | None = None  # requests waiting for a slot before a 503 (None: 4x slots)


@dataclass
class Plan:
    model_path: Path | None = None
    source: str = "<defaults>"
    gpu: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    threads: int | str = "auto"
    repack: bool | str = "auto"  # CPU experts: repacked copy at load where a faster layout exists
    gpu_dtype: str = "auto"
    kv_cache: str = "auto"  # KV_CACHE_TYPES
    context: int | None = None  # None: model's context_length capped at DEFAULT_CONTEXT
    groups: Groups = field(default_factory=Groups)
    overrides: list[Override] = field(default_factory=list)
    speculative: Speculative = field(default_factory=Speculative)
    sampling: Sampling = field(default_factory=Sampling)
    server: Server = field(default_factory=Server)
    description: str | None = None
    where: dict[str, str] = field(default_factory=dict)  # top-level key -> "file:line: key"

    def context_for(self, model_context: int) -> int:
        if self.context is not None:
            return self.context
        return min(int(model_context), DEFAULT_CONTEXT)

    def loc(self, key: str) -> str:
        """Where a setting came from, for messages: 'file:line: key' or the plan source."""
        return self.where.get(key) or f"{self.source}: {key}"


# ----------------------------------------------------------------------------------------------
# Value checkers shared by the YAML reader and the flat overrides. Each takes `where` (the prefix
# of the message) and raises PlanError(f"{where}: ...").


def _fail(where: str, msg: str):
    raise PlanError(f"{where}: {msg}")


def _typename(v) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(v), type(v).__name__)


def check_side(v, where: str) -> str:
    """'gpu' | 'cpu', also llama.cpp device names: CPU, CUDA0, cuda, cuda:N -> the gpu side."""
    if isinstance(v, str):
        s = v.strip().lower()
        if s in SIDES:
            return s
        if re.fullmatch(r"cuda(:?\d+)?", s):
            return "gpu"
    _fail(where, f"unknown device {short(v)}; expected gpu or cpu (llama.cpp names CPU, CUDA0 also work)")


def check_gpu(v, where: str) -> str:
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", s):
            return s
        m = re.fullmatch(r"cuda(\d+)", s)
        if m:
            return f"cuda:{m[1]}"
    _fail(where, f"unknown device {short(v)}; expected auto, cpu, cuda or cuda:N")


def check_int(v, where: str, lo: int | None = None, hi: int | None = None, what: str = "an integer") -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        elif isinstance(v, str) and re.fullmatch(r"[+-]?\d+", v.strip()):
            v = int(v)
        else:
            _fail(where, f"expected {what}, got {_typename(v)} {short(v)}")
    if lo is not None and v < lo or hi is not None and v > hi:
        if lo is not None and hi is not None and hi <= 64:
            rng = f"in {lo}..{hi}"
        else:
            rng = f">= {lo}" if lo is not None and v < lo else f"<= {hi}"
        _fail(where, f"expected {what} {rng}, got {short(v)}")
    return v


def check_float(v, where: str, lo: float | None = None, hi: float | None = None, lo_open=False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            v = float(v) if isinstance(v, str) else None
        except ValueError:
            v = None
        if v is None:
            _fail(where, "expected a number")
    v = float(v)
    bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi)
    if v in (float("inf"), float("-inf")):
        _fail(where, f"expected a finite number, got {v}")
    if bad or v != v:
        rng = f"{'>' if lo_open else '>='} {lo}" if hi is None else f"in {'(' if lo_open else '['}{lo}, {hi}]"
        _fail(where, f"expected a number {rng}, got {v}")
    return v


def check_bool(v, where: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        return v.strip().lower() in ("true", "yes", "on", "1")
    _fail(where, f"expected true or false, got {_typename(v)} {short(v)}")


def check_threads(v, where: str) -> int | str:
    if isinstance(v, str) and v.strip().lower() == "auto":
        return "auto"
    return check_int(v, where, lo=1, hi=MAX_THREADS, what="auto or a thread count")


def check_repack(v, where: str) -> bool | str:
    if isinstance(v, str) and v.strip().lower() == "auto":
        return "auto"
    if isinstance(v, bool) or isinstance(v, str) and v.strip().lower() in ("true", "false", "yes", "no", "on", "off"):
        return check_bool(v, where)
    _fail(where, f"expected auto, true or false, got {_typename(v)} {short(v)}")


def check_dtype(v, where: str) -> str:
    if isinstance(v, str) and v.strip().lower() in GPU_DTYPES:
        return v.strip().lower()
    aliases = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "bf16": "bfloat16"}
    if isinstance(v, str) and v.strip().lower() in aliases:
        return aliases[v.strip().lower()]
    _fail(where, f"unknown dtype {short(v)}; expected one of {', '.join(GPU_DTYPES)}")


def check_kv_cache(v, where: str) -> str:
    aliases = {"f32": "float32", "fp32": "float32", "f16": "float16", "fp16": "float16"}
    key = v.strip().lower() if isinstance(v, str) else None
    key = aliases.get(key, key)
    if key in KV_CACHE_TYPES:
        return key
    _fail(where, f"unknown KV cache type {short(v)}; expected one of auto, float32 (f32), float16 (f16)")


def check_context(v, where: str) -> int | None:
    if v is None or isinstance(v, str) and v.strip().lower() == "auto":
        return None
    return check_int(v, where, lo=16, hi=MAX_CONTEXT, what="auto or a context length")


def check_mtp(v, where: str) -> bool | None:
    if v is None or isinstance(v, str) and v.strip().lower() == "auto":
        return None
    return check_bool(v, where)


def check_seed(v, where: str) -> int | None:
    if v is None:
        return None
    return check_int(v, where, lo=0, hi=2**64 - 1, what="null or a non-negative integer seed")


def compile_override(text: str, where: str) -> tuple[str, str, re.Pattern]:
    """'REGEX=DEVICE' (split at the last '=') -> (pattern, side, compiled)."""
    if not isinstance(text, str) or "=" not in text:
        _fail(where, f"expected 'REGEX=DEVICE' (like llama.cpp -ot), got {short(text)}")
    pattern, _, dev = text.rpartition("=")
    return (*_compile(pattern, dev, where),)


def _compile(pattern, dev, where: str) -> tuple[str, str, re.Pattern]:
    if not isinstance(pattern, str) or not pattern:
        _fail(where, f"expected a non-empty regular expression, got {short(pattern)}")
    if len(pattern) > 1000:
        _fail(where, f"regular expression of {len(pattern)} characters; at most 1000")
    side = check_side(dev, where)
    try:
        re.compile(pattern)  # Python's syntax and messages; the `regex` module then matches it
        rx = regex.compile(pattern)
    except (regex.error, re.error, OverflowError, RecursionError) as e:
        _fail(where, f"invalid regular expression {short(pattern)}: {e}")
    for name in _PROBE_NAMES:
        bounded_search(rx, name, where)
    return pattern, side, rx


def parse_range(v, where: str) -> tuple[int, int]:
    """A layer or an inclusive layer range: 5, '5', '0-9'."""
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 0:
            _fail(where, f"layer {v} is negative")
        return v, v
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", v)
        if m:
            a, b = int(m[1]), int(m[2] if m[2] is not None else m[1])
            if b < a:
                _fail(where, f"layer range {short(v)} is empty (last < first)")
            return a, b
    _fail(where, f"expected a layer N or a range 'A-B', got {_typename(v)} {short(v)}")


# ----------------------------------------------------------------------------------------------
# YAML reading with line numbers


class _Reader:
    def __init__(self, source: str):
        self.source = source
        self.ctor = SafeConstructor()

    def where(self, node: Node, key: str) -> str:
        return f"{self.source}:{node.start_mark.line + 1}: {key}"

    def scalar(self, node: Node, key: str):
        if not isinstance(node, ScalarNode):
            kind = "a mapping" if isinstance(node, MappingNode) else "a list"
            _fail(self.where(node, key), f"expected a single value, got {kind}")
        try:
            return self.ctor.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            _fail(self.where(node, key), f"bad value: {getattr(e, 'problem', e)}")

    def mapping(self, node: Node, key: str, allowed) -> list[tuple[str, Node, Node]]:
        """[(name, key_node, value_node)] of a mapping whose keys must be in `allowed`."""
        if not isinstance(node, MappingNode):
            what = "a list" if isinstance(node, SequenceNode) else f"{_typename(self.scalar(node, key))}"
            _fail(self.where(node, key or "plan"), f"expected a mapping with keys {', '.join(allowed)}; got {what}")
        out, seen = [], {}
        for kn, vn in node.value:
            name = self.scalar(kn, key or "plan")
            if not isinstance(name, str):
                name = str(name)
            path = f"{key}.{name}" if key else name
            if name not in allowed:
                close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.5)
                hint = f" (did you mean '{close[0]}'?)" if close else f"; expected one of {', '.join(allowed)}"
                _fail(self.where(kn, path), f"unknown key{hint}")
            if name in seen:
                _fail(self.where(kn, path), f"duplicate key (first given on line {seen[name]})")
            seen[name] = kn.start_mark.line + 1
            out.append((name, kn, vn))
        return out


_TOP = ("description", "model", "gpu", "threads", "repack", "gpu_dtype", "kv_cache", "context", "placement", "overrides",
        "speculative", "sampling", "server")
_LAYER_KEYS = ("default", "layers", "n_cpu")
_MTP_KEYS = ("device", "routed_experts")
_SPEC = ("mtp", "draft_max", "p_min", "adaptive", "draft_ahead")
_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "seed", "max_tokens", "repeat_penalty", "repeat_last_n")
_SERVER = ("host", "port", "parallel", "ctx_size", "api_key", "alias", "queue")


def check_text(v, where: str, what: str) -> str:
    if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip():
        return str(v).strip()
    _fail(where, f"expected {what}, got {_typename(v)} {v!r}")


def _check_server(name: str, v, where: str):
    if v is None and name in ("ctx_size", "api_key", "alias", "queue"):
        return None
    return {
        "host": lambda v, w: check_text(v, w, "a host name or address"),
        "port": lambda v, w: check_int(v, w, lo=0, hi=65535, what="a port"),
        "parallel": lambda v, w: check_int(v, w, lo=1, hi=256, what="a slot count"),
        "ctx_size": lambda v, w: check_int(v, w, lo=16, what="a context length"),
        "api_key": lambda v, w: check_text(v, w, "an API key"),
        "alias": lambda v, w: check_text(v, w, "a model name"),
        "queue": lambda v, w: check_int(v, w, lo=0, what="a request count"),
    }[name](v, where)


def _check_spec(name: str, v, where: str):
    return {
        "mtp": check_mtp,
        "draft_max": lambda v, w: check_int(v, w, lo=0, hi=DRAFT_MAX_LIMIT, what="a draft length"),
        "p_min": lambda v, w: check_float(v, w, 0.0, 1.0),
        "adaptive": check_bool,
        "draft_ahead": check_mtp,  # auto | true | false
    }[name](v, where)


def _check_sampling(name: str, v, where: str):
    return {
        "temperature": lambda v, w: check_float(v, w, 0.0),
        "top_k": lambda v, w: check_int(v, w, lo=0, hi=1 << 31, what="a top-k (0: off)"),
        "top_p": lambda v, w: check_float(v, w, 0.0, 1.0, lo_open=True),
        "min_p": lambda v, w: check_float(v, w, 0.0, 1.0),
        "seed": check_seed,
        "max_tokens": lambda v, w: check_int(v, w, lo=1, hi=MAX_CONTEXT, what="a token count"),
        "repeat_penalty": lambda v, w: check_float(v, w, 0.0, lo_open=True),
        "repeat_last_n": lambda v, w: check_int(v, w, lo=1, hi=MAX_CONTEXT, what="a token count"),
    }[name](v, where)


def _read_layer_group(r: _Reader, node: Node, key: str, default: str, key_node: Node) -> LayerGroup:
    where = r.where(key_node, key)
    if isinstance(node, ScalarNode):
        return LayerGroup(check_side(r.scalar(node, key), r.where(node, key)), where=where)
    g = LayerGroup(default, where=where)
    items = r.mapping(node, key, _LAYER_KEYS)
    for name, kn, vn in items:
        path = f"{key}.{name}"
        if name == "default":
            g.default = check_side(r.scalar(vn, path), r.where(vn, path))
        elif name == "n_cpu":
            g.n_cpu = check_int(r.scalar(vn, path), r.where(vn, path), lo=0, what="a layer count")
        else:  # layers: {RANGE: DEVICE, ...}
            if not isinstance(vn, MappingNode):
                _fail(r.where(vn, path), "expected a mapping of layer ranges to devices, e.g. {0-9: cpu, 40-45: gpu}")
            for rk, rv in vn.value:
                rkey = r.scalar(rk, path)
                w = r.where(rk, f"{path}.{rkey}")
                a, b = parse_range(rkey, w)
                for other in g.ranges:
                    if a <= other.last and other.first <= b:
                        _fail(w, f"layers {a}-{b} overlap layers {other.first}-{other.last} ({other.where})")
                g.ranges.append(LayerRange(a, b, check_side(r.scalar(rv, path), r.where(rv, f"{path}.{rkey}")), w))
    if g.n_cpu is not None and g.ranges:
        _fail(where, "give either n_cpu or layers, not both")
    return g


def _read_groups(r: _Reader, node: Node, groups: Groups) -> None:
    allowed = GROUP_NAMES
    for name, kn, vn in r.mapping(node, "placement", allowed):
        path = f"placement.{name}"
        groups.where[name] = r.where(kn, path)
        if name in ("token_embd", "output"):
            setattr(groups, name, check_side(r.scalar(vn, path), r.where(vn, path)))
        elif name in LAYER_GROUPS:
            setattr(groups, name, _read_layer_group(r, vn, path, getattr(groups, name).default, kn))
        else:  # mtp
            m = MtpGroup(where=r.where(kn, path))
            if isinstance(vn, ScalarNode):
                m.side = check_side(r.scalar(vn, path), r.where(vn, path))
            else:
                for k2, kn2, vn2 in r.mapping(vn, path, _MTP_KEYS):
                    w = r.where(vn2, f"{path}.{k2}")
                    if k2 == "device":
                        m.side = check_side(r.scalar(vn2, path), w)
                    else:
                        m.routed_experts = check_side(r.scalar(vn2, path), w)
            groups.mtp = m


def _read_overrides(r: _Reader, node: Node) -> list[Override]:
    if isinstance(node, ScalarNode) and r.scalar(node, "overrides") is None:
        return []
    if not isinstance(node, SequenceNode):
        _fail(r.where(node, "overrides"), "expected a list of 'REGEX=DEVICE' entries")
    out = []
    for i, item in enumerate(node.value):
        key = f"overrides[{i}]"
        w = r.where(item, key)
        if isinstance(item, MappingNode):
            d = {}
            for name, kn, vn in r.mapping(item, key, ("pattern", "device")):
                d[name] = r.scalar(vn, f"{key}.{name}")
            if "pattern" not in d or "device" not in d:
                _fail(w, "expected both pattern and device")
            pat, side, rx = _compile(d["pattern"], d["device"], w)
        else:
            pat, side, rx = compile_override(r.scalar(item, key), w)
        out.append(Override(pat, side, rx, w))
    return out


def parse_plan_text(text: str, source: str, base_dir: Path | None = None) -> Plan:
    """Parse and check plan YAML (no model needed). `base_dir`: where a relative model path starts."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else "?"
        what = " ".join(str(x) for x in (e.context, e.problem) if x)
        raise PlanError(f"{source}:{line}: YAML syntax error: {what}") from None
    except yaml.reader.ReaderError as e:  # a control character: its line, not the library's two
        line = text[:e.position].count("\n") + 1
        raise PlanError(f"{source}:{line}: YAML error: character {e.character!r} is not allowed") from None
    except yaml.YAMLError as e:
        raise PlanError(f"{source}: YAML error: {short(' '.join(str(e).split()), 200)}") from None
    plan = Plan(source=source)
    if root is None:
        return plan
    r = _Reader(source)
    if isinstance(root, ScalarNode) and r.scalar(root, "plan") is None:
        return plan
    for name, kn, vn in r.mapping(root, "", _TOP):
        w = r.where(vn, name)
        plan.where[name] = r.where(kn, name)
        if name == "placement":
            if not (isinstance(vn, ScalarNode) and r.scalar(vn, name) is None):
                _read_groups(r, vn, plan.groups)
            continue
        if name == "overrides":
            plan.overrides = _read_overrides(r, vn)
            continue
        if name in ("speculative", "sampling", "server"):
            if isinstance(vn, ScalarNode) and r.scalar(vn, name) is None:
                continue
            keys, check, obj = {"speculative": (_SPEC, _check_spec, plan.speculative),
                                "sampling": (_SAMPLING, _check_sampling, plan.sampling),
                                "server": (_SERVER, _check_server, plan.server)}[name]
            for k2, kn2, vn2 in r.mapping(vn, name, keys):
                path = f"{name}.{k2}"
                plan.where[path] = r.where(kn2, path)
                setattr(obj, k2, check(k2, r.scalar(vn2, path), r.where(vn2, path)))
            continue
        v = r.scalar(vn, name)
        if name == "description":
            plan.description = None if v is None else str(v)
        elif name == "model":
            if v is None or v == "":
                plan.model_path = None
            elif not isinstance(v, str):
                _fail(w, f"expected a path to a .gguf file, got {_typename(v)} {short(v)}")
            else:
                p = Path(os.path.expanduser(v))
                if not p.is_absolute() and base_dir is not None:
                    p = base_dir / p
                plan.model_path = Path(os.path.normpath(p))
        elif name == "gpu":
            plan.gpu = check_gpu(v, w)
        elif name == "threads":
            plan.threads = check_threads(v, w)
        elif name == "repack":
            plan.repack = check_repack(v, w)
        elif name == "gpu_dtype":
            plan.gpu_dtype = check_dtype(v, w)
        elif name == "kv_cache":
            plan.kv_cache = check_kv_cache(v, w)
        elif name == "context":
            plan.context = check_context(v, w)
    return plan


# ----------------------------------------------------------------------------------------------
# Flat overrides (CLI flags, runtime.load(**overrides))

OVERRIDE_KEYS = ("model", "gpu", "threads", "repack", "gpu_dtype", "kv_cache", "context", "cpu_moe", "n_cpu_moe", "override_tensor",
                 "mtp", "draft_max", "p_min", "adaptive", "draft_ahead") + _SAMPLING


def apply_overrides(plan: Plan, overrides: dict[str, Any] | None) -> Plan:
    """A copy of `plan` with flat overrides applied. A value of None leaves the setting alone."""
    if not overrides:
        return plan
    plan = replace(plan, groups=replace(plan.groups, routed_experts=replace(plan.groups.routed_experts),
                                        mtp=replace(plan.groups.mtp), where=dict(plan.groups.where)),
                   overrides=list(plan.overrides), speculative=replace(plan.speculative),
                   sampling=replace(plan.sampling), where=dict(plan.where))
    for key in overrides:
        if key not in OVERRIDE_KEYS:
            close = difflib.get_close_matches(key, OVERRIDE_KEYS, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; expected one of {', '.join(OVERRIDE_KEYS)}"
            raise PlanError(f"override '{key}': unknown setting{hint}")
    for key, v in overrides.items():
        w = f"override '{key}'"
        if v is None:
            continue
        plan.where[key] = w
        if key == "model":
            if not isinstance(v, (str, os.PathLike)) or str(v) == "":
                _fail(w, f"expected a path to a .gguf file, got {short(v)}")
            plan.model_path = Path(os.path.normpath(Path(os.path.expanduser(str(v))).absolute()))
        elif key == "gpu":
            plan.gpu = check_gpu(v, w)
        elif key == "threads":
            plan.threads = check_threads(v, w)
        elif key == "repack":
            plan.repack = check_repack(v, w)
        elif key == "gpu_dtype":
            plan.gpu_dtype = check_dtype(v, w)
        elif key == "kv_cache":
            plan.kv_cache = check_kv_cache(v, w)
        elif key == "context":
            plan.context = check_context(v, w)
        elif key == "cpu_moe":
            if check_bool(v, w):
                plan.groups.routed_experts = LayerGroup("cpu", where=w)
                plan.groups.mtp.routed_experts = "cpu"
                plan.groups.where["routed_experts"] = w
        elif key == "n_cpu_moe":
            n = check_int(v, w, lo=0, what="a layer count")
            plan.groups.routed_experts = LayerGroup("cpu", n_cpu=n, where=w)
            plan.groups.where["routed_experts"] = w
        elif key == "override_tensor":
            items = [v] if isinstance(v, str) else v
            if not isinstance(items, (list, tuple)):
                _fail(w, f"expected a list of 'REGEX=DEVICE' strings, got {_typename(v)}")
            new = []
            for i, item in enumerate(items):
                wi = f"{w}[{i}]"
                new.append(Override(*compile_override(item, wi), wi))
            plan.overrides = new + plan.overrides  # CLI overrides come first: first match wins
        elif key in _SPEC:
            plan.where[f"speculative.{key}"] = w
            setattr(plan.speculative, key, _check_spec(key, v, w))
        else:
            plan.where[f"sampling.{key}"] = w
            setattr(plan.sampling, key, _check_sampling(key, v, w))
    return plan


def load_plan(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None, *,
              check_model: bool = True) -> Plan:
    """Read and check a plan file (None: the defaults), then apply flat overrides.

    A model path that does not exist is an error (with the line of `model:`) unless
    `check_model=False`. A plan without a model is valid; resolving it needs a model file.
    """
    if path is None:
        plan = Plan()
    else:
        p = Path(path)
        if p.suffix.lower() == ".gguf":
            raise PlanError(f"{p}: is a model file, not a plan; give it as the model (load_plan(None, "
                            f"{{'model': ...}}), `model:` in a plan, or --model)")
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PlanError(f"{p}: no such plan file") from None
        except IsADirectoryError:
            raise PlanError(f"{p}: is a directory, expected a plan .yaml file") from None
        except UnicodeDecodeError as e:
            raise PlanError(f"{p}: not a text file ({e.reason} at byte {e.start})") from None
        except OSError as e:  # permissions, a device
            raise PlanError(f"{p}: cannot read the plan: {e.strerror or e}") from None
        plan = parse_plan_text(text, str(p), base_dir=p.parent)
    plan = apply_overrides(plan, overrides)
    if check_model and plan.model_path is not None:
        mp = plan.model_path
        try:
            mp.stat()
        except FileNotFoundError:
            pass
        except OSError as e:  # a name too long, a loop of links, no permission on a folder
            _fail(plan.loc("model"), f"model file {short(str(mp), 120)}: {e.strerror or e}")
        if not mp.exists():
            rel = " (relative paths start at the plan file's folder)" if plan.where.get("model", "").find("override") < 0 \
                and path is not None else ""
            _fail(plan.loc("model"), f"model file {mp} does not exist{rel}")
        if mp.is_dir():
            _fail(plan.loc("model"), f"{mp} is a directory, expected a .gguf file")
    return plan
