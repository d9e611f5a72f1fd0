"""Dense leading layers (DeepSeek-V3's ``first_k_dense_replace``): attention + a dense SwiGLU FFN, as their own stack.

The layer scan runs identical layers, so the first ``cfg.first_dense_layers`` layers, whose FFN is
dense, are a second, leading stack (``Transformer.dense_blocks``) that runs on the embedded tokens
before the MoE stack. Their parameters are stacked on the ``dense_layers`` axis, which is never split:
under pipeline parallelism they run ahead of the pipeline on every stage's devices (each stage holds a
copy: ``first_dense_layers`` layers, 3 of DeepSeek-V3's 61), and the pipeline's stages split the MoE
layers only. Their KV cache is its own pair of arrays, ``dense_k`` and ``dense_v`` beside the MoE
layers' ``k`` and ``v`` (`dense_cache_shape`), laid out as those are with ``dense_layers`` leading.

The dense layers between MoE layers (Llama 4 Maverick's, ``cfg.moe_interleave`` > 1) are the same `DenseBlock`,
stacked inside each MoE layer's `moe_jax.model.stack.Block` instead (`make_dense_blocks` with a count): they run
in the layer stack, split by the pipeline with their MoE layer, and keep their keys and values in its cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.model import scopes
from moe_jax.model.execution import Kernels
from moe_jax.model.layers import Attention, Norm, in_place_rows, weight, weight_einsum
from moe_jax.parallel.rules import batch_shards, constrain

DENSE_NAMES = {"k": "dense_k", "v": "dense_v"}
"""The dense layers' cache arrays, by the name of the MoE layers' array they mirror."""


class DenseFFN(nnx.Module):
    """A dense SwiGLU FFN of width ``cfg.dense_ffn``, split over tp on its width (as the shared experts are)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, kernels: Kernels):
        D, F = cfg.d_model, cfg.dense_ffn
        self.kernels = kernels
        self.w_gate_up_pfd = weight(rngs, (2, F, D), ("gate_up", "mlp", "embed"), cfg, fan_in=D)
        self.w_down_df = weight(rngs, (D, F), ("embed", "mlp"), cfg, fan_in=F)

    def __call__(self, x_bsd):
        """x [B, S, D] → [B, S, D]."""
        B, S, _ = x_bsd.shape
        in_place = in_place_rows(B // batch_shards(B) * S, self.kernels)        # few rows per device: decode
        gate_up = weight_einsum("bsd,pfd->bspf", x_bsd, self.w_gate_up_pfd[...], in_place=in_place)
        h = constrain(jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1], ("batch", "length", "mlp"))
        y = weight_einsum("bsf,df->bsd", h, self.w_down_df[...], in_place=in_place)
        return constrain(y, ("batch", "length", "embed"))


class DenseBlock(nnx.Module):
    """One dense layer: pre-norm attention and a pre-norm dense FFN; the call contract of `moe_jax.model.stack.Block`
    (nothing is ever dropped)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, kernels: Kernels):
        from moe_jax.model.mla import MLAttention

        self.attn_norm = Norm((cfg.d_model,), ("embed",), cfg)
        self.attn = (MLAttention if cfg.attention == "mla" else Attention)(cfg, rngs=rngs, kernels=kernels)
        self.ffn_norm = Norm((cfg.d_model,), ("embed",), cfg)
        self.ffn = DenseFFN(cfg, rngs=rngs, kernels=kernels)

    def __call__(self, x, positions, cache=None, *, decode: bool = False, window=0):
        """window: the layer's attention window (`moe_jax.model.stack.Block`); the leading dense layers' is 0."""
        with jax.named_scope(scopes.ATTENTION):
            extra = {} if isinstance(window, int) and not window else {"window": window}
            h, cache = self.attn(self.attn_norm(x), positions, cache, decode=decode, **extra)
        x = x + h
        with jax.named_scope(scopes.SHARED_EXPERTS):   # the walk reports it with the shared experts: dense FFNs both
            y = self.ffn(self.ffn_norm(x))
        return constrain(x + y, ("batch", "length", "embed")), cache, jnp.zeros((1,), jnp.int32)


def make_dense_blocks(cfg: ModelConfig, rngs: nnx.Rngs, kernels: Kernels, count: int | None = None):
    """`count` dense blocks (default: the ``first_dense_layers``), parameters stacked on a leading ``dense_layers``
    axis (never split)."""

    @nnx.split_rngs(splits=cfg.first_dense_layers if count is None else count)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "dense_layers", "axes": "dense_layers"})
    def make(rngs: nnx.Rngs):
        return DenseBlock(cfg, rngs=rngs, kernels=kernels)

    return make(rngs)


def dense_cache_axes(moe_axes: tuple[str, ...]) -> tuple[str, ...]:
    """A dense cache array's logical axes: its MoE counterpart's with ``dense_layers`` (never split) leading."""
    return ("dense_layers", *moe_axes[1:])


def dense_cache_shape(moe_shapes: dict, cfg: ModelConfig) -> dict:
    """The dense layers' cache arrays (``dense_k``, ``dense_v``): the MoE layers' `moe_shapes` with
    ``first_dense_layers`` leading instead of the MoE layers."""
    return {DENSE_NAMES[name]: jax.ShapeDtypeStruct((cfg.first_dense_layers, *s.shape[1:]), s.dtype)
            for name, s in moe_shapes.items()}


def split_cache(cache: dict | None) -> tuple[dict | None, dict | None]:
    """(the MoE layers' cache {"k", "v"}, the dense layers' as {"k", "v"}) from a cache with dense arrays."""
    if cache is None:
        return None, None
    moe = {name: c for name, c in cache.items() if name not in DENSE_NAMES.values()}
    dense = {name: cache[dense] for name, dense in DENSE_NAMES.items() if dense in cache}
    return moe, dense or None


def join_cache(moe: dict | None, dense: dict | None) -> dict | None:
    """The inverse of `split_cache`."""
    if moe is None or dense is None:
        return moe
    return {**moe, **{DENSE_NAMES[name]: c for name, c in dense.items()}}

