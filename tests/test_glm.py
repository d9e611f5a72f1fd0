"""GLM-4.5's architecture (``glm4_moe``: GQA with q/k/v biases, partial RoPE and per-head QK-norm over DeepSeek-V3's
MoE): a tiny random transformers checkpoint, loaded sharded, logit for logit and token for token; the presets'
counts (glm-4.5, glm-4.5-air, kimi-k2) against the published figures; the refused fields; compiled programs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import hf_reference, load_sharded, rel_error, unsharded_logits  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from moe_jax.checkpoints.weights import save_params  # noqa: E402
from moe_jax.config import PUBLISHED_PARAMS_B, get_model  # noqa: E402
from moe_jax.config.hf import from_hf, to_hf_dict  # noqa: E402
from moe_jax.config.presets import PUBLISHED_ACTIVE_WITHOUT_EMBEDDINGS_B  # noqa: E402
from moe_jax.costs.compile import Workload, compile_program  # noqa: E402
from moe_jax.errors import ConfigError  # noqa: E402
from moe_jax.model.layers import rope  # noqa: E402
from moe_jax.parallel.mesh import Strategy  # noqa: E402
from moe_jax.programs.sharded import abstract_model  # noqa: E402
from moe_jax.runtime.verify import exact_config  # noqa: E402

# Every GLM-4.5 feature on: q/k/v biases, RoPE on half of each head, QK-norm, one dense first layer, 8 experts in 4
# groups (top-2 from the best 2 groups), a shared expert, scaled weights. K=4 KV heads, so TP8 repeats each KV head
# (and its biases) for the two tp ranks that read it.
HF = dict(vocab_size=256, hidden_size=64, num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=4,
          head_dim=16, num_experts_per_tok=2, rms_norm_eps=1e-5, max_position_embeddings=128, n_routed_experts=8,
          n_shared_experts=1, moe_intermediate_size=32, intermediate_size=96, n_group=4, topk_group=2,
          first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, attention_bias=True,
          use_qk_norm=True, partial_rotary_factor=0.5, rope_theta=10000.0, num_nextn_predict_layers=1)
MESHES = ["EP2-TP2-DP2", "EP2-TP2-PP2", "TP8"]
GEN = 10


def _mtp_tensors(tensors: dict, layers: int) -> dict:
    """A multi-token-prediction layer as GLM-4.5's checkpoints store it (``model.layers.<L>.*``: a decoder layer, the
    embedding/hidden projection and its norms): the last layer's tensors renamed, plus the MTP-only ones."""
    last = f"model.layers.{layers - 1}."
    out = {f"model.layers.{layers}." + n[len(last):]: v for n, v in tensors.items() if n.startswith(last)}
    D = tensors["model.norm.weight"].shape[0]
    out.update({f"model.layers.{layers}.eh_proj.weight": np.ones((D, 2 * D), np.float32),
                **{f"model.layers.{layers}.{n}.weight": np.ones((D,), np.float32)
                   for n in ("enorm", "hnorm", "shared_head.norm")}})
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The checkpoint (with an MTP layer added, which loading must ignore), our config, tokens, transformers' logits
    and greedy tokens."""
    torch.manual_seed(0)
    model = transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(**HF)).float().eval()
    with torch.no_grad():           # norms at 1.0, zero biases and correction bias would hide a misplaced weight
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.uniform_(-0.2, 0.2)
    d = tmp_path_factory.mktemp("glm")
    tokens, logits, generated = hf_reference(model, d, 12, 6, GEN)
    tensors = load_file(d / "model.safetensors")
    save_file({**tensors, **_mtp_tensors(tensors, HF["num_hidden_layers"])}, d / "model.safetensors",
              metadata={"format": "pt"})
    return d, exact_config(from_hf(d)), tokens, logits, generated


def _load(checkpoint, strategy: Strategy, **changes):
    return load_sharded(*checkpoint[:2], strategy, **changes)


def test_config_import(checkpoint):
    d, cfg, *_ = checkpoint
    assert cfg.family == "glm4_moe" and cfg.attention == "gqa" and cfg.dtype == "float32"
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim) == (8, 4, 16, 8)
    assert cfg.attention_bias and cfg.qk_norm == "head" and cfg.norm_eps == 1e-5
    assert (cfg.router_score, cfg.router_groups, cfg.router_topk_groups, cfg.routed_scaling) == ("sigmoid", 4, 2, 2.5)
    assert (cfg.num_shared_experts, cfg.expert_ffn, cfg.first_dense_layers, cfg.dense_ffn) == (1, 32, 1, 96)
    assert "model.layers.5.eh_proj.weight" in load_file(d / "model.safetensors")     # the MTP layer is there


def test_partial_rope_rotates_the_first_dims_only():
    """RoPE on the first rotary_dim dims, their halves paired, frequencies over rotary_dim (transformers' partial
    rotary); the rest passes through unchanged."""
    x = jax.random.normal(jax.random.key(0), (1, 5, 2, 16))
    positions = jnp.arange(5)
    out = rope(x, positions, 1e4, rotary_dim=8)
    np.testing.assert_array_equal(out[..., 8:], x[..., 8:])
    np.testing.assert_allclose(out[..., :8], rope(x[..., :8], positions, 1e4), rtol=1e-6)
    np.testing.assert_allclose(rope(x, positions, 1e4, rotary_dim=16), rope(x, positions, 1e4), rtol=1e-6)


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


@pytest.mark.parametrize("mesh", ["DP8", "EP2-TP2-PP2", "EP4-TP2"])
def test_greedy_generation_matches_transformers(checkpoint, mesh):
    """Prefill then GEN decode steps from the KV cache: the same tokens as transformers' greedy search, on one
    device (DP8 splits nothing of a batch of 4) and on two sharded meshes, one pipelined."""
    _, _, tokens, _, generated = checkpoint
    sm, params = _load(checkpoint, Strategy.parse(mesh))
    np.testing.assert_array_equal(sm.generate(params, jnp.asarray(tokens[:, :6]), GEN), generated)


def test_prefill_and_decode_logits_match_transformers(checkpoint):
    _, _, tokens, ref, _ = checkpoint
    sm, params = _load(checkpoint, Strategy.parse("EP2-TP2-PP2"))
    B, S = tokens.shape
    out = sm.prefill(params, sm.put_tokens(jnp.asarray(tokens[:, :-1])), sm.init_cache(B, S + 2))
    assert rel_error(out.logits, ref[:, -2:-1]) < 1e-4
    step = sm.decode(params, sm.put_tokens(jnp.asarray(tokens[:, -1:])), jnp.int32(S - 1), out.cache)
    assert rel_error(step.logits, ref[:, -1:]) < 1e-4


def test_round_trip_and_transformers_reads_ours(checkpoint, tmp_path):
    """save_params writes GLM's names (biases included) and config; transformers loads them to the same logits."""
    _, cfg, tokens, ref, _ = checkpoint
    sm, params = _load(checkpoint, Strategy.parse("EP2-TP2-DP2"))
    save_params(params, cfg, tmp_path / "ours")
    assert from_hf(tmp_path / "ours").replace(name=cfg.name, capacity_factor=cfg.capacity_factor) == cfg
    assert "model.layers.1.self_attn.k_proj.bias" in load_file(tmp_path / "ours" / "model.safetensors")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").float().eval()
    with torch.no_grad():
        assert rel_error(theirs(torch.from_numpy(tokens)).logits.numpy(), ref) < 1e-5


def test_absent_fields_take_transformers_defaults():
    """A config.json without the optional fields builds what Glm4MoeConfig's defaults build: RoPE on half of each
    head, one dense first layer, one shared expert, no bias, no QK-norm, top-k weights renormalised."""
    data = {"model_type": "glm4_moe", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 3,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 16, "num_experts_per_tok": 2,
            "n_routed_experts": 8, "moe_intermediate_size": 32, "intermediate_size": 96, "rope_theta": 1e4}
    from moe_jax.config.hf import from_hf_dict

    cfg = from_hf_dict(data)
    theirs = transformers.Glm4MoeConfig(**{k: v for k, v in data.items() if k != "model_type"})
    assert cfg.rotary_dim == int(16 * theirs.rope_parameters["partial_rotary_factor"]) == 8
    assert (cfg.first_dense_layers, cfg.num_shared_experts) == (theirs.first_k_dense_replace, theirs.n_shared_experts)
    assert (cfg.attention_bias, cfg.qk_norm == "head", cfg.router_norm_topk) == (
        theirs.attention_bias, theirs.use_qk_norm, theirs.norm_topk_prob)


@pytest.mark.parametrize("change,message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope type 'yarn'"),
    ({"partial_rotary_factor": 0.01}, "partial_rotary_factor=0.01 gives 0 RoPE dims"),
    ({"partial_rotary_factor": 0.5625}, "partial_rotary_factor=0.5625 gives 9 RoPE dims"),
    ({"scoring_func": "softmax"}, "scoring_func='softmax' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"n_group": 3}, "router_groups=3 must divide num_experts=8"),
])
def test_unsupported_glm_fields_are_named(tmp_path, change, message):
    data = {**HF, "model_type": "glm4_moe", **change}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_hf(tmp_path)


@pytest.mark.parametrize("change,message", [
    (dict(rotary_dim=7), "rotary_dim=7 must be an even integer from 0 to head_dim=16"),
    (dict(rotary_dim=18), "rotary_dim=18 must be an even integer"),
    (dict(attention_bias=1), "attention_bias=1 must be True or False"),
])
def test_bad_glm_fields_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        get_model("glm-4.5-tiny").replace(**change)


def test_gqa_options_are_refused_for_mla():
    with pytest.raises(ConfigError, match="attention_bias=True / rotary_dim=0 are GQA options"):
        get_model("deepseek-v3-tiny").replace(attention_bias=True)


def test_to_hf_refuses_what_glm_cannot_express():
    with pytest.raises(ConfigError, match="router_score='softmax' has no glm4_moe form"):
        to_hf_dict(get_model("glm-4.5-tiny").replace(router_score="softmax", router_groups=1, router_topk_groups=1))
    with pytest.raises(ConfigError, match="qk_norm='full' has no glm4_moe form"):
        to_hf_dict(get_model("glm-4.5-tiny").replace(qk_norm="full"))


def _tables(cfg) -> int:
    """The input embedding and output head (what GLM-4.5's published active count leaves out)."""
    return cfg.embedding_params - cfg.d_model


def _mtp_layer(cfg) -> int:
    """One multi-token-prediction layer as GLM-4.5 releases it: a full MoE layer, the 2D x D projection of the
    embedding and hidden state, and three norms (its embedding and head are the model's)."""
    return cfg.layer_params + 2 * cfg.d_model ** 2 + 3 * cfg.d_model


@pytest.mark.parametrize("name", ["glm-4.5", "glm-4.5-air"])
def test_glm_preset_counts_match_published(name):
    """Totals within 1% of the published 355B / 106B (352.8B, 0.6% below; 106.85B, 0.8% above). The published
    figures leave out the multi-token-prediction layer the checkpoints carry (num_nextn_predict_layers 1; moe-jax
    does not model it): with it, Air would count 109.2B, 3% above its 106B. The published active figures (32B, 12B)
    leave out the embedding and output head (GLM-4.5 counts 33.6B with them, Air 13.4B, 5% and 12% above): compared
    like with like, 32.08B and 12.18B, within 2% as every preset's active count is (tests/test_config.py)."""
    cfg = get_model(name)
    total_b, active_b = PUBLISHED_ACTIVE_WITHOUT_EMBEDDINGS_B[name]
    assert cfg.params_total / 1e9 == pytest.approx(total_b, rel=0.01)
    assert (cfg.params_active - _tables(cfg)) / 1e9 == pytest.approx(active_b, rel=0.02)
    assert cfg.params_active / 1e9 > active_b * 1.04                         # the embeddings are what differs
    if name == "glm-4.5-air":
        assert (cfg.params_total + _mtp_layer(cfg)) / 1e9 > total_b * 1.02  # the MTP layer is not in the figure


def test_kimi_k2_counts_match_published():
    """kimi-k2, from its released config.json (no MTP layer): 1026.4B total against the published 1.04T, 1.3% below.
    The released config does not reach 1.04T: the gap (13.6B) is not the embeddings (2.3B) nor a dense layer; the
    published figure is held here to 1.5%, and the count's own value is pinned. Active 32.86B against 32.6B (0.8%)."""
    cfg = get_model("kimi-k2")
    total_b, active_b = PUBLISHED_PARAMS_B["kimi-k2"]
    assert cfg.params_total / 1e9 == pytest.approx(total_b, rel=0.015)
    assert round(cfg.params_total / 1e9, 1) == 1026.4
    assert cfg.params_active / 1e9 == pytest.approx(active_b, rel=0.01)
    assert cfg.kv_bytes_per_token == 61 * (512 + 64) * 2


def test_preset_parameters_match_the_model():
    """The counts on the config equal the Flax model's parameters (biases, partial RoPE, QK-norm, dense layers)."""
    tiny = get_model("glm-4.5-tiny")
    for cfg in (tiny, tiny.replace(attention_bias=False, qk_norm="none"), tiny.replace(first_dense_layers=0,
                dense_ffn=0), get_model("glm-4.5"), get_model("glm-4.5-air"), get_model("kimi-k2")):
        _, state = abstract_model(cfg)
        assert sum(x.size for x in jax.tree.leaves(state)) == cfg.params_total, cfg.name
    assert tiny.attention_bias_params == (8 + 2 * 4) * 16


def test_presets_match_their_configs():
    """The presets as their released config.json files read (the fields moe-jax takes from them)."""
    glm = get_model("glm-4.5")
    assert (glm.num_layers, glm.d_model, glm.num_heads, glm.num_kv_heads, glm.head_dim, glm.rotary_dim) == (
        92, 5120, 96, 8, 128, 64)
    assert (glm.num_experts, glm.top_k, glm.expert_ffn, glm.first_dense_layers, glm.dense_ffn) == (
        160, 8, 1536, 3, 12288)
    assert glm.qk_norm == "head" and glm.attention_bias and glm.routed_scaling == 2.5
    air = get_model("glm-4.5-air")
    assert (air.num_layers, air.d_model, air.num_experts, air.expert_ffn, air.dense_ffn, air.qk_norm) == (
        46, 4096, 128, 1408, 10944, "none")
    hf = to_hf_dict(glm)
    assert hf["rope_parameters"]["partial_rotary_factor"] == 0.5 and hf["architectures"] == ["Glm4MoeForCausalLM"]


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_tiny_preset_compiles_prefill_and_decode(backend):
    if backend == "gpu":
        from conftest import require_compiler

        require_compiler("gpu")
    program = compile_program(get_model("glm-4.5-tiny"), Strategy.parse("EP2-TP2-PP2"),
                              Workload(batch=8, prompt_len=16, gen_len=4), backend=backend,
                              gpu_target="h200" if backend == "gpu" else None)
    assert set(program.phases) == {"prefill", "decode"}
    for phase in program.phases.values():
        assert phase.fits and phase.hlo_text
        assert phase.input_bytes["kv_cache"] > 0


def test_flops_match_the_compiled_program():
    """The config's useful and attention FLOPs equal the compiled program's matmul FLOPs (biases and RoPE are not
    matmuls), as closely as the other presets' do (tests/test_cost.py)."""
    from moe_jax.costs.walk import analyze_cost

    report = analyze_cost(get_model("glm-4.5-tiny"), Strategy(dp=8), Workload(8, 32, 8), backend="cpu")
    assert report.analytic.prefill.compiled_over_analytic == pytest.approx(1.0, abs=0.02)
    assert report.analytic.decode.compiled_over_analytic == pytest.approx(1.0, abs=0.02)
