import jax
import pytest
from flax import nnx

from moe_jax.config import PUBLISHED_PARAMS_B, ModelConfig, get_model, preset_names
from moe_jax.errors import ConfigError
from moe_jax.programs.sharded import abstract_model

REQUIRED = ["seed-30b", "qwen3-30b-a3b", "qwen3-235b-a22b", "mixtral-8x7b", "mixtral-8x22b",
            "olmoe-1b-7b", "dbrx", "tiny"]


def test_required_presets_exist():
    assert set(REQUIRED) <= set(preset_names())


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_B))
def test_param_counts_match_published_within_2_percent(name):
    cfg = get_model(name)
    total_b, active_b = PUBLISHED_PARAMS_B[name]
    assert cfg.params_total / 1e9 == pytest.approx(total_b, rel=0.02)
    assert cfg.params_active / 1e9 == pytest.approx(active_b, rel=0.02)


def test_seed_30b_matches_reference_breakdown():
    cfg = get_model("seed-30b")
    assert round(cfg.params_total / 1e9, 2) == 29.93
    assert round(cfg.params_active / 1e9, 2) == 1.84
    assert cfg.attention_params - cfg.d_model == 41_943_040          # q, k, v, o (plus its norm)
    assert cfg.router_params == 4096 * 64
    assert cfg.expert_params == 3 * 4096 * 2304                       # 28.3M
    assert cfg.kv_bytes_per_token == 2 * 16 * 8 * 128 * 2             # 64 KiB
    assert cfg.params_total * cfg.dtype_bytes / 1e9 == pytest.approx(60, rel=0.01)


VARIANTS = {
    "tiny": {},
    "full_qk_norm": dict(qk_norm="full"),
    "no_qk_norm_layernorm": dict(qk_norm="none", norm="layer"),
    "shared_experts_tied": dict(num_shared_experts=2, tie_embeddings=True),
    "mha_clip": dict(num_kv_heads=8, clip_qkv=1.0, router_norm_topk=False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_counted_params_equal_the_models_parameters(variant):
    cfg = get_model("tiny").replace(**VARIANTS[variant])
    _, state = abstract_model(cfg)
    assert sum(x.size for x in jax.tree.leaves(state)) == cfg.params_total


def test_every_preset_builds_abstractly_with_the_counted_size():
    for name in REQUIRED:
        cfg = get_model(name)
        _, state = abstract_model(cfg)
        assert sum(x.size for x in jax.tree.leaves(state)) == cfg.params_total, name


def test_unknown_model_names_the_presets():
    with pytest.raises(ConfigError, match=r"unknown model 'mixtral-8x9b'.*did you mean 'mixtral-8x7b'.*seed-30b"):
        get_model("mixtral-8x9b")


@pytest.mark.parametrize("change,message", [
    (dict(num_experts=0), "num_experts=0 must be a positive integer"),
    (dict(top_k=9), "top_k=9 exceeds num_experts=8"),
    (dict(num_kv_heads=3), "num_kv_heads=3 must divide num_heads=8"),
    (dict(qk_norm="sometimes"), "qk_norm='sometimes'; valid: none, head, full"),
    (dict(dtype="int8"), "dtype='int8'; valid: bfloat16, float16, float32"),
    (dict(capacity_factor=0.0), "capacity_factor=0.0 must be > 0"),
])
def test_invalid_configs_are_named(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_model("tiny").replace(**change)


def test_replace_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="unknown ModelConfig field 'num_expert'.*did you mean 'num_experts'"):
        get_model("tiny").replace(num_expert=4)


def test_capacity_formula():
    cfg = get_model("seed-30b")                      # E=64, k=2, factor 1.25
    assert cfg.capacity(256) == 10                   # ceil(1.25 * 256 * 2 / 64)
    assert cfg.capacity(1) == 1                      # never below one slot
    assert cfg.replace(capacity_factor=1000.0).capacity(256) == 256   # never above the group
    assert isinstance(cfg, ModelConfig) and nnx is not None
