"""DeepSeek-V3's architecture (MLA, YaRN, shared experts, sigmoid group routing, dense first layers): a tiny random
transformers checkpoint, loaded sharded, logit for logit; the preset's counts; the cache; compiled programs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import hf_reference, load_sharded, rel_error, unsharded_logits  # noqa: E402

from moe_jax.checkpoints.weights import save_params  # noqa: E402
from moe_jax.config import PUBLISHED_PARAMS_B, ModelConfig, get_model  # noqa: E402
from moe_jax.config.hf import from_hf  # noqa: E402
from moe_jax.costs.compile import Workload, compile_program  # noqa: E402
from moe_jax.errors import ConfigError  # noqa: E402
from moe_jax.model.transformer import cache_shape  # noqa: E402
from moe_jax.parallel.mesh import Strategy  # noqa: E402
from moe_jax.runtime.verify import exact_config  # noqa: E402

HF = dict(vocab_size=256, hidden_size=64, num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=8,
          num_experts_per_tok=2, rms_norm_eps=1e-6, max_position_embeddings=128, n_routed_experts=8,
          n_shared_experts=1, moe_intermediate_size=32, intermediate_size=96, q_lora_rank=24, kv_lora_rank=16,
          qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, n_group=4, topk_group=2, first_k_dense_replace=1,
          routed_scaling_factor=2.5,
          rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                           "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                           "mscale_all_dim": 1.0})
VARIANTS = {
    "v3": {},                                                        # every feature on, as the released model
    "full_rank_q_no_yarn": dict(q_lora_rank=None, first_k_dense_replace=0, num_hidden_layers=4,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
MESHES = ["EP2-TP2-DP2", "EP2-TP2-PP2", "TP2-PP2-DP2"]
GEN = 10


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**{**HF, **VARIANTS[request.param]}))
    model = model.float().eval()
    with torch.no_grad():           # norms at 1.0 and a zero correction bias would hide a misplaced weight
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.uniform_(-0.2, 0.2)
    d = tmp_path_factory.mktemp(request.param)
    tokens, logits, generated = hf_reference(model, d, 12, 6, GEN)
    return request.param, d, exact_config(from_hf(d)), tokens, logits, generated


def test_config_import(checkpoint):
    variant, _, cfg, *_ = checkpoint
    assert cfg.family == "deepseek_v3" and cfg.attention == "mla" and cfg.dtype == "float32"
    assert (cfg.head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank) == (20, 8, 10, 16)
    assert cfg.num_kv_heads == cfg.num_heads == 8 and cfg.rope_interleave
    assert (cfg.router_score, cfg.router_groups, cfg.router_topk_groups, cfg.routed_scaling) == ("sigmoid", 4, 2, 2.5)
    assert cfg.num_shared_experts == 1 and cfg.expert_ffn == 32 and cfg.router_norm_topk
    if variant == "v3":
        assert (cfg.q_lora_rank, cfg.first_dense_layers, cfg.dense_ffn, cfg.num_layers) == (24, 1, 96, 5)
        assert (cfg.rope_yarn_factor, cfg.rope_yarn_original_len, cfg.rope_yarn_mscale_all_dim) == (4.0, 32, 1.0)
    else:
        assert (cfg.q_lora_rank, cfg.first_dense_layers, cfg.rope_yarn_factor) == (0, 0, 1.0)


@pytest.fixture(scope="module")
def single(checkpoint):
    """The unsharded reference (`conftest.unsharded_logits`)."""
    return unsharded_logits(*checkpoint[1:4])


def test_unsharded_logits_match_transformers(checkpoint, single):
    *_, ref, _ = checkpoint
    assert rel_error(single, ref) < 1e-4


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_equals_unsharded_and_transformers(checkpoint, single, mesh):
    _, d, cfg, tokens, ref, _ = checkpoint
    sm, params = load_sharded(d, cfg, Strategy.parse(mesh))
    ours = sm.forward(params, sm.put_tokens(jnp.asarray(tokens))).logits
    assert rel_error(ours, single) < 1e-5
    assert rel_error(ours, ref) < 1e-4


@pytest.mark.parametrize("mesh", ["EP2-TP2-PP2", "EP4-TP2"])
def test_greedy_generation_matches_transformers(checkpoint, mesh):
    """Prefill (expanded latent) then GEN decode steps (absorbed form, reading the latent cache)."""
    _, d, cfg, tokens, _, generated = checkpoint
    sm, params = load_sharded(d, cfg, Strategy.parse(mesh))
    np.testing.assert_array_equal(sm.generate(params, jnp.asarray(tokens[:, :6]), GEN), generated)


def test_prefill_and_absorbed_decode_logits_match_transformers(checkpoint):
    _, d, cfg, tokens, ref, _ = checkpoint
    sm, params = load_sharded(d, cfg, Strategy.parse("EP2-TP2-PP2"))
    B, S = tokens.shape
    out = sm.prefill(params, sm.put_tokens(jnp.asarray(tokens[:, :-1])), sm.init_cache(B, S + 2))
    assert rel_error(out.logits, ref[:, -2:-1]) < 1e-4
    step = sm.decode(params, sm.put_tokens(jnp.asarray(tokens[:, -1:])), jnp.int32(S - 1), out.cache)
    assert rel_error(step.logits, ref[:, -1:]) < 1e-4


def test_mla_cache_holds_the_latent_and_rope_key(checkpoint):
    """The cache a deployment pays: R + Dr values per token and layer, not 2·H·Dh; the dense layers' own arrays."""
    _, _, cfg, *_ = checkpoint
    shapes = cache_shape(cfg, batch=3, max_len=7)
    per_layer = {name: int(np.prod(s.shape[1:])) for name, s in shapes.items()}
    assert per_layer["k"] == 3 * 7 * cfg.kv_lora_rank and per_layer["v"] == 3 * 7 * cfg.qk_rope_head_dim
    assert shapes["k"].shape[0] == cfg.num_layers - cfg.first_dense_layers
    if cfg.first_dense_layers:
        assert shapes["dense_k"].shape == (cfg.first_dense_layers, *shapes["k"].shape[1:])
        assert shapes["dense_v"].shape == (cfg.first_dense_layers, *shapes["v"].shape[1:])
    else:
        assert set(shapes) == {"k", "v"}
    total = sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in shapes.values())
    assert total == 3 * 7 * cfg.kv_bytes_per_token == 3 * 7 * cfg.num_layers * (16 + 8) * 4


def test_round_trip_and_transformers_reads_ours(checkpoint, tmp_path):
    _, d, cfg, tokens, ref, _ = checkpoint
    sm, params = load_sharded(d, cfg, Strategy.parse("EP2-TP2-DP2"))
    save_params(params, cfg, tmp_path / "ours")
    assert from_hf(tmp_path / "ours").replace(name=cfg.name, capacity_factor=cfg.capacity_factor) == cfg
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").float().eval()
    with torch.no_grad():
        assert rel_error(theirs(torch.from_numpy(tokens)).logits.numpy(), ref) < 1e-5


def test_preset_counts_match_published():
    """deepseek-v3: 671B total within 1% (671.03B); active within 2%, the tolerance every preset's published
    figures are held to (tests/test_config.py): the published 37B is rounded, the count is 37.55B (1.5% above),
    embedding and output head included as for every preset."""
    cfg = get_model("deepseek-v3")
    total_b, active_b = PUBLISHED_PARAMS_B["deepseek-v3"]
    assert cfg.params_total / 1e9 == pytest.approx(total_b, rel=0.01)
    assert cfg.params_active / 1e9 == pytest.approx(active_b, rel=0.02)
    assert cfg.kv_bytes_per_token == 61 * (512 + 64) * 2                # 70 KB: the latent and the RoPE key, bf16


def test_preset_parameters_match_the_model():
    """The counts on the config equal the Flax model's parameters (MLA, shared experts, bias, dense layers)."""
    from moe_jax.programs.sharded import abstract_model

    for cfg in (get_model("deepseek-v3-tiny"), get_model("deepseek-v3-tiny").replace(q_lora_rank=0),
                get_model("deepseek-v3")):
        _, state = abstract_model(cfg)
        assert sum(x.size for x in jax.tree.leaves(state)) == cfg.params_total, cfg


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_tiny_preset_compiles_prefill_and_decode(backend):
    if backend == "gpu":
        from conftest import require_compiler

        require_compiler("gpu")
    cfg = get_model("deepseek-v3-tiny")
    program = compile_program(cfg, Strategy.parse("EP2-TP2-PP2"), Workload(batch=8, prompt_len=16, gen_len=4),
                              backend=backend, gpu_target="h200" if backend == "gpu" else None)
    assert set(program.phases) == {"prefill", "decode"}
    for phase in program.phases.values():
        assert phase.fits and phase.hlo_text
        assert phase.input_bytes["kv_cache"] > 0


def test_tiny_preset_compiles_for_tpu():
    from conftest import run_tpu_script

    lines = run_tpu_script("""
from moe_jax.config import get_model
from moe_jax.costs.compile import Workload, compile_program
from moe_jax.parallel.mesh import Strategy
p = compile_program(get_model("deepseek-v3-tiny"), Strategy.parse("EP2-TP2-PP2"), Workload(8, 16, 4), backend="tpu",
                    topology="v5p:2x2x2")
print(*sorted(name for name, phase in p.phases.items() if phase.fits and phase.hlo_text))
""")
    assert lines[-1] == "decode prefill"


@pytest.mark.parametrize("change,message", [
    ({"scoring_func": "softmax"}, "scoring_func='softmax' is not supported"),
    ({"topk_method": "greedy"}, "topk_method='greedy' is not supported"),
    ({"num_key_value_heads": 4}, "num_key_value_heads=4 is not supported"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope type 'linear'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32,
                       "attention_factor": 1.2}}, "attention_factor=1.2 is not supported"),
    ({"moe_layer_freq": 2}, "moe_layer_freq=2 is not supported"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"n_group": 3}, "router_groups=3 must divide num_experts=8"),
])
def test_unsupported_deepseek_fields_are_named(tmp_path, change, message):
    data = {**{k: v for k, v in HF.items() if k != "rope_parameters"}, "model_type": "deepseek_v3",
            "rope_theta": 1e4, **change}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_hf(tmp_path)


@pytest.mark.parametrize("change,message", [
    (dict(attention="latent"), "attention='latent'; valid: gqa, mla"),
    (dict(router_score="tanh"), "router_score='tanh'; valid: softmax, sigmoid"),
    (dict(kv_lora_rank=0), "kv_lora_rank=0 must be >= 1 with attention='mla'"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim=7 must be even"),
    (dict(num_kv_heads=4), "num_kv_heads=4 must equal num_heads=8"),
    (dict(router_topk_groups=5), "router_topk_groups=5"),
    (dict(first_dense_layers=5), "first_dense_layers=5 must be below num_layers=5"),
    (dict(dense_ffn=0), "first_dense_layers=1 and dense_ffn=0 go together"),
    (dict(routed_scaling=0.0), "routed_scaling=0.0 must be a positive number"),
    (dict(attention="gqa"), "apply to attention='mla' only"),
])
def test_bad_deepseek_fields_are_named(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_model("deepseek-v3-tiny").replace(**change)


def test_yarn_on_gqa_needs_an_original_length():
    """YaRN applies to GQA too since gpt-oss (tests/test_gpt_oss.py: parity with transformers); an incomplete YaRN
    configuration is still refused, naming the fields."""
    gqa = dict(name="x", family="tiny", num_layers=2, d_model=64, num_heads=8, num_kv_heads=4, head_dim=16,
               vocab_size=256, num_experts=8, top_k=2, expert_ffn=32, rope_yarn_factor=4.0)
    assert ModelConfig(**gqa, rope_yarn_original_len=32).rope_yarn_factor == 4.0
    with pytest.raises(ConfigError, match="rope_yarn_factor=4.0, rope_yarn_original_len=0: YaRN needs"):
        ModelConfig(**gqa)


def test_mla_flops_match_the_compiled_program():
    """MLA's useful and attention FLOPs from the config (prefill expanded, decode absorbed; dense layers included)
    equal the compiled program's matmul FLOPs, as closely as the GQA presets' do (tests/test_cost.py)."""
    from moe_jax.costs.walk import analyze_cost

    report = analyze_cost(get_model("deepseek-v3-tiny"), Strategy(dp=8), Workload(8, 32, 8), backend="cpu")
    assert report.analytic.prefill.compiled_over_analytic == pytest.approx(1.0, abs=0.02)
    assert report.analytic.decode.compiled_over_analytic == pytest.approx(1.0, abs=0.02)


def test_blockwise_mla_prefill_equals_absorbed_decode_across_query_blocks():
    """MLA's prefill attends blockwise (`causal_attend`: three query blocks at 300 positions, no S x S scores):
    the last position's logits equal a prefill of the 299 before it and one absorbed decode step, which reads
    the cached latents without the blockwise path."""
    from flax import nnx

    from moe_jax.model.attention import MIN_QUERY_BLOCK
    from moe_jax.model.transformer import Transformer

    cfg = get_model("deepseek-v3-tiny").replace(dtype="float32", dispatch="dropless")   # no capacity drops
    S = 2 * MIN_QUERY_BLOCK + 44
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, S), 0, cfg.vocab_size)
    whole = model.prefill(tokens, jax.tree.map(jnp.zeros_like, cache_shape(cfg, 2, S)))
    head = model.prefill(tokens[:, :-1], jax.tree.map(jnp.zeros_like, cache_shape(cfg, 2, S)))
    step = model.decode(tokens[:, -1:], jnp.int32(S - 1), head.cache)
    np.testing.assert_allclose(np.asarray(whole.logits), np.asarray(step.logits), rtol=2e-4, atol=2e-4)
