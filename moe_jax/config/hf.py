"""Hugging Face ``config.json`` → `ModelConfig`, for the families the model implements exactly.

Supported ``model_type``: ``qwen3_moe``, ``mixtral``, ``olmoe``, ``deepseek_v3`` (multi-head latent
attention with YaRN, shared experts, sigmoid group routing, dense first layers). A field whose value
the model does not implement (sliding windows, RoPE scaling other than DeepSeek-V3's YaRN, attention
bias, dense layers between MoE layers, ...) is an error naming the field, never an approximation.
"""

from __future__ import annotations

from pathlib import Path

from moe_jax.config.model import ModelConfig
from moe_jax.errors import ConfigError
from moe_jax.names import DTYPES, Dispatch

FAMILIES = ("qwen3_moe", "mixtral", "olmoe", "deepseek_v3")



def _dtype(data: dict) -> str:
    """The checkpoint's dtype (``dtype`` or the older ``torch_dtype``); bfloat16 when absent or not a model dtype."""
    name = str(data.get("dtype") or data.get("torch_dtype") or "bfloat16")
    return name if name in DTYPES else "bfloat16"

def config_path(path: str | Path) -> Path:
    """The config.json of a checkpoint directory (or the file itself)."""
    p = Path(path)
    return p / "config.json" if p.is_dir() else p


def _unsupported(data: dict, field: str, allowed, why: str) -> None:
    value = data.get(field, allowed[0] if isinstance(allowed, tuple) else allowed)
    ok = value in allowed if isinstance(allowed, tuple) else value == allowed
    if not ok:
        raise ConfigError(f"{data.get('model_type')}: {field}={value!r} is not supported ({why}); "
                          f"supported: {allowed!r}")


def _rope_theta(data: dict) -> float:
    """The RoPE base of a family that takes plain RoPE only."""
    kind, rope = _rope_kind(data)
    if kind != "default":
        raise ConfigError(f"{data.get('model_type')}: rope type {kind!r} (rope_scaling/rope_parameters) is not "
                          "supported; supported: plain RoPE ('default')")
    return _theta(data, rope)


def _theta(data: dict, rope: dict) -> float:
    theta = rope.get("rope_theta", data.get("rope_theta"))
    if theta is None:
        raise ConfigError(f"{data.get('model_type')}: config has no rope_theta")
    return float(theta)


def _rope_kind(data: dict) -> tuple[str, dict]:
    """(RoPE type, its parameters) from ``rope_parameters`` or the older ``rope_scaling``."""
    params = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError(f"{data.get('model_type')}: rope_parameters and rope_scaling must be JSON objects")
    merged = {**scaling, **params}
    return str(merged.get("rope_type") or merged.get("type") or "default"), merged


def _deepseek_v3(data: dict, common: dict) -> ModelConfig:
    """DeepSeek-V3 (and its architecture's configs): MLA, shared experts, sigmoid group routing, dense first layers."""
    family = "deepseek_v3"
    _unsupported(data, "scoring_func", ("sigmoid",), "DeepSeek-V3 routes by sigmoid scores")
    _unsupported(data, "topk_method", ("noaux_tc", None), "group-limited top-k with the score-correction bias")
    _unsupported(data, "moe_layer_freq", (1, None), "every layer after the dense ones is an MoE layer")
    H = data["num_attention_heads"]
    _unsupported(data, "num_key_value_heads", (H, None), "MLA expands the latent into every query head's keys")
    kind, rope = _rope_kind(data)
    yarn = {}
    if kind == "yarn":
        if rope.get("attention_factor") is not None:
            raise ConfigError(f"{family}: rope attention_factor={rope['attention_factor']!r} is not supported; "
                              "supported: derived from factor, mscale and mscale_all_dim")
        if rope.get("truncate", True) is not True:
            raise ConfigError(f"{family}: rope truncate={rope['truncate']!r} is not supported; supported: True")
        yarn = dict(rope_yarn_factor=float(rope["factor"]),
                    rope_yarn_original_len=int(rope["original_max_position_embeddings"]),
                    rope_yarn_beta_fast=float(rope.get("beta_fast") or 32),
                    rope_yarn_beta_slow=float(rope.get("beta_slow") or 1),
                    rope_yarn_mscale=float(rope.get("mscale") or 0), rope_yarn_mscale_all_dim=float(
                        rope.get("mscale_all_dim") or 0))
    elif kind != "default":
        raise ConfigError(f"{family}: rope type {kind!r} (rope_scaling/rope_parameters) is not supported; "
                          "supported: 'default', 'yarn'")
    theta = _theta(data, rope)
    dense = int(data.get("first_k_dense_replace") or 0)
    groups = data.get("n_group") or 1
    return ModelConfig(
        **{**common, "rope_theta": float(theta), "num_kv_heads": H,
           "head_dim": data["qk_nope_head_dim"] + data["qk_rope_head_dim"]},
        attention="mla", q_lora_rank=int(data.get("q_lora_rank") or 0), kv_lora_rank=data["kv_lora_rank"],
        qk_rope_head_dim=data["qk_rope_head_dim"], v_head_dim=data["v_head_dim"],
        rope_interleave=bool(data.get("rope_interleave", True)), **yarn,
        num_experts=data["n_routed_experts"], expert_ffn=data["moe_intermediate_size"],
        num_shared_experts=int(data.get("n_shared_experts") or 0),
        router_norm_topk=bool(data.get("norm_topk_prob", True)), router_score="sigmoid",
        router_groups=groups, router_topk_groups=data.get("topk_group") or groups,
        routed_scaling=float(data.get("routed_scaling_factor", 1.0)),
        first_dense_layers=dense, dense_ffn=data["intermediate_size"] if dense else 0)


def _experts(data: dict) -> int:
    """Routed experts: ``num_experts`` or ``num_local_experts`` (transformers writes either)."""
    value = data.get("num_experts", data.get("num_local_experts"))
    if value is None:
        raise KeyError("num_experts")
    return value


def from_hf_dict(data: dict, name: str = "hf-model") -> ModelConfig:
    """`ModelConfig` from the parsed config.json.

    The model runs the way its reference implementation does: every routed token-expert assignment
    is computed (dropless dispatch), so its tokens equal transformers'. Capacity dispatch, which
    drops assignments past each expert's slots, is a choice (``--dispatch capacity``)."""
    family = data.get("model_type")
    if family not in FAMILIES:
        raise ConfigError(f"model_type {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    _unsupported(data, "hidden_act", ("silu",), "experts are SwiGLU")
    _unsupported(data, "attention_bias", (False, None), "projections have no bias")
    _unsupported(data, "tie_word_embeddings", (False, True, None), "")
    H = data["num_attention_heads"]
    D = data["hidden_size"]
    common = dict(
        name=name, family=family, num_layers=data["num_hidden_layers"], d_model=D, num_heads=H,
        num_kv_heads=data.get("num_key_value_heads") or H, head_dim=data.get("head_dim") or D // H,
        vocab_size=data["vocab_size"], norm_eps=float(data.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(data.get("tie_word_embeddings", False)),
        dtype=_dtype(data), dispatch=Dispatch.DROPLESS,
        top_k=data["num_experts_per_tok"])
    if family == "deepseek_v3":
        return _deepseek_v3(data, common)
    common["rope_theta"] = _rope_theta(data)
    if family == "qwen3_moe":
        _unsupported(data, "use_sliding_window", (False, None), "no sliding-window attention")
        _unsupported(data, "decoder_sparse_step", (1, None), "every layer is an MoE layer")
        _unsupported(data, "mlp_only_layers", ([], None), "every layer is an MoE layer")
        return ModelConfig(**common, num_experts=_experts(data), expert_ffn=data["moe_intermediate_size"],
                           router_norm_topk=bool(data.get("norm_topk_prob", False)), qk_norm="head")
    if family == "mixtral":
        _unsupported(data, "sliding_window", (None,), "no sliding-window attention")
        return ModelConfig(**common, num_experts=_experts(data), expert_ffn=data["intermediate_size"],
                           router_norm_topk=True, qk_norm="none")
    _unsupported(data, "use_sliding_window", (False, None), "no sliding-window attention")
    return ModelConfig(**common, num_experts=_experts(data), expert_ffn=data["intermediate_size"],
                       router_norm_topk=bool(data.get("norm_topk_prob", False)), qk_norm="full",
                       clip_qkv=None if data.get("clip_qkv") is None else float(data["clip_qkv"]))


def from_hf(path: str | Path) -> ModelConfig:
    """`ModelConfig` from a checkpoint directory or its config.json."""
    from moe_jax.files import read_json

    p = config_path(path)
    data = read_json(p, "model config", ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{str(p)!r}: expected a JSON object")
    try:
        return from_hf_dict(data, name=p.parent.name if p.name == "config.json" else p.stem)
    except KeyError as e:
        raise ConfigError(f"{str(p)!r}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:  # wrongly typed or zero fields
        raise ConfigError(f"{str(p)!r}: a field has the wrong type or value ({type(e).__name__}: {e})") from None


def to_hf_dict(cfg: ModelConfig) -> dict:
    """A config.json for `cfg` in its family's Hugging Face format."""
    if cfg.family not in FAMILIES:
        raise ConfigError(f"model family {cfg.family!r} has no Hugging Face format; supported: {', '.join(FAMILIES)}")
    data = {"model_type": cfg.family, "num_hidden_layers": cfg.num_layers, "hidden_size": cfg.d_model,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": cfg.tie_embeddings, "num_experts_per_tok": cfg.top_k, "hidden_act": "silu",
            "attention_bias": False, "dtype": cfg.dtype, "max_position_embeddings": 4096}
    if cfg.family == "deepseek_v3":
        _deepseek_v3_hf(cfg, data)
    elif cfg.family == "qwen3_moe":
        data.update(architectures=["Qwen3MoeForCausalLM"], num_experts=cfg.num_experts,
                    moe_intermediate_size=cfg.expert_ffn, norm_topk_prob=cfg.router_norm_topk,
                    decoder_sparse_step=1, mlp_only_layers=[], intermediate_size=cfg.expert_ffn)
    elif cfg.family == "mixtral":
        data.update(architectures=["MixtralForCausalLM"], num_local_experts=cfg.num_experts,
                    intermediate_size=cfg.expert_ffn)
    else:
        data.update(architectures=["OlmoeForCausalLM"], num_experts=cfg.num_experts, intermediate_size=cfg.expert_ffn,
                    norm_topk_prob=cfg.router_norm_topk, clip_qkv=cfg.clip_qkv)
    return data


def _deepseek_v3_hf(cfg: ModelConfig, data: dict) -> None:
    """`to_hf_dict`'s DeepSeek-V3 fields (written into `data`)."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_yarn_factor != 1:
        rope.update(rope_type="yarn", factor=cfg.rope_yarn_factor,
                    original_max_position_embeddings=cfg.rope_yarn_original_len, beta_fast=cfg.rope_yarn_beta_fast,
                    beta_slow=cfg.rope_yarn_beta_slow)
        rope.update({k: v for k, v in (("mscale", cfg.rope_yarn_mscale),
                                        ("mscale_all_dim", cfg.rope_yarn_mscale_all_dim)) if v})
    data.pop("head_dim")
    data.pop("rope_theta")
    data.update(architectures=["DeepseekV3ForCausalLM"], num_key_value_heads=cfg.num_heads,
                q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
                qk_nope_head_dim=cfg.head_dim - cfg.qk_rope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                v_head_dim=cfg.v_head_dim, rope_interleave=cfg.rope_interleave, rope_parameters=rope,
                n_routed_experts=cfg.num_experts, moe_intermediate_size=cfg.expert_ffn,
                n_shared_experts=cfg.num_shared_experts, norm_topk_prob=cfg.router_norm_topk,
                n_group=cfg.router_groups, topk_group=cfg.router_topk_groups,
                routed_scaling_factor=cfg.routed_scaling, first_k_dense_replace=cfg.first_dense_layers,
                intermediate_size=cfg.dense_ffn or cfg.expert_ffn, num_nextn_predict_layers=0)
