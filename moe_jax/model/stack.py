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

    def __call__(self, x, positions, cache=None, *, decode: bool = False, window=0):
        """window: the layer's sliding window (`moe_jax.model.layers.Attention`); 0 for full attention."""
        with jax.named_scope(scopes.ATTENTION):
            extra = {} if isinstance(window, int) and not window else {"window": window}
            h, cache = self.attn(self.attn_norm(x), positions, cache, decode=decode, **extra)
        x = x + h
        with jax.named_scope(scopes.MOE):
            y, dropped = self.moe(self.moe_norm(x))
        return constrain(x + y, ("batch", "length", "embed")), cache, dropped


def period(windows: tuple[int, ...]) -> int:
    """The smallest p dividing len(windows) with windows[i] == windows[i % p] (1 when all are equal)."""
    n = len(windows)
    return next(p for p in range(1, n + 1) if n % p == 0 and windows == windows[:p] * (n // p))


def run_layers(blocks: Block, x, positions, cache, decode: bool, *, microbatch=None, keep=None, windows=None):
    """Run stacked blocks (leading layer axis) over x [B, S, D] with `lax.scan`.

    cache: None or these layers' {"k": [L, B, K·r, T, Dh], "v": [L, B, K·r, Dh, T]} (`moe_jax.model.kv_cache`);
    with `microbatch` m, a pipeline stage's, its batch axis split [Bm, M], of which x is microbatch m.
    keep: a traced bool; False leaves the cache as it was (a pipeline tick in the bubble).
    windows: each layer's sliding window (0: full attention; None: all full). A tuple of ints is static: the
    scan runs over groups of `period` layers, each group's layers unrolled with their own window as a Python
    int (gpt-oss's sliding/full alternation: pairs), so a sliding layer's attention skips the keys outside
    its window. A traced int32 [L] array is scanned data: windows only mask (a pipeline stage whose layers'
    pattern differs from another stage's, `moe_jax.model.pipeline`).
    Returns (x, updated cache or None, dropped [L, G]: each layer's dropped token-expert assignments per token
    group, kept per layer so a run can say which layer drops).

    The cache is carried through the scan, not scanned over: each layer writes its new keys and values
    into the carried arrays at its own index, so XLA updates the (donated) cache in place rather than
    building a new [L, ...] cache as the scan's output every call.
    """
    attention = blocks.attn.cfg.attention
    graphdef, stacked = nnx.split(blocks)
    num_layers = jax.tree.leaves(stacked)[0].shape[0]

    def one(x, kv, params, index, window):
        view = None if kv is None else LayerCache(kv["k"], kv["v"], index, microbatch, keep, attention)
        extra = {} if isinstance(window, int) and not window else {"window": window}   # DenseBlock takes none
        x, view, dropped = nnx.merge(graphdef, params)(x, positions, view, decode=decode, **extra)
        return x, None if view is None else {"k": view.k, "v": view.v}, dropped

    kv = None if cache is None else {name: cache[name] for name in NAMES}
    indices = jnp.arange(num_layers, dtype=jnp.int32)
    static = windows is None or isinstance(windows, tuple)
    if static:
        windows = windows or (0,) * num_layers
        if len(windows) != num_layers:
            raise ValueError(f"run_layers: {len(windows)} windows for {num_layers} layers")
    p = period(windows) if static else 1

    def layer(carry, per_layer):
        x, kv = carry
        params, index, *window = per_layer
        x, kv, dropped = one(x, kv, params, index, window[0] if window else windows[0])
        return (x, kv), dropped

    if not static:
        (x, kv), dropped = jax.lax.scan(layer, (x, kv), (stacked, indices, windows))
        return x, kv, dropped
    if p == 1:                                  # one window for all layers (a Python int): one layer per step
        (x, kv), dropped = jax.lax.scan(layer, (x, kv), (stacked, indices))
        return x, kv, dropped

    def group(carry, per_group):
        x, kv = carry
        params, first = per_group
        drops = []
        for j in range(p):                      # unrolled: each layer of the group with its own static window
            x, kv, dropped = one(x, kv, jax.tree.map(lambda a, j=j: a[j], params), first + j, windows[j])
            drops.append(dropped)
        return (x, kv), jnp.stack(drops)

    grouped = jax.tree.map(lambda a: a.reshape(num_layers // p, p, *a.shape[1:]), stacked)
    (x, kv), dropped = jax.lax.scan(group, (x, kv), (grouped, indices[::p]))
    return x, kv, dropped.reshape(num_layers, *dropped.shape[2:])
