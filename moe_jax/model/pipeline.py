"""Pipeline parallelism: each stage owns its layers; microbatches move between stages by collective-permute.

Why not just shard the layer scan on ``pp``? XLA would then all-gather every layer's
weights onto every device (docs/design.md, "Known traps"). Instead the layer stack runs
inside ``jax.shard_map`` that is manual over the stage axis only (``dp``, ``ep``,
``tp`` stay with the partitioner): each stage sees its own ``L/pp`` layers and the KV
cache of those layers, nothing else. With ``cfg.moe_interleave`` I > 1 the stacked unit is a group of I layers
(`moe_jax.model.stack.Block`): the stages split the L / I groups (pp divides them), and a stage's cache is its
groups' L / pp layers.

Schedule (GPipe): the batch is cut into M microbatches. At tick t, stage s works on
microbatch t − s (when 0 ≤ t − s < M), then hands its activations to stage s + 1 with
one ``collective-permute``. After M + pp − 1 ticks the last stage holds every
microbatch's output, which an all-reduce over the stages gives to all of them (the
output head is split over pp × tp, so every stage computes its share of the logits). A
serving prefill keeps and hands over only each sequence's last position (`last_only`), the
one its logits come from.
Bubble: (pp − 1) / (M + pp − 1) of the ticks a stage is idle.

Microbatch m is the sequences b with b mod M = m. With the batch split over dp × ep in
contiguous blocks, that choice keeps every microbatch's sequences on the devices that
already hold them: taking a microbatch is a local slice, not a reshuffle.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.errors import ShardingError, StrategyError
from moe_jax.model import scopes
from moe_jax.model.execution import Pipeline
from moe_jax.model.stack import run_layers
from moe_jax.parallel.mesh import Strategy, divisors
from moe_jax.parallel.rules import Layout, current_layout, use_layout

PREFILL_MICROBATCHES_PER_STAGE = 4
"""Default prefill microbatches: up to this many per stage (bubble ≤ 1/5 when the batch allows)."""
DECODE_MICROBATCHES_PER_STAGE = 1
"""Default decode microbatches: up to one per stage (each microbatch re-reads the stage's weights)."""


def default_microbatches(batch: int, stages: int, batch_shards: int, *, decode: bool) -> int:
    """M: the largest divisor of the sequences per batch shard up to `per_stage` × stages.

    Dividing the per-shard count keeps microbatches local (see the module docstring).
    """
    per_shard = batch // batch_shards if batch % batch_shards == 0 else batch
    cap = stages * (DECODE_MICROBATCHES_PER_STAGE if decode else PREFILL_MICROBATCHES_PER_STAGE)
    return max(d for d in divisors(per_shard) if d <= cap)


def check_microbatches(microbatches: int, batch: int) -> None:
    """M must divide the batch; the error lists the valid values."""
    if microbatches < 1 or batch % microbatches:
        raise StrategyError(f"microbatches={microbatches} does not divide batch {batch}; valid: "
                            f"{', '.join(map(str, divisors(batch)))}")


@dataclass(frozen=True)
class PipelineSchedule:
    """The facts of one pipelined program call that the performance model needs."""

    stages: int
    """pp."""
    microbatches: int
    """M."""
    ticks: int
    """M + pp − 1 stage steps per call."""
    bubble_fraction: float
    """(pp − 1) / (M + pp − 1): share of ticks each stage is idle."""
    microbatch_sequences: int
    """B / M sequences per microbatch."""
    handoff_bytes_per_tick: int
    """Bytes one device sends to the next stage per tick (its shard of one microbatch's activations)."""
    output_allreduce_bytes: int
    """Bytes per device of the final all-reduce that gives every stage the last stage's output (a
    serving prefill's: the last position of each sequence only)."""

    def to_dict(self) -> dict:
        """JSON-ready."""
        return dict(self.__dict__)


def schedule(cfg: ModelConfig, strategy: Strategy, batch: int, length: int, *, decode: bool,
             microbatches: int | None = None, full_output: bool = False) -> PipelineSchedule:
    """The pipeline schedule for `batch` sequences of `length` new tokens under `strategy`.

    full_output: the program returns every position (a prefill with full logits), not the last.
    """
    layout = Layout.for_strategy(cfg, strategy)
    shards = layout.shards("batch", batch)
    # without stages the program runs the layers once over the whole batch: no microbatches
    M = 1 if strategy.pp == 1 else microbatches or default_microbatches(batch, strategy.pp, shards, decode=decode)
    check_microbatches(M, batch)
    Bm = batch // M
    local_mb = Bm // layout.shards("batch", Bm)
    act = local_mb * length * cfg.d_model * cfg.dtype_bytes
    kept = act if full_output else local_mb * cfg.d_model * cfg.dtype_bytes
    pp = strategy.pp
    return PipelineSchedule(stages=pp, microbatches=M, ticks=M + pp - 1,
                            bubble_fraction=(pp - 1) / (M + pp - 1), microbatch_sequences=Bm,
                            handoff_bytes_per_tick=act if pp > 1 else 0,
                            output_allreduce_bytes=kept * M if pp > 1 else 0)


def _from_last_stage(x, axis: str, is_last):
    """Every stage gets the last stage's `x`: an all-reduce over the stages to which only the last contributes.

    16-bit floats travel as pairs of bits in uint32: exact (x + 0 = x in integers too),
    the same bytes on the wire, and it avoids an XLA CPU crash on a bf16 psum inside a
    partially manual shard_map ("Invalid binary instruction opcode copy", in
    AllReducePromotion: jax puts a sharding constraint inside the reducer).
    """
    mine = jnp.where(is_last, x, jnp.zeros_like(x))
    if x.dtype.itemsize != 2 or x.shape[-1] % 2:
        return jax.lax.psum(mine, axis)
    bits = jax.lax.bitcast_convert_type(mine.reshape(*x.shape[:-1], x.shape[-1] // 2, 2), jnp.uint32)
    return jax.lax.bitcast_convert_type(jax.lax.psum(bits, axis), x.dtype).reshape(x.shape)


def run_pipeline(blocks, x, positions, cache, decode: bool, pipeline: Pipeline, *, last_only: bool = False,
                 windows: tuple[int, ...] | None = None):
    """The layer stack of a `Transformer` built for `pipeline`, pipelined over the layout's stage axis.

    Same contract as `moe_jax.model.stack.run_layers`: x [B, S, D], cache None or
    {"k": [L, B, K, T, Dh], "v": [L, B, K, Dh, T]} (and the rings "local_k", "local_v" where every stage's share of
    the window pattern is the same) → (x, cache, dropped [L, G]). Each stage updates its share of
    the cache in place, and counts its own layers' drops ([L/pp, G], its microbatches summed), which the
    stage axis lays end to end in layer order. Must run under `use_layout` with
    the mesh of `pipeline.stages` stages: the layout says which mesh axis the stages are and
    how the batch is split; the model was built knowing it pipelines, and with how many
    microbatches.
    last_only: the last stage keeps, and the stages share, only each sequence's last
    position: x comes back as [B, 1, D].
    windows: each layer's sliding window (`run_layers`), all L of them. Where every stage's share has the same
    pattern (gpt-oss's alternation with an even L/pp) each stage runs it as static windows; otherwise a stage
    reads its own as scanned data, and sliding layers mask rather than skip.
    """
    from jax.sharding import PartitionSpec as P

    layout = current_layout()
    if layout is None or layout.mesh is None or layout.stages != pipeline.stages:
        found = "no mesh" if layout is None or layout.mesh is None else f"{layout.stages} stages"
        raise ShardingError(f"a model built for {pipeline.stages} pipeline stages runs under the layout of a mesh "
                            f"with {pipeline.stages} stages (`moe_jax.programs.sharded.ShardedModel` sets it); "
                            f"the layout in force has {found}")
    (axis,) = layout.stage_axes
    pp = layout.stages
    B = x.shape[0]
    M = pipeline.microbatches(decode=decode) or default_microbatches(B, pp, layout.shards("batch", B), decode=decode)
    check_microbatches(M, B)
    Bm = B // M
    inner = layout.without_axes(layout.stage_axes)
    graphdef, stacked = nnx.split(blocks)
    windows = windows or (0,) * (jax.tree.leaves(stacked)[0].shape[0] * blocks.group_layers)
    per_stage = len(windows) // pp                  # layers per stage (whole groups: pp divides the groups)
    shares = {windows[s * per_stage:(s + 1) * per_stage] for s in range(pp)}

    def stage_program(stacked, x, positions, cache):
        with use_layout(inner):
            stage = jax.lax.axis_index(axis)
            blocks = nnx.merge(graphdef, stacked)                              # this stage's L/pp layers
            if len(shares) == 1:
                (mine,) = shares
            else:
                mine = jax.lax.dynamic_slice_in_dim(jnp.asarray(windows, jnp.int32), stage * per_stage, per_stage)
            xm = x.reshape(Bm, M, *x.shape[1:])                                # microbatch m = xm[:, m]
            cm = None if cache is None else {
                k: v.reshape(v.shape[0], Bm, M, *v.shape[2:]) for k, v in cache.items()}

            def take(a, m, axis_):
                return jax.lax.dynamic_index_in_dim(a, m, axis_, keepdims=False)

            def put(a, value, m, axis_):
                return jax.lax.dynamic_update_index_in_dim(a, value, m, axis_)

            def run(inp, cm, m, valid):
                # microbatch m's sequences are [:, m] of the stage's cache: written there in place, and not
                # at all (rewritten as they were) in a tick of the bubble
                return run_layers(blocks, inp, positions, cm, decode, microbatch=m, keep=valid, windows=mine)

            dropped_shape = jax.eval_shape(run, take(xm, 0, 1), cm, jnp.int32(0), jnp.bool_(True))[2]

            def tick(carry, t):
                incoming, outputs, cm, dropped = carry
                m = t - stage
                valid = (m >= 0) & (m < M)
                mc = jnp.clip(m, 0, M - 1)
                inp = jnp.where(stage == 0, take(xm, mc, 1), incoming)
                with jax.named_scope(scopes.STAGE):
                    out, cm, mb_dropped = run(inp, cm, mc, valid)
                keep = valid & (stage == pp - 1)
                kept = out[:, -1:] if last_only else out
                outputs = put(outputs, jnp.where(keep, kept, take(outputs, mc, 1)), mc, 1)
                dropped = dropped + jnp.where(valid, mb_dropped, 0)
                with jax.named_scope(scopes.PIPELINE_HANDOFF):
                    incoming = jax.lax.ppermute(out, axis, [(i, i + 1) for i in range(pp - 1)])
                return (incoming, outputs, cm, dropped), None

            carry = (jnp.zeros_like(xm[:, 0]), jnp.zeros_like(xm[:, :, -1:] if last_only else xm), cm,
                     jnp.zeros(dropped_shape.shape, dropped_shape.dtype))
            (_, outputs, cm, dropped), _ = jax.lax.scan(tick, carry, jnp.arange(M + pp - 1))
            with jax.named_scope(scopes.PIPELINE_OUTPUT):
                y = _from_last_stage(outputs, axis, stage == pp - 1)
            new_cache = None if cm is None else {
                k: v.reshape(v.shape[0], B, *v.shape[3:]) for k, v in cm.items()}
            return y.reshape(B, y.shape[2], *x.shape[2:]), new_cache, dropped

    staged = jax.shard_map(
        stage_program, mesh=layout.mesh, axis_names={axis}, check_vma=False,
        # dropped: P(axis) on its layer axis, so stage s's rows are layers s·L/pp ... (s+1)·L/pp − 1
        in_specs=(P(axis), P(), P(), P(axis)), out_specs=(P(), P(axis), P(axis)))
    return staged(stacked, x, positions, cache)
