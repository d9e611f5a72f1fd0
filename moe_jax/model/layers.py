"""Transformer building blocks: parameters with logical axes, norms, RoPE, GQA attention with a KV cache.

Shape letters: see `moe_jax.config`. Every parameter is an ``nnx.Param`` whose ``axes``
metadata names its logical axes; `moe_jax.parallel.rules` maps those to mesh axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.errors import ShardingError
from moe_jax.model.attention import attend, causal_attend
from moe_jax.model.execution import Kernels
from moe_jax.parallel.rules import batch_shards, constrain, kv_copies_in_force

F32 = jnp.float32


def param(rngs: nnx.Rngs | None, shape, axes, dtype, *, fan_in: int | None = None, init: str = "normal"):
    """A parameter with logical `axes`: N(0, 1/fan_in) (``normal``) or ones (``ones``)."""
    if init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (jax.random.normal(rngs.params(), shape, F32) * fan_in ** -0.5).astype(dtype)
    return nnx.Param(value, axes=tuple(axes))


def weight_einsum(spec: str, x, w, *, in_place: bool = False):
    """``jnp.einsum(spec, x, w)`` for activations x times a stored weight w; written as a product and an
    f32 sum instead with `in_place`, which callers set when x has one row per weight matrix on this
    device (decode at batch 1) and the target is a GPU (`Kernels.in_place_weight_einsum`).

    XLA:GPU multiplies one row by a large matrix with a gemm kernel, which does not read a weight
    inside the scan's stacked parameter: each layer's slice is first copied out, every step. Its own
    rewrite of a small one-row product to a reduction reads the slice in place, but may relay out
    the whole stacked parameter ahead of the layer loop (the layer index folded into the reduced
    dimensions). As a sum over the stored weight's contracted dimensions, minor (row reductions),
    the weight is read once, where it is stored. The products are exact in f32; the sum is f32.
    """
    if not in_place:
        return jnp.einsum(spec, x, w)
    inputs, out = spec.split("->")
    xs, ws = inputs.split(",")
    full = "".join(c for c in out if c not in ws) + ws       # the weight's own order: no transpose of it
    if set(xs) - set(full):
        raise ValueError(f"weight_einsum {spec!r}: x may only have dimensions of the output or the weight")

    def aligned(a, letters):
        kept = [c for c in full if c in letters]
        a = jnp.transpose(a, [letters.index(c) for c in kept])
        return jnp.expand_dims(a, [i for i, c in enumerate(full) if c not in letters]).astype(F32)

    summed = jnp.sum(aligned(x, xs) * aligned(w, ws), axis=tuple(i for i, c in enumerate(full) if c not in out))
    left = [c for c in full if c in out]
    return jnp.transpose(summed, [left.index(c) for c in out]).astype(jnp.result_type(x, w))


def repeat_kv_heads(w, copies: int, axes):
    """w [K, ...] (a KV-head weight, replicated over tp when tp exceeds K) as [K·copies, ...], head e a copy
    of head e // copies, pinned to logical `axes` (first ``cache_heads``, split over tp).

    Why the parameters stay [K, Dh, D] and are expanded here rather than stored expanded per strategy:
    checkpoints, the unsharded reference and `ShardedModel.shard_params` keep one layout, and the
    expansion is nearly free. The repeat's result is constrained to its tp split, so the SPMD
    partitioner gives each device only its own head, a local slice of the replicated weight with no
    communication, and the projection that follows computes that head only (prefill and decode do
    1/K of the K-head projection FLOPs). The price, as XLA:GPU/TPU compile it: each call slices the
    device's head out of the stacked weight once, ahead of the layer loop, [L, 1, Dh, D] per weight
    (for qwen3-30b-a3b under TP8, 2 x 25 MB read and written per decode step, 0.6% of the device's
    7.8 GB of weights), and the device keeps all K heads' weights (K/V weights are small).
    """
    if copies == 1:
        return w
    return constrain(jnp.repeat(w, copies, axis=0), axes, what="KV-head weight repeated for the cache's heads")


class Norm(nnx.Module):
    """RMSNorm or bias-free LayerNorm over the trailing axes of its weight, computed in f32."""

    def __init__(self, shape, axes, cfg: ModelConfig):
        self.kind = cfg.norm
        self.eps = cfg.norm_eps
        self.scale = param(None, shape, axes, cfg.dtype, init="ones")

    def __call__(self, x, *, kv_copies: int = 1):
        """kv_copies: x holds K·r KV heads, r copies of each (`repeat_kv_heads`); a per-head scale [K, Dh]
        is repeated to match. Leave at 1 for any other norm."""
        reduce = tuple(range(x.ndim - self.scale.ndim, x.ndim))
        xf = x.astype(F32)
        if self.kind == "layer":
            xf = xf - jnp.mean(xf, axis=reduce, keepdims=True)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=reduce, keepdims=True) + self.eps)
        scale = self.scale[...]
        if scale.ndim == 2:                                     # [K, Dh]: one scale per KV head
            scale = repeat_kv_heads(scale, kv_copies, ("cache_heads", "head_dim"))
        return (y * scale.astype(F32)).astype(x.dtype)


def rope(x, positions, theta: float):
    """Rotary embedding, half-split layout (as Hugging Face's rotate_half). x [B, S, N, Dh], positions [S]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=F32) / half)
    angles = positions.astype(F32)[:, None] * inv_freq[None, :]            # [S, Dh/2]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    xf = x.astype(F32)
    x1, x2 = xf[..., :half], xf[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    """GQA self-attention with optional QK-norm and qkv clipping; reads and writes a KV cache.

    kernels: the target's, fixed when it is built (how a one-row projection reads its weight).

    Under a layout where tp exceeds the K KV heads (`moe_jax.parallel.rules.Layout.kv_copies` r > 1),
    keys and values have K·r heads, r copies of each, split over tp: each device projects, stores
    and reads only the one head its H / tp query heads use (the K/V weights are repeated to match,
    `repeat_kv_heads`), so no device holds the whole cache or computes another device's head.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, kernels: Kernels):
        D, H, K, Dh, dt = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dtype
        self.cfg = cfg
        self.kernels = kernels
        self.wq_hkd = param(rngs, (H, Dh, D), ("heads", "head_dim", "embed"), dt, fan_in=D)
        self.wk_kkd = param(rngs, (K, Dh, D), ("kv_heads", "head_dim", "embed"), dt, fan_in=D)
        self.wv_kkd = param(rngs, (K, Dh, D), ("kv_heads", "head_dim", "embed"), dt, fan_in=D)
        self.wo_dhk = param(rngs, (D, H, Dh), ("embed", "heads", "head_dim"), dt, fan_in=H * Dh)
        if cfg.qk_norm == "head":
            self.q_norm = Norm((Dh,), ("head_dim",), cfg)
            self.k_norm = Norm((Dh,), ("head_dim",), cfg)
        elif cfg.qk_norm == "full":
            self.q_norm = Norm((H, Dh), ("heads", "head_dim"), cfg)
            self.k_norm = Norm((K, Dh), ("kv_heads", "head_dim"), cfg)

    def __call__(self, x, positions, cache=None, *, decode: bool = False):
        """x [B, S, D], positions [S] (consecutive, start = positions[0]).

        cache: None, or this layer's `moe_jax.model.kv_cache.LayerCache` (K·r heads, r: the layout's
        `kv_copies`); this call writes its keys and values at positions, in place. decode=False attends to
        this call's own keys (prefill from 0, or a full forward); decode=True attends to the whole cache
        (positions ≤ the query's).
        Returns (y [B, S, D], the LayerCache after the write, or None).
        """
        cfg = self.cfg
        B, S, _ = x.shape
        in_place = B // batch_shards(B) * S == 1 and self.kernels.in_place_weight_einsum   # one row per device
        r = kv_copies_in_force()
        heads = cfg.num_kv_heads * r
        if cache is not None and cache.heads != heads:
            raise ShardingError(f"KV cache has {cache.heads} heads; this layout stores {heads} "
                                f"({cfg.num_kv_heads} KV heads x {r} copies): build it with "
                                f"cache_shape(..., kv_copies={r})")
        w_axes = ("cache_heads", "head_dim", "embed")
        q = weight_einsum("bsd,hkd->bshk", x, self.wq_hkd[...], in_place=in_place)
        k = weight_einsum("bsd,khd->bskh", x, repeat_kv_heads(self.wk_kkd[...], r, w_axes), in_place=in_place)
        v = weight_einsum("bsd,khd->bskh", x, repeat_kv_heads(self.wv_kkd[...], r, w_axes), in_place=in_place)
        if cfg.clip_qkv is not None:
            q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        if cfg.qk_norm != "none":
            q, k = self.q_norm(q), self.k_norm(k, kv_copies=r)
        q = constrain(rope(q, positions, cfg.rope_theta), ("batch", "length", "heads", "head_dim"))
        k = constrain(rope(k, positions, cfg.rope_theta), ("batch", "length", "cache_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "cache_heads", "head_dim"))

        keys, values, key_pos = k, v, positions
        if cache is not None:
            cache = cache.write(k, v, positions[0])                            # in place: the new positions only
            if decode:                                                         # [B, T, K·r, Dh] views of the cache
                keys, values = cache.read("k").astype(q.dtype), cache.read("v").astype(q.dtype)
                key_pos = jnp.arange(cache.length)
        if decode:                                                             # the cache, masked by position
            out = attend(q, keys, values, key_pos[None, :] <= positions[:, None])  # [B, S, H, Dh]
        else:                                                                  # this call's own keys: causal
            out = causal_attend(q, keys, values)                               # blockwise, no S x S
        y = weight_einsum("bshk,dhk->bsd", out, self.wo_dhk[...], in_place=in_place)
        return constrain(y, ("batch", "length", "embed")), cache
