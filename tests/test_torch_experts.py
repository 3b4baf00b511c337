"""The torch routed-expert path (experts placed on a GPU, and the reference): both of its ways
(pair by pair for decode-sized calls, grouped by expert for prefill) against a float64 loop."""
import pytest
import torch
import torch.nn.functional as F

from runtime.experts import TorchExperts


def reference(gate_up, down, x, ids, w):
    I = down.shape[2]
    gu, dn, x = gate_up.double(), down.double(), x.double()
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float64)
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = gu[e] @ x[t]
            out[t] += float(w[t, k]) * (dn[e] @ (F.silu(h[:I]) * h[I:]))
    return out


@pytest.mark.parametrize("T,K", [(1, 1), (1, 8), (3, 2), (4, 8), (5, 8), (33, 1), (40, 3)])
def test_torch_experts_match_float64(T, K):
    g = torch.Generator().manual_seed(T * 100 + K)
    E, H, I = 9, 24, 40
    gate_up = torch.randn(E, 2 * I, H, generator=g)
    down = torch.randn(E, H, I, generator=g) / 5
    x = torch.randn(T, H, generator=g)
    ids = torch.randint(0, E, (T, K), generator=g)
    ids[0, -1] = ids[0, 0]  # an expert repeated within a row
    w = torch.rand(T, K, generator=g)
    ex = TorchExperts(gate_up, down)
    got = ex(x, ids, w)
    assert got.dtype == torch.float32 and got.shape == (T, H)
    want = reference(gate_up, down, x, ids, w)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4 * want.abs().max())
    # both ways agree, whichever the size picks
    for way in (ex._grouped, ex._pairwise):
        assert torch.allclose(way(x, ids, w), got, rtol=1e-5, atol=1e-4 * float(want.abs().max()))


def test_pairwise_rows_do_not_depend_on_the_batch():
    """A verify batch's row gives the same bits as that row decoded alone (greedy MTP relies on
    rows agreeing with plain steps)."""
    g = torch.Generator().manual_seed(5)
    ex = TorchExperts(torch.randn(12, 32, 16, generator=g), torch.randn(12, 16, 16, generator=g))
    x = torch.randn(9, 16, generator=g)
    ids = torch.randint(0, 12, (9, 8), generator=g)  # 72 pairs: on the CPU still pair by pair
    w = torch.rand(9, 8, generator=g)
    batch = ex(x, ids, w)
    for t in range(9):
        assert torch.equal(ex(x[t:t + 1], ids[t:t + 1], w[t:t + 1])[0], batch[t])


def test_bfloat16_weights_give_bfloat16_rows():
    g = torch.Generator().manual_seed(2)
    ex = TorchExperts(torch.randn(4, 16, 8, generator=g).bfloat16(), torch.randn(4, 8, 8, generator=g).bfloat16())
    x = torch.randn(2, 8, generator=g).bfloat16()
    ids = torch.tensor([[0, 3], [3, 3]])
    w = torch.rand(2, 2, generator=g)
    got = ex(x, ids, w)
    assert got.dtype == torch.bfloat16
    want = reference(ex.gate_up.float(), ex.down.float(), x.float(), ids, w)
    assert torch.allclose(got.double(), want, rtol=0.05, atol=0.05 * float(want.abs().max()))
