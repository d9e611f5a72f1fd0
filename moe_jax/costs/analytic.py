"""Analytic cost of a strategy without compiling: the planner's fast first pass.

It mirrors what the sharded program does, per device: the pipeline's M + pp − 1 ticks,
each running L/pp layers on one microbatch; per layer the attention projections and
scores, the router, capacity dispatch and combine (gathers of each slot's and each
assignment's row, repeated on every tp rank, as the compiled program does) or dropless
sorting, the experts' share, and the collectives the layout implies (attention and expert
all-reduce over tp, dispatch and combine all-to-all over ep, ragged for dropless, the stage
hand-off over pp), then the output head on each
sequence's last position (the serving prefill returns [B, 1, V] logits). Dropless figures assume
uniform routing (`moe_jax.costs.routing`): expected rows, with the worst-case buffer beside.
Weights and KV cache per device are exact (the placement);
activations are estimated. The result is a `PhaseCost` the time model (`moe_jax.perf.timemodel`)
reads exactly as it reads a compiled one, so analytic and compiled figures compare
like for like.

Also here, from the config alone, the figures reported beside every program, compiled or
estimated (`analytic_report`): the model's useful FLOPs per phase (`analytic_flops`, formulas
on `ModelConfig`), and what capacity dispatch adds (its token groups: `capacity_groups`, the one
place their arithmetic is written).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.costs.compile import PHASES, Workload
from moe_jax.costs.routing import decode_floor_weights, touched_fraction
from moe_jax.costs.types import Analytic, AnalyticReport, CollectiveCost, MemoryBreakdown, OpCost, PhaseCost
from moe_jax.model.moe import group_size, receive_rows
from moe_jax.model.moe.gathered import capacity_gathers, gathers
from moe_jax.model.pipeline import schedule
from moe_jax.names import DTYPES, Dispatch
from moe_jax.parallel.mesh import MESH_AXES, Strategy, kv_copies, kv_replicated
from moe_jax.parallel.rules import Layout

F32 = 4


@dataclass(frozen=True)
class CapacityGroups:
    """Capacity dispatch's token groups, as the model forms them (`moe_jax.model.moe.group_size`).

    Tokens are routed in groups of Sg that never cross a batch shard; each group gives every
    expert C slots (`ModelConfig.capacity`).
    """

    group_tokens: int
    """Sg: tokens per group."""
    capacity: int
    """C: slots per expert per group."""

    def groups(self, tokens: int) -> int:
        """G: groups formed by `tokens` tokens."""
        return tokens // self.group_tokens

    def slots(self, cfg: ModelConfig, groups: int) -> int:
        """Expert slots of `groups` groups: E × G × C (each computed, filled or padded)."""
        return cfg.num_experts * groups * self.capacity

    def dispatch_combine_bytes(self, cfg: ModelConfig, groups: int, itemsize: int) -> int:
        """One layer's dispatch and combine over `groups` groups, as `moe_jax.model.moe.capacity_moe` gathers them:
        the slot placement (its per-expert counts from a [G, k · Sg, E] int32 one-hot, bounded as written and read;
        its sorts of the k · Sg choices are not counted), each slot's
        row gathered (read and written: E · G · C rows of D) and each assignment's output gathered and summed
        (G · Sg · k rows read and written, G · Sg rows written)."""
        G, Sg, E, C, D, k = groups, self.group_tokens, cfg.num_experts, self.capacity, cfg.d_model, cfg.top_k
        return 2 * G * Sg * k * E * 4 + 2 * E * G * C * D * itemsize + (2 * k + 1) * G * Sg * D * itemsize


def capacity_groups(cfg: ModelConfig, tokens: int, shards: int) -> CapacityGroups:
    """The groups capacity dispatch forms for `tokens` tokens routed together (one microbatch) split `shards`
    ways."""
    Sg = group_size(tokens, shards, cfg.moe_group_size)
    return CapacityGroups(Sg, cfg.capacity(Sg))


def analytic_flops(cfg: ModelConfig, workload: Workload, phase: str, batch_shards: int = 1,
                   microbatches: int = 1, full_logits: bool = False, ep: int | None = None) -> Analytic:
    """FLOPs over all devices from the config: useful matmuls, attention, and capacity-dispatch overhead.

    useful: 2 × (matmul parameters one token uses in the layers) × tokens, plus the output head
    (2 × D × vocab) once per sequence: the serving prefill computes the last position's logits
    only (every prompt position with `full_logits`); decode's one token is its last. The
    embedding lookup is not a matmul (`ModelConfig.useful_flops`).
    attention: QKᵀ and PV as computed (prefill: the blocks at and below the diagonal that the blockwise
    causal attention computes, `moe_jax.model.attention.causal_flops`, from each sliding layer's window on;
    MLA's prefill: causal blocks too, QKᵀ over Dh and PV over Dv; decode: all T cache positions, a sliding
    layer's last W). A pipeline whose stages' layer patterns differ masks its sliding layers instead
    (`moe_jax.model.pipeline.run_pipeline`): its program computes more than this counts.
    capacity: expert FLOPs spent on padded slots (dispatch and combine are gathers: no FLOPs), for
    the token groups capacity dispatch forms when each of `microbatches` pipeline microbatches
    is split `batch_shards` ways; none where, given the experts' split `ep`, capacity dispatch takes the
    gathered path (`moe_jax.model.moe.gathered.capacity_gathers`: every assignment computed once, no slots;
    ep None: not assumed).
    """
    B = workload.batch
    S = workload.prompt_len if phase == "prefill" else 1
    T = S if phase == "prefill" else workload.cache_len
    tokens = B * S
    useful = cfg.useful_flops(tokens, head_tokens=tokens if full_logits else B)
    attention = cfg.attention_flops(B, S, T)
    if phase == "prefill":                                   # blockwise causal: blocks above the diagonal skipped
        from moe_jax.model.attention import causal_flops

        if cfg.attention == "mla":   # QKᵀ over the query/key width Dh, PV over the value width Dv, every layer
            attention = cfg.num_layers * (causal_flops(B, S, cfg.num_heads, cfg.head_dim)
                                          + causal_flops(B, S, cfg.num_heads, cfg.v_head_dim)) // 2
        else:   # and a sliding layer's blocks before its window (`ModelConfig.layer_windows`; dense layers full)
            windows = (0,) * cfg.first_dense_layers + cfg.layer_windows
            attention = sum(causal_flops(B, S, cfg.num_heads, cfg.head_dim, window=w) for w in windows)
    capacity = 0
    if cfg.dispatch == Dispatch.CAPACITY:
        mb_tokens = tokens // microbatches
        groups = capacity_groups(cfg, mb_tokens, batch_shards)
        G = microbatches * groups.groups(mb_tokens)
        if ep is not None and capacity_gathers(cfg, max(mb_tokens // batch_shards, 1), groups.group_tokens, ep):
            return Analytic(useful, attention, 0)
        padded = max(0, groups.slots(cfg, G) - cfg.top_k * tokens) * 2 * cfg.expert_matmul_params * cfg.moe_layers
        capacity = padded
    return Analytic(useful, attention, capacity)


def analytic_report(cfg: ModelConfig, strategy: Strategy, workload: Workload, weights_per_device: int,
                    phases: Iterable[str] = PHASES, microbatches: Mapping[str, int | None] | None = None
                    ) -> AnalyticReport:
    """The figures from the config alone that go beside a program of `cfg` under `strategy`: per phase the
    useful, attention and capacity FLOPs (token groups as the program forms them: the layout's batch shards
    of each pipeline microbatch), the weights a decode step must read, and the weights per device.

    microbatches: per phase, the pipeline microbatches asked for (None: the schedule's default).
    """
    layout = Layout.for_strategy(cfg, strategy)
    B = workload.batch
    per_phase = {}
    for name in phases:
        M = 1
        if strategy.pp > 1:
            length = workload.prompt_len if name == "prefill" else 1
            M = schedule(cfg, strategy, B, length, decode=name == "decode",
                         microbatches=(microbatches or {}).get(name)).microbatches
        per_phase[name] = analytic_flops(cfg, workload, name, layout.shards("batch", B // M), M, ep=strategy.ep)
    read = decode_floor_weights(cfg, strategy, weights_per_device, B, layout.shards("batch", B))
    unread = kv_weights_unread(cfg, strategy)
    if unread:
        read = dataclasses.replace(read, bytes=read.bytes - unread, detail=(
            f"{read.detail}; less {unread:,} B of K/V projection weights for the KV heads this tp rank does not "
            f"hold (tp={strategy.tp} > {cfg.num_kv_heads} KV heads: each rank projects its one head)"))
    return AnalyticReport(per_phase, weights_per_device_placement=weights_per_device, decode_weights_read=read)


def kv_weights_unread(cfg: ModelConfig, strategy: Strategy) -> int:
    """Bytes of the K/V projection weights (and a per-head K norm, and K/V biases) a device holds but never reads.

    When tp exceeds the K KV heads those weights [K, Dh, D] are whole on every tp rank, but a rank
    projects only the head its query heads read (`moe_jax.model.layers.repeat_kv_heads`): the other
    K − 1 heads are not part of what a decode step must touch. 0 when tp divides K. A device holds its
    stage's L_moe/pp MoE layers and every one of the ``first_dense_layers`` dense layers (they run ahead of
    the pipeline on every stage: `moe_jax.model.dense_layers`).
    """
    if not kv_replicated(cfg, strategy):
        return 0
    held = cfg.num_kv_heads
    read = cfg.num_kv_heads * kv_copies(cfg, strategy) // strategy.tp
    norm = cfg.head_dim if cfg.qk_norm == "full" else 0
    biases = 2 * cfg.head_dim if cfg.attention_bias else 0
    w = DTYPES[cfg.param_dtype].bytes                   # the projections as stored (FP8 weights: 1 byte)
    layers = cfg.stack_layers // strategy.pp + cfg.first_dense_layers      # interleaved dense layers included
    return layers * (held - read) * (2 * cfg.head_dim * cfg.d_model * w + (norm + biases) * cfg.dtype_bytes)


def _mla_ops(cfg: ModelConfig, Hl: int, seqs: int, S: int, T: int, *, decode: bool) -> list[tuple[str, int, int]]:
    """Multi-head latent attention's per-layer (name, FLOPs, bytes) on one device holding Hl of the heads, for
    `seqs` sequences of S queries against T keys (`moe_jax.model.mla`): the query and latent projections, the
    latent's expansion (prefill: into every key position's per-head keys and values; decode, absorbed: the
    query into the latent space and the output back out of it), the output projection; then the scores and
    the weighted sum, over the latent and RoPE key as cached (R + Dr per position, read once)."""
    D, Dh, b = cfg.d_model, cfg.head_dim, cfg.dtype_bytes
    w, kvb = DTYPES[cfg.param_dtype].bytes, cfg.kv_dtype_bytes    # weights and cache as stored
    R, Rq, Dr, Dv = cfg.kv_lora_rank, cfg.q_lora_rank, cfg.qk_rope_head_dim, cfg.v_head_dim
    tok = seqs * S
    q_params = D * Rq + Rq * Hl * Dh if Rq else D * Hl * Dh
    expand_params = Hl * R * (Dh - Dr + Dv)
    expanded_rows = tok if decode else seqs * T          # absorbed: per query; expanded: per key position
    proj_flops = 2 * tok * (q_params + D * (R + Dr) + Hl * Dv * D) + 2 * expanded_rows * expand_params
    proj_bytes = ((q_params + D * (R + Dr) + expand_params + Hl * Dv * D) * w
                  + tok * (2 * D + Hl * Dh + R + Dr + Hl * Dv) * b)
    width = 2 * R + Dr if decode else Dh + Dv
    scores_bytes = seqs * T * (R + Dr) * kvb + seqs * Hl * S * T * F32 * 2
    return [("qkvo", proj_flops, proj_bytes), ("scores", 2 * seqs * Hl * S * T * width, scores_bytes)]


def axis_group(strategy: Strategy, axes) -> list[int]:
    """Partition ids of the devices that differ from device 0 only along `axes` (mesh order dp, pp, ep, tp)."""
    shape = tuple(strategy.mesh_shape.values())
    coords = [range(strategy.mesh_shape[a]) if a in axes else [0] for a in MESH_AXES]
    return sorted(int(np.ravel_multi_index(c, shape)) for c in np.stack(np.meshgrid(*coords, indexing="ij"),
                                                                           -1).reshape(-1, len(MESH_AXES)))


def estimate_phase(cfg: ModelConfig, strategy: Strategy, workload: Workload, phase: str,
                   weights_bytes: int, kv_bytes: int, microbatches: int | None = None) -> PhaseCost:
    """An analytic `PhaseCost` for prefill or decode (per device).

    Where the model multiplies each assignment by its own expert's gathered weights (decode with fewer
    assignments than local experts: `moe_jax.model.moe.gathered`) the experts' bytes are those of the
    experts the tokens are expected to route to (`moe_jax.costs.routing.touched_fraction`, uniform routing),
    as the GPU compiles it (other targets gather only at 3 · M < E_loc)."""
    s, b = strategy, cfg.dtype_bytes
    w, kvb = DTYPES[cfg.param_dtype].bytes, cfg.kv_dtype_bytes    # matmul weights and KV cache as stored
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
    Lp = cfg.moe_layers // s.pp                           # pp splits the MoE layers; dense ones run on every stage
    Hl = H // s.tp
    Kl = K * kv_copies(cfg, s) // s.tp                    # KV heads this device projects and caches (1 when tp > K)
    groups = capacity_groups(cfg, Bm * S, shards)
    Sg, C = groups.group_tokens, groups.capacity
    G = groups.groups(tok)                                # token groups on this device
    El, Fl = E // s.ep, F // s.tp
    # decode: a sliding (chunked) layer reads only the cache's last |W| + S − 1 positions; the layers' mean keys
    # (`ModelConfig.attention_flops`). Pipeline stages whose window patterns differ scan their windows as data
    # (`moe_jax.model.pipeline`): masked only, every layer reads the whole cache.
    windows = cfg.layer_windows
    per_stage = len(windows) // s.pp
    static = len({windows[i * per_stage:(i + 1) * per_stage] for i in range(s.pp)}) == 1
    Tw = T if phase == "prefill" or not static else (
        sum(min(T, abs(w) + S - 1) if w else T for w in windows) // len(windows))
    if cfg.attention == "mla":
        attention_ops = _mla_ops(cfg, Hl, seqs, S, T, decode=phase == "decode")
    else:
        attention_ops = [
            ("qkvo", 2 * tok * D * (Hl + 2 * Kl) * Dh + 2 * tok * Hl * Dh * D,
             (D * (Hl + 2 * Kl) * Dh + Hl * Dh * D) * w + 2 * tok * D * b + 2 * tok * (Hl + 2 * Kl) * Dh * b),
            ("scores", 4 * seqs * Hl * S * Tw * Dh,
             2 * seqs * Tw * Kl * Dh * kvb + seqs * Hl * S * Tw * F32 * 2),
        ]
    layer_ops = [*attention_ops, ("router", 2 * tok * D * E, D * E * b + tok * (D * b + E * F32))]
    k = cfg.top_k
    if cfg.dispatch == Dispatch.DROPLESS:
        # Each device routes its tok tokens (its token shard: padded up when dp·ep does not split the
        # microbatch), sorts the tok·k assignments, and under uniform routing receives tok·k rows
        # for its E/ep experts; the receive buffer holds ep·tok·min(k, E/ep) rows (the worst case), or
        # the dropless_buffer bound.
        tok_shard = -(-Bm * S // layout.size(("dp", "ep")))
        rows = tok_shard * k
        buffer = rows if s.ep == 1 else receive_rows(cfg, tok_shard, s.ep)[0]
        # decode with fewer rows than local experts: each row times its own expert's gathered weights
        # (`moe_jax.model.moe.gathered`, as the GPU compiles it), reading only the experts the ep group's
        # tokens route to (every buffer row computed)
        gathered = gathers(buffer, El)
        read = El * touched_fraction(cfg, tok_shard * s.ep) if gathered else El
        computed = buffer if gathered else rows
        layer_ops += [
            ("sort_gather", 0, 2 * rows * D * b + rows * 4 * 2),
            # static shapes: the zero-fill, layout copies and the elementwise SwiGLU product touch the
            # whole worst-case receive buffer, padding included (about 3 passes of D and 2 of F as
            # compiled for TPU; the cpu program's dense exchange moves more)
            ("receive_buffer", 0, (3 * D + 2 * Fl) * b * buffer if s.ep > 1 else 0),
            ("experts", 2 * 3 * computed * D * Fl, int(3 * read * D * Fl * w) + computed * (2 * D + 3 * Fl) * b),
            ("combine", 2 * rows * D, rows * D * (b + F32) + tok_shard * D * b),
        ]
    elif capacity_gathers(cfg, tok, Sg, s.ep):
        # decode where no assignment can drop: each one times its own expert's gathered weights, no slots
        # (`moe_jax.model.moe.gathered`), reading the experts this device's tokens route to
        rows = tok * k
        read = El * touched_fraction(cfg, tok)
        layer_ops += [
            ("experts", 2 * 3 * rows * D * Fl, int(3 * read * D * Fl * w) + rows * (2 * D + 3 * Fl) * b),
            ("combine", 2 * rows * D, rows * D * (b + F32) + tok * D * b),
        ]
    else:
        layer_ops += [
            ("dispatch_combine", 0, groups.dispatch_combine_bytes(cfg, G, b)),
            ("experts", 2 * 3 * El * (G * s.ep) * C * D * Fl,
             3 * El * D * Fl * w + El * G * s.ep * C * (2 * D + 3 * Fl) * b),
        ]
    if cfg.num_shared_experts:
        Fs = cfg.num_shared_experts * F // s.tp
        layer_ops.append(("shared_experts", 2 * 3 * tok * D * Fs, 3 * D * Fs * w + tok * (2 * D + 3 * Fs) * b))
    runs = Lp * ticks
    ops = [OpCost(name, "estimate", name, flops, flops, 0, nbytes, runs) for name, flops, nbytes in layer_ops]
    if cfg.moe_interleave > 1:   # the dense layers between MoE layers: in the stack, I - 1 per MoE layer, every tick
        Fd = cfg.dense_ffn // s.tp
        between = [(f"dense_{name}", flops, nbytes) for name, flops, nbytes in attention_ops]
        between.append(("dense_ffn", 2 * 3 * tok * D * Fd, 3 * D * Fd * w + tok * (2 * D + 3 * Fd) * b))
        ops += [OpCost(name, "estimate", name, flops, flops, 0, nbytes, runs * (cfg.moe_interleave - 1))
                for name, flops, nbytes in between]
    if cfg.first_dense_layers:   # ahead of the pipeline, once per call over the device's whole batch (M microbatches)
        Fd = cfg.dense_ffn // s.tp
        dense_ops = [(f"dense_{name}", flops * M, nbytes) for name, flops, nbytes in attention_ops]
        dense_ops.append(("dense_ffn", 2 * 3 * tok * M * D * Fd, 3 * D * Fd * w + tok * M * (2 * D + 3 * Fd) * b))
        ops += [OpCost(name, "estimate", name, flops, flops, 0, nbytes, cfg.first_dense_layers)
                for name, flops, nbytes in dense_ops]
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

    coll("all-reduce", ("tp",), tok * D * b, runs * cfg.moe_interleave, "attention")   # every layer of the stack
    if cfg.moe_interleave > 1:                                          # the interleaved dense FFNs' row-split output
        coll("all-reduce", ("tp",), tok * D * b, runs * (cfg.moe_interleave - 1), "shared_experts")
    if cfg.dispatch == Dispatch.DROPLESS:
        for scope in ("dispatch", "combine"):
            coll("ragged-all-to-all", ("ep",), rows * D * b, runs, scope, worst=buffer * D * b)
        coll("all-reduce", ("tp",), tok_shard * D * b, runs, "combine")
    else:
        coll("all-to-all", ("ep",), E * G * C * D * b, runs, "dispatch")
        coll("all-to-all", ("ep",), E * G * C * D * b, runs, "combine")
        # the experts' partial sums over tp, summed after the combine (`moe_jax.model.moe.capacity`): [G, Sg, D]
        coll("all-reduce", ("tp",), G * Sg * D * b, runs, "combine")
    coll("collective-permute", ("pp",), tok * D * b, ticks, "pipeline")
    coll("all-reduce", ("pp",), local_seqs * D * b, 1, "pipeline")           # the last positions only
    vocab_axes = tuple(a for a in layout.rules["vocab"] if s.mesh_shape[a] > 1)
    coll("all-reduce", vocab_axes, total_tok * D * b, 1, "embed")
    if cfg.dispatch == Dispatch.DROPLESS:
        moe_act = 2 * buffer * (D + 3 * Fl) * b + 2 * rows * D * F32
    else:
        moe_act = 2 * E * G * C * D * b + 2 * G * Sg * k * E * 4   # slot rows; the placement's int32 counts
    activations = max(moe_act, 4 * tok * D * F32) + (seqs * Hl * S * T * F32 if phase == "prefill" else 0)
    outputs = local_seqs * V_local * F32 + kv_bytes                        # logits [B, 1, V] + the cache
    memory = MemoryBreakdown(weights_bytes, kv_bytes, total_tok * 4, weights_bytes + kv_bytes + total_tok * 4,
                             outputs, kv_bytes if phase == "decode" else 0, int(activations), 0, "analytic estimate")
    return PhaseCost(phase, "analytic", True, memory=memory, flops=sum(o.flops * o.count for o in ops),
                     matmul_flops=sum(o.matmul_flops * o.count for o in ops),
                     hbm_bytes=sum(o.bytes * o.count for o in ops), collectives=colls, ops=ops)
