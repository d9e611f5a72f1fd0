"""The routed experts' gated activation, biases and width split: one definition every dispatch (capacity, dropless,
dense) uses.

``swiglu``: silu(gate) · up (Mixtral, Qwen3, DeepSeek-V3, ...). ``swiglu_clamped`` (gpt-oss): the gate clamped
above at ``swiglu_limit``, up clamped to [−limit, limit], then gate · sigmoid(alpha · gate) · (up + 1), as
transformers' ``GptOssExperts._apply_gate``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.model import scopes
from moe_jax.model.execution import Kernels


def glu(gate, up, cfg: ModelConfig | None):
    """The experts' activation of gate and up (same shape) → the hidden the down projection multiplies.
    cfg: the model's (``expert_activation``, ``swiglu_alpha``, ``swiglu_limit``); None for plain SwiGLU."""
    if cfg is not None and cfg.expert_activation == "swiglu_clamped":
        limit = cfg.swiglu_limit
        gate = jnp.minimum(gate, limit)
        up = jnp.clip(up, -limit, limit)
        return (up + 1) * (gate * jax.nn.sigmoid(gate * cfg.swiglu_alpha))
    return jax.nn.silu(gate) * up


def group_of(sizes_e, n: int):
    """The group of each of `n` consecutive items laid out group after group, sizes [E] items each → int32 [n];
    E for items past sum(sizes).

    Each item is compared with every group's end (``method="compare_all"``, one fusion): jax's default binary
    search is a while loop, whose ~10 iterations of a few ops each cost the GPU's per-op floor (qwen3-30b-a3b's
    dropless decode at batch 64: three such loops a layer, 40% of the step's ops)."""
    ends = jnp.cumsum(sizes_e)
    return jnp.searchsorted(ends, jnp.arange(n, dtype=ends.dtype), side="right", method="compare_all") \
        .astype(jnp.int32)


def row_experts(sizes_e, rows: int):
    """The expert of each of `rows` rows sorted by expert with sizes [E] rows each → int32 [rows]; rows past
    sum(sizes) (padding, masked by the callers) get the last expert."""
    return jnp.minimum(group_of(sizes_e, rows), sizes_e.shape[0] - 1)


def width_biases(biases, tp_axes: tuple):
    """The experts' biases (gate/up, down) as one rank of the width axes `tp_axes` adds them inside `jax.shard_map`:
    each rank's down projection is a partial sum over its slice of F, so only rank 0 adds the down bias."""
    if biases is None or not tp_axes:
        return biases
    return biases[0], jnp.where(jax.lax.axis_index(tp_axes) == 0, biases[1], 0)


def sum_over_width(y, dtype, tp_axes: tuple, kernels: Kernels):
    """y in `dtype`, summed over the width axes `tp_axes` inside `jax.shard_map`: each rank multiplied a slice of F,
    so its down projections are partial sums (summed in the activations' dtype where the target compiles a 16-bit
    all-reduce inside shard_map, `Kernels.narrow_manual_all_reduce`, else in f32)."""
    if tp_axes:
        with jax.named_scope(scopes.COMBINE):
            y = jax.lax.psum(y.astype(dtype if kernels.narrow_manual_all_reduce else jnp.float32), tp_axes)
    return y.astype(dtype)
