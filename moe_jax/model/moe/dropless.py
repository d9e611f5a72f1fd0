"""Dropless dispatch (as in MegaBlocks, MaxText and DeepSeek serving): sort by expert, one grouped matmul.

Every token-expert assignment is kept. Assignments are sorted by expert and each expert
multiplies exactly its rows with one grouped matmul (`jax.lax.ragged_dot_general`). With
``ep > 1`` the block runs inside `jax.shard_map`, manual over the mesh axes the tokens,
experts and expert width are split over: each shard sorts its tokens' assignments, the
rows travel to the shard owning their expert and back (`moe_jax.model.moe.exchange`), and
are multiplied in between. With fewer assignments (or receive-buffer rows) than local experts (decode),
each row is multiplied by its own expert's gathered weights instead (`moe_jax.model.moe.gathered`): exact,
and the step reads only those experts.

The expert weights are stored with their contracted dimensions minor (see
`moe_jax.model.moe.layer`). TPU's grouped-matmul kernel reads [E, K, N]: it relays out
each layer's slice it copies (see `grouped_matmul`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.model import scopes
from moe_jax.model.execution import Kernels
from moe_jax.model.layers import F32
from moe_jax.model.moe import grouped_kernel
from moe_jax.model.moe.activation import glu, row_experts, sum_over_width, width_biases
from moe_jax.model.moe.exchange import receive_rows, send_back, send_to_experts
from moe_jax.model.moe.gathered import gathered_moe, gathered_swiglu, gathers
from moe_jax.model.moe.route import route, weights_input
from moe_jax.model.provenance import layer_source
from moe_jax.model.quant import fp8_source
from moe_jax.parallel.rules import current_layout, mesh_in_force


def grouped_matmul(x_mk, w, sizes_e, native: bool, k_minor: bool = False):
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


def grouped_swiglu(x_md, sizes_e, w_gate_up_epfd, w_down_edf, kernels: Kernels, cfg: ModelConfig | None = None,
                   biases=None, *, rows=None, out_rows=None, layer: int | None = None):
    """SwiGLU of expert e on its rows: x [M, D] sorted by expert, sizes [E] rows per expert → [M, D].

    Rows past sum(sizes) (padding) belong to no expert; callers mask them. cfg: the activation's
    (`moe_jax.model.moe.activation.glu`); biases: None or (gate/up [E, 2, F], down [E, D]), each row adding
    its expert's.

    rows: None, or int32 [M]: the sorted rows are then x[rows] of a source x [T, D]. out_rows: None, or int32
    [R]: the result is then those of the sorted rows' outputs [R, D], rows of no expert (and indices ≥ M) zero.
    With the tiled kernel both gathers are folded into its padded layout's (one pass over the rows each way
    instead of two).
    layer: None, or the index of the layer whose experts to use in stacked weights [L, E, 2, F, D] and [L, E, D, F]
    (`moe_jax.model.provenance.layer_source`): the tiled kernel reads them in place, other forms slice them.
    """
    E, _, F, D = w_gate_up_epfd.shape[-4:]
    M = x_md.shape[0] if rows is None else rows.shape[0]
    tiled = kernels.fused_grouped_matmul and grouped_kernel.supported(2 * F, D) and grouped_kernel.supported(D, F)
    if layer is not None and not tiled:
        w_gate_up_epfd, w_down_edf, layer = w_gate_up_epfd[layer], w_down_edf[layer], None
    # FP8 weights read whole (`moe_jax.model.quant.fp8_source`): multiply the FP8 values as stored (the convert
    # fuses into the kernel's operand, or the tiled kernel converts each block it reads) and scale each row's
    # output by its expert's scale (exact: powers of two)
    sources = (fp8_source(w_gate_up_epfd), fp8_source(w_down_edf))
    scales = None
    if None not in sources:
        dtype = w_gate_up_epfd.dtype
        (q_gate_up, s_gate_up), (q_down, s_down) = sources
        w_gate_up_epfd, w_down_edf, scales = q_gate_up, q_down, (s_gate_up, s_down)
        if not tiled:
            w_gate_up_epfd, w_down_edf = w_gate_up_epfd.astype(dtype), w_down_edf.astype(dtype)
    with jax.named_scope(scopes.EXPERTS):
        if tiled:   # each expert's rows start on a tile of the kernel (`moe_jax.model.moe.grouped_kernel`)
            bm = grouped_kernel.row_block(M, E)
            dest, src, tiles = grouped_kernel.tile_layout(sizes_e, M, bm)
            if rows is not None:      # padded row → source row (padding: past the source's last, a zero row)
                src = jnp.where(src < M, rows[jnp.minimum(src, M - 1)], x_md.shape[0])
            x_md = grouped_kernel.pad_rows(x_md, src)                          # [P, D]
            ids = jnp.minimum(jnp.repeat(tiles, bm), E - 1)

            def product(x, w):
                with jax.named_scope(scopes.GROUPED_MATMUL):
                    return grouped_kernel.tiled_matmul(x, w, tiles, bm=bm, interpret=kernels.interpret_kernels,
                                                       layer=layer)
        else:
            if rows is not None:
                x_md = x_md[rows]
            ids = row_experts(sizes_e, M) if biases is not None or scales is not None else None

            def product(x, w):
                return grouped_matmul(x, w, sizes_e, kernels.grouped_matmul, k_minor=True)
        gate_up = product(x_md, w_gate_up_epfd.reshape(*w_gate_up_epfd.shape[:-4], E, 2 * F, D))   # [M or P, 2F]
        gate_up = gate_up.reshape(-1, 2, F)
        if scales is not None:
            gate_up = gate_up * scales[0][ids].astype(gate_up.dtype)          # [M, 2, 1]
        if biases is not None:
            gate_up = gate_up + biases[0][ids]
        y = product(glu(gate_up[:, 0], gate_up[:, 1], cfg), w_down_edf)
        if scales is not None:
            y = y * scales[1][ids].astype(y.dtype)                            # [M, 1]
        if biases is not None:
            y = y + biases[1][ids]
        if tiled:
            return grouped_kernel.unpad_rows(y, dest if out_rows is None else
                                             jnp.where(out_rows < M, dest[jnp.minimum(out_rows, M - 1)], y.shape[0]))
        if out_rows is None:
            return y
        y = jnp.where((jnp.arange(M) < jnp.sum(sizes_e))[:, None], y, 0)
        return jnp.take(y, out_rows, axis=0, mode="fill", fill_value=0)


def sort_assignments(experts_tk, num_experts: int):
    """Order of the T·k assignments sorted by expert (stable) and rows per expert.

    experts [T, k] int32, where id == num_experts marks a padding token (sorted last,
    counted nowhere) → (order [T·k], sorted expert ids [T·k], sizes [E] int32).
    """
    flat = experts_tk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sorted_ids = flat[order]
    # each bound compared with every id (one fusion, no loop: `moe_jax.model.moe.activation.group_of`)
    bounds = jnp.searchsorted(sorted_ids, jnp.arange(num_experts + 1, dtype=flat.dtype), side="left",
                              method="compare_all")
    return order, sorted_ids, jnp.diff(bounds).astype(jnp.int32)


def _dropless_shard(x_td, router_de, w_gate_up_epfd, w_down_edf, biases=None, *, cfg: ModelConfig, kernels: Kernels,
                    real_tokens: int, token_axes: tuple, ep_axis: str | None, ep: int, tp_axes: tuple,
                    layer: int | None = None):
    """One shard's dropless MoE (inside shard_map, or the whole problem without a mesh).

    x [T, D] this shard's tokens (rows at global index >= real_tokens are padding);
    expert weights (and biases, if any) are this shard's E/ep experts (width F/tp): with `layer`, the stacked
    weights of every layer (`grouped_swiglu`). Returns (y [T, D], rows dropped [1]: 0 unless
    ``cfg.dropless_buffer`` bounds the receive buffer).
    """
    T, D = x_td.shape
    E, k, E_loc = cfg.num_experts, cfg.top_k, w_gate_up_epfd.shape[0 if layer is None else 1]
    stored = (w_gate_up_epfd, w_down_edf)                                    # as `grouped_swiglu` takes them

    def one_layer():   # the gathered forms read the layer's slice
        return stored if layer is None else (w_gate_up_epfd[layer], w_down_edf[layer])
    first = 0
    if token_axes:
        first = jax.lax.axis_index(token_axes) * T
    real = (first + jnp.arange(T)) < real_tokens                               # [T]
    with jax.named_scope(scopes.ROUTE):
        # this shard's own tokens (manual over the token axes, or no mesh): lax.top_k keeps them local
        weights, experts = route(x_td, router_de, k, cfg.router_norm_topk, cfg,   # [T, k]
                                 native_top_k=kernels.native_top_k)
    dropped = jnp.zeros((1,), jnp.int32)
    biases = width_biases(biases, tp_axes)
    in_place = kernels.in_place_weight_einsum
    if ep == 1 and gathers(T * k, E_loc, in_place):   # decode: each assignment reads only its own expert
        y = gathered_moe(x_td, weights, experts, *one_layer(), cfg, biases, real, in_place=in_place)
        return sum_over_width(y, x_td.dtype, tp_axes, kernels), dropped
    with jax.named_scope(scopes.ROUTE):
        experts = jnp.where(real[:, None], experts, E)
        order, sorted_ids, sizes = sort_assignments(experts, E)                # [T·k], [T·k], [E]
    with jax.named_scope(scopes.DISPATCH):
        back = jnp.zeros_like(order).at[order].set(jnp.arange(T * k, dtype=order.dtype))   # assignment → sorted row
    if ep == 1:   # one pass each way: the sorted rows gathered from the tokens, the outputs back in token order
        with jax.named_scope(scopes.DISPATCH):
            rows, source = order // k, x_td
            if weights_input(cfg):   # Llama 4: the weights scale the rows sent; the outputs come back unweighted
                source = (x_td[:, None, :] * weights[..., None].astype(x_td.dtype)).reshape(T * k, D)
                rows, weights = order, jnp.ones_like(weights)
        y_tkd = grouped_swiglu(source, sizes, *stored, kernels, cfg, biases, rows=rows, out_rows=back,
                               layer=layer).reshape(T, k, D)
    else:
        with jax.named_scope(scopes.DISPATCH):
            xs = x_td[order // k]                                              # [T·k, D] by expert
            if weights_input(cfg):
                xs, weights = xs * weights.reshape(-1)[order].astype(xs.dtype)[:, None], jnp.ones_like(weights)
        buffer_rows, block_rows = receive_rows(cfg, T, ep)
        move = dict(ep_axis=ep_axis, ep=ep, E_loc=E_loc, block_rows=block_rows, ragged=kernels.ragged_all_to_all)
        recv, routes = send_to_experts(xs, sizes, buffer_rows=buffer_rows, **move)
        if gathers(buffer_rows, E_loc, in_place):   # few buffer rows for the local experts: each its own expert
            # (rows past those received compute with the last expert; send_back never reads them)
            yr = gathered_swiglu(recv, row_experts(routes.mine.sum(0), buffer_rows), *one_layer(), cfg, biases,
                                 in_place=in_place)
        else:
            yr = grouped_swiglu(recv, routes.mine.sum(0), *stored, kernels, cfg, biases, layer=layer)
        ys = send_back(yr, routes, xs.shape[0], xs.dtype, **move)
        dropped = jnp.sum(sizes - routes.send, dtype=jnp.int32)[None]
        with jax.named_scope(scopes.COMBINE):
            y_tkd = ys[back].reshape(T, k, D)                                  # back to token order
    with jax.named_scope(scopes.COMBINE):
        y = jnp.einsum("tkd,tk->td", y_tkd.astype(F32), jnp.where(real[:, None], weights, 0))
    return sum_over_width(y, x_td.dtype, tp_axes, kernels), dropped


def dropless_moe(x_bsd, router_de, w_gate_up_epfd, w_down_edf, cfg: ModelConfig, kernels: Kernels | None = None, *,
                 biases=None):
    """Routed experts, dropless. x [B, S, D] → (y [B, S, D], rows dropped per token shard: 0 unless
    ``cfg.dropless_buffer`` bounds the receive buffer).

    With nothing to split (no mesh, one device, or pipeline stages only) it is one sort and
    three grouped matmuls; otherwise it runs in `jax.shard_map`, manual over the token axes (``batch``: dp × ep),
    the expert axis (ep) and the width axis (tp) of the layout in force; see the module docstring.
    kernels: the target's (`moe_jax.model.moe.MoE` passes the model's); None for jax's default backend.
    biases: None, or the experts' (gate/up [E, 2, F], down [E, D]) biases (``cfg.expert_bias``), split as the weights.
    XLA:CPU has neither a ragged all-to-all nor a grouped matmul: its program moves the same rows in
    fixed blocks and loops over the local experts.
    An unrolled layer's weights (`moe_jax.model.provenance.layer_source`) go to the tiled kernel as the stacked
    parameters and the layer's index, read in place.
    """
    kernels = kernels or Kernels.of_process()
    B, S, D = x_bsd.shape
    T = B * S
    x = x_bsd.reshape(T, D)
    layout = current_layout()
    layer = None
    sources = (layer_source(w_gate_up_epfd), layer_source(w_down_edf))
    if kernels.fused_grouped_matmul and None not in sources and sources[0][1] == sources[1][1]:
        (w_gate_up_epfd, layer), (w_down_edf, _) = sources
    kw = dict(cfg=cfg, kernels=kernels, real_tokens=T, layer=layer)

    token_axes, ep_axes, tp_axes = tuple(map(layout.split_axes, ("batch", "expert", "mlp"))) \
        if layout is not None and layout.mesh is not None else ((), (), ())
    manual = set(token_axes) | set(ep_axes) | set(tp_axes)
    if not manual:       # nothing to split here (one device, or only pipeline stages, already manual)
        y, dropped = _dropless_shard(x, router_de, w_gate_up_epfd, w_down_edf, biases, token_axes=(), ep_axis=None,
                                     ep=1, tp_axes=(), **kw)
        return y.reshape(B, S, D), dropped
    from jax.sharding import PartitionSpec as P

    shards = layout.size(token_axes)
    padded = -(-T // shards) * shards
    x = jnp.pad(x, ((0, padded - T), (0, 0)))
    mesh = mesh_in_force(layout)
    (ep_axis,) = ep_axes or (None,)
    per_layer = slice(None if layer is None else 1, None)                    # a stacked weight's layer axis: whole
    gate_up_spec = layout.spec(("expert", "gate_up", "mlp", "embed"), w_gate_up_epfd.shape[per_layer],
                               what="expert weights")
    down_spec = layout.spec(("expert", "embed", "mlp"), w_down_edf.shape[per_layer], what="expert weights")
    if layer is not None:
        gate_up_spec, down_spec = P(None, *gate_up_spec), P(None, *down_spec)
    body = functools.partial(_dropless_shard, token_axes=token_axes, ep_axis=ep_axis,
                             ep=layout.size(ep_axes), tp_axes=tp_axes, **kw)
    tok = P(token_axes or None, None)
    args, specs = (x, router_de, w_gate_up_epfd, w_down_edf), (tok, P(), gate_up_spec, down_spec)
    if biases is not None:
        bias_specs = (layout.spec(("expert", "gate_up", "mlp"), biases[0].shape, what="expert biases"),
                      layout.spec(("expert", "embed"), biases[1].shape, what="expert biases"))
        args, specs = (*args, tuple(biases)), (*specs, bias_specs)
    y, dropped = jax.shard_map(body, mesh=mesh, axis_names=manual, check_vma=False,
                               in_specs=specs, out_specs=(tok, P(token_axes or None)))(*args)
    return y[:T].reshape(B, S, D), dropped
