"""The MoE block: route, dispatch, experts, combine, as pure helpers under a thin module.

Capacity dispatch (GShard): tokens are cut into groups of at most ``moe_group_size``
tokens that never straddle a ``dp × ep`` shard. Within a group each expert takes at
most C tokens; first choices are placed before second choices, and overflow is dropped
(the token then skips that expert). Dispatch turns ``[G, Sg, D]`` (groups split over
``dp × ep``) into ``[E, G, C, D]`` (experts split over ``ep``): the all-to-all. Combine
is the reverse. Because groups are bounded, the dispatch tensors ``[G, Sg, E, C]`` grow
linearly with the number of tokens.

Dropless dispatch (as in MegaBlocks, MaxText and DeepSeek serving): every token-expert
assignment is kept. Assignments are sorted by expert and each expert multiplies exactly
its rows with one grouped matmul (`jax.lax.ragged_dot_general`). With ``ep > 1`` the block runs
inside `jax.shard_map`, manual over the mesh axes the tokens, experts and expert width
are split over: each shard sorts its tokens' assignments, the per-expert counts are
all-gathered (a few integers), rows travel to the shard owning their expert with
`jax.lax.ragged_all_to_all`, landing already grouped by local expert, are multiplied,
and travel back. The receive buffer is sized for the worst case (every token of every
shard routed to this shard), so nothing is ever dropped; the expected traffic is far
below it (the cost report states both). ``cfg.dropless_buffer`` bounds the buffer
instead; rows past it are dropped and counted.

The dense reference applies every expert to every token and gates the result: no
drops, E times the FLOPs; for tests.

The expert weights are stored with their contracted dimensions minor, as Hugging Face stores
them: gate and up together ``w_gate_up_epfd`` [E, 2, F, D] (p: the pair), down ``w_down_edf``
[E, D, F]. Decode at one token per expert on a GPU reads each as a row reduction in place
(`moe_jax.model.layers.weight_einsum`); stored [E, D, F], the GPU compile copied the whole
stacked gate and up parameters into [E, F, D] every step (39 GB for Qwen3-30B-A3B). One
gate-and-up parameter is one matmul: multiplied separately, XLA:GPU merges the two matmuls
and relays out both weights to concatenate them. TPU's grouped-matmul kernel reads [E, K, N]:
it relays out each layer's slice it copies (see `_grouped_matmul`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.model import scopes
from moe_jax.model.layers import F32, param, weight_einsum
from moe_jax.parallel.rules import batch_shards, constrain, current_layout, traced_platform


def route(x, router_de, top_k: int, norm_topk: bool):
    """Softmax router in f32. x [..., D] → (weights [..., k] f32, experts [..., k] int32)."""
    logits = jnp.einsum("...d,de->...e", x.astype(F32), router_de.astype(F32))
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = _top_k(probs, top_k)
    if norm_topk:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def _top_k(probs, k: int):
    """Top-k by k rounds of argmax (ties: lowest index first, as lax.top_k).

    lax.top_k's HLO op is not partitioned along batch dimensions by XLA's SPMD
    partitioner: it all-gathers the router probabilities of every token onto every
    device. argmax is a reduction and stays local. k is small (≤ 8 in every preset).
    """
    weights, experts = [], []
    for _ in range(k):
        idx = jnp.argmax(probs, axis=-1)
        weights.append(jnp.take_along_axis(probs, idx[..., None], axis=-1)[..., 0])
        experts.append(idx.astype(jnp.int32))
        probs = jnp.where(jax.nn.one_hot(idx, probs.shape[-1], dtype=jnp.bool_), -jnp.inf, probs)
    return jnp.stack(weights, axis=-1), jnp.stack(experts, axis=-1)


def group_size(num_tokens: int, shards: int, max_group: int) -> int:
    """Sg: the largest divisor of the tokens per shard that is at most `max_group`.

    Groups then tile each shard exactly, so no group crosses a device boundary.
    """
    per_shard = num_tokens // shards if num_tokens % shards == 0 else num_tokens
    return max(d for d in range(1, min(per_shard, max_group) + 1) if per_shard % d == 0)


def capacity_masks(weights_gsk, experts_gsk, num_experts: int, capacity: int):
    """Dispatch and combine tensors for capacity routing.

    weights/experts [G, Sg, k] → dispatch [G, Sg, E, C] (0/1), combine [G, Sg, E, C] (gate
    weights), dropped [G] (token-expert assignments that found no slot, per group; kept
    per group so that counting adds no collective to the program).
    A token's j-th choice is placed after every token's (j-1)-th choice in the group.
    """
    G, Sg, k = experts_gsk.shape
    onehot = jax.nn.one_hot(experts_gsk, num_experts, dtype=jnp.int32)        # [G, Sg, k, E]
    by_priority = onehot.transpose(0, 2, 1, 3).reshape(G, k * Sg, num_experts)
    position = jnp.cumsum(by_priority, axis=1) - 1                            # slot within expert
    position = position.reshape(G, k, Sg, num_experts).transpose(0, 2, 1, 3)
    slot_gsk = jnp.sum(position * onehot, axis=-1)                            # [G, Sg, k]
    kept = slot_gsk < capacity
    slot_onehot = jax.nn.one_hot(jnp.where(kept, slot_gsk, capacity), capacity, dtype=F32)  # [G, Sg, k, C]
    onehot = onehot.astype(F32)
    dispatch = jnp.einsum("gske,gskc->gsec", onehot, slot_onehot)
    combine = jnp.einsum("gske,gskc,gsk->gsec", onehot, slot_onehot, weights_gsk)
    dropped = constrain(jnp.sum(~kept, axis=(1, 2), dtype=jnp.int32), ("group",))  # [G]
    return dispatch, combine, dropped


def swiglu_experts(x_egcd, w_gate_up_epfd, w_down_edf):
    """Each expert's SwiGLU on its own tokens. x [E, G, C, D] → [E, G, C, D]; weights [E, 2, F, D], [E, D, F]."""
    E, G, C, D = x_egcd.shape
    layout = current_layout()
    one_row = G // (layout.shards("expert_group", G) if layout is not None else 1) * C == 1   # per expert, device
    gate_up = weight_einsum("egcd,epfd->egcpf", x_egcd, w_gate_up_epfd, one_row=one_row)  # p, f as stored
    h = jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
    h = constrain(h, ("expert", "expert_group", "capacity", "mlp"))
    return weight_einsum("egcf,edf->egcd", h, w_down_edf, one_row=one_row)


def capacity_moe(x_bsd, router_de, w_gate_up_epfd, w_down_edf, cfg: ModelConfig):
    """Routed experts with capacity dispatch. x [B, S, D] → (y [B, S, D], dropped assignments [G])."""
    B, S, D = x_bsd.shape
    Sg = group_size(B * S, batch_shards(B), cfg.moe_group_size)
    G = B * S // Sg
    C = cfg.capacity(Sg)
    x = constrain(x_bsd.reshape(G, Sg, D), ("group", "group_tokens", "embed"))
    with jax.named_scope(scopes.ROUTE):
        weights, experts = route(x, router_de, cfg.top_k, cfg.router_norm_topk)
        dispatch, combine, dropped = capacity_masks(weights, experts, cfg.num_experts, C)
    with jax.named_scope(scopes.DISPATCH):
        # Pack locally (every expert's slots for this shard's groups), then move: the
        # change from G split over dp×ep to E split over ep is one all-to-all on ep.
        xe = jnp.einsum("gsd,gsec->egcd", x, dispatch.astype(x.dtype))        # [E, G, C, D]
        xe = constrain(xe, ("expert_all", "group", "capacity", "embed"))
        xe = constrain(xe, ("expert", "expert_group", "capacity", "embed"))
    with jax.named_scope(scopes.EXPERTS):
        ye = swiglu_experts(xe, w_gate_up_epfd, w_down_edf)
        ye = constrain(ye, ("expert", "expert_group", "capacity", "embed"))
    with jax.named_scope(scopes.COMBINE):
        ye = constrain(ye, ("expert_all", "group", "capacity", "embed"))     # all-to-all back
        y = jnp.einsum("egcd,gsec->gsd", ye, combine.astype(ye.dtype))
        y = constrain(y, ("group", "group_tokens", "embed"))
    return y.reshape(B, S, D), dropped


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


def _exclusive_cumsum(x, axis: int = -1):
    return jnp.cumsum(x, axis=axis) - x


def _grouped_matmul(x_mk, w, sizes_e, native: bool, k_minor: bool = False):
    """Rows of group e times w[e]: x [M, K] sorted by group, sizes [E] → [M, N]; rows past sum(sizes) are
    left to the caller to mask. w is [E, K, N], or [E, N, K] with `k_minor` (the experts' weights as stored).

    native: `jax.lax.ragged_dot_general` (a grouped-matmul kernel on TPU and GPU). TPU's kernel reads
    [E, K, N]: with `k_minor` XLA relays out each layer's slice after copying it out of the stacked
    weights, a second copy per layer where [E, K, N] weights cost one. Otherwise (XLA:CPU) a loop over
    the groups, each a dense matmul of all rows kept only on the group's rows: jax's own CPU lowering
    of ragged_dot masks a [E, M, K] copy of x, E times the memory.
    """
    k = 2 if k_minor else 1
    # The scope lets the cost walk find grouped matmuls however they are lowered.
    with jax.named_scope(scopes.GROUPED_MATMUL):
        if native:
            numbers = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [k]), ([], [])),
                                                        lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
            return jax.lax.ragged_dot_general(x_mk, w, sizes_e, numbers)
        ends = jnp.cumsum(sizes_e)
        rows = jnp.arange(x_mk.shape[0])

        def one_group(acc, e):
            mine = (rows >= ends[e] - sizes_e[e]) & (rows < ends[e])
            y = jax.lax.dot_general(x_mk, w[e], (([1], [k - 1]), ([], [])))
            return acc + jnp.where(mine[:, None], y, 0).astype(acc.dtype), None

        acc = jnp.zeros((x_mk.shape[0], w.shape[3 - k]), jnp.result_type(x_mk, w))
        return jax.lax.scan(one_group, acc, jnp.arange(w.shape[0]))[0]


def _grouped_swiglu(x_md, sizes_e, w_gate_up_epfd, w_down_edf, native: bool = True):
    """SwiGLU of expert e on its rows: x [M, D] sorted by expert, sizes [E] rows per expert → [M, D].

    Rows past sum(sizes) (padding) belong to no expert; callers mask them.
    """
    E, _, F, D = w_gate_up_epfd.shape
    with jax.named_scope(scopes.EXPERTS):
        gate_up = _grouped_matmul(x_md, w_gate_up_epfd.reshape(E, 2 * F, D), sizes_e, native, k_minor=True)
        gate_up = gate_up.reshape(-1, 2, F)                                    # [M, 2, F]
        h = jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]
        return _grouped_matmul(h, w_down_edf, sizes_e, native, k_minor=True)


def _sort_assignments(experts_tk, num_experts: int):
    """Order of the T·k assignments sorted by expert (stable) and rows per expert.

    experts [T, k] int32, where id == num_experts marks a padding token (sorted last,
    counted nowhere) → (order [T·k], sorted expert ids [T·k], sizes [E] int32).
    """
    flat = experts_tk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sorted_ids = flat[order]
    bounds = jnp.searchsorted(sorted_ids, jnp.arange(num_experts + 1, dtype=flat.dtype), side="left")
    return order, sorted_ids, jnp.diff(bounds).astype(jnp.int32)


def _dropless_shard(x_td, router_de, w_gate_up_epfd, w_down_edf, *, cfg: ModelConfig,
                    real_tokens: int, token_axes: tuple, ep_axis: str | None, ep: int, tp_axes: tuple,
                    ragged: bool = True):
    """One shard's dropless MoE (inside shard_map, or the whole problem without a mesh).

    x [T, D] this shard's tokens (rows at global index >= real_tokens are padding);
    expert weights are this shard's E/ep experts (width F/tp). Returns (y [T, D], rows dropped [1]:
    0 unless ``cfg.dropless_buffer`` bounds the receive buffer).
    """
    T, D = x_td.shape
    E, k, E_loc = cfg.num_experts, cfg.top_k, w_gate_up_epfd.shape[0]
    first = 0
    if token_axes:
        first = jax.lax.axis_index(token_axes) * T
    real = (first + jnp.arange(T)) < real_tokens                               # [T]
    with jax.named_scope(scopes.ROUTE):
        weights, experts = route(x_td, router_de, k, cfg.router_norm_topk)        # [T, k]
        experts = jnp.where(real[:, None], experts, E)
        order, sorted_ids, sizes = _sort_assignments(experts, E)               # [T·k], [T·k], [E]
    with jax.named_scope(scopes.DISPATCH):
        xs = x_td[order // k]                                                  # [T·k, D] by expert
    dropped = jnp.zeros((1,), jnp.int32)
    if ep == 1:
        ys = _grouped_swiglu(xs, sizes, w_gate_up_epfd, w_down_edf, native=ragged)
        ys = jnp.where((sorted_ids < E)[:, None], ys, 0)
    else:
        buffer_rows, block_rows = receive_rows(cfg, T, ep)
        ys, dropped = _exchange_and_compute(xs, sizes, w_gate_up_epfd, w_down_edf, ep_axis=ep_axis, ep=ep,
                                            E_loc=E_loc, buffer_rows=buffer_rows, block_rows=block_rows,
                                            ragged=ragged)
    with jax.named_scope(scopes.COMBINE):
        y_tkd = jnp.zeros_like(ys).at[order].set(ys).reshape(T, k, D)           # back to token order
        y = jnp.einsum("tkd,tk->td", y_tkd.astype(F32), jnp.where(real[:, None], weights, 0))
        if tp_axes:   # each tp rank multiplied a slice of F: the down projections are partial sums
            # (in f32 on CPU: XLA:CPU crashes on a 16-bit all-reduce inside a partially manual
            # shard_map, in AllReducePromotion)
            y = jax.lax.psum(y if not ragged else y.astype(x_td.dtype), tp_axes)
    return y.astype(x_td.dtype), dropped


def _exchange_and_compute(xs_md, sizes_e, w_gate_up_epfd, w_down_edf, *, ep_axis: str, ep: int,
                          E_loc: int, buffer_rows: int, block_rows: int, ragged: bool):
    """Send rows sorted by (global) expert to the shards owning the experts, compute, send back.

    xs [N, D] this shard's assignments sorted by expert; sizes [E] rows per expert.
    buffer_rows, block_rows: `receive_rows`.
    Every (destination, local expert) run of rows is one chunk of the ragged all-to-all,
    and lands where the receiver's buffer is already grouped by local expert (expert e's
    rows from source 0, then source 1, ...), so the grouped matmul reads the buffer as it
    arrives and the results go back chunk by chunk to where they came from. Rows that
    would land past the buffer (only with a bounded buffer) are not sent: dropped.
    ragged: the native `ragged_all_to_all` (TPU, GPU); otherwise `_ragged_all_to_all_dense`.
    Returns ([N, D]: each row's expert output in the order of xs, 0 for padding and dropped
    rows; rows dropped [1]).
    """
    N, D = xs_md.shape
    me = jax.lax.axis_index(ep_axis)
    exchange = jax.lax.ragged_all_to_all if ragged else functools.partial(_ragged_all_to_all_dense,
                                                                          block_rows=block_rows)
    with jax.named_scope(scopes.DISPATCH):
        counts = jax.lax.all_gather(sizes_e, ep_axis).reshape(ep, ep, E_loc)   # [src, dst, local expert] rows
        to_expert = counts.sum(0)                                              # [dst, e]: rows per expert
        expert_start = _exclusive_cumsum(to_expert, axis=1)                   # [dst, e]: expert e's first row
        before = _exclusive_cumsum(counts, axis=0)                            # [src, dst, e]: earlier sources' rows
        sent_from = _exclusive_cumsum(counts.reshape(ep, ep * E_loc), axis=1)  # [src, chunk]: offsets in xs
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
    yr = _grouped_swiglu(recv, mine.sum(0), w_gate_up_epfd, w_down_edf, native=ragged)
    with jax.named_scope(scopes.COMBINE):
        # Back: the chunk of source s for my expert e sits at `at`, and lands where s sent it from.
        back_land = jax.lax.dynamic_index_in_dim(sent_from.reshape(ep, ep, E_loc), me, 1,
                                                 keepdims=False).reshape(-1)                  # [src·e]
        y = exchange(yr.astype(xs_md.dtype), jnp.zeros((N, D), xs_md.dtype), at.reshape(-1), mine.reshape(-1),
                     back_land, send, axis_name=ep_axis)
    return y, jnp.sum(sizes_e - send, dtype=jnp.int32)[None]


def _ragged_all_to_all_dense(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
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
    packed_at = _exclusive_cumsum(sizes, axis=1)                               # [dst, chunk]: position in block
    q = jnp.arange(block_rows)

    def chunk_of(starts):   # [peer, chunk] start rows in a block → [peer, row]: the chunk holding each row
        return jax.vmap(lambda p: jnp.searchsorted(p, q, side="right") - 1)(starts)

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


def dropless_moe(x_bsd, router_de, w_gate_up_epfd, w_down_edf, cfg: ModelConfig):
    """Routed experts, dropless. x [B, S, D] → (y [B, S, D], rows dropped per token shard: 0 unless
    ``cfg.dropless_buffer`` bounds the receive buffer).

    With nothing to split (no mesh, one device, or pipeline stages only) it is one sort and
    three grouped matmuls; otherwise it runs in `jax.shard_map`, manual over the token axes (``batch``: dp × ep),
    the expert axis (ep) and the width axis (tp); see the module docstring.
    """
    B, S, D = x_bsd.shape
    T = B * S
    x = x_bsd.reshape(T, D)
    layout = current_layout()
    kw = dict(cfg=cfg, real_tokens=T)
    # XLA:CPU has no ragged all-to-all or grouped matmul: the CPU program moves the same rows in
    # fixed blocks and loops over the local experts.
    ragged = traced_platform() != "cpu"

    def present(name):
        return tuple(a for a in layout.rules[name] if layout.axis_sizes.get(a, 1) > 1)

    token_axes, ep_axes, tp_axes = (present("batch"), present("expert"), present("mlp")) \
        if layout is not None and layout.mesh is not None else ((), (), ())
    manual = set(token_axes) | set(ep_axes) | set(tp_axes)
    if not manual:       # nothing to split here (one device, or only pipeline stages, already manual)
        y, dropped = _dropless_shard(x, router_de, w_gate_up_epfd, w_down_edf, token_axes=(), ep_axis=None,
                                     ep=1, tp_axes=(), ragged=ragged, **kw)
        return y.reshape(B, S, D), dropped
    from jax.sharding import PartitionSpec as P

    shards = layout.size(token_axes)
    padded = -(-T // shards) * shards
    x = jnp.pad(x, ((0, padded - T), (0, 0)))
    abstract = jax.sharding.get_abstract_mesh()
    inside_manual = not abstract.empty and bool(abstract.manual_axes)
    mesh = abstract if inside_manual else layout.mesh
    (ep_axis,) = ep_axes or (None,)
    gate_up_spec = layout.spec(("expert", "gate_up", "mlp", "embed"), w_gate_up_epfd.shape, what="expert weights")
    down_spec = layout.spec(("expert", "embed", "mlp"), w_down_edf.shape, what="expert weights")
    body = functools.partial(_dropless_shard, token_axes=token_axes, ep_axis=ep_axis,
                             ep=layout.size(ep_axes), tp_axes=tp_axes, ragged=ragged, **kw)
    tok = P(token_axes or None, None)
    y, dropped = jax.shard_map(body, mesh=mesh, axis_names=manual, check_vma=False,
                               in_specs=(tok, P(), gate_up_spec, down_spec), out_specs=(tok, P(token_axes or None)))(
        x, router_de, w_gate_up_epfd, w_down_edf)
    return y[:T].reshape(B, S, D), dropped


def dense_moe(x_bsd, router_de, w_gate_up_epfd, w_down_edf, cfg: ModelConfig):
    """Reference: every expert on every token, gated by the router's top-k weights (nothing dropped)."""
    weights, experts = route(x_bsd, router_de, cfg.top_k, cfg.router_norm_topk)
    gates = jnp.sum(jax.nn.one_hot(experts, cfg.num_experts, dtype=F32) * weights[..., None], axis=-2)
    gate = jnp.einsum("bsd,efd->bsef", x_bsd, w_gate_up_epfd[:, 0])
    up = jnp.einsum("bsd,efd->bsef", x_bsd, w_gate_up_epfd[:, 1])
    out = jnp.einsum("bsef,edf->bsed", jax.nn.silu(gate) * up, w_down_edf)
    y = jnp.einsum("bsed,bse->bsd", out.astype(F32), gates).astype(x_bsd.dtype)
    return y, jnp.zeros((1,), jnp.int32)


class MoE(nnx.Module):
    """Router, E routed SwiGLU experts (sharded on ep, width on tp), optional shared experts."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, E, F, dt = cfg.d_model, cfg.num_experts, cfg.expert_ffn, cfg.dtype
        self.cfg = cfg
        self.router_de = param(rngs, (D, E), ("embed", "expert_all"), dt, fan_in=D)
        self.w_gate_up_epfd = param(rngs, (E, 2, F, D), ("expert", "gate_up", "mlp", "embed"), dt, fan_in=D)
        self.w_down_edf = param(rngs, (E, D, F), ("expert", "embed", "mlp"), dt, fan_in=F)
        if cfg.num_shared_experts:
            Fs = cfg.num_shared_experts * F
            self.shared_gate_up_pfd = param(rngs, (2, Fs, D), ("gate_up", "mlp", "embed"), dt, fan_in=D)
            self.shared_down_df = param(rngs, (D, Fs), ("embed", "mlp"), dt, fan_in=Fs)

    def __call__(self, x_bsd):
        """x [B, S, D] → (y [B, S, D], dropped token-expert assignments per token group [G])."""
        impl = {"capacity": capacity_moe, "dropless": dropless_moe, "dense": dense_moe}[self.cfg.dispatch]
        y, dropped = impl(x_bsd, self.router_de[...], self.w_gate_up_epfd[...], self.w_down_edf[...], self.cfg)
        if self.cfg.num_shared_experts:
            with jax.named_scope(scopes.SHARED_EXPERTS):
                B, S, _ = x_bsd.shape
                one_row = B // batch_shards(B) * S == 1
                gate_up = weight_einsum("bsd,pfd->bspf", x_bsd, self.shared_gate_up_pfd[...], one_row=one_row)
                h = constrain(jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1], ("batch", "length", "mlp"))
                y = y + weight_einsum("bsf,df->bsd", h, self.shared_down_df[...], one_row=one_row)
        return constrain(y, ("batch", "length", "embed")), dropped
