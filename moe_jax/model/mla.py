"""Multi-head latent attention (MLA, DeepSeek-V2/V3), with the cache contract of `moe_jax.model.layers.Attention`.

Shape letters (besides the legend in `moe_jax.config`): R the KV latent (``kv_lora_rank``), Rq the query
latent (``q_lora_rank``), Dr the RoPE part of a query/key head (``qk_rope_head_dim``), Dn = Dh − Dr the
part without RoPE, Dv a value head (``v_head_dim``).

Each token's keys and values are compressed into one latent c [R] (normalised) plus one RoPE key
[Dr] shared by every head; per head, key = (c · W_k[h], rope key) and value = c · W_v[h], with
W_kv_b [H, Dn + Dv, R] expanding the latent. The cache holds only c and the RoPE key, the cache
size a deployment pays (R + Dr per token and layer instead of 2·H·Dh).

Prefill expands the latent into per-head keys and values (S queries share them) and attends blockwise
and causal (`moe_jax.model.attention.causal_attend`: no S x S scores, blocks above the diagonal skipped),
each head's key the no-RoPE part and the shared RoPE key side by side. Decode runs the
absorbed form: the query's no-RoPE part is folded through W_k into the latent space
(q · W_k[h] [R]), scores are taken against the cached latents directly, and the weighted sum of
latents is expanded by W_v[h] once per query; no per-head K/V is rebuilt per step.

The cache dict keeps the keys of the GQA cache so every consumer (pipeline, sharded programs) moves
it unchanged: ``"k"`` holds the latent and ``"v"`` the RoPE key, each stored as one "head" of width R
and Dr in the GQA arrays' layout (`moe_jax.model.kv_cache.array_shape`,
`moe_jax.model.transformer.cache_shape`): replicated over tp, since every tp rank's heads read every latent.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.model.attention import causal_attend
from moe_jax.model.execution import Kernels
from moe_jax.model.layers import F32, Norm, in_place_rows, weight, weight_einsum
from moe_jax.parallel.rules import batch_shards, constrain

LATENT_NORM_EPS = 1e-6
"""Epsilon of MLA's query and KV latent norms (transformers builds them with its default, not rms_norm_eps)."""


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [Dr/2], cos/sin factor) of MLA's RoPE part: plain, or YaRN-scaled as transformers
    computes them (``_compute_yarn_parameters``, truncated correction range)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    if cfg.rope_yarn_factor == 1:
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    factor, original = cfg.rope_yarn_factor, cfg.rope_yarn_original_len

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.rope_yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.rope_yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001                                   # as transformers: no zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    if cfg.rope_yarn_mscale and cfg.rope_yarn_mscale_all_dim:
        attention_factor = _yarn_mscale(factor, cfg.rope_yarn_mscale) / _yarn_mscale(factor,
                                                                                    cfg.rope_yarn_mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)
    return inv_freq.astype(np.float32), float(attention_factor)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(Dh), times YaRN's mscale(mscale_all_dim) squared when the config sets it."""
    scale = cfg.head_dim ** -0.5
    if cfg.rope_yarn_factor != 1 and cfg.rope_yarn_mscale_all_dim:
        scale *= _yarn_mscale(cfg.rope_yarn_factor, cfg.rope_yarn_mscale_all_dim) ** 2
    return scale


def mla_rope(x, positions, cfg: ModelConfig):
    """RoPE on x [B, S, N, Dr] at positions [S]. DeepSeek's interleaved pairs (``rope_interleave``) come out
    de-interleaved (evens then odds, as transformers returns them): queries and keys alike, so scores match."""
    inv_freq, factor = rope_frequencies(cfg)
    if cfg.rope_interleave:
        x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
    half = x.shape[-1] // 2
    angles = positions.astype(F32)[:, None] * jnp.asarray(inv_freq)[None, :]       # [S, Dr/2]
    cos = (jnp.cos(angles) * factor)[None, :, None, :]
    sin = (jnp.sin(angles) * factor)[None, :, None, :]
    xf = x.astype(F32)
    x1, x2 = xf[..., :half], xf[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class MLAttention(nnx.Module):
    """Multi-head latent attention; same call and cache contract as `moe_jax.model.layers.Attention`.

    Heads (the query projection's output, W_kv_b and the output projection) split over tp; the latent
    projection, its norm and the cache are replicated over tp (every head reads every latent).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, kernels: Kernels):
        D, H, Dh = cfg.d_model, cfg.num_heads, cfg.head_dim
        R, Rq, Dr, Dv = cfg.kv_lora_rank, cfg.q_lora_rank, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.cfg = cfg
        self.kernels = kernels
        # Latent widths take the replicated "head_dim" axis rule: they are never split.
        if Rq:
            self.wq_a_rd = weight(rngs, (Rq, D), ("head_dim", "embed"), cfg, fan_in=D)
            self.q_norm = Norm((Rq,), ("head_dim",), cfg)
            self.q_norm.eps = LATENT_NORM_EPS
            self.wq_b_hkr = weight(rngs, (H, Dh, Rq), ("heads", "head_dim", "head_dim"), cfg, fan_in=Rq)
        else:
            self.wq_hkd = weight(rngs, (H, Dh, D), ("heads", "head_dim", "embed"), cfg, fan_in=D)
        self.wkv_a_cd = weight(rngs, (R + Dr, D), ("head_dim", "embed"), cfg, fan_in=D)      # latent, then RoPE key
        self.kv_norm = Norm((R,), ("head_dim",), cfg)
        self.kv_norm.eps = LATENT_NORM_EPS
        self.wkv_b_hkr = weight(rngs, (H, Dh - Dr + Dv, R), ("heads", "head_dim", "head_dim"), cfg, fan_in=R)
        self.wo_dhv = weight(rngs, (D, H, Dv), ("embed", "heads", "head_dim"), cfg, fan_in=H * Dv)

    def __call__(self, x, positions, cache=None, *, decode: bool = False):
        """x [B, S, D], positions [S] (consecutive, start = positions[0]).

        cache: None, or this layer's `moe_jax.model.kv_cache.LayerCache` of {"k": the latent, "v": the RoPE
        key} (one "head" each, read as [B, T, 1, R] and [B, T, 1, Dr]); this call writes its positions in place.
        decode=False attends to this call's own keys (expanded form); decode=True attends to
        the whole cache (positions ≤ the query's) in the absorbed form.
        Returns (y [B, S, D], updated cache or None).
        """
        cfg = self.cfg
        B, S, _ = x.shape
        R, Dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        Dn = cfg.head_dim - Dr
        in_place = in_place_rows(B // batch_shards(B) * S, self.kernels)        # few rows per device: decode
        if cfg.q_lora_rank:
            q_latent = self.q_norm(weight_einsum("bsd,rd->bsr", x, self.wq_a_rd[...], in_place=in_place))
            q = weight_einsum("bsr,hkr->bshk", q_latent, self.wq_b_hkr[...], in_place=in_place)
        else:
            q = weight_einsum("bsd,hkd->bshk", x, self.wq_hkd[...], in_place=in_place)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        q_nope, q_rot = q[..., :Dn], mla_rope(q[..., Dn:], positions, cfg)
        kv = weight_einsum("bsd,cd->bsc", x, self.wkv_a_cd[...], in_place=in_place)          # [B, S, R + Dr]
        latent = self.kv_norm(kv[..., :R])[:, :, None, :]                                    # [B, S, 1, R]
        k_rot = mla_rope(kv[..., None, R:], positions, cfg)                                  # [B, S, 1, Dr]
        cache_axes = ("batch", "length", "cache_heads", "head_dim")
        latent, k_rot = constrain(latent, cache_axes), constrain(k_rot, cache_axes)

        latents, rope_keys, key_pos = latent, k_rot, positions
        if cache is not None:
            cache = cache.write(latent, k_rot, positions[0])                                 # the new positions only
            if decode:                                                                       # [B, T, 1, R], [.., Dr]
                latents, rope_keys = cache.read("k").astype(q.dtype), cache.read("v").astype(q.dtype)
                key_pos = jnp.arange(cache.length_for())
        w_kv = self.wkv_b_hkr[...]
        w_k, w_v = w_kv[:, :Dn], w_kv[:, Dn:]                                                # [H, Dn, R], [H, Dv, R]
        c, kr = latents[:, :, 0], rope_keys[:, :, 0]                                         # [B, T, R], [B, T, Dr]
        if decode:      # absorbed: scores and values in the latent space
            mask = key_pos[None, :] <= positions[:, None]                                    # [S, T]
            rope_scores = jnp.einsum("bshd,btd->bhst", q_rot, kr, preferred_element_type=F32)
            q_lat = jnp.einsum("bshn,hnr->bshr", q_nope, w_k)
            scores = jnp.einsum("bshr,btr->bhst", q_lat, c, preferred_element_type=F32) + rope_scores
            probs = self._softmax(scores, mask).astype(c.dtype)
            out = jnp.einsum("bshr,hvr->bshv", jnp.einsum("bhst,btr->bshr", probs, c), w_v)
        else:           # expanded: per-head keys and values from the latents, attended blockwise and causal
            heads = ("batch", "length", "heads", "head_dim")
            k_nope = constrain(jnp.einsum("btr,hnr->bthn", c, w_k), heads)
            v = constrain(jnp.einsum("btr,hvr->bthv", c, w_v), heads)
            # the shared RoPE key joins each head's key: QKᵀ over [Dn | Dr] is the two score terms summed, and
            # `causal_attend` never builds the S x S scores and skips the blocks above the diagonal
            H = q.shape[2]
            keys = constrain(jnp.concatenate([k_nope, jnp.broadcast_to(kr[:, :, None, :], (B, S, H, Dr))
                                              .astype(k_nope.dtype)], axis=-1), heads)
            out = causal_attend(jnp.concatenate([q_nope, q_rot.astype(q_nope.dtype)], axis=-1), keys, v,
                                scale=softmax_scale(cfg))
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        y = weight_einsum("bshv,dhv->bsd", out, self.wo_dhv[...], in_place=in_place)
        return constrain(y, ("batch", "length", "embed")), cache

    def _softmax(self, scores, mask):
        scores = jnp.where(mask[None, None], scores * softmax_scale(self.cfg), jnp.finfo(F32).min)
        return jax.nn.softmax(scores, axis=-1)

