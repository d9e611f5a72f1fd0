"""Grouped-query attention: the plain masked form (decode: one query row against the cache) and a
blockwise causal form for prefill that never builds S x S scores and skips the key blocks a query
block cannot see.

Shape letters: see `moe_jax.config`; here G = H / K query heads per KV head, T keys.

Why the prefill form is written in jnp/lax rather than as a fused kernel: it compiles for every
backend deviceless (cpu, gpu, tpu), and the cost walk reads what it does from the HLO (loops'
trip counts included), so the FLOPs counted are the causal ones the program computes. cuDNN's
flash attention (`jax.nn.dot_product_attention(..., implementation="cudnn")`) does not trace
without the cuDNN library loaded ("cuDNN not found", jax 0.10.2): a deviceless GPU compile in a
process without cuDNN cannot build it, so this form is used on every backend.

How `causal_attend` is laid out (Bq queries per block, at most 16 blocks, so the unrolled program
stays small): query block i sees keys [0, (i+1)·Bq). Keys before the block's first query are
visible to all of it and need no mask; they are taken in chunks of Kc keys by a `lax.scan` with
an online softmax (running max and sum, the output rescaled as the max grows). The rest, up to the
block's last query (fewer than Kc + Bq keys, the diagonal among them), is one masked piece. When a
block's whole prefix fits in one piece (prompts up to Kc + Bq), its softmax is exact, computed as
the plain form computes it. Blocks wholly above the diagonal are never computed: the FLOPs are
the lower triangle plus half of each diagonal block, (1 + Bq/S) x the causal S(S+1)/2 pairs. The
largest scores array is [B, K, G, Bq, < Kc + Bq] f32.

Two gpt-oss options. A sliding window W (query p sees keys p − W < t ≤ p): with W a Python int, a
block's keys start at its first query's window (earlier blocks are skipped, so a sliding layer
computes about S × (W + Bq) pairs, not S²/2); a traced W (a layer stack whose windows are scanned data)
only masks. Llama 4's chunked layers are a window −C (query p sees keys of its own chunk of C,
C·⌊p/C⌋ ≤ t ≤ p), skipped and masked the same way. Attention sinks: a per-head logit in every softmax's
denominator with no value; the online softmax starts from it (running max the sink, running sum 1).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

F32 = jnp.float32

MIN_QUERY_BLOCK = 128
"""Smallest query block (a multiple of the GPU/TPU matmul tiles); shorter prompts are one block."""
MAX_QUERY_BLOCKS = 16
"""Most query blocks: longer prompts get larger blocks (the diagonal's waste stays under 1/16)."""
KEY_CHUNK = 2048
"""Keys per online-softmax step before a block's diagonal: bounds the scores of one step."""


def first_visible(rows, window):
    """The first key position a query at `rows` sees: rows − W + 1 for a sliding window W > 0; for a chunked
    layer (window −C < 0, Llama 4) the start of the query's chunk, rows − rows mod C; 0 for full attention (0).
    window: a Python int or a traced int32 scalar; rows: ints or an int array."""
    if isinstance(window, int):
        if window > 0:
            return rows - window + 1
        return rows - rows % -window if window < 0 else 0 * rows
    chunk = jnp.maximum(-window, 1)
    return jnp.where(window > 0, rows - window + 1, jnp.where(window < 0, rows - rows % chunk, 0))


def window_mask(rows, cols, window):
    """True where key position `cols` is visible to query position `rows`: causal, and from `first_visible` on
    (a sliding window's last W keys, or a chunked layer's own chunk) unless the window is 0.
    window: a Python int or a traced int32 scalar."""
    ok = cols <= rows
    if isinstance(window, int) and not window:
        return ok
    return ok & (cols >= first_visible(rows, window))


def _sink_logits(sinks, K: int):
    """Sinks [H] as f32 [K, G] (query head h = kv head h // G, as `attend` groups them)."""
    return sinks.astype(F32).reshape(K, -1)


def _grouped_scores(q, k, mask):
    """(q grouped by KV head [B, S, K, H/K, Dh], f32 scores [B, K, H/K, S, T] scaled by Dh^-1/2, masked positions
    at the f32 minimum) for q [B, S, H, Dh], k [B, T, K, Dh], mask [S, T]."""
    B, S, H, Dh = q.shape
    K = k.shape[2]
    qg = q.reshape(B, S, K, H // K, Dh)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=F32) * Dh ** -0.5
    return qg, jnp.where(mask[None, None, None], scores, jnp.finfo(F32).min)


def attend(q, k, v, mask, *, sinks=None):
    """Grouped-query attention. q [B, S, H, Dh], k/v [B, T, K, Dh], mask [S, T] (True = may attend).
    sinks: None, or [H] logits that join each query head's softmax denominator (gpt-oss) and carry no value.

    Query head h reads KV head h // (H / K). With K·r repeated heads (head e a copy of original head
    e // r) that is expanded head h // (H / (K·r)), a copy of original head h // (H / K): the same
    keys, so the result does not depend on r."""
    B, S, H, Dh = q.shape
    K = k.shape[2]
    qg, scores = _grouped_scores(q, k, mask)
    probs = _softmax(scores, None if sinks is None else _sink_logits(sinks, K)[None, :, :, None, None])
    out = jnp.einsum("bkgst,btkd->bskgd", probs.astype(v.dtype), v)
    return out.reshape(B, S, H, v.shape[-1])


def attend_with_new(q, k, v, mask, k_new, v_new, *, sinks=None):
    """`attend` over the cache's keys and values k, v [B, T, K, Dh] (mask [S, T]) and, beside them, the query's own
    new key and value k_new, v_new [B, S, K, Dh] (S = 1: one decode position, always visible to itself), as if
    they were stored in one more slot: the same softmax, over T + 1 scores.

    For a cache whose writes are deferred (`moe_jax.model.kv_cache.LayerCache.deferred`): the products read the
    cache as it was, so XLA:GPU's gemm fusion reads each layer's slice in place. The softmax is written out
    (max, exponentials, one denominator) so neither the scores nor the probabilities are joined or split."""
    B, S, H, Dh = q.shape
    if S != 1:
        raise ValueError(f"attend_with_new takes one query position, not {S}")
    K = k.shape[2]
    qg, scores = _grouped_scores(q, k, mask)
    own = jnp.einsum("bskgd,bskd->bkgs", qg, k_new, preferred_element_type=F32)[..., None] * Dh ** -0.5
    m = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), own)            # [B, K, G, S, 1]
    if sinks is not None:
        sink = _sink_logits(sinks, K)[None, :, :, None, None]
        m = jnp.maximum(m, sink)
    p, p_own = jnp.exp(scores - m), jnp.exp(own - m)
    total = jnp.sum(p, axis=-1, keepdims=True) + p_own + (0 if sinks is None else jnp.exp(sink - m))
    out = (jnp.einsum("bkgst,btkd->bskgd", (p / total).astype(v.dtype), v, preferred_element_type=F32)
           + jnp.einsum("bkgs,bskd->bskgd", (p_own / total)[..., 0].astype(v.dtype), v_new,
                        preferred_element_type=F32))
    return out.astype(v.dtype).reshape(B, S, H, v.shape[-1])


def attend_stored(q, k, v, mask, *, sinks=None):
    """`attend` over keys and values in the KV cache's stored order (`moe_jax.model.kv_cache.orders`), each
    product written as a multiply and an f32 sum over the stored array's minor dimension.

    q [B, S, H, Dh], k [B, K, T, Dh], v [B, K, Dv, T], mask [S, T], sinks as `attend`; returns [B, S, H, Dv].
    The same math as `attend`: scores summed in f32 and scaled by Dh^-1/2, masked to the f32 minimum, the
    softmax in f32, the probabilities cast to the values' dtype before the weighted sum (f32, cast back).

    Why (decode on a GPU, one query row per sequence): XLA:GPU runs `attend`'s two batched products as gemm
    kernels, which do not read an operand inside the layer scan's carried cache: each step copied every
    layer's keys and values out of the stacked cache first (as large as the cache, per step). A row
    reduction (keys over Dh, values over T: both minor as stored) fuses the layer's slice of the carried
    cache into its input and reads it where it is stored. Each KV head's G = H / K query heads re-read
    the same [T, Dh] keys and values, consecutively: at most a head's slice (T·Dh values) apart, which the
    GPU's L2 cache holds. The products of 16-bit values are exact in f32."""
    B, S, H, Dh = q.shape
    K = k.shape[1]
    qg = jnp.moveaxis(q.reshape(B, S, K, H // K, Dh), 1, 3).astype(F32)        # [B, K, G, S, Dh]
    scores = jnp.sum(qg[:, :, :, :, None, :] * k[:, :, None, None].astype(F32), axis=-1) * Dh ** -0.5
    scores = jnp.where(mask[None, None, None], scores, jnp.finfo(F32).min)     # [B, K, G, S, T]
    probs = _softmax(scores, None if sinks is None else _sink_logits(sinks, K)[None, :, :, None, None])
    p = probs.astype(v.dtype).astype(F32)
    out = jnp.sum(p[:, :, :, :, None, :] * v[:, :, None, None].astype(F32), axis=-1).astype(v.dtype)
    return jnp.moveaxis(out, 3, 1).reshape(B, S, H, v.shape[2])              # [B, K, G, S, Dv] -> [B, S, H, Dv]


def _softmax(scores, sink):
    """Softmax over the last axis; with `sink` (broadcastable to scores[..., :1]) in the denominator."""
    if sink is None:
        return jax.nn.softmax(scores, axis=-1)
    m = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
    p = jnp.exp(scores - m)
    return p / (jnp.sum(p, axis=-1, keepdims=True) + jnp.exp(sink - m))


def query_block(S: int) -> int:
    """Bq for a prompt of S positions: S itself up to `MIN_QUERY_BLOCK`, else the smallest multiple of it
    that makes at most `MAX_QUERY_BLOCKS` blocks."""
    if S <= MIN_QUERY_BLOCK:
        return S
    return MIN_QUERY_BLOCK * math.ceil(S / (MIN_QUERY_BLOCK * MAX_QUERY_BLOCKS))


def causal_flops(batch: int, S: int, heads: int, head_dim: int, *, q_block: int | None = None,
                 window: int = 0) -> int:
    """QKᵀ and PV FLOPs `causal_attend` computes for one layer (blocks above the diagonal skipped,
    diagonal blocks whole; with a static sliding `window`, keys before a block's first query's window
    skipped too): 4 × H × Dh per (query, key) pair computed."""
    bq = q_block or query_block(S)
    pairs = sum((min(S, start + bq) - _first_key(start, window)) * (min(S, start + bq) - start)
                for start in range(0, S, bq))
    return 4 * batch * heads * head_dim * pairs


def _first_key(q_start: int, window) -> int:
    """The first key a query block from q_start can see: 0, or with a static window its first query's
    `first_visible` key (its window's first, or its chunk's start)."""
    return max(0, first_visible(q_start, window)) if isinstance(window, int) and window else 0


def _scores(qg, k, q_start: int, k_start: int, masked: bool, scale: float, window=0):
    """Scaled f32 scores [B, K, G, s, t] of query rows from position q_start against keys from k_start;
    masked: keys after a query's position, or outside its `window`, get the f32 minimum (as `attend` masks them)."""
    s = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=F32) * scale
    if masked:
        rows = q_start + jnp.arange(qg.shape[1])[:, None]
        cols = k_start + jnp.arange(k.shape[1])[None, :]
        s = jnp.where(window_mask(rows, cols, window), s, jnp.finfo(F32).min)
    return s


def _online_step(state, s, v):
    """Fold scores s [B, K, G, s, t] and values v [B, t, K, Dh] into (max, sum, unnormalised out)."""
    m, total, acc = state                                                    # [B,K,G,s], [B,K,G,s], [B,s,K,G,Dh]
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.exp(s - m_new[..., None])
    fix = jnp.exp(m - m_new)                                                 # rescales what was summed so far
    total = total * fix + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bkgst,btkd->bskgd", p.astype(v.dtype), v, preferred_element_type=F32)
    acc = acc * jnp.moveaxis(fix, 3, 1)[..., None] + pv
    return m_new, total, acc


def _block(qg, k, v, q_start: int, key_chunk: int, scale: float, window=0, sink=None):
    """Outputs [B, s, K, G, Dv] of one query block (rows from q_start) against keys [lo, q_start + s): lo 0, or
    with a static window the block's first query's first key. sink: None or f32 [K, G] logits."""
    end = q_start + qg.shape[1]
    lo = _first_key(q_start, window)
    windowed = not (isinstance(window, int) and window == 0)                 # chunks need the window's mask too
    chunks = (q_start - lo) // key_chunk                                     # chunks before the diagonal
    tail = lo + chunks * key_chunk
    if chunks == 0:                                                          # one piece: the exact softmax
        scores = _scores(qg, k[:, lo:end], q_start, lo, masked=True, scale=scale, window=window)
        probs = _softmax(scores, None if sink is None else sink[None, :, :, None, None])
        return jnp.einsum("bkgst,btkd->bskgd", probs.astype(v.dtype), v[:, lo:end])
    B, s, K, G, _ = qg.shape
    first = (jnp.full((B, K, G, s), jnp.finfo(F32).min, F32), jnp.zeros((B, K, G, s), F32)) if sink is None else (
        jnp.broadcast_to(sink[None, :, :, None], (B, K, G, s)), jnp.ones((B, K, G, s), F32))  # the sink: exp(0)
    state = (*first, jnp.zeros((B, s, K, G, v.shape[-1]), F32))

    def chunk(state, c):
        start = lo + c * key_chunk
        kc = jax.lax.dynamic_slice_in_dim(k, start, key_chunk, axis=1)
        vc = jax.lax.dynamic_slice_in_dim(v, start, key_chunk, axis=1)
        scores = _scores(qg, kc, q_start, start, masked=windowed, scale=scale, window=window)
        return _online_step(state, scores, vc), None

    if chunks == 1:
        state, _ = chunk(state, 0)
    else:                                                                    # a loop: the HLO stays one chunk long
        state, _ = jax.lax.scan(chunk, state, jnp.arange(chunks))
    scores = _scores(qg, k[:, tail:end], q_start, tail, masked=True, scale=scale, window=window)   # diagonal too
    _, total, acc = _online_step(state, scores, v[:, tail:end])
    return (acc / jnp.moveaxis(total, 3, 1)[..., None]).astype(v.dtype)


def causal_attend(q, k, v, *, q_block: int | None = None, key_chunk: int = KEY_CHUNK, scale: float | None = None,
                  window=0, sinks=None):
    """Causal grouped-query attention of S positions over their own keys, blockwise (see the module).

    q [B, S, H, Dh], k [B, S, K, Dh], v [B, S, K, Dv] (query i sees keys 0..i); heads grouped as in `attend`.
    q_block: Bq, by default `query_block(S)`; key_chunk: Kc, keys per online-softmax step; scale: of the
    scores, by default Dh^-1/2; window: keys per query (0: all before it), a Python int (blocks outside it
    skipped) or a traced int32; sinks: None or [H] sink logits.
    Equals `attend(q, k, v, causal mask)` within bf16 rounding (exactly its formula where a block's
    keys are one piece). Returns [B, S, H, Dv].
    """
    B, S, H, Dh = q.shape
    K, Dv = k.shape[2], v.shape[-1]
    if k.shape[1] != S or v.shape[1] != S:
        raise ValueError(f"causal_attend: {S} queries need as many keys and values, got {k.shape[1]}, {v.shape[1]}")
    bq = q_block or query_block(S)
    qg = q.reshape(B, S, K, H // K, Dh)
    scale = Dh ** -0.5 if scale is None else scale
    sink = None if sinks is None else _sink_logits(sinks, K)
    blocks = [_block(qg[:, start:start + bq], k, v, start, key_chunk, scale, window, sink)
              for start in range(0, S, bq)]
    out = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1)
    return out.reshape(B, S, H, Dv)
