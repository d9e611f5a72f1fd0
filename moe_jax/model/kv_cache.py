"""The KV cache's layout, and one layer's view of it that reads and writes the stacked cache in place.

Layout: keys [L, B, K·r, T, Dh], values [L, B, K·r, Dh, T] (r copies of each KV head:
`moe_jax.model.transformer.cache_shape`), each head's keys and values contiguous and each array's
contracted dimension minor. Why: the decode attention's two products are batched over (sequence,
KV head); the first contracts head_dim against the keys, the second positions against the
values, and XLA:GPU lays a matmul operand out with its batch dimensions major and its contracted
dimension minor. An operand inside the layer loop takes whatever layout the matmul asks for, so
a cache stored otherwise was transposed whole into that layout ahead of every decode step and
back after it (the compiled program's largest copies: [.., T, K, Dh] moved both arrays,
[.., K, T, Dh] values still moved the values). Stored as the products read them, nothing moves.

Why a view of the stacked cache rather than each layer's slice: a layer scan that takes the cache as
its scanned input and returns the updated slices as its output builds a new [L, ...] cache every step
(XLA allocates the output stack, a temporary as large as the cache, and copies it back into the donated
input). `moe_jax.model.stack.run_layers` carries the whole cache through the scan instead; each layer
writes only its new keys and values, at its own layer index, with a small ``dynamic_update_slice`` that
XLA performs in the carried (donated) buffer, and reads its keys and values from that buffer.

Sliding-window and chunked layers (gpt-oss, Llama 4) keep only a ring of R positions (the longest window or
chunk, `ModelConfig.local_cache_len`), position t in slot t mod R: their own arrays, ``local_k`` and ``local_v``,
[Ll, B, K·r, R, Dh] beside the full layers' [Lf, B, K·r, T, Dh] (each layer's window is static, so it knows
which array and which index it owns). A decode step's query sees at most its last R keys, so the ring holds
every key it reads and the cache a deployment pays for is R, not T, positions on those layers.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.model.quant import E4M3_MAX
from moe_jax.parallel.rules import constrain

NAMES = ("k", "v")
LOCAL_NAMES = {"k": "local_k", "v": "local_v"}
"""The sliding (chunked) layers' ring arrays, by the name of the full layers' array they mirror."""

KEYS = (0, 2, 1, 3)
"""Per-layer order of keys, as a permutation of [B, S, K·r, Dh]: [B, K·r, T, Dh], head_dim (contracted
against the queries) minor."""
VALUES = (0, 2, 3, 1)
"""Per-layer order of values: [B, K·r, Dh, T], positions (contracted against the probabilities) minor."""

_AXES = ("batch", "length", "cache_heads", "head_dim")


def orders(attention: str) -> dict[str, tuple[int, ...]]:
    """Each cache array's per-layer order (`KEYS` or `VALUES`) under `attention` (`ModelConfig.attention`).

    Latent attention (`moe_jax.model.mla`) caches the latent as "k", read as keys and as values, and
    the RoPE key as "v", read as keys: both keep the keys' order (positions major)."""
    return {"k": KEYS, "v": KEYS if attention == "mla" else VALUES, "local_k": KEYS, "local_v": VALUES}


def axes(attention: str, name: str) -> tuple[str, ...]:
    """Logical axes of the cache's `name` array: ("layers", "batch", "cache_heads", then positions and
    head_dim in its order). Only layers, batch and heads are ever split: one sharding serves every array."""
    return ("layers", *(("cache_length" if a == "length" else a) for a in (_AXES[i] for i in orders(attention)[name])))


def array_shape(name: str, layers: int, batch: int, heads: int, length: int, width: int, *,
                attention: str = "gqa") -> tuple[int, ...]:
    """The shape of the cache's `name` array for `layers` layers of `batch` sequences, `heads` heads,
    `length` positions of `width` (head_dim) each: keys [L, B, K·r, T, Dh], values [L, B, K·r, Dh, T]
    (`orders`)."""
    return (layers, *((batch, length, heads, width)[i] for i in orders(attention)[name]))


def stored_as(x, dtype):
    """x cast to the cache's `dtype`. An FP8 (E4M3) cache is a plain cast, as vLLM's fp8 cache with its default
    scales of 1: keys and values keep 3 mantissa bits (at most 2^-4 relative error each, rounded to nearest),
    and values past ±448, which E4M3 cannot hold (a cast would give NaN), saturate there. Attention reads the
    cache back to the compute dtype (`LayerCache.read` callers), so only storage is in FP8."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float8_e4m3fn:
        x = jnp.clip(x, -E4M3_MAX, E4M3_MAX)
    return x.astype(dtype)


CACHE_AXES = axes("gqa", "k")
"""Logical axes the KV cache arrays are sharded by, as the keys name them ([L, B, K·r, T, Dh]; the values'
sharding is the same)."""


def _static_local(window) -> bool:
    """Whether a layer of `window` (`moe_jax.model.attention.first_visible`) is a sliding or chunked one, known
    when the program is built."""
    if not isinstance(window, int):
        raise ValueError("a KV cache with ring arrays (local_k, local_v) needs each layer's window as a Python int; "
                         "a traced window (a pipeline whose stages' window patterns differ) takes a cache built for "
                         "its stages (`cache_shape(..., stages=pp)`: full length on every layer)")
    return window != 0


class LayerCache(NamedTuple):
    """One layer's keys and values inside the stacked cache, for one microbatch of a pipeline stage or all
    sequences: what `moe_jax.model.layers.Attention` reads and writes.

    With `microbatch`, the cache's batch axis is split [Bm, M] (sequence b of a pipeline stage's batch
    at [b // M, b % M], so microbatch m is the sequences with b mod M = m, `moe_jax.model.pipeline`).

    With ring arrays (`local_k`, `local_v`), a sliding or chunked layer (its `window` non-zero) keeps its keys
    and values there, at `local_layer`, position t in slot t mod R; the others in `k`, `v` at `layer`. Every
    method takes the calling layer's `window` to find its own.
    """

    k: jax.Array | None
    """The full layers' stacked keys [Lf, B, K·r, T, Dh], or a pipeline stage's [Lf, Bm, M, K·r, T, Dh]; None when
    every layer is a ring layer."""
    v: jax.Array | None
    """The full layers' stacked values [Lf, B, K·r, Dh, T], or a pipeline stage's [Lf, Bm, M, K·r, Dh, T]."""
    layer: jax.Array
    """int32 scalar: this layer's index on the full arrays' leading axis."""
    microbatch: jax.Array | None = None
    """int32 scalar m with the cache's batch split [Bm, M]; None: the batch axis is whole."""
    keep: jax.Array | None = None
    """Traced bool: False leaves the cache as it was on `write` (a pipeline tick in the bubble); None: always write."""
    attention: str = "gqa"
    """`ModelConfig.attention`: which order each array is stored in (`orders`)."""
    local_k: jax.Array | None = None
    """The ring layers' keys [Ll, B, K·r, R, Dh] (or a stage's, batch split); None: no ring."""
    local_v: jax.Array | None = None
    """The ring layers' values [Ll, B, K·r, Dh, R]."""
    local_layer: jax.Array | int = 0
    """int32 scalar: this layer's index on the ring arrays' leading axis (a ring layer's)."""
    deferred: tuple | None = None
    """None: `write` updates the arrays. A tuple: `write` leaves them as they were and adds its updates here,
    ((field, index, values), ...), for `write_deferred` to make after the last layer has read the cache (one
    decode position per call): each layer then reads the cache it was given, not one the step just updated.
    Why: XLA:GPU's gemm fusion reads a layer's slice in place only when it is sliced from a parameter
    (`moe_jax.model.stack.run_layers` unrolled); the new position's keys and values join the attention apart
    (`moe_jax.model.attention.attend_with_new`)."""

    def ring(self, window=0) -> bool:
        """Whether the layer of `window` keeps its keys and values in the ring arrays."""
        return self.local_k is not None and _static_local(window)

    def _array(self, name: str, window) -> tuple[str, jax.Array, jax.Array]:
        """(field, the stacked array, this layer's index on it) holding the layer of `window`'s `name` array."""
        if self.ring(window):
            return LOCAL_NAMES[name], getattr(self, LOCAL_NAMES[name]), self.local_layer
        return name, getattr(self, name), self.layer

    @property
    def heads(self) -> int:
        """K·r: the KV heads the cache holds."""
        return (self.k if self.k is not None else self.local_k).shape[-3]

    def length_for(self, window=0) -> int:
        """T (R for a ring layer): the positions the layer of `window` holds."""
        return self._array("k", window)[1].shape[-2]

    def advanced(self, window=0) -> LayerCache:
        """The view of the next layer after one of `window`: one further on that layer's arrays."""
        if self.ring(window):
            return self._replace(local_layer=self.local_layer + 1)
        return self._replace(layer=self.layer + 1)

    def _lead(self, index) -> tuple:
        return (index, 0) if self.microbatch is None else (index, 0, self.microbatch)

    def stored(self, name: str, window=0) -> jax.Array:
        """This layer's keys or values in their stored order (`orders`): keys [B, K·r, T, Dh], values
        [B, K·r, Dh, T], a slice of the stacked array at this layer (and microbatch)."""
        field, a, index = self._array(name, window)
        lead, tail = self._lead(index), a.shape[-3:]
        size = (1, a.shape[1], *([1] * (len(lead) - 2)), *tail)
        stored = jax.lax.dynamic_slice(a, (*lead, 0, 0, 0), size).reshape(a.shape[1], *tail)
        return constrain(stored, axes(self.attention, field)[1:], what="KV cache")

    def read(self, name: str, window=0) -> jax.Array:
        """This layer's keys or values as the attention reads them, [B, T, K·r, Dh]: a transposed view of the
        stored slice, which XLA folds into the products' operand layout (no data moves)."""
        order = orders(self.attention)[name]
        return jnp.transpose(self.stored(name, window), [order.index(i) for i in range(4)])

    def positions(self, last, window=0) -> jax.Array:
        """int32 [T]: the position each slot of the layer of `window` holds once position `last` is written: the
        slot itself on a full layer; on a ring layer of R slots, last − ((last − slot) mod R), negative for a slot
        not yet written."""
        T = self.length_for(window)
        slots = jnp.arange(T, dtype=jnp.int32)
        return last - (last - slots) % T if self.ring(window) else slots

    @property
    def dtype(self):
        """The dtype the cache stores keys and values in."""
        return (self.k if self.k is not None else self.local_k).dtype

    def write(self, k, v, start, window=0) -> LayerCache:
        """The cache with this layer's keys and values k, v [B, S, K·r, Dh] stored at positions [start, start + S).

        Only the new positions are written (in place in a donated or scan-carried buffer); under `keep`
        False, the positions are rewritten with what they held. A ring layer writes position t in slot t mod R,
        of a call longer than R its last R positions (the whole ring, rewritten once). A `deferred` view
        records the update instead (one position, S = 1).
        """
        if self.deferred is not None and k.shape[1] != 1:
            raise ValueError(f"a deferred KV cache write takes one position per call (decode), not {k.shape[1]}")
        out, pending = {}, []
        for name, new in zip(NAMES, (k, v), strict=True):
            field, a, layer = self._array(name, window)
            order = orders(self.attention)[name]
            lead = self._lead(layer)
            S, R, at = new.shape[1], self.length_for(window), start
            if self.ring(window) and S > 1:          # the ring's slots, rolled into place, merged with what it held
                n = min(S, R)
                first = (start + S - n) % R
                new = jnp.roll(jnp.pad(new[:, S - n:], ((0, 0), (0, R - n), (0, 0), (0, 0))), first, axis=1)
                written = jnp.roll(jnp.arange(R) < n, first)
                old = self.read(name, window).astype(new.dtype)
                new, at = jnp.where(written[None, :, None, None], new, old), 0
            elif self.ring(window):
                at = start % R
            new = constrain(jnp.transpose(stored_as(new, a.dtype), order), axes(self.attention, field)[1:],
                            what="KV cache")
            new = new.reshape(1, new.shape[0], *([1] * (len(lead) - 2)), *new.shape[1:])
            index = (*lead, *(at if i == 1 else 0 for i in order[1:]))
            if self.keep is not None:
                new = jnp.where(self.keep, new, jax.lax.dynamic_slice(a, index, new.shape))
            if self.deferred is not None:
                pending.append((field, index, new))
                continue
            out[field] = jax.lax.dynamic_update_slice(a, new, index)
        if self.deferred is not None:
            return self._replace(deferred=(*self.deferred, *pending))
        return self._replace(**out)


def write_deferred(cache: dict, pending) -> dict:
    """`cache` ({field: stacked array}) with the updates deferred views recorded (`LayerCache.deferred`) made,
    each in place (under the views' `keep`, what `LayerCache.write` recorded is already what the slots held)."""
    cache = dict(cache)
    for field, index, new in pending:
        cache[field] = jax.lax.dynamic_update_slice(cache[field], new, index)
    return cache
