"""The decoder: embedding, L stacked blocks (attention + MoE) run by `lax.scan`, final norm, output head.

The stack holds ``cfg.moe_layers`` blocks, each one MoE layer and, with ``cfg.moe_interleave`` I > 1, the I − 1
dense layers before it (`moe_jax.model.stack`); its cache one entry per layer of the stack (``cfg.stack_layers``).

Three entry points share one body:
- ``model(tokens)``: full forward over all positions, no cache (the reference);
- ``model.prefill(tokens, cache)``: the prompt, writing the cache at positions [0, S); the output
  head runs on the last position only (serving needs nothing else), or on every position with
  ``full_logits=True``;
- ``model.decode(tokens, pos, cache)``: one new token per sequence at position `pos`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.model import kv_cache, scopes
from moe_jax.model.dense_layers import dense_cache_axes, dense_cache_shape, join_cache, make_dense_blocks, split_cache
from moe_jax.model.execution import Execution
from moe_jax.model.kv_cache import LOCAL_NAMES, NAMES, array_shape, axes
from moe_jax.model.layers import F32, Norm, param
from moe_jax.model.pipeline import run_pipeline
from moe_jax.model.stack import Block, run_dense_layers, run_layers
from moe_jax.parallel.rules import constrain

CACHE_AXES = kv_cache.CACHE_AXES
"""Logical axes the KV cache arrays are sharded by (`moe_jax.model.kv_cache`: keys [L, B, K·r, T, Dh], values
[L, B, K·r, Dh, T]; one sharding serves both)."""


class ModelOutput(NamedTuple):
    """What a forward pass returns."""

    logits: jax.Array
    """[B, S, V] float32; [B, 1, V] (the last position) from a serving prefill."""
    cache: dict | None
    """{"k": [L, B, K·r, T, Dh], "v": [L, B, K·r, Dh, T]} after this call's writes (`cache_shape`); None for a
    cacheless forward."""
    dropped: jax.Array
    """Token-expert assignments dropped by capacity dispatch (or a bounded dropless buffer), per MoE layer and
    token group: int32 [L_moe, G], the layers in order (the dense layers, which drop nothing, are not in it: the
    ``first_dense_layers`` and, with ``moe_interleave``, those between MoE layers); ``.sum()`` is the total,
    ``.sum(axis=1)`` the count per layer. Kept per group so counting needs no collective."""


def cache_array_axes(name: str) -> tuple[str, ...]:
    """Logical axes of the cache array `name` of `cache_shape`: `CACHE_AXES` (the full layers' and the rings'),
    or with ``dense_layers`` leading (the leading dense layers' own arrays)."""
    return dense_cache_axes(CACHE_AXES) if name.startswith("dense_") else CACHE_AXES


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None, *, kv_copies: int = 1) -> dict:
    """An empty KV cache for `batch` sequences of up to `max_len` positions (see `cache_shape`)."""
    return {name: jnp.zeros(s.shape, s.dtype) for name, s in cache_shape(cfg, batch, max_len, dtype,
                                                                         kv_copies=kv_copies).items()}


def cache_shape(cfg: ModelConfig, batch: int, max_len: int, dtype=None, *, kv_copies: int = 1,
                stages: int = 1) -> dict:
    """`init_cache` as ShapeDtypeStructs (nothing allocated): keys {"k": [L, B, K·kv_copies, T, Dh]} and
    values {"v": [L, B, K·kv_copies, Dh, T]}, L the layer stack's layers (``cfg.stack_layers``).

    Heads before positions, and each array's contracted dimension minor: the layout the decode
    attention's products read without a transpose (`moe_jax.model.kv_cache`). Both arrays are sharded
    alike (logical axes `CACHE_AXES`: layers, batch and heads are the split ones).

    kv_copies: r, the copies of each KV head, head e of the cache being head e // r; the layout's
    (`moe_jax.parallel.rules.Layout.kv_copies`: tp / K when tp exceeds the K KV heads, so each tp rank
    holds one head), 1 for an unsharded model. The model reads r from the layout it runs under.

    Sliding-window and chunked layers keep a ring of R = `ModelConfig.local_cache_len` positions, in their own
    arrays "local_k" [Ll, B, K·r, R, Dh] and "local_v" [Ll, B, K·r, Dh, R] (`moe_jax.model.kv_cache`); "k" and "v"
    then hold the Lf full layers (and are left out when there are none). stages: the pipeline stages the cache is
    for (a pipeline whose stages' window patterns differ keeps every layer at full length).
    """
    dt = jnp.dtype(dtype or cfg.cache_dtype)
    if cfg.attention == "mla":   # `moe_jax.model.mla`: "k" holds the latent (one head of width R), "v" the RoPE key
        shapes = {name: jax.ShapeDtypeStruct(array_shape(name, cfg.stack_layers, batch, 1, max_len, width,
                                                         attention=cfg.attention), dt)
                  for name, width in (("k", cfg.kv_lora_rank), ("v", cfg.qk_rope_head_dim))}
    else:
        ring = cfg.local_cache_len(max_len, stages)
        local = cfg.local_layers if ring else 0
        heads = cfg.num_kv_heads * kv_copies
        shapes = {}
        if cfg.stack_layers > local:
            dims = (cfg.stack_layers - local, batch, heads, max_len, cfg.head_dim)
            shapes.update({name: jax.ShapeDtypeStruct(array_shape(name, *dims), dt) for name in NAMES})
        if local:
            dims = (local, batch, heads, ring, cfg.head_dim)
            shapes.update({LOCAL_NAMES[name]: jax.ShapeDtypeStruct(array_shape(name, *dims), dt) for name in NAMES})
    # the leading dense layers' own arrays, "dense_k" and "dense_v" (`moe_jax.model.dense_layers`)
    return {**shapes, **dense_cache_shape(shapes, cfg)} if cfg.first_dense_layers else shapes


class Transformer(nnx.Module):
    """The MoE decoder. Parameters of the blocks (``cfg.moe_layers``, each an MoE layer and any dense layers
    interleaved before it) are stacked on a leading ``layers`` axis.

    execution: what it is built for (the target's kernels, pipeline stages and microbatches); by default
    unpipelined on jax's default backend. A pipelined model runs under its sharded layout
    (`moe_jax.programs.sharded.ShardedModel` builds both).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, execution: Execution | None = None):
        self.cfg = cfg
        self.execution = execution = execution or Execution.local()
        D, V = cfg.d_model, cfg.vocab_size
        self.embed_vd = param(rngs, (V, D), ("vocab", "embed"), cfg.dtype, fan_in=1)

        @nnx.split_rngs(splits=cfg.moe_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "axes": "layers"})
        def make_blocks(rngs: nnx.Rngs):
            return Block(cfg, rngs=rngs, kernels=execution.kernels)

        self.blocks = make_blocks(rngs)
        if cfg.first_dense_layers:   # DeepSeek-V3's leading dense layers: a stack of their own, run first
            self.dense_blocks = make_dense_blocks(cfg, rngs, execution.kernels)
        self.final_norm = Norm((D,), ("embed",), cfg)
        if not cfg.tie_embeddings:
            self.head_dv = param(rngs, (D, V), ("embed", "vocab"), cfg.dtype, fan_in=D)

    def _run(self, tokens, start, cache, decode: bool, last_only: bool = False) -> ModelOutput:
        """last_only: the final norm and output head see the last position only (logits [B, 1, V])."""
        cfg = self.cfg
        B, S = tokens.shape
        positions = start + jnp.arange(S, dtype=jnp.int32)
        tokens = constrain(tokens, ("batch", "length"))
        cache, dense_cache = split_cache(cache)                 # the dense layers' arrays, if any, apart
        if cache is not None:
            cache = {name: constrain(c, axes(cfg.attention, name), what="KV cache") for name, c in cache.items()}
        with jax.named_scope(scopes.EMBED):
            x = constrain(jnp.take(self.embed_vd[...], tokens, axis=0), ("batch", "length", "embed"))

        if cfg.first_dense_layers:
            x, dense_cache = run_dense_layers(self.dense_blocks, x, positions, dense_cache, decode, cfg)
        if self.execution.pipeline is not None:
            x, new_cache, dropped = run_pipeline(self.blocks, x, positions, cache, decode, self.execution.pipeline,
                                                 last_only=last_only, windows=cfg.layer_windows)
        else:
            x, new_cache, dropped = run_layers(self.blocks, x, positions, cache, decode, windows=cfg.layer_windows)
            if last_only:
                x = x[:, -1:]                                   # [B, 1, D]
        if new_cache is not None:
            new_cache = {name: constrain(c, axes(cfg.attention, name), what="KV cache")
                         for name, c in new_cache.items()}
            new_cache = join_cache(new_cache, dense_cache)

        with jax.named_scope(scopes.HEAD):
            x = self.final_norm(x)
            head = self.embed_vd[...].T if cfg.tie_embeddings else self.head_dv[...]
            logits = jnp.einsum("bsd,dv->bsv", x, head, preferred_element_type=F32)
            logits = constrain(logits, ("batch", "length", "vocab"))
        return ModelOutput(logits, new_cache, dropped)

    def __call__(self, tokens) -> ModelOutput:
        """Full forward over tokens [B, S] from position 0, no cache."""
        return self._run(tokens, jnp.int32(0), None, decode=False)

    def prefill(self, tokens, cache, *, full_logits: bool = False) -> ModelOutput:
        """Process the prompt tokens [B, S] and write their keys/values at cache positions [0, S).

        Logits [B, 1, V] of the last position (what picks the next token): the head's matmul
        runs on one position per sequence. full_logits: [B, S, V], every position.
        """
        return self._run(tokens, jnp.int32(0), cache, decode=False, last_only=not full_logits)

    def decode(self, tokens, pos, cache) -> ModelOutput:
        """One step: tokens [B, 1] at position `pos` (int32 scalar), attending to cache positions ≤ pos.

        pos must be below the cache length T: XLA clamps an out-of-range write to the
        last slot without an error, so callers check it (it is traced here).
        """
        return self._run(tokens, jnp.asarray(pos, jnp.int32), cache, decode=True)
