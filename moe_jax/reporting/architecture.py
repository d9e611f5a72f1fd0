"""A model family's features in words, from its config: the "Architecture" block of `describe` and of the
Markdown report.

Each line names one feature the planner's figures depend on (attention kind and its cache per token, routed
and shared experts, dense layers, routing, biases, RoPE, dtypes), with the numbers taken from the
`ModelConfig`, so two families with the same sizes but a different attention or routing read differently.
"""

from __future__ import annotations

from moe_jax.config import ModelConfig
from moe_jax.config.model import MAX_SIZE
from moe_jax.names import DTYPES, FP8
from moe_jax.units import human_bytes


def _attention(cfg: ModelConfig) -> str:
    """The attention kind and its shape: GQA's query/KV heads, or MLA's ranks."""
    H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if cfg.attention == "mla":
        R, Rq, Dr, Dv = cfg.kv_lora_rank, cfg.q_lora_rank, cfg.qk_rope_head_dim, cfg.v_head_dim
        query = f"query rank {Rq}" if Rq else "full-rank query"
        return (f"MLA (multi-head latent attention): {H} heads, query/key head {Dh} ({Dh - Dr} no-RoPE + {Dr} "
                f"RoPE), value head {Dv}, {query}, KV latent rank {R} + one shared {Dr}-wide RoPE key; decode runs "
                "the absorbed form (no per-head K/V rebuilt per step)")
    kind = "MHA" if K == H else "MQA" if K == 1 else "GQA"
    extras = []
    if cfg.attention_bias:
        extras.append("q/k/v biases")
    if cfg.attention_out_bias:
        extras.append("output bias")
    if cfg.attention_sinks:
        extras.append("a learned sink logit per head")
    if cfg.qk_norm == "l2":
        extras.append("L2 QK-norm on the RoPE layers")
    elif cfg.qk_norm != "none":
        extras.append(f"QK-norm ({'per head' if cfg.qk_norm == 'head' else 'over all heads'})")
    if cfg.attn_temperature_tuning:
        extras.append("query temperature tuning on the NoPE layers")
    if cfg.clip_qkv is not None:
        extras.append(f"q/k/v clipped to ±{cfg.clip_qkv:g}")
    share = f" ({cfg.q_per_kv} query heads per KV head)" if K < H else ""
    return (f"{kind}: {H} query heads, {K} KV heads of {Dh}{share}"
            + (f"; {', '.join(extras)}" if extras else ""))


def _kv_cache(cfg: ModelConfig) -> str:
    """Cache bytes per token, per layer and over all layers, and what a layer stores."""
    per_layer = cfg.kv_bytes_per_token // cfg.num_layers
    dtype = f"{cfg.cache_dtype}, {cfg.kv_dtype_bytes} B per value"
    if cfg.attention == "mla":
        R, Dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        expanded = cfg.num_heads * (cfg.head_dim + cfg.v_head_dim) * cfg.kv_dtype_bytes
        return (f"{human_bytes(cfg.kv_bytes_per_token)} per token ({cfg.kv_bytes_per_token:,} B: {per_layer:,} B per "
                f"layer = latent {R} + RoPE key {Dr} values, {dtype}); the per-head keys and values it expands to "
                f"would be {expanded:,} B per layer ({expanded / per_layer:.0f}x)")
    text = (f"{human_bytes(cfg.kv_bytes_per_token)} per token ({cfg.kv_bytes_per_token:,} B: {per_layer:,} B per layer "
            f"= k and v, {cfg.num_kv_heads} heads x {cfg.head_dim}, {dtype})")
    local, ring = cfg.local_layers, cfg.local_cache_len(MAX_SIZE)      # the ring at any context past it
    if ring:
        text += (f"; the {local} sliding-window/chunked layers keep a ring of their last {ring:,} positions, so past "
                 f"{ring:,} a sequence holds {human_bytes(per_layer * (cfg.num_layers - local))} more per token "
                 "(a pipeline whose stages' layer patterns differ keeps every layer at full length)")
    return text


def _rope(cfg: ModelConfig) -> str:
    """Which dims rotate, the base and any YaRN scaling."""
    if cfg.attention == "mla":
        part = f"the {cfg.qk_rope_head_dim} RoPE dims of each query/key head"
    elif cfg.rotary_dim and cfg.rotary_dim < cfg.head_dim:
        part = f"partial: the first {cfg.rotary_dim} of {cfg.head_dim} dims of each head"
    else:
        part = f"all {cfg.head_dim} dims of each head"
    yarn = (f", YaRN x{cfg.rope_yarn_factor:g} over {cfg.rope_yarn_original_len:,} positions"
            if cfg.rope_yarn_factor != 1 else "")
    if cfg.rope_llama3_factor != 1:
        yarn = f", Llama 3 scaling x{cfg.rope_llama3_factor:g} over {cfg.rope_llama3_original_len:,} positions"
    if cfg.full_layers_nope:
        part += " on the chunked/sliding layers (the full-attention layers take none)"
    return f"{part}, theta {cfg.rope_theta:g}{yarn}" + (", interleaved pairs" if cfg.rope_interleave else "")


def _routing(cfg: ModelConfig) -> str:
    """How a token picks its experts and how their outputs are weighted."""
    k, E = cfg.top_k, cfg.num_experts
    if cfg.router_score == "sigmoid":
        text = f"sigmoid score per expert, top-{k} chosen with a score-correction bias (choice only)"
    elif cfg.router_score == "topk_softmax":
        text = f"top-{k} router logits, softmax over the chosen {k}"
    elif cfg.router_score == "sigmoid_input":
        text = f"top-{k} router logits, their sigmoids scaling the chosen experts' input (not their output)"
    else:
        text = f"softmax over {E} experts, top-{k}" + (", renormalised" if cfg.router_norm_topk else
                                                        ", not renormalised")
    if cfg.router_score == "sigmoid":
        text += ", weights renormalised" if cfg.router_norm_topk else ", weights not renormalised"
    if cfg.router_groups > 1:
        text += (f"; group-limited: {cfg.router_groups} groups of {E // cfg.router_groups}, experts from the best "
                 f"{cfg.router_topk_groups}")
    if cfg.router_bias:
        text += "; router logit bias"
    if cfg.routed_scaling != 1:
        text += f"; routed weights x {cfg.routed_scaling:g}"
    return text


def _experts(cfg: ModelConfig) -> str:
    """Routed and shared experts, their width and gate."""
    gate = ("SwiGLU" if cfg.expert_activation == "swiglu" else
            f"clamped SwiGLU (alpha {cfg.swiglu_alpha:g}, limit {cfg.swiglu_limit:g})")
    text = f"{cfg.num_experts} routed, top-{cfg.top_k}, FFN {cfg.expert_ffn} ({gate}" + (
        ", with biases)" if cfg.expert_bias else ")")
    if cfg.num_shared_experts:
        text += (f"; {cfg.num_shared_experts} shared expert{'s' if cfg.num_shared_experts > 1 else ''} every token "
                 f"passes through (FFN {cfg.num_shared_experts * cfg.expert_ffn})")
    else:
        text += "; no shared expert"
    return text


def _layers(cfg: ModelConfig) -> str:
    """Dense and MoE layers, and the sliding-window pattern."""
    if cfg.first_dense_layers:
        text = (f"{cfg.num_layers}: the first {cfg.first_dense_layers} dense (SwiGLU FFN {cfg.dense_ffn}), then "
                f"{cfg.moe_layers} MoE")
    elif cfg.moe_interleave > 1:
        step = cfg.moe_interleave
        nth = {2: "2nd", 3: "3rd"}.get(step, f"{step}th")
        text = (f"{cfg.num_layers}: {cfg.moe_layers} MoE (every {nth}: layers {step - 1}, {2 * step - 1}, ...), the "
                f"{cfg.dense_layers} between them dense (SwiGLU FFN {cfg.dense_ffn})")
    else:
        text = f"{cfg.num_layers}, every one MoE"
    sliding = sum(1 for w in cfg.layer_windows if w > 0)
    chunked = sum(1 for w in cfg.layer_windows if w < 0)
    if sliding:
        text += f"; {sliding} of them sliding-window ({cfg.sliding_window} keys), the rest full attention"
    if chunked:
        nope = " without RoPE" if cfg.full_layers_nope else ""
        text += (f"; {chunked} of them chunked attention (chunks of {cfg.attention_chunk} keys), the rest full "
                 f"attention{nope}")
    return text


def _dtypes(cfg: ModelConfig) -> str:
    """Compute, weight and cache dtypes."""
    weights = cfg.param_dtype + (" (FP8, an f32 scale per matrix)" if cfg.param_dtype == FP8 else "")
    return (f"compute {cfg.dtype}; layer weights {weights}; KV cache {cfg.cache_dtype} "
            f"({DTYPES[cfg.cache_dtype].bytes} B)")


def architecture(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(feature, description) pairs naming `cfg`'s architecture: family, layers, attention, KV cache per token,
    RoPE, experts, routing, norms, dtypes and parameter counts, each from the config's fields."""
    norm = ("RMSNorm" if cfg.norm == "rms" else "LayerNorm (no bias)") + (
        ", tied embedding and head" if cfg.tie_embeddings else "")
    return [
        ("family", cfg.family),
        ("layers", _layers(cfg)),
        ("attention", _attention(cfg)),
        ("KV cache", _kv_cache(cfg)),
        ("RoPE", _rope(cfg)),
        ("experts", _experts(cfg)),
        ("routing", _routing(cfg)),
        ("norms", norm),
        ("dtypes", _dtypes(cfg)),
        ("parameters", f"{cfg.params_total / 1e9:.2f}B total, {cfg.params_active / 1e9:.2f}B active per token"),
    ]


def architecture_dict(cfg: ModelConfig) -> dict[str, str]:
    """`architecture` as a JSON object (feature → description)."""
    return dict(architecture(cfg))


def architecture_markdown(cfg: ModelConfig) -> list[str]:
    """The "Architecture" section of a Markdown report: one bullet per feature."""
    return ["## Architecture", "", *(f"- **{name}**: {text}" for name, text in architecture(cfg)), ""]
