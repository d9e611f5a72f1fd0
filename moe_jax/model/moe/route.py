"""The router: a softmax over the experts and each token's top k of them."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.model.layers import F32


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
