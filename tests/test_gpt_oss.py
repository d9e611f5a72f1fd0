"""gpt-oss (``gpt_oss``: attention sinks, alternating sliding-window and full layers, biases on q/k/v/o, router and
experts, the clamped SwiGLU, top-k softmax after selection, YaRN RoPE): a tiny random transformers checkpoint,
loaded sharded, logit for logit and token for token, with prompts longer than the window; the presets' counts
against the published figures; the refused fields; the window in the attention work counted."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import hf_reference, load_sharded, rel_error, unsharded_logits  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from moe_jax.checkpoints.weights import save_params  # noqa: E402
from moe_jax.config import get_model  # noqa: E402
from moe_jax.config.hf import from_hf, from_hf_dict, to_hf_dict  # noqa: E402
from moe_jax.config.presets import PUBLISHED_ACTIVE_WITHOUT_INPUT_EMBEDDING_B  # noqa: E402
from moe_jax.errors import ConfigError  # noqa: E402
from moe_jax.model.attention import attend, causal_attend, causal_flops, window_mask  # noqa: E402
from moe_jax.parallel.mesh import Strategy  # noqa: E402
from moe_jax.programs.sharded import abstract_model  # noqa: E402
from moe_jax.runtime.verify import exact_config  # noqa: E402

# Every gpt-oss feature on, at test size: window 6 (prompts of 20 and generations to 16 positions slide past it),
# YaRN with truncate False over an original 16 positions, a clamp limit low enough that random activations reach it,
# K=4 KV heads so TP8 repeats each (and its bias), E=8 so EP8 works.
HF = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
          head_dim=16, num_experts_per_tok=2, num_local_experts=8, intermediate_size=32, rms_norm_eps=1e-5,
          max_position_embeddings=256, sliding_window=6, swiglu_limit=0.8, attention_bias=True,
          rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                           "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16})
MESHES = ["EP2-TP2-DP2", "EP2-TP2-PP2", "TP8"]
GEN = 10
PROMPT = 6


def _model(config: dict):
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**config, attn_implementation="eager"))
    model = model.float().eval()
    with torch.no_grad():           # norms at 1.0, zero biases and sinks would hide a misplaced weight
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias") or name.endswith("sinks"):
                p.uniform_(-0.5, 0.5)
            elif "experts" in name:
                p.normal_(0, 0.1)
    return model


def _checkpoint(tmp_path_factory, config: dict, name: str):
    model = _model(config)
    d = tmp_path_factory.mktemp(name)
    tokens, logits, generated = hf_reference(model, d, 20, PROMPT, GEN)
    return d, exact_config(from_hf(d)), tokens, logits, generated


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The checkpoint, our config, tokens, transformers' logits and greedy tokens (default layer_types)."""
    return _checkpoint(tmp_path_factory, HF, "gpt_oss")


def _load(checkpoint, strategy: Strategy, **changes):
    return load_sharded(*checkpoint[:2], strategy, **changes)


def test_config_import(checkpoint):
    d, cfg, *_ = checkpoint
    assert cfg.family == "gpt_oss" and cfg.attention == "gqa" and cfg.dtype == "float32"
    assert cfg.attention_bias and cfg.attention_out_bias and cfg.attention_sinks
    assert cfg.layer_windows == (6, 0, 6, 0)
    assert (cfg.rope_yarn_factor, cfg.rope_yarn_original_len, cfg.rope_yarn_truncate) == (4.0, 16, False)
    assert (cfg.router_score, cfg.router_bias, cfg.expert_bias, cfg.expert_activation) == (
        "topk_softmax", True, True, "swiglu_clamped")
    assert (cfg.swiglu_alpha, cfg.swiglu_limit) == (1.702, 0.8)
    names = load_file(d / "model.safetensors")
    assert names["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, 64)      # [E, D, 2F], interleaved


@pytest.fixture(scope="module")
def single(checkpoint):
    """The unsharded reference (`conftest.unsharded_logits`)."""
    return unsharded_logits(*checkpoint[:3])


def test_unsharded_logits_match_transformers(checkpoint, single):
    assert rel_error(single, checkpoint[3]) < 1e-4


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_equals_unsharded_and_transformers(checkpoint, single, mesh):
    _, _, tokens, ref, _ = checkpoint
    sm, params = _load(checkpoint, Strategy.parse(mesh))
    ours = sm.forward(params, sm.put_tokens(jnp.asarray(tokens))).logits
    assert rel_error(ours, single) < 1e-5
    assert rel_error(ours, ref) < 1e-4


@pytest.mark.parametrize("dispatch", ["capacity", "dense"])
def test_every_dispatch_applies_the_biases_and_clamp(checkpoint, single, dispatch):
    """Capacity dispatch with a factor of E/k (every slot an expert could need: nothing drops) and the dense
    reference equal dropless: each applies the expert biases and the clamped activation."""
    _, cfg, tokens, ref, _ = checkpoint
    sm, params = _load(checkpoint, Strategy.parse("EP2-TP2-DP2"), dispatch=dispatch,
                       capacity_factor=cfg.num_experts / cfg.top_k)
    out = sm.forward(params, sm.put_tokens(jnp.asarray(tokens)))
    assert int(out.dropped.sum()) == 0
    assert rel_error(out.logits, single) < 1e-5
    assert rel_error(out.logits, ref) < 1e-4


@pytest.mark.parametrize("mesh", ["DP8", "EP2-TP2-PP2", "EP4-TP2"])
def test_greedy_generation_matches_transformers(checkpoint, mesh):
    """Prefill then GEN decode steps from the KV cache (positions up to 16, past the window of 6): the same tokens
    as transformers' greedy search, on one device and on two sharded meshes, one pipelined."""
    _, _, tokens, _, generated = checkpoint
    sm, params = _load(checkpoint, Strategy.parse(mesh))
    np.testing.assert_array_equal(sm.generate(params, jnp.asarray(tokens[:, :PROMPT]), GEN), generated)


def test_prefill_and_decode_logits_match_transformers(checkpoint):
    _, _, tokens, ref, _ = checkpoint
    sm, params = _load(checkpoint, Strategy.parse("EP2-TP2-PP2"))
    B, S = tokens.shape
    out = sm.prefill(params, sm.put_tokens(jnp.asarray(tokens[:, :-1])), sm.init_cache(B, S + 2))
    assert rel_error(out.logits, ref[:, -2:-1]) < 1e-4
    step = sm.decode(params, sm.put_tokens(jnp.asarray(tokens[:, -1:])), jnp.int32(S - 1), out.cache)
    assert rel_error(step.logits, ref[:, -1:]) < 1e-4


@pytest.fixture(scope="module")
def irregular(tmp_path_factory):
    """A layer pattern whose pipeline stages differ (PP2: sliding+full, then full+sliding): a stage reads its windows
    as scanned data (masks only); unpipelined, the four layers are one unrolled group."""
    config = {**HF, "layer_types": ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]}
    return _checkpoint(tmp_path_factory, config, "gpt_oss_irregular")


@pytest.mark.parametrize("mesh", ["DP8", "EP2-TP2-PP2"])
def test_irregular_layer_pattern_matches_transformers(irregular, mesh):
    _, cfg, tokens, ref, generated = irregular
    assert cfg.layer_windows == (6, 0, 0, 6)
    sm, params = _load(irregular, Strategy.parse(mesh))
    assert rel_error(sm.forward(params, sm.put_tokens(jnp.asarray(tokens))).logits, ref) < 1e-4
    np.testing.assert_array_equal(sm.generate(params, jnp.asarray(tokens[:, :PROMPT]), GEN), generated)


def test_round_trip_and_transformers_reads_ours(checkpoint, tmp_path):
    """save_params writes gpt-oss's fused, interleaved expert tensors, biases and sinks, and its config;
    transformers loads them to the same logits."""
    _, cfg, tokens, ref, _ = checkpoint
    sm, params = _load(checkpoint, Strategy.parse("EP2-TP2-DP2"))
    save_params(params, cfg, tmp_path / "ours")
    assert from_hf(tmp_path / "ours").replace(name=cfg.name, capacity_factor=cfg.capacity_factor) == cfg
    assert "model.layers.1.self_attn.sinks" in load_file(tmp_path / "ours" / "model.safetensors")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    with torch.no_grad():
        assert rel_error(theirs.float().eval()(torch.from_numpy(tokens)).logits.numpy(), ref) < 1e-5


def test_blockwise_window_and_sinks_equal_the_plain_form():
    """causal_attend with a static window (blocks outside it skipped), a traced one (masked only) and sinks, in one
    piece and in online-softmax chunks, equals the plain masked form."""
    B, S, H, K, Dh, W = 2, 96, 4, 2, 8, 20
    q, k, v = (jax.random.normal(jax.random.key(i), (B, S, n, Dh)) for i, n in enumerate((H, K, K)))
    sinks = jax.random.normal(jax.random.key(5), (H,))
    pos = jnp.arange(S)
    ref = attend(q, k, v, window_mask(pos[:, None], pos[None, :], W), sinks=sinks)
    for q_block, key_chunk in ((S, 2048), (16, 8), (32, 16)):
        got = causal_attend(q, k, v, q_block=q_block, key_chunk=key_chunk, window=W, sinks=sinks)
        np.testing.assert_allclose(got, ref, atol=2e-5)
        traced = jax.jit(lambda w, q_block=q_block, key_chunk=key_chunk: causal_attend(
            q, k, v, q_block=q_block, key_chunk=key_chunk, window=w, sinks=sinks))(jnp.int32(W))
        np.testing.assert_allclose(traced, ref, atol=2e-5)
    full = attend(q, k, v, window_mask(pos[:, None], pos[None, :], 0))
    np.testing.assert_allclose(causal_attend(q, k, v, q_block=16, key_chunk=8), full, atol=2e-5)
    # a static window skips the keys before each block's first query's window: 16-query blocks from 32 on see
    # 16 + W - 1 = 35 keys each (without the window, the block from 80 sees 96)
    assert causal_flops(1, S, 1, 1, q_block=16, window=W) == 4 * 16 * (16 + 32 + 4 * 35)
    assert causal_flops(1, S, 1, 1, q_block=16) == 4 * 16 * sum(range(16, 97, 16))


def test_published_counts_and_configs():
    """Totals within 1% of the published 116.8B / 20.9B (116.83B, 20.91B); the published active figures (5.1B,
    3.6B) count the unembedding but not the embedding lookup (5.13B, 3.61B)."""
    for name, layers, experts in (("gpt-oss-120b", 36, 128), ("gpt-oss-20b", 24, 32)):
        cfg = get_model(name)
        total_b, active_b = PUBLISHED_ACTIVE_WITHOUT_INPUT_EMBEDDING_B[name]
        assert cfg.params_total / 1e9 == pytest.approx(total_b, rel=0.01)
        assert (cfg.params_active - cfg.vocab_size * cfg.d_model) / 1e9 == pytest.approx(active_b, rel=0.01)
        assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_experts,
                cfg.top_k, cfg.expert_ffn, cfg.vocab_size, cfg.sliding_window) == (
            layers, 2880, 64, 8, 64, experts, 4, 2880, 201088, 128)
        assert cfg.layer_windows == (128, 0) * (layers // 2)
        assert (cfg.rope_theta, cfg.rope_yarn_factor, cfg.rope_yarn_original_len) == (150000.0, 32.0, 4096)
        hf = to_hf_dict(cfg)
        assert hf["architectures"] == ["GptOssForCausalLM"] and hf["rope_parameters"]["truncate"] is False
        assert from_hf_dict(hf, name=name).replace(moe_group_size=cfg.moe_group_size, dispatch=cfg.dispatch) == cfg


def test_parameter_counts_match_the_model():
    """The counts on the config (sinks and every bias included) equal the Flax model's parameters."""
    tiny = get_model("gpt-oss-tiny")
    for cfg in (tiny, tiny.replace(attention_bias=False, attention_out_bias=False),
                tiny.replace(expert_bias=False, router_bias=False, attention_sinks=False),
                get_model("gpt-oss-20b"), get_model("gpt-oss-120b")):
        _, state = abstract_model(cfg)
        assert sum(x.size for x in jax.tree.leaves(state)) == cfg.params_total, cfg.name
    assert tiny.attention_bias_params == (8 + 2 * 4) * 16 + 64 + 8


def test_sliding_layers_count_less_attention_work():
    """Decode against a long cache: a sliding layer reads W keys, a full one all T; prefill skips the blocks
    before each block's window."""
    cfg = get_model("gpt-oss-120b")
    full = cfg.replace(layer_types=(), sliding_window=0)
    B, T = 8, 8192
    per_layer = 4 * B * cfg.num_heads * cfg.head_dim
    assert cfg.attention_flops(B, 1, T) == per_layer * 18 * (T + 128)
    assert full.attention_flops(B, 1, T) == per_layer * 36 * T
    from moe_jax.costs.analytic import analytic_flops
    from moe_jax.costs.compile import Workload

    work = Workload(batch=1, prompt_len=4096, gen_len=1)
    assert analytic_flops(cfg, work, "prefill").attention < 0.6 * analytic_flops(full, work, "prefill").attention


@pytest.mark.parametrize("change,message", [
    ({"quantization_config": {"quant_method": "mxfp4"}}, "quantization_config (quant_method='mxfp4') is not"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope type 'linear'"),
    ({"rope_parameters": {**HF["rope_parameters"], "attention_factor": 1.5}}, "rope attention_factor=1.5"),
    ({"layer_types": ["sliding_attention", "chunked_attention"] * 2}, "layer_types holds 'chunked_attention'"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types has 3 entries; need num_layers=4"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
])
def test_unsupported_gpt_oss_fields_are_named(tmp_path, change, message):
    data = {**HF, "model_type": "gpt_oss", **change}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_hf(tmp_path)


@pytest.mark.parametrize("change,message", [
    (dict(sliding_window=-1), "sliding_window=-1 must be an integer >= 0"),
    (dict(sliding_window=0), "sliding_attention layers but sliding_window=0"),
    (dict(expert_activation="gelu"), "expert_activation='gelu'; valid: swiglu, swiglu_clamped"),
    (dict(swiglu_limit=0), "swiglu_limit=0 must be a positive number"),
    (dict(attention_sinks=1), "attention_sinks=1 must be True or False"),
    (dict(router_score="sigmoid"), "router_bias applies to softmax routing"),
])
def test_bad_gpt_oss_fields_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        get_model("gpt-oss-tiny").replace(**change)


def test_to_hf_refuses_what_gpt_oss_cannot_express():
    with pytest.raises(ConfigError, match="qk_norm='head' has no gpt_oss form"):
        to_hf_dict(get_model("gpt-oss-tiny").replace(qk_norm="head"))


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_tiny_preset_compiles_prefill_and_decode(backend):
    from moe_jax.costs.compile import Workload, compile_program

    if backend == "gpu":
        from conftest import require_compiler

        require_compiler("gpu")
    program = compile_program(get_model("gpt-oss-tiny"), Strategy.parse("EP2-TP2-PP2"),
                              Workload(batch=8, prompt_len=16, gen_len=4), backend=backend,
                              gpu_target="h200" if backend == "gpu" else None)
    assert set(program.phases) == {"prefill", "decode"}
    for phase in program.phases.values():
        assert phase.fits and phase.hlo_text


def test_flops_match_the_compiled_program():
    """The config's useful and attention FLOPs (sliding layers' windows counted) equal the compiled program's matmul
    FLOPs, as closely as the other presets' do (tests/test_cost.py): prompts of 384 (three query blocks of 128) with
    a window of 8, and decode against a cache of 392, where a sliding layer reads 8 positions. The same model with
    every layer full computes more, in both phases."""
    from moe_jax.costs.compile import Workload
    from moe_jax.costs.walk import analyze_cost

    tiny = get_model("gpt-oss-tiny")
    compiled = {}
    for cfg in (tiny, tiny.replace(layer_types=(), sliding_window=0)):
        report = analyze_cost(cfg, Strategy(dp=8), Workload(8, 384, 8), backend="cpu")
        assert report.analytic.prefill.compiled_over_analytic == pytest.approx(1.0, abs=0.02)
        assert report.analytic.decode.compiled_over_analytic == pytest.approx(1.0, abs=0.02)
        compiled[cfg.sliding_window] = (report.analytic.prefill.compiled_matmul_total,
                                        report.analytic.decode.compiled_matmul_total)
    assert compiled[8][0] < 0.9 * compiled[0][0] and compiled[8][1] < 0.8 * compiled[0][1]
