"""Resolution: every tensor of a model file to exactly one side, "gpu" or "cpu".

Order: tensor-name overrides first (first match wins), then the semantic groups. The "gpu" side
may physically be the CPU (no CUDA): the engine picks the torch device from `plan.gpu`; here we
only speak of sides, and bytes crossing between them count as if they were two devices.

Op units. The engine runs each unit on the side that holds its tensors and moves activations
only. A unit split across sides would need a weight copied at every step, so it is refused:
  token_embd                       token_embd.weight
  output (the head)                output_norm.weight, output.weight (or token_embd when tied)
  blk.N attention                  attn_norm, attn_q/k/v (+bias), attn_q_norm/attn_k_norm, attn_output,
                                   post_attention_norm; with latent attention (deepseek2) attn_q_a,
                                   attn_q_a_norm, attn_q_b, attn_kv_a_mqa, attn_kv_a_norm, attn_k_b,
                                   attn_v_b, attn_output, ffn_norm
  blk.N dense_ffn                  ffn_gate, ffn_up, ffn_down
  blk.N shared_experts             ffn_gate_shexp, ffn_up_shexp, ffn_down_shexp
  blk.N routed_experts             ffn_gate_exps, ffn_up_exps, ffn_down_exps
  blk.N router                     ffn_gate_inp, exp_probs_b (float32; placed with the attention group:
                                   its ids and weights cross to the experts' side)
  blk.L mtp_nextn (nextn block)    nextn.eh_proj, nextn.enorm, nextn.hnorm, nextn.shared_head_norm
  blk.L mtp_head                   nextn.shared_head_head (own copy, when not a duplicate)
  blk.L mtp_embed                  nextn.embed_tokens (own copy, when not a duplicate)
The MTP layer reads its embedding and head at every draft step, so they must be on the side of
the MTP layer (mtp_nextn); the same holds for the main ones when it shares them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from runtime.config import ModelConfig

from .schema import Plan, PlanError

_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
_EXPS = re.compile(r"^ffn_(gate|up|down)_exps\.")
_SHEXP = re.compile(r"^ffn_(gate|up|down)_shexp\.")
_DENSE = re.compile(r"^ffn_(gate|up|down)\.")
_ATTN = re.compile(r"^(attn_|post_attention_norm\.|ffn_norm\.)")  # ffn_norm: deepseek2's post-attention norm
_ROUTER = re.compile(r"^(ffn_gate_inp|exp_probs_b)\.")


@dataclass(frozen=True)
class TensorRole:
    group: str  # token_embd | output | attention | dense_ffn | shared_experts | routed_experts | mtp | unknown
    layer: int | None
    unit: str  # op unit id, e.g. "blk.3.attention", "token_embd", "blk.46.mtp_proj"
    part: str  # the row label within the group (for the MTP layer: attention, routed_experts, nextn, ...)


def classify(name: str, cfg: ModelConfig) -> TensorRole:
    """Which group, layer and op unit a tensor belongs to."""
    if name == "token_embd.weight":
        return TensorRole("token_embd", None, "token_embd", "token_embd")
    if name in ("output.weight", "output_norm.weight"):
        return TensorRole("output", None, "output", "output")
    m = _BLK.match(name)
    if not m:
        return TensorRole("unknown", None, f"unknown:{name}", "unknown")
    layer, rest = int(m[1]), m[2]
    if rest.startswith("nextn."):
        sub = rest[len("nextn."):]
        if sub.startswith("embed_tokens"):
            part = "embed"
        elif sub.startswith("shared_head_head"):
            part = "head"
        else:
            part = "nextn"  # eh_proj, enorm, hnorm, shared_head_norm
        return TensorRole("mtp", layer, f"blk.{layer}.mtp_{part}", part)
    if _EXPS.match(rest):
        part = "routed_experts"
    elif _ROUTER.match(rest):
        part = "router"
    elif _SHEXP.match(rest):
        part = "shared_experts"
    elif _DENSE.match(rest):
        part = "dense_ffn"
    elif _ATTN.match(rest):
        part = "attention"
    else:
        return TensorRole("unknown", layer, f"unknown:{name}", "unknown")
    group = "mtp" if layer >= cfg.n_layers else ("attention" if part == "router" else part)
    return TensorRole(group, layer, f"blk.{layer}.{part}", part)


@dataclass
class Row:
    """One line of the placement table: a group (or MTP part) over a layer range on one side."""

    group: str  # "attention", "routed_experts", "mtp.routed_experts", ...
    first: int | None
    last: int | None
    side: str  # gpu | cpu | none
    types: tuple[str, ...]
    n_tensors: int
    file_bytes: int
    names: list[str] = field(default_factory=list, repr=False)

    @property
    def layers(self) -> str:
        if self.first is None:
            return "-"
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass
class Placement:
    tensors: dict[str, str]  # name -> "gpu" | "cpu" | "none" (not loaded: a duplicate or unused)
    roles: dict[str, TensorRole]
    units: dict[str, str]  # op unit -> side
    rows: list[Row]
    warnings: list[str]
    model: str  # model path / label
    cfg: ModelConfig
    head_name: str  # the tensor the main head multiplies by (output.weight, or token_embd.weight when tied)
    mtp_shares_embed: bool
    mtp_shares_head: bool
    mtp_embed_name: str | None  # the embedding table the MTP layer uses (None: no nextn layer)
    mtp_head_name: str | None
    mtp_enabled: bool  # speculative.mtp resolved against the model
    override_of: dict[str, str] = field(default_factory=dict)  # tensor -> override 'where' that placed it

    def side_of(self, name: str) -> str:
        try:
            return self.tensors[name]
        except KeyError:
            raise PlanError(f"tensor {name} is not in {self.model}") from None

    def unit_of(self, name: str) -> str:
        return self.roles[name].unit

    def names_on(self, side: str) -> list[str]:
        return [n for n, s in self.tensors.items() if s == side]


def same_bytes(a, b, chunk: int = 1 << 24) -> bool:
    """Whether two tensors hold the same bytes: type, shape and size first, then the data.

    Sampled chunks are compared first (different tensors bail out after a few KiB), then the whole
    memory maps chunk by chunk. Synthetic tables carry a `content_key` instead of data.
    """
    if a.ggml_type != b.ggml_type or tuple(a.shape) != tuple(b.shape) or a.nbytes != b.nbytes:
        return False
    ka, kb = getattr(a, "content_key", None), getattr(b, "content_key", None)
    if ka is not None or kb is not None:
        return ka == kb
    ra, rb = a.raw().reshape(-1), b.raw().reshape(-1)
    n = ra.shape[0]
    for off in np.linspace(0, max(n - 4096, 0), num=min(33, max(n // 4096, 1)), dtype=np.int64):
        if not np.array_equal(ra[off:off + 4096], rb[off:off + 4096]):
            return False
    for off in range(0, n, chunk):
        if not np.array_equal(ra[off:off + chunk], rb[off:off + chunk]):
            return False
    return True


_FOLLOW = (
    (re.compile(r"^(blk\.\d+\.)post_attention_norm\.weight$"), r"\1attn_q.weight"),
    (re.compile(r"^(blk\.\d+\.)ffn_norm\.weight$"), r"\1attn_q_a.weight"),  # deepseek2
    (re.compile(r"^(blk\.\d+\.)exp_probs_b\.bias$"), r"\1ffn_gate_inp.weight"),
)


def _leader(name: str, head_name: str) -> str | None:
    """The tensor whose override a follower (a norm or router of a unit) takes when none names it."""
    if name == "output_norm.weight":
        return head_name
    for rx, rep in _FOLLOW:
        if rx.match(name):
            return rx.sub(rep, name)
    return None


def _group_side(plan: Plan, role: TensorRole, cfg: ModelConfig) -> str:
    g = plan.groups
    if role.group in ("token_embd", "output"):
        return getattr(g, role.group)
    if role.group == "mtp":
        if role.part == "routed_experts":
            if g.mtp.routed_experts is not None:
                return g.mtp.routed_experts
            n = g.routed_experts.n_cpu
            if n is not None and role.layer < n:  # llama.cpp --n-cpu-moe counts the nextn block too
                return "cpu"
        return g.mtp.side
    return getattr(g, role.group).side_for(role.layer)


def _check_ranges(plan: Plan, cfg: ModelConfig) -> None:
    from .schema import LAYER_GROUPS

    for gname in LAYER_GROUPS:
        for r in getattr(plan.groups, gname).ranges:
            if r.last >= cfg.n_layers:
                extra = (f"; the nextn block {cfg.n_layers} is placed by placement.mtp" if cfg.n_nextn else "")
                raise PlanError(f"{r.where}: layers {r.first}-{r.last} are outside the model "
                                f"(main layers 0-{cfg.n_layers - 1}{extra})")
            if gname == "dense_ffn" and r.first >= cfg.n_dense:
                plan_w = r.where
                raise PlanError(f"{plan_w}: layers {r.first}-{r.last} have no dense FFN "
                                f"(dense layers: {'0-' + str(cfg.n_dense - 1) if cfg.n_dense else 'none'})")
            if gname in ("shared_experts", "routed_experts") and r.last < cfg.n_dense:
                raise PlanError(f"{r.where}: layers {r.first}-{r.last} are dense and have no experts "
                                f"(MoE layers: {cfg.n_dense}-{cfg.n_layers - 1})")


def resolve(plan: Plan, gguf_file, cfg: ModelConfig) -> Placement:
    """Place every tensor of `gguf_file` (a GGUFFile or a synthetic table) on one side."""
    tensors = gguf_file.tensors
    model = str(getattr(gguf_file, "path", "<model>"))
    warnings: list[str] = []
    _check_ranges(plan, cfg)
    if plan.context is not None and plan.context > cfg.context_length:
        warnings.append(f"{plan.loc('context')}: context {plan.context} exceeds the model's trained "
                        f"context_length {cfg.context_length}")

    # MTP enablement and sharing of the nextn embedding / head with the main ones.
    spec_mtp = plan.speculative.mtp
    if spec_mtp and cfg.n_nextn == 0:
        raise PlanError(f"{plan.loc('speculative.mtp')}: MTP requested but {model} has no nextn (MTP) layer; "
                        f"use mtp: auto or false")
    mtp_enabled = cfg.n_nextn > 0 and spec_mtp is not False
    tied = "output.weight" not in tensors
    head_name = "token_embd.weight" if tied else "output.weight"
    skipped: dict[str, str] = {}
    shares_embed = shares_head = False
    mtp_embed = mtp_head = None
    for L in range(cfg.n_layers, cfg.n_blocks):
        e, h = f"blk.{L}.nextn.embed_tokens.weight", f"blk.{L}.nextn.shared_head_head.weight"
        se = e not in tensors or same_bytes(tensors[e], tensors["token_embd.weight"])
        sh = h not in tensors or same_bytes(tensors[h], tensors[head_name])
        if se and e in tensors:
            skipped[e] = "token_embd.weight"
        if sh and h in tensors:
            skipped[h] = head_name
        if L == cfg.n_layers:
            shares_embed, shares_head = se, sh
            mtp_embed = "token_embd.weight" if se else e
            mtp_head = head_name if sh else h

    # Overrides first (first match wins), then groups.
    side: dict[str, str] = {}
    roles: dict[str, TensorRole] = {}
    override_of: dict[str, str] = {}
    hits = [0] * len(plan.overrides)
    hits_skipped = [0] * len(plan.overrides)
    for name in tensors:
        role = classify(name, cfg)
        roles[name] = role
        chosen = None
        for i, ov in enumerate(plan.overrides):
            if ov.search(name):
                if name in skipped:
                    hits_skipped[i] += 1
                else:
                    hits[i] += 1
                    chosen = ov
                break
        if name in skipped:
            side[name] = "none"
        elif role.group == "unknown":
            side[name] = "none"
            warnings.append(f"{model}: tensor {name} is not part of the glm4moe model; it is not loaded")
        elif chosen is not None:
            side[name] = chosen.side
            override_of[name] = chosen.where
        else:
            side[name] = _group_side(plan, role, cfg)
    # Small tensors that no override named follow their unit's main tensor, so that llama.cpp-style
    # patterns (`attn_.*=CPU`, `output\.weight=CPU`, `ffn_gate_inp=CPU`) move whole units.
    if override_of:
        for name in side:
            if name in override_of or side[name] == "none":
                continue
            leader = _leader(name, head_name)
            if leader is not None and leader in override_of and side.get(leader, "none") != "none":
                side[name] = side[leader]
                override_of[name] = override_of[leader]
    for i, ov in enumerate(plan.overrides):
        if hits[i] == 0:
            why = (f"only duplicate tensors that are not loaded ({hits_skipped[i]})" if hits_skipped[i]
                   else "no tensor")
            warnings.append(f"{ov.where}: override '{ov.pattern}={ov.side}' matches {why} of {model}")

    # Op units must sit on one side.
    units: dict[str, dict[str, list[str]]] = {}
    for name, s in side.items():
        if s != "none":
            units.setdefault(roles[name].unit, {}).setdefault(s, []).append(name)
    unit_side: dict[str, str] = {}
    for unit, by_side in units.items():
        if len(by_side) > 1:
            wheres = sorted({override_of[n] for names in by_side.values() for n in names if n in override_of})
            cause = f" (placed by {'; '.join(wheres)})" if len(wheres) > 1 else ""
            parts = "; ".join(f"{s}: {', '.join(sorted(ns))}" for s, ns in sorted(by_side.items()))
            raise PlanError(
                f"{wheres[0] if wheres else plan.source}: op unit {unit} is split across sides "
                f"({parts}){cause}; a unit runs on one side, so one side's weights would be copied at every step: "
                f"place all its tensors together")
        unit_side[unit] = next(iter(by_side))

    def where_of(name: str, group_key: str) -> str:
        if name in override_of:
            return override_of[name]
        return plan.groups.where.get(group_key) or f"{plan.source}: placement.{group_key}"

    # The tied head: output_norm and the table it multiplies by on one side.
    if tied and "output_norm.weight" in side and side["output_norm.weight"] != side["token_embd.weight"]:
        raise PlanError(f"{where_of('output_norm.weight', 'output')}: output.weight is absent, so the head "
                        f"multiplies by token_embd.weight ({side['token_embd.weight']}) but the head (output) is on "
                        f"{side['output_norm.weight']}: the table would be copied at every step; put token_embd "
                        f"and output on the same side")

    # The MTP layer and the embedding / head it reads at every draft step.
    for L in range(cfg.n_layers, cfg.n_blocks):
        proj = f"blk.{L}.nextn.eh_proj.weight"
        if proj not in side:
            continue
        ps = side[proj]
        e_name = "token_embd.weight" if f"blk.{L}.nextn.embed_tokens.weight" in skipped or \
            f"blk.{L}.nextn.embed_tokens.weight" not in side else f"blk.{L}.nextn.embed_tokens.weight"
        h_name = head_name if f"blk.{L}.nextn.shared_head_head.weight" in skipped or \
            f"blk.{L}.nextn.shared_head_head.weight" not in side else f"blk.{L}.nextn.shared_head_head.weight"
        checks = [(e_name, "embedding"), (h_name, "head")]
        for t, what in checks:
            if side.get(t, ps) == ps:
                continue
            shared = " (shared with the main model)" if not t.startswith(f"blk.{L}.") else ""
            key = {"token_embd.weight": "token_embd", "output.weight": "output"}.get(t, "mtp")
            msg = (f"the MTP layer blk.{L} is on {ps} but the {what} it reads at every draft step, {t}{shared}, "
                   f"is on {side[t]}: every draft step would copy it between sides; the ik_llama.cpp MTP port "
                   f"lost its speed to exactly this (blk.46.nextn.embed_tokens copied between backends every "
                   f"step). Put placement.{key} on {ps} or placement.mtp on {side[t]}")
            if mtp_enabled:
                raise PlanError(f"{where_of(t, key)}: {msg}")
            warnings.append(f"{where_of(t, key)}: MTP is off, but if enabled: {msg}")

    rows = _rows(tensors, side, roles)
    return Placement(tensors=side, roles=roles, units=unit_side, rows=rows, warnings=warnings, model=model,
                     cfg=cfg, head_name=head_name, mtp_shares_embed=shares_embed, mtp_shares_head=shares_head,
                     mtp_embed_name=mtp_embed, mtp_head_name=mtp_head, mtp_enabled=mtp_enabled,
                     override_of=override_of)


_ORDER = {"token_embd": 0, "attention": 1, "dense_ffn": 2, "shared_experts": 3, "routed_experts": 4,
          "mtp": 5, "output": 6, "unknown": 7}
_MTP_PART_ORDER = {"embed": 0, "nextn": 1, "attention": 2, "router": 3, "shared_experts": 4, "routed_experts": 5,
                   "head": 6}


def _rows(tensors, side: dict[str, str], roles: dict[str, TensorRole]) -> list[Row]:
    """Rows per (group, part, side), layers merged into ranges where consecutive with the same types."""
    per: dict[tuple, dict] = {}
    for name, info in tensors.items():
        r = roles[name]
        label = f"mtp.{r.part}" if r.group == "mtp" else r.group
        if side[name] == "none" and r.group == "mtp":
            label += " (duplicate, not loaded)"
        key = (label, r.layer, side[name])
        d = per.setdefault(key, {"types": set(), "n": 0, "bytes": 0, "names": []})
        d["types"].add(info.ggml_type.name)
        d["n"] += 1
        d["bytes"] += int(info.nbytes)
        d["names"].append(name)

    def sort_key(k):
        label, layer, s = k
        g = label.split(".")[0].split(" ")[0]
        part = label.split(".")[1].split(" ")[0] if "." in label else ""
        return (_ORDER.get(g, 9), -1 if layer is None else layer, _MTP_PART_ORDER.get(part, 0), label, s)

    rows: list[Row] = []
    open_rows: dict[tuple, Row] = {}
    for k in sorted(per, key=sort_key):
        label, layer, s = k
        d = per[k]
        types = tuple(sorted(d["types"]))
        prev = open_rows.get((label, s))
        if prev is not None and layer is not None and prev.last == layer - 1:
            prev.last = layer
            prev.types = tuple(sorted(set(prev.types) | set(types)))
            prev.n_tensors += d["n"]
            prev.file_bytes += d["bytes"]
            prev.names.extend(d["names"])
            continue
        row = Row(label, layer, layer, s, types, d["n"], d["bytes"], list(d["names"]))
        rows.append(row)
        open_rows[(label, s)] = row
    order = {id(r): i for i, r in enumerate(rows)}
    rows.sort(key=lambda r: (_ORDER.get(r.group.split(".")[0].split(" ")[0], 9), order[id(r)]))
    return rows
