"""A grouped matmul for dropless experts on GPU: a Pallas (Triton) kernel over row tiles that each belong to one expert.

Why a kernel: XLA:GPU lowers `jax.lax.ragged_dot_general` as a dense product of every row with every expert's
weights, masked afterwards (qwen3-30b-a3b, batch 64, prompt 2048 on one H200: 74x the experts' useful FLOPs). Here
each row is multiplied by its own expert's weights only.

Shape letters: see `moe_jax.config`; M rows sorted by expert, P rows once each expert's rows are padded to whole
tiles, Bm rows, Bn output columns and Bk contracted columns per tile step.

How it runs: the rows, sorted by expert, are first laid out so that each expert's rows start on a tile boundary
(`tile_layout`: at most Bm − 1 padding rows per expert, zeros). One program per (column block, row tile), column
blocks fastest, so the programs running together read the same row tile and the same expert's weights (from L2
after the first). A program reads its tile's expert from a per-tile table, loops over K in Bk steps multiplying
its [Bm, Bk] rows by the expert's [Bn, Bk] weights (stored with K minor, as the experts' weights are), and writes
[Bm, Bn]. Tiles past the last expert's (the static bound's slack) compute nothing and write zeros.

What the cost walk sees: a ``__gpu$xla.gpu.triton`` custom call whose name (`kernel_name`) carries the tiles;
`kernel_cost` counts its FLOPs (every tile of the static bound, whole: the walk cannot see which are empty, an
upper bound by at most one tile per expert) and its HBM bytes (rows, weights and output once) from the operands.

On CPU the kernel runs in Pallas' interpret mode (`moe_jax.model.execution.Kernels.interpret_kernels`): tests hold
it against the plain per-expert product there.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp

from moe_jax.model.moe.activation import group_of

F32 = jnp.float32

NAME = "moe_jax_grouped_matmul"
"""Prefix of the kernel's name in the compiled program (`kernel_name`)."""
N_BLOCKS = (128, 64, 32, 16)
K_BLOCKS = (64, 32, 16)


def row_block(rows: int, groups: int) -> int:
    """Bm for `rows` rows over `groups` experts: the largest of 128, 64, 32 rows a tile where experts average 8
    tiles or more (the padding, at most Bm − 1 rows an expert, then bounded by 12.5%), else 16 (Triton's least
    matmul tile)."""
    per_group = rows / max(groups, 1)
    for bm in (128, 64, 32):
        if per_group >= 8 * bm:
            return bm
    return 16


def _block(n: int, choices) -> int | None:
    return next((b for b in choices if n % b == 0), None)


def supported(n: int, k: int) -> bool:
    """Whether the kernel takes weights [E, N, K]: N and K multiples of 16 (tiles are powers of two)."""
    return _block(n, N_BLOCKS) is not None and _block(k, K_BLOCKS) is not None


def padded_rows(rows: int, groups: int, bm: int) -> int:
    """P: rows once each of `groups` experts' rows start on a tile of Bm (the worst case: Bm − 1 padding rows
    per expert), a whole number of tiles."""
    return -(-(rows + groups * (bm - 1)) // bm) * bm


def tile_layout(sizes_e, rows: int, bm: int):
    """Where `rows` rows sorted by expert (sizes [E] rows each; rows past their sum belong to none) go once each
    expert's rows start on a tile of Bm → (dest [M] int32: each row's padded row, P for rows of no expert;
    src [P] int32: each padded row's row, M for padding; tiles [P / Bm] int32: each tile's expert, E for tiles
    past the last expert's); each row's and each tile's expert by `moe_jax.model.moe.activation.group_of`."""
    E = sizes_e.shape[0]
    P = padded_rows(rows, E, bm)
    sizes = sizes_e.astype(jnp.int32)
    tiles_e = -(-sizes // bm)                                                # tiles of each expert
    start = jnp.cumsum(sizes) - sizes                                        # its first row, sorted
    tile_start = jnp.cumsum(tiles_e) - tiles_e                               # its first tile, padded
    r = jnp.arange(rows, dtype=jnp.int32)
    e = group_of(sizes, rows)                                                # each row's expert (E: none)
    e_c = jnp.minimum(e, E - 1)
    dest = jnp.where(e < E, tile_start[e_c] * bm + r - start[e_c], P).astype(jnp.int32)
    src = jnp.full((P,), rows, jnp.int32).at[dest].set(r, mode="drop")
    tiles = group_of(tiles_e, P // bm)                                       # E past the last
    return dest, src, tiles


def kernel_name(bm: int, bn: int, bk: int) -> str:
    """The kernel's name: `NAME` and its tiles."""
    return f"{NAME}_bm{bm}_bn{bn}_bk{bk}"


_NAME_RE = re.compile(NAME + r"_bm(\d+)_bn(\d+)_bk(\d+)")


def parse_kernel_name(text: str) -> dict | None:
    """{bm, bn, bk} from the text of a compiled instruction that calls the kernel, or None when it does not."""
    m = _NAME_RE.search(text)
    return None if m is None else {"bm": int(m.group(1)), "bn": int(m.group(2)), "bk": int(m.group(3))}


def kernel_cost(P: int, N: int, K: int, E: int, itemsize: int, weight_itemsize: int | None = None) -> dict:
    """FLOPs and HBM bytes of one call over P padded rows and weights [E, N, K]: every tile multiplied whole
    (2 · P · N · K), the rows, the weights and the output read or written once each (a row tile's other column
    blocks and an expert's other tiles read them from L2: the programs sharing them run together). itemsize: of
    the rows and the output; weight_itemsize: of the weights as stored (FP8: 1), by default the rows'."""
    weight_itemsize = itemsize if weight_itemsize is None else weight_itemsize
    return {"flops": 2 * P * N * K, "bytes": itemsize * (P * K + P * N) + weight_itemsize * E * N * K}


def _kernel(tile_ref, x_ref, w_ref, o_ref, *, bn: int, bk: int, groups: int, layer: int | None):
    """One program: column block (program 0) of row tile (program 1). layer: None (w [E, N, K]), or the index of
    the layer to read in stacked weights [L, E, N, K]."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    e = tile_ref[0]
    n0 = pl.program_id(0) * bn
    K = x_ref.shape[-1]

    @pl.when(e < groups)
    def _():
        def step(i, acc):
            x = x_ref[:, pl.ds(i * bk, bk)]                                  # [Bm, Bk]
            at = (e, pl.ds(n0, bn), pl.ds(i * bk, bk))
            w = w_ref[at if layer is None else (layer, *at)].astype(x.dtype)   # [Bn, Bk] (FP8 converted here)
            return acc + plgpu.dot(x, w, trans_b=True)

        acc = jax.lax.fori_loop(0, K // bk, step, jnp.zeros(o_ref.shape, F32))
        o_ref[...] = acc.astype(o_ref.dtype)

    @pl.when(e >= groups)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def tiled_matmul(xp, w_enk, tiles, *, bm: int, interpret: bool = False, layer: int | None = None):
    """Rows of tile t times w[tiles[t]]ᵀ: xp [P, K] laid out by `tile_layout`, w [E, N, K] (FP8 weights are
    converted to the rows' dtype as each block is read), tiles [P / Bm] → [P, N] in the rows' dtype (f32
    accumulation); tiles of expert E (none) give zeros.

    layer: None, or an index into stacked weights w [L, E, N, K], read in place (an unrolled layer's experts:
    `moe_jax.model.provenance.layer_source`; as an operand, the slice would be a copy)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    P, K = xp.shape
    E, N, _ = w_enk.shape[-3:]
    bn, bk = _block(N, N_BLOCKS), _block(K, K_BLOCKS)
    layer_ok = w_enk.ndim == 3 if layer is None else w_enk.ndim == 4 and 0 <= layer < w_enk.shape[0]
    if bn is None or bk is None or P % bm or w_enk.shape[-1] != K or tiles.shape != (P // bm,) or not layer_ok:
        raise ValueError(f"tiled_matmul: rows {xp.shape}, weights {w_enk.shape} (layer {layer}), tiles "
                         f"{tiles.shape} at Bm {bm} are not shapes the kernel takes (see "
                         "moe_jax.model.moe.grouped_kernel.supported)")
    kernel = functools.partial(_kernel, bn=bn, bk=bk, groups=E, layer=layer)
    return pl.pallas_call(
        kernel, grid=(N // bn, P // bm),
        in_specs=[pl.BlockSpec((1,), lambda j, i: (i,)),
                  pl.BlockSpec((bm, K), lambda j, i: (i, 0)),
                  pl.BlockSpec(w_enk.shape, lambda j, i: (0,) * w_enk.ndim)],
        out_specs=pl.BlockSpec((bm, bn), lambda j, i: (i, j)),
        out_shape=jax.ShapeDtypeStruct((P, N), xp.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret, name=kernel_name(bm, bn, bk))(tiles.astype(jnp.int32), xp, w_enk)


def pad_rows(x_md, src):
    """x [M, K] laid out on padded rows (src [P] from `tile_layout`; padding rows zero) → [P, K]."""
    return jnp.take(x_md, src, axis=0, mode="fill", fill_value=0)


def unpad_rows(y_pn, dest):
    """The padded rows' results back in sorted order (dest [M] from `tile_layout`; rows of no expert zero) → [M, N]."""
    return jnp.take(y_pn, dest, axis=0, mode="fill", fill_value=0)


__all__ = ["NAME", "row_block", "supported", "padded_rows", "tile_layout", "kernel_name", "parse_kernel_name",
           "kernel_cost", "tiled_matmul", "pad_rows", "unpad_rows"]
