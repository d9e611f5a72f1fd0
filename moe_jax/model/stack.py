"""The layer stack: one decoder block, and L of them (parameters stacked on a leading axis) run by `lax.scan`, or
unrolled in a GPU's decode step (`unrolled`).

Both the transformer (unpipelined) and the pipeline (each stage's share of the layers) run it.

With ``cfg.moe_interleave`` I > 1 (Llama 4 Maverick: MoE on every 2nd layer) a block is a group of I layers,
I − 1 dense layers (`moe_jax.model.dense_layers.DenseBlock`, stacked inside the block) then the MoE layer, so the
scan and the pipeline's stages split whole groups; the KV cache keeps one entry per layer on its leading axis
(group-major: layer g·I + j is sub-layer j of group g), each sub-layer viewing its own entry (a sliding or
chunked layer's in the ring arrays, which count only such layers: `moe_jax.model.kv_cache`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.model import scopes
from moe_jax.model.dense_layers import dense_cache_axes, make_dense_blocks
from moe_jax.model.execution import Kernels
from moe_jax.model.kv_cache import LayerCache, axes, write_deferred
from moe_jax.model.layers import Attention, Norm, in_place_rows
from moe_jax.model.moe import MoE
from moe_jax.model.provenance import layer_of
from moe_jax.parallel.rules import batch_shards, constrain


class Block(nnx.Module):
    """One decoder layer: pre-norm attention and pre-norm MoE, each added to the residual. With
    ``cfg.moe_interleave`` I > 1, a group of I layers: the I − 1 dense layers before the MoE layer (``dense``, a
    `DenseBlock` stack on a leading ``dense_layers`` axis) then that MoE layer."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, kernels: Kernels):
        self.attn_norm = Norm((cfg.d_model,), ("embed",), cfg)
        from moe_jax.model.mla import MLAttention  # the attention the config asks for: GQA or latent (MLA)
        self.attn = (MLAttention if cfg.attention == "mla" else Attention)(cfg, rngs=rngs, kernels=kernels)
        self.moe_norm = Norm((cfg.d_model,), ("embed",), cfg)
        self.moe = MoE(cfg, rngs=rngs, kernels=kernels)
        if cfg.moe_interleave > 1:
            self.dense = make_dense_blocks(cfg, rngs, kernels, cfg.moe_interleave - 1)

    @property
    def group_layers(self) -> int:
        """Layers per block: ``cfg.moe_interleave`` (1: the MoE layer alone)."""
        return self.attn.cfg.moe_interleave

    def __call__(self, x, positions, cache=None, *, decode: bool = False, window=0):
        """window: the layer's sliding window (`moe_jax.model.layers.Attention`); 0 for full attention.

        A group of I > 1 layers takes the cache's view at its first layer (each sub-layer steps the view one entry
        on, in the arrays its window keeps it in: `LayerCache.advanced`) and its layers' windows: a tuple of I ints,
        or a traced int32 [I]."""
        if self.group_layers > 1:
            x, cache = self._dense_layers(x, positions, cache, decode, window)
            window = window[-1]
        with jax.named_scope(scopes.ATTENTION):
            extra = {} if isinstance(window, int) and not window else {"window": window}
            h, cache = self.attn(self.attn_norm(x), positions, cache, decode=decode, **extra)
        x = x + h
        with jax.named_scope(scopes.MOE):
            y, dropped = self.moe(self.moe_norm(x))
        return constrain(x + y, ("batch", "length", "embed")), cache, dropped

    def _dense_layers(self, x, positions, cache, decode: bool, windows):
        """The group's dense sub-layers in order (unrolled); returns x and the cache viewed at the MoE layer."""
        graphdef, stacked = nnx.split(self.dense)
        for j in range(self.group_layers - 1):
            block = nnx.merge(graphdef, jax.tree.map(lambda a, j=j: a[j], stacked))
            x, cache, _ = block(x, positions, cache, decode=decode, window=windows[j])
            cache = None if cache is None else cache.advanced(windows[j])     # the next sub-layer's entry
        return x, cache


def period(windows: tuple[int, ...]) -> int:
    """The smallest p dividing len(windows) with windows[i] == windows[i % p] (1 when all are equal)."""
    n = len(windows)
    return next(p for p in range(1, n + 1) if n % p == 0 and windows == windows[:p] * (n // p))


def run_layers(blocks: Block, x, positions, cache, decode: bool, *, microbatch=None, keep=None, windows=None):
    """Run stacked blocks (leading layer axis) over x [B, S, D] with `lax.scan` (on a GPU, outside a pipeline:
    one after another, `unrolled`).

    Blocks of I layers (`Block.group_layers`, ``cfg.moe_interleave``): the L layers below are the blocks' layers,
    L / I blocks scanned, and `windows`, static or traced, has one entry per layer; dropped has one row per block
    (its MoE layer).

    cache: None or these layers' {"k": [L, B, K·r, T, Dh], "v": [L, B, K·r, Dh, T]} (`moe_jax.model.kv_cache`), the
    sliding and chunked layers' in rings {"local_k", "local_v"} of their own where it has them (static windows only);
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
    size = blocks.group_layers if isinstance(blocks, Block) else 1     # layers per block (a DenseBlock stack: 1)
    graphdef, stacked = nnx.split(blocks)
    num_blocks = jax.tree.leaves(stacked)[0].shape[0]
    num_layers = num_blocks * size
    ring = cache is not None and "local_k" in cache       # sliding/chunked layers keep rings (`kv_cache`)

    def one(x, kv, params, index, local_index, window, defer: bool = False):
        """One block; returns (x, kv, dropped, the cache updates it deferred: `LayerCache.deferred`)."""
        view = None if kv is None else LayerCache(kv.get("k"), kv.get("v"), index, microbatch, keep, attention,
                                                  kv.get("local_k"), kv.get("local_v"), local_index,
                                                  () if defer else None)
        extra = {} if isinstance(window, int) and not window else {"window": window}   # as before windows existed
        x, view, dropped = nnx.merge(graphdef, params)(x, positions, view, decode=decode, **extra)
        if view is None:
            return x, None, dropped, ()
        return x, {name: getattr(view, name) for name in kv}, dropped, view.deferred or ()

    kv = None if cache is None else dict(cache)
    static = windows is None or isinstance(windows, tuple)
    if not static and ring:
        raise ValueError("run_layers: a KV cache with ring arrays needs static windows (a tuple of ints); traced "
                         "windows take a cache built for the pipeline's stages (`cache_shape(..., stages=pp)`)")
    if static:
        windows = windows or (0,) * num_layers
        if len(windows) != num_layers:
            raise ValueError(f"run_layers: {len(windows)} windows for {num_layers} layers")
        if size > 1:                            # per block, its layers' windows: the pattern's unit is a block
            windows = tuple(windows[i:i + size] for i in range(0, num_layers, size))
    elif size > 1:
        windows = windows.reshape(num_blocks, size)
    p = period(windows) if static else 1

    def entries(block_windows) -> tuple[int, int]:
        """(full, ring) cache entries the layers of `block_windows` (one block's, or a sequence of blocks') take."""
        flat = [w for b in block_windows for w in (b if isinstance(b, tuple) else (b,))]
        local = sum(1 for w in flat if w) if ring else 0
        return len(flat) - local, local

    def layer(carry, per_layer):
        x, kv = carry
        params, index, local_index, *window = per_layer
        x, kv, dropped, _ = one(x, kv, params, index, local_index, window[0] if window else windows[0])
        return (x, kv), dropped

    # not in a pipeline stage: its layers run inside the ticks' loop, where the weights and the cache are the
    # loop's values, not parameters (nothing to gain), and the microbatch's index is traced
    if microbatch is None and unrolled(blocks.attn.kernels, x, prefill=not decode):
        # a decode step: GQA reads the cache as it was and writes after the last layer (`attend_with_new`)
        defer = decode and kv is not None and attention != "mla" and x.shape[1] == 1
        return _unrolled(one, stacked, x, kv, num_blocks, size, windows, static, entries, defer)

    if not static or p == 1:                    # one window for all layers (or traced ones): one block per step
        full, local = entries(windows[:1]) if static else (size, 0)
        steps = jnp.arange(num_blocks, dtype=jnp.int32)
        scanned = (stacked, steps * full, steps * local) + (() if static else (windows,))
        (x, kv), dropped = jax.lax.scan(layer, (x, kv), scanned)
        return x, kv, dropped

    full, local = entries(windows)              # per group of p blocks, and before each block of the group
    full, local = full // (num_blocks // p), local // (num_blocks // p)
    before = [entries(windows[:j]) for j in range(p)]

    def group(carry, per_group):
        x, kv = carry
        params, g = per_group
        drops = []
        for j in range(p):                      # unrolled: each block of the group with its own static window(s)
            x, kv, dropped, _ = one(x, kv, jax.tree.map(lambda a, j=j: a[j], params), g * full + before[j][0],
                                    g * local + before[j][1], windows[j])
            drops.append(dropped)
        return (x, kv), jnp.stack(drops)

    grouped = jax.tree.map(lambda a: a.reshape(num_blocks // p, p, *a.shape[1:]), stacked)
    (x, kv), dropped = jax.lax.scan(group, (x, kv), (grouped, jnp.arange(num_blocks // p, dtype=jnp.int32)))
    return x, kv, dropped.reshape(num_blocks, *dropped.shape[2:])


def unrolled(kernels: Kernels, x, prefill: bool = False) -> bool:
    """Whether a program over activations x [B, S, D] (prefill, or a decode step) runs its layers unrolled: the
    target's form (`Kernels.unrolled_layers`) for more rows per device than its in-place products take
    (`moe_jax.model.layers.in_place_rows`). With fewer (a decode step at a small batch), the products read the
    scanned weights in place already; unrolled, XLA:GPU re-lays out the KV cache (qwen3-30b-a3b at batch 1:
    1.6x the bytes the step needs, against 1.07x scanned). A prefill unrolls up to
    `Kernels.max_unrolled_prefill_rows` rows per device."""
    B, S = x.shape[:2]
    rows = B // batch_shards(B) * S
    return kernels.unrolled_layers and not in_place_rows(rows, kernels) and (
        not prefill or rows <= kernels.max_unrolled_prefill_rows)


def _unrolled(one, stacked, x, kv, num_blocks: int, size: int, windows, static: bool, entries, defer: bool):
    """`run_layers`' blocks one after another in the program, each reading its parameters and cache entries at
    indices fixed when the program is built (`unrolled`).

    Why: in a scan, XLA:GPU copies each layer's slice of a stacked weight (and of the KV cache) out before
    its gemm, every step; a slice at a constant index is read in place by the gemm fusion, but only a slice of
    a parameter. So with `defer` (GQA, one position) the layers read the cache as the step was given it and
    their writes are made after the last layer (`LayerCache.deferred`; the attention adds the position's own
    key and value apart, `moe_jax.model.attention.attend_with_new`); MLA writes as it goes.
    qwen3-30b-a3b on one H200 at batch 64 (deviceless compile): a step moves 2.29e11 bytes scanned, 0.99e11
    unrolled, 0.85e11 unrolled with deferred writes, for 0.75e11 needed. Still copied: the output
    projection's slice, for the cuBLAS call XLA picks for it (q, k and v read theirs in place with XLA's dot
    merger off: `moe_jax.model.execution.Kernels.separate_projections`).
    The program grows with the layers: that compile takes 38 s instead of 10.
    Each layer's slice is noted (`layer_of`): a Pallas kernel, which XLA would hand a copy of the slice, reads
    the stacked parameter at the layer's index instead (`layer_source`)."""
    drops, pending = [], []
    for b in range(num_blocks):
        params = jax.tree.map(lambda a, b=b: layer_of(a, b), stacked)
        if static:
            index, local_index = entries(windows[:b])      # the cache entries the blocks before this one take
            window = windows[b]
        else:                                              # traced windows: no rings, `size` entries a block
            index, local_index, window = b * size, 0, windows[b]
        x, kv, dropped, done = one(x, kv, params, index, local_index, window, defer)
        drops.append(dropped)
        pending += done
    if pending:
        # after every layer has read the cache (x depends on them all), so XLA writes it in place
        x, kv = jax.lax.optimization_barrier((x, kv))
        kv = write_deferred(kv, pending)
    return x, kv, jnp.stack(drops)


def run_dense_layers(blocks, x, positions, cache: dict | None, decode: bool, cfg: ModelConfig):
    """Run the leading dense stack (`moe_jax.model.dense_layers`) over x [B, S, D] (before the MoE layers,
    outside any pipeline).

    cache: None, or the dense layers' {"k", "v"} (`moe_jax.model.dense_layers.split_cache`).
    Returns (x, updated cache or None).
    """
    def pinned(c):
        return None if c is None else {n: constrain(a, dense_cache_axes(axes(cfg.attention, n)), what="KV cache")
                                       for n, a in c.items()}

    x, cache, _ = run_layers(blocks, x, positions, pinned(cache), decode)   # a dense layer drops nothing
    return x, pinned(cache)
