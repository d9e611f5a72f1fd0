"""Microbenchmarks on the devices jax sees (CPU, GPU or TPU): the measurements of ``moe-jax calibrate``.

Every sample is a jitted function compiled ahead of time, run once to warm up, then timed as the median of
several repetitions, each ended by ``jax.block_until_ready`` (wall clock on the host: what a serving step
sees, dispatch included). What is measured, and how:

- matmul: ``x[M, K] @ w[K, N]`` over shapes from tiny and decode-like (few rows against a d x f weight)
  to prefill-like (square-ish, up to 4096 on CPU, larger on GPU/TPU), per dtype; size = 2·M·N·K FLOPs.
  Each is timed inside one program, as a model's op runs (`time_per_iteration`: a loop of k1 and of
  k2 dependent products, the slope of time against k), so the host's dispatch is not in it.
  A sweep stops growing once one product takes longer than the sample budget.
- memory: a stream copy (``x + 1`` on a float32 array: size = bytes read + written) and a read-reduce
  (``sum(x)``: size = bytes read), from 256 bytes up to ``max_bytes`` (capped by the device's memory),
  timed inside one program the same way, each iteration reading another array of a 256 MB pool, so that
  the reads come from memory and not from a cache (a model's weights are read once per step); and the
  memory ops that run at their own rate: a bf16 -> f32 conversion (slow on a CPU) and a transpose.
- op overhead: a chain of k dependent 16x16 matmuls in one program (XLA fuses elementwise chains, even
  through ``lax.optimization_barrier``, but keeps every dot its own kernel), timed at two lengths;
  the slope (t(k2) − t(k1)) / (k2 − k1) is the fixed cost of one op inside a program, launch included,
  the tiny matmul's own work being negligible.
- transcendental: ``exp`` over n elements (softmax, SiLU), time against n, inputs read cold.
- program call: the host's cost of calling one compiled program and waiting for it, fitted to
  a + b·(argument arrays) (a model's programs take every weight as an argument).
- fresh buffers: what a call pays for a buffer it allocates (its temporaries, an output not aliased to an
  argument), against the buffer's bytes: ``x + 1`` returning a new array, less the same op writing into its
  donated argument. On XLA:CPU a buffer above malloc's mmap threshold is mapped anew on every call and each
  4 KiB page faults on its first touch (about 1.5 us a page on a VM: a 1.8 GB temporary costs 0.7 s a call);
  a GPU's buffers come from a pool and cost about nothing. Measured first, so that the one-iteration samples
  of the larger sizes below are taken without it.
- collectives: all-reduce (psum), all-gather, reduce-scatter (psum_scatter), all-to-all and
  collective-permute (ppermute to the next device) through ``jax.shard_map`` over the first g devices
  (g = 2, 4, 8, ... and the device count), over message sizes; each (kind, g) is fitted to
  latency + bytes / bandwidth (`CollectiveFit.fit`). The payload is the result bytes per device
  (operand bytes for reduce-scatter), what the cost walk calls bytes_per_call.

Tiers: groups of one process's devices measure the ``node`` tier; with several processes
(``moe-jax calibrate --coordinator ...``, `moe_jax.runtime.distributed`), groups of k devices from every
process measure the ``network`` tier (real inter-process links: gloo over TCP on CPU). On the CPU
backend with ``--xla_force_host_platform_device_count`` a process's devices are emulated in-process
copies, said in ``meta``.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from moe_jax.errors import MoeJaxError
from moe_jax.hardware.calibration import (
    COLLECTIVE_KINDS,
    MAX_BANDWIDTH,
    MIN_BANDWIDTH,
    Calibration,
    CollectiveFit,
    Curve,
)
from moe_jax.hardware.presets import RANGES, Hardware, LinkTier, get_hardware, hardware_names
from moe_jax.names import DTYPES

Progress = Callable[[str, str, int, int], None]
"""progress(kind, text, done, total): the same shape as the planner's, for the CLI's bar."""

DEFAULT_DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True)
class Plan:
    """The sweep: shapes and sizes, repetitions and the time one sample may take."""

    matmul_shapes: tuple[tuple[int, int, int], ...]
    """(M, K, N) in increasing FLOPs."""
    memory_bytes: tuple[int, ...]
    """Array sizes in bytes (float32) for the copy and the reduce."""
    collective_bytes: tuple[int, ...]
    """Payload bytes per device for the collectives."""
    chain: tuple[int, int]
    """The two chain lengths of the op-overhead measurement."""
    min_reps: int
    max_reps: int
    target_s: float
    """Repetitions are chosen so that a sample takes about this long (between min_reps and max_reps)."""
    max_sample_s: float
    """A sweep stops at the first size whose one repetition takes longer than this."""
    max_iterations: int = 1000
    """The most iterations of one in-program loop (`time_per_iteration`)."""
    fresh_buffer: Curve | None = None
    """The measured cost of a fresh buffer (`measure_fresh_buffers`), taken off a sample timed as one call."""
    loop_s: float = 0.0
    """What one iteration of an in-program loop costs by itself (`measure_loop_iteration`), taken off every
    `time_per_iteration`: XLA:GPU runs a loop from the host, launching each iteration's kernels after reading
    its condition (about 10 us an iteration on an H200), where a model's layer ops run back to back."""


def make_plan(backend: str, *, quick: bool = False, max_bytes: int | None = None,
              device_memory: float | None = None) -> Plan:
    """The sweep for `backend` (cpu, gpu, tpu): `quick` is a few small sizes (tests); `max_bytes` caps the
    largest memory array and collective message; `device_memory` (bytes) caps them at an eighth of it."""
    if quick:
        shapes = [(1, 64, 64), (1, 256, 256), (16, 256, 256), (64, 64, 64), (128, 128, 128), (256, 256, 256)]
        memory = [1 << 10, 4 << 10, 64 << 10, 1 << 20, 4 << 20]
        coll = [4 << 10, 64 << 10, 512 << 10]
        plan = Plan((), (), (), (8, 64), 3, 5, 0.01, 0.05)
    else:
        big = 4096 if backend == "cpu" else 16384
        # decode-like: few rows against a d x f weight small enough to stay in cache, so that the curve holds
        # the matmul's own cost (reading a large weight from memory is the memory curve's part)
        decode = [(1, 64, 64), (1, 256, 256)] + [(m, 2048, 768) for m in (1, 4, 16, 64)]
        square, n = [], 32
        while n <= big:
            square.append((n, n, n))
            n *= 2
        prefill = [(m, 4096, 4096) for m in (256, 1024, 4096) if m <= big]
        shapes = decode + square + prefill
        top = (256 << 20) if backend == "cpu" else (1 << 30)
        memory = [1 << k for k in range(8, 31, 2) if 1 << k <= top]
        coll = [1 << k for k in range(10, 29, 2) if 1 << k <= top // 4]
        plan = Plan((), (), (), (16, 256), 5, 100, 0.25, 2.0 if backend == "cpu" else 0.5)
    cap = max_bytes if max_bytes is not None else math.inf
    if device_memory:
        cap = min(cap, device_memory / 8)
    memory = [b for b in memory if b <= cap] or [min(memory)]
    coll = [b for b in coll if b <= cap] or [min(coll)]
    shapes = sorted(set(shapes), key=lambda s: (2 * s[0] * s[1] * s[2], s))
    return replace(plan, matmul_shapes=tuple(shapes), memory_bytes=tuple(memory), collective_bytes=tuple(coll))


@dataclass(frozen=True)
class Sample:
    """One timed function: its median and fastest repetition."""

    median_s: float
    min_s: float
    reps: int


def time_compiled(fn, args: Sequence, plan: Plan, reps: int | None = None) -> Sample:
    """Median wall time of `fn(*args)` (compiled), after one warm-up, each repetition blocked until ready;
    `reps` repetitions, or as many as make about `plan.target_s` (within the plan's bounds)."""
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn(*args))                    # warm-up (first-run allocations, autotuned kernels)
    first = time.perf_counter() - start
    if reps is None:
        reps = int(min(plan.max_reps, max(plan.min_reps, plan.target_s / max(first, 1e-7))))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return Sample(statistics.median(times), min(times), reps)


def _positive(seconds: float) -> float:
    return max(seconds, 1e-9)                          # a timer tick: a curve's seconds must be > 0


class _Steps:
    """Counts the steps of one phase for the progress callback."""

    def __init__(self, progress: Progress | None, kind: str, total: int):
        self.progress, self.kind, self.total, self.done = progress, kind, max(total, 1), 0

    def step(self, text: str, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if self.progress:
            self.progress(self.kind, text, self.done, self.total)

    def finish(self, text: str = "done") -> None:
        self.done = self.total - 1
        self.step(text)


def time_per_iteration(step, carry, args: Sequence, plan: Plan) -> tuple[float, list[Sample], tuple[int, int]]:
    """Seconds of one iteration of ``carry = step(carry, *args)`` inside one compiled program, as an op of a
    model's program pays it (no dispatch from the host): a ``fori_loop`` of k1 and of k2 iterations, each
    timed, and the slope (t(k2) − t(k1)) / (k2 − k1). The step must depend on the carry (XLA would hoist it
    out of the loop otherwise). k2 is chosen so that the longer loop takes about the sample budget."""
    import jax

    def looped(k):
        return jax.jit(lambda c, *a: jax.lax.fori_loop(0, k, lambda i, x: step(x, *a), c)).lower(carry, *args).compile()

    single = looped(1)
    one = time_compiled(single, (carry, *args), plan, reps=plan.min_reps)
    if one.median_s > plan.target_s:             # a long op: the host's dispatch is lost in it, not its buffers'
        return _positive(one.median_s - fresh_seconds(plan.fresh_buffer, single)), [one], (1, 1)
    k2 = int(min(plan.max_iterations, max(4, plan.target_s / max(one.median_s, 1e-7))))
    k1 = max(1, k2 // 4)
    s1 = time_compiled(looped(k1), (carry, *args), plan, reps=plan.min_reps)
    s2 = time_compiled(looped(k2), (carry, *args), plan, reps=plan.min_reps)
    per = (s2.median_s - s1.median_s) / (k2 - k1)
    if per <= 0:                                   # noise larger than the signal: the longer loop's mean
        per = s2.median_s / k2
    return _positive(per - plan.loop_s), [s1, s2], (k1, k2)


def measure_loop_iteration(plan: Plan, progress: Progress | None = None) -> tuple[float, list[str]]:
    """Seconds one iteration of an in-program loop costs by itself: `time_per_iteration` of a step that adds one
    to a scalar (one tiny op), less the measured cost of one tiny op (`measure_op_overhead`, a chain with no
    loop), never below 0."""
    import jax.numpy as jnp

    steps = _Steps(progress, "loop iteration", 1)
    per, samples, (k1, k2) = time_per_iteration(lambda c: c + 1.0, jnp.float32(0), (), plan)
    overhead, _ = measure_op_overhead(plan)
    loop = max(per - overhead, 0.0)
    steps.finish(f"{loop * 1e6:.2f} us")
    raw = [f"loop of {k} iterations of one scalar add: median_s={s.median_s:.6g} min_s={s.min_s:.6g} reps={s.reps}"
           for k, s in zip((k1, k2), samples, strict=False)]
    raw.append(f"per iteration {per:.6g} s, less one op {overhead:.6g} s: loop_s={loop:.6g}")
    return loop, raw


def measure_matmul(dtype: str, plan: Plan, progress: Progress | None = None) -> tuple[Curve, list[str]]:
    """The matmul curve of `dtype` (seconds of one ``x[M, K] @ w[K, N]`` inside a program, by its FLOPs) and a
    line per raw sample."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    steps = _Steps(progress, f"matmul {dtype}", len(plan.matmul_shapes))
    samples, raw = [], []
    key = jax.random.key(0)

    def step(s, x, w):                       # the scalar carry makes each product depend on the one before
        return (s + ((x + s) @ w)[0, 0] * 1e-6).astype(s.dtype)

    for m, k, n in plan.matmul_shapes:
        x = jax.random.normal(key, (m, k), dt)
        w = jax.random.normal(key, (k, n), dt)
        per, timed, (k1, k2) = time_per_iteration(step, jnp.zeros((), dt), (x, w), plan)
        flops = 2.0 * m * n * k
        samples.append((flops, per))
        raw.append(f"{dtype} M={m} K={k} N={n} flops={flops:.6g} per_op_s={per:.6g} "
                   + " ".join(f"loop_{k}_s={t.median_s:.6g}" for k, t in zip((k1, k2), timed, strict=False)))
        steps.step(f"{m}x{k} @ {k}x{n}: {flops / per / 1e9:.1f} GFLOP/s")
        del x, w
        if per > plan.max_sample_s:
            break
    steps.finish()
    return Curve.fit(samples), raw


COLD_POOL_BYTES = 256 << 20
"""The memory ops read a different array of a pool this large on each iteration, so that what they read
comes from device memory, not a cache (as a model's weights do: each is read once per step)."""


def _pool_arrays(elems: int) -> int:
    """How many arrays of `elems` 4-byte elements make the cold pool (at least two: one read while the
    other is evicted)."""
    return max(2, min(COLD_POOL_BYTES // (4 * elems), 4096))


def _pick(pool, i):
    """The pool's array for iteration `i` (the next one each iteration, round the pool)."""
    import jax

    return jax.lax.dynamic_index_in_dim(pool, i % pool.shape[0], keepdims=False)


def _copy_step(carry, pool):
    """Iteration of the stream copy: the pick + 1 (f32)."""
    i, y = carry
    return i + 1, (_pick(pool, i) + y[:1]) + 1              # y[:1]: the next copy depends on this one


def _reduce_step(carry, pool):
    """Iteration of the read-reduce: the sum of the pick."""
    import jax.numpy as jnp

    i, s = carry
    return i + 1, s * 0.5 + jnp.sum(_pick(pool, i))


def _convert_step(carry, pool):
    """Iteration of the conversion: the pick (bf16 values held as their uint16 bits) converted to f32."""
    import jax
    import jax.numpy as jnp

    # the pool holds bf16 values as their uint16 bits: XLA:CPU converts a bf16 array a loop reads to f32 as a
    # whole ahead of the loop (once a call), and the loop would slice its f32 copy, converting nothing
    i, y = carry
    return i + 1, jax.lax.bitcast_convert_type(_pick(pool, i), jnp.bfloat16).astype(jnp.float32) + y[:1]


def _transpose_step(carry, pool):
    """Iteration of the transpose: the pick (2-D f32) transposed."""
    i, y = carry
    return i + 1, _pick(pool, i).T + y[:1, :1]


def measure_memory(plan: Plan, progress: Progress | None = None) -> tuple[Curve, Curve, dict[str, Curve], list[str]]:
    """Curves of time against bytes for memory ops inside a program, and a line per sample: the stream copy
    (``y = x + 1``, f32: bytes read + written), the read-reduce (a sum: bytes read), and the kinds that run at
    their own rate (`moe_jax.hardware.calibration.OP_KINDS`): a bf16 -> f32 conversion and a 2-D f32
    transpose (bytes read + written). Each iteration reads the next array of a pool of `COLD_POOL_BYTES`
    (or two arrays, when one is larger), so the reads are cold."""
    import math as _math

    import jax.numpy as jnp

    def square(elems):
        side = max(int(_math.isqrt(elems)), 1)
        return (side, side)

    # name, step, element shape from the element count, pool dtype (uint16: bf16 bits), bytes moved per element,
    # init of the carry
    kinds = (("copy", _copy_step, lambda n: (n,), jnp.float32, 8, lambda sh: jnp.zeros(sh, jnp.float32)),
             ("read_reduce", _reduce_step, lambda n: (n,), jnp.float32, 4, lambda sh: jnp.float32(0)),
             ("convert", _convert_step, lambda n: (n,), jnp.uint16, 6, lambda sh: jnp.zeros(sh, jnp.float32)),
             ("transpose", _transpose_step, square, jnp.float32, 8,
              lambda sh: jnp.zeros(sh[::-1], jnp.float32)))
    steps = _Steps(progress, "memory", len(kinds) * len(plan.memory_bytes))
    found: dict[str, list] = {name: [] for name, *_ in kinds}
    raw = []
    for name, step, shape_of, dtype, per_elem, init_of in kinds:
        for nbytes in plan.memory_bytes:
            shape = shape_of(max(nbytes // 4, 1))
            elems = _math.prod(shape)
            one = 0x3F80 if dtype == jnp.uint16 else 1          # bf16 1.0's bits: no denormals in the sums
            pool = jnp.full((_pool_arrays(elems), *shape), one, dtype)
            per, timed, (k1, k2) = time_per_iteration(step, (jnp.int32(0), init_of(shape)), (pool,), plan)
            size = float(per_elem * elems)
            found[name].append((size, per))
            held = "bfloat16" if dtype == jnp.uint16 else jnp.dtype(dtype).name
            raw.append(f"{name} shape={list(shape)} dtype={held} pool_arrays={pool.shape[0]} "
                       f"bytes_moved={size:.6g} per_op_s={per:.6g} "
                       + " ".join(f"loop_{k}_s={t.median_s:.6g}" for k, t in zip((k1, k2), timed, strict=False)))
            steps.step(f"{name} {size / 2**20:.2f} MiB: {size / per / 1e9:.1f} GB/s")
            del pool
            if per > plan.max_sample_s:
                break
    steps.finish()
    return (Curve.fit(found["copy"]), Curve.fit(found["read_reduce"]),
            {k: Curve.fit(found[k]) for k in ("convert", "transpose")}, raw)


def measure_transcendental(plan: Plan, progress: Progress | None = None) -> tuple[Curve, list[str]]:
    """Time of ``exp`` over n float32 elements inside a program (what softmax and SiLU evaluate), against n,
    the inputs read cold like the memory ops'; a line per sample."""
    import jax.numpy as jnp

    def step(carry, pool):
        i, y = carry
        return i + 1, jnp.exp(_pick(pool, i) + y[:1])

    sizes = [b for b in plan.memory_bytes if b <= 64 << 20]
    steps = _Steps(progress, "transcendental", len(sizes))
    found, raw = [], []
    for nbytes in sizes:
        elems = max(nbytes // 4, 1)
        pool = jnp.zeros((_pool_arrays(elems), elems), jnp.float32)
        per, timed, _ = time_per_iteration(step, (jnp.int32(0), jnp.zeros((elems,), jnp.float32)), (pool,), plan)
        found.append((float(elems), per))
        raw.append(f"exp elements={elems} per_op_s={per:.6g}")
        steps.step(f"exp of {elems} elements: {elems / per / 1e9:.2f} G/s")
        del pool
    steps.finish()
    return Curve.fit(found), raw


def measure_program_call(plan: Plan, progress: Progress | None = None) -> tuple[float, float, list[str]]:
    """(fixed seconds, seconds per argument array, raw lines) of calling one compiled program from the host and
    waiting for its result: programs taking n tiny arrays (n = 1 ... 512, each read), timed per call, fitted
    to a + b·n by least squares. A model's prefill and decode take every weight as an argument."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    counts = (1, 16, 128, 512)
    steps = _Steps(progress, "program call", len(counts))
    timed, raw = [], []
    for n in counts:
        arrays = [jnp.full((4,), i, jnp.float32) for i in range(n)]
        fn = jax.jit(lambda *a: sum(x[0] for x in a)).lower(*arrays).compile()
        s = time_compiled(fn, arrays, replace(plan, min_reps=max(plan.min_reps, 20), max_reps=max(plan.max_reps, 20)))
        timed.append(s.median_s)
        raw.append(f"program call with {n} arguments: median_s={s.median_s:.6g} min_s={s.min_s:.6g} reps={s.reps}")
        steps.step(f"{n} arguments: {s.median_s * 1e6:.1f} us")
    slope, intercept = np.polyfit(np.array(counts, float), np.array(timed), 1)
    return max(float(intercept), 0.0), max(float(slope), 0.0), raw


def fresh_bytes(compiled) -> tuple[int, int]:
    """(temporaries, outputs not aliased to an argument) in bytes of a compiled program: the buffers each call
    allocates anew (XLA's memory analysis; (0, 0) where the backend gives none)."""
    try:
        m = compiled.memory_analysis()
    except Exception:                      # a backend without memory analysis: no buffer is known to be fresh
        return 0, 0
    if m is None:
        return 0, 0
    return int(m.temp_size_in_bytes), max(int(m.output_size_in_bytes) - int(m.alias_size_in_bytes), 0)


def fresh_seconds(curve: Curve | None, compiled) -> float:
    """Seconds one call of `compiled` pays for its fresh buffers on the measured `curve` (0 without one)."""
    if curve is None:
        return 0.0
    return sum(curve.seconds(b) for b in fresh_bytes(compiled) if b > 0)


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where the platform does not count them)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return 0


def measure_fresh_buffers(plan: Plan, progress: Progress | None = None) -> tuple[Curve, list[str]]:
    """The curve of what a program call pays for one buffer it allocates, against the buffer's bytes (see the
    module docstring): per size, the median call of ``x + 1`` into a new array less the median of the same
    program writing into its donated argument, each call blocked until ready; the page faults of a fresh call
    are recorded beside it. Sizes: the plan's memory sizes from 64 KiB up."""
    import jax
    import jax.numpy as jnp

    sizes = [b for b in plan.memory_bytes if b >= 64 << 10] or [max(plan.memory_bytes)]
    steps = _Steps(progress, "fresh buffers", len(sizes))
    reps = max(plan.min_reps, 7)
    found, raw = [], []
    for nbytes in sizes:
        x = jnp.ones((max(nbytes // 4, 1),), jnp.float32)
        fresh = jax.jit(lambda a: a + 1).lower(x).compile()
        donated = jax.jit(lambda a: a + 1, donate_argnums=0).lower(x).compile()
        jax.block_until_ready(fresh(x))
        new, faults = [], []
        for _ in range(reps):
            f0, t = _minor_faults(), time.perf_counter()
            jax.block_until_ready(fresh(x))
            new.append(time.perf_counter() - t)
            faults.append(_minor_faults() - f0)
        y = jax.block_until_ready(donated(jnp.ones_like(x)))
        reused = []
        for _ in range(reps):
            t = time.perf_counter()
            y = jax.block_until_ready(donated(y))
            reused.append(time.perf_counter() - t)
        del x, y
        extra = statistics.median(new) - statistics.median(reused)
        found.append((float(nbytes), _positive(extra)))
        raw.append(f"fresh buffer bytes={nbytes} new_output_s={statistics.median(new):.6g} "
                   f"donated_output_s={statistics.median(reused):.6g} extra_s={extra:.6g} "
                   f"page_faults={statistics.median(faults):g} reps={reps}")
        steps.step(f"{nbytes / 2**20:.2f} MiB: {extra * 1e3:.3f} ms")
    return Curve.fit(found), raw


def measure_op_overhead(plan: Plan, progress: Progress | None = None) -> tuple[float, list[str]]:
    """Seconds of one tiny op inside a program: the slope of a chain of dependent 16x16 matmuls' time
    against its length (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    def chain(k):
        def f(x, w):
            for _ in range(k):
                x = x @ w                      # each dot depends on the one before: no reordering, no fusion
            return x
        return f

    steps = _Steps(progress, "op overhead", 2)
    x = jnp.ones((16, 16), jnp.float32)
    w = jnp.eye(16, dtype=jnp.float32)
    timed, raw = {}, []
    for k in plan.chain:
        fn = jax.jit(chain(k)).lower(x, w).compile()
        # more repetitions than the other samples: the difference of two small times is noisy
        s = time_compiled(fn, (x, w), replace(plan, min_reps=max(plan.min_reps, 15),
                                                  max_reps=max(plan.max_reps, 15)))
        timed[k] = s.median_s
        raw.append(f"chain of {k} dependent 16x16 matmuls: median_s={s.median_s:.6g} min_s={s.min_s:.6g} "
                   f"reps={s.reps}")
        steps.step(f"chain of {k}")
    k1, k2 = plan.chain
    per_op = (timed[k2] - timed[k1]) / (k2 - k1)
    if per_op <= 0:                            # noise larger than the signal: the longer chain's mean per op
        per_op = timed[k2] / k2
    return _positive(per_op), raw


def group_sizes(n: int) -> list[int]:
    """The collective group sizes `n` devices allow: 2, 4, 8, ... up to n, and n itself."""
    sizes, g = [], 2
    while g <= n:
        sizes.append(g)
        g *= 2
    if n >= 2 and n not in sizes:
        sizes.append(n)
    return sizes


@dataclass(frozen=True)
class Group:
    """The devices one collective runs over, and the link tier they exercise."""

    tier: str
    devices: tuple
    spans_processes: bool


def collective_groups(local_devices: Sequence, all_devices: Sequence, process_count: int) -> list[Group]:
    """The groups measured: ``node``, the first g devices of this process (g = 2, 4, ... its device count);
    ``network``, with several processes, k devices of every process (k = 1, 2, 4, ... the local count), so that
    every process takes part in every cross-process measurement and none waits on a collective it is not in."""
    groups = [Group("node", tuple(local_devices[:g]), False) for g in group_sizes(len(local_devices))]
    if process_count > 1:
        by_process: dict[int, list] = {}
        for d in all_devices:
            by_process.setdefault(d.process_index, []).append(d)
        per = min(len(v) for v in by_process.values())
        for k in [1, *group_sizes(per)]:
            devices = tuple(d for i in sorted(by_process) for d in by_process[i][:k])
            groups.append(Group("network", devices, True))
    return groups


def _collective_fn(kind: str, g: int, mesh):
    """The shard_map'ed function of `kind` over axis ``x`` of `mesh` ([g * elems] float32 in, sharded)."""
    import jax
    from jax import lax
    from jax.sharding import PartitionSpec as P

    def body(x):
        if kind == "all-reduce":
            return lax.psum(x, "x")
        if kind == "all-gather":
            return lax.all_gather(x, "x", tiled=True)
        if kind == "reduce-scatter":
            return lax.psum_scatter(x, "x", scatter_dimension=0, tiled=True)
        if kind == "all-to-all":
            return lax.all_to_all(x, "x", 0, 0, tiled=True)
        if kind == "collective-permute":
            return lax.ppermute(x, "x", [(i, (i + 1) % g) for i in range(g)])
        raise ValueError(kind)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))


def _local_elems(kind: str, payload: int, g: int) -> tuple[int, float]:
    """Float32 elements per device of the operand for about `payload` bytes, and the exact payload they give:
    the result bytes per device (the operand's for reduce-scatter; a multiple of g elements, as all-to-all
    and reduce-scatter split it g ways)."""
    if kind == "all-gather":
        local = max(1, payload // 4 // g)               # the operand is 1/g of the result
        return local, 4.0 * local * g
    local = max(1, payload // 4 // g) * g
    return local, 4.0 * local


def measure_collectives(groups: Sequence[Group], plan: Plan,
                        progress: Progress | None = None) -> tuple[list[CollectiveFit], list[str]]:
    """Every kind over every group, fitted; and notes on what was cut short.

    A group spanning processes runs a fixed number of repetitions and never stops early: every process must
    call each collective as often as the others, whatever its own clock says."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    steps = _Steps(progress, "collectives", len(groups) * len(COLLECTIVE_KINDS) * len(plan.collective_bytes))
    fits, notes = [], []
    for group in groups:
        g = len(group.devices)
        mesh = Mesh(np.array(group.devices), ("x",))
        sharding = NamedSharding(mesh, P("x"))
        reps = max(plan.min_reps, min(plan.max_reps, 10)) if group.spans_processes else None
        for kind in COLLECTIVE_KINDS:
            fn = _collective_fn(kind, g, mesh)
            samples = []
            for payload in plan.collective_bytes:
                local, nbytes = _local_elems(kind, payload, g)
                # each process builds only its own shards (an array over several processes has no one host copy)
                x = jax.make_array_from_callback((g * local,), sharding,
                                                 lambda idx, n=g * local: np.ones(len(range(n)[idx[0]]), np.float32))
                s = time_compiled(fn.lower(x).compile(), (x,), plan, reps=reps)
                samples.append((nbytes, _positive(s.median_s)))
                steps.step(f"{kind} over {g} ({group.tier}): {nbytes / 2**10:.0f} KiB in {s.median_s * 1e6:.0f} µs")
                del x
                if not group.spans_processes and s.min_s > plan.max_sample_s:
                    steps.step("", len(plan.collective_bytes) - len(samples))
                    notes.append(f"{kind} over {g} devices stopped at {nbytes:.0f} bytes (sample budget)")
                    break
            fits.append(CollectiveFit.fit(kind, group.tier, g, samples))
    steps.finish()
    return fits, notes


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_memory(device) -> float | None:
    """Bytes a program may allocate on `device` (None when jax does not say, as on CPU)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:                                   # backends without memory statistics raise
        stats = {}
    limit = stats.get("bytes_limit")
    return float(limit) if limit else None


def host_memory() -> float:
    """Physical memory of this host in bytes."""
    return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def calibrate(*, dtypes: Sequence[str] = DEFAULT_DTYPES, quick: bool = False, max_bytes: int | None = None,
              progress: Progress | None = None, command: Sequence[str] | None = None) -> Calibration:
    """Measure the devices jax sees (see the module docstring) and return the `Calibration`."""
    import jax

    for d in dtypes:
        if d not in DTYPES:
            raise MoeJaxError(f"unknown dtype {d!r}; valid: {', '.join(DTYPES)}")
    devices = jax.local_devices()
    backend = jax.default_backend()
    processes = jax.process_count()
    device_memory = _device_memory(devices[0]) if backend != "cpu" else None
    plan = make_plan(backend, quick=quick, max_bytes=max_bytes, device_memory=device_memory)
    matmul, raw = {}, {"samples_matmul": [], "samples_memory": [], "samples_op_overhead": []}
    fresh, raw["samples_fresh_buffer"] = measure_fresh_buffers(plan, progress)
    loop_s, raw["samples_loop_iteration"] = measure_loop_iteration(plan, progress)
    plan = replace(plan, loop_s=loop_s, fresh_buffer=fresh)
    for d in dtypes:
        matmul[d], lines = measure_matmul(d, plan, progress)
        raw["samples_matmul"] += lines
    copy, reduce, kinds, raw["samples_memory"] = measure_memory(plan, progress)
    overhead, raw["samples_op_overhead"] = measure_op_overhead(plan, progress)
    call_s, per_argument_s, raw["samples_program_call"] = measure_program_call(plan, progress)
    transcendental, raw["samples_transcendental"] = measure_transcendental(plan, progress)
    notes = []
    emulated = backend == "cpu" and len(devices) > 1
    groups = collective_groups(devices, jax.devices(), processes)
    fits, skipped = measure_collectives(groups, plan, progress) if groups else ([], [])
    notes += skipped
    if len(devices) < 2:
        notes.append("one device in this process: the node tier (devices of one process) was not measured")
    if emulated:
        notes.append(f"the {len(devices)} CPU devices of each process are emulated in it "
                     "(--xla_force_host_platform_device_count): node-tier collectives copy within host memory")
    if processes == 1:
        notes.append("one process: the network tier (between processes or hosts) was not measured")
    else:
        notes.append(f"network tier: groups of every one of the {processes} processes' first k devices "
                     f"({'gloo over TCP' if backend == 'cpu' else backend + ' collectives'} between processes)")
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "cpu": _cpu_model(),
        "device_kind": devices[0].device_kind,
        "backend": backend,
        "device_count": jax.device_count(),
        "local_device_count": len(devices),
        "process_count": processes,
        "emulated_devices": emulated,
        "jax_version": jax.__version__,
        "jaxlib_version": _version("jaxlib"),
        "moe_jax_version": _version("moe-jax"),
        "command": " ".join(command) if command else "",
        "quick": quick,
        "dtypes": list(dtypes),
        "method": "matmuls and memory ops timed inside one program (the slope of a loop of k1 and k2 "
                  "iterations: no host dispatch), less the cost of a loop iteration itself "
                  f"({loop_s * 1e6:.2f} us: a loop of one scalar add, less one op; a sample timed as one call, "
                  "less its fresh buffers' cost); fresh buffers: a new output less a donated one, by size; op "
                  "overhead: slope of a chain of dependent 16x16 matmuls "
                  f"({plan.chain[0]} and {plan.chain[1]} long); program call: a + b x arguments fitted to calls "
                  "with 1 to 512 argument arrays; medians of repetitions after a warm-up, block_until_ready",
        "notes": notes,
        **raw,
    }
    if device_memory:
        meta["device_memory_bytes"] = device_memory
    return Calibration(matmul, copy, reduce, overhead, tuple(fits), meta, call_s, per_argument_s, kinds,
                       transcendental, fresh)


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


_KIND_TO_PRESET = (("h200", "h200"), ("h100", "h100"), ("a100", "a100-80g"), ("b200", "b200"),
                   ("mi300x", "mi300x"), ("v6 lite", "tpu-v6e"), ("v6e", "tpu-v6e"), ("v5 lite", "tpu-v5e"),
                   ("v5e", "tpu-v5e"), ("v5p", "tpu-v5p"), ("v5", "tpu-v5p"), ("v4", "tpu-v4"))
"""Substrings of jax's device_kind (lower case) and the preset they name; first match wins."""


def preset_for_device(device_kind: str) -> str | None:
    """The preset name matching jax's `device_kind` (e.g. 'NVIDIA H200' → h200), None if none does."""
    kind = device_kind.lower()
    names = set(hardware_names())
    for token, name in _KIND_TO_PRESET:
        if token in kind and name in names:
            return name
    return None


def _clamp(value: float, key: str) -> float:
    low, high = RANGES[key]
    return min(max(value, low * (1 + 1e-6) if low > 0 else value), high)


def _best_large(curve: Curve, n: int = 3) -> float:
    """The best throughput among the `n` largest measured sizes (what a large op reaches)."""
    return max(s / t for s, t in curve.points[-n:])


def calibrated_hardware(cal: Calibration, base: Hardware | str | None = None) -> Hardware:
    """The `Hardware` a calibration describes: `base` (a preset or its name) with its efficiencies set from the
    measured large sizes against its peaks; without a base, a ``host-cpu`` description built from the
    measurements alone (peaks = the best measured; links from the best collective fit)."""
    dtype = "bfloat16" if "bfloat16" in cal.matmul else next(iter(cal.matmul))
    best_flops = max(c.peak_throughput for c in cal.matmul.values())
    best_copy = cal.memory.peak_throughput
    stamp = f"moe-jax calibrate on {cal.meta.get('machine', '?')} ({cal.meta.get('device_kind', '?')}, " \
            f"{cal.meta.get('date', '?')})"
    if base is not None:
        hw = get_hardware(base)
        flops_eff = min(1.0, _best_large(cal.matmul_curve(dtype)) / hw.peak_flops)
        hbm_eff = min(1.0, _best_large(cal.memory) / hw.hbm_bandwidth)
        return replace(hw, name=f"{hw.name}-calibrated", flops_efficiency=_clamp(flops_eff, "flops_efficiency"),
                       hbm_efficiency=_clamp(hbm_eff, "hbm_efficiency"), calibration=cal,
                       source=f"{stamp}; peaks and links from the {hw.name} preset: {hw.source}",
                       assumptions=(f"{hw.assumptions}; " if hw.assumptions else "") +
                       f"efficiencies measured: {dtype} matmul and stream copy at their largest sizes")
    count = int(cal.meta.get("local_device_count", cal.meta.get("device_count", 1))) or 1
    memory = float(cal.meta.get("device_memory_bytes") or host_memory() / count)
    links, notes = {}, []
    for tier in ("node", "network"):
        fits = [c for c in cal.collectives if c.tier == tier and c.samples]
        if fits:
            # the best payload rate any sample achieved (latency included: never above what was seen, unlike a
            # fitted slope, which is unbounded when every sampled size is latency-bound), and the median fitted
            # latency as the per-call overhead
            rate, kind, g = max((b / s, c.kind, c.group_size) for c in fits for b, s in c.samples)
            overhead = statistics.median(c.latency_s for c in fits)
            links[tier] = LinkTier(f"measured ({tier}: {len(fits)} collective fits)",
                                   min(max(rate, MIN_BANDWIDTH * (1 + 1e-6)), MAX_BANDWIDTH), 0.0, min(overhead, 1.0))
            notes.append(f"{tier} link: bandwidth = the best payload rate measured ({kind} over {g} devices), "
                         "per-call overhead = the median fitted latency, no per-hop latency")
    if not links:
        links["node"] = LinkTier("none measured (one device; copy bandwidth)", _clamp(best_copy, "bandwidth"), 0.0,
                                 cal.op_overhead_s)
        notes.append("links: one device, none measured; the copy bandwidth and the op overhead stand in")
    for tier, other in (("node", "network"), ("network", "node")):
        if tier not in links:
            links[tier] = links[other]
            notes.append(f"the {tier} link is the {other} link ({tier} not measured)")
    link_note = "; ".join(notes)
    return Hardware(
        "host-cpu" if cal.meta.get("backend") == "cpu" else f"host-{cal.meta.get('backend', 'device')}",
        _clamp(memory, "memory_bytes"), _clamp(best_flops, "peak_flops"), _clamp(best_copy, "hbm_bandwidth"),
        count, links["node"], links["network"],
        flops_efficiency=_clamp(_best_large(cal.matmul_curve(dtype)) / best_flops, "flops_efficiency"),
        hbm_efficiency=_clamp(_best_large(cal.memory) / best_copy, "hbm_efficiency"),
        compile_target="", calibration=cal, source=stamp,
        assumptions=f"no preset matches {cal.meta.get('device_kind', 'this device')!r}: peak FLOP/s = the best "
                    "measured matmul, memory bandwidth = the best measured stream copy, memory = "
                    f"{'the device limit' if cal.meta.get('device_memory_bytes') else 'host memory / its devices'}; "
                    f"{link_note}; no compiler target "
                    "(--backend auto compiles on XLA:CPU)")
