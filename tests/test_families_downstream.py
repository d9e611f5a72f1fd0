"""Everything downstream of the model follows each family (#20 item 6): the figures that count layers count the
layers that have what is counted (routed experts live in the MoE layers only; the dense first layers sit on every
pipeline stage), the planner's estimate equals the compiled program on the new families' tiny presets, and the
reports name each family's features from its config."""

import json

import jax.numpy as jnp
import pytest

from moe_jax.cli import main
from moe_jax.config import get_model
from moe_jax.costs.compile import Workload
from moe_jax.parallel.mesh import Strategy
from moe_jax.programs.placement import describe

WORK = Workload(8, 32, 8)
MESHES = ("DP8", "EP2-PP2-DP2")
FAMILIES = ("deepseek-v3-tiny", "glm-4.5-tiny")


def _bytes(placement, *names: str) -> int:
    """Per-device bytes of the parameters whose path ends in one of `names` (MoE and dense stacks alike)."""
    return sum(p.bytes_per_device for p in placement.params if p.path.split("/")[-1] in names)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mesh", ("EP2", "EP2-PP2", "EP8"))
def test_routed_expert_bytes_are_the_moe_layers_experts(name, mesh):
    """Dropless decode's weight floor splits the device's weights into routed experts (read as far as tokens
    route) and the rest: the routed part is what the placement holds of the MoE layers' experts, no dense layer
    counted (the old L/pp counted deepseek-v3-tiny's dense first layer as a fifth expert layer)."""
    from moe_jax.costs.routing import decode_floor_weights, routed_expert_bytes

    cfg, s = get_model(name).replace(dispatch="dropless"), Strategy.parse(mesh)
    p = describe(cfg, s, batch=8, cache_len=16)
    experts = _bytes(p, "w_gate_up_epfd", "w_down_edf")
    assert routed_expert_bytes(cfg, s) == experts
    read = decode_floor_weights(cfg, s, p.weight_bytes_per_device, 8)
    assert read.bytes == p.weight_bytes_per_device - experts + int(experts * read.touched_fraction)


def test_unread_kv_weights_count_the_dense_layers_on_every_stage():
    """tp=8 over glm-4.5-tiny's 4 KV heads: each rank holds all 4 heads' K/V projections and biases but projects
    one; the 3 it never reads are in every layer it holds: its stage's 2 MoE layers and the dense first layer
    (the old L/pp = 5 // 2 counted 2 layers)."""
    from moe_jax.costs.analytic import kv_weights_unread

    cfg, s = get_model("glm-4.5-tiny"), Strategy.parse("TP8-PP2")
    held = _bytes(describe(cfg, s, batch=8, cache_len=16), "wk_kkd", "wv_kkd", "bk_kk", "bv_kk")
    K = cfg.num_kv_heads
    assert kv_weights_unread(cfg, s) == held * (K - 1) // K == 3 * 3 * (2 * 16 * 64 + 2 * 16) * 2


@pytest.mark.parametrize("name", FAMILIES)
def test_layers_per_stage_are_the_stage_moe_layers_and_the_dense_ones(name):
    """pp splits the 4 MoE layers; the dense first layer is on both stages: 3 layers per stage (the old
    L // pp said 2)."""
    cfg = get_model(name)
    f = describe(cfg, Strategy.parse("EP2-PP2"), batch=8, cache_len=16).facts()
    assert f["layers_per_stage"] == cfg.moe_layers // 2 + cfg.first_dense_layers == 3


def test_nonfinite_layers_are_named_in_model_order():
    """The layer-by-layer search runs the dense first layer, then the MoE layers, numbering them as the model
    does: a NaN in the dense layer's FFN is layer 0 (the old loop never ran the dense stack, and found nothing),
    a NaN in the first MoE layer's experts is layer 1 (the old loop said layer 0)."""
    from flax import nnx

    from moe_jax.model.transformer import Transformer
    from moe_jax.runtime.health import locate_nonfinite

    cfg = get_model("deepseek-v3-tiny").replace(dtype="float32")
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((2, 6), jnp.int32)
    assert locate_nonfinite(graphdef, state, tokens) is None
    dense = state["dense_blocks"]["ffn"]["w_down_df"]
    clean = dense.get_value()
    dense.set_value(clean.at[0].set(jnp.nan))
    assert locate_nonfinite(graphdef, state, tokens) == "layer 0 (dense ffn)"
    dense.set_value(clean)
    experts = state["blocks"]["moe"]["w_gate_up_epfd"]
    experts.set_value(experts.get_value().at[0].set(jnp.nan))
    assert locate_nonfinite(graphdef, state, tokens) == "layer 1 (moe)"


@pytest.fixture(scope="module")
def compiled():
    """The new families' tiny presets compiled (XLA:CPU) on one unpipelined and one pipelined mesh."""
    from moe_jax.costs.walk import analyze_cost

    return {(name, mesh): analyze_cost(get_model(name), Strategy.parse(mesh), WORK, backend="cpu")
            for name in FAMILIES for mesh in MESHES}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mesh", MESHES)
def test_estimate_matches_the_compiled_program(compiled, name, mesh):
    """The planner's estimate (no compile) against the compiled program: matmul FLOPs per device (MLA's expanded
    prefill and absorbed decode, GLM's biased partial-RoPE GQA, the dense layers ahead of the pipeline) within
    1%, and the placement's weights and KV cache per device exactly; the compiled cache is kv_bytes_per_token
    per position of the device's sequences (unpipelined: all layers on each device)."""
    from conftest import assert_estimate_matches_compiled

    cfg, s = get_model(name), Strategy.parse(mesh)
    report = compiled[name, mesh]
    assert_estimate_matches_compiled(cfg, s, WORK, report)
    if s.pp == 1:
        per_device = WORK.batch // s.num_devices
        assert report.phases["decode"].memory.kv_cache == cfg.kv_bytes_per_token * per_device * WORK.cache_len


def test_architecture_names_deepseek_v3_features():
    """MLA with its latent rank and cache bytes per token, the dense first layers and their FFN width, the shared
    expert, sigmoid group routing with its scaling: all from the config."""
    from moe_jax.reporting.architecture import architecture_dict

    a = architecture_dict(get_model("deepseek-v3"))
    assert a["layers"].startswith("61: the first 3 dense (SwiGLU FFN 18432), then 58 MoE")
    assert "MLA" in a["attention"] and "KV latent rank 512" in a["attention"] and "query rank 1536" in a["attention"]
    assert a["KV cache"].startswith("70.3 kB per token (70,272 B: 1,152 B per layer = latent 512 + RoPE key 64")
    assert "1 shared expert" in a["experts"] and "256 routed, top-8, FFN 2048" in a["experts"]
    assert "sigmoid" in a["routing"] and "8 groups of 32, experts from the best 4" in a["routing"]
    assert "routed weights x 2.5" in a["routing"] and "YaRN x40" in a["RoPE"]
    fp8 = architecture_dict(get_model("deepseek-v3").replace(weight_dtype="float8_e4m3fn", kv_dtype="float8_e4m3fn"))
    assert "layer weights float8_e4m3fn (FP8" in fp8["dtypes"] and "KV cache float8_e4m3fn (1 B)" in fp8["dtypes"]
    assert fp8["KV cache"].startswith("35.1 kB per token")


def test_architecture_names_glm_features():
    """GQA heads and KV heads with the q/k/v biases, partial RoPE, the cache per token, the dense first layers."""
    from moe_jax.reporting.architecture import architecture_dict

    a = architecture_dict(get_model("glm-4.5"))
    assert a["attention"] == ("GQA: 96 query heads, 8 KV heads of 128 (12 query heads per KV head); q/k/v biases, "
                              "QK-norm (per head)")
    assert a["RoPE"].startswith("partial: the first 64 of 128 dims of each head")
    assert a["KV cache"].startswith("376.8 kB per token (376,832 B: 4,096 B per layer")
    assert a["layers"].startswith("92: the first 3 dense (SwiGLU FFN 12288), then 89 MoE")
    assert "group-limited" not in a["routing"] and "sigmoid" in a["routing"]


def test_describe_shows_the_architecture(capsys):
    main(["describe", "--model", "deepseek-v3", "--strategy", "EP32-TP8-PP2", "--batch", "256", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["architecture"]["layers"].startswith("61: the first 3 dense")
    assert data["facts"]["layers_per_stage"] == 58 // 2 + 3
    main(["describe", "--model", "glm-4.5", "--strategy", "EP16-TP8", "--batch", "256"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Architecture (glm4_moe)" in out and "partial: the first 64 of 128 dims" in out
    assert "pp | 89 MoE layers" in out


@pytest.mark.parametrize("name", FAMILIES)
def test_markdown_report_has_the_architecture_and_counts_moe_layers(compiled, name):
    """The seed-style report of a pipelined dense-first model: an Architecture section, and the layers check
    and tables count what pp splits (4 MoE layers / pp 2; the old check read 5 / 2 = 2.5 and failed)."""
    from moe_jax.costs.backends import resolve
    from moe_jax.hardware.presets import get_hardware
    from moe_jax.perf.analysis import analysis_of
    from moe_jax.reporting.markdown import markdown

    cfg, s, hw = get_model(name), Strategy.parse("EP2-PP2-DP2"), get_hardware("h200")
    a = analysis_of(cfg, s, hw, WORK, compiled[name, "EP2-PP2-DP2"], resolve(hw, "cpu"))
    check = next(c for c in a.checks if c.name == "layers_split_evenly")
    assert check.passed and check.detail.startswith("4 MoE layers / pp=2 = 2 per stage (+ the 1 dense first")
    text = markdown(a, chart=None)
    assert "## Architecture" in text and f"- **family**: {cfg.family}" in text
    assert "| layers per stage | 3 | 4 / pp 2 + 1 dense on every stage |" in text
    if cfg.attention == "mla":
        assert "KV latent rank 16" in text and "240 B per token" in text
    else:
        assert "4 KV heads of 16" in text and "q/k/v biases" in text
