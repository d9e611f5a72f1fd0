"""Moving dropless rows to the shards that own their experts and back: a ragged all-to-all over ``ep``.

Each shard's assignments arrive sorted by (global) expert. The per-expert counts are
all-gathered (a few integers); every (destination, local expert) run of rows is then
one chunk of `jax.lax.ragged_all_to_all`, and lands where the receiver's buffer is
already grouped by local expert (expert e's rows from source 0, then source 1, ...), so
the grouped matmul reads the buffer as it arrives and the results go back chunk by chunk
to where they came from.

The receive buffer is sized for the worst case (`receive_rows`: every token of every
shard routed to this shard), so nothing is ever dropped; the expected traffic is far
below it (the cost report states both). ``cfg.dropless_buffer`` bounds the buffer
instead; rows past it are not sent: dropped and counted.

Backends without a ragged all-to-all (XLA:CPU) use `ragged_all_to_all_dense`: the same
result from a dense all-to-all of fixed worst-case blocks.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.model import scopes


def receive_rows(cfg: ModelConfig, tokens: int, ep: int) -> tuple[int, int]:
    """(R, P): rows of one shard's receive buffer, and the most rows one source sends one shard.

    tokens: T per shard. The worst case: every token of the ep group routed to this shard,
    at most min(k, E/ep) of a token's k choices each, R = ep · T · min(k, E/ep). With
    ``cfg.dropless_buffer`` = f, R = min(worst, ceil(f · T · k)).
    """
    pair = tokens * min(cfg.top_k, cfg.num_experts // ep)
    rows = ep * pair
    if cfg.dropless_buffer is not None:
        rows = max(1, min(rows, math.ceil(cfg.dropless_buffer * tokens * cfg.top_k)))
    return rows, min(pair, rows)


def exclusive_cumsum(x, axis: int = -1):
    """The sum of the elements before each one along `axis` (0 for the first)."""
    return jnp.cumsum(x, axis=axis) - x


class Routes(NamedTuple):
    """Where one exchange put this shard's rows, and where the rows it received came from: the way back."""

    me: jax.Array
    """This shard's index on the expert axis."""
    sent_from: jax.Array
    """[src, dst · e]: where each source's chunk for (destination, local expert) starts in its rows."""
    send: jax.Array
    """[dst · e]: rows this shard sent of each chunk (fewer than it has only past a bounded buffer)."""
    at: jax.Array
    """[src, e]: where source src's rows for my local expert e start in my receive buffer."""
    mine: jax.Array
    """[src, e]: rows received from source src for my local expert e."""


def _collective(ragged: bool, block_rows: int):
    """The ragged all-to-all: native, or its dense stand-in moving blocks of `block_rows` rows."""
    return jax.lax.ragged_all_to_all if ragged else functools.partial(ragged_all_to_all_dense,
                                                                      block_rows=block_rows)


def send_to_experts(xs_md, sizes_e, *, ep_axis: str, ep: int, E_loc: int, buffer_rows: int, block_rows: int,
                    ragged: bool):
    """Send rows sorted by (global) expert to the shards owning the experts (inside shard_map over `ep_axis`).

    xs [N, D] this shard's assignments sorted by expert; sizes [E] rows per expert.
    buffer_rows, block_rows: `receive_rows`. ragged: the native `ragged_all_to_all` (TPU, GPU);
    otherwise `ragged_all_to_all_dense`.
    Returns (receive buffer [buffer_rows, D] grouped by local expert, `Routes`).
    """
    D = xs_md.shape[1]
    me = jax.lax.axis_index(ep_axis)
    exchange = _collective(ragged, block_rows)
    with jax.named_scope(scopes.DISPATCH):
        counts = jax.lax.all_gather(sizes_e, ep_axis).reshape(ep, ep, E_loc)   # [src, dst, local expert] rows
        to_expert = counts.sum(0)                                              # [dst, e]: rows per expert
        expert_start = exclusive_cumsum(to_expert, axis=1)                    # [dst, e]: expert e's first row
        before = exclusive_cumsum(counts, axis=0)                             # [src, dst, e]: earlier sources' rows
        sent_from = exclusive_cumsum(counts.reshape(ep, ep * E_loc), axis=1)  # [src, chunk]: offsets in xs
        # my chunk (dst, e) lands at the receiver's expert start plus the rows of the sources before me
        land = (expert_start + jax.lax.dynamic_index_in_dim(before, me, 0, keepdims=False)).reshape(-1)
        send = jnp.clip(buffer_rows - land, 0, sizes_e)                        # what fits; the rest is dropped
        land = jnp.minimum(land, buffer_rows)                                  # empty chunks past a bounded buffer
        my_start = jax.lax.dynamic_index_in_dim(expert_start, me, 0, keepdims=False)          # [e]
        at = my_start[None, :] + jax.lax.dynamic_index_in_dim(before, me, 1, keepdims=False)  # [src, e]
        mine = jnp.clip(buffer_rows - at, 0, jax.lax.dynamic_index_in_dim(counts, me, 1, keepdims=False))
        at = jnp.minimum(at, buffer_rows)
        buffer = jnp.zeros((buffer_rows, D), xs_md.dtype)
        recv = exchange(xs_md, buffer, sent_from[me], send, land, mine.reshape(-1), axis_name=ep_axis)
    return recv, Routes(me, sent_from, send, at, mine)


def send_back(yr, routes: Routes, rows: int, dtype, *, ep_axis: str, ep: int, E_loc: int, block_rows: int,
              ragged: bool):
    """The reverse of `send_to_experts`: results yr [buffer_rows, D] back to the shards their rows came from.

    Returns [rows, D] in the order the rows were sent (0 for rows never sent), in `dtype`.
    """
    exchange = _collective(ragged, block_rows)
    with jax.named_scope(scopes.COMBINE):
        # Back: the chunk of source s for my expert e sits at `at`, and lands where s sent it from.
        back_land = jax.lax.dynamic_index_in_dim(routes.sent_from.reshape(ep, ep, E_loc), routes.me, 1,
                                                 keepdims=False).reshape(-1)                  # [src·e]
        return exchange(yr.astype(dtype), jnp.zeros((rows, yr.shape[1]), dtype), routes.at.reshape(-1),
                        routes.mine.reshape(-1), back_land, routes.send, axis_name=ep_axis)


def ragged_all_to_all_dense(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                            axis_name: str, block_rows: int):
    """`jax.lax.ragged_all_to_all`'s semantics with a dense all-to-all (for XLA:CPU, which has no ragged one).

    The chunks for each destination are packed into one block of `block_rows` rows (the
    most one source sends one destination), blocks and chunk offsets travel with
    `all_to_all`, and each receiver scatters the rows to their output offsets. Same result
    as the native collective; the block is the worst-case payload.
    """
    ep = jax.lax.axis_size(axis_name)
    chunks = input_offsets.shape[0] // ep
    sizes = send_sizes.reshape(ep, chunks)
    packed_at = exclusive_cumsum(sizes, axis=1)                                # [dst, chunk]: position in block
    q = jnp.arange(block_rows)

    def chunk_of(starts):   # [peer, chunk] start rows in a block → [peer, row]: the chunk holding each row
        return jax.vmap(lambda p: jnp.searchsorted(p, q, side="right", method="compare_all") - 1)(starts)

    chunk = chunk_of(packed_at)                                                # [dst, row]
    in_block = q[None, :] < sizes.sum(1, keepdims=True)
    start = jnp.take_along_axis(input_offsets.reshape(ep, chunks), chunk, 1)
    src_row = start + q[None, :] - jnp.take_along_axis(packed_at, chunk, 1)
    block = jnp.where(in_block[..., None], operand[jnp.clip(src_row, 0, operand.shape[0] - 1)], 0)
    with jax.named_scope(scopes.RAGGED_AS_DENSE):
        block = jax.lax.all_to_all(block, axis_name, 0, 0, tiled=True)        # [src, rows, D]
    meta = jnp.stack([packed_at, output_offsets.reshape(ep, chunks)], -1)
    meta = jax.lax.all_to_all(meta, axis_name, 0, 0, tiled=True)               # [src, chunk, 2]
    got = recv_sizes.reshape(ep, chunks)
    chunk = chunk_of(meta[..., 0])                                             # [src, row]
    valid = q[None, :] < got.sum(1, keepdims=True)
    dest = jnp.take_along_axis(meta[..., 1], chunk, 1) + q[None, :] - jnp.take_along_axis(meta[..., 0], chunk, 1)
    dest = jnp.where(valid, dest, output.shape[0])                             # out of range: dropped
    return output.at[dest.reshape(-1)].set(block.reshape(-1, operand.shape[1]), mode="drop")
