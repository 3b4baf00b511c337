"""Prompt caching and the step machine the server drives, on the demo model without a server:
a run that takes over a finished sequence's caches keeps the KV of the shared prefix (main and
MTP caches cut consistently) and gives exactly the tokens of a fresh run."""

from __future__ import annotations

import pytest

import runtime
from runtime.engine import _Run


@pytest.fixture(scope="module")
def eng():
    e = runtime.load(progress=False)
    e.prefill_chunk = 8  # several chunks per prompt: chunk boundaries move with the cached prefix
    return e


def run(eng, ids, reuse=None, steps=None, **kw):
    r = _Run(eng, ids, max_tokens=kw.pop("max_tokens", 16), adaptive=False, draft_max=3, reuse=reuse, **kw)
    r.keep_seq = True  # its caches may be taken over by the next run, as a server slot keeps them
    if steps is None:
        for _ in r:
            pass
    else:  # drive it as the server does, stopping after `steps` steps
        r.begin()
        for _ in range(steps):
            if r.done:
                break
            r.step()
        r.cancel()
    return r


@pytest.mark.parametrize("mtp", [True, False])
def test_next_turn_keeps_the_prefix_and_equals_a_fresh_run(eng, mtp):
    a = eng.tokenize("def fibonacci(n):\n    ")
    first = run(eng, a, mtp=mtp)
    assert first.cached_tokens == 0
    turn2 = first.seq.tokens + first.result.tokens[-1:] + eng.tokenize("\n\ndef main():\n")
    fresh = run(eng, turn2, mtp=mtp)
    hot = run(eng, turn2, reuse=first.seq, mtp=mtp)
    assert hot.result.tokens == fresh.result.tokens
    n_old = len(first.seq.tokens)  # all of them are a prefix of turn2: at most one is recomputed
    assert n_old - 1 <= hot.cached_tokens <= n_old
    assert hot.result.stats["cached_tokens"] == hot.cached_tokens
    if mtp:
        assert hot.result.stats["drafted"] > 0
    # a prompt that leaves the cached one early keeps only the shared part
    other = a[:5] + eng.tokenize(" while True:\n")
    cold = run(eng, other, mtp=mtp)
    cut = run(eng, other, reuse=hot.seq, mtp=mtp)
    assert cut.result.tokens == cold.result.tokens and 4 <= cut.cached_tokens <= 5


def test_reuse_across_mtp_settings_and_after_cancel(eng):
    ids = eng.tokenize("import os\nimport sys\n\n\ndef list_files(path):\n    ")
    want = run(eng, ids, mtp=True).result.tokens
    assert run(eng, ids, mtp=False).result.tokens == want
    # cancelled in the middle of the prefill: the cache holds fewer tokens than the prompt
    part = run(eng, ids, steps=1, mtp=True)
    n_part = part.seq.cache.length
    assert n_part < len(ids) and part.result.stats["finish_reason"] == "cancelled"
    again = run(eng, ids, reuse=part.seq, mtp=True)
    assert n_part - 1 <= again.cached_tokens <= n_part and again.result.tokens == want
    # no MTP cache to keep (the last run decoded without MTP): MTP restarts from an empty cache
    plain = run(eng, ids, mtp=False)
    back = run(eng, ids, reuse=plain.seq, mtp=True)
    assert back.cached_tokens == 0 and back.result.tokens == want
    # MTP -> no MTP keeps the main cache
    off = run(eng, ids, reuse=back.seq, mtp=False)
    assert off.cached_tokens > 0 and off.result.tokens == want


def test_step_machine_equals_iteration(eng):
    ids = eng.tokenize("class Stack:\n    def __init__(self):")
    for mtp in (True, False):
        ref = run(eng, ids, mtp=mtp)
        r = _Run(eng, ids, max_tokens=16, adaptive=False, draft_max=3, mtp=mtp, stop=["\n\n\n"])
        r.begin()
        pieces = []
        for _ in range(100):  # bounded: 16 tokens take at most 16 steps after the prefill's
            if r.done:
                break
            pieces.append(r.step())
        r.close()
        assert r.done and "".join(pieces) == r.result.text
        if "\n\n\n" not in ref.result.text:
            assert r.result.tokens == ref.result.tokens
