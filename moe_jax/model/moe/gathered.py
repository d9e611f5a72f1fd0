"""Gathered experts: each token-expert assignment multiplied by its own expert's weights, gathered by id.

When a shard holds more experts than it has assignments (decode: one token picks k of E experts), the
grouped matmul and the capacity einsum both read every local expert's weights, most of them for no row
(qwen3-30b-a3b at batch 1: 128 experts read, 8 used; XLA:GPU lowers `jax.lax.ragged_dot_general` as a
dense product over all experts). Here row r is multiplied by ``w[e_r]`` only: the weights are gathered by
expert id and reduced over their stored minor (contracted) dimensions, as
`moe_jax.model.layers.weight_einsum` does in place, so the program reads M expert matrices instead of E_loc.
XLA:GPU fuses the gather into the reduction that consumes it: no gathered [M, 2, F, D] copy is written. Other
targets (`Kernels.in_place_weight_einsum` false) multiply the gathered matrices with a matmul, as their
`weight_einsum` does: the gathered copy is then a temporary, and the path is taken only at 3 · M < E_loc.

It is exact (every assignment computed), so dropless dispatch takes it whenever it reads fewer bytes
(`gathers`), and capacity dispatch takes it where no assignment can be dropped (`capacity_gathers`). The
choice depends on static shapes only: prefill (many tokens) keeps the grouped path.

M: assignments (rows), each one token's row for one of its k experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.model import scopes
from moe_jax.model.layers import F32
from moe_jax.model.moe.activation import glu
from moe_jax.model.moe.route import weights_input
from moe_jax.model.quant import fp8_source


def gathers(rows: int, local_experts: int, in_place: bool = True) -> bool:
    """Whether gathering each of `rows` rows' expert reads fewer weight bytes than all `local_experts`.

    Every expert matrix has the same bytes. In place (`Kernels.in_place_weight_einsum`, the GPU) the gather
    fuses into the reduction: rows matrices read (rows sharing an expert each read it). Otherwise the gathered
    matrices are a temporary the matmul reads: written and read again, 3 · rows matrices moved."""
    return rows * (1 if in_place else 3) < local_experts


def capacity_gathers(cfg: ModelConfig, tokens_per_shard: int, group_tokens: int, ep: int,
                     in_place: bool = True) -> bool:
    """Whether capacity dispatch may take the gathered path: exact and cheaper (`gathers`).

    Exact when no assignment can be dropped: a token picks k distinct experts, so an expert receives at
    most one row per token of a group, and C ≥ Sg slots hold them all. Experts split over ep (ep > 1)
    would need the rows moved to the experts' shards first: capacity keeps its all-to-all there."""
    return (ep == 1 and cfg.capacity(group_tokens) >= group_tokens
            and gathers(tokens_per_shard * cfg.top_k, cfg.num_experts, in_place))


def _gathered_product(x_mk, w, ids_m, dtype, in_place: bool):
    """Row m of x [M, K] times matrix ids[m] of w [E, ..., K] (contracted dim minor, as stored) → [M, ...] f32.

    in_place: a product and an f32 sum over the weight's minor dimension, as `weight_einsum` in place: the
    gather of w[ids] fuses into the reduction (each matrix read where it is stored), exact products in f32.
    Otherwise a matmul per row (batched over M) of the gathered matrices, converted to `dtype` (FP8 values)."""
    w_m = jnp.take(w, ids_m, axis=0, mode="clip")                             # [M, ..., K]
    M, K = x_mk.shape
    if not in_place:
        y = jnp.einsum("mk,mnk->mn", x_mk.astype(dtype), w_m.reshape(M, -1, K).astype(dtype),
                       preferred_element_type=F32)
        return y.reshape(M, *w.shape[1:-1])
    x = x_mk.reshape(M, *(1,) * (w.ndim - 2), K)
    return jnp.sum(x.astype(F32) * w_m.astype(F32), axis=-1)


def gathered_swiglu(x_md, ids_m, w_gate_up_epfd, w_down_edf, cfg: ModelConfig | None = None, biases=None, *,
                    in_place: bool = False):
    """Expert ids[m]'s SwiGLU of row m: x [M, D], ids [M] int32 (clipped into [0, E)) → [M, D].

    The same arithmetic as `moe_jax.model.moe.dropless.grouped_swiglu`: FP8 weights read whole
    (`moe_jax.model.quant.fp8_source`) are multiplied as their stored FP8 values and each row's output
    scaled by its expert's scales (exact: powers of two); cfg: the activation's
    (`moe_jax.model.moe.activation.glu`); biases: None or (gate/up [E, 2, F], down [E, D]), each row
    adding its expert's. in_place: the target's `Kernels.in_place_weight_einsum` (`_gathered_product`).
    """
    dtype = jnp.result_type(x_md, w_gate_up_epfd)
    sources = (fp8_source(w_gate_up_epfd), fp8_source(w_down_edf))
    scales = None
    if None not in sources:
        (w_gate_up_epfd, s_gate_up), (w_down_edf, s_down) = sources
        scales = (s_gate_up, s_down)
    E = w_gate_up_epfd.shape[0]
    ids_m = jnp.clip(ids_m, 0, E - 1)
    with jax.named_scope(scopes.EXPERTS):
        gate_up = _gathered_product(x_md, w_gate_up_epfd, ids_m, dtype, in_place).astype(dtype)    # [M, 2, F]
        if scales is not None:
            gate_up = gate_up * scales[0][ids_m].astype(dtype)                    # [M, 2, 1]
        if biases is not None:
            gate_up = gate_up + biases[0][ids_m]
        h = glu(gate_up[:, 0], gate_up[:, 1], cfg)                                # [M, F]
        y = _gathered_product(h, w_down_edf, ids_m, dtype, in_place).astype(dtype)                 # [M, D]
        if scales is not None:
            y = y * scales[1][ids_m].astype(dtype)                                # [M, 1]
        return y if biases is None else y + biases[1][ids_m]


def gathered_moe(x_td, weights_tk, experts_tk, w_gate_up_epfd, w_down_edf, cfg: ModelConfig, biases=None,
                 real_t=None, *, in_place: bool = False):
    """Routed experts of tokens x [T, D], each computed with its k chosen experts' gathered weights → [T, D] f32.

    weights [T, k] f32, experts [T, k] int32 (local ids); real [T] bool: False for padding tokens, whose
    output is 0 (None: every token real). Llama 4 (`moe_jax.model.moe.route.weights_input`): the weights
    scale each expert's input row and the outputs are summed unweighted, as the other dispatches do.
    in_place: `gathered_swiglu`'s.
    """
    T, D = x_td.shape
    k = experts_tk.shape[1]
    with jax.named_scope(scopes.DISPATCH):
        rows = jnp.broadcast_to(x_td[:, None], (T, k, D))
        if weights_input(cfg):
            rows, weights_tk = rows * weights_tk.astype(x_td.dtype)[..., None], jnp.ones_like(weights_tk)
        rows = rows.reshape(T * k, D)
        if real_t is not None:
            weights_tk = jnp.where(real_t[:, None], weights_tk, 0)
    ys = gathered_swiglu(rows, experts_tk.reshape(-1), w_gate_up_epfd, w_down_edf, cfg, biases, in_place=in_place)
    with jax.named_scope(scopes.COMBINE):
        return jnp.einsum("tkd,tk->td", ys.reshape(T, k, D).astype(F32), weights_tk.astype(F32))
