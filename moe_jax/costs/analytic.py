"""Analytic cost of a strategy without compiling: the planner's fast first pass.

It mirrors what the sharded program does, per device: the pipeline's M + pp − 1 ticks,
each running L/pp layers on one microbatch; per layer the attention projections and
scores, the router, capacity dispatch and combine (repeated on every tp rank, as the
compiled program does) or dropless sorting, the experts' share, and the collectives the
layout implies (attention and expert all-reduce over tp, dispatch and combine all-to-all
over ep, ragged for dropless, the stage hand-off over pp), then the output head on each
sequence's last position (the serving prefill returns [B, 1, V] logits). Dropless figures assume
uniform routing (`moe_jax.costs.routing`): expected rows, with the worst-case buffer beside.
Weights and KV cache per device are exact (the placement);
activations are estimated. The result is a `PhaseCost` the time model (`moe_jax.perf.timemodel`)
reads exactly as it reads a compiled one, so analytic and compiled figures compare
like for like.
"""

from __future__ import annotations

import math

import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.costs.compile import Workload
from moe_jax.costs.walk import CollectiveCost, MemoryBreakdown, OpCost, PhaseCost
from moe_jax.model.moe import group_size, receive_rows
from moe_jax.model.pipeline import schedule
from moe_jax.parallel.mesh import MESH_AXES, Strategy, kv_replicated
from moe_jax.parallel.rules import Layout

F32 = 4


def axis_group(strategy: Strategy, axes) -> list[int]:
    """Partition ids of the devices that differ from device 0 only along `axes` (mesh order dp, pp, ep, tp)."""
    shape = tuple(strategy.mesh_shape.values())
    coords = [range(strategy.mesh_shape[a]) if a in axes else [0] for a in MESH_AXES]
    return sorted(int(np.ravel_multi_index(c, shape)) for c in np.stack(np.meshgrid(*coords, indexing="ij"),
                                                                           -1).reshape(-1, len(MESH_AXES)))


def estimate_phase(cfg: ModelConfig, strategy: Strategy, workload: Workload, phase: str,
                   weights_bytes: int, kv_bytes: int, microbatches: int | None = None) -> PhaseCost:
    """An analytic `PhaseCost` for prefill or decode (per device)."""
    s, b = strategy, cfg.dtype_bytes
    layout = Layout.for_strategy(cfg, s)
    D, H, K, Dh, E, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_experts, cfg.expert_ffn
    S = workload.prompt_len if phase == "prefill" else 1
    T = S if phase == "prefill" else workload.cache_len
    B = workload.batch
    sched = schedule(cfg, s, B, S, decode=phase == "decode", microbatches=microbatches)
    M, ticks = sched.microbatches, sched.ticks
    Bm = B // M
    shards = layout.shards("batch", Bm)
    seqs = Bm // shards                                   # sequences per device per tick
    tok = seqs * S
    Lp = cfg.num_layers // s.pp
    Hl = H // s.tp
    Kl = K if kv_replicated(cfg, s) else K // s.tp
    Sg = group_size(Bm * S, shards, cfg.moe_group_size)
    G = tok // Sg                                         # token groups on this device
    C = cfg.capacity(Sg)
    El, Fl = E // s.ep, F // s.tp
    layer_ops = [
        ("qkvo", 2 * tok * D * (Hl + 2 * Kl) * Dh + 2 * tok * Hl * Dh * D,
         (D * (Hl + 2 * Kl) * Dh + Hl * Dh * D) * b + 2 * tok * D * b + 2 * tok * (Hl + 2 * Kl) * Dh * b),
        ("scores", 4 * seqs * Hl * S * T * Dh,
         2 * seqs * T * Kl * Dh * b + seqs * Hl * S * T * F32 * 2),
        ("router", 2 * tok * D * E, D * E * b + tok * (D * b + E * F32)),
    ]
    k = cfg.top_k
    if cfg.dispatch == "dropless":
        # Each device routes its tok tokens (its token shard: padded up when dp·ep does not split the
        # microbatch), sorts the tok·k assignments, and under uniform routing receives tok·k rows
        # for its E/ep experts; the receive buffer holds ep·tok·min(k, E/ep) rows (the worst case), or
        # the dropless_buffer bound.
        tok_shard = -(-Bm * S // layout.size(("dp", "ep")))
        rows = tok_shard * k
        buffer = rows if s.ep == 1 else receive_rows(cfg, tok_shard, s.ep)[0]
        layer_ops += [
            ("sort_gather", 0, 2 * rows * D * b + rows * 4 * 2),
            # static shapes: the zero-fill, layout copies and the elementwise SwiGLU product touch the
            # whole worst-case receive buffer, padding included (about 3 passes of D and 2 of F as
            # compiled for TPU; the cpu program's dense exchange moves more)
            ("receive_buffer", 0, (3 * D + 2 * Fl) * b * buffer if s.ep > 1 else 0),
            ("experts", 2 * 3 * rows * D * Fl, 3 * El * D * Fl * b + rows * (2 * D + 3 * Fl) * b),
            ("combine", 2 * rows * D, rows * D * (b + F32) + tok_shard * D * b),
        ]
    else:
        layer_ops += [
            ("dispatch_combine", 2 * 2 * G * Sg * E * C * D, 2 * (G * Sg * E * C * F32 + E * G * C * D * b)),
            ("experts", 2 * 3 * El * (G * s.ep) * C * D * Fl,
             3 * El * D * Fl * b + El * G * s.ep * C * (2 * D + 3 * Fl) * b),
        ]
    if cfg.num_shared_experts:
        Fs = cfg.num_shared_experts * F // s.tp
        layer_ops.append(("shared_experts", 2 * 3 * tok * D * Fs, 3 * D * Fs * b + tok * (2 * D + 3 * Fs) * b))
    runs = Lp * ticks
    ops = [OpCost(name, "estimate", name, flops, flops, 0, nbytes, runs) for name, flops, nbytes in layer_ops]
    local_seqs = B // layout.shards("batch", B)
    total_tok = local_seqs * S
    V_local = cfg.vocab_size // layout.shards("vocab", cfg.vocab_size)
    # the head sees each sequence's last position only (the serving prefill; decode's one token)
    ops.append(OpCost("head", "estimate", "head", 2 * local_seqs * D * V_local, 2 * local_seqs * D * V_local, 0,
                      D * V_local * b + local_seqs * (D * b + V_local * F32), 1))
    colls = []

    def coll(kind, axes, nbytes, calls, scope, worst=None):
        size = math.prod(s.mesh_shape[a] for a in axes)
        if size > 1:
            group = axis_group(s, axes)
            if kind == "collective-permute":
                group, size = group[:2], 2
            colls.append(CollectiveCost(kind, list(axes), size, int(nbytes), calls, scope, scope, group, worst))

    coll("all-reduce", ("tp",), tok * D * b, runs, "attention")
    if cfg.dispatch == "dropless":
        for scope in ("dispatch", "combine"):
            coll("ragged-all-to-all", ("ep",), rows * D * b, runs, scope, worst=buffer * D * b)
        coll("all-reduce", ("tp",), tok_shard * D * b, runs, "combine")
    else:
        coll("all-to-all", ("ep",), E * G * C * D * b, runs, "dispatch")
        coll("all-to-all", ("ep",), E * G * C * D * b, runs, "combine")
        coll("all-reduce", ("tp",), El * G * s.ep * C * D * b, runs, "experts")
    coll("collective-permute", ("pp",), tok * D * b, ticks, "pipeline")
    coll("all-reduce", ("pp",), local_seqs * D * b, 1, "pipeline")           # the last positions only
    vocab_axes = tuple(a for a in layout.rules["vocab"] if s.mesh_shape[a] > 1)
    coll("all-reduce", vocab_axes, total_tok * D * b, 1, "embed")
    if cfg.dispatch == "dropless":
        moe_act = 2 * buffer * (D + 3 * Fl) * b + 2 * rows * D * F32
    else:
        moe_act = 2 * E * G * C * D * b + 2 * G * Sg * E * C * F32
    activations = max(moe_act, 4 * tok * D * F32) + (seqs * Hl * S * T * F32 if phase == "prefill" else 0)
    outputs = local_seqs * V_local * F32 + kv_bytes                        # logits [B, 1, V] + the cache
    memory = MemoryBreakdown(weights_bytes, kv_bytes, total_tok * 4, weights_bytes + kv_bytes + total_tok * 4,
                             outputs, kv_bytes if phase == "decode" else 0, int(activations), 0, "analytic estimate")
    return PhaseCost(phase, "analytic", True, memory=memory, flops=sum(o.flops * o.count for o in ops),
                     matmul_flops=sum(o.matmul_flops * o.count for o in ops),
                     hbm_bytes=sum(o.bytes * o.count for o in ops), collectives=colls, ops=ops)
