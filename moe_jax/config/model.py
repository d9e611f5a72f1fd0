"""The frozen `ModelConfig`: a MoE decoder's fields, and the parameter counts and useful-FLOP formulas
computed from them (the one place the analytic estimate, the cost report and the time model take them from).

Shape letters used throughout moe-jax (one legend for names and comments):
B batch, S length (query positions), T cache length (key positions), D embed,
H query heads, K KV heads, Dh head dim, F expert FFN width, E experts, k top-k,
C expert capacity, G token groups, Sg tokens per group, L layers, V vocabulary.

Parameter counts are computed from the fields, never typed in; the presets' published
totals (``docs/seed-model.md``) are what the tests check them against.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from moe_jax.errors import ConfigError, nearest
from moe_jax.names import COMPUTE_DTYPES, DTYPES, FP8, Dispatch

_QK_NORMS = ("none", "head", "full", "l2")
_NORMS = ("rms", "layer")
_ATTENTIONS = ("gqa", "mla")
_ROUTER_SCORES = ("softmax", "sigmoid", "topk_softmax", "sigmoid_input")
_EXPERT_ACTIVATIONS = ("swiglu", "swiglu_clamped")
_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
MAX_LAYERS = 1 << 16
"""The most layers a model may have (the largest published MoE has under 100)."""
MAX_SIZE = 1 << 24
"""The largest width, count, rank, window or length a model field may hold: far past any published model,
and small enough that nothing derived from it (a per-layer list, a parameter count) exhausts the host."""
_SIZE_FIELDS = ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "num_experts", "top_k",
                "expert_ffn", "num_shared_experts", "moe_group_size", "q_lora_rank", "kv_lora_rank",
                "qk_rope_head_dim", "v_head_dim", "first_dense_layers", "dense_ffn", "moe_interleave", "rotary_dim",
                "sliding_window", "attention_chunk", "rope_yarn_original_len", "rope_llama3_original_len",
                "router_groups", "router_topk_groups")


def check_size(model: str, field: str, value) -> None:
    """Refuse an integer `value` for `field` past its limit (`MAX_LAYERS` for layer counts, `MAX_SIZE` otherwise),
    naming both; other types are left to the field's own check."""
    limit = MAX_LAYERS if field in ("num_layers", "num_hidden_layers", "first_dense_layers") else MAX_SIZE
    if isinstance(value, int) and not isinstance(value, bool) and value > limit:
        raise ConfigError(f"model {model!r}: {field}={value} exceeds moe-jax's limit of {limit}")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only MoE transformer; every layer is attention + MoE block, except the first
    ``first_dense_layers`` (attention + a dense SwiGLU FFN, DeepSeek-V3) and, with ``moe_interleave`` I > 1, the
    I − 1 dense layers before each MoE layer (Llama 4 Maverick)."""

    name: str
    """Preset name, or a user's label."""
    family: str
    """Architecture family (``seed``, ``qwen3_moe``, ``mixtral``, ``olmoe``, ``dbrx``, ``deepseek_v3``, ``glm4_moe``,
    ``gpt_oss``, ``llama4_text``, ``tiny``)."""
    num_layers: int
    """L: decoder layers (MoE, and the dense ones of ``first_dense_layers`` and ``moe_interleave``)."""
    d_model: int
    """D: residual stream width."""
    num_heads: int
    """H: query heads."""
    num_kv_heads: int
    """K: key/value heads (GQA when K < H)."""
    head_dim: int
    """Dh: width of one head (need not equal D / H)."""
    vocab_size: int
    """V: vocabulary size."""
    num_experts: int
    """E: routed experts per layer."""
    top_k: int
    """k: experts each token is sent to."""
    expert_ffn: int
    """F: hidden width of one SwiGLU expert."""
    num_shared_experts: int = 0
    """Experts every token passes through (DeepSeek style, ungated); 0 for none."""
    router_norm_topk: bool = True
    """Renormalise the top-k softmax probabilities to sum to 1 (Mixtral, Qwen3, DBRX) or keep them (OLMoE)."""
    qk_norm: str = "none"
    """RMSNorm on queries and keys: ``none``, ``head`` (per head, over Dh: Qwen3), ``full`` (over H·Dh: OLMoE) or
    ``l2`` (per head, no weight, after RoPE and on RoPE layers only: Llama 4's ``use_qk_norm``)."""
    norm: str = "rms"
    """Layer norm kind: ``rms`` (RMSNorm) or ``layer`` (LayerNorm without bias: DBRX)."""
    norm_eps: float = 1e-5
    """Epsilon of every norm."""
    rope_theta: float = 10_000.0
    """RoPE base frequency."""
    clip_qkv: float | None = None
    """Clip q, k and v to [-c, c] after projection (DBRX); None for no clipping."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""
    dtype: str = "bfloat16"
    """Activation (compute) dtype, and that of every parameter and the KV cache unless `weight_dtype` /
    `kv_dtype` say otherwise; router, softmax and norms compute in f32 regardless."""
    weight_dtype: str | None = None
    """Dtype the matmul weights of the layers are stored in (attention projections, routed, shared and dense
    experts): None for `dtype`, or ``float8_e4m3fn`` (FP8, with an f32 scale per matrix, dequantized to `dtype`
    before each matmul: `moe_jax.model.quant`). Embedding, output head, norms and router stay in `dtype`."""
    kv_dtype: str | None = None
    """Dtype the KV cache is stored in: None for `dtype`, another compute dtype, or ``float8_e4m3fn`` (a plain,
    saturating cast, read back to `dtype`: `moe_jax.model.kv_cache`)."""
    dispatch: str = Dispatch.CAPACITY
    """Expert path: ``capacity`` (GShard dispatch/combine, drops overflow), ``dropless`` (sort by expert,
    grouped matmul, ragged all-to-all; nothing dropped) or ``dense`` (all experts on all tokens, reference)."""
    dropless_buffer: float | None = None
    """Dropless with ep > 1: each shard's receive buffer in multiples of the rows uniform routing sends
    it (T·k for T tokens per shard). None: sized for the worst case (every row of the ep group on one
    shard), so nothing is ever dropped. A bound (e.g. 2.0) saves memory and buffer traffic; rows past
    it are dropped and counted, as capacity dispatch does."""
    capacity_factor: float = 1.25
    """Capacity dispatch: C = ceil(capacity_factor · Sg · k / E) slots per expert per group, clipped to [1, Sg]."""
    moe_group_size: int = 256
    """Capacity dispatch: at most this many tokens are routed together, so dispatch cost grows linearly in tokens."""
    # --- DeepSeek-V3 (MLA attention, sigmoid group routing, dense first layers); defaults: off ---
    attention: str = "gqa"
    """``gqa`` (grouped-query attention, K/V heads cached) or ``mla`` (multi-head latent attention, DeepSeek-V2/V3:
    the compressed latent and one decoupled RoPE key cached). With ``mla``, head_dim is the query/key width
    (no-RoPE part + ``qk_rope_head_dim``) and num_kv_heads equals num_heads (keys are per head once expanded)."""
    q_lora_rank: int = 0
    """MLA: rank of the low-rank query projection (D → q_lora_rank → H·head_dim); 0 for a full-rank one."""
    kv_lora_rank: int = 0
    """MLA: width of the compressed KV latent the cache holds per token and layer."""
    qk_rope_head_dim: int = 0
    """MLA: the part of each query/key head that carries RoPE (the key part is one head shared by all)."""
    v_head_dim: int = 0
    """MLA: width of one value head."""
    rope_interleave: bool = False
    """RoPE on interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek's layout) instead of the two halves."""
    router_score: str = "softmax"
    """``softmax`` over the experts, or ``sigmoid`` per expert with a learned score-correction bias added for
    the choice only (DeepSeek-V3); sigmoid weights are the unbiased scores of the chosen experts.
    ``topk_softmax``: softmax over the top-k logits (gpt-oss). ``sigmoid_input`` (Llama 4): the top-k logits'
    sigmoids, which multiply the chosen experts' INPUT rows (not their outputs; no renormalisation)."""
    router_groups: int = 1
    """Experts fall in this many equal groups; a token picks among the experts of its ``router_topk_groups`` best
    groups (a group's score: the sum of its top two biased scores). 1: no group limit."""
    router_topk_groups: int = 1
    """Groups each token may pick experts from (with ``router_groups`` > 1)."""
    routed_scaling: float = 1.0
    """Routed experts' weights are multiplied by this (after any renormalisation; DeepSeek-V3: 2.5)."""
    rope_yarn_factor: float = 1.0
    """YaRN context extension of the RoPE frequencies by this factor (DeepSeek-V3: 40); 1 for plain RoPE.
    Applies to MLA's RoPE part and to GQA's RoPE (gpt-oss: 32)."""
    rope_yarn_original_len: int = 0
    """YaRN: the pretraining context (``original_max_position_embeddings``) the correction range is computed for."""
    rope_yarn_beta_fast: float = 32.0
    """YaRN: rotations bounding the dimensions kept unscaled (extrapolated)."""
    rope_yarn_beta_slow: float = 1.0
    """YaRN: rotations bounding the dimensions fully interpolated."""
    rope_yarn_mscale: float = 0.0
    """YaRN ``mscale`` (0: absent). With ``rope_yarn_mscale_all_dim`` it sets the cos/sin factor."""
    rope_yarn_mscale_all_dim: float = 0.0
    """YaRN ``mscale_all_dim`` (0: absent); when set, the softmax scale is multiplied by its mscale squared."""
    first_dense_layers: int = 0
    """The first this-many layers have a dense SwiGLU FFN of width ``dense_ffn`` instead of the MoE block."""
    dense_ffn: int = 0
    """Hidden width of the dense layers' FFN (with ``first_dense_layers`` > 0 or ``moe_interleave`` > 1)."""
    moe_interleave: int = 1
    """I: every I-th layer is an MoE layer (layers I − 1, 2I − 1, ...: transformers' ``interleave_moe_layer_step``,
    Llama 4 Maverick's 2), the others dense (a SwiGLU FFN of width ``dense_ffn``); 1: every layer MoE. The layer
    stack's scanned (and pipeline-split) unit is a group of I layers, I − 1 dense then one MoE
    (`moe_jax.model.stack`); L must be a multiple of I."""
    # --- GLM-4.5 (GQA with projection biases and partial RoPE; its MoE is DeepSeek-V3's); defaults: off ---
    attention_bias: bool = False
    """GQA: a learned bias on the q, k and v projections (not o), H·Dh + 2·K·Dh values per layer (GLM-4.5)."""
    rotary_dim: int = 0
    """GQA: RoPE rotates only the first this-many dims of each query/key head (half-split layout within them;
    GLM-4.5: Dh / 2), the rest pass through; 0 for the whole head."""
    # --- gpt-oss (sinks, sliding-window layers, biases everywhere, clamped SwiGLU); defaults: off ---
    rope_yarn_truncate: bool = True
    """YaRN: round the correction range's bounds to whole dimensions (transformers' ``truncate``, default True;
    gpt-oss: False)."""
    attention_out_bias: bool = False
    """GQA: a learned bias on the output projection (D values per layer; gpt-oss)."""
    attention_sinks: bool = False
    """GQA: one learned logit per query head that joins each softmax's denominator and carries no value
    (H values per layer; gpt-oss's attention sinks)."""
    sliding_window: int = 0
    """W: a ``sliding_attention`` layer's query at position p sees keys p − W < t ≤ p; 0 for none."""
    layer_types: tuple[str, ...] = ()
    """Per layer, ``full_attention``, ``sliding_attention`` (window ``sliding_window``) or ``chunked_attention``
    (chunks of ``attention_chunk``); empty: all full."""
    # --- Llama 4 text (chunked attention, NoPE full layers, L2 qk-norm, temperature tuning); defaults: off ---
    attention_chunk: int = 0
    """C: a ``chunked_attention`` layer's query at position p sees keys C·⌊p/C⌋ ≤ t ≤ p (its own chunk; Llama 4's
    ``attention_chunk_size``); 0 for none."""
    full_layers_nope: bool = False
    """Llama 4: the ``full_attention`` layers take no RoPE (and no ``l2`` qk-norm); the other layers take both."""
    attn_temperature_tuning: bool = False
    """Llama 4: on NoPE layers, queries at position p are scaled by 1 + attn_scale·ln(1 + ⌊(p + 1)/floor⌋)."""
    attn_floor_scale: float = 8192.0
    """Temperature tuning's floor (Llama 4's ``floor_scale``)."""
    attn_scale: float = 0.1
    """Temperature tuning's strength (Llama 4's ``attn_scale``)."""
    rope_llama3_factor: float = 1.0
    """Llama 3 RoPE scaling (``rope_type: llama3``): low frequencies divided by this factor; 1 for none."""
    rope_llama3_low_freq: float = 1.0
    """Llama 3 RoPE scaling's ``low_freq_factor``."""
    rope_llama3_high_freq: float = 4.0
    """Llama 3 RoPE scaling's ``high_freq_factor``."""
    rope_llama3_original_len: int = 0
    """Llama 3 RoPE scaling's ``original_max_position_embeddings``."""
    expert_activation: str = "swiglu"
    """Routed experts' gate: ``swiglu`` (silu(gate)·up) or ``swiglu_clamped`` (gpt-oss: gate ≤ limit, up in
    [−limit, limit], gate·sigmoid(alpha·gate)·(up + 1)), `moe_jax.model.moe.activation`."""
    swiglu_alpha: float = 1.702
    """``swiglu_clamped``: the sigmoid's slope alpha."""
    swiglu_limit: float = 7.0
    """``swiglu_clamped``: the clamp limit."""
    expert_bias: bool = False
    """Routed experts carry biases on gate/up (E·2F) and down (E·D) (gpt-oss)."""
    router_bias: bool = False
    """A learned bias on the router logits (E per layer; gpt-oss), used for the choice and the weights."""

    def __post_init__(self):
        for field in _SIZE_FIELDS:
            check_size(self.name, field, getattr(self, field))
        positive = ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
                    "num_experts", "top_k", "expert_ffn", "moe_group_size")
        for field in positive:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model {self.name!r}: {field}={value!r} must be a positive integer")
        if self.num_shared_experts < 0:
            raise ConfigError(f"model {self.name!r}: num_shared_experts={self.num_shared_experts} must be >= 0")
        if self.top_k > self.num_experts:
            raise ConfigError(f"model {self.name!r}: top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model {self.name!r}: num_kv_heads={self.num_kv_heads} must divide "
                              f"num_heads={self.num_heads}")
        for field, allowed in (("qk_norm", _QK_NORMS), ("norm", _NORMS), ("dispatch", tuple(Dispatch)),
                               ("dtype", COMPUTE_DTYPES)):
            if getattr(self, field) not in allowed:
                raise ConfigError(f"model {self.name!r}: {field}={getattr(self, field)!r}; "
                                  f"valid: {', '.join(allowed)}")
        if self.dropless_buffer is not None and not (isinstance(self.dropless_buffer, (int, float))
                                                     and 1 <= self.dropless_buffer < float("inf")):
            raise ConfigError(f"model {self.name!r}: dropless_buffer={self.dropless_buffer!r} must be a number >= 1 "
                              "(multiples of the expected rows) or None (worst case, nothing dropped)")
        if not self.capacity_factor > 0:
            raise ConfigError(f"model {self.name!r}: capacity_factor={self.capacity_factor} must be > 0")
        self._check_deepseek_fields()
        self._check_storage_dtypes()
        self._check_gqa_extras()
        self._check_gpt_oss_fields()
        self._check_llama4_fields()

    def _check_deepseek_fields(self) -> None:
        """MLA, sigmoid group routing and dense first layers: consistent values or an error naming the field."""
        name = self.name
        for field, allowed in (("attention", _ATTENTIONS), ("router_score", _ROUTER_SCORES)):
            if getattr(self, field) not in allowed:
                raise ConfigError(f"model {name!r}: {field}={getattr(self, field)!r}; valid: {', '.join(allowed)}")
        for field in ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "first_dense_layers",
                      "dense_ffn"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"model {name!r}: {field}={value!r} must be an integer >= 0")
        if self.attention == "mla":
            for field in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, field) < 1:
                    raise ConfigError(f"model {name!r}: {field}={getattr(self, field)} must be >= 1 with "
                                      "attention='mla'")
            if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim >= self.head_dim:
                raise ConfigError(f"model {name!r}: qk_rope_head_dim={self.qk_rope_head_dim} must be even and below "
                                  f"head_dim={self.head_dim} (the query/key head: no-RoPE part + RoPE part)")
            if self.num_kv_heads != self.num_heads:
                raise ConfigError(f"model {name!r}: num_kv_heads={self.num_kv_heads} must equal num_heads="
                                  f"{self.num_heads} with attention='mla' (each head's keys come from the latent)")
            if self.qk_norm != "none" or self.clip_qkv is not None:
                raise ConfigError(f"model {name!r}: qk_norm={self.qk_norm!r} / clip_qkv={self.clip_qkv!r} are GQA "
                                  "options; with attention='mla' use qk_norm='none', clip_qkv=None")
        elif any(getattr(self, f) for f in ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim")):
            raise ConfigError(f"model {name!r}: q_lora_rank/kv_lora_rank/qk_rope_head_dim/v_head_dim apply to "
                              f"attention='mla' only (attention={self.attention!r})")
        groups, chosen = self.router_groups, self.router_topk_groups
        if not (isinstance(groups, int) and isinstance(chosen, int) and groups >= 1 and 1 <= chosen <= groups):
            raise ConfigError(f"model {name!r}: router_groups={groups!r}, router_topk_groups={chosen!r}: need "
                              "1 <= router_topk_groups <= router_groups")
        if self.num_experts % groups:
            raise ConfigError(f"model {name!r}: router_groups={groups} must divide num_experts={self.num_experts}")
        if groups > 1 and (self.num_experts // groups < 2 or self.top_k > chosen * self.num_experts // groups):
            raise ConfigError(f"model {name!r}: router_groups={groups}, router_topk_groups={chosen}: each group needs "
                              f">= 2 experts and the {chosen} chosen groups >= top_k={self.top_k} experts")
        if not (isinstance(self.routed_scaling, (int, float)) and 0 < self.routed_scaling < float("inf")):
            raise ConfigError(f"model {name!r}: routed_scaling={self.routed_scaling!r} must be a positive number")
        if self.rope_yarn_factor != 1:
            if not (self.rope_yarn_factor > 1 and self.rope_yarn_original_len >= 1):
                raise ConfigError(f"model {name!r}: rope_yarn_factor={self.rope_yarn_factor}, rope_yarn_original_len="
                                  f"{self.rope_yarn_original_len}: YaRN needs a factor > 1 and an original "
                                  "length >= 1")
        if self.first_dense_layers >= self.num_layers:
            raise ConfigError(f"model {name!r}: first_dense_layers={self.first_dense_layers} must be below "
                              f"num_layers={self.num_layers} (at least one MoE layer)")
        step = self.moe_interleave
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ConfigError(f"model {name!r}: moe_interleave={step!r} must be a positive integer "
                              "(1: every layer MoE)")
        if step > 1 and self.first_dense_layers:
            raise ConfigError(f"model {name!r}: moe_interleave={step} with first_dense_layers="
                              f"{self.first_dense_layers} is not implemented; use one or the other")
        if self.num_layers % step:
            raise ConfigError(f"model {name!r}: moe_interleave={step} must divide num_layers={self.num_layers} "
                              f"(groups of {step - 1} dense layers then one MoE layer)")
        if (self.first_dense_layers > 0) != (self.dense_ffn > 0) and step == 1:
            raise ConfigError(f"model {name!r}: first_dense_layers={self.first_dense_layers} and dense_ffn="
                              f"{self.dense_ffn} go together (both > 0, or both 0)")
        if step > 1 and self.dense_ffn < 1:
            raise ConfigError(f"model {name!r}: moe_interleave={step} needs dense_ffn >= 1 (the width of the dense "
                              f"layers between MoE layers); dense_ffn={self.dense_ffn}")

    def _check_gqa_extras(self) -> None:
        """GLM-4.5's attention options (projection biases, partial RoPE): GQA only, consistent values."""
        name = self.name
        if not isinstance(self.attention_bias, bool):
            raise ConfigError(f"model {name!r}: attention_bias={self.attention_bias!r} must be True or False")
        dim = self.rotary_dim
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0 or dim % 2 or dim > self.head_dim:
            raise ConfigError(f"model {name!r}: rotary_dim={dim!r} must be an even integer from 0 to head_dim="
                              f"{self.head_dim} (0: RoPE on the whole head)")
        if self.attention == "mla" and (self.attention_bias or dim):
            raise ConfigError(f"model {name!r}: attention_bias={self.attention_bias!r} / rotary_dim={dim} are GQA "
                              "options; with attention='mla' the RoPE part is qk_rope_head_dim and projections have "
                              "no bias")

    def _check_gpt_oss_fields(self) -> None:
        """gpt-oss's options (sinks, output bias, sliding windows, clamped SwiGLU, expert and router biases)."""
        name = self.name
        for field in ("rope_yarn_truncate", "attention_out_bias", "attention_sinks", "expert_bias", "router_bias"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(f"model {name!r}: {field}={getattr(self, field)!r} must be True or False")
        if self.attention == "mla" and (self.attention_out_bias or self.attention_sinks or self.sliding_window
                                        or not self.rope_yarn_truncate):
            raise ConfigError(f"model {name!r}: attention_out_bias / attention_sinks / sliding_window / "
                              "rope_yarn_truncate=False are GQA options (attention='mla')")
        window = self.sliding_window
        if not isinstance(window, int) or isinstance(window, bool) or window < 0:
            raise ConfigError(f"model {name!r}: sliding_window={window!r} must be an integer >= 0 (0: none)")
        if not isinstance(self.layer_types, tuple):     # a JSON list, or any sequence: stored as a tuple
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        types = self.layer_types
        if types:
            bad = next((t for t in types if t not in _LAYER_TYPES), None)
            if bad is not None:
                raise ConfigError(f"model {name!r}: layer_types holds {bad!r}; valid: {', '.join(_LAYER_TYPES)}")
            if len(types) != self.num_layers:
                raise ConfigError(f"model {name!r}: layer_types has {len(types)} entries; need num_layers="
                                  f"{self.num_layers}")
            if "sliding_attention" in types and not window:
                raise ConfigError(f"model {name!r}: layer_types has sliding_attention layers but sliding_window=0")
            if "chunked_attention" in types and not self.attention_chunk:
                raise ConfigError(f"model {name!r}: layer_types has chunked_attention layers but attention_chunk=0")
            if ("sliding_attention" in types or "chunked_attention" in types) and self.first_dense_layers:
                raise ConfigError(f"model {name!r}: sliding_attention layers with first_dense_layers="
                                  f"{self.first_dense_layers} are not implemented (dense layers run full attention)")
        if self.expert_activation not in _EXPERT_ACTIVATIONS:
            raise ConfigError(f"model {name!r}: expert_activation={self.expert_activation!r}; valid: "
                              f"{', '.join(_EXPERT_ACTIVATIONS)}")
        for field in ("swiglu_alpha", "swiglu_limit"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")):
                raise ConfigError(f"model {name!r}: {field}={value!r} must be a positive number")
        if self.router_bias and self.router_score == "sigmoid":
            raise ConfigError(f"model {name!r}: router_bias applies to softmax routing; sigmoid routing has its "
                              "score-correction bias already (router_score='sigmoid')")
        if self.router_score == "topk_softmax" and self.routed_scaling != 1:
            raise ConfigError(f"model {name!r}: routed_scaling={self.routed_scaling} with router_score="
                              "'topk_softmax' is not implemented; use 1")

    def _check_llama4_fields(self) -> None:
        """Llama 4's options: chunked attention, NoPE full layers, L2 qk-norm, temperature tuning, input-weighted
        sigmoid routing, Llama 3 RoPE scaling."""
        name = self.name
        chunk = self.attention_chunk
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
            raise ConfigError(f"model {name!r}: attention_chunk={chunk!r} must be an integer >= 0 (0: none)")
        for field in ("full_layers_nope", "attn_temperature_tuning"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(f"model {name!r}: {field}={getattr(self, field)!r} must be True or False")
        for field in ("attn_floor_scale", "rope_llama3_factor", "rope_llama3_low_freq", "rope_llama3_high_freq"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")):
                raise ConfigError(f"model {name!r}: {field}={value!r} must be a positive number")
        if not (isinstance(self.attn_scale, (int, float)) and math.isfinite(self.attn_scale)):
            raise ConfigError(f"model {name!r}: attn_scale={self.attn_scale!r} must be a finite number")
        if self.attention == "mla" and (chunk or self.full_layers_nope or self.attn_temperature_tuning
                                        or self.qk_norm == "l2"):
            raise ConfigError(f"model {name!r}: attention_chunk / full_layers_nope / attn_temperature_tuning / "
                              "qk_norm='l2' are GQA options (attention='mla')")
        if (self.qk_norm == "l2" or self.attn_temperature_tuning) and not self.full_layers_nope:
            raise ConfigError(f"model {name!r}: qk_norm='l2' / attn_temperature_tuning=True need "
                              "full_layers_nope=True (Llama 4: they apply to the RoPE / NoPE layers)")
        if self.router_score == "sigmoid_input" and (self.expert_bias or self.router_bias or self.routed_scaling != 1
                                                     or self.router_groups > 1):
            raise ConfigError(f"model {name!r}: router_score='sigmoid_input' takes no expert_bias, router_bias, "
                              "routed_scaling or router_groups (Llama 4's router has none)")
        if self.rope_llama3_factor != 1:
            if not (self.rope_llama3_factor > 1 and self.rope_llama3_original_len >= 1
                    and self.rope_llama3_high_freq >= self.rope_llama3_low_freq):
                raise ConfigError(f"model {name!r}: rope_llama3_factor={self.rope_llama3_factor}, "
                                  f"rope_llama3_original_len={self.rope_llama3_original_len}: Llama 3 scaling needs "
                                  "a factor > 1, an original length >= 1 and rope_llama3_high_freq >= low_freq")
            if self.rope_yarn_factor != 1:
                raise ConfigError(f"model {name!r}: rope_llama3_factor and rope_yarn_factor both set; choose one")

    def _check_storage_dtypes(self) -> None:
        """weight_dtype and kv_dtype: None, or a dtype they may be stored in."""
        for field, allowed in (("weight_dtype", (*COMPUTE_DTYPES, FP8)), ("kv_dtype", (*COMPUTE_DTYPES, FP8))):
            value = getattr(self, field)
            if value is not None and value not in allowed:
                raise ConfigError(f"model {self.name!r}: {field}={value!r}; valid: None (as dtype), "
                                  f"{', '.join(allowed)}")

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        unknown = [k for k in changes if k not in {f.name for f in dataclasses.fields(self)}]
        if unknown:
            raise ConfigError(f"unknown ModelConfig field {unknown[0]!r}"
                              f"{nearest(unknown[0], [f.name for f in dataclasses.fields(self)])}")
        return dataclasses.replace(self, **changes)

    # --- derived sizes -------------------------------------------------------------

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of activations (and of parameters kept in the compute dtype)."""
        return DTYPES[self.dtype].bytes

    @property
    def param_dtype(self) -> str:
        """The dtype the layers' matmul weights are stored in (`weight_dtype`, else `dtype`)."""
        return self.weight_dtype or self.dtype

    @property
    def cache_dtype(self) -> str:
        """The dtype the KV cache is stored in (`kv_dtype`, else `dtype`)."""
        return self.kv_dtype or self.dtype

    @property
    def kv_dtype_bytes(self) -> int:
        """Bytes per element of the KV cache."""
        return DTYPES[self.cache_dtype].bytes

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one KV head (H / K)."""
        return self.num_heads // self.num_kv_heads

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Each attention window in keys of the layer stack's layers (`sliding_window` for a ``sliding_attention``
        layer, 0 for full attention, −`attention_chunk` for a ``chunked_attention`` layer: a negative window is a
        chunk, its start aligned to multiples of the chunk, `moe_jax.model.attention.window_mask`), in layer order:
        the `stack_layers` layers, MoE and (``moe_interleave`` > 1) the dense ones between them; the
        ``first_dense_layers`` dense layers, always full, are not in it."""
        types = self.layer_types or ("full_attention",) * self.num_layers
        by_type = {"sliding_attention": self.sliding_window, "chunked_attention": -self.attention_chunk}
        return tuple(by_type.get(t, 0) for t in types[self.first_dense_layers:])

    @property
    def local_layers(self) -> int:
        """Ll: the layer stack's sliding-window and chunked layers (those with a window, `layer_windows`)."""
        return sum(1 for w in self.layer_windows if w)

    def local_cache_len(self, max_len: int, stages: int = 1) -> int:
        """R: the positions each sliding (chunked) layer's cache holds as a ring (`moe_jax.model.kv_cache`), the
        longest window or chunk capped at `max_len`; 0 when every layer keeps all `max_len` positions.

        A decode step's query at p sees at most the last W keys (a window W) or its own chunk's (at most C), so a
        ring of R = max |W| slots (position t in slot t mod R) holds all it reads. The ring needs each layer's
        window known when the program is built: a pipeline whose `stages` get different shares of the window
        pattern scans its windows as data (`moe_jax.model.pipeline.run_pipeline`), so there every layer keeps
        the whole cache. MLA has no windows. One R serves every ring layer: a model mixing a short sliding window
        with long chunks (none published does) would read a whole chunk-long ring on its sliding layers."""
        windows = self.layer_windows
        if self.attention != "gqa" or not any(windows) or len(windows) % stages:
            return 0
        per = len(windows) // stages
        if len({windows[i * per:(i + 1) * per] for i in range(stages)}) != 1:
            return 0
        return min(max_len, max(abs(w) for w in windows))

    def kv_bytes(self, cache_len: int, stages: int = 1) -> int:
        """KV cache bytes one sequence of `cache_len` positions holds over all layers: `kv_bytes_per_token` per
        position, except that a sliding (chunked) layer holds only its ring of `local_cache_len` positions."""
        ring = self.local_cache_len(cache_len, stages)
        if not ring:
            return cache_len * self.kv_bytes_per_token
        per_layer = self.kv_bytes_per_token // self.num_layers
        return per_layer * ((self.num_layers - self.local_layers) * cache_len + self.local_layers * ring)

    def capacity(self, group_tokens: int) -> int:
        """C: slots per expert for a group of `group_tokens` tokens (capacity dispatch)."""
        c = math.ceil(self.capacity_factor * group_tokens * self.top_k / self.num_experts)
        return max(1, min(group_tokens, c))

    # --- parameter counts (match the Flax model's parameters exactly) ----------------

    @property
    def moe_layers(self) -> int:
        """Layers with an MoE block (all but the first ``first_dense_layers``, one of every ``moe_interleave``); also
        the layer stack's scanned groups of ``moe_interleave`` layers (`moe_jax.model.stack`), which pp splits."""
        return (self.num_layers - self.first_dense_layers) // self.moe_interleave

    @property
    def stack_layers(self) -> int:
        """Layers in the layer stack (the scanned, pipeline-split one): all but the ``first_dense_layers``, the
        interleaved dense layers included; `moe_layers` × ``moe_interleave``."""
        return self.num_layers - self.first_dense_layers

    @property
    def dense_layers(self) -> int:
        """Layers with a dense FFN (width ``dense_ffn``): the ``first_dense_layers`` and the ``moe_interleave`` − 1
        before each MoE layer."""
        return self.num_layers - self.moe_layers

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        """The MoE layers' indices among all L layers (transformers' ``moe_layers``)."""
        first, step = self.first_dense_layers, self.moe_interleave
        return tuple(range(first + step - 1, self.num_layers, step))

    @property
    def attention_proj_params(self) -> int:
        """One layer's attention projections. GQA: q (D × H·Dh), k and v (D × K·Dh each), o (H·Dh × D).
        MLA: q (D × Rq and Rq × H·Dh, or D × H·Dh), the latent and RoPE key (D × (R + Dr)), the latent's
        per-head key and value expansion (R × H·(Dh − Dr + Dv)), o (H·Dv × D)."""
        D, H, K, Dh = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim
        if self.attention == "mla":
            R, Rq, Dr, Dv = self.kv_lora_rank, self.q_lora_rank, self.qk_rope_head_dim, self.v_head_dim
            q = D * Rq + Rq * H * Dh if Rq else D * H * Dh
            return q + D * (R + Dr) + R * H * (Dh - Dr + Dv) + H * Dv * D
        return D * H * Dh + 2 * D * K * Dh + H * Dh * D

    @property
    def attention_bias_params(self) -> int:
        """One layer's projection biases and sinks: q, k and v (H·Dh + 2·K·Dh with ``attention_bias``), o (D with
        ``attention_out_bias``) and the H sink logits (``attention_sinks``)."""
        qkv = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.attention_bias else 0
        return (qkv + (self.d_model if self.attention_out_bias else 0)
                + (self.num_heads if self.attention_sinks else 0))

    @property
    def attention_params(self) -> int:
        """One layer's attention: projections and their biases, QK-norm weights (MLA: the query and latent norms),
        and the pre-attention norm."""
        H, K, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        if self.attention == "mla":
            return self.attention_proj_params + self.q_lora_rank + self.kv_lora_rank + self.d_model
        qk = {"none": 0, "l2": 0, "head": 2 * Dh, "full": H * Dh + K * Dh}[self.qk_norm]
        return self.attention_proj_params + self.attention_bias_params + qk + self.d_model

    @property
    def router_params(self) -> int:
        """One layer's router (D × E, and the E score-correction biases of sigmoid routing or the E logit biases of
        ``router_bias``)."""
        biased = self.router_score == "sigmoid" or self.router_bias
        return self.d_model * self.num_experts + (self.num_experts if biased else 0)

    @property
    def router_matmul_params(self) -> int:
        """The router's matmul parameters (D × E)."""
        return self.d_model * self.num_experts

    @property
    def dense_layer_params(self) -> int:
        """One dense layer (``first_dense_layers``, ``moe_interleave``): attention, the pre-FFN norm and a SwiGLU FFN
        of width dense_ffn."""
        return self.attention_params + self.d_model + 3 * self.d_model * self.dense_ffn

    @property
    def expert_params(self) -> int:
        """One routed SwiGLU expert: gate, up (D × F each) and down (F × D), and with ``expert_bias`` their
        biases (2F + D)."""
        return self.expert_matmul_params + ((2 * self.expert_ffn + self.d_model) if self.expert_bias else 0)

    @property
    def expert_matmul_params(self) -> int:
        """One routed expert's matmul weights: gate, up (D × F each) and down (F × D)."""
        return 3 * self.d_model * self.expert_ffn

    @property
    def shared_params(self) -> int:
        """One layer's shared experts (all of them; never biased)."""
        return self.num_shared_experts * self.expert_matmul_params

    @property
    def moe_dense_params(self) -> int:
        """One layer's MoE parameters every token uses: pre-MoE norm, router and shared experts."""
        return self.d_model + self.router_params + self.shared_params

    @property
    def embedding_params(self) -> int:
        """Input embedding, output head (unless tied) and final norm."""
        tables = 1 if self.tie_embeddings else 2
        return tables * self.vocab_size * self.d_model + self.d_model

    @property
    def layer_params(self) -> int:
        """One full MoE layer: attention + MoE (all experts)."""
        return self.attention_params + self.moe_dense_params + self.num_experts * self.expert_params

    @property
    def params_total(self) -> int:
        """Every parameter."""
        return (self.moe_layers * self.layer_params + self.dense_layers * self.dense_layer_params
                + self.embedding_params)

    @property
    def params_active(self) -> int:
        """Parameters one token uses: attention, router, shared experts, top-k experts, dense layers, embeddings."""
        per_layer = self.attention_params + self.moe_dense_params + self.top_k * self.expert_params
        return (self.moe_layers * per_layer + self.dense_layers * self.dense_layer_params
                + self.embedding_params)

    # --- FLOPs the model needs (matmuls only: norms, softmax and routing arithmetic are not counted) ----

    @property
    def matmul_params_per_token(self) -> int:
        """Matmul parameters one token multiplies in the layers: attention projections, router, shared and
        top-k experts, over all L layers (the embedding is a lookup; the output head is `head_params`)."""
        per_layer = (self.attention_proj_params + self.router_matmul_params + self.shared_params
                     + self.top_k * self.expert_matmul_params)
        dense = self.attention_proj_params + 3 * self.d_model * self.dense_ffn
        return self.moe_layers * per_layer + self.dense_layers * dense

    @property
    def head_params(self) -> int:
        """The output head's matmul parameters (D × V)."""
        return self.d_model * self.vocab_size

    def useful_flops(self, tokens: int, head_tokens: int) -> int:
        """Matmul FLOPs of `tokens` tokens through the layers, and the output head on `head_tokens` of them:
        2 × parameters × tokens (a multiply and an add per parameter)."""
        return 2 * self.matmul_params_per_token * tokens + 2 * self.head_params * head_tokens

    def attention_flops(self, batch: int, queries: int, keys: int) -> int:
        """QKᵀ and PV over all layers for `batch` sequences of `queries` positions against `keys` cached
        positions, as computed (every key, masked or not): 2 matmuls × 2 × H × S × T × Dh per sequence.
        A sliding-window layer (`layer_windows`) reads only the cache's last W + S − 1 positions (a
        decode step: W keys), so its T is at most that; a chunked layer (chunk C) reads at most C + S − 1.

        MLA: a one-position call (decode) runs the absorbed form, scores over the latent and the RoPE key
        (2 × H × T × (R + Dr)) and values in the latent (2 × H × T × R); longer calls (prefill) expand the
        latent into per-head keys and values: 2 × H × S × T × (Dh + Dv)."""
        if self.attention == "mla":
            R, Dr, Dv = self.kv_lora_rank, self.qk_rope_head_dim, self.v_head_dim
            width = (2 * R + Dr) if queries == 1 else (self.head_dim + Dv)
            return self.num_layers * 2 * batch * self.num_heads * queries * keys * width
        per_key = 4 * batch * self.num_heads * queries * self.head_dim
        windowed = sum(min(keys, abs(w) + queries - 1) if w else keys for w in self.layer_windows)
        return per_key * (self.first_dense_layers * keys + windowed)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes for one token over all layers: k and v (GQA), or the latent and the RoPE key (MLA)."""
        if self.attention == "mla":
            return self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * self.kv_dtype_bytes
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_dtype_bytes

    @property
    def stored_matmul_params(self) -> int:
        """The parameters stored in `param_dtype`: every matmul weight of the layers (attention projections,
        routed, shared and dense experts); the rest (embedding, output head, norms, router, biases) are in `dtype`."""
        per_moe = self.attention_proj_params + self.shared_params + self.num_experts * self.expert_matmul_params
        dense = self.attention_proj_params + 3 * self.d_model * self.dense_ffn
        return self.moe_layers * per_moe + self.dense_layers * dense

    @property
    def weight_scales(self) -> int:
        """FP8 weights: the f32 scales stored beside them, one per matrix (the weight's dimensions but its
        last two, `moe_jax.model.quant`); 0 otherwise."""
        if self.param_dtype != FP8:
            return 0
        D, H, K, E = self.d_model, self.num_heads, self.num_kv_heads, self.num_experts
        shared = 3 if self.num_shared_experts else 0                    # gate and up [2, Fs, D], down [D, Fs]
        if self.attention == "mla":       # wq_a and wq_b (H) or wq (H); wkv_a (1), wkv_b (H), wo (D)
            attention = (1 + H if self.q_lora_rank else H) + 1 + H + D
        else:                                                           # wq (H), wk and wv (K), wo (D)
            attention = H + 2 * K + D
        return (self.moe_layers * (attention + 3 * E + shared)
                + self.dense_layers * (attention + 3))

    @property
    def weight_bytes(self) -> int:
        """Bytes of every parameter as stored: matmul weights in `param_dtype` (and their FP8 scales), the rest
        in `dtype`. Parameter counts do not depend on the dtypes."""
        stored = self.stored_matmul_params
        return (stored * DTYPES[self.param_dtype].bytes + (self.params_total - stored) * self.dtype_bytes
                + 4 * self.weight_scales)

    def summary(self) -> dict:
        """The fields and derived counts as plain JSON-ready values."""
        out = dataclasses.asdict(self)
        out.update(params_total=self.params_total, params_active=self.params_active,
                   layers=self.num_layers, experts=self.num_experts,
                   weight_bytes=self.weight_bytes,
                   kv_bytes_per_token=self.kv_bytes_per_token)
        return out
