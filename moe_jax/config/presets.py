"""The built-in model presets. Parameter counts are computed from their fields; the published
totals kept beside each preset exist only for the test that checks the computed counts."""

from __future__ import annotations

from moe_jax.config.model import ModelConfig
from moe_jax.errors import ConfigError, nearest

# Published totals (billions) are kept beside each preset only to test the computed counts.

_PRESETS: dict[str, ModelConfig] = {}
PUBLISHED_PARAMS_B: dict[str, tuple[float, float]] = {}
"""Published (total, active) parameter counts in billions, from docs/seed-model.md."""


def _preset(cfg: ModelConfig, total_b: float | None = None, active_b: float | None = None) -> None:
    _PRESETS[cfg.name] = cfg
    if total_b is not None:
        PUBLISHED_PARAMS_B[cfg.name] = (total_b, active_b)


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
