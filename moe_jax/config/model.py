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
from moe_jax.names import DTYPES, Dispatch

_QK_NORMS = ("none", "head", "full")
_NORMS = ("rms", "layer")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only MoE transformer; every layer is attention + MoE block."""

    name: str
    """Preset name, or a user's label."""
    family: str
    """Architecture family (``seed``, ``qwen3_moe``, ``mixtral``, ``olmoe``, ``dbrx``, ``tiny``)."""
    num_layers: int
    """L: decoder layers, every one with an MoE block."""
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
    """RMSNorm on queries and keys: ``none``, ``head`` (per head, over Dh: Qwen3) or ``full`` (over H·Dh: OLMoE)."""
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
    """Parameter, activation and KV cache dtype; router, softmax and norms compute in f32 regardless."""
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

    def __post_init__(self):
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
                               ("dtype", tuple(DTYPES))):
            if getattr(self, field) not in allowed:
                raise ConfigError(f"model {self.name!r}: {field}={getattr(self, field)!r}; "
                                  f"valid: {', '.join(allowed)}")
        if self.dropless_buffer is not None and not (isinstance(self.dropless_buffer, (int, float))
                                                     and 1 <= self.dropless_buffer < float("inf")):
            raise ConfigError(f"model {self.name!r}: dropless_buffer={self.dropless_buffer!r} must be a number >= 1 "
                              "(multiples of the expected rows) or None (worst case, nothing dropped)")
        if not self.capacity_factor > 0:
            raise ConfigError(f"model {self.name!r}: capacity_factor={self.capacity_factor} must be > 0")

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
        """Bytes per element of parameters, activations and KV cache."""
        return DTYPES[self.dtype].bytes

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one KV head (H / K)."""
        return self.num_heads // self.num_kv_heads

    def capacity(self, group_tokens: int) -> int:
        """C: slots per expert for a group of `group_tokens` tokens (capacity dispatch)."""
        c = math.ceil(self.capacity_factor * group_tokens * self.top_k / self.num_experts)
        return max(1, min(group_tokens, c))

    # --- parameter counts (match the Flax model's parameters exactly) ----------------

    @property
    def attention_proj_params(self) -> int:
        """One layer's attention projections: q (D × H·Dh), k and v (D × K·Dh each), o (H·Dh × D)."""
        D, H, K, Dh = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim
        return D * H * Dh + 2 * D * K * Dh + H * Dh * D

    @property
    def attention_params(self) -> int:
        """One layer's attention: q, k, v, o projections, QK-norm weights, and the pre-attention norm."""
        H, K, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        qk = {"none": 0, "head": 2 * Dh, "full": H * Dh + K * Dh}[self.qk_norm]
        return self.attention_proj_params + qk + self.d_model

    @property
    def router_params(self) -> int:
        """One layer's router (D × E)."""
        return self.d_model * self.num_experts

    @property
    def expert_params(self) -> int:
        """One routed SwiGLU expert: gate, up (D × F each) and down (F × D)."""
        return 3 * self.d_model * self.expert_ffn

    @property
    def shared_params(self) -> int:
        """One layer's shared experts (all of them)."""
        return self.num_shared_experts * self.expert_params

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
        """One full layer: attention + MoE (all experts)."""
        return self.attention_params + self.moe_dense_params + self.num_experts * self.expert_params

    @property
    def params_total(self) -> int:
        """Every parameter."""
        return self.num_layers * self.layer_params + self.embedding_params

    @property
    def params_active(self) -> int:
        """Parameters one token uses: attention, router, shared experts, top-k experts, embeddings."""
        per_layer = self.attention_params + self.moe_dense_params + self.top_k * self.expert_params
        return self.num_layers * per_layer + self.embedding_params

    # --- FLOPs the model needs (matmuls only: norms, softmax and routing arithmetic are not counted) ----

    @property
    def matmul_params_per_token(self) -> int:
        """Matmul parameters one token multiplies in the layers: attention projections, router, shared and
        top-k experts, over all L layers (the embedding is a lookup; the output head is `head_params`)."""
        per_layer = (self.attention_proj_params + self.router_params + self.shared_params
                     + self.top_k * self.expert_params)
        return self.num_layers * per_layer

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
        positions, as computed (every key, masked or not): 2 matmuls × 2 × H × S × T × Dh per sequence."""
        return self.num_layers * 4 * batch * self.num_heads * queries * keys * self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes for one token over all layers (k and v)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def summary(self) -> dict:
        """The fields and derived counts as plain JSON-ready values."""
        out = dataclasses.asdict(self)
        out.update(params_total=self.params_total, params_active=self.params_active,
                   layers=self.num_layers, experts=self.num_experts,
                   weight_bytes=self.params_total * self.dtype_bytes,
                   kv_bytes_per_token=self.kv_bytes_per_token)
        return out
