"""Placement plans: schema and validation (with line numbers), resolution of every tensor to one
side, overrides, n_cpu_moe, MTP sharing, the weight-copy refusals, memory arithmetic, the report,
and the shipped configs against tiny GGUF files and synthetic tables of the real GLM shapes."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import torch
import pytest
from gguf import GGMLQuantizationType as T

import placement as P
from placement.synthetic import GLM_SHAPES, config_metadata, synthetic_model
from runtime.config import ModelConfig, expected_tensors, read_config
from runtime.gguf_file import GGUFFile

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))

TINY = ModelConfig(n_vocab=256, hidden=64, n_layers=3, n_nextn=1, n_heads=4, n_kv_heads=2, head_dim=16, rope_dim=8,
                   rope_base=10000.0, rms_eps=1e-5, dense_ffn=96, expert_ffn=32, n_experts=4, n_experts_used=2,
                   n_shared=1, n_dense=1, weights_scale=1.0, weights_norm=True, context_length=512, qk_norm=True,
                   attn_bias=True)


def write_tiny(path: Path, cfg: ModelConfig = TINY, nextn: str = "missing", tied: bool = False, seed: int = 0) -> Path:
    """A tiny glm4moe GGUF: real metadata, every tensor of the contract, random F32 / Q8_0 data.
    nextn: 'missing' | 'identical' | 'different' (the nextn embed_tokens / shared_head_head)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "glm4moe")
    for k, v in config_metadata(cfg).items():
        if k == "general.architecture":
            continue
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        else:
            w.add_float32(k, float(v))
    arrays = {}
    for name, (shape, required) in expected_tensors(cfg).items():
        if tied and name == "output.weight":
            continue
        if not required and "nextn." in name:
            if nextn == "missing":
                continue
            if nextn == "identical":
                main = "token_embd.weight" if "embed_tokens" in name else ("token_embd.weight" if tied else "output.weight")
                arrays[name] = arrays[main]
                continue
        arrays[name] = rng.standard_normal(shape).astype(np.float32)
    for name, arr in arrays.items():
        if arr.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
            w.add_tensor(name, arr)
        else:
            q = gguf.quants.quantize(arr, T.Q8_0)
            w.add_tensor(name, q, raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("placement_models")
    return {
        "missing": write_tiny(d / "missing.gguf", nextn="missing"),
        "identical": write_tiny(d / "identical.gguf", nextn="identical"),
        "different": write_tiny(d / "different.gguf", nextn="different"),
        "tied": write_tiny(d / "tied.gguf", nextn="identical", tied=True),
        "no_nextn": write_tiny(d / "no_nextn.gguf", cfg=replace(TINY, n_nextn=0)),
    }


def open_model(path):
    f = GGUFFile(path)
    return f, read_config(f)


def plan_from(tmp_path: Path, text: str, name: str = "plan.yaml", **overrides) -> P.Plan:
    p = tmp_path / name
    p.write_text(text)
    return P.load_plan(p, overrides or None)


def resolve_text(tmp_path, text, model, **overrides):
    plan = plan_from(tmp_path, text, model=str(model), **overrides)
    f, cfg = open_model(plan.model_path)
    return plan, f, cfg, P.resolve(plan, f, cfg)


def expect_error(tmp_path, text, pattern, *, resolve_with=None, **overrides):
    """The PlanError message must match `pattern` (a regex; {f} stands for the plan file)."""
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    pat = pattern.replace("{f}", re.escape(str(p)))
    with pytest.raises(P.PlanError) as e:
        plan = P.load_plan(p, overrides or None)
        if resolve_with is not None:
            plan = P.apply_overrides(plan, {"model": str(resolve_with)})
            f, cfg = open_model(plan.model_path)
            P.resolve(plan, f, cfg)
    msg = str(e.value)
    assert "\n" not in msg
    assert re.search(pat, msg), msg
    return msg


# ---------------------------------------------------------------------------------------------- shipped plans

LOADED_NEXTN_DUPES = re.compile(r"^blk\.\d+\.nextn\.(embed_tokens|shared_head_head)\.weight$")


@pytest.mark.parametrize("plan_path", SHIPPED, ids=[p.stem for p in SHIPPED])
@pytest.mark.parametrize("kind", ["missing", "identical", "different", "tied", "no_nextn"])
def test_every_tensor_resolves_to_one_side_under_every_shipped_plan(models, plan_path, kind):
    plan = P.load_plan(plan_path, {"model": str(models[kind])})
    f, cfg = open_model(plan.model_path)
    res = P.resolve(plan, f, cfg)
    assert set(res.tensors) == set(f.tensors)
    for name, side in res.tensors.items():
        assert side in ("gpu", "cpu", "none"), (name, side)
        if side == "none":
            assert LOADED_NEXTN_DUPES.match(name) and kind in ("identical", "tied"), name
        assert res.side_of(name) == side
    # every op unit on one side
    by_unit = {}
    for name, side in res.tensors.items():
        if side != "none":
            by_unit.setdefault(res.unit_of(name), set()).add(side)
    assert all(len(s) == 1 for s in by_unit.values())
    est = P.estimate_memory(res, f, cfg, plan)
    assert est.gpu_weight_bytes + est.cpu_weight_bytes == sum(est.tensor_bytes.values())
    report = P.format_report(plan, res, est)
    assert "total gpu side" in report


# plan -> (model shapes, GPU GiB free that the plan's comment targets)
TARGETS = {"glm45-air-24gb": ("glm45-air", 23.5), "glm45-air-80gb": ("glm45-air", 79.0),
           "glm47-24gb": ("glm47", 23.5), "glm47-48gb": ("glm47", 47.0), "cpu-only": ("glm45-air", None),
           "demo": ("glm45-air", None)}


def test_every_shipped_plan_is_targeted():
    assert {p.stem for p in SHIPPED} >= set(TARGETS) - {"demo"}
    assert set(TARGETS) >= {p.stem for p in SHIPPED}


@pytest.mark.parametrize("plan_path", SHIPPED, ids=[p.stem for p in SHIPPED])
@pytest.mark.parametrize("nextn", ["missing", "identical"])
def test_shipped_plans_fit_their_target_with_the_real_shapes(plan_path, nextn):
    shapes, free_gib = TARGETS[plan_path.stem]
    plan = P.load_plan(plan_path, check_model=False)
    model = synthetic_model(shapes, "Q4_K_M", nextn_copies=nextn)
    cfg = read_config(model)
    res = P.resolve(plan, model, cfg)
    assert set(res.tensors) == set(model.tensors)
    est = P.estimate_memory(res, model, cfg, plan, gpu_device="cuda:0")
    if free_gib is not None:
        assert est.fits(int(free_gib * (1 << 30))), P.format_report(plan, res, est, int(free_gib * (1 << 30)))
    # the routed experts of the main layers always stay in GGUF form on the cpu side where placed there
    for name, side in res.tensors.items():
        if side == "cpu" and "_exps." in name:
            assert est.tensor_bytes[name] == model.tensors[name].nbytes


def test_shipped_plan_comment_numbers():
    """The arithmetic in the comments of the GLM plans is what estimate_memory computes."""
    def gib(plan_name, shapes):
        plan = P.load_plan(CONFIGS / f"{plan_name}.yaml", check_model=False)
        m = synthetic_model(shapes)
        cfg = read_config(m)
        est = P.estimate_memory(P.resolve(plan, m, cfg), m, cfg, plan, gpu_device="cuda:0")
        return round(est.gpu_bytes / (1 << 30), 2), round(est.gpu_kv_bytes / (1 << 30), 2)

    for plan_name, shapes in [("glm45-air-24gb", "glm45-air"), ("glm45-air-80gb", "glm45-air"),
                              ("glm47-24gb", "glm47"), ("glm47-48gb", "glm47")]:
        total, kv = gib(plan_name, shapes)
        text = (CONFIGS / f"{plan_name}.yaml").read_text()
        assert f"gpu total {total:.2f} GiB" in text, (plan_name, total)
        assert f"{kv:.2f} GiB" in text, (plan_name, kv)


def test_demo_plan_points_at_the_bundled_model():
    plan = P.load_plan(CONFIGS / "demo.yaml", check_model=False)
    assert plan.model_path == (CONFIGS.parent / "runtime" / "demo" / "demo.gguf").resolve() or \
        plan.model_path == Path(str(CONFIGS / "../runtime/demo/demo.gguf")).resolve() or \
        plan.model_path.name == "demo.gguf"
    if not plan.model_path.exists():
        with pytest.raises(P.PlanError, match=r"demo\.yaml:\d+: model: model file .*demo\.gguf does not exist"):
            P.load_plan(CONFIGS / "demo.yaml")


# ---------------------------------------------------------------------------------------------- defaults

def test_defaults_a_glm_user_expects(models):
    plan = P.load_plan(None)
    assert plan.source == "<defaults>" and plan.model_path is None
    assert (plan.gpu, plan.threads, plan.gpu_dtype, plan.context) == ("auto", "auto", "auto", None)
    assert plan.speculative == P.Speculative(mtp=None, draft_max=1, p_min=0.0, adaptive=True)
    assert plan.sampling == P.Sampling(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, max_tokens=256)
    plan = P.load_plan(None, {"model": str(models["different"])})
    f, cfg = open_model(plan.model_path)
    res = P.resolve(plan, f, cfg)
    assert res.mtp_enabled
    for name, side in res.tensors.items():
        routed_main = "_exps." in name and not name.startswith(f"blk.{cfg.n_layers}.")
        assert side == ("cpu" if routed_main else "gpu"), name
    assert plan.context_for(cfg.context_length) == 512
    assert plan.context_for(131072) == P.DEFAULT_CONTEXT


def test_default_placement_agrees_with_the_loader_units(models):
    """The engine's loader builds units (router with the experts, post_attention_norm with attention)
    and its own default; the plan's defaults must agree on every main-layer tensor."""
    loader = pytest.importorskip("runtime.loader")
    plan = P.load_plan(None, {"model": str(models["missing"])})
    f, cfg = open_model(plan.model_path)
    res = P.resolve(plan, f, cfg)
    for name in f.tensors:
        if not name.startswith(f"blk.{cfg.n_layers}."):
            assert res.side_of(name) == loader.default_side_of(name), name


# ---------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("text,pattern", [
    ("model:\ngpus: auto\n", r"^{f}:2: gpus: unknown key \(did you mean 'gpu'\?\)$"),
    ("placement:\n  attention: gpu\n  atention: cpu\n",
     r"^{f}:3: placement\.atention: unknown key \(did you mean 'attention'\?\)$"),
    ("speculative:\n  mtp: true\n  draft_maxx: 2\n", r"^{f}:3: speculative\.draft_maxx: unknown key \(did you mean 'draft_max'\?\)"),
    ("placement:\n  routed_experts:\n    default: cpu\n    n_cpu_mo: 3\n",
     r"^{f}:4: placement\.routed_experts\.n_cpu_mo: unknown key \(did you mean 'n_cpu'\?\)"),
    ("overrides:\n  - pattern: x\n    devise: cpu\n", r"^{f}:3: overrides\[0\]\.devise: unknown key"),
    ("threads: many\n", r"^{f}:1: threads: expected auto or a thread count, got a string 'many'"),
    ("repack: sometimes\n", r"^{f}:1: repack: expected auto, true or false, got a string 'sometimes'"),
    ("context: true\n", r"^{f}:1: context: expected auto or a context length, got a boolean"),
    ("gpu: auto\ncontext: 4\n", r"^{f}:2: context: expected auto or a context length >= 16, got 4"),
    ("sampling:\n  temperature: hot\n", r"^{f}:2: sampling\.temperature: expected a number"),
    ("sampling:\n\n  top_p: 0\n", r"^{f}:3: sampling\.top_p: expected a number in \(0\.0, 1\.0\], got 0"),
    ("speculative:\n  draft_max: 17\n", r"^{f}:2: speculative\.draft_max: expected a draft length in 0\.\.16, got 17"),
    ("speculative:\n  adaptive: maybe\n", r"^{f}:2: speculative\.adaptive: expected true or false"),
    ("gpu_dtype: int8\n", r"^{f}:1: gpu_dtype: unknown dtype 'int8'"),
    ("gpu: tpu\n", r"^{f}:1: gpu: unknown device 'tpu'; expected auto, cpu, cuda or cuda:N"),
    ("placement:\n  attention: tpu\n", r"^{f}:2: placement\.attention: unknown device 'tpu'; expected gpu or cpu"),
    ("placement:\n  mtp:\n    device: gpu\n    routed_experts: npu\n",
     r"^{f}:4: placement\.mtp\.routed_experts: unknown device 'npu'"),
    ("placement:\n  attention: [gpu]\n", r"^{f}:2: placement\.attention: expected a mapping"),
    ("placement: gpu\n", r"^{f}:1: placement: expected a mapping with keys token_embd"),
    ("overrides:\n  - ffn_up_exps=gpu\n  - 'blk\\.(1=gpu'\n",
     r"^{f}:3: overrides\[1\]: invalid regular expression 'blk\\\\\.\(1': missing \), unterminated subpattern"),
    ("overrides:\n  - ffn_up_exps\n", r"^{f}:2: overrides\[0\]: expected 'REGEX=DEVICE'"),
    ("overrides:\n  - ffn_up_exps=vram\n", r"^{f}:2: overrides\[0\]: unknown device 'vram'"),
    ("overrides: ffn=cpu\n", r"^{f}:1: overrides: expected a list"),
    ("placement:\n  routed_experts:\n    layers:\n      1-x: gpu\n",
     r"^{f}:4: placement\.routed_experts\.layers\.1-x: expected a layer N or a range 'A-B'"),
    ("placement:\n  routed_experts:\n    layers:\n      1-5: gpu\n      5-6: cpu\n",
     r"^{f}:5: placement\.routed_experts\.layers\.5-6: layers 5-6 overlap layers 1-5"),
    ("placement:\n  routed_experts:\n    n_cpu: 2\n    layers: {1: gpu}\n",
     r"^{f}:2: placement\.routed_experts: give either n_cpu or layers, not both"),
    ("gpu: auto\ngpu: cpu\n", r"^{f}:2: gpu: duplicate key \(first given on line 1\)"),
    ("gpu: auto\nplacement:\n  attention: gpu\n   dense_ffn: cpu\n", r"^{f}:4: YAML syntax error: "),
    ("sampling: {top_k: 3\n", r"^{f}:2: YAML syntax error: "),
    ("- gpu\n", r"^{f}:1: plan: expected a mapping"),
    ("model: 3\n", r"^{f}:1: model: expected a path to a \.gguf file"),
    ("model: nowhere/x.gguf\n", r"^{f}:1: model: model file .*nowhere/x\.gguf does not exist"),
    ("sampling:\n  seed: -1\n", r"^{f}:2: sampling\.seed: expected null or a non-negative integer seed"),
    ("sampling:\n  repeat_penalty: 0\n", r"^{f}:2: sampling\.repeat_penalty: expected a number > 0\.0, got 0\.0"),
    ("sampling:\n  repeat_last_n: 0\n", r"^{f}:2: sampling\.repeat_last_n: expected a token count"),
])
def test_validation_errors_name_file_line_key(tmp_path, text, pattern):
    expect_error(tmp_path, text, pattern)


def test_model_path_is_relative_to_the_plan(tmp_path, models):
    sub = tmp_path / "plans"
    sub.mkdir()
    (sub / "p.yaml").write_text(f"model: ../m.gguf\n")
    (tmp_path / "m.gguf").write_bytes(Path(models["missing"]).read_bytes())
    plan = P.load_plan(sub / "p.yaml")
    assert plan.model_path == (tmp_path / "m.gguf")
    with pytest.raises(P.PlanError, match=r"^override 'model': .* is a directory"):
        P.load_plan(None, {"model": str(tmp_path)})


def test_missing_and_empty_plan_files(tmp_path):
    with pytest.raises(P.PlanError, match=r"nope\.yaml: no such plan file"):
        P.load_plan(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert P.load_plan(tmp_path / "empty.yaml").groups == P.Groups()


@pytest.mark.parametrize("text,pattern", [
    ("placement:\n  routed_experts:\n    default: cpu\n    layers:\n      2-7: gpu\n",
     r"^{f}:5: placement\.routed_experts\.layers\.2-7: layers 2-7 are outside the model \(main layers 0-2; "
     r"the nextn block 3 is placed by placement\.mtp\)"),
    ("placement:\n  attention:\n    layers: {3: cpu}\n", r"^{f}:3: placement\.attention\.layers\.3: layers 3-3 are outside"),
    ("placement:\n  dense_ffn:\n    layers: {1-2: cpu}\n", r"^{f}:3: placement\.dense_ffn\.layers\.1-2: layers 1-2 have no dense FFN"),
    ("placement:\n  shared_experts:\n    layers: {0: cpu}\n", r"^{f}:3: placement\.shared_experts\.layers\.0: layers 0-0 are dense"),
    ("speculative:\n  mtp: true\n", r"^{f}:2: speculative\.mtp: MTP requested but .* has no nextn"),
])
def test_resolve_time_errors_name_file_line_key(tmp_path, models, text, pattern):
    model = models["no_nextn"] if "mtp: true" in text else models["missing"]
    expect_error(tmp_path, text, pattern, resolve_with=model)


def test_override_matching_nothing_is_a_warning_with_its_line(tmp_path, models):
    plan, f, cfg, res = resolve_text(tmp_path, "overrides:\n  - token_embd=gpu\n  - 'blk\\.99\\.=cpu'\n", models["missing"])
    assert any(re.search(rf"{re.escape(str(plan.source))}:3: overrides\[1\]: override 'blk\\\.99\\\.=cpu' matches no tensor", w)
               for w in res.warnings), res.warnings
    assert len(res.warnings) == 1


def test_flat_overrides_are_checked(models):
    with pytest.raises(P.PlanError, match=r"^override 'n_cpu_mo': unknown setting \(did you mean 'n_cpu_moe'\?\)$"):
        P.load_plan(None, {"n_cpu_mo": 3})
    with pytest.raises(P.PlanError, match=r"^override 'threads': expected auto or a thread count >= 1, got 0$"):
        P.load_plan(None, {"threads": 0})
    with pytest.raises(P.PlanError, match=r"^override 'override_tensor'\[1\]: invalid regular expression"):
        P.load_plan(None, {"override_tensor": ["a=cpu", "(=gpu"]})
    with pytest.raises(P.PlanError, match=r"^override 'model': model file .* does not exist$"):
        P.load_plan(None, {"model": "/no/such/model.gguf"})
    plan = P.load_plan(None, {"temperature": None, "top_k": 40, "gpu": "CUDA1", "gpu_dtype": "bf16", "mtp": False,
                              "context": 2048, "threads": "8", "seed": 7})
    assert plan.sampling.temperature == 0.0 and plan.sampling.top_k == 40 and plan.sampling.seed == 7
    assert (plan.gpu, plan.gpu_dtype, plan.context, plan.threads) == ("cuda:1", "bfloat16", 2048, 8)
    assert plan.speculative.mtp is False
    assert P.load_plan(None).sampling.top_k == 0  # overrides do not leak into the defaults
    assert P.load_plan(None).repack == "auto"
    assert P.load_plan(None, {"repack": "false"}).repack is False and P.load_plan(None, {"repack": True}).repack is True
    with pytest.raises(P.PlanError, match=r"^override 'repack': expected auto, true or false, got an integer 2$"):
        P.load_plan(None, {"repack": 2})


# ---------------------------------------------------------------------------------------------- resolution

def test_overrides_come_first_and_first_match_wins(tmp_path, models):
    text = ("placement:\n  routed_experts: cpu\noverrides:\n"
            "  - 'blk\\.2\\.ffn_.*_exps=gpu'\n"  # first: layer 2 experts -> gpu
            "  - 'ffn_.*_exps=cpu'\n")  # would say cpu for layer 2 too, but the first match wins
    plan, f, cfg, res = resolve_text(tmp_path, text, models["missing"], override_tensor=["blk\\.1\\.ffn_up_exps=gpu",
                                                                                        "blk\\.1\\.ffn_(gate|down)_exps=gpu"])
    assert [o.where for o in plan.overrides][:2] == ["override 'override_tensor'[0]", "override 'override_tensor'[1]"]
    for L, want in [(1, "gpu"), (2, "gpu")]:
        for w in ("gate", "up", "down"):
            assert res.side_of(f"blk.{L}.ffn_{w}_exps.weight") == want
        # the router is a unit of its own (with the attention group): it stays
        assert res.side_of(f"blk.{L}.ffn_gate_inp.weight") == "gpu"
        assert res.side_of(f"blk.{L}.exp_probs_b.bias") == "gpu"
    assert res.side_of("blk.3.ffn_up_exps.weight") == "cpu"  # the nextn block's experts: matched by 'ffn_.*_exps=cpu'
    assert res.override_of["blk.2.ffn_up_exps.weight"].endswith(":4: overrides[0]")
    assert not res.warnings


def test_attention_override_moves_the_whole_unit(tmp_path, models):
    plan, f, cfg, res = resolve_text(tmp_path, "overrides:\n  - 'blk\\.1\\.attn_.*=cpu'\n", models["missing"])
    assert res.units["blk.1.attention"] == "cpu"
    assert res.side_of("blk.1.post_attention_norm.weight") == "cpu"
    assert res.units["blk.2.attention"] == "gpu"


def test_split_inside_an_op_unit_is_refused(tmp_path, models):
    msg = expect_error(tmp_path, "gpu: auto\noverrides:\n  - 'blk\\.2\\.attn_q\\.weight=cpu'\n",
                       r"^{f}:3: overrides\[0\]: op unit blk\.2\.attention is split across sides "
                       r"\(cpu: blk\.2\.attn_q\.weight, blk\.2\.post_attention_norm\.weight; gpu: .*blk\.2\.attn_k\.weight.*\)",
                       resolve_with=models["missing"])
    assert "copied at every step" in msg
    expect_error(tmp_path, "overrides:\n  - 'blk\\.1\\.ffn_up_exps=gpu'\n",
                 r"^{f}:2: overrides\[0\]: op unit blk\.1\.routed_experts is split across sides",
                 resolve_with=models["missing"])
    expect_error(tmp_path, "overrides:\n  - 'blk\\.1\\.exp_probs_b=cpu'\n",
                 r"^{f}:2: overrides\[0\]: op unit blk\.1\.router is split across sides",
                 resolve_with=models["missing"])
    expect_error(tmp_path, "overrides:\n  - 'blk\\.1\\.ffn_up_shexp=cpu'\n",
                 r"^{f}:2: overrides\[0\]: op unit blk\.1\.shared_experts is split", resolve_with=models["missing"])


def test_layer_groups_ranges_and_n_cpu(tmp_path, models):
    text = ("placement:\n  attention:\n    default: gpu\n    layers:\n      0-1: cpu\n"
            "  shared_experts:\n    n_cpu: 2\n")
    plan, f, cfg, res = resolve_text(tmp_path, text, models["missing"])
    assert [res.units[f"blk.{i}.attention"] for i in range(4)] == ["cpu", "cpu", "gpu", "gpu"]
    assert [res.units[f"blk.{i}.shared_experts"] for i in (1, 2, 3)] == ["cpu", "gpu", "gpu"]


@pytest.mark.parametrize("n,want", [(0, "ggg"), (1, "ggg"), (2, "cgg"), (3, "ccg"), (4, "ccc"), (99, "ccc")])
def test_n_cpu_moe_counts_blocks_like_llama_cpp(models, n, want):
    """--n-cpu-moe N: experts of blk.0..N-1 on cpu (blk.0 is dense: no experts), the rest on gpu;
    N past the main layers reaches the nextn block (blk.3 here), as in llama.cpp."""
    plan = P.load_plan(None, {"model": str(models["missing"]), "n_cpu_moe": n})
    f, cfg = open_model(plan.model_path)
    res = P.resolve(plan, f, cfg)
    assert "blk.0.routed_experts" not in res.units  # blk.0 is dense
    assert "".join(res.units[f"blk.{L}.routed_experts"][0] for L in (1, 2, 3)) == want


def test_cpu_moe_puts_every_routed_expert_on_cpu(models):
    plan = P.load_plan(None, {"model": str(models["missing"]), "n_cpu_moe": 0, "cpu_moe": True})
    f, cfg = open_model(plan.model_path)
    res = P.resolve(plan, f, cfg)
    assert [res.units[f"blk.{L}.routed_experts"] for L in (1, 2, 3)] == ["cpu"] * 3
    assert res.units["blk.3.attention"] == "gpu"


def test_mtp_group_places_the_whole_layer(tmp_path, models):
    text = "placement:\n  token_embd: cpu\n  output: cpu\n  mtp: cpu\n"
    plan, f, cfg, res = resolve_text(tmp_path, text, models["missing"])
    assert {s for n, s in res.tensors.items() if n.startswith("blk.3.")} == {"cpu"}
    text = "placement:\n  mtp:\n    device: gpu\n    routed_experts: cpu\n"
    plan, f, cfg, res = resolve_text(tmp_path, text, models["missing"])
    assert res.units["blk.3.routed_experts"] == "cpu" and res.units["blk.3.mtp_nextn"] == "gpu"
    assert res.units["blk.3.attention"] == "gpu"


# ---------------------------------------------------------------------------------------------- MTP sharing

@pytest.mark.parametrize("kind,shares", [("missing", True), ("identical", True), ("different", False), ("tied", True)])
def test_mtp_shares_embed_and_head_when_missing_or_identical(models, kind, shares):
    plan = P.load_plan(None, {"model": str(models[kind])})
    f, cfg = open_model(plan.model_path)
    res = P.resolve(plan, f, cfg)
    assert res.mtp_shares_embed is shares and res.mtp_shares_head is shares
    e, h = "blk.3.nextn.embed_tokens.weight", "blk.3.nextn.shared_head_head.weight"
    est = P.estimate_memory(res, f, cfg, plan, gpu_device="cpu")
    if kind == "missing":
        assert e not in res.tensors and res.mtp_embed_name == "token_embd.weight"
    elif shares:
        assert res.tensors[e] == res.tensors[h] == "none"
        assert est.tensor_bytes[e] == est.tensor_bytes[h] == 0
        assert est.skipped_bytes == f.tensors[e].nbytes + f.tensors[h].nbytes
        assert res.mtp_embed_name == "token_embd.weight"
        assert res.mtp_head_name == ("token_embd.weight" if kind == "tied" else "output.weight")
    else:
        assert res.tensors[e] == res.tensors[h] == "gpu"
        assert res.mtp_embed_name == e and res.mtp_head_name == h
        # the MTP layer's own embedding, Q8_0, where the gpu side is the CPU: in GGUF form (looked up
        # row by row); on CUDA a float copy in the gpu dtype
        assert est.tensor_bytes[e] == f.tensors[e].nbytes
        cuda = P.estimate_memory(res, f, cfg, plan, gpu_device="cuda:0")
        assert cuda.tensor_bytes[e] == f.tensors[e].n_elements * 2


def test_same_bytes_compares_data(models):
    f, _ = open_model(models["identical"])
    g, _ = open_model(models["different"])
    assert P.same_bytes(f.tensors["blk.3.nextn.embed_tokens.weight"], f.tensors["token_embd.weight"])
    assert not P.same_bytes(g.tensors["blk.3.nextn.embed_tokens.weight"], g.tensors["token_embd.weight"])
    assert not P.same_bytes(f.tensors["blk.1.attn_q.weight"], f.tensors["blk.2.attn_q.weight"])


# ---------------------------------------------------------------------------------------------- weight-copy refusals

def test_mtp_on_gpu_with_its_embedding_on_cpu_is_refused(tmp_path, models):
    msg = expect_error(tmp_path, "gpu: auto\nplacement:\n  token_embd: cpu\n",
                       r"^{f}:3: placement\.token_embd: the MTP layer blk\.3 is on gpu but the embedding it reads at "
                       r"every draft step, token_embd\.weight \(shared with the main model\), is on cpu",
                       resolve_with=models["identical"])
    assert "ik_llama.cpp" in msg and "blk.46.nextn.embed_tokens" in msg
    expect_error(tmp_path, "placement:\n  output: cpu\n",
                 r"^{f}:2: placement\.output: the MTP layer blk\.3 is on gpu but the head .* output\.weight",
                 resolve_with=models["missing"])
    # its own (different) embedding on the cpu side through an override
    expect_error(tmp_path, "overrides:\n  - 'nextn\\.embed_tokens=cpu'\n",
                 r"^{f}:2: overrides\[0\]: the MTP layer blk\.3 is on gpu but the embedding it reads at every draft "
                 r"step, blk\.3\.nextn\.embed_tokens\.weight, is on cpu", resolve_with=models["different"])
    # the other way round: the MTP layer on cpu, the shared head on gpu
    expect_error(tmp_path, "placement:\n  mtp: cpu\n", r"the MTP layer blk\.3 is on cpu but the embedding",
                 resolve_with=models["missing"])


def test_mtp_off_turns_the_refusal_into_a_warning(tmp_path, models):
    plan, f, cfg, res = resolve_text(tmp_path, "placement:\n  token_embd: cpu\nspeculative:\n  mtp: false\n",
                                     models["missing"])
    assert not res.mtp_enabled
    assert any("MTP is off, but if enabled" in w for w in res.warnings)


def test_duplicate_nextn_copy_override_only_warns(tmp_path, models):
    plan, f, cfg, res = resolve_text(tmp_path, "overrides:\n  - 'nextn\\.embed_tokens=cpu'\n", models["identical"])
    assert res.tensors["blk.3.nextn.embed_tokens.weight"] == "none"
    assert any("only duplicate tensors that are not loaded" in w for w in res.warnings)


def test_tied_head_must_sit_with_the_embedding(tmp_path, models):
    expect_error(tmp_path, "placement:\n  token_embd: cpu\n  mtp: cpu\nspeculative: {mtp: false}\n",
                 r"^{f}:2: placement\.token_embd: .*|output\.weight is absent", resolve_with=models["tied"])
    msg = expect_error(tmp_path, "placement:\n  output: cpu\nspeculative: {mtp: false}\n",
                       r"^{f}:2: placement\.output: output\.weight is absent, so the head multiplies by token_embd\.weight",
                       resolve_with=models["tied"])
    assert "same side" in msg


# ---------------------------------------------------------------------------------------------- memory

def test_memory_estimate_arithmetic(tmp_path, models):
    plan = P.load_plan(None, {"model": str(models["different"]), "context": 100})
    f, cfg = open_model(plan.model_path)
    res = P.resolve(plan, f, cfg)
    H, V, E, I = cfg.hidden, cfg.n_vocab, cfg.n_experts, cfg.expert_ffn
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        est = P.estimate_memory(res, f, cfg, replace(plan, gpu_dtype=dtype), gpu_device="cpu")
        assert est.gpu_dtype == dtype and est.context == 100
        kv = cfg.n_blocks * 100 * cfg.n_kv_heads * cfg.head_dim * 2 * size
        assert est.gpu_kv_bytes == kv == (3 + 1) * 100 * 2 * 16 * 2 * size and est.cpu_kv_bytes == 0
        assert est.kv_bytes == kv
        router = E * H * 4 + E * 4  # float32 on either side
        cpu = sum(f.tensors[f"blk.{L}.ffn_{w}_exps.weight"].nbytes for L in (1, 2) for w in ("gate", "up", "down"))
        assert cpu == 2 * 3 * E * I * H // 32 * 34  # Q8_0 in GGUF form
        assert est.cpu_weight_bytes == cpu
        gpu_t = [t for n, t in f.tensors.items() if res.tensors[n] == "gpu"
                 and not n.endswith(("ffn_gate_inp.weight", "exp_probs_b.bias", "_exps.weight"))]
        gpu_elems = sum(t.n_elements for t in gpu_t)
        # where the gpu side is the CPU, block-quantized 2-D weights (matrices and embedding tables)
        # stay in GGUF form (runtime/linear.py); norms, biases and float types do not
        kept = [t for t in gpu_t if t.type_name not in ("F32", "F16", "BF16") and len(t.shape) == 2]
        assert {t.name for t in kept} >= {"blk.0.attn_q.weight", "output.weight", "blk.3.nextn.eh_proj.weight",
                                          "token_embd.weight"}
        # the MTP layer's routed experts (blk.3, gpu side): in GGUF form for the kernels when the gpu
        # side is the CPU, dequantized to the gpu dtype on CUDA
        mtp_exps = [f.tensors[f"blk.3.ffn_{w}_exps.weight"] for w in ("gate", "up", "down")]
        assert all(res.tensors[t.name] == "gpu" for t in mtp_exps)
        router3 = 3 * router  # routers of blk.1-3, on the gpu side
        assert est.gpu_weight_bytes == ((gpu_elems - sum(t.n_elements for t in kept)) * size + sum(t.nbytes for t in kept)
                                        + router3 + sum(t.nbytes for t in mtp_exps))
        cuda = P.estimate_memory(res, f, cfg, replace(plan, gpu_dtype=dtype), gpu_device="cuda:0")
        assert cuda.gpu_weight_bytes == (gpu_elems + sum(t.n_elements for t in mtp_exps)) * size + router3
        assert P.estimate_memory(res, f, cfg, replace(plan, gpu_dtype=dtype), gpu_device="cpu",
                                 use_kernels=False).gpu_weight_bytes == (gpu_elems + sum(t.n_elements for t in mtp_exps)) * size + router3
        assert est.tensor_bytes["token_embd.weight"] == f.tensors["token_embd.weight"].nbytes
        assert cuda.tensor_bytes["token_embd.weight"] == V * H * size
        assert est.gpu_bytes == est.gpu_weight_bytes + kv
        assert sum(est.row_bytes) == est.gpu_weight_bytes + est.cpu_weight_bytes
    # cpu-side non-expert tensors are float32; KV follows the attention's side
    plan2 = P.load_plan(None, {"model": str(models["missing"]), "context": 64, "gpu_dtype": "bfloat16",
                               "override_tensor": ["blk\\.1\\.(attn|post_attention)=cpu"]})
    f2, cfg2 = open_model(plan2.model_path)
    est2 = P.estimate_memory(P.resolve(plan2, f2, cfg2), f2, cfg2, plan2, gpu_device="cpu")
    q, qn = f2.tensors["blk.1.attn_q.weight"], f2.tensors["blk.1.attn_norm.weight"]
    assert est2.tensor_bytes["blk.1.attn_q.weight"] == q.nbytes < q.n_elements * 2  # GGUF form
    assert est2.tensor_bytes["blk.1.attn_norm.weight"] == qn.n_elements * 4
    per_block = 64 * cfg2.n_kv_heads * cfg2.head_dim * 2 * 2
    assert est2.cpu_kv_bytes == per_block and est2.gpu_kv_bytes == 3 * per_block


def test_gpu_dtype_auto_resolution():
    plan = P.load_plan(None)
    assert P.resolve_gpu_dtype(plan, "cpu") == "float32"
    assert P.resolve_gpu_dtype(plan, "cuda:0") == "bfloat16"
    assert P.resolve_gpu_dtype(P.load_plan(None, {"gpu_dtype": "float16"}), "cuda:0") == "float16"
    assert P.resolve_gpu_device(P.load_plan(None, {"gpu": "cpu"})) == "cpu"
    assert P.resolve_gpu_device(P.load_plan(None, {"gpu": "cuda"})) == "cuda:0"


def test_format_report(models):
    plan = P.load_plan(CONFIGS / "glm45-air-24gb.yaml", check_model=False)
    m = synthetic_model("glm45-air", nextn_copies="identical")
    cfg = read_config(m)
    res = P.resolve(plan, m, cfg)
    est = P.estimate_memory(res, m, cfg, plan, gpu_device="cuda:0")
    text = P.format_report(plan, res, est, gpu_free_bytes=24 << 30)
    assert "total gpu side: " + P.fmt_bytes(est.gpu_bytes) in text
    assert "total cpu side: " + P.fmt_bytes(est.cpu_bytes) in text
    assert f"KV cache for context 16384: {P.fmt_bytes(est.kv_bytes)}" in text
    assert re.search(r"^routed_experts\s+1-45\s+cpu\s+Q4_K\+Q5_0\+Q8_0", text, re.M), text
    assert re.search(r"^attention\s+0-45\s+gpu", text, re.M)
    assert "(duplicate, not loaded)" in text and ": fits" in text
    assert "DOES NOT FIT" in P.format_report(plan, res, est, gpu_free_bytes=16 << 30)
    # one row per group and layer range, and every tensor in exactly one row
    names = [n for r in res.rows for n in r.names]
    assert sorted(names) == sorted(m.tensors)


def test_synthetic_tables_have_the_real_shapes():
    for name, cfg in GLM_SHAPES.items():
        m = synthetic_model(name)
        assert read_config(m) == cfg
    air = synthetic_model("glm45-air")
    assert 65e9 < air.total_bytes() < 80e9  # published GLM-4.5-Air Q4_K_M files: ~73 GB
    assert air.tensors["blk.1.ffn_down_exps.weight"].ggml_type in (T.Q5_0, T.Q8_0)  # 1408 % 256 != 0
    assert air.tensors["blk.1.ffn_gate_exps.weight"].ggml_type == T.Q4_K
    big = synthetic_model("glm47")
    assert 190e9 < big.total_bytes() < 240e9  # ~215 GB
    assert "blk.92.nextn.embed_tokens.weight" not in big.tensors
    assert "blk.92.nextn.embed_tokens.weight" in synthetic_model("glm45", nextn_copies="identical").tensors


@pytest.mark.parametrize("use_kernels", [False, True])
@pytest.mark.parametrize("kind,ov,dtype", [
    ("missing", None, "float32"), ("identical", ["blk\\.1\\.(attn|post_attention)=cpu"], "bfloat16"),
    ("different", ["blk\\.2\\.ffn_.*_exps=gpu"], "float32")])
def test_estimate_equals_what_the_loader_allocates(models, kind, ov, dtype, use_kernels):
    """Weights per side as the engine's loader actually allocates them (here the gpu side is the CPU)."""
    loader = pytest.importorskip("runtime.loader")
    torch = pytest.importorskip("torch")
    if use_kernels:
        pytest.importorskip("cpu_kernels")
    plan = P.load_plan(None, {"model": str(models[kind]), "override_tensor": ov, "gpu": "cpu", "gpu_dtype": dtype})
    f, cfg = open_model(plan.model_path)
    res = P.resolve(plan, f, cfg)
    est = P.estimate_memory(res, f, cfg, plan, use_kernels=use_kernels)
    _, report = loader.build_model(f, cfg, side_of=res.side_of, gpu_device="cpu", gpu_dtype=getattr(torch, dtype),
                                   use_kernels=use_kernels, progress=False)
    if use_kernels and report.kernel_expert_layers == 0:
        pytest.skip("CPU kernels not built")
    assert report.bytes_by_side == {"gpu": est.gpu_weight_bytes, "cpu": est.cpu_weight_bytes}
    assert (report.mtp_shares_embed, report.mtp_shares_head) == (res.mtp_shares_embed, res.mtp_shares_head)


def test_the_documented_example_plan_is_valid():
    doc = (Path(P.__file__).parent / "PLAN_FORMAT.md").read_text()
    example = re.search(r"### A complete annotated plan.*?```yaml\n(.*?)```", doc, re.S)[1]
    plan = P.parse_plan_text(example, "PLAN_FORMAT.md")
    assert plan.context == 16384 and plan.groups.routed_experts.ranges[0].side == "gpu"
    m = synthetic_model("glm45-air")
    cfg = read_config(m)
    res = P.resolve(plan, m, cfg)
    assert res.units["blk.45.routed_experts"] == "gpu" and res.units["blk.39.routed_experts"] == "cpu"
    assert res.units["blk.3.attention"] == "cpu" and res.units["blk.46.routed_experts"] == "cpu"
    assert not res.warnings


def test_gguf_given_as_plan_and_mtp_override_on_a_model_without_nextn(models):
    with pytest.raises(P.PlanError, match=r"is a model file, not a plan"):
        P.load_plan(models["missing"])
    plan = P.load_plan(None, {"model": str(models["no_nextn"]), "mtp": True})
    f, cfg = open_model(plan.model_path)
    with pytest.raises(P.PlanError, match=r"^override 'mtp': MTP requested but .* has no nextn"):
        P.resolve(plan, f, cfg)
    res = P.resolve(P.apply_overrides(plan, {"mtp": False}), f, cfg)
    assert not res.mtp_enabled and res.mtp_embed_name is None


def test_tied_head_and_embedding_in_gguf_form_on_the_cpu(models):
    """No output.weight, everything on the CPU: the embedding is looked up row by row from the
    file's Q8_0 bytes and the head multiplies by the same bytes through the kernels; logits match
    the float-copy path (torch, use_kernels=False) within the kernels' activation rounding."""
    from runtime.linear import KernelLinear, QuantizedTable
    from runtime.loader import build_model

    f, cfg = open_model(models["tied"])
    got, want = [], []
    for use_kernels, out in ((True, got), (False, want)):
        m, rep = build_model(f, cfg, gpu_device="cpu", use_kernels=use_kernels, progress=False)
        if use_kernels:
            assert isinstance(m.embed.table, QuantizedTable) and isinstance(m.head.weight, KernelLinear)
            # the head's bytes are the embedding's: counted once, as the estimate counts them
            plan = P.load_plan(None, {"model": str(models["tied"]), "gpu": "cpu"})
            est = P.estimate_memory(P.resolve(plan, f, cfg), f, cfg, plan, gpu_device="cpu")
            assert rep.bytes_by_side["gpu"] + rep.bytes_by_side["cpu"] == est.gpu_weight_bytes + est.cpu_weight_bytes
        with torch.inference_mode():
            ids = torch.arange(1, 30)
            out.append(m.logits(m.forward(ids, m.new_cache(64, torch.float32), 0)).numpy())
            out.append(m.embed(torch.tensor([[3, 7], [0, cfg.n_vocab - 1]])))
    span = want[0].max() - want[0].min()
    assert np.median(np.abs(got[0] - want[0]).max(-1)) <= 0.02 * span
    assert torch.equal(got[1], want[1])  # the lookup itself is exact: the same decoder as the float copy


def test_draft_max_zero_means_no_drafts(tmp_path):
    """A plan's draft_max takes what --draft-max and the API take (0..16); 0 drafts nothing."""
    assert plan_from(tmp_path, "speculative:\n  draft_max: 0\n").speculative.draft_max == 0
