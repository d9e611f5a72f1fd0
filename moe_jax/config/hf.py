"""Hugging Face ``config.json`` → `ModelConfig`, for the families the model implements exactly.

Supported ``model_type``: ``qwen3_moe``, ``mixtral``, ``olmoe``, ``deepseek_v3`` (multi-head latent
attention with YaRN, shared experts, sigmoid group routing, dense first layers), ``glm4_moe`` (GLM-4.5:
DeepSeek-V3's MoE under GQA attention with q/k/v biases, partial RoPE and optional QK-norm), ``gpt_oss``
(attention sinks, alternating sliding-window and full layers, biases in attention, router and experts, the
clamped SwiGLU, top-k softmax after selection, YaRN RoPE; unquantized checkpoints only), ``llama4_text``
(Llama 4's text model, or the text_config of a ``llama4`` config: chunked attention with NoPE full layers,
L2 qk-norm, temperature tuning, a shared expert, top-1 sigmoid routing scaling the experts' input, Llama 3
RoPE scaling; every layer MoE (Scout) or every k-th, dense SwiGLU layers between (Maverick's
``interleave_moe_layer_step`` 2)). A field whose value the model does not implement (sliding windows, RoPE
scaling other than DeepSeek-V3's YaRN, attention bias outside GLM-4.5, MoE layers in another pattern than every
k-th, ...) is an error naming the field, never an approximation.
"""

from __future__ import annotations

from pathlib import Path

from moe_jax.config.model import ModelConfig, check_size
from moe_jax.errors import ConfigError
from moe_jax.names import DTYPES, Dispatch

FAMILIES = ("qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "glm4_moe", "gpt_oss", "llama4_text")



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
    return ModelConfig(
        **{**common, "rope_theta": float(theta), "num_kv_heads": H,
           "head_dim": data["qk_nope_head_dim"] + data["qk_rope_head_dim"]},
        attention="mla", q_lora_rank=int(data.get("q_lora_rank") or 0), kv_lora_rank=data["kv_lora_rank"],
        qk_rope_head_dim=data["qk_rope_head_dim"], v_head_dim=data["v_head_dim"],
        rope_interleave=bool(data.get("rope_interleave", True)), **yarn,
        **_sigmoid_moe(data, dense_layers=0, shared_experts=0))


def _sigmoid_moe(data: dict, *, dense_layers: int, shared_experts: int) -> dict:
    """The MoE fields DeepSeek-V3 and GLM-4.5 read alike (routed and shared experts, sigmoid group routing, scaled
    weights, dense first layers), as ModelConfig keywords; `dense_layers` and `shared_experts` are the family's
    defaults for an absent ``first_k_dense_replace`` / ``n_shared_experts`` (transformers' config classes differ)."""
    dense = int(data.get("first_k_dense_replace", dense_layers) or 0)
    groups = data.get("n_group") or 1
    return dict(num_experts=data["n_routed_experts"], expert_ffn=data["moe_intermediate_size"],
                num_shared_experts=int(data.get("n_shared_experts", shared_experts) or 0),
                router_norm_topk=bool(data.get("norm_topk_prob", True)), router_score="sigmoid",
                router_groups=groups, router_topk_groups=data.get("topk_group") or groups,
                routed_scaling=float(data.get("routed_scaling_factor", 1.0)),
                first_dense_layers=dense, dense_ffn=data["intermediate_size"] if dense else 0)


def _glm4_moe(data: dict, common: dict) -> ModelConfig:
    """GLM-4.5 and GLM-4.5-Air (transformers' ``Glm4MoeConfig``): GQA with q/k/v biases (``attention_bias``), RoPE on
    the first ``partial_rotary_factor`` of each head, per-head QK-norm (``use_qk_norm``), and DeepSeek-V3's MoE (sigmoid
    scores, the correction bias for the choice, groups, shared experts, scaled weights, dense first layers).

    A field absent from config.json takes transformers' default, as the reference model would (one dense first layer,
    one shared expert, RoPE on half of each head). The multi-token-prediction layers (``num_nextn_predict_layers``,
    stored as ``model.layers.<num_hidden_layers>.*``) serve only speculative decoding: the served model, as
    transformers', leaves them out, and their tensors are ignored when a checkpoint is loaded."""
    family = "glm4_moe"
    _unsupported(data, "scoring_func", ("sigmoid", None), "GLM-4.5 routes by sigmoid scores")
    _unsupported(data, "topk_method", ("noaux_tc", None), "group-limited top-k with the score-correction bias")
    kind, rope = _rope_kind(data)
    if kind != "default":
        raise ConfigError(f"{family}: rope type {kind!r} (rope_scaling/rope_parameters) is not supported; supported: "
                          "plain RoPE ('default') on the partial_rotary_factor part of each head")
    head_dim = common["head_dim"]
    factor = rope.get("partial_rotary_factor", data.get("partial_rotary_factor", 0.5))
    rotary = int(head_dim * float(factor))
    if not (0 < rotary <= head_dim and rotary % 2 == 0):
        raise ConfigError(f"{family}: partial_rotary_factor={factor!r} gives {rotary} RoPE dims of head_dim="
                          f"{head_dim}; supported: a factor giving an even number from 2 to head_dim")
    return ModelConfig(
        **{**common, "rope_theta": _theta(data, rope), "norm_eps": float(data.get("rms_norm_eps", 1e-5))},
        attention_bias=bool(data.get("attention_bias", False)), rotary_dim=0 if rotary == head_dim else rotary,
        qk_norm="head" if data.get("use_qk_norm", False) else "none",
        **_sigmoid_moe(data, dense_layers=1, shared_experts=1))


def _yarn(family: str, rope: dict, *, truncate_default: bool) -> dict:
    """ModelConfig's YaRN fields from a ``yarn`` rope_parameters/rope_scaling dict."""
    if rope.get("attention_factor") is not None:
        raise ConfigError(f"{family}: rope attention_factor={rope['attention_factor']!r} is not supported; "
                          "supported: derived from factor, mscale and mscale_all_dim")
    return dict(rope_yarn_factor=float(rope["factor"]),
                rope_yarn_original_len=int(rope["original_max_position_embeddings"]),
                rope_yarn_beta_fast=float(rope.get("beta_fast") or 32),
                rope_yarn_beta_slow=float(rope.get("beta_slow") or 1),
                rope_yarn_mscale=float(rope.get("mscale") or 0),
                rope_yarn_mscale_all_dim=float(rope.get("mscale_all_dim") or 0),
                rope_yarn_truncate=bool(rope.get("truncate", truncate_default)))


def _gpt_oss(data: dict, common: dict) -> ModelConfig:
    """gpt-oss-20b/120b (transformers' ``GptOssConfig``): GQA with biases on q/k/v/o (``attention_bias``) and a
    learned sink logit per head, ``layer_types`` alternating sliding-window (``sliding_window``) and full
    attention, YaRN RoPE (``truncate`` honoured), a router with a bias taking the top k logits then a softmax
    over them, experts with biases and the clamped SwiGLU (``swiglu_alpha``, ``swiglu_limit``).

    Fields absent from config.json take transformers' defaults (layer_types: sliding on even layers). The
    published checkpoints store the experts MXFP4-quantized (``quantization_config`` quant_method ``mxfp4``):
    refused, not dequantized here; dequantize them first (transformers' ``Mxfp4Config(dequantize=True)`` and
    ``save_pretrained``), which drops quantization_config."""
    family = "gpt_oss"
    quant = data.get("quantization_config")
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise ConfigError(f"{family}: quantization_config (quant_method={method!r}) is not supported; supported: "
                          "none (an unquantized checkpoint: dequantize MXFP4 experts with transformers' "
                          "Mxfp4Config(dequantize=True) and save_pretrained first)")
    kind, rope = _rope_kind(data)
    yarn = {}
    if kind == "yarn":
        yarn = _yarn(family, rope, truncate_default=True)
    elif kind != "default":
        raise ConfigError(f"{family}: rope type {kind!r} (rope_scaling/rope_parameters) is not supported; "
                          "supported: 'default', 'yarn'")
    layers = data["num_hidden_layers"]
    types = data.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                        for i in range(layers)]
    bad = next((t for t in types if t not in ("sliding_attention", "full_attention")), None)
    if bad is not None:
        raise ConfigError(f"{family}: layer_types holds {bad!r}; supported: sliding_attention, full_attention")
    window = data.get("sliding_window")
    if not window:                       # transformers: no window on "sliding" layers, i.e. full attention
        types = ["full_attention"] * layers
    bias = bool(data.get("attention_bias", True))
    return ModelConfig(
        **{**common, "rope_theta": float(rope.get("rope_theta", data.get("rope_theta", 150000.0))),
           "norm_eps": float(data.get("rms_norm_eps", 1e-5))}, **yarn,
        attention_bias=bias, attention_out_bias=bias, attention_sinks=True,
        sliding_window=int(window or 0), layer_types=tuple(types),
        num_experts=_experts(data), expert_ffn=data["intermediate_size"], router_score="topk_softmax",
        router_bias=True, expert_bias=True, expert_activation="swiglu_clamped",
        swiglu_alpha=float(data.get("swiglu_alpha", 1.702)), swiglu_limit=float(data.get("swiglu_limit", 7.0)))


def _llama4_text(data: dict, common: dict) -> ModelConfig:
    """Llama 4's text model (transformers' ``Llama4TextConfig``). Fields absent take transformers' defaults
    (``no_rope_layers``: NoPE every ``no_rope_layer_interval``-th layer; ``layer_types``: chunked attention on the
    RoPE layers). moe-jax models the NoPE layers as exactly the full-attention ones. The MoE layers are every k-th
    (``interleave_moe_layer_step`` k: layers k − 1, 2k − 1, ..., k dividing ``num_hidden_layers``; 1 for Scout, 2
    for Maverick, whose layers between are dense SwiGLU FFNs of ``intermediate_size_mlp``); ``moe_layers``, when
    given, overrides the step as in transformers and must be such a pattern. Any other pattern is refused naming
    the field."""
    family = "llama4_text"
    layers = data["num_hidden_layers"]
    step = data.get("interleave_moe_layer_step", 1) or 1
    given = data.get("moe_layers")
    if given is not None:                         # transformers: moe_layers wins over the step
        moe = list(given)
        step = moe[0] + 1 if moe and isinstance(moe[0], int) and moe[0] >= 0 else 0
        if not step or layers % step or moe != list(range(step - 1, layers, step)):
            raise ConfigError(f"{family}: moe_layers={given!r} is not supported; supported: every k-th layer with k "
                              f"dividing num_hidden_layers={layers} (layers k - 1, 2k - 1, ..., {layers - 1}: "
                              "interleave_moe_layer_step k; Scout k = 1, Maverick k = 2)")
    elif not isinstance(step, int) or isinstance(step, bool) or step < 1 or layers % step:
        raise ConfigError(f"{family}: interleave_moe_layer_step={step!r} is not supported with num_hidden_layers="
                          f"{layers}; supported: a positive integer dividing num_hidden_layers (the last layer MoE)")
    interval = data.get("no_rope_layer_interval", 4)
    use_rope = data.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    chunk = data.get("attention_chunk_size", 8192)
    types = data.get("layer_types") or ["chunked_attention" if r and chunk is not None else "full_attention"
                                        for r in use_rope]
    if len(use_rope) < layers or len(types) != layers:
        raise ConfigError(f"{family}: no_rope_layers / layer_types need num_hidden_layers={layers} entries")
    if any(bool(use_rope[i]) != (types[i] == "chunked_attention") for i in range(layers)):
        raise ConfigError(f"{family}: no_rope_layers={list(use_rope[:layers])} / layer_types={list(types)} / "
                          f"attention_chunk_size={chunk!r}: moe-jax models the NoPE layers as exactly the "
                          "full-attention ones and the RoPE layers as chunked (attention_chunk_size set)")
    _unsupported(data, "num_experts_per_tok", (1,), "Llama 4 routes each token to one expert")
    kind, rope = _rope_kind(data)
    scaling = {}
    if kind == "llama3":
        scaling = dict(rope_llama3_factor=float(rope["factor"]),
                       rope_llama3_low_freq=float(rope.get("low_freq_factor", 1.0)),
                       rope_llama3_high_freq=float(rope.get("high_freq_factor", 4.0)),
                       rope_llama3_original_len=int(rope["original_max_position_embeddings"]))
    elif kind != "default":
        raise ConfigError(f"{family}: rope type {kind!r} (rope_scaling/rope_parameters) is not supported; "
                          "supported: 'default', 'llama3'")
    return ModelConfig(
        **{**common, "rope_theta": float(rope.get("rope_theta", data.get("rope_theta", 500000.0))),
           "norm_eps": float(data.get("rms_norm_eps", 1e-5))}, **scaling,
        num_experts=_experts(data), expert_ffn=data.get("intermediate_size", 8192), num_shared_experts=1,
        moe_interleave=step, dense_ffn=int(data.get("intermediate_size_mlp", 16384)) if step > 1 else 0,
        router_score="sigmoid_input", router_norm_topk=False, rope_interleave=True,
        qk_norm="l2" if data.get("use_qk_norm", True) else "none",
        attention_chunk=int(chunk or 0), layer_types=tuple(types), full_layers_nope=True,
        attn_temperature_tuning=bool(data.get("attn_temperature_tuning", True)),
        attn_floor_scale=float(data.get("floor_scale", 8192)), attn_scale=float(data.get("attn_scale", 0.1)))


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
    if family == "llama4" and isinstance(data.get("text_config"), dict):   # the multimodal config: its text model
        data, family = {**data["text_config"], "model_type": "llama4_text"}, "llama4_text"
    if family not in FAMILIES:
        raise ConfigError(f"model_type {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    _unsupported(data, "hidden_act", ("silu",), "experts are SwiGLU")
    check_size(name, "num_hidden_layers", data.get("num_hidden_layers"))     # before per-layer lists are built
    if family not in ("glm4_moe", "gpt_oss"):
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
    if family == "glm4_moe":
        return _glm4_moe(data, common)
    if family == "gpt_oss":
        return _gpt_oss(data, common)
    if family == "llama4_text":
        return _llama4_text(data, common)
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
    except (TypeError, ValueError, ArithmeticError, AttributeError) as e:  # wrongly typed, zero or huge fields
        raise ConfigError(f"{str(p)!r}: a field has the wrong type or value ({type(e).__name__}: {e})") from None


def to_hf_dict(cfg: ModelConfig) -> dict:
    """A config.json for `cfg` in its family's Hugging Face format."""
    if cfg.family not in FAMILIES:
        raise ConfigError(f"model family {cfg.family!r} has no Hugging Face format; supported: {', '.join(FAMILIES)}")
    if cfg.moe_interleave != 1 and cfg.family != "llama4_text":
        raise ConfigError(f"model {cfg.name!r}: moe_interleave={cfg.moe_interleave} has no {cfg.family} form; "
                          "only llama4_text interleaves dense and MoE layers (interleave_moe_layer_step)")
    data = {"model_type": cfg.family, "num_hidden_layers": cfg.num_layers, "hidden_size": cfg.d_model,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": cfg.tie_embeddings, "num_experts_per_tok": cfg.top_k, "hidden_act": "silu",
            "attention_bias": False, "dtype": cfg.dtype, "max_position_embeddings": 4096}
    if cfg.family == "deepseek_v3":
        _deepseek_v3_hf(cfg, data)
    elif cfg.family == "glm4_moe":
        _glm4_moe_hf(cfg, data)
    elif cfg.family == "gpt_oss":
        _gpt_oss_hf(cfg, data)
    elif cfg.family == "llama4_text":
        _llama4_text_hf(cfg, data)
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
                **_sigmoid_moe_hf(cfg))


def _sigmoid_moe_hf(cfg: ModelConfig) -> dict:
    """The MoE fields DeepSeek-V3 and GLM-4.5 write alike: routed and shared experts, sigmoid group routing, the
    dense first layers (and no multi-token-prediction layer: moe-jax does not model it)."""
    return dict(n_routed_experts=cfg.num_experts, moe_intermediate_size=cfg.expert_ffn,
                n_shared_experts=cfg.num_shared_experts, norm_topk_prob=cfg.router_norm_topk,
                n_group=cfg.router_groups, topk_group=cfg.router_topk_groups,
                routed_scaling_factor=cfg.routed_scaling, first_k_dense_replace=cfg.first_dense_layers,
                intermediate_size=cfg.dense_ffn or cfg.expert_ffn, num_nextn_predict_layers=0)


def _glm4_moe_hf(cfg: ModelConfig, data: dict) -> None:
    """`to_hf_dict`'s GLM-4.5 fields (written into `data`). Options GLM-4.5's format cannot express are refused."""
    for field, value, allowed in (("attention", cfg.attention, "gqa"), ("router_score", cfg.router_score, "sigmoid"),
                                  ("norm", cfg.norm, "rms"), ("clip_qkv", cfg.clip_qkv, None)):
        if value != allowed:
            raise ConfigError(f"model {cfg.name!r}: {field}={value!r} has no glm4_moe form; glm4_moe has "
                              f"{field}={allowed!r}")
    if cfg.qk_norm == "full":
        raise ConfigError(f"model {cfg.name!r}: qk_norm='full' has no glm4_moe form; glm4_moe has 'head' or 'none'")
    factor = (cfg.rotary_dim or cfg.head_dim) / cfg.head_dim
    data.pop("rope_theta")
    data.update(architectures=["Glm4MoeForCausalLM"], attention_bias=cfg.attention_bias,
                use_qk_norm=cfg.qk_norm == "head",
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": factor},
                **_sigmoid_moe_hf(cfg))


def _gpt_oss_hf(cfg: ModelConfig, data: dict) -> None:
    """`to_hf_dict`'s gpt-oss fields (written into `data`). Options gpt-oss's format cannot express are refused."""
    fixed = (("attention", cfg.attention, "gqa"), ("router_score", cfg.router_score, "topk_softmax"),
             ("norm", cfg.norm, "rms"), ("clip_qkv", cfg.clip_qkv, None), ("qk_norm", cfg.qk_norm, "none"),
             ("rotary_dim", cfg.rotary_dim, 0), ("attention_sinks", cfg.attention_sinks, True),
             ("attention_out_bias", cfg.attention_out_bias, cfg.attention_bias), ("router_bias", cfg.router_bias, True),
             ("expert_bias", cfg.expert_bias, True), ("expert_activation", cfg.expert_activation, "swiglu_clamped"),
             ("num_shared_experts", cfg.num_shared_experts, 0), ("first_dense_layers", cfg.first_dense_layers, 0))
    for field, value, allowed in fixed:
        if value != allowed:
            raise ConfigError(f"model {cfg.name!r}: {field}={value!r} has no gpt_oss form; gpt_oss has "
                              f"{field}={allowed!r}")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_yarn_factor != 1:
        rope.update(rope_type="yarn", factor=cfg.rope_yarn_factor,
                    original_max_position_embeddings=cfg.rope_yarn_original_len, beta_fast=cfg.rope_yarn_beta_fast,
                    beta_slow=cfg.rope_yarn_beta_slow, truncate=cfg.rope_yarn_truncate)
        rope.update({k: v for k, v in (("mscale", cfg.rope_yarn_mscale),
                                        ("mscale_all_dim", cfg.rope_yarn_mscale_all_dim)) if v})
    data.pop("rope_theta")
    data.update(architectures=["GptOssForCausalLM"], attention_bias=cfg.attention_bias, rope_parameters=rope,
                num_local_experts=cfg.num_experts, intermediate_size=cfg.expert_ffn,
                sliding_window=cfg.sliding_window or None,
                layer_types=list(cfg.layer_types or ("full_attention",) * cfg.num_layers),
                swiglu_alpha=cfg.swiglu_alpha, swiglu_limit=cfg.swiglu_limit)


def _llama4_text_hf(cfg: ModelConfig, data: dict) -> None:
    """`to_hf_dict`'s Llama 4 text fields (written into `data`). Options Llama 4's format cannot express are
    refused."""
    fixed = (("attention", cfg.attention, "gqa"), ("router_score", cfg.router_score, "sigmoid_input"),
             ("norm", cfg.norm, "rms"), ("clip_qkv", cfg.clip_qkv, None), ("rotary_dim", cfg.rotary_dim, 0),
             ("attention_sinks", cfg.attention_sinks, False), ("attention_out_bias", cfg.attention_out_bias, False),
             ("attention_bias", cfg.attention_bias, False), ("num_shared_experts", cfg.num_shared_experts, 1),
             ("first_dense_layers", cfg.first_dense_layers, 0), ("rope_interleave", cfg.rope_interleave, True),
             ("full_layers_nope", cfg.full_layers_nope, True), ("expert_activation", cfg.expert_activation, "swiglu"),
             ("rope_yarn_factor", cfg.rope_yarn_factor, 1.0), ("sliding_window", cfg.sliding_window, 0))
    for field, value, allowed in fixed:
        if value != allowed:
            raise ConfigError(f"model {cfg.name!r}: {field}={value!r} has no llama4_text form; llama4_text has "
                              f"{field}={allowed!r}")
    if cfg.qk_norm not in ("l2", "none"):
        raise ConfigError(f"model {cfg.name!r}: qk_norm={cfg.qk_norm!r} has no llama4_text form; it has 'l2' or 'none'")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_llama3_factor != 1:
        rope.update(rope_type="llama3", factor=cfg.rope_llama3_factor, low_freq_factor=cfg.rope_llama3_low_freq,
                    high_freq_factor=cfg.rope_llama3_high_freq,
                    original_max_position_embeddings=cfg.rope_llama3_original_len)
    types = list(cfg.layer_types or ("full_attention",) * cfg.num_layers)
    data.pop("rope_theta")
    data.update(architectures=["Llama4ForCausalLM"], rope_parameters=rope, num_local_experts=cfg.num_experts,
                intermediate_size=cfg.expert_ffn, intermediate_size_mlp=cfg.dense_ffn or cfg.expert_ffn,
                interleave_moe_layer_step=cfg.moe_interleave, moe_layers=list(cfg.moe_layer_indices),
                use_qk_norm=cfg.qk_norm == "l2",
                no_rope_layers=[int(t != "full_attention") for t in types], layer_types=types,
                attention_chunk_size=cfg.attention_chunk or None,
                attn_temperature_tuning=cfg.attn_temperature_tuning,
                floor_scale=int(floor) if float(floor := cfg.attn_floor_scale).is_integer() else floor,
                attn_scale=cfg.attn_scale)
