"""The built-in model presets. Parameter counts are computed from their fields; the published
totals kept beside each preset exist only for the test that checks the computed counts."""

from __future__ import annotations

from moe_jax.config.model import ModelConfig
from moe_jax.errors import ConfigError, nearest

# Published totals (billions) are kept beside each preset only to test the computed counts.

_PRESETS: dict[str, ModelConfig] = {}
PUBLISHED_PARAMS_B: dict[str, tuple[float, float]] = {}
"""Published (total, active) parameter counts in billions, from docs/seed-model.md; comparable with `params_total`
and `params_active` (embedding and output head counted in both)."""
PUBLISHED_ACTIVE_WITHOUT_EMBEDDINGS_B: dict[str, tuple[float, float]] = {}
"""Published (total, active) parameter counts in billions whose active figure leaves out the input embedding and
the output head (GLM-4.5's): the total compares with `params_total`, the active with `params_active` less the two
tables (docs/seed-model.md)."""
PUBLISHED_ACTIVE_WITHOUT_INPUT_EMBEDDING_B: dict[str, tuple[float, float]] = {}
"""Published (total, active) parameter counts in billions whose active figure counts the output head but not the
input embedding (a lookup: gpt-oss's model card); the active compares with `params_active` less V × D."""


def _preset(cfg: ModelConfig, total_b: float | None = None, active_b: float | None = None, *,
            active_without_embeddings: bool = False, active_without_input_embedding: bool = False) -> None:
    _PRESETS[cfg.name] = cfg
    if total_b is not None:
        published = (PUBLISHED_ACTIVE_WITHOUT_EMBEDDINGS_B if active_without_embeddings
                     else PUBLISHED_ACTIVE_WITHOUT_INPUT_EMBEDDING_B if active_without_input_embedding
                     else PUBLISHED_PARAMS_B)
        published[cfg.name] = (total_b, active_b)


_preset(ModelConfig(
    name="seed-30b", family="seed", num_layers=16, d_model=4096, num_heads=32, num_kv_heads=8,
    head_dim=128, vocab_size=32000, num_experts=64, top_k=2, expert_ffn=2304,
    router_norm_topk=True, rope_theta=1e4, norm_eps=1e-5), 29.93, 1.84)
_preset(ModelConfig(
    name="qwen3-30b-a3b", family="qwen3_moe", num_layers=48, d_model=2048, num_heads=32, num_kv_heads=4,
    head_dim=128, vocab_size=151936, num_experts=128, top_k=8, expert_ffn=768,
    router_norm_topk=True, qk_norm="head", rope_theta=1e6, norm_eps=1e-6), 30.5, 3.3)
_preset(ModelConfig(
    name="qwen3-235b-a22b", family="qwen3_moe", num_layers=94, d_model=4096, num_heads=64, num_kv_heads=4,
    head_dim=128, vocab_size=151936, num_experts=128, top_k=8, expert_ffn=1536,
    router_norm_topk=True, qk_norm="head", rope_theta=1e6, norm_eps=1e-6), 235.0, 22.0)
_preset(ModelConfig(
    name="mixtral-8x7b", family="mixtral", num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8,
    head_dim=128, vocab_size=32000, num_experts=8, top_k=2, expert_ffn=14336,
    router_norm_topk=True, rope_theta=1e6, norm_eps=1e-5), 46.7, 12.9)
_preset(ModelConfig(
    name="mixtral-8x22b", family="mixtral", num_layers=56, d_model=6144, num_heads=48, num_kv_heads=8,
    head_dim=128, vocab_size=32000, num_experts=8, top_k=2, expert_ffn=16384,
    router_norm_topk=True, rope_theta=1e6, norm_eps=1e-5), 141.0, 39.0)
_preset(ModelConfig(
    name="olmoe-1b-7b", family="olmoe", num_layers=16, d_model=2048, num_heads=16, num_kv_heads=16,
    head_dim=128, vocab_size=50304, num_experts=64, top_k=8, expert_ffn=1024,
    router_norm_topk=False, qk_norm="full", rope_theta=1e4, norm_eps=1e-5), 6.9, 1.3)
_preset(ModelConfig(
    name="dbrx", family="dbrx", num_layers=40, d_model=6144, num_heads=48, num_kv_heads=8,
    head_dim=128, vocab_size=100352, num_experts=16, top_k=4, expert_ffn=10752,
    router_norm_topk=True, norm="layer", clip_qkv=8.0, rope_theta=5e5, norm_eps=1e-5), 132.0, 36.0)
# DeepSeek-V3 (HF deepseek-ai/DeepSeek-V3 config.json): MLA (q rank 1536, KV latent 512, RoPE key 64), 1 shared
# + 256 routed experts, top-8 of the best 4 of 8 groups by sigmoid score with the correction bias, routed weights
# x 2.5, the first 3 of 61 layers dense (FFN 18432), YaRN x40 over 4096. Published 671B total / 37B active,
# without the multi-token-prediction module (14B more in the released checkpoint; moe-jax does not model it).
_DEEPSEEK_V3 = dict(
    family="deepseek_v3", num_layers=61, d_model=7168, num_heads=128, num_kv_heads=128, head_dim=192,
    vocab_size=129280, num_experts=256, top_k=8, expert_ffn=2048, num_shared_experts=1, router_norm_topk=True,
    attention="mla", q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True,
    router_score="sigmoid", router_groups=8, router_topk_groups=4, routed_scaling=2.5,
    first_dense_layers=3, dense_ffn=18432, rope_theta=1e4, norm_eps=1e-6, rope_yarn_factor=40.0,
    rope_yarn_original_len=4096, rope_yarn_beta_fast=32.0, rope_yarn_beta_slow=1.0, rope_yarn_mscale=1.0,
    rope_yarn_mscale_all_dim=1.0)
_preset(ModelConfig(name="deepseek-v3", **_DEEPSEEK_V3), 671.0, 37.0)
# deepseek-v3-tiny: DeepSeek-V3's architecture (every feature on) at test size; E=8 in 4 groups so ep=8 works;
# widths multiples of 8 (XLA:GPU's deviceless compile finds no gemm tiling for a 10-wide value head).
_preset(ModelConfig(name="deepseek-v3-tiny", **{**_DEEPSEEK_V3, **dict(
    num_layers=5, d_model=64, num_heads=8, num_kv_heads=8, head_dim=24, vocab_size=256, num_experts=8, top_k=2,
    expert_ffn=32, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=16, router_groups=4,
    router_topk_groups=2, first_dense_layers=1, dense_ffn=96, rope_yarn_factor=4.0, rope_yarn_original_len=32,
    moe_group_size=16)}))
# Kimi-K2 (HF moonshotai/Kimi-K2-Instruct config.json; model_type kimi_k2, architecture DeepseekV3ForCausalLM):
# DeepSeek-V3's architecture with 64 heads, 384 routed experts (top-8, no group limit) + 1 shared, routed weights
# x 2.827, one dense first layer, vocabulary 163840, YaRN x32 over 4096 with beta_fast = beta_slow = 1, rope_theta
# 5e4. Published (Kimi K2 technical report) 1.04T total / 32.6B active; no multi-token-prediction layer is released.
# The config counts 1.026T (1.3% below the published total: tests/test_glm.py) and 32.9B active.
_preset(ModelConfig(name="kimi-k2", **{**_DEEPSEEK_V3, **dict(
    num_heads=64, num_kv_heads=64, vocab_size=163840, num_experts=384, router_groups=1, router_topk_groups=1,
    routed_scaling=2.827, first_dense_layers=1, rope_theta=5e4, rope_yarn_factor=32.0, rope_yarn_beta_fast=1.0,
    rope_yarn_beta_slow=1.0)}), 1040.0, 32.6)
# GLM-4.5 (HF zai-org/GLM-4.5 config.json, model_type glm4_moe): GQA 96/8 heads of 128 with q/k/v biases, per-head
# QK-norm and RoPE (theta 1e6) on the first half of each head (partial_rotary_factor 0.5); DeepSeek-V3's MoE:
# 160 routed experts (top-8 by sigmoid score with the correction bias, n_group 1) + 1 shared, routed weights x 2.5,
# the first 3 of 92 layers dense (FFN 12288). Published (GLM-4.5 model card and technical report) 355B total / 32B
# active: both leave out the multi-token-prediction layer (num_nextn_predict_layers 1, which moe-jax does not model),
# and the active figure leaves out the embedding and output head (tests/test_glm.py).
_GLM_45 = dict(
    family="glm4_moe", num_layers=92, d_model=5120, num_heads=96, num_kv_heads=8, head_dim=128, vocab_size=151552,
    num_experts=160, top_k=8, expert_ffn=1536, num_shared_experts=1, router_norm_topk=True, router_score="sigmoid",
    routed_scaling=2.5, first_dense_layers=3, dense_ffn=12288, qk_norm="head", attention_bias=True, rotary_dim=64,
    rope_theta=1e6, norm_eps=1e-5)
_preset(ModelConfig(name="glm-4.5", **_GLM_45), 355.0, 32.0, active_without_embeddings=True)
# GLM-4.5-Air (HF zai-org/GLM-4.5-Air config.json): the same architecture at 46 layers (the first dense, FFN 10944),
# width 4096, 128 routed experts of 1408 (top-8) + 1 shared, routed weights x 1.0, no QK-norm. Published 106B total /
# 12B active, counted as GLM-4.5's (no MTP layer; active without embedding and head).
_preset(ModelConfig(name="glm-4.5-air", **{**_GLM_45, **dict(
    num_layers=46, d_model=4096, num_experts=128, expert_ffn=1408, routed_scaling=1.0, first_dense_layers=1,
    dense_ffn=10944, qk_norm="none")}), 106.0, 12.0, active_without_embeddings=True)
# glm-4.5-tiny: GLM-4.5's architecture (every feature on) at test size; E=8 in 4 groups (top-2 of the best 2) so ep=8
# works, K=4 so tp=8 repeats the KV heads (and their biases).
_preset(ModelConfig(name="glm-4.5-tiny", **{**_GLM_45, **dict(
    num_layers=5, d_model=64, num_heads=8, num_kv_heads=4, head_dim=16, rotary_dim=8, vocab_size=256, num_experts=8,
    top_k=2, expert_ffn=32, router_groups=4, router_topk_groups=2, first_dense_layers=1, dense_ffn=96,
    moe_group_size=16)}))
# gpt-oss-120b (HF openai/gpt-oss-120b config.json, model_type gpt_oss): 36 layers of width 2880, GQA 64/8 heads of 64
# with q/k/v/o biases and a learned sink per head, layers alternating sliding-window (128 keys; even layers) and full
# attention, YaRN RoPE (theta 150000, factor 32 over 4096 positions, beta 32/1, truncate false); 128 experts of 2880
# (top-4: softmax over the 4 best router logits, router bias), expert biases, the clamped SwiGLU (alpha 1.702, limit
# 7), vocabulary 201088, untied head, RMSNorm eps 1e-5. Published (OpenAI gpt-oss model card) 116.8B total / 5.1B
# active, the active counting the unembedding but not the embedding (tests/test_gpt_oss.py). The released weights
# store the experts in MXFP4; moe-jax plans them in bf16 (or FP8 with weight_dtype).
_GPT_OSS = dict(
    family="gpt_oss", num_layers=36, d_model=2880, num_heads=64, num_kv_heads=8, head_dim=64, vocab_size=201088,
    num_experts=128, top_k=4, expert_ffn=2880, router_score="topk_softmax", router_bias=True, expert_bias=True,
    expert_activation="swiglu_clamped", swiglu_alpha=1.702, swiglu_limit=7.0, attention_bias=True,
    attention_out_bias=True, attention_sinks=True, sliding_window=128,
    layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(36)),
    rope_theta=150000.0, rope_yarn_factor=32.0, rope_yarn_original_len=4096, rope_yarn_beta_fast=32.0,
    rope_yarn_beta_slow=1.0, rope_yarn_truncate=False, norm_eps=1e-5)
_preset(ModelConfig(name="gpt-oss-120b", **_GPT_OSS), 116.8, 5.1, active_without_input_embedding=True)
# gpt-oss-20b (HF openai/gpt-oss-20b config.json): 24 layers and 32 experts, otherwise as gpt-oss-120b. Published
# 20.9B total / 3.6B active (counted as gpt-oss-120b's).
_preset(ModelConfig(name="gpt-oss-20b", **{**_GPT_OSS, **dict(
    num_layers=24, num_experts=32,
    layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(24)))}),
    20.9, 3.6, active_without_input_embedding=True)
# gpt-oss-tiny: gpt-oss's architecture (every feature on) at test size; window 8 so short prompts slide past it.
_preset(ModelConfig(name="gpt-oss-tiny", **{**_GPT_OSS, **dict(
    num_layers=4, d_model=64, num_heads=8, num_kv_heads=4, head_dim=16, vocab_size=256, num_experts=8, top_k=2,
    expert_ffn=32, sliding_window=8, rope_yarn_original_len=64, moe_group_size=16,
    layer_types=("sliding_attention", "full_attention") * 2)}))
# llama4-scout (Meta's Llama-4-Scout-17B-16E text_config, model_type llama4_text; transformers' Llama4TextConfig
# defaults are Scout's): 48 layers of width 5120, GQA 40/8 heads of 128, every layer MoE (interleave_moe_layer_step 1)
# with 16 experts of 8192 (top-1 sigmoid routing scaling the expert's input) and one shared expert of 8192; chunked
# attention (8192 keys) on 3 of every 4 layers with RoPE (theta 500000, interleaved pairs) and L2 qk-norm, NoPE full
# attention with temperature tuning on every 4th; vocabulary 202048, untied head, RMSNorm eps 1e-5. The checkpoint's
# RoPE has Llama 3 scaling (factor 16, low/high frequency factors 1, original 8192 positions), as public copies of
# its text_config give it (engines' test fixtures; the checkpoint itself is gated and was not read). Published
# 109B total / 17B active (Meta's model card) count the whole multimodal model: the vision encoder and projector
# (0.455B, transformers' Llama4VisionConfig defaults) are in the total; moe-jax models the text model
# (tests/test_llama4.py adds them back to compare).
_LLAMA4 = dict(
    family="llama4_text", num_layers=48, d_model=5120, num_heads=40, num_kv_heads=8, head_dim=128,
    vocab_size=202048, num_experts=16, top_k=1, expert_ffn=8192, num_shared_experts=1, router_score="sigmoid_input",
    router_norm_topk=False, rope_interleave=True, qk_norm="l2", attention_chunk=8192, full_layers_nope=True,
    layer_types=tuple("full_attention" if (i + 1) % 4 == 0 else "chunked_attention" for i in range(48)),
    attn_temperature_tuning=True, attn_floor_scale=8192.0, attn_scale=0.1, rope_theta=500000.0,
    rope_llama3_factor=16.0, rope_llama3_low_freq=1.0, rope_llama3_high_freq=1.0, rope_llama3_original_len=8192,
    norm_eps=1e-5)
_preset(ModelConfig(name="llama4-scout", **_LLAMA4))
# llama4-tiny: Llama 4's text architecture (every feature on) at test size; chunks of 8 so short prompts cross them.
_preset(ModelConfig(name="llama4-tiny", **{**_LLAMA4, **dict(
    num_layers=4, d_model=64, num_heads=8, num_kv_heads=4, head_dim=16, vocab_size=256, num_experts=8,
    expert_ffn=32, attention_chunk=8, attn_floor_scale=4.0, rope_llama3_original_len=64, moe_group_size=16,
    layer_types=("chunked_attention",) * 3 + ("full_attention",))}))
# llama4-maverick (Meta's Llama-4-Maverick-17B-128E text_config, model_type llama4_text): Scout's attention layers
# (48 of width 5120, GQA 40/8 heads of 128, chunked attention of 8192 keys with RoPE on 3 of every 4 layers, NoPE
# full attention with temperature tuning on every 4th) with 128 routed experts of 8192 (top-1 sigmoid routing
# scaling the expert's input) and one shared expert of 8192 on every 2nd layer only (interleave_moe_layer_step 2:
# moe_layers 1, 3, ..., 47); the 24 layers between have a dense SwiGLU FFN of 16384 (intermediate_size_mlp). Unlike
# Scout: no qk-norm (use_qk_norm false) and plain RoPE (rope_scaling null, theta 500000), as public copies of its
# text_config give them (engines' test fixtures; the checkpoint itself is gated and was not read); temperature
# tuning with transformers' defaults (floor 8192, scale 0.1). Published 400B total / 17B active (Meta's model
# card), the total counting the vision encoder and projector as Scout's does (tests/test_llama4.py).
_preset(ModelConfig(name="llama4-maverick", **{**_LLAMA4, **dict(
    num_experts=128, moe_interleave=2, dense_ffn=16384, qk_norm="none", rope_llama3_factor=1.0,
    rope_llama3_low_freq=1.0, rope_llama3_high_freq=4.0, rope_llama3_original_len=0)}))
# llama4-maverick-tiny: Maverick's architecture at test size: 4 layers (two groups of a dense then an MoE layer; the
# last layer NoPE, so PP2's stages' window patterns differ), chunks of 8, E=8 so EP8 works, K=4 so TP8 repeats each.
_preset(ModelConfig(name="llama4-maverick-tiny", **{**_LLAMA4, **dict(
    num_layers=4, d_model=64, num_heads=8, num_kv_heads=4, head_dim=16, vocab_size=256, num_experts=8,
    expert_ffn=32, moe_interleave=2, dense_ffn=48, qk_norm="none", attention_chunk=8, attn_floor_scale=4.0,
    rope_llama3_factor=1.0, rope_llama3_high_freq=4.0, rope_llama3_original_len=0, moe_group_size=16,
    layer_types=("chunked_attention",) * 3 + ("full_attention",))}))
# tiny: for tests. H=8 so tp=8 splits heads; K=4 so tp=8 exercises KV replication; E=8 so ep=8 works.
_preset(ModelConfig(
    name="tiny", family="tiny", num_layers=4, d_model=64, num_heads=8, num_kv_heads=4, head_dim=16,
    vocab_size=256, num_experts=8, top_k=2, expert_ffn=32, router_norm_topk=True, qk_norm="head",
    rope_theta=1e4, norm_eps=1e-6, moe_group_size=16))


def preset_names() -> list[str]:
    """Names of the built-in presets, in definition order."""
    return list(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """The built-in preset called `name` (case and surrounding spaces ignored).

    An unknown name is a clear error listing the presets.
    """
    try:
        return _PRESETS[name.strip().lower()]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}{nearest(name, _PRESETS)}; "
                          f"known presets: {', '.join(_PRESETS)}; or a Hugging Face checkpoint directory") from None
