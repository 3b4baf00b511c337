"""Hybrid execution per plan: same tokens on every placement, no weight moved, activation bytes
exactly as the model's shapes predict."""

import textwrap

import pytest

import runtime


@pytest.fixture(scope="module")
def model(make_test_model):
    # F32 weights: the kernel and torch expert paths then differ only by float rounding
    return make_test_model(seed=21, n_layers=4)


def write_plan(tmp_path, model_path, body: str, name="plan.yaml"):
    p = tmp_path / name
    p.write_text(f"model: {model_path}\n" + textwrap.dedent(body))
    return p


PLANS = {
    "default": "",
    "all_gpu": "placement: {routed_experts: gpu}\n",
    "torch_experts": "placement: {routed_experts: gpu}\n",  # loaded with use_kernels=False
    "all_cpu": """\
        placement:
          token_embd: cpu
          output: cpu
          attention: cpu
          dense_ffn: cpu
          shared_experts: cpu
          routed_experts: cpu
          mtp: cpu
        """,
    "mixed_layers": """\
        placement:
          attention: {default: gpu, layers: {"2-3": cpu}}
          shared_experts: {default: gpu, layers: {"1-1": cpu}}
          routed_experts: {n_cpu: 3}
          mtp: {device: gpu, routed_experts: cpu}
        """,
}


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plans")
    out = {}
    for name, body in PLANS.items():
        kw = {"use_kernels": False} if name == "torch_experts" else {}
        eng = runtime.load(write_plan(tmp, model.gguf_path, body, f"{name}.yaml"), progress=False, **kw)
        out[name] = (eng, {mtp: eng.generate("def f(x):\n    return", max_tokens=64, mtp=mtp)
                           for mtp in (False, True)})
    return out


@pytest.mark.parametrize("name", [n for n in PLANS if n != "default"])
def test_same_tokens_on_every_placement(runs, name):
    ref = runs["default"][1]
    got = runs[name][1]
    for mtp in (False, True):
        assert got[mtp].tokens == ref[mtp].tokens
    assert got[True].tokens == got[False].tokens


@pytest.mark.parametrize("name", list(PLANS))
def test_no_weight_moves(runs, name):
    for r in runs[name][1].values():
        assert r.stats["weight_bytes_moved"] == 0


def test_placements_really_differ(runs):
    reports = {n: e.load_report for n, (e, _) in runs.items()}
    # Experts placed on the gpu side run on the CPU kernels too where that side is the CPU.
    no_cuda = runs["default"][0].device.type == "cpu"
    assert reports["default"].kernel_expert_layers == 3 + no_cuda  # main MoE layers 1..3 (+ the MTP layer's)
    assert reports["all_gpu"].kernel_expert_layers == 4 * no_cuda
    assert (reports["torch_experts"].kernel_expert_layers, reports["torch_experts"].torch_expert_layers) == (0, 4)
    assert reports["all_cpu"].bytes_by_side["gpu"] == 0
    assert reports["mixed_layers"].kernel_expert_layers == 2 + 1 + no_cuda  # blocks 1,2, the MTP layer's (+ 3)


def test_activation_bytes_match_the_formula(runs):
    """Default plan, plain decoding. Per token and per MoE layer the normed hidden state goes to
    the CPU side (H x 4 bytes: the gpu side is float32 here), with the router's choice (K int64
    ids, as topk makes them + K float32 weights), and the expert output comes back (H x 4 bytes):
        bytes/token = n_moe_layers * (4H + 12K + 4H)
    Every prompt token and every generated token passes through the model once, except the last
    one when generation stops at the token limit (an end-of-sequence token is never emitted, but
    the token before it was fed to produce it)."""
    eng, res = runs["default"]
    cfg = eng.cfg
    r = res[False]
    n_moe = cfg.n_layers - cfg.n_dense
    per_token = n_moe * (4 * cfg.hidden + 12 * cfg.n_experts_used + 4 * cfg.hidden)
    fed = r.stats["prompt_tokens"] + r.stats["generated_tokens"] - (r.finish_reason == "length")
    assert r.stats["activation_bytes_moved"] == per_token * fed


def test_all_cpu_moves_nothing(runs):
    for r in runs["all_cpu"][1].values():
        assert r.stats["activation_bytes_moved"] == 0
