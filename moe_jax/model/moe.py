"""The MoE block: route, dispatch, experts, combine, as pure helpers under a thin module.

Capacity dispatch (GShard): tokens are cut into groups of at most ``moe_group_size``
tokens that never straddle a ``dp × ep`` shard. Within a group each expert takes at
most C tokens; first choices are placed before second choices, and overflow is dropped
(the token then skips that expert). Dispatch turns ``[G, Sg, D]`` (groups split over
``dp × ep``) into ``[E, G, C, D]`` (experts split over ``ep``): the all-to-all. Combine
is the reverse. Because groups are bounded, the dispatch tensors ``[G, Sg, E, C]`` grow
linearly with the number of tokens.

The dense reference applies every expert to every token and gates the result: no
drops, E times the FLOPs; for tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.model.layers import F32, param
from moe_jax.sharding import batch_shards, constrain


def route(x, router_de, top_k: int, norm_topk: bool):
    """Softmax router in f32. x [..., D] → (weights [..., k] f32, experts [..., k] int32)."""
    logits = jnp.einsum("...d,de->...e", x.astype(F32), router_de.astype(F32))
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = _top_k(probs, top_k)
    if norm_topk:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def _top_k(probs, k: int):
    """Top-k by k rounds of argmax (ties: lowest index first, as lax.top_k).

    lax.top_k's HLO op is not partitioned along batch dimensions by XLA's SPMD
    partitioner: it all-gathers the router probabilities of every token onto every
    device. argmax is a reduction and stays local. k is small (≤ 8 in every preset).
    """
    weights, experts = [], []
    for _ in range(k):
        idx = jnp.argmax(probs, axis=-1)
        weights.append(jnp.take_along_axis(probs, idx[..., None], axis=-1)[..., 0])
        experts.append(idx.astype(jnp.int32))
        probs = jnp.where(jax.nn.one_hot(idx, probs.shape[-1], dtype=jnp.bool_), -jnp.inf, probs)
    return jnp.stack(weights, axis=-1), jnp.stack(experts, axis=-1)


def group_size(num_tokens: int, shards: int, max_group: int) -> int:
    """Sg: the largest divisor of the tokens per shard that is at most `max_group`.

    Groups then tile each shard exactly, so no group crosses a device boundary.
    """
    per_shard = num_tokens // shards if num_tokens % shards == 0 else num_tokens
    return max(d for d in range(1, min(per_shard, max_group) + 1) if per_shard % d == 0)


def capacity_masks(weights_gsk, experts_gsk, num_experts: int, capacity: int):
    """Dispatch and combine tensors for capacity routing.

    weights/experts [G, Sg, k] → dispatch [G, Sg, E, C] (0/1), combine [G, Sg, E, C] (gate
    weights), dropped [G] (token-expert assignments that found no slot, per group; kept
    per group so that counting adds no collective to the program).
    A token's j-th choice is placed after every token's (j-1)-th choice in the group.
    """
    G, Sg, k = experts_gsk.shape
    onehot = jax.nn.one_hot(experts_gsk, num_experts, dtype=jnp.int32)        # [G, Sg, k, E]
    by_priority = onehot.transpose(0, 2, 1, 3).reshape(G, k * Sg, num_experts)
    position = jnp.cumsum(by_priority, axis=1) - 1                            # slot within expert
    position = position.reshape(G, k, Sg, num_experts).transpose(0, 2, 1, 3)
    slot_gsk = jnp.sum(position * onehot, axis=-1)                            # [G, Sg, k]
    kept = slot_gsk < capacity
    slot_onehot = jax.nn.one_hot(jnp.where(kept, slot_gsk, capacity), capacity, dtype=F32)  # [G, Sg, k, C]
    onehot = onehot.astype(F32)
    dispatch = jnp.einsum("gske,gskc->gsec", onehot, slot_onehot)
    combine = jnp.einsum("gske,gskc,gsk->gsec", onehot, slot_onehot, weights_gsk)
    dropped = constrain(jnp.sum(~kept, axis=(1, 2), dtype=jnp.int32), ("group",))  # [G]
    return dispatch, combine, dropped


def swiglu_experts(x_egcd, w_gate_edf, w_up_edf, w_down_efd):
    """Each expert's SwiGLU on its own tokens. x [E, G, C, D] → [E, G, C, D]."""
    gate = jnp.einsum("egcd,edf->egcf", x_egcd, w_gate_edf)
    up = jnp.einsum("egcd,edf->egcf", x_egcd, w_up_edf)
    h = constrain(jax.nn.silu(gate) * up, ("expert", "expert_group", "capacity", "mlp"))
    return jnp.einsum("egcf,efd->egcd", h, w_down_efd)


def capacity_moe(x_bsd, router_de, w_gate_edf, w_up_edf, w_down_efd, cfg: ModelConfig):
    """Routed experts with capacity dispatch. x [B, S, D] → (y [B, S, D], dropped assignments [G])."""
    B, S, D = x_bsd.shape
    Sg = group_size(B * S, batch_shards(B), cfg.moe_group_size)
    G = B * S // Sg
    C = cfg.capacity(Sg)
    x = constrain(x_bsd.reshape(G, Sg, D), ("group", "group_tokens", "embed"))
    with jax.named_scope("route"):
        weights, experts = route(x, router_de, cfg.top_k, cfg.router_norm_topk)
        dispatch, combine, dropped = capacity_masks(weights, experts, cfg.num_experts, C)
    with jax.named_scope("dispatch"):
        # Pack locally (every expert's slots for this shard's groups), then move: the
        # change from G split over dp×ep to E split over ep is one all-to-all on ep.
        xe = jnp.einsum("gsd,gsec->egcd", x, dispatch.astype(x.dtype))        # [E, G, C, D]
        xe = constrain(xe, ("expert_all", "group", "capacity", "embed"))
        xe = constrain(xe, ("expert", "expert_group", "capacity", "embed"))
    with jax.named_scope("experts"):
        ye = swiglu_experts(xe, w_gate_edf, w_up_edf, w_down_efd)
        ye = constrain(ye, ("expert", "expert_group", "capacity", "embed"))
    with jax.named_scope("combine"):
        ye = constrain(ye, ("expert_all", "group", "capacity", "embed"))     # all-to-all back
        y = jnp.einsum("egcd,gsec->gsd", ye, combine.astype(ye.dtype))
        y = constrain(y, ("group", "group_tokens", "embed"))
    return y.reshape(B, S, D), dropped


def dense_moe(x_bsd, router_de, w_gate_edf, w_up_edf, w_down_efd, cfg: ModelConfig):
    """Reference: every expert on every token, gated by the router's top-k weights (nothing dropped)."""
    weights, experts = route(x_bsd, router_de, cfg.top_k, cfg.router_norm_topk)
    gates = jnp.sum(jax.nn.one_hot(experts, cfg.num_experts, dtype=F32) * weights[..., None], axis=-2)
    gate = jnp.einsum("bsd,edf->bsef", x_bsd, w_gate_edf)
    up = jnp.einsum("bsd,edf->bsef", x_bsd, w_up_edf)
    out = jnp.einsum("bsef,efd->bsed", jax.nn.silu(gate) * up, w_down_efd)
    y = jnp.einsum("bsed,bse->bsd", out.astype(F32), gates).astype(x_bsd.dtype)
    return y, jnp.zeros((1,), jnp.int32)


class MoE(nnx.Module):
    """Router, E routed SwiGLU experts (sharded on ep, width on tp), optional shared experts."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, E, F, dt = cfg.d_model, cfg.num_experts, cfg.expert_ffn, cfg.dtype
        self.cfg = cfg
        self.router_de = param(rngs, (D, E), ("embed", "expert_all"), dt, fan_in=D)
        self.w_gate_edf = param(rngs, (E, D, F), ("expert", "embed", "mlp"), dt, fan_in=D)
        self.w_up_edf = param(rngs, (E, D, F), ("expert", "embed", "mlp"), dt, fan_in=D)
        self.w_down_efd = param(rngs, (E, F, D), ("expert", "mlp", "embed"), dt, fan_in=F)
        if cfg.num_shared_experts:
            Fs = cfg.num_shared_experts * F
            self.shared_gate_df = param(rngs, (D, Fs), ("embed", "mlp"), dt, fan_in=D)
            self.shared_up_df = param(rngs, (D, Fs), ("embed", "mlp"), dt, fan_in=D)
            self.shared_down_fd = param(rngs, (Fs, D), ("mlp", "embed"), dt, fan_in=Fs)

    def __call__(self, x_bsd):
        """x [B, S, D] → (y [B, S, D], dropped token-expert assignments per token group [G])."""
        impl = {"capacity": capacity_moe, "dense": dense_moe}[self.cfg.dispatch]
        y, dropped = impl(x_bsd, self.router_de[...], self.w_gate_edf[...], self.w_up_edf[...],
                          self.w_down_efd[...], self.cfg)
        if self.cfg.num_shared_experts:
            with jax.named_scope("shared_experts"):
                h = jax.nn.silu(x_bsd @ self.shared_gate_df[...]) * (x_bsd @ self.shared_up_df[...])
                y = y + constrain(h, ("batch", "length", "mlp")) @ self.shared_down_fd[...]
        return constrain(y, ("batch", "length", "embed")), dropped
