"""The router: each token's top k experts and their weights.

Three scorings (``ModelConfig.router_score``):
- ``softmax`` over the experts, top k of the probabilities (Mixtral, Qwen3, OLMoE, DBRX);
- ``topk_softmax``: top k of the logits, then a softmax over the k chosen (gpt-oss);
- ``sigmoid`` per expert (DeepSeek-V3): a learned score-correction bias is added for the choice only,
  the choice may be limited to the best ``router_topk_groups`` of ``router_groups`` expert groups (a
  group's score: the sum of its two best biased scores), and the weights are the chosen experts'
  unbiased scores, renormalised (``router_norm_topk``) and multiplied by ``routed_scaling``;
- ``sigmoid_input`` (Llama 4): top k of the logits, their sigmoids the weights, which multiply the chosen
  experts' input rows rather than their outputs (`weights_input`: each dispatch scales the rows it sends
  and combines the outputs unweighted).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.model.layers import F32


def route(x, router, top_k: int, norm_topk: bool, cfg=None, *, native_top_k: bool = False):
    """Router in f32. x [..., D] → (weights [..., k] f32, experts [..., k] int32).

    router: the router weight [D, E], or (weight [D, E], bias [E]): sigmoid routing's score-correction bias, or
    with ``router_bias`` a bias added to the logits (gpt-oss).
    cfg: the `ModelConfig` whose ``router_score``, groups and ``routed_scaling`` apply; None (or a softmax
    config with scaling 1) routes as a plain top-k softmax.
    native_top_k: take the top k with `jax.lax.top_k` (see `_top_k`); callers set it where the target has a
    top-k kernel (`moe_jax.model.execution.Kernels.native_top_k`) and x's tokens are not split over devices.
    """
    def top(a, n):
        return _top_k(a, n, native_top_k)

    router_de, bias_e = router if isinstance(router, tuple) else (router, None)
    # bf16 products are exact in f32 and summed in f32: the logits of the f32 operands, without converting
    # the stored weight first (XLA hoisted that convert out of an unrolled layer stack: a copy of the weight)
    logits = jnp.einsum("...d,de->...e", x, router_de, preferred_element_type=F32)
    if cfg is not None and cfg.router_score == "sigmoid":
        return _sigmoid_route(logits, bias_e, top_k, norm_topk, cfg, top)
    if bias_e is not None:
        logits = logits + bias_e.astype(F32)
    if cfg is not None and cfg.router_score == "sigmoid_input":
        best, experts = top(logits, top_k)
        return jax.nn.sigmoid(best), experts
    if cfg is not None and cfg.router_score == "topk_softmax":
        best, experts = top(logits, top_k)
        return jax.nn.softmax(best, axis=-1), experts
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = top(probs, top_k)
    if norm_topk:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    if cfg is not None and cfg.routed_scaling != 1:
        weights = weights * cfg.routed_scaling
    return weights, experts


def weights_input(cfg) -> bool:
    """Whether the routing weights multiply the experts' input rows (``sigmoid_input``, Llama 4) rather than
    their outputs: expert(w·x) instead of w·expert(x), different for a SwiGLU expert."""
    return cfg is not None and cfg.router_score == "sigmoid_input"


def _sigmoid_route(logits, bias_e, top_k: int, norm_topk: bool, cfg, top):
    """DeepSeek-V3's routing (see the module docstring); logits [..., E] f32; top: the top-k (`_top_k`'s form)."""
    if bias_e is None:
        raise ValueError("sigmoid routing needs the router's score-correction bias: pass (router_de, bias_e)")
    scores = jax.nn.sigmoid(logits)
    choice = scores + bias_e.astype(F32)
    groups = cfg.router_groups
    if groups > 1:
        E = choice.shape[-1]
        grouped = choice.reshape(*choice.shape[:-1], groups, E // groups)
        group_score = jnp.sum(top(grouped, 2)[0], axis=-1)                      # [..., groups]
        _, best = top(group_score, cfg.router_topk_groups)                      # [..., topk_groups]
        keep = jnp.any(jax.nn.one_hot(best, groups, dtype=jnp.bool_), axis=-2)  # [..., groups]
        choice = jnp.where(keep[..., None], grouped, -jnp.inf).reshape(choice.shape)
    _, experts = top(choice, top_k)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if norm_topk:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling, experts


def _top_k(probs, k: int, native: bool = False):
    """Top-k by k rounds of argmax (ties: lowest index first, as lax.top_k), or with `native` by lax.top_k.

    lax.top_k's HLO op is not partitioned along batch dimensions by XLA's SPMD
    partitioner: it all-gathers the router probabilities of every token onto every
    device. argmax is a reduction and stays local. k is small (≤ 8 in every preset).
    Where the tokens are not split (`native`), lax.top_k is one op (XLA:GPU's TopK kernel) instead of about two
    a round.
    """
    if native:
        weights, experts = jax.lax.top_k(probs, k)
        return weights, experts.astype(jnp.int32)
    weights, experts = [], []
    for _ in range(k):
        idx = jnp.argmax(probs, axis=-1)
        weights.append(jnp.take_along_axis(probs, idx[..., None], axis=-1)[..., 0])
        experts.append(idx.astype(jnp.int32))
        probs = jnp.where(jax.nn.one_hot(idx, probs.shape[-1], dtype=jnp.bool_), -jnp.inf, probs)
    return jnp.stack(weights, axis=-1), jnp.stack(experts, axis=-1)
