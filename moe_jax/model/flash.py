"""Fused causal attention for prefill on GPU: a Pallas (Triton) flash-attention kernel.

Why a kernel: XLA's blockwise form (`moe_jax.model.attention.causal_attend`) never builds S x S scores, but each
query block's f32 scores still go through HBM between the ops XLA:GPU makes of it (the QKᵀ gemm, the masked max,
the exponentials, the sum, the PV gemm, transposes between them). At qwen3-30b-a3b, batch 64, prompt 2048 on an
H200 that traffic made attention 1.5 of the 2.9 s of prefill, against 0.35 s of attention FLOPs. Here the scores
of one (query block, key block) tile live in registers: HBM sees q, k, v and the output once.

Shape letters: see `moe_jax.config`; G = H / K query heads per KV head, Bq queries and Bk keys per tile.

How it runs: one program per (query block, batch row, query head), heaviest query blocks first (the last block
sees the most keys). A program loads its [Bq, Dh] queries, walks the key blocks its queries can see, from the
first one inside the window (0 for full attention) to the diagonal, with an online softmax (running max and sum;
the sink, when there is one, starts them at (sink, 1)), and writes [Bq, Dv] outputs. Key blocks wholly before the
diagonal and inside the window need no mask; the rest are masked as `attention.window_mask` masks. Query head h
reads KV head h // G (grouped-query attention, as `attention.attend` groups them).

The window: a Python int (0 full, W > 0 sliding, −C chunked) is built into the kernel, and the blocks outside it
are skipped; a traced window (a layer stack scanning its windows as data, gpt-oss) is read by the kernel from a
one-element operand, and the blocks it skips are found at run time.

What the cost walk sees: XLA cannot look inside the kernel, a ``__gpu$xla.gpu.triton`` custom call. Its name
(`kernel_name`) carries Bq, Bk and the window; `kernel_cost` counts its FLOPs, exponentials and HBM bytes from
that and the operands' shapes, as the kernel computes them (`moe_jax.costs.walk`).

On CPU the same kernel runs in Pallas' interpret mode (`Kernels.interpret_kernels`): tests hold it against the
plain masked softmax there.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp

from moe_jax.model.attention import first_visible, window_mask

F32 = jnp.float32

Q_BLOCK = 128
"""Bq: query rows per program (the tile of the QKᵀ product's rows)."""
K_BLOCK = 64
"""Bk: keys per step of a program's loop."""
MASKED = -0.7 * float(jnp.finfo(F32).max)
"""A masked score: finite, so a row whose first key block is all masked subtracts no infinities (its running
max is this value until a visible key replaces it, and whatever it summed is then scaled by exp(MASKED − max),
which is 0)."""
NAME = "moe_jax_flash_prefill"
"""Prefix of the kernel's name in the compiled program (`kernel_name`)."""
TRACED = "traced"
"""The window field of the name when the window is an operand."""


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def blocks_for(S: int) -> tuple[int, int] | None:
    """(Bq, Bk) for a prompt of S positions, or None when the kernel does not take it (Triton tiles are powers of
    two: S must be a multiple of them, or, below one tile, a power of two of at least 16)."""
    if S >= Q_BLOCK:
        return (Q_BLOCK, K_BLOCK) if S % Q_BLOCK == 0 else None
    return (S, min(S, K_BLOCK)) if _pow2(S) and S >= 16 else None


def supported(S: int, head_dim: int, value_dim: int) -> bool:
    """Whether `flash_attend` takes these shapes: tiles that divide S (`blocks_for`), head widths powers of two of
    at least 16 (MLA's 192-wide query heads are not: its prefill keeps the blockwise form)."""
    return blocks_for(S) is not None and all(_pow2(d) and d >= 16 for d in (head_dim, value_dim))


def kernel_name(bq: int, bk: int, window, sinks: bool) -> str:
    """The kernel's name: `NAME`, Bq, Bk, the window (an int, or `TRACED`) and whether it has sinks."""
    w = TRACED if not isinstance(window, int) else str(window)
    return f"{NAME}_bq{bq}_bk{bk}_w{w}_s{int(sinks)}".replace("-", "m")


_NAME_RE = re.compile(NAME + r"_bq(\d+)_bk(\d+)_w(m?\d+|" + TRACED + r")_s([01])")


def parse_kernel_name(text: str) -> dict | None:
    """{bq, bk, window (int, or None when traced), sinks} from the text of a compiled instruction that calls the
    kernel, or None when it does not."""
    m = _NAME_RE.search(text)
    if m is None:
        return None
    w = m.group(3)
    window = None if w == TRACED else int(w.replace("m", "-"))
    return {"bq": int(m.group(1)), "bk": int(m.group(2)), "window": window, "sinks": m.group(4) == "1"}


def key_blocks(q_start: int, bq: int, bk: int, window: int | None) -> tuple[int, int]:
    """[first, end) key blocks a query block from q_start visits: from the window's first visible key's block
    (0 for full attention, or when the window is traced: the walk counts its worst case) to the diagonal's."""
    first = 0 if not window else max(0, first_visible(q_start, window)) // bk
    return first, -(-(q_start + bq) // bk)


def kernel_cost(B: int, S: int, H: int, K: int, Dh: int, Dv: int, itemsize: int, bq: int, bk: int,
                window: int | None) -> dict:
    """FLOPs (all of them matmul: QKᵀ and PV), exponentials and HBM bytes of one call, as the kernel computes:
    every key block a query block visits (`key_blocks`) whole, masked or not. Bytes: q, k, v and the output once
    each (a program's key blocks come from L2 when the G query heads and later query blocks reading them are
    resident; the walk does not count re-reads that the cache serves)."""
    keys = 0                                                   # keys one query row of each block is scored against
    for start in range(0, S, bq):
        first, end = key_blocks(start, bq, bk, window)
        keys += (end - first) * bk
    pairs = B * H * bq * keys
    return {"flops": 2 * pairs * (Dh + Dv), "transcendentals": pairs,
            "bytes": itemsize * (B * S * H * (Dh + Dv) + B * S * K * (Dh + Dv))}


def _kernel(*refs, bq: int, bk: int, nq: int, scale: float, window, sinks: bool, traced: bool):
    """One program: query block (nq − 1 − program 0) of batch row (program 1), query head (program 2)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    q_ref, k_ref, v_ref, *rest = refs
    sink_ref = rest.pop(0) if sinks else None
    window_ref = rest.pop(0) if traced else None
    (o_ref,) = rest
    q_start = (nq - 1 - pl.program_id(0)) * bq
    q = q_ref[...]
    rows = q_start + jnp.arange(bq)[:, None]
    w = window_ref[0] if traced else window
    if sinks:
        m = jnp.full((bq,), jnp.max(sink_ref[...]), F32)                   # the sink's logit, exp(0) summed
        total = jnp.ones((bq,), F32)
    else:
        m, total = jnp.full((bq,), MASKED, F32), jnp.zeros((bq,), F32)
    acc = jnp.zeros((bq, o_ref.shape[-1]), F32)

    def step(masked: bool):
        def body(j, carry):
            m, total, acc = carry
            start = j * bk
            k = k_ref[pl.ds(start, bk), :]                                     # [Bk, Dh]
            v = v_ref[:, pl.ds(start, bk)]                                     # [Dv, Bk]
            s = plgpu.dot(q, k, trans_b=True) * scale                          # f32 [Bq, Bk]
            if masked:
                s = jnp.where(window_mask(rows, start + jnp.arange(bk)[None, :], w), s, MASKED)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            p = jnp.exp(s - m_new[:, None])
            fix = jnp.exp(m - m_new)                                           # rescales what was summed so far
            total = total * fix + jnp.sum(p, axis=1)
            acc = acc * fix[:, None] + plgpu.dot(p.astype(v.dtype), v, trans_b=True)
            return m_new, total, acc
        return body

    end = (q_start + bq + bk - 1) // bk                                         # through the diagonal's block
    carry = (m, total, acc)
    if not traced and window == 0:                  # full attention: blocks before the diagonal need no mask
        diagonal = q_start // bk
        carry = jax.lax.fori_loop(0, diagonal, step(False), carry)
        carry = jax.lax.fori_loop(diagonal, end, step(True), carry)
    else:                                           # a window: skip the blocks before it, mask the rest
        first = jnp.maximum(first_visible(q_start, w), 0) // bk
        carry = jax.lax.fori_loop(first, end, step(True), carry)
    _, total, acc = carry
    o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)


def flash_attend(q, k, v, *, window=0, sinks=None, scale: float | None = None, interpret: bool = False):
    """Causal grouped-query attention of S positions over their own keys, fused (see the module).

    q [B, S, H, Dh], k [B, K, S, Dh], v [B, K, Dv, S] → [B, S, H, Dv]: keys and values in the orders the KV cache
    stores them (`moe_jax.model.kv_cache.KEYS`, `VALUES`), so that prefill's cache write and the kernel read one
    transposed copy (given [B, S, K, Dh], XLA lays the cache out so inside the layer loop, and transposes the
    whole cache into that layout and back around every prefill). Otherwise the contract of
    `moe_jax.model.attention.causal_attend` (window: a Python int or a traced int32 scalar; sinks: None or [H]
    logits; scale: of the scores, by default Dh^-1/2). `supported` says which shapes it takes.
    interpret: run the kernel in Pallas' interpret mode (any backend; for tests on CPU).
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    B, S, H, Dh = q.shape
    K, Dv = k.shape[1], v.shape[2]
    if not supported(S, Dh, Dv) or H % K or k.shape[2] != S or v.shape[3] != S:
        raise ValueError(f"flash_attend: q {q.shape}, k {k.shape}, v {v.shape} are not shapes the kernel takes "
                         "(see moe_jax.model.flash.supported)")
    bq, bk = blocks_for(S)
    G, nq = H // K, S // bq
    traced = not isinstance(window, int)
    scale = Dh ** -0.5 if scale is None else scale
    kernel = functools.partial(_kernel, bq=bq, bk=bk, nq=nq, scale=scale, window=None if traced else window,
                               sinks=sinks is not None, traced=traced)
    specs = [pl.BlockSpec((None, bq, None, Dh), lambda i, b, h: (b, nq - 1 - i, h, 0)),
             pl.BlockSpec((None, None, S, Dh), lambda i, b, h: (b, h // G, 0, 0)),
             pl.BlockSpec((None, None, Dv, S), lambda i, b, h: (b, h // G, 0, 0))]
    args = [q, k, v]
    if sinks is not None:          # [H, 16]: a tile of one head's logit (Triton's tensors need 16 or more)
        args.append(jnp.broadcast_to(sinks.astype(F32)[:, None], (H, 16)))
        specs.append(pl.BlockSpec((None, 16), lambda i, b, h: (h, 0)))
    if traced:
        args.append(jnp.reshape(window, (1,)).astype(jnp.int32))
        specs.append(pl.BlockSpec((1,), lambda i, b, h: (0,)))
    warps = 4 if bq * max(Dh, Dv) <= 128 * 64 else 8
    return pl.pallas_call(
        kernel, grid=(nq, B, H), in_specs=specs,
        out_specs=pl.BlockSpec((None, bq, None, Dv), lambda i, b, h: (b, nq - 1 - i, h, 0)),
        out_shape=jax.ShapeDtypeStruct((B, S, H, Dv), v.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=2),
        interpret=interpret, name=kernel_name(bq, bk, window, sinks is not None))(*args)


def fused_attend(q, k, v, *, window=0, sinks=None, interpret: bool = False):
    """`flash_attend` on the layout in force (k, v in the cache's orders, as it takes them): in `jax.shard_map`,
    manual over the mesh axes the batch and the heads are split over (XLA's partitioner cannot split a custom
    call: outside shard_map it would gather every head onto every device). Each device runs the kernel on its own
    rows and heads; its query heads read the KV heads (or the copies of one, `Layout.kv_copies`) it holds, as
    `attention.attend` groups them."""
    from jax.sharding import PartitionSpec as P

    from moe_jax.parallel.rules import current_layout, mesh_in_force

    call = functools.partial(flash_attend, interpret=interpret)
    layout = current_layout()
    if layout is None or layout.mesh is None:
        return call(q, k, v, window=window, sinks=sinks)
    q_spec = layout.spec(("batch", "length", "heads", "head_dim"), q.shape, what="queries", strict=False)
    k_spec = layout.spec(("batch", "cache_heads", "length", "head_dim"), k.shape, what="keys", strict=False)
    v_spec = layout.spec(("batch", "cache_heads", "head_dim", "length"), v.shape, what="values", strict=False)
    if q_spec[0] != k_spec[0] or (q_spec[2] is None) != (k_spec[1] is None):
        raise ValueError(f"fused_attend: queries split {q_spec} but keys {k_spec}: each device must hold the KV "
                         "heads its query heads read")
    manual = {a for entry in (q_spec[0], q_spec[2]) if entry for a in ((entry,) if isinstance(entry, str) else entry)}
    if not manual:
        return call(q, k, v, window=window, sinks=sinks)
    mesh = mesh_in_force(layout)
    args, specs = [q, k, v], [q_spec, k_spec, v_spec]
    if sinks is not None:
        args.append(sinks)
        specs.append(P(q_spec[2]))
    traced = not isinstance(window, int)
    if traced:
        args.append(window)
        specs.append(P())

    def body(q, k, v, *rest):
        rest = list(rest)
        s = rest.pop(0) if sinks is not None else None
        w = rest.pop(0) if traced else window
        return call(q, k, v, window=w, sinks=s)

    return jax.shard_map(body, mesh=mesh, axis_names=manual, check_vma=False, in_specs=tuple(specs),
                         out_specs=q_spec)(*args)
