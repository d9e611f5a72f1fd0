"""Capacity dispatch (GShard): token groups, a fixed number of slots per expert, overflow dropped.

Tokens are cut into groups of at most ``moe_group_size`` tokens that never straddle a
``dp × ep`` shard. Within a group each expert takes at most C tokens; first choices are
placed before second choices, and overflow is dropped (the token then skips that
expert). Dispatch turns ``[G, Sg, D]`` (groups split over ``dp × ep``) into
``[E, G, C, D]`` (experts split over ``ep``): the all-to-all. Combine is the reverse.

Both are gathers (`capacity_placement`: each assignment's slot; each slot's token): GShard's one-hot dispatch
and combine einsums (`capacity_masks`, kept as the reference) multiply every token by every slot of its group,
2 · G · Sg · E · C · D FLOPs each way (qwen3-30b-a3b at batch 64 × 2048 on one H200: 470 ms of a 2.05 s
prefill with their masks and transposes), where a gather moves each slot's row once.

Where no assignment can be dropped (C ≥ Sg: decode at one token per group) and the experts are not split
over ep, each assignment is instead multiplied by its own expert's gathered weights
(`moe_jax.model.moe.gathered.capacity_gathers`): the same result, reading only the chosen experts.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.model import scopes
from moe_jax.model.execution import Kernels
from moe_jax.model.layers import F32, in_place_rows, weight_einsum
from moe_jax.model.moe.activation import glu, sum_over_width, width_biases
from moe_jax.model.moe.gathered import capacity_gathers, gathered_moe
from moe_jax.model.moe.route import route, weights_input
from moe_jax.parallel.rules import activation_shards, batch_shards, constrain, current_layout, mesh_in_force, use_layout


def group_size(num_tokens: int, shards: int, max_group: int) -> int:
    """Sg: the largest divisor of the tokens per shard that is at most `max_group`.

    Groups then tile each shard exactly, so no group crosses a device boundary.
    """
    per_shard = num_tokens // shards if num_tokens % shards == 0 else num_tokens
    return max(d for d in range(1, min(per_shard, max_group) + 1) if per_shard % d == 0)


def capacity_masks(weights_gsk, experts_gsk, num_experts: int, capacity: int):
    """Dispatch and combine tensors for capacity routing (GShard's form; the model gathers instead, see the
    module docstring).

    weights/experts [G, Sg, k] → dispatch [G, Sg, E, C] (0/1), combine [G, Sg, E, C] (gate
    weights), dropped [G] (token-expert assignments that found no slot, per group; kept
    per group so that counting adds no collective to the program).
    A token's j-th choice is placed after every token's (j-1)-th choice in the group (`capacity_placement`).
    """
    G, Sg, k = experts_gsk.shape
    E, C = num_experts, capacity
    placed = capacity_placement(experts_gsk, E, C)
    slot_gsk, dropped = placed.slot, placed.dropped
    onehot = jax.nn.one_hot(slot_gsk, E * C, dtype=F32)                       # [G, Sg, k, E·C]; dropped: none
    dispatch = onehot.sum(2).reshape(G, Sg, E, C)
    combine = jnp.einsum("gskn,gsk->gsn", onehot, weights_gsk).reshape(G, Sg, E, C)
    return dispatch, combine, dropped


class Placement(NamedTuple):
    """Where capacity dispatch puts a group's token-expert assignments (`capacity_placement`)."""

    slot: jax.Array
    """[G, Sg, k] int32: each assignment's slot e · C + c in its group, E · C where dropped."""
    token: jax.Array
    """[G, E · C] int32: each slot's token, Sg for an empty slot."""
    assignment: jax.Array
    """[G, E · C] int32: each slot's assignment s · k + j, Sg · k for an empty slot."""
    dropped: jax.Array
    """[G] int32: assignments that found no slot, per group (kept per group so counting adds no collective)."""


def capacity_placement(experts_gsk, num_experts: int, capacity: int) -> Placement:
    """Each group's assignments in their experts' slots (experts [G, Sg, k]): slot c of expert e holds the
    expert's c-th assignment in priority order, every token's first choice, then every token's second, ...;
    past C they are dropped. A stable sort of the choices in priority order by expert, then gathers: no scatter
    (XLA:CPU expands one into a loop of an update per assignment) and no [Sg, k, E] running count."""
    G, Sg, k = experts_gsk.shape
    E, C = num_experts, capacity

    def one_group(experts_sk):
        by_priority = experts_sk.T.reshape(-1)                                 # [k · Sg]: choice j of token s
        order = jnp.argsort(by_priority, stable=True)                          # by expert, priority kept
        counts = jnp.sum(jax.nn.one_hot(by_priority, E, dtype=jnp.int32), axis=0)   # [E]
        first = jnp.cumsum(counts) - counts
        rank = jnp.argsort(order) - first[by_priority]                         # within its expert
        slot = jnp.where(rank < C, by_priority * C + rank, E * C).reshape(k, Sg).T
        c = jnp.arange(C, dtype=jnp.int32)
        filled = (c[None, :] < counts[:, None]).reshape(-1)                    # [E · C]
        p = order[jnp.minimum(first[:, None] + c[None, :], k * Sg - 1).reshape(-1)]   # j · Sg + s
        token = jnp.where(filled, p % Sg, Sg)
        assignment = jnp.where(filled, (p % Sg) * k + p // Sg, Sg * k)
        return slot.astype(jnp.int32), token.astype(jnp.int32), assignment.astype(jnp.int32)

    slot, token, assignment = jax.vmap(one_group)(experts_gsk)
    dropped = constrain(jnp.sum(slot == E * C, axis=(1, 2), dtype=jnp.int32), ("group",))
    return Placement(slot, token, assignment, dropped)


def _take(x_nd, index):
    """Rows of x [N, D] at index (any shape; N or more: a zero row)."""
    return jnp.take(x_nd, index, axis=0, mode="fill", fill_value=0)


def swiglu_experts(x_egcd, w_gate_up_epfd, w_down_edf, kernels: Kernels, cfg: ModelConfig | None = None,
                   biases=None):
    """Each expert's SwiGLU on its own tokens. x [E, G, C, D] → [E, G, C, D]; weights [E, 2, F, D], [E, D, F].
    cfg: the activation's (`moe_jax.model.moe.activation.glu`); biases: None or (gate/up [E, 2, F], down [E, D])."""
    E, G, C, D = x_egcd.shape
    in_place = in_place_rows(G // activation_shards("expert_group", G) * C, kernels)   # rows per expert, per device
    gate_up = weight_einsum("egcd,epfd->egcpf", x_egcd, w_gate_up_epfd, in_place=in_place)  # p, f as stored
    if biases is not None:
        gate_up = gate_up + biases[0][:, None, None]
    h = glu(gate_up[..., 0, :], gate_up[..., 1, :], cfg)
    h = constrain(h, ("expert", "expert_group", "capacity", "mlp"))
    y = weight_einsum("egcf,edf->egcd", h, w_down_edf, in_place=in_place)
    return y if biases is None else y + biases[1][:, None, None]


def capacity_moe(x_bsd, router_de, w_gate_up_epfd, w_down_edf, cfg: ModelConfig, kernels: Kernels | None = None, *,
                 biases=None):
    """Routed experts with capacity dispatch. x [B, S, D] → (y [B, S, D], dropped assignments [G]).
    biases: None, or the experts' (gate/up [E, 2, F], down [E, D]) biases (``cfg.expert_bias``).

    kernels: the target's (`moe_jax.model.moe.MoE` passes the model's); None for jax's default backend.
    """
    kernels = kernels or Kernels.of_process()
    B, S, D = x_bsd.shape
    Sg = group_size(B * S, batch_shards(B), cfg.moe_group_size)
    G = B * S // Sg
    C = cfg.capacity(Sg)
    in_place = kernels.in_place_weight_einsum
    native_top_k = kernels.native_top_k and batch_shards(B) == 1      # lax.top_k would gather a split batch
    if capacity_gathers(cfg, B * S // batch_shards(B), Sg, activation_shards("expert", cfg.num_experts), in_place):
        # Decode: C ≥ Sg, so nothing can be dropped: each assignment reads only its own expert (`gathered`)
        x = constrain(x_bsd, ("batch", "length", "embed"))
        with jax.named_scope(scopes.ROUTE):
            weights, experts = route(x, router_de, cfg.top_k, cfg.router_norm_topk, cfg,          # [B, S, k]
                                     native_top_k=native_top_k)
        y = gathered_moe(x.reshape(B * S, D), weights.reshape(B * S, -1), experts.reshape(B * S, -1),
                         w_gate_up_epfd, w_down_edf, cfg, biases, in_place=in_place)
        y = constrain(y.astype(x_bsd.dtype).reshape(B, S, D), ("batch", "length", "embed"))
        return y, constrain(jnp.zeros((G,), jnp.int32), ("group",))
    x = constrain(x_bsd.reshape(G, Sg, D), ("group", "group_tokens", "embed"))
    E, k = cfg.num_experts, cfg.top_k
    with jax.named_scope(scopes.ROUTE):
        weights, experts = route(x, router_de, k, cfg.router_norm_topk, cfg, native_top_k=native_top_k)
        slot_gsk, token_of, assignment, dropped = capacity_placement(experts, E, C)
        kept = slot_gsk < E * C
        scaled = weights_input(cfg)   # Llama 4: the weights scale the rows sent; the outputs come back unweighted
        if scaled:
            scale = jnp.take_along_axis(jnp.pad(weights.reshape(G, Sg * k), ((0, 0), (0, 1))), assignment, axis=1)
    with jax.named_scope(scopes.DISPATCH):
        # Pack locally (every expert's slots for this shard's groups), then move: the
        # change from G split over dp×ep to E split over ep is one all-to-all on ep.
        if scaled:
            token_of, scale = token_of.reshape(G, E, C), scale.reshape(G, E, C)
            xe = jax.vmap(lambda x, i, w: _take(x, i) * w[..., None], in_axes=(0, 0, 0), out_axes=1)(x, token_of, scale)
        else:   # gathered straight into [E, G, C, D] (vmap over the groups: the partitioner keeps them local)
            xe = jax.vmap(_take, in_axes=(0, 0), out_axes=1)(x, token_of.reshape(G, E, C))
        xe = constrain(xe, ("expert_all", "group", "capacity", "embed"))
        xe = constrain(xe, ("expert", "expert_group", "capacity", "embed"))
    gate = kept.astype(x.dtype) if scaled else jnp.where(kept, weights, 0).astype(x.dtype)
    args = (xe, w_gate_up_epfd, w_down_edf, slot_gsk, gate, biases)
    layout = current_layout()
    tp_axes = layout.split_axes("mlp") if layout is not None and layout.mesh is not None else ()
    if not tp_axes:
        y = _experts_and_combine(*args, kernels=kernels, cfg=cfg)
    else:
        y = _experts_and_combine_over_tp(*args, kernels=kernels, cfg=cfg, tp_axes=tp_axes)
    y = constrain(y.astype(x.dtype), ("group", "group_tokens", "embed"))
    return y.reshape(B, S, D), dropped


def _experts_and_combine(xe, w_gate_up_epfd, w_down_edf, slot_gsk, gate_gsk, biases, *, kernels: Kernels,
                         cfg: ModelConfig):
    """The experts on their slots xe [E, G, C, D] (experts split over ep), the all-to-all back, and each token's
    outputs gathered from its assignments' slots (slot [G, Sg, k]: E · C where dropped) and summed with their
    gates [G, Sg, k] → [G, Sg, D]."""
    E, G, C, D = xe.shape
    with jax.named_scope(scopes.EXPERTS):
        ye = swiglu_experts(xe, w_gate_up_epfd, w_down_edf, kernels, cfg, biases)
        ye = constrain(ye, ("expert", "expert_group", "capacity", "embed"))
    with jax.named_scope(scopes.COMBINE):
        ye = constrain(ye, ("expert_all", "group", "capacity", "embed"))     # all-to-all back
        # each assignment's output, read where it lies in [E, G, C, D] (a dropped one's slot E · C: a zero row)
        y_gskd = jax.vmap(lambda y, slot: y.at[slot // C, slot % C].get(mode="fill", fill_value=0),
                          in_axes=(1, 0))(ye, slot_gsk)                       # [G, Sg, k, D]
        return jnp.einsum("gskd,gsk->gsd", y_gskd, gate_gsk.astype(ye.dtype))


def _experts_and_combine_over_tp(xe, w_gate_up_epfd, w_down_edf, slot_gsk, gate_gsk, biases, *, kernels: Kernels,
                                 cfg: ModelConfig, tp_axes: tuple):
    """`_experts_and_combine` in `jax.shard_map`, manual over the width axes `tp_axes` (the other axes stay
    automatic): each tp rank's down projections are partial sums over its slice of F, combined as they are and
    summed over tp last, on [G, Sg, D]. Summed where the partitioner puts it (on the experts' [E, G, C, D]
    outputs, 1.25 · k times as many rows: qwen3-30b-a3b on 8 H200s with TP8, 5.4 GB a layer at batch 64 x 2048)
    the all-reduce cost more than the experts."""
    from jax.sharding import PartitionSpec as P

    layout = current_layout()

    def over_tp(names, shape):   # the spec of a parameter, over the manual (tp) axes only
        spec = layout.spec(names, shape, what="expert weights")
        return P(*(tuple(a for a in ((e,) if isinstance(e, str) else e or ()) if a in tp_axes) or None
                   for e in spec))

    specs = [P(), over_tp(("expert", "gate_up", "mlp", "embed"), w_gate_up_epfd.shape),
             over_tp(("expert", "embed", "mlp"), w_down_edf.shape), P(), P()]
    args = [xe, w_gate_up_epfd, w_down_edf, slot_gsk, gate_gsk]
    if biases is not None:
        specs.append((over_tp(("expert", "gate_up", "mlp"), biases[0].shape), P()))
        args.append(tuple(biases))
    inner = layout.without_axes(tp_axes)

    def body(xe, w_gate_up, w_down, slot, gate, biases=None):
        with use_layout(inner):
            y = _experts_and_combine(xe, w_gate_up, w_down, slot, gate, width_biases(biases, tp_axes),
                                     kernels=kernels, cfg=cfg)
        return sum_over_width(y, y.dtype, tp_axes, kernels)

    return jax.shard_map(body, mesh=mesh_in_force(layout), axis_names=set(tp_axes), check_vma=False,
                         in_specs=tuple(specs), out_specs=P())(*args)
