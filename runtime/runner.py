"""The model runner: the one place that turns the sequences' ops into model calls.

A decode step of each sequence is a generator of ops (runtime/decode.py). Each round the runner
takes one kind of op from every sequence that waits on that kind and serves them together:

- "fwd": one main-model forward over every sequence's rows (`GLM4Model.forward_batch`): each
  weight read once per step for all sequences, attention per sequence over its own cache;
- "mtp": one MTP-layer forward over every sequence's MTP rows (`mtp_forward_batch`);
- "logits" / "mtp_logits": one head call over the rows of all of them.

Rows keep their bits: on the CPU in float32 the fused C path computes every row on its own
(batch-invariant kernels), so a sequence's output in a batch equals its output alone. The torch
path on the CPU is not batch-invariant (a 2-row GEMM and a 1-row GEMV round differently), so
there each sequence's forward stays a call of its own; on a GPU the batch is one forward (bits
there are not promised equal to a lone sequence's, as between any two GPU kernels).

Prefill chunks of more than ROWWISE_MAX rows are forwards of their own (the torch path, as alone).
"""
from __future__ import annotations

import torch

from .linear import ROWWISE_MAX

KINDS = ("mtp", "mtp_logits", "fwd", "logits")  # the order a round serves them in


def one_forward(model, caches) -> bool:
    """Whether decode-shaped rows of these sequences may run as one forward: on a GPU, where the
    fused CPU path takes them all (float32 caches of one pool), or on the torch path of latent
    attention (GLM-4.7-Flash), whose every op keeps a row's bits in a forward of up to
    ROWWISE_MAX rows (kernel matrices, row-wise float matmuls, norms and transcendentals,
    attention row by row; tests/test_flash.py checks it), in forwards of at most that many rows."""
    if len(caches) < 2:
        return False
    if model.bus.devices["gpu"].type == "cuda":
        return True
    pool = caches[0].pool
    if not all(c.pool is pool for c in caches):
        return False
    return (model.fused is not None and pool.fusable) or rowwise_torch_path(model)


def rowwise_torch_path(model) -> bool:
    """The CPU torch path of a latent-attention model (no fused C blocks for it)."""
    return model.cfg.mla and model.fused is None and model.bus.devices["gpu"].type == "cpu"


def _row_chunks(group: list, rows_at: int) -> list[list]:
    """Consecutive ops whose rows add up to at most ROWWISE_MAX (each op has at most that many)."""
    chunks, cur, n = [], [], 0
    for op in group:
        r = op[rows_at].shape[0]
        if cur and n + r > ROWWISE_MAX:
            chunks.append(cur)
            cur, n = [], 0
        cur.append(op)
        n += r
    if cur:
        chunks.append(cur)
    return chunks


def execute(model, ops: list) -> list:
    """Results of ops of one kind, in order."""
    kind = ops[0][0]
    if kind in ("fwd", "mtp"):
        if kind == "fwd":
            alone = lambda op: model.forward(op[1], op[2], op[3], beside_last_experts=op[4])  # noqa: E731
            rows_at, cache_at = 1, 2
        else:
            alone = lambda op: model.mtp_forward(op[1], op[2], op[3], op[4], h_side=op[5])  # noqa: E731
            rows_at, cache_at = 2, 3
        if len(ops) == 1:
            return [alone(ops[0])]
        # prefill chunks: a forward each, as alone; decode-shaped rows together where that keeps bits
        small = [i for i, op in enumerate(ops) if op[rows_at].shape[0] <= ROWWISE_MAX]
        out = [None if i in small else alone(op) for i, op in enumerate(ops)]
        group = [ops[i] for i in small]
        if one_forward(model, [op[cache_at] for op in group]):
            chunks = _row_chunks(group, rows_at) if rowwise_torch_path(model) else [group]
            res = []
            for chunk in chunks:
                if kind == "fwd":
                    res += model.forward_batch([op[1:4] for op in chunk])
                    for op in chunk:  # draft-ahead hooks: after the batch (nothing to overlap with)
                        if op[4] is not None:
                            op[4]()
                else:
                    res += model.mtp_forward_batch([op[1:] for op in chunk])
        else:
            res = [alone(op) for op in group]
        for i, r in zip(small, res):
            out[i] = r
        return out
    if kind in ("logits", "mtp_logits"):
        head = model.logits if kind == "logits" else model.mtp_logits
        if len(ops) == 1:
            return [head(ops[0][1])]
        rows = [op[1].shape[0] for op in ops]
        h = torch.cat([op[1] for op in ops])
        side = (model.head if kind == "logits" else model.nextn.head).side
        if model.bus.devices[side].type == "cpu" and h.shape[0] > ROWWISE_MAX:
            # on the CPU a head keeps each row's bits in calls of up to ROWWISE_MAX rows (float
            # weights: `linear`'s one-row products; F16 ones: the kernels, not the GEMM that
            # KernelLinear uses from FLOAT_GEMM_MIN_ROWS rows), not in one call over all of them
            out = torch.cat([head(h[r:r + ROWWISE_MAX]) for r in range(0, h.shape[0], ROWWISE_MAX)])
        else:
            out = head(h)
        return list(out.split(rows))
    raise ValueError(f"unknown op {kind!r}")


class BatchStats:
    """What the batched steps did: rows, distinct experts and weight bytes per step."""

    def __init__(self):
        self.steps = 0
        self.rows = 0
        self.sequences = 0
        self.distinct_experts = 0
        self.seconds = 0.0

    def add(self, n_seqs: int, rows: int, experts: int, seconds: float) -> None:
        self.steps += 1
        self.sequences += n_seqs
        self.rows += rows
        self.distinct_experts += experts
        self.seconds += seconds

    def figures(self) -> dict:
        n = max(self.steps, 1)
        return {"batched_forwards": self.steps, "rows_per_forward": self.rows / n,
                "sequences_per_forward": self.sequences / n,
                "distinct_experts_per_forward": self.distinct_experts / n}

