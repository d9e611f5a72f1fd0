"""FP8 (E4M3) weights: quantization with one f32 scale per matrix, and the weight that dequantizes when read.

A weight stored in FP8 is two parameters: ``q``, the values in ``float8_e4m3fn`` with the weight's shape and
logical axes, and ``scale``, f32, one per matrix: the weight's dimensions but its last two, then a 1 (``wq_hkd``
[H, Dh, D] has [H, 1], one per head; the experts' ``w_gate_up_epfd`` [E, 2, F, D] [E, 2, 1], one per expert and
projection; ``wo_dhk`` [D, H, Dh] [D, 1], one per output row; a plain matrix [1]). The scale's axes are the
weight's first ones, so it is split as the weight is, then an unnamed one (never split): with no named axis a
stacked layer's scale would not get the ``layers`` axis nnx.vmap adds.

Why per matrix and not per output channel: E4M3 is floating point, so every value keeps the same relative
precision (3 mantissa bits, at most 2^-4 relative error after rounding) across 2^15 of range below the largest;
a scale only places that range over the matrix's largest value. Per-channel scales matter for integer formats
(uniform steps), much less for E4M3, and one scale per expert matrix is what vLLM's dynamic FP8 quantization of
a bf16 MoE checkpoint computes. The scale is a power of two (as the OCP MX formats' E8M0 scales are), the
smallest that brings max|w| to 464 or below (448, the largest E4M3 value, plus half its step): dequantizing,
``q × scale``, is then exact in bf16, and quantizing is idempotent (the largest |q| is at least 240, so the
dequantized weights give back the same scale), so a model saved from FP8 weights as bf16 loads back to the
same FP8 values, bit for bit.

Dequantization happens where a weight is read (`Fp8Weight.__getitem__`, the ``w[...]`` every layer writes just
before its matmul): the product runs in the compute dtype (weight-only FP8, W8A16). Read that way, XLA:GPU
materializes the dequantized weight (its gemm fusion takes a convert on an operand, not a multiply by a
broadcast scale), and a convert f8 → bf16 → f32 feeding a one-row product's reduction lets its layout assignment
fold the layer index into the reduced dimensions, re-laying out the whole stacked weight ahead of the layer loop
(seed-30b on an H200: decode moved 1.14x bf16's bytes). So `moe_jax.model.layers.weight_einsum`, through which
the layers multiply by their weights, asks `fp8_source` for the weight's FP8 values and scales, multiplies by the
values as stored (converted inside the matmul's own fusion) and scales its output: the scale is a power of two,
so that is exact, the same numbers as the dequantized weight's product. The HBM a layer's weights take, and the
bytes a decode step reads of them, are then the FP8 ones (seed-30b, H200 decode: 0.53x bf16's bytes).

XLA:TPU keeps the stacked FP8 weights [L, ...] in its 8-bit tiling T(32,128)(4,1) and converts them in
T(8,128)(4,1): each layer's fusion nests that re-tiling one fusion deeper, ahead of the layer's dynamic-slice.
The fusion computes it on the windows it reads, the layer's slice (libtpu's estimated cycles for the expert
fusions are the same for 2 and 16 layers, and the same as with the weights passed in T(8,128) tiles), and
`moe_jax.costs.walk` counts it so (seed-30b, TPU v5p decode: 0.56x bf16's bytes; 6.98x while the walk counted
the whole stack per layer). Passing the weights in T(8,128) tiles instead (a jax ``Format`` on the
parameters) does not help: XLA:TPU copies the attention weights (in prefill the experts' too) back to T(32,128)
ahead of the layer loop, and lets ``Layout.AUTO`` keep T(32,128).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.model.provenance import Provenance
from moe_jax.names import FP8

E4M3_MAX = 448.0
"""The largest finite ``float8_e4m3fn`` value."""
E4M3_ROUNDS_TO_MAX = 464.0
"""`E4M3_MAX` plus half its step (32): magnitudes up to this are within rounding of 448 (they saturate there)."""


def _xp(a):
    return np if isinstance(a, np.ndarray) else jnp


def fp8_scale(amax):
    """The power-of-two scale for matrices whose largest magnitude is `amax` (any shape, numpy or jax): the
    smallest 2^e ≥ amax / 464, so max|w| / scale is at most 464 and rounds (saturating) to at most 448, and to
    at least 240 (above 232, half of 464); 1 for an all-zero matrix."""
    xp = _xp(amax)
    ratio = xp.where(amax > 0, amax / E4M3_ROUNDS_TO_MAX, 1.0).astype(np.float32)
    mantissa, exponent = xp.frexp(ratio)                  # ratio = m · 2^e with m in [0.5, 1)
    return xp.ldexp(np.float32(1.0), exponent - (mantissa == 0.5)).astype(np.float32)


def quantize(w):
    """(q, scale): `w` (numpy or jax, float, ≥ 2 dims) in FP8 with one f32 scale per matrix (its last two
    dimensions; scale [..., 1]): w ≈ q · scale[..., None]. Values are rounded to nearest (those in (448, 464]
    to 448)."""
    xp = _xp(w)
    wf = w.astype(np.float32)
    scale = fp8_scale(xp.max(xp.abs(wf), axis=(-2, -1)))[..., None]
    q = xp.clip(wf / scale[..., None], -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
    return q, scale


def dequantize(q, scale, dtype):
    """q · scale in `dtype` (exact for bf16 and f32: q has 4 significant bits, the scale is a power of two)."""
    dtype = jnp.dtype(dtype)
    return q.astype(dtype) * scale[..., None].astype(dtype)


class Fp8Weight(nnx.Module):
    """A matmul weight stored in FP8 (``q``) with its per-matrix f32 ``scale``; reading it (``w[...]``, as every
    layer reads a weight) gives the weight dequantized to the compute dtype, so each matmul is written once."""

    def __init__(self, values, axes, compute_dtype: str):
        """values: the weight in any float dtype (≥ 2 dims), quantized here; axes: its logical axes."""
        if len(axes) < 2:
            raise ValueError(f"an FP8 weight has at least 2 dimensions (axes {axes!r})")
        q, scale = quantize(values)
        self.q = nnx.Param(q, axes=tuple(axes))
        self.scale = nnx.Param(scale, axes=(*axes[:-2], None))
        self.compute_dtype = compute_dtype

    def __getitem__(self, key):
        q, scale = self.q[...], self.scale[...]
        w = dequantize(q, scale, self.compute_dtype)
        if key is not Ellipsis:
            return w[key]
        _SOURCES.note(w, q, scale)
        return w

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape."""
        return tuple(self.q.shape)

    @property
    def dtype(self):
        """The stored dtype (``float8_e4m3fn``)."""
        return jnp.dtype(FP8)


_SOURCES = Provenance()
"""Each whole-weight read's result → (its FP8 values, its scales)."""


def fp8_source(w):
    """(q, scale) when `w` is the very array an `Fp8Weight` read as a whole (``w[...]``) returned: its FP8
    values (the weight's shape) and per-matrix scales ([..., 1], `quantize`); None for any other array (a bf16
    weight, or one computed from the read: sliced, repeated, reshaped), which is then used as it is.

    Why by identity, not by a wrapper type: every layer reads a weight as ``w[...]``, and what it gets must be an
    array for whatever comes next (a repeat of KV heads, a slice, a grouped matmul, a ``shard_map``); only the
    matmul that would gain from the FP8 values (`moe_jax.model.layers.weight_einsum`) asks for them, and the
    dequantized array it then leaves unused is dropped from the program."""
    return _SOURCES.of(w)
