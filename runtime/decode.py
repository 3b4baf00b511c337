"""Decoding one sequence: prefill, then plain steps or MTP speculative steps.

`Sequence` owns the two KV caches (main model, MTP layer) and the state between steps. Each
`step()` returns the tokens it emits (one for a plain step; the accepted drafts plus the main
model's own next token for an MTP step). Stop conditions live in the engine; this file is the
speculative algorithm (MTP drafts, one verify batch, exact rollback):

- WARMUP: after each prompt chunk, the MTP layer runs the same chunk with rows (h_p, x_{p+1}) at
  position p+1 (MTP cache slot p), so its cache covers the prompt.
- DRAFT: the MTP rows still owed (hidden states of tokens the main model has verified but the MTP
  cache does not hold yet) run as one batch; its last row is the first draft. Further drafts chain
  through the output after shared_head_norm, greedy, stopping when the draft's probability is
  below p_min (the first draft is always kept).
- VERIFY: [pending token, d1..dk] through the main model in one batch.
- ACCEPT: greedy: drafts equal to the target argmax; sampling: accept d with probability p(d),
  else sample the replacement from p with d removed and renormalised.
- UPDATE / ROLLBACK: the main cache keeps the accepted rows; the MTP cache drops every speculative
  row; the accepted rows' true hidden states become the MTP rows owed for the next step.
- DRAFT-AHEAD (optional): while the verification's last routed experts run on the CPU, the MTP
  chain goes on past the last draft, assuming every draft is accepted: one row guesses the main
  model's own next token, the next ones are drafts for the step after. If every draft is accepted
  and the main model's token equals the guess, the next step verifies those drafts without a draft
  phase (its owed MTP rows wait for the step after); otherwise they are dropped. Verification
  decides every emitted token, so the output is the same either way.
"""

from __future__ import annotations

import time
from time import perf_counter
from dataclasses import dataclass, field

import torch

from .kvpool import KVPool
from .model import GLM4Model
from .sampling import SamplingParams, argmax_token
from .draft_policy import Oracle, StepSample

# A sequence's steps are generators: they yield the model calls they need as ops and receive each
# call's result, so a runner can serve the same op of many sequences in one batched call
# (runtime/runner.py), and `run_alone` serves one sequence's ops one at a time. The ops:
#   ("fwd", tokens, cache, start, hook)          -> h after output_norm   (GLM4Model.forward)
#   ("mtp", h_prev, tokens, cache, start, side)  -> z after shared_head_norm (mtp_forward)
#   ("logits", h)                                -> main-head logits
#   ("mtp_logits", z)                            -> MTP-head logits
# and STEP_END, yielded by prefill between chunks: a step of the generation ends there.
STEP_END = ("end",)


def run_alone(model: GLM4Model, gen):
    """Drive a step generator to its end, each op as its own model call; returns its value.
    STEP_END markers are passed over."""
    from .runner import execute

    try:
        op = next(gen)
        while True:
            op = gen.send(None if op is STEP_END else execute(model, [op])[0])
    except StopIteration as e:
        return e.value

# Plain steps with MTP on owe MTP rows (the MTP cache must cover every position to draft again).
# They are paid in one batch with the next draft, or when this many are owed: one batched pass
# reads the MTP layer's experts once for all rows, which matters when they sit on the CPU.
MAX_OWED_MTP_ROWS = 256


@dataclass
class SpecStats:
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_at: list = field(default_factory=list)  # per draft position
    accepted_at: list = field(default_factory=list)
    draft_s: float = 0.0
    verify_s: float = 0.0
    distinct_experts: int = 0  # summed over verify steps (routed layers of the main model)
    ahead_made: int = 0  # steps that drafted ahead beside their verification
    ahead_used: int = 0  # steps that verified drafts made ahead (no draft phase of their own)

    def add_position(self, i: int, accepted: bool):
        while len(self.drafted_at) <= i:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        self.drafted_at[i] += 1
        self.accepted_at[i] += int(accepted)


class Sequence:
    def __init__(self, model: GLM4Model, context: int, kv_dtype: torch.dtype, use_mtp: bool,
                 params: SamplingParams, prefill_chunk: int = 512, draft_ahead: bool = False,
                 reuse: "Sequence | None" = None, pools: tuple[KVPool, KVPool | None] | None = None,
                 prefix=None):
        """`pools`: the engine's KV pools (main, MTP) the caches take pages from (None: caches
        with pools of their own). `reuse`: a finished sequence (same model and context) whose
        caches this one takes over; `prefill` then keeps the KV of the longest prefix that the new
        prompt shares with `reuse.tokens` (prompt caching)."""
        self.model, self.params, self.chunk = model, params, prefill_chunk
        self.use_mtp = use_mtp and model.nextn is not None
        self.gen: torch.Generator | None = None  # made on first use, on the logits' device (_rng)
        self.tokens: list[int] = []  # every token of the sequence (prompt + emitted)
        self.owed_h: torch.Tensor | None = None  # hidden states of MTP rows not yet in the MTP cache
        self._reused = None
        self.prefix = prefix  # the engine's PrefixCache (shared prompt prefixes), or None
        if pools is not None:
            from .kvpool import SeqKV

            new_cache = lambda: SeqKV(pools[0], context)  # noqa: E731
            new_mtp = lambda: SeqKV(pools[1], context)  # noqa: E731
        else:
            new_cache = lambda: model.new_cache(context, kv_dtype)  # noqa: E731
            new_mtp = lambda: model.new_mtp_cache(context, kv_dtype)  # noqa: E731
        if reuse is not None and reuse.cache.max_len == context:
            self.cache = reuse.cache
            # the MTP cache is only worth keeping when it covers the same tokens as the main cache
            keep_mtp = self.use_mtp and reuse.mtp_cache is not None
            if reuse.mtp_cache is not None and not keep_mtp:
                reuse.mtp_cache.release()
            self.mtp_cache = reuse.mtp_cache if keep_mtp else (new_mtp() if self.use_mtp else None)
            # what the old caches hold: its tokens up to the main cache's length (a run ended
            # between prefill chunks has more tokens than KV), its MTP slots, its owed rows
            self._reused = (reuse.tokens[:reuse.cache.length], reuse.owed_h if keep_mtp else None,
                            reuse.mtp_cache.length if keep_mtp else 0, keep_mtp)
            self.cache.reset()
            if self.mtp_cache is not None:
                self.mtp_cache.reset()
        else:
            if reuse is not None:  # not usable here (another context): its pages go back
                reuse.release()
            self.cache = new_cache()
            self.mtp_cache = new_mtp() if self.use_mtp else None
        self.last_logits: torch.Tensor | None = None
        self.stats = SpecStats()
        self.oracle: Oracle | None = None
        self.last_sample: StepSample | None = None  # cost of the last step, for the draft policy
        self._plain_owed = 0  # owed MTP rows added by plain steps since the last draft
        self._catchup = 0  # of those, paid by the current step's draft
        self.draft_ahead = draft_ahead
        self.ahead: list[tuple[int, float]] | None = None  # drafts made ahead, valid if pending == ahead_for
        self.ahead_for: int | None = None
        self._chain = None  # (z, last draft not yet fed or None): the MTP chain after draft()
        self._made = None  # (guess, drafts) from the last draft-ahead

    def _begin(self):
        ctx = self.model.bus.ctx
        return perf_counter(), ctx.cpu_expert_s, ctx.cpu_experts_read

    def _end(self, begin, k: int) -> None:
        t0, c0, e0 = begin
        ctx = self.model.bus.ctx
        cpu = ctx.cpu_expert_s - c0
        self.last_sample = StepSample(k, perf_counter() - t0 - cpu, cpu, ctx.cpu_experts_read - e0,
                                      self._catchup if k else 0)
        self._catchup = 0

    @property
    def context(self) -> int:
        return self.cache.max_len

    def release(self, cache_prefix: bool = False) -> None:
        """Give the caches' pages back to the pools (the sequence is done and not kept); with
        `cache_prefix`, the prefix cache keeps its full pages for later prompts first."""
        if cache_prefix and self.prefix is not None:
            self.prefix.insert(self.tokens, self.cache, self.mtp_cache)
        self.cache.release()
        if self.mtp_cache is not None:
            self.mtp_cache.release()

    def pages_needed(self, n: int) -> tuple[int, int]:
        """Free pages of the main and the MTP pool that holding slots 0..n-1 in both caches
        takes: the runner reserves a step's slots before it starts, so no op of the step can find
        a pool full."""
        n = min(n, self.cache.max_len)
        return (self.cache.pages_needed(n), 0 if self.mtp_cache is None else self.mtp_cache.pages_needed(n))

    def reserve(self, n: int) -> None:
        n = min(n, self.cache.max_len)
        self.cache.reserve(n)
        if self.mtp_cache is not None:
            self.mtp_cache.reserve(n)

    # ---- prefill -----------------------------------------------------------------------------

    def keep_prefix(self, ids: list[int]) -> int:
        """With a reused sequence's caches: keep the KV of the longest common prefix of its tokens
        and `ids`, less one token (the prompt's last token must run to give the next token's
        logits); returns the number kept. The MTP cache is cut to match: slot p holds the row
        (h_p, x_{p+1}), valid while x_{p+1} is in the prefix; the old sequence's owed rows (hidden
        states of its last positions, not yet in its MTP cache) are kept as far as the prefix."""
        if self._reused is None:
            return self._shared_prefix(ids)
        old, owed, m, keep_mtp = self._reused
        self._reused = None
        n = 0
        for a, b in zip(old, ids[:len(ids) - 1]):
            if a != b:
                break
            n += 1
        if self.use_mtp:
            if not keep_mtp:
                return 0  # no MTP rows for the prefix: prefill from scratch
            n_owed = 0 if owed is None else owed.shape[0]
            if m + n_owed != len(old):  # pragma: no cover - the invariant every step keeps
                return 0
            if m >= n:
                # slot n-1 pairs h_{n-1} with the old sequence's next token, not necessarily the
                # new one, and h_{n-1} itself is gone: keep one token less, whose slot is valid
                n -= 1
                self.mtp_cache.length = n
            else:
                self.mtp_cache.length = m  # slots 0..m-1; h_m..h_{n-1} stay owed
                self.owed_h = owed[:n - m]
        if n <= 0:
            if self.mtp_cache is not None:
                self.mtp_cache.length = 0
            self.owed_h = None
            return 0
        self.cache.length = n
        self.tokens = list(ids[:n])
        return n

    def _shared_prefix(self, ids: list[int]) -> int:
        """Without a reused sequence: share the pages of the longest prefix of `ids` that the
        engine's prefix cache holds (runtime/kvpool.py PrefixCache), in both caches. MTP slot n-1
        then holds (h_{n-1}, x_n) with x_n = ids[n], so nothing is owed."""
        pc = self.prefix
        if pc is None or self.cache.pages or self.cache.pool is not pc.main:
            return 0
        n, main, mtp = pc.lookup(ids, need_mtp=self.use_mtp)
        if n <= 0:
            return 0
        self.cache.adopt(main, n)
        if self.use_mtp:
            self.mtp_cache.adopt(mtp, n)
        self.tokens = list(ids[:n])
        return n

    def prefill(self, ids: list[int]) -> int:
        """Run the prompt in chunks (with MTP WARMUP per chunk); returns the first new token."""
        return run_alone(self.model, self.prefill_ops(ids))

    def prefill_ops(self, ids: list[int]):
        """`prefill` as ops, with STEP_END after each chunk but the last; returns the first new
        token. Starts after the prefix that `keep_prefix` keeps (decided before the first op, so
        `cache.length` tells at once how much of the prompt was cached)."""
        start = self.keep_prefix(ids)
        self.tokens = list(ids)
        return self._prefill_from(ids, start)

    def _prefill_from(self, ids: list[int], start: int):
        n = len(ids)
        t = torch.tensor(ids, dtype=torch.long)
        h = None
        for s in range(start, n, self.chunk):
            h = yield ("fwd", t[s:s + self.chunk], self.cache, s, None)
            if self.use_mtp:
                # rows p = s .. s+len-1 pair h_p with x_{p+1}; the chunk's last row needs the next
                # chunk's first token (or, at the end, the first generated token): owe it.
                rows = h if self.owed_h is None else torch.cat([self.owed_h, h])
                first = s - (0 if self.owed_h is None else self.owed_h.shape[0])
                k = rows.shape[0] - 1
                if k > 0:
                    yield ("mtp", rows[:k], t[first + 1:first + 1 + k], self.mtp_cache, first, None)
                self.owed_h = rows[k:]
            if s + self.chunk < n:
                yield STEP_END
        self.last_logits = (yield ("logits", h[-1:]))[0]
        return self._sample(self.last_logits, self._history())

    def _rng(self, device: torch.device) -> torch.Generator:
        if self.gen is None or self.gen.device != device:
            self.gen = self.params.generator(device)
        return self.gen

    def _sample(self, logits: torch.Tensor, history=()) -> int:
        return self.params.sample(logits, None if self.params.greedy else self._rng(logits.device), history)

    def _history(self, *extra: int) -> list[int] | tuple:
        """The tokens before the next row (the sequence, then `extra`), as far back as the
        repetition penalty looks; () without a penalty, so the plain path builds no list."""
        if not self.params.penalised:
            return ()
        n = self.params.repeat_last_n
        return (self.tokens[-n:] + list(extra))[-n:]

    # ---- decode steps -------------------------------------------------------------------------

    def plain_step(self, token: int) -> int:
        """Feed the pending token; return the next one."""
        return run_alone(self.model, self.plain_ops(token))

    def plain_ops(self, token: int):
        begin = self._begin()
        start = self.cache.length
        h = yield ("fwd", torch.tensor([token], dtype=torch.long), self.cache, start, None)
        self.tokens.append(token)
        self.last_logits = (yield ("logits", h))[0]
        self._end(begin, 0)
        self.ahead = None
        if self.use_mtp:  # owe the MTP row, so drafting can resume at any step
            self.owed_h = h if self.owed_h is None else torch.cat([self.owed_h, h])
            self._plain_owed += 1
            if self.owed_h.shape[0] > MAX_OWED_MTP_ROWS:
                yield from self._pay_owed(keep=1)
                self._plain_owed = 1
        return self._sample(self.last_logits, self._history())

    def stop_mtp(self) -> None:
        """Drop the MTP layer for the rest of this sequence (the draft policy found it does not
        pay): no more owed rows, no MTP cache (its pages go back to the pool)."""
        self.use_mtp = False
        self.owed_h = None
        self._plain_owed = 0
        if self.mtp_cache is not None:
            self.mtp_cache.release()
        self.mtp_cache = None
        self.ahead = None

    def _pay_owed(self, keep: int):
        """UPDATE the MTP cache with all owed rows but the last `keep` (whose next token is not
        known yet, or is the pending one). Ops."""
        n = self.owed_h.shape[0] - keep
        if n <= 0:
            return
        first = len(self.tokens) - self.owed_h.shape[0]
        nxt = torch.tensor(self.tokens[first + 1:first + 1 + n], dtype=torch.long)
        yield ("mtp", self.owed_h[:n], nxt, self.mtp_cache, first, None)
        self.owed_h = self.owed_h[n:]

    def draft(self, token: int, k: int, p_min: float) -> list[tuple[int, float]]:
        return run_alone(self.model, self.draft_ops(token, k, p_min))

    def draft_ops(self, token: int, k: int, p_min: float):
        """DRAFT: pay the owed MTP rows (the last one pairs with the pending token) and chain up
        to k greedy drafts. Returns [(token, prob)] (prob: NaN where p_min does not need it);
        the MTP cache ends past the drafted rows."""
        m = self.model
        mc = self.mtp_cache
        n_owed = self.owed_h.shape[0]
        first = len(self.tokens) - n_owed  # slot of the first owed row
        nxt = torch.tensor(self.tokens[first + 1:] + [token], dtype=torch.long)
        z = (yield ("mtp", self.owed_h, nxt, mc, first, None))[-1:]
        self.owed_h = None
        self._catchup, self._plain_owed = self._plain_owed, 0
        drafts = []
        pos = len(self.tokens) + 1  # sequence position of the first draft
        while True:
            d, prob = yield from self._greedy_draft(z, need_prob=bool(drafts) and p_min > 0,
                                                    history=self._history(token, *(x for x, _ in drafts)))
            if drafts and prob < p_min:
                break
            if self.oracle is not None:
                d = self.oracle.replace(pos + len(drafts), d)
            drafts.append((d, prob))
            if len(drafts) >= k:
                self._chain = (z, d)
                break
            z = yield ("mtp", z, torch.tensor([d]), mc, mc.length, m.nextn.side)
        if len(drafts) < k:
            self._chain = (z, None)  # stopped by p_min: z already holds the last draft's row
        return drafts

    def _greedy_draft(self, z: torch.Tensor, need_prob: bool, history=()):
        """The MTP head's argmax for the row z, and its probability when p_min needs it (NaN
        otherwise: the softmax over the vocabulary and its read-back cost a call or two per draft,
        and the first draft, or any with p_min 0, is kept whatever its probability). `history`:
        the tokens before the drafted one, for the repetition penalty (the target's rows get it
        too, so a draft that repeats is one the target would not pick). Ops; returns (d, prob)."""
        logits = self.params.penalise((yield ("mtp_logits", z))[0], history)
        d = argmax_token(logits)
        return d, float(torch.softmax(logits, -1)[d]) if need_prob else float("nan")

    def _draft_ahead(self, k: int, p_min: float, pos: int) -> None:
        """DRAFT-AHEAD: continue the MTP chain past the last draft: a guess of the main model's
        token at sequence position `pos`, then up to k drafts after it. Runs inside the
        verification's forward (its hook), so its model calls are direct."""
        run_alone(self.model, self._draft_ahead_ops(k, p_min, pos))

    def _draft_ahead_ops(self, k: int, p_min: float, pos: int):
        m, mc = self.model, self.mtp_cache
        side = m.nextn.side
        z, feed = self._chain
        if mc.length + k + 1 > mc.max_len:  # near the end of the context: no room to draft ahead
            return
        if feed is not None:
            z = yield ("mtp", z, torch.tensor([feed]), mc, mc.length, side)
        guess, ahead = None, []
        while len(ahead) < k:
            d, prob = yield from self._greedy_draft(z, need_prob=guess is not None and bool(ahead) and p_min > 0)
            if self.oracle is not None:
                d = self.oracle.replace(pos + len(ahead) + (guess is not None), d)
            if guess is None:
                guess = d
            else:
                if ahead and prob < p_min:
                    break
                ahead.append((d, prob))
                if len(ahead) >= k:
                    break
            z = yield ("mtp", z, torch.tensor([d]), mc, mc.length, side)
        self._made = (guess, ahead)
        self.stats.ahead_made += 1

    def spec_step(self, token: int, k: int, p_min: float) -> list[int]:
        """One speculative step from pending `token`: returns the emitted tokens (accepted drafts
        and the main model's own next token); the last one is the new pending token."""
        return run_alone(self.model, self.spec_ops(token, k, p_min))

    def spec_ops(self, token: int, k: int, p_min: float):
        m, st = self.model, self.stats
        begin = self._begin()
        start = self.cache.length
        t0 = time.perf_counter()
        use_ahead = bool(self.ahead) and self.ahead_for == token
        if use_ahead:  # drafted during the last verification: no draft phase, the owed rows wait
            drafts = self.ahead[:k]
            mtp_start = self.mtp_cache.length
            st.ahead_used += 1
        else:
            mtp_start = start  # MTP slots >= this are speculative after drafting
            drafts = yield from self.draft_ops(token, k, p_min)
            m.timeline.add("phase", "draft", t0, time.perf_counter(), {"k": k})
        self.ahead, self._made = None, None
        hook = None
        if self.draft_ahead and not use_ahead and drafts:
            pos = len(self.tokens) + 1 + len(drafts)  # the main model's own token after the drafts

            def hook():
                with m.timeline.span("phase", "draft ahead", k=k):
                    self._draft_ahead(k, p_min, pos)
        t1 = time.perf_counter()
        batch = torch.tensor([token] + [d for d, _ in drafts], dtype=torch.long)
        e0 = m.bus.ctx.cpu_experts_read
        h = yield ("fwd", batch, self.cache, start, hook)
        logits = yield ("logits", h)
        st.distinct_experts += m.bus.ctx.cpu_experts_read - e0
        t2 = time.perf_counter()
        st.draft_s += t1 - t0
        st.verify_s += t2 - t1
        st.steps += 1
        out = self._accept(token, drafts, logits)
        a = len(out) - 1  # accepted drafts
        st.drafted += len(drafts)
        st.accepted += a
        for i in range(len(drafts)):  # share of drafts at position i that were accepted
            st.add_position(i, i < a)
        # ROLLBACK: main keeps [token, d1..da]; MTP drops every speculative row.
        self.cache.truncate(start + a + 1)
        self.mtp_cache.truncate(mtp_start)
        self.tokens.append(token)
        self.tokens.extend(out[:-1])
        # UPDATE is owed: rows (h_p, x_{p+1}) for the accepted positions, paid by the next draft
        # (after rows still owed from before when this step used drafts made ahead).
        self.owed_h = h[:a + 1] if self.owed_h is None else torch.cat([self.owed_h, h[:a + 1]])
        if self._made is not None and a == len(drafts) and out[-1] == self._made[0] and self._made[1]:
            self.ahead, self.ahead_for = self._made[1], out[-1]
        self._made = None
        self.last_logits = logits[a]
        self._end(begin, len(drafts))
        self.last_drafted, self.last_accepted = len(drafts), a
        return out

    def _accept(self, token: int, drafts: list[tuple[int, float]], logits: torch.Tensor) -> list[int]:
        """ACCEPT, row by row: row i follows the pending `token` and drafts d1..di, and is
        processed with that history, as plain decoding would process it."""
        params = self.params
        out = []
        for i, (d, _) in enumerate(drafts):
            hist = self._history(token, *out)  # out == d1..di: all accepted so far
            if params.greedy:
                t = argmax_token(params.penalise(logits[i], hist))
                if t != d:
                    out.append(t)
                    return out
                out.append(d)
                continue
            p = params.probs(logits[i], hist)
            g = self._rng(p.device)
            if float(torch.rand((), generator=g, device=p.device)) < float(p[d]):
                out.append(d)
                continue
            q = p.clone()
            q[d] = 0
            out.append(int(torch.multinomial(q / q.sum(), 1, generator=g)))
            return out
        out.append(self._sample(logits[len(drafts)], self._history(token, *out)))
        return out
