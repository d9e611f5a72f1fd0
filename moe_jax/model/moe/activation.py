"""The routed experts' gated activation and biases: one definition every dispatch (capacity, dropless, dense) uses.

``swiglu``: silu(gate) · up (Mixtral, Qwen3, DeepSeek-V3, ...). ``swiglu_clamped`` (gpt-oss): the gate clamped
above at ``swiglu_limit``, up clamped to [−limit, limit], then gate · sigmoid(alpha · gate) · (up + 1), as
transformers' ``GptOssExperts._apply_gate``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig


def glu(gate, up, cfg: ModelConfig | None):
    """The experts' activation of gate and up (same shape) → the hidden the down projection multiplies.
    cfg: the model's (``expert_activation``, ``swiglu_alpha``, ``swiglu_limit``); None for plain SwiGLU."""
    if cfg is not None and cfg.expert_activation == "swiglu_clamped":
        limit = cfg.swiglu_limit
        gate = jnp.minimum(gate, limit)
        up = jnp.clip(up, -limit, limit)
        return (up + 1) * (gate * jax.nn.sigmoid(gate * cfg.swiglu_alpha))
    return jax.nn.silu(gate) * up


def row_experts(sizes_e, rows: int):
    """The expert of each of `rows` rows sorted by expert with sizes [E] rows each → int32 [rows]; rows past
    sum(sizes) (padding, masked by the callers) get the last expert."""
    ids = jnp.searchsorted(jnp.cumsum(sizes_e), jnp.arange(rows, dtype=sizes_e.dtype), side="right")
    return jnp.minimum(ids, sizes_e.shape[0] - 1).astype(jnp.int32)
