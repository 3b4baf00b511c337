"""One preallocated KV pool shared by every sequence, in pages of a fixed number of positions.

The engine allocates two pools once, at load, from its context budget: one for the main model
(K/V per layer) and one for the MTP layer. A sequence holds a `SeqKV` per pool: the list of pages
it owns, in order, and how many of its slots are valid. Logical slot i of a sequence lives at
physical slot pages[i // P] * P + i % P of every layer's K/V tensor.

Why pages and not one fixed region per sequence: a region per sequence caps every sequence at
budget / sequences whether or not the others need their share, and a batch of short chats next
to one long document is the common case of a server. With pages, 8 sequences of context C/8 take
what one sequence of context C takes (the pool), and a long one may use what the short ones leave.
P = 16 positions (vLLM's default block size): a rejected draft gives back at most a page, and the
last page of a sequence wastes at most 15 positions.

Pages have reference counts so that a prefix can be shared (a finished sequence's pages taken over
by the next turn of the same chat keep their KV: `Sequence.keep_prefix`). Truncation lowers the
valid length and returns the pages past it (speculative rollback, a cancelled or finished sequence).

Readers: the torch attention (runtime/model.py) reads a sequence's K/V through `read`, a view when
its pages are consecutive in the pool (a sequence that grew alone, the common case) and a gather
otherwise; the fused C path (runtime/fused.py) reads `slot_map`, the physical slot of each logical
slot, per row.
"""
from __future__ import annotations

import numpy as np
import torch

PAGE_SIZE = 16


class PoolFull(Exception):
    """No free page is left in a KV pool (the scheduler preempts or waits)."""


class KVPool:
    """K/V tensors [n_pages * page_size, n_kv, head_dim] per layer, each on its layer's device.
    `v_dim` 0 (latent attention, whose values are the keys' first dims): no V memory; V reads are
    [.., 0] and writes take None."""

    def __init__(self, devices: list, n_slots: int, n_kv: int, head_dim: int, dtype,
                 page_size: int = PAGE_SIZE, v_dim: int | None = None):
        if n_slots < 1 or page_size < 1:
            raise ValueError(f"a KV pool needs at least one slot and page (got {n_slots}, {page_size})")
        self.page_size = page_size
        self.n_pages = -(-n_slots // page_size)
        self.n_slots = self.n_pages * page_size
        self.k = [torch.zeros(self.n_slots, n_kv, head_dim, dtype=dtype, device=d) for d in devices]
        v_dim = head_dim if v_dim is None else v_dim
        self.v = [torch.zeros(self.n_slots, n_kv, v_dim, dtype=dtype, device=d) for d in devices]
        self.n_layers = len(devices)
        self.dtype = dtype
        # the fused CPU path reads float32 or float16 pools in CPU memory; it keeps its pointer view here
        self.fusable = dtype in (torch.float32, torch.float16) and all(torch.device(d).type == "cpu" for d in devices)
        self.fused_view = None
        self.refs = [0] * self.n_pages
        # free pages, lowest last: `alloc` pops the lowest, so a sequence growing alone gets
        # consecutive pages and its K/V reads are views, not gathers
        self._free = list(range(self.n_pages - 1, -1, -1))

        # the prefix cache's pages: given back when the pool runs short (`PrefixCache.evict`)
        self.evictor = None

    @property
    def free_pages(self) -> int:
        """Pages free now, plus those only the prefix cache holds (freed on demand)."""
        return len(self._free) + (self.evictor.evictable(self) if self.evictor is not None else 0)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def pages_for(self, n_slots: int) -> int:
        return -(-n_slots // self.page_size)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free) and self.evictor is not None:
            self.evictor.evict(self, n - len(self._free))
        if n > len(self._free):
            raise PoolFull(f"KV pool: {n} pages asked, {len(self._free)} of {self.n_pages} free")
        out = [self._free.pop() for _ in range(n)]
        for p in out:
            self.refs[p] = 1
        return out

    def share(self, pages: list[int]) -> None:
        for p in pages:
            if self.refs[p] < 1:
                raise ValueError(f"KV pool: page {p} is not held")
            self.refs[p] += 1

    def release(self, pages: list[int]) -> None:
        back = []
        for p in pages:
            if self.refs[p] < 1:
                raise ValueError(f"KV pool: page {p} released twice")
            self.refs[p] -= 1
            if self.refs[p] == 0:
                back.append(p)
        if back:
            self._free.extend(back)
            self._free.sort(reverse=True)


class SeqKV:
    """One sequence's slots in a pool: `length` valid slots, `capacity` slots held (whole pages),
    at most `max_len` (the sequence's context)."""

    def __init__(self, pool: KVPool, max_len: int):
        self.pool = pool
        self.max_len = max_len
        self.length = 0
        self.pages: list[int] = []
        # physical slot of each logical slot (-1: not held), read by the fused C path per row
        self.slot_map = np.full(max_len, -1, dtype=np.int32)
        self._index: dict = {}  # device -> LongTensor of physical slots (for gathers), while pages stay

    # ---- the old KVCache surface: length, max_len, truncate, reset, k/v ----------------------

    @property
    def fusable(self) -> bool:
        return self.pool.fusable

    @property
    def capacity(self) -> int:
        return min(len(self.pages) * self.pool.page_size, self.max_len)

    def reserve(self, n: int) -> None:
        """Hold pages for slots 0..n-1 (raises PoolFull when the pool has too few free pages)."""
        if n > self.max_len:
            raise ValueError(f"positions 0..{n - 1} exceed the context of {self.max_len}")
        need = self.pool.pages_for(n) - len(self.pages)
        if need <= 0:
            return
        new = self.pool.alloc(need)
        P = self.pool.page_size
        for i, p in enumerate(new, start=len(self.pages)):
            lo, hi = i * P, min((i + 1) * P, self.max_len)
            self.slot_map[lo:hi] = np.arange(p * P, p * P + hi - lo, dtype=np.int32)
        self.pages.extend(new)
        self._index.clear()

    def adopt(self, pages: list[int], n: int) -> None:
        """Take shared pages holding slots 0..n-1 (a cached prefix) as this empty cache's first."""
        if self.pages or n > len(pages) * self.pool.page_size or n > self.max_len:
            raise ValueError("adopt: the cache must be empty and the pages must hold the slots")
        self.pool.share(pages)
        P = self.pool.page_size
        for i, p in enumerate(pages):
            lo, hi = i * P, min((i + 1) * P, self.max_len)
            self.slot_map[lo:hi] = np.arange(p * P, p * P + hi - lo, dtype=np.int32)
        self.pages = list(pages)
        self.length = n
        self._index.clear()

    def pages_needed(self, n: int) -> int:
        """Free pages `reserve(n)` would take."""
        return max(0, self.pool.pages_for(min(n, self.max_len)) - len(self.pages))

    def truncate(self, n: int) -> None:
        """Keep slots 0..n-1; pages past them go back to the pool (rolled-back drafts)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {n}")
        self.length = n
        self._shrink(n)

    def reset(self) -> None:
        self.length = 0

    def release(self) -> None:
        """Give every page back (the sequence finished or was cancelled)."""
        self.length = 0
        self._shrink(0)

    def _shrink(self, n: int) -> None:
        keep = self.pool.pages_for(n)
        if keep < len(self.pages):
            drop = self.pages[keep:]
            del self.pages[keep:]
            self.slot_map[keep * self.pool.page_size:] = -1
            self.pool.release(drop)
            self._index.clear()

    @property
    def nbytes(self) -> int:
        per_slot = self.pool.nbytes // self.pool.n_slots
        return per_slot * len(self.pages) * self.pool.page_size

    @property
    def k(self) -> list[torch.Tensor]:
        """Per layer, K of slots 0..length-1 in logical order (tests and tools; copies when the
        pages are not consecutive)."""
        return [self.read(layer, self.length)[0] for layer in range(self.pool.n_layers)]

    @property
    def v(self) -> list[torch.Tensor]:
        return [self.read(layer, self.length)[1] for layer in range(self.pool.n_layers)]

    # ---- reads and writes for the torch attention --------------------------------------------

    def _base(self, end: int) -> int | None:
        """The physical slot of logical slot 0 when slots 0..end-1 are consecutive in the pool."""
        if end <= 0:
            return 0
        P = self.pool.page_size
        n = self.pool.pages_for(end)
        p0 = self.pages[0]
        for i in range(1, n):
            if self.pages[i] != p0 + i:
                return None
        return p0 * P

    def _slots(self, device: torch.device, lo: int, hi: int) -> torch.Tensor:
        idx = self._index.get(device)
        if idx is None:
            idx = self._index[device] = torch.from_numpy(self.slot_map[:self.capacity].astype(np.int64)).to(device)
        return idx[lo:hi]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """K/V rows for logical slots start..start+T-1 (converted to the pool's dtype)."""
        end = start + k.shape[0]
        if end > self.capacity:
            raise ValueError(f"slots {start}..{end - 1} are not held (capacity {self.capacity})")
        ck, cv = self.pool.k[layer], self.pool.v[layer]
        base = self._base(end)
        if base is not None:
            ck[base + start:base + end].copy_(k)
            if v is not None:
                cv[base + start:base + end].copy_(v)
        else:
            idx = self._slots(ck.device, start, end)
            ck.index_copy_(0, idx, k.to(ck.dtype))
            if v is not None:
                cv.index_copy_(0, idx, v.to(cv.dtype))

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of logical slots 0..end-1 [end, n_kv, head_dim]: views when consecutive."""
        ck, cv = self.pool.k[layer], self.pool.v[layer]
        base = self._base(end)
        if base is not None:
            return ck[base:base + end], cv[base:base + end]
        idx = self._slots(ck.device, 0, end)
        return ck.index_select(0, idx), cv.index_select(0, idx)


class PrefixCache:
    """Full pages of finished sequences, by the tokens they hold, for new sequences to share.

    Page i of a sequence holds the KV of tokens [P*i, P*(i+1)); its entry is keyed by those
    tokens and its parent's key (a chain, as vLLM's prefix caching), so a lookup walks a new
    prompt page by page. The MTP layer's page i holds rows (h_p, x_{p+1}) for p in that range, so
    it also depends on token P*(i+1): an entry keeps an MTP page per next token. The cache holds
    one reference on each page it keeps; a pool that runs short evicts the least recently used
    entries whose pages nobody else holds (`KVPool.alloc`).

    Sharing keeps bits where the donor's KV has the bits the new sequence would compute: rows
    computed on the fused CPU path (decode steps, and prefill chunks of up to ROWWISE_MAX rows)
    do; a longer prefill chunk's batched matmuls do not promise it."""

    def __init__(self, main: KVPool, mtp: KVPool | None):
        self.main, self.mtp = main, mtp
        self.entries: dict = {}  # key -> [main page, {next token: mtp page}], insertion = LRU order
        for pool in (main, mtp):
            if pool is not None:
                pool.evictor = self

    @staticmethod
    def _key(parent, block: tuple):
        return (hash(parent), block) if parent is not None else ((), block)

    def insert(self, tokens: list[int], cache: SeqKV, mtp_cache: SeqKV | None) -> None:
        """Keep the full pages of a finished sequence's caches (before they are released)."""
        P = cache.pool.page_size
        if cache.pool is not self.main:
            return
        key = None
        n_main = min(cache.length, len(tokens)) // P
        n_mtp = 0 if mtp_cache is None else min(mtp_cache.length, len(tokens) - 1) // P
        for i in range(n_main):
            key = self._key(key, tuple(tokens[P * i:P * (i + 1)]))
            e = self.entries.pop(key, None)
            if e is None:
                e = [cache.pages[i], {}]
                self.main.share([e[0]])
            self.entries[key] = e  # most recently used last
            if i < n_mtp and self.mtp is not None:
                nxt = tokens[P * (i + 1)]
                if nxt not in e[1]:
                    e[1][nxt] = mtp_cache.pages[i]
                    self.mtp.share([e[1][nxt]])

    def lookup(self, ids: list[int], need_mtp: bool) -> tuple[int, list[int], list[int]]:
        """(n, main pages, MTP pages): the longest cached prefix of `ids` of whole pages, less at
        least one token (the prompt's last token must run); with `need_mtp`, as far as the MTP
        pages go too."""
        P = self.main.page_size
        key, main, mtp = None, [], []
        for i in range((len(ids) - 1) // P):
            key = self._key(key, tuple(ids[P * i:P * (i + 1)]))
            e = self.entries.get(key)
            if e is None:
                break
            if need_mtp:
                page = e[1].get(ids[P * (i + 1)])
                if page is None:
                    break
                mtp.append(page)
            main.append(e[0])
            self.entries[key] = self.entries.pop(key)  # used: to the end of the LRU order
        return len(main) * P, main, mtp

    def evictable(self, pool: KVPool) -> int:
        if pool is self.main:
            return sum(1 for e in self.entries.values() if pool.refs[e[0]] == 1)
        return sum(1 for e in self.entries.values() for p in e[1].values() if pool.refs[p] == 1)

    def evict(self, pool: KVPool, n: int) -> None:
        """Drop least recently used entries until `pool` has gained n free pages (or nothing is
        left that only the cache holds)."""
        freed = 0
        for key in list(self.entries):
            if freed >= n:
                break
            e = self.entries[key]
            pages = [e[0]] if pool is self.main else list(e[1].values())
            if not pages or any(pool.refs[p] != 1 for p in pages):
                continue
            if pool is self.main:  # the entry goes, with its MTP pages
                del self.entries[key]
                self.main.release([e[0]])
                if self.mtp is not None and e[1]:
                    self.mtp.release(list(e[1].values()))
            else:
                e[1].clear()
                self.mtp.release(pages)
            freed += len(pages)

    def clear(self) -> None:
        for e in self.entries.values():
            self.main.release([e[0]])
            if self.mtp is not None and e[1]:
                self.mtp.release(list(e[1].values()))
        self.entries.clear()


def private_cache(devices: list, max_len: int, n_kv: int, head_dim: int, dtype, v_dim: int | None = None) -> SeqKV:
    """A cache with a pool of its own, all of it held (tools, tests, one-off forwards)."""
    pool = KVPool(devices, max_len, n_kv, head_dim, dtype, page_size=max(1, max_len), v_dim=v_dim)
    c = SeqKV(pool, max_len)
    c.reserve(max_len)
    return c
