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
from moe_jax.model.layers import Attention, Norm
from moe_jax.model.moe import MoE
from moe_jax.parallel.rules import constrain


class Block(nnx.Module):
    """One decoder layer: pre-norm attention and pre-norm MoE, each added to the residual."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, kernels: Kernels):
        self.attn_norm = Norm((cfg.d_model,), ("embed",), cfg)
        self.attn = Attention(cfg, rngs=rngs, kernels=kernels)
        self.moe_norm = Norm((cfg.d_model,), ("embed",), cfg)
        self.moe = MoE(cfg, rngs=rngs, kernels=kernels)

    def __call__(self, x, positions, cache=None, *, decode: bool = False):
        with jax.named_scope(scopes.ATTENTION):
            h, cache = self.attn(self.attn_norm(x), positions, cache, decode=decode)
        x = x + h
        with jax.named_scope(scopes.MOE):
            y, dropped = self.moe(self.moe_norm(x))
        return constrain(x + y, ("batch", "length", "embed")), cache, dropped


def run_layers(blocks: Block, x, positions, cache, decode: bool):
    """Run stacked blocks (leading layer axis) over x [B, S, D] with `lax.scan`.

    cache: None or {"k", "v"} of [L, B, T, K, Dh] for these layers.
    Returns (x, updated cache or None, dropped per token group summed over the layers).
    """
    graphdef, stacked = nnx.split(blocks)

    def layer(x, per_layer):
        params, layer_cache = per_layer
        x, layer_cache, dropped = nnx.merge(graphdef, params)(x, positions, layer_cache, decode=decode)
        return x, (layer_cache, dropped)

    x, (new_cache, dropped) = jax.lax.scan(layer, x, (stacked, None if cache is None else dict(cache)))
    return x, new_cache, jnp.sum(dropped, axis=0)
