"""Transformer building blocks: parameters with logical axes, norms, RoPE, GQA attention with a KV cache.

Shape letters: see `moe_jax.config`. Every parameter is an ``nnx.Param`` whose ``axes``
metadata names its logical axes; `moe_jax.parallel.rules` maps those to mesh axes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.errors import ShardingError
from moe_jax.model import flash
from moe_jax.model.attention import attend, attend_stored, attend_with_new, causal_attend, first_visible, window_mask
from moe_jax.model.execution import Kernels
from moe_jax.model.kv_cache import KEYS, VALUES, stored_as
from moe_jax.model.quant import Fp8Weight, fp8_source
from moe_jax.names import FP8
from moe_jax.parallel.rules import batch_shards, constrain, kv_copies_in_force

F32 = jnp.float32


def param(rngs: nnx.Rngs | None, shape, axes, dtype, *, fan_in: int | None = None, init: str = "normal"):
    """A parameter with logical `axes`: N(0, 1/fan_in) (``normal``) or ones (``ones``)."""
    if init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (jax.random.normal(rngs.params(), shape, F32) * fan_in ** -0.5).astype(dtype)
    return nnx.Param(value, axes=tuple(axes))


def weight(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig, *, fan_in: int):
    """A matmul weight of the layers, N(0, 1/fan_in), stored in ``cfg.param_dtype``: a plain parameter, or with
    FP8 weights an `moe_jax.model.quant.Fp8Weight` (FP8 values and per-matrix scales) that reads as the weight
    dequantized to ``cfg.dtype``. Callers read either as ``w[...]`` right before the matmul: one code path.
    The random FP8 weight is the ``cfg.dtype`` one quantized, as a checkpoint in that dtype loads
    (`moe_jax.checkpoints.weights.load_params`): an FP8 model is its bf16 twin, quantized."""
    if cfg.param_dtype == FP8:
        values = param(rngs, shape, axes, cfg.dtype, fan_in=fan_in)[...]
        return Fp8Weight(values, axes, cfg.dtype)
    return param(rngs, shape, axes, cfg.param_dtype, fan_in=fan_in)


def weight_einsum(spec: str, x, w, *, in_place: bool = False):
    """``jnp.einsum(spec, x, w)`` for activations x times a stored weight w; written as a product and an
    f32 sum instead with `in_place`, which callers set when x has few rows per weight matrix on this
    device (decode; `in_place_rows`) and the target is a GPU (`Kernels.in_place_weight_einsum`).

    XLA:GPU multiplies one row by a large matrix with a gemm kernel, which does not read a weight
    inside the scan's stacked parameter: each layer's slice is first copied out, every step. Its own
    rewrite of a small one-row product to a reduction reads the slice in place, but may relay out
    the whole stacked parameter ahead of the layer loop (the layer index folded into the reduced
    dimensions). As a sum over the stored weight's contracted dimensions, minor (row reductions),
    the weight is read once, where it is stored. The products are exact in f32; the sum is f32.

    An FP8 weight's read (`moe_jax.model.quant.fp8_source`) is multiplied as its stored FP8 values, converted
    inside the product's fusion (to the compute dtype for the matmul, straight to f32 in place), and the output
    is multiplied by each matrix's scale (its dimensions ``ws[:-2]`` are output dimensions): exact, the scales
    being powers of two, and XLA then neither writes the dequantized weight nor re-lays out the stacked one.
    """
    inputs, out = spec.split("->")
    xs, ws = inputs.split(",")
    dtype = jnp.result_type(x, w)
    source = fp8_source(w)
    scale = None
    if source is not None and set(ws[:-2]) <= set(out):
        w, scale = source
    if scale is None and not in_place:
        return jnp.einsum(spec, x, w)
    if not in_place:
        y = jnp.einsum(spec, x, w.astype(dtype))
    else:
        full = _reduction_order(out, ws)
        if set(xs) - set(full):
            raise ValueError(f"weight_einsum {spec!r}: x may only have dimensions of the output or the weight")

        def aligned(a, letters):
            kept = [c for c in full if c in letters]
            a = jnp.transpose(a, [letters.index(c) for c in kept])
            return jnp.expand_dims(a, [i for i, c in enumerate(full) if c not in letters]).astype(F32)

        summed = jnp.sum(aligned(x, xs) * aligned(w, ws), axis=tuple(i for i, c in enumerate(full) if c not in out))
        left = [c for c in full if c in out]
        y = jnp.transpose(summed, [left.index(c) for c in out]).astype(dtype)
    if scale is None:
        return y
    lead = ws[:-2]                                            # one scale per matrix: [*lead, 1]
    kept = [c for c in out if c in lead]
    per_matrix = jnp.transpose(scale.reshape(scale.shape[:-1]), [lead.index(c) for c in kept])
    return y * jnp.expand_dims(per_matrix, [i for i, c in enumerate(out) if c not in lead]).astype(dtype)


def in_place_rows(rows: int, kernels: Kernels) -> bool:
    """Whether `weight_einsum` should read the weight in place (`in_place`) for `rows` activation rows per weight
    matrix on this device (decode: batch rows, or an expert's capacity slots), on `kernels`' target: a GPU
    (`Kernels.in_place_weight_einsum`) and at most `Kernels.max_in_place_rows` rows."""
    return kernels.in_place_weight_einsum and rows <= kernels.max_in_place_rows


def _reduction_order(out: str, ws: str) -> str:
    """The dimension order of `weight_einsum`'s in-place product: the weight's own order (no transpose of it),
    with the activation's own output dimensions (its rows) placed just before the weight's contracted ones when
    those are its trailing (minor) dimensions. The reduction's output then iterates each weight row's activation
    rows consecutively: with several rows per matrix, a weight row is re-read while it is still in the GPU's
    L1/L2, not once per activation row after the whole weight has streamed by (as rows-major would)."""
    rows = "".join(c for c in out if c not in ws)
    kept = "".join(c for c in ws if c in out)
    if ws.startswith(kept):                                   # contracted dimensions trailing: rows before them
        return kept + rows + ws[len(kept):]
    return rows + ws


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


def yarn_frequencies(cfg: ModelConfig, dim: int) -> tuple[np.ndarray, float]:
    """(inverse frequencies [dim/2], cos/sin factor) of a RoPE over `dim` dims with ``cfg``'s YaRN scaling, as
    transformers' ``_compute_yarn_parameters`` computes them (``rope_yarn_truncate``: whole-dimension correction
    bounds; the factor from ``rope_yarn_mscale`` / ``rope_yarn_mscale_all_dim``, else 0.1·ln(factor) + 1)."""
    base, factor, original = cfg.rope_theta, cfg.rope_yarn_factor, cfg.rope_yarn_original_len
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_yarn_beta_fast), correction_dim(cfg.rope_yarn_beta_slow)
    if cfg.rope_yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001                                   # as transformers: no zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * (1 - ramp)

    def mscale(m=1.0):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if cfg.rope_yarn_mscale and cfg.rope_yarn_mscale_all_dim:
        return inv_freq.astype(np.float32), mscale(cfg.rope_yarn_mscale) / mscale(cfg.rope_yarn_mscale_all_dim)
    return inv_freq.astype(np.float32), mscale()


def llama3_frequencies(cfg: ModelConfig, dim: int) -> np.ndarray:
    """Inverse frequencies [dim/2] of a RoPE over `dim` dims with Llama 3 scaling (``rope_llama3_*``), as
    transformers' ``_compute_llama3_parameters``: wavelengths past original_len / low_freq divided by the factor,
    those below original_len / high_freq kept, the ones between interpolated smoothly."""
    factor, low, high = cfg.rope_llama3_factor, cfg.rope_llama3_low_freq, cfg.rope_llama3_high_freq
    original = cfg.rope_llama3_original_len
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
    medium = ~(wavelen < original / high) & ~(wavelen > original / low)
    if high != low:                                     # equal factors: no medium band but one wavelength's edge
        smooth = (original / wavelen - low) / (high - low)
        scaled = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return scaled.astype(np.float32)


def l2_norm(x, eps: float):
    """Llama 4's qk-norm: x · rsqrt(mean(x²) + eps) over the head dim, in f32, no weight."""
    xf = x.astype(F32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def temperature_scale(positions, cfg: ModelConfig):
    """Llama 4's attention temperature tuning: f32 [S] query scales 1 + attn_scale·ln(1 + ⌊(p + 1)/floor⌋)."""
    p = positions.astype(F32)
    return jnp.log1p(jnp.floor((p + 1.0) / cfg.attn_floor_scale)) * cfg.attn_scale + 1.0


def rope(x, positions, theta: float, rotary_dim: int = 0, *, cfg: ModelConfig | None = None):
    """Rotary embedding, half-split layout (as Hugging Face's rotate_half). x [B, S, N, Dh], positions [S].

    rotary_dim: rotate only x[..., :rotary_dim] (its two halves pair up, frequencies over rotary_dim, as
    transformers' partial rotary: GLM-4.5) and pass the rest through; 0 or Dh rotates the whole head.
    cfg: a config whose ``rope_yarn_factor`` > 1 scales the frequencies and cos/sin by YaRN (`yarn_frequencies`;
    gpt-oss), or whose ``rope_llama3_factor`` > 1 by Llama 3's scaling (`llama3_frequencies`; Llama 4); None or
    factor 1: plain RoPE of base `theta`. A config with ``rope_interleave`` (Llama 4's checkpoints: pairs
    (x0, x1), (x2, x3), ...) rotates interleaved pairs, the output de-interleaved (evens then odds): queries and
    keys alike, so their dot products are those of the interleaved form."""
    if cfg is not None and cfg.rope_interleave:
        x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
    if 0 < rotary_dim < x.shape[-1]:
        return jnp.concatenate([rope(x[..., :rotary_dim], positions, theta, cfg=cfg), x[..., rotary_dim:]], axis=-1)
    half = x.shape[-1] // 2
    inv_freq, factor = 1.0 / theta ** (jnp.arange(half, dtype=F32) / half), 1.0
    if cfg is not None and cfg.rope_yarn_factor != 1:
        inv_freq, factor = yarn_frequencies(cfg, x.shape[-1])
        inv_freq = jnp.asarray(inv_freq)
    elif cfg is not None and cfg.rope_llama3_factor != 1:
        inv_freq = jnp.asarray(llama3_frequencies(cfg, x.shape[-1]))
    angles = positions.astype(F32)[:, None] * inv_freq[None, :]            # [S, Dh/2]
    cos, sin = jnp.cos(angles)[None, :, None, :] * factor, jnp.sin(angles)[None, :, None, :] * factor
    xf = x.astype(F32)
    x1, x2 = xf[..., :half], xf[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    """GQA self-attention with optional QK-norm, qkv clipping, q/k/v projection biases and partial RoPE
    (``cfg.rotary_dim``), gpt-oss's output bias, attention sinks, YaRN RoPE and sliding-window layers, and
    Llama 4's chunked layers, NoPE full layers with temperature tuning, L2 qk-norm and interleaved RoPE pairs;
    reads and writes a KV cache. Each bias is split as its projection's output (heads over tp; a K/V bias
    repeated with its weight when tp exceeds K; the output bias replicated). The sinks [H] split as the heads.

    kernels: the target's, fixed when it is built (how a few-row projection reads its weight, and whether a
    decode step reads the cache as stored: `moe_jax.model.attention.attend_stored`).

    Under a layout where tp exceeds the K KV heads (`moe_jax.parallel.rules.Layout.kv_copies` r > 1),
    keys and values have K·r heads, r copies of each, split over tp: each device projects, stores
    and reads only the one head its H / tp query heads use (the K/V weights are repeated to match,
    `repeat_kv_heads`), so no device holds the whole cache or computes another device's head.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, kernels: Kernels):
        D, H, K, Dh, dt = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dtype
        self.cfg = cfg
        self.kernels = kernels
        self.wq_hkd = weight(rngs, (H, Dh, D), ("heads", "head_dim", "embed"), cfg, fan_in=D)
        self.wk_kkd = weight(rngs, (K, Dh, D), ("kv_heads", "head_dim", "embed"), cfg, fan_in=D)
        self.wv_kkd = weight(rngs, (K, Dh, D), ("kv_heads", "head_dim", "embed"), cfg, fan_in=D)
        self.wo_dhk = weight(rngs, (D, H, Dh), ("embed", "heads", "head_dim"), cfg, fan_in=H * Dh)
        if cfg.attention_bias:
            self.bq_hk = param(rngs, (H, Dh), ("heads", "head_dim"), dt, fan_in=D)
            self.bk_kk = param(rngs, (K, Dh), ("kv_heads", "head_dim"), dt, fan_in=D)
            self.bv_kk = param(rngs, (K, Dh), ("kv_heads", "head_dim"), dt, fan_in=D)
        if cfg.attention_out_bias:
            self.bo_d = param(rngs, (D,), ("embed",), dt, fan_in=H * Dh)
        if cfg.attention_sinks:
            self.sinks_h = param(rngs, (H,), ("heads",), dt, fan_in=1)
        if cfg.qk_norm == "head":
            self.q_norm = Norm((Dh,), ("head_dim",), cfg)
            self.k_norm = Norm((Dh,), ("head_dim",), cfg)
        elif cfg.qk_norm == "full":
            self.q_norm = Norm((H, Dh), ("heads", "head_dim"), cfg)
            self.k_norm = Norm((K, Dh), ("kv_heads", "head_dim"), cfg)

    def _position(self, q, k, positions, window):
        """Queries and keys with their position encoding: RoPE (then ``l2`` qk-norm), or with ``full_layers_nope``
        on a full-attention layer (window 0) none, the queries scaled by `temperature_scale` with
        ``attn_temperature_tuning`` (Llama 4). A traced window (scanned layer data) selects between the two."""
        cfg = self.cfg
        rq = rope(q, positions, cfg.rope_theta, cfg.rotary_dim, cfg=cfg)
        rk = rope(k, positions, cfg.rope_theta, cfg.rotary_dim, cfg=cfg)
        if cfg.qk_norm == "l2":
            rq, rk = l2_norm(rq, cfg.norm_eps), l2_norm(rk, cfg.norm_eps)
        if not cfg.full_layers_nope:
            return rq, rk
        nq = q
        if cfg.attn_temperature_tuning:
            nq = (q.astype(F32) * temperature_scale(positions, cfg)[None, :, None, None]).astype(q.dtype)
        if isinstance(window, int):
            return (nq, k) if window == 0 else (rq, rk)
        return jnp.where(window == 0, nq, rq), jnp.where(window == 0, k, rk)

    def __call__(self, x, positions, cache=None, *, decode: bool = False, window=0):
        """x [B, S, D], positions [S] (consecutive, start = positions[0]).
        window: this layer's sliding window in keys (0: full attention; −C: chunks of C, `first_visible`); a Python
        int (prefill skips the key blocks outside it; decode reads only its ring of R slots, or in a full-length
        cache the last |W| + S − 1 positions) or a traced int32 (masks only).

        cache: None, or this layer's `moe_jax.model.kv_cache.LayerCache` (K·r heads, r: the layout's
        `kv_copies`); this call writes its keys and values at positions, in place. decode=False attends to
        this call's own keys (prefill from 0, or a full forward); decode=True attends to the whole cache
        (positions ≤ the query's).
        Returns (y [B, S, D], the LayerCache after the write, or None).
        """
        cfg = self.cfg
        B, S, _ = x.shape
        in_place = in_place_rows(B // batch_shards(B) * S, self.kernels)        # few rows per device: decode
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
        if cfg.attention_bias:
            b_axes = ("cache_heads", "head_dim")
            q = q + self.bq_hk[...]
            k = k + repeat_kv_heads(self.bk_kk[...], r, b_axes)
            v = v + repeat_kv_heads(self.bv_kk[...], r, b_axes)
        if cfg.clip_qkv is not None:
            q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        if cfg.qk_norm in ("head", "full"):
            q, k = self.q_norm(q), self.k_norm(k, kv_copies=r)
        q, k = self._position(q, k, positions, window)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "cache_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "cache_heads", "head_dim"))

        keys, values, key_pos = k, v, positions
        deferred = decode and cache is not None and cache.deferred is not None    # the cache as it was, + k, v
        stored = decode and cache is not None and S == 1 and self.kernels.in_place_decode_attention and not deferred
        if cache is not None:
            cache = cache.write(k, v, positions[0], window)                    # in place: the new positions only
            if decode:                      # [B, T, K·r, Dh] views of the cache, or as stored (positions on `t_axes`)
                view = cache.stored if stored else cache.read
                keys, values = view("k", window).astype(q.dtype), view("v", window).astype(q.dtype)
                t_axes = (2, 3) if stored else (1, 1)
                T = cache.length_for(window)
                # a ring's slots hold its last R (deferred: as they were before this position's write)
                key_pos = cache.positions(positions[-1] - 1 if deferred else positions[-1], window)
                span = abs(window) + S - 1 if isinstance(window, int) and window else 0
                if cache.ring(window):
                    if S > 1:
                        raise ValueError("a ring layer's cache serves one-position decode steps (S = 1), not S = "
                                         f"{S}: earlier queries of the call would need keys it has overwritten")
                elif 0 < span < T:                            # a sliding (chunked) layer: its window (chunk) only
                    first = jnp.clip(first_visible(positions[0], window), 0, T - span)
                    keys, values = (jax.lax.dynamic_slice_in_dim(a, first, span, axis=ax)
                                    for a, ax in zip((keys, values), t_axes, strict=True))
                    key_pos = first + jnp.arange(span)
        sinks = self.sinks_h[...] if cfg.attention_sinks else None
        if decode:                                      # the cache, masked by position (a ring's unwritten slots too)
            mask = window_mask(positions[:, None], key_pos[None, :], window) & (key_pos >= 0)[None, :]
            if deferred:                                # the slots before this position; its own key apart
                as_stored = [stored_as(a, cache.dtype).astype(q.dtype) for a in (k, v)]
                out = attend_with_new(q, keys, values, mask & (key_pos < positions[0])[None, :], *as_stored,
                                      sinks=sinks)
            else:
                out = (attend_stored if stored else attend)(q, keys, values, mask, sinks=sinks)   # [B, S, H, Dh]
        elif self.kernels.fused_prefill_attention and flash.supported(S, q.shape[-1], values.shape[-1]):
            out = flash.fused_attend(q, jnp.transpose(keys, KEYS), jnp.transpose(values, VALUES), window=window,
                                     sinks=sinks, interpret=self.kernels.interpret_kernels)   # as cached; causal
        elif sinks is None and isinstance(window, int) and not window:        # this call's own keys: causal
            out = causal_attend(q, keys, values)                               # blockwise, no S x S
        else:
            out = causal_attend(q, keys, values, window=window, sinks=sinks)
        y = weight_einsum("bshk,dhk->bsd", out, self.wo_dhk[...], in_place=in_place)
        if cfg.attention_out_bias:
            y = y + self.bo_d[...]
        return constrain(y, ("batch", "length", "embed")), cache
