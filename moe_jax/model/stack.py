"""The layer stack: one decoder block, and L of them (parameters stacked on a leading axis) run by `lax.scan`.

Both the transformer (unpipelined) and the pipeline (each stage's share of the layers) run it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.model import scopes
from moe_jax.model.execution import Kernels
from moe_jax.model.kv_cache import NAMES, LayerCache
from moe_jax.model.layers import Attention, Norm
from moe_jax.model.moe import MoE
from moe_jax.parallel.rules import constrain


class Block(nnx.Module):
    """One decoder layer: pre-norm attention and pre-norm MoE, each added to the residual."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, kernels: Kernels):
        self.attn_norm = Norm((cfg.d_model,), ("embed",), cfg)
        from moe_jax.model.mla import MLAttention  # the attention the config asks for: GQA or latent (MLA)
        self.attn = (MLAttention if cfg.attention == "mla" else Attention)(cfg, rngs=rngs, kernels=kernels)
        self.moe_norm = Norm((cfg.d_model,), ("embed",), cfg)
        self.moe = MoE(cfg, rngs=rngs, kernels=kernels)

    def __call__(self, x, positions, cache=None, *, decode: bool = False):
        with jax.named_scope(scopes.ATTENTION):
            h, cache = self.attn(self.attn_norm(x), positions, cache, decode=decode)
        x = x + h
        with jax.named_scope(scopes.MOE):
            y, dropped = self.moe(self.moe_norm(x))
        return constrain(x + y, ("batch", "length", "embed")), cache, dropped


def run_layers(blocks: Block, x, positions, cache, decode: bool, *, microbatch=None, keep=None):
    """Run stacked blocks (leading layer axis) over x [B, S, D] with `lax.scan`.

    cache: None or these layers' {"k": [L, B, K·r, T, Dh], "v": [L, B, K·r, Dh, T]} (`moe_jax.model.kv_cache`);
    with `microbatch` m, a pipeline stage's, its batch axis split [Bm, M], of which x is microbatch m.
    keep: a traced bool; False leaves the cache as it was (a pipeline tick in the bubble).
    Returns (x, updated cache or None, dropped per token group summed over the layers).

    The cache is carried through the scan, not scanned over: each layer writes its new keys and values
    into the carried arrays at its own index, so XLA updates the (donated) cache in place rather than
    building a new [L, ...] cache as the scan's output every call.
    """
    attention = blocks.attn.cfg.attention
    graphdef, stacked = nnx.split(blocks)
    num_layers = jax.tree.leaves(stacked)[0].shape[0]

    def layer(carry, per_layer):
        x, kv = carry
        params, index = per_layer
        view = None if kv is None else LayerCache(kv["k"], kv["v"], index, microbatch, keep, attention)
        x, view, dropped = nnx.merge(graphdef, params)(x, positions, view, decode=decode)
        return (x, None if view is None else {"k": view.k, "v": view.v}), dropped

    kv = None if cache is None else {name: cache[name] for name in NAMES}
    (x, kv), dropped = jax.lax.scan(layer, (x, kv), (stacked, jnp.arange(num_layers, dtype=jnp.int32)))
    return x, kv, jnp.sum(dropped, axis=0)
