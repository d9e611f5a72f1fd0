"""Llama 4 text (``llama4_text``: chunked attention with NoPE full layers, L2 qk-norm on the RoPE layers, attention
temperature tuning on the NoPE ones, interleaved RoPE pairs with Llama 3 scaling, a shared expert beside top-1
sigmoid routing whose score multiplies the expert's input): a tiny random transformers checkpoint, loaded sharded,
logit for logit and token for token, with prompts longer than a chunk; Maverick's layout (MoE on every 2nd layer,
dense SwiGLU layers between) the same way; the presets' counts against the published figures; the refused fields
(MoE layers in another pattern than every k-th among them)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import (  # noqa: E402
    assert_estimate_matches_compiled,
    hf_reference,
    load_sharded,
    rel_error,
    unsharded_logits,
)
from safetensors.numpy import load_file  # noqa: E402

from moe_jax.checkpoints.weights import save_params  # noqa: E402
from moe_jax.config import get_model  # noqa: E402
from moe_jax.config.hf import from_hf, from_hf_dict, to_hf_dict  # noqa: E402
from moe_jax.errors import ConfigError  # noqa: E402
from moe_jax.model.attention import attend, causal_attend, causal_flops, window_mask  # noqa: E402
from moe_jax.parallel.mesh import Strategy  # noqa: E402
from moe_jax.programs.sharded import abstract_model  # noqa: E402
from moe_jax.runtime.verify import exact_config  # noqa: E402

# Every Llama 4 text feature on, at test size: chunks of 6 (prompts of 20 and generations to 16 positions cross
# several), NoPE on every 4th layer (layer 3: the PP2 stages' patterns differ, so a stage reads its windows as
# scanned data), temperature tuning with a floor of 3 and a strong scale so the query scale changes within the
# prompt, Llama 3 RoPE scaling whose low, medium and high frequency bands all hold some of the 8 frequencies,
# K=4 KV heads so TP8 repeats each, E=8 so EP8 works.
HF = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
          head_dim=16, num_experts_per_tok=1, num_local_experts=8, intermediate_size=32, intermediate_size_mlp=48,
          rms_norm_eps=1e-5, max_position_embeddings=256, attention_chunk_size=6, use_qk_norm=True,
          attn_temperature_tuning=True, floor_scale=3, attn_scale=0.5, tie_word_embeddings=False,
          rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
MESHES = ["EP2-TP2-DP2", "EP2-TP2-PP2", "TP8"]
GEN = 10
PROMPT = 6


def _model(config: dict):
    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**config, attn_implementation="eager"))
    model = model.float().eval()
    with torch.no_grad():           # norms at 1.0 would hide a misplaced weight; spread the router's choices
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "experts" in name or "router" in name:
                p.normal_(0, 0.1)
    return model


def _checkpoint(tmp_path_factory, config: dict, name: str):
    model = _model(config)
    d = tmp_path_factory.mktemp(name)
    tokens, logits, generated = hf_reference(model, d, 20, PROMPT, GEN)
    return d, exact_config(from_hf(d)), tokens, logits, generated


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The checkpoint, our config, tokens, transformers' logits and greedy tokens."""
    return _checkpoint(tmp_path_factory, HF, "llama4")


def _load(checkpoint, strategy: Strategy, **changes):
    return load_sharded(*checkpoint[:2], strategy, **changes)


def test_config_import(checkpoint):
    d, cfg, *_ = checkpoint
    assert cfg.family == "llama4_text" and cfg.attention == "gqa" and cfg.dtype == "float32"
    assert cfg.layer_windows == (-6, -6, -6, 0)
    assert (cfg.qk_norm, cfg.full_layers_nope, cfg.rope_interleave) == ("l2", True, True)
    assert (cfg.attn_temperature_tuning, cfg.attn_floor_scale, cfg.attn_scale) == (True, 3.0, 0.5)
    assert (cfg.rope_llama3_factor, cfg.rope_llama3_low_freq, cfg.rope_llama3_high_freq,
            cfg.rope_llama3_original_len) == (4.0, 1.0, 4.0, 16)
    assert (cfg.router_score, cfg.top_k, cfg.num_shared_experts, cfg.expert_ffn) == ("sigmoid_input", 1, 1, 32)
    names = load_file(d / "model.safetensors")
    assert names["model.layers.0.feed_forward.experts.gate_up_proj"].shape == (8, 64, 64)      # [E, D, 2F]


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
def test_every_dispatch_scales_the_experts_input(checkpoint, single, dispatch):
    """Capacity dispatch with a factor of E/k (nothing drops) and the dense reference equal dropless: each scales
    the rows it sends to an expert by the routing weight and sums the outputs unweighted."""
    _, cfg, tokens, ref, _ = checkpoint
    sm, params = _load(checkpoint, Strategy.parse("EP2-TP2-DP2"), dispatch=dispatch,
                       capacity_factor=cfg.num_experts / cfg.top_k)
    out = sm.forward(params, sm.put_tokens(jnp.asarray(tokens)))
    assert int(out.dropped.sum()) == 0
    assert rel_error(out.logits, single) < 1e-5
    assert rel_error(out.logits, ref) < 1e-4


@pytest.mark.parametrize("mesh", ["DP8", "EP2-TP2-PP2", "EP4-TP2"])
def test_greedy_generation_matches_transformers(checkpoint, mesh):
    """Prefill then GEN decode steps from the KV cache (positions up to 16, across chunks of 6, with the NoPE
    layer's query scale changing): the same tokens as transformers' greedy search, on one device and on two sharded
    meshes, one pipelined."""
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


def test_round_trip_and_transformers_reads_ours(checkpoint, tmp_path):
    """save_params writes Llama 4's fused expert tensors and shared expert, and its config; transformers loads them
    to the same logits."""
    _, cfg, tokens, ref, _ = checkpoint
    sm, params = _load(checkpoint, Strategy.parse("EP2-TP2-DP2"))
    save_params(params, cfg, tmp_path / "ours")
    assert from_hf(tmp_path / "ours").replace(name=cfg.name, capacity_factor=cfg.capacity_factor) == cfg
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    with torch.no_grad():
        assert rel_error(theirs.float().eval()(torch.from_numpy(tokens)).logits.numpy(), ref) < 1e-5


def test_multimodal_checkpoint_loads_its_text_model(tmp_path):
    """Llama 4 as released is multimodal (``Llama4ForConditionalGeneration``): its text tensors sit under
    ``language_model.`` beside the vision encoder's and projector's. Its config.json plans as the text model and its
    checkpoint loads as one: the same logits as transformers' multimodal model on text, the vision tensors set
    aside, not read and not refused."""
    from moe_jax.checkpoints.weights import Checkpoint, check_checkpoint

    torch.manual_seed(0)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    config = transformers.Llama4Config(text_config={**HF, "attn_implementation": "eager"}, vision_config=vision)
    model = transformers.Llama4ForConditionalGeneration(config).float().eval()
    model.save_pretrained(tmp_path)
    tokens = torch.randint(0, HF["vocab_size"], (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():    # its text model (transformers 5: the multimodal text-only output reads a missing field)
        ref = model.language_model(input_ids=tokens).logits.numpy()
    ckpt = Checkpoint(tmp_path)
    assert ckpt.other_modalities and all(n.startswith(("vision_model.", "multi_modal_projector."))
                                         for n in ckpt.other_modalities)
    assert "model.embed_tokens.weight" in ckpt.location and not any(n.startswith("language_model.")
                                                                     for n in ckpt.location)
    cfg = exact_config(from_hf(tmp_path))
    check_checkpoint(ckpt, cfg)
    sm, params = load_sharded(tmp_path, cfg, Strategy.parse("EP2-TP2-PP2"))
    assert rel_error(sm.forward(params, sm.put_tokens(jnp.asarray(tokens.numpy()))).logits, ref) < 1e-4


@pytest.mark.parametrize("stored,ours", [
    ({"language_model.model.norm.weight", "language_model.lm_head.weight", "vision_model.x"},
     {"model.norm.weight", "lm_head.weight"}),
    ({"model.language_model.norm.weight", "lm_head.weight", "model.vision_model.x", "model.multi_modal_projector.y"},
     {"model.norm.weight", "lm_head.weight"}),                    # the layout later transformers versions write
])
def test_multimodal_tensor_names(tmp_path, stored, ours):
    from safetensors.numpy import save_file

    from moe_jax.checkpoints.weights import Checkpoint

    save_file({name: np.ones(2, np.float32) for name in stored}, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    assert set(ckpt.location) == ours and len(ckpt.other_modalities) == len(stored) - len(ours)
    assert all(ckpt.read(name, (slice(None),)).tolist() == [1.0, 1.0] for name in ours)


def test_multimodal_name_collision_is_an_error(tmp_path):
    from safetensors.numpy import save_file

    from moe_jax.checkpoints.weights import Checkpoint
    from moe_jax.errors import MoeJaxError

    save_file({"language_model.lm_head.weight": np.ones(2, np.float32), "lm_head.weight": np.ones(2, np.float32)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(MoeJaxError, match="both would be the text model's 'lm_head.weight'"):
        Checkpoint(tmp_path)


def test_blockwise_chunks_equal_the_plain_form():
    """causal_attend with a static chunk (a window -C: blocks before a block's first query's chunk skipped) and a
    traced one (masked only), in one piece and in online-softmax chunks, equals the plain masked form; a query sees
    the keys of its own chunk up to itself."""
    B, S, H, K, Dh, C = 2, 96, 4, 2, 8, 20
    q, k, v = (jax.random.normal(jax.random.key(i), (B, S, n, Dh)) for i, n in enumerate((H, K, K)))
    pos = jnp.arange(S)
    mask = window_mask(pos[:, None], pos[None, :], -C)
    assert bool(mask[45, 40]) and not bool(mask[45, 39]) and not bool(mask[45, 46]) and bool(mask[40, 40])
    ref = attend(q, k, v, mask)
    for q_block, key_chunk in ((S, 2048), (16, 8), (32, 16)):
        got = causal_attend(q, k, v, q_block=q_block, key_chunk=key_chunk, window=-C)
        np.testing.assert_allclose(got, ref, atol=2e-5)
        traced = jax.jit(lambda w, q_block=q_block, key_chunk=key_chunk: causal_attend(
            q, k, v, q_block=q_block, key_chunk=key_chunk, window=w))(jnp.int32(-C))
        np.testing.assert_allclose(traced, ref, atol=2e-5)
    # 16-query blocks: the block from 48 starts in the chunk from 40, so it reads keys 40..63
    assert causal_flops(1, S, 1, 1, q_block=16, window=-C) == 4 * 16 * sum(
        min(S, s + 16) - (s - s % C) for s in range(0, S, 16))


def test_published_counts_and_config():
    """Scout's total within 1% of the published 109B, which counts the whole multimodal model: the text model
    (107.77B, as transformers' Llama4ForCausalLM counts it) plus the vision encoder and projector (0.455B with
    transformers' Llama4VisionConfig defaults, Scout's); the active 17B (17.17B: attention, router, shared and one
    routed expert in every layer, embedding and head)."""
    cfg = get_model("llama4-scout")
    vision = 455_178_240
    assert cfg.params_total == 107_769_861_120
    assert (cfg.params_total + vision) / 1e9 == pytest.approx(109.0, rel=0.01)
    assert cfg.params_active / 1e9 == pytest.approx(17.0, rel=0.015)
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_experts, cfg.top_k,
            cfg.expert_ffn, cfg.vocab_size, cfg.attention_chunk) == (48, 5120, 40, 8, 128, 16, 1, 8192, 202048, 8192)
    assert cfg.layer_windows == (-8192, -8192, -8192, 0) * 12
    hf = to_hf_dict(cfg)
    assert hf["architectures"] == ["Llama4ForCausalLM"] and hf["rope_parameters"]["rope_type"] == "llama3"
    assert from_hf_dict(hf, name=cfg.name).replace(moe_group_size=cfg.moe_group_size, dispatch=cfg.dispatch) == cfg
    # the multimodal config.json (model_type llama4) imports as its text model
    assert from_hf_dict({"model_type": "llama4", "text_config": hf}, name=cfg.name).replace(
        moe_group_size=cfg.moe_group_size, dispatch=cfg.dispatch) == cfg


def test_parameter_counts_match_the_model():
    """The counts on the config equal the Flax model's parameters (the L2 qk-norm has none)."""
    tiny = get_model("llama4-tiny")
    for cfg in (tiny, tiny.replace(qk_norm="none"), get_model("llama4-scout")):
        _, state = abstract_model(cfg)
        assert sum(x.size for x in jax.tree.leaves(state)) == cfg.params_total, cfg.name


def test_chunked_layers_count_less_attention_work():
    """Decode against a long cache: a chunked layer reads at most C keys, a full one all T."""
    cfg = get_model("llama4-scout")
    B, T = 8, 32768
    per_layer = 4 * B * cfg.num_heads * cfg.head_dim
    assert cfg.attention_flops(B, 1, T) == per_layer * (36 * 8192 + 12 * T)


@pytest.mark.parametrize("change,message", [
    ({"interleave_moe_layer_step": 3}, "interleave_moe_layer_step=3 is not supported with num_hidden_layers=4"),
    ({"moe_layers": [0, 2]}, "moe_layers=[0, 2] is not supported; supported: every k-th layer"),
    ({"moe_layers": [1, 2, 3], "interleave_moe_layer_step": 2}, "moe_layers=[1, 2, 3] is not supported"),
    ({"moe_layers": [0, 2], "interleave_moe_layer_step": 2}, "moe_layers=[0, 2] is not supported"),
    ({"moe_layers": []}, "moe_layers=[] is not supported"),
    ({"attention_chunk_size": None}, "attention_chunk_size=None: moe-jax models the NoPE layers"),
    ({"no_rope_layers": [1, 1, 1, 1], "layer_types": ["chunked_attention"] * 3 + ["full_attention"]},
     "no_rope_layers=[1, 1, 1, 1] / layer_types="),
    ({"num_experts_per_tok": 2}, "num_experts_per_tok=2 is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "rope type 'yarn'"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
])
def test_unsupported_llama4_fields_are_named(tmp_path, change, message):
    data = {**HF, "model_type": "llama4_text", **change}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        from_hf(tmp_path)


@pytest.mark.parametrize("change,message", [
    (dict(attention_chunk=0), "chunked_attention layers but attention_chunk=0"),
    (dict(attention_chunk=-2), "attention_chunk=-2 must be an integer >= 0"),
    (dict(full_layers_nope=False), "qk_norm='l2' / attn_temperature_tuning=True need full_layers_nope=True"),
    (dict(attn_floor_scale=0), "attn_floor_scale=0 must be a positive number"),
    (dict(routed_scaling=2.0), "router_score='sigmoid_input' takes no"),
    (dict(rope_llama3_original_len=0), "Llama 3 scaling needs"),
])
def test_bad_llama4_fields_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        get_model("llama4-tiny").replace(**change)


def test_to_hf_refuses_what_llama4_cannot_express():
    with pytest.raises(ConfigError, match="qk_norm='head' has no llama4_text form"):
        to_hf_dict(get_model("llama4-tiny").replace(qk_norm="head", full_layers_nope=True,
                                                     attn_temperature_tuning=False))


def test_tiny_preset_compiles_prefill_and_decode():
    from moe_jax.costs.compile import Workload, compile_program

    program = compile_program(get_model("llama4-tiny"), Strategy.parse("EP2-TP2-PP2"),
                              Workload(batch=8, prompt_len=16, gen_len=4), backend="cpu")
    assert set(program.phases) == {"prefill", "decode"}
    for phase in program.phases.values():
        assert phase.fits and phase.hlo_text


def test_flops_match_the_compiled_program():
    """The config's useful and attention FLOPs (chunked layers' chunks counted) equal the compiled program's matmul
    FLOPs, as closely as the other presets' do (tests/test_cost.py): prompts of 384 (three query blocks of 128) with
    chunks of 8, and decode against a cache of 392, where a chunked layer reads at most 8 positions."""
    from moe_jax.costs.compile import Workload
    from moe_jax.costs.walk import analyze_cost

    report = analyze_cost(get_model("llama4-tiny"), Strategy(dp=8), Workload(8, 384, 8), backend="cpu")
    assert report.analytic.prefill.compiled_over_analytic == pytest.approx(1.0, abs=0.02)
    assert report.analytic.decode.compiled_over_analytic == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("mesh", ["DP8", "EP2-PP2-DP2"])
def test_estimate_matches_the_compiled_program(mesh):
    """The planner's estimate (no compile) against the compiled program (prompts of 32 across chunks of 8, the PP2
    stages' window patterns differing): matmul FLOPs per device within 1%, weights and KV cache per device exactly."""
    from moe_jax.costs.compile import Workload
    from moe_jax.costs.walk import analyze_cost

    cfg, s, work = get_model("llama4-tiny"), Strategy.parse(mesh), Workload(8, 32, 8)
    assert_estimate_matches_compiled(cfg, s, work, analyze_cost(cfg, s, work, backend="cpu"))


def test_architecture_names_llama4_features():
    from moe_jax.reporting.architecture import architecture_dict

    a = architecture_dict(get_model("llama4-scout"))
    assert "36 of them chunked attention (chunks of 8192 keys), the rest full attention without RoPE" in a["layers"]
    assert "L2 QK-norm on the RoPE layers" in a["attention"] and "temperature tuning" in a["attention"]
    assert "Llama 3 scaling x16" in a["RoPE"] and "interleaved pairs" in a["RoPE"]
    assert "sigmoids scaling the chosen experts' input" in a["routing"] and "1 shared expert" in a["experts"]


# --- Llama 4 Maverick: MoE on every 2nd layer, dense SwiGLU layers (intermediate_size_mlp) between -----------------
# As Maverick's text config (interleave_moe_layer_step 2, no qk-norm, plain RoPE) at test size, 4 layers: dense 0
# (chunked), MoE 1 (chunked), dense 2 and MoE 3 NoPE full attention, so a dense layer and an MoE layer of each kind;
# the PP2 stages' patterns differ (a stage reads its windows as scanned data), the unpipelined stack unrolls both
# groups with static windows.
MAVERICK = {**HF, "interleave_moe_layer_step": 2, "intermediate_size_mlp": 48, "use_qk_norm": False,
            "no_rope_layers": [1, 1, 0, 0], "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


@pytest.fixture(scope="module")
def maverick(tmp_path_factory):
    """The Maverick-style checkpoint, our config, tokens, transformers' logits and greedy tokens."""
    return _checkpoint(tmp_path_factory, MAVERICK, "llama4_maverick")


@pytest.fixture(scope="module")
def maverick_single(maverick):
    return unsharded_logits(*maverick[:3])


def test_maverick_config_import(maverick):
    d, cfg, *_ = maverick
    assert (cfg.moe_interleave, cfg.dense_ffn, cfg.expert_ffn, cfg.qk_norm) == (2, 48, 32, "none")
    assert (cfg.moe_layers, cfg.stack_layers, cfg.dense_layers, cfg.moe_layer_indices) == (2, 4, 2, (1, 3))
    assert cfg.layer_windows == (-6, -6, 0, 0)
    names = load_file(d / "model.safetensors")
    assert names["model.layers.0.feed_forward.gate_proj.weight"].shape == (48, 64)               # dense [Fd, D]
    assert names["model.layers.1.feed_forward.experts.gate_up_proj"].shape == (8, 64, 64)        # MoE [E, D, 2F]
    assert "model.layers.2.feed_forward.router.weight" not in names
    _, state = abstract_model(cfg)
    assert sum(x.size for x in jax.tree.leaves(state)) == cfg.params_total == sum(v.size for v in names.values())


def test_maverick_unsharded_logits_match_transformers(maverick, maverick_single):
    assert rel_error(maverick_single, maverick[3]) < 1e-4


@pytest.mark.parametrize("mesh", ["EP2-TP2-PP2", "TP8"])
def test_maverick_sharded_equals_unsharded_and_transformers(maverick, maverick_single, mesh):
    _, _, tokens, ref, _ = maverick
    sm, params = _load(maverick, Strategy.parse(mesh))
    out = sm.forward(params, sm.put_tokens(jnp.asarray(tokens)))
    assert out.dropped.shape[0] == 2                     # one row per MoE layer
    assert rel_error(out.logits, maverick_single) < 1e-5
    assert rel_error(out.logits, ref) < 1e-4


@pytest.mark.parametrize("mesh", ["DP8", "EP2-TP2-PP2", "EP4-TP2"])
def test_maverick_greedy_generation_matches_transformers(maverick, mesh):
    """Prefill then GEN decode steps from the KV cache, each dense and MoE layer reading its own cache entry: the
    same tokens as transformers' greedy search on one device and on two sharded meshes, one pipelined."""
    _, _, tokens, _, generated = maverick
    sm, params = _load(maverick, Strategy.parse(mesh))
    np.testing.assert_array_equal(sm.generate(params, jnp.asarray(tokens[:, :PROMPT]), GEN), generated)


def test_maverick_round_trip_and_transformers_reads_ours(maverick, tmp_path):
    """save_params writes the dense layers' MLP and the MoE layers' experts under their own layer indices, and the
    config's interleave; transformers loads them to the same logits."""
    _, cfg, tokens, ref, _ = maverick
    sm, params = _load(maverick, Strategy.parse("EP2-TP2-PP2"))
    save_params(params, cfg, tmp_path / "ours")
    assert from_hf(tmp_path / "ours").replace(name=cfg.name, capacity_factor=cfg.capacity_factor) == cfg
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert theirs.config.moe_layers == [1, 3] and theirs.config.intermediate_size_mlp == 48
    with torch.no_grad():
        assert rel_error(theirs.float().eval()(torch.from_numpy(tokens)).logits.numpy(), ref) < 1e-5


def test_maverick_published_counts_and_config():
    """Maverick's total within 1% of the published 400B, which counts the whole multimodal model as Scout's does:
    the text model (400.71B: 24 MoE layers of 128 routed experts and a shared one, 24 dense layers of 16384, 48
    attention layers, embedding and head) plus the vision encoder and projector (0.455B, the same tower as
    Scout's); the text model alone is within 1% too. Active: 17.18B (attention in all 48 layers, the 24 dense
    FFNs, a shared and one routed expert in each of the 24 MoE layers, embedding and head) against the published
    17B, a figure rounded to the billion (1.1% below the count)."""
    cfg = get_model("llama4-maverick")
    vision = 455_178_240
    D, F, Fd, E = 5120, 8192, 16384, 128
    attention = 2 * D * 40 * 128 + 2 * D * 8 * 128 + D
    moe = attention + D + D * E + 3 * D * F + E * 3 * D * F
    dense = attention + D + 3 * D * Fd
    assert cfg.params_total == 24 * moe + 24 * dense + 2 * 202048 * D + D == 400_711_848_960
    assert (cfg.params_total + vision) / 1e9 == pytest.approx(400.0, rel=0.01)
    assert cfg.params_total / 1e9 == pytest.approx(400.0, rel=0.01)
    assert cfg.params_active == 24 * (moe - (E - 1) * 3 * D * F) + 24 * dense + 2 * 202048 * D + D
    assert cfg.params_active / 1e9 == pytest.approx(17.0, rel=0.015)
    assert (cfg.num_layers, cfg.moe_layers, cfg.dense_layers, cfg.num_experts, cfg.top_k, cfg.dense_ffn,
            cfg.moe_layer_indices[:3]) == (48, 24, 24, 128, 1, 16384, (1, 3, 5))
    assert cfg.layer_windows == (-8192, -8192, -8192, 0) * 12
    assert cfg.kv_bytes_per_token == 2 * 48 * 8 * 128 * 2
    hf = to_hf_dict(cfg)
    assert (hf["interleave_moe_layer_step"], hf["moe_layers"], hf["intermediate_size_mlp"]) == (
        2, list(range(1, 48, 2)), 16384)
    assert from_hf_dict(hf, name=cfg.name).replace(moe_group_size=cfg.moe_group_size, dispatch=cfg.dispatch) == cfg
    # moe_layers alone (transformers: it overrides the step) gives the same model
    alone = {k: v for k, v in hf.items() if k != "interleave_moe_layer_step"}
    assert from_hf_dict(alone, name=cfg.name).moe_interleave == 2


def test_maverick_parameter_counts_match_the_model():
    for name in ("llama4-maverick-tiny", "llama4-maverick"):
        cfg = get_model(name)
        _, state = abstract_model(cfg)
        assert sum(x.size for x in jax.tree.leaves(state)) == cfg.params_total, name
        assert sum(x.size for x in jax.tree.leaves(state["blocks"]["dense"])) == cfg.dense_layers * (
            cfg.dense_layer_params), name


@pytest.mark.parametrize("change,message", [
    (dict(moe_interleave=3), "moe_interleave=3 must divide num_layers=4"),
    (dict(moe_interleave=0), "moe_interleave=0 must be a positive integer"),
    (dict(dense_ffn=0), "moe_interleave=2 needs dense_ffn >= 1"),
])
def test_bad_interleave_fields_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        get_model("llama4-maverick-tiny").replace(**change)
    with pytest.raises(ConfigError, match="moe_interleave=2 with first_dense_layers=1 is not implemented"):
        get_model("deepseek-v3-tiny").replace(moe_interleave=2, num_layers=6)


def test_other_families_refuse_interleave_in_their_format():
    with pytest.raises(ConfigError, match="moe_interleave=2 has no qwen3_moe form"):
        to_hf_dict(get_model("qwen3-30b-a3b").replace(moe_interleave=2, dense_ffn=64))


@pytest.mark.parametrize("mesh", ["DP8", "EP2-PP2-DP2"])
def test_maverick_estimate_matches_the_compiled_program(mesh):
    """The estimate counts the dense layers between the MoE layers (attention and FFN) and the compiled program runs
    them: matmul FLOPs per device within 1%, weights and KV cache per device exactly, and the config's useful and
    attention FLOPs against the compiled program's as for Scout."""
    from moe_jax.costs.compile import Workload
    from moe_jax.costs.walk import analyze_cost

    cfg, s, work = get_model("llama4-maverick-tiny"), Strategy.parse(mesh), Workload(8, 32, 8)
    report = analyze_cost(cfg, s, work, backend="cpu")
    p = assert_estimate_matches_compiled(cfg, s, work, report)
    assert p.facts()["layers_per_stage"] == 4 // s.pp
    for phase in ("prefill", "decode"):
        if s.pp == 1:
            assert report.analytic.phases[phase].compiled_over_analytic == pytest.approx(1.0, abs=0.02), phase


def test_maverick_layers_are_numbered_as_the_model():
    """The layer-by-layer NaN search and the per-layer drop counts number Maverick's layers as the model does: dense
    0, MoE 1, dense 2, MoE 3 (a NaN in group 1's dense FFN is layer 2; group 0's experts, layer 1)."""
    from flax import nnx

    from moe_jax.model.transformer import Transformer
    from moe_jax.runtime.health import locate_nonfinite
    from moe_jax.runtime.run import _per_layer

    cfg = get_model("llama4-maverick-tiny").replace(dtype="float32")
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((2, 6), jnp.int32)
    assert locate_nonfinite(graphdef, state, tokens) is None
    for param, index, where in ((state["blocks"]["dense"]["ffn"]["w_down_df"], (1, 0), "layer 2 (dense ffn)"),
                                (state["blocks"]["moe"]["w_down_edf"], (0,), "layer 1 (moe)")):
        clean = param.get_value()
        param.set_value(clean.at[index].set(jnp.nan))
        assert locate_nonfinite(graphdef, state, tokens) == where
        param.set_value(clean)
    assert _per_layer(cfg, np.array([[1, 2], [3, 0]])) == [0, 3, 0, 3]
