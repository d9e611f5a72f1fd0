"""Ahead-of-time compilation of the prefill and decode programs from shapes alone.

Nothing is allocated: parameters, KV cache and tokens are `jax.ShapeDtypeStruct`s
carrying their shardings, so a 30B model on 1024 devices compiles on a laptop.

Backends:
- ``cpu``: fake CPU devices (the default). Up to 2048 devices in one process; beyond
  that one data-parallel replica is compiled (dp adds no communication at inference)
  and the result says so. The process must start with enough devices
  (`moe_jax.parallel.devices.request_cpu_devices`, which the CLI calls before jax starts).
- ``tpu``: a deviceless TPU topology through libtpu (``pip install 'moe-jax[tpu]'``),
  e.g. ``v5p:8x8x16`` for 1024 v5p chips. A program that does not fit in HBM fails to
  compile with RESOURCE_EXHAUSTED: reported as "does not fit", not raised.
- ``gpu``: a deviceless CUDA target through jax's CUDA plugin (``moe-jax[gpu]``) and a
  target description (``moe_jax/hardware/targets/<chip>.txtpb``). Compiled with XLA's default options:
  ``xla_gpu_enable_dynamic_slice_fusion`` (a cuBLAS gemm reading a dynamic slice of the stacked weights in
  place) needs ``xla_gpu_enable_triton_gemm=false`` to see cuBLAS calls, and then fails to compile a layer
  scan in jaxlib 0.10.2 ("BufferAllocation::Slice not assigned", even for one scanned matmul). The decode
  step avoids the per-layer slice copies in the model instead (`moe_jax.model.layers.in_place_rows`,
  `moe_jax.model.attention.attend_stored`).
- ``real``: the devices jax sees.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from moe_jax.config import ModelConfig
from moe_jax.costs.backends import BACKENDS
from moe_jax.errors import MoeJaxError
from moe_jax.model.execution import LOOP_INVARIANT_HOIST
from moe_jax.names import Backend, Phase
from moe_jax.parallel.devices import MAX_CPU_DEVICES
from moe_jax.parallel.mesh import Strategy, kv_copies, validate

PHASES = tuple(Phase)

CPU_ANALYSIS_OPTIONS = {"xla_disable_hlo_passes": LOOP_INVARIANT_HOIST,
                        "xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
"""XLA options for the cpu backend's analysis compile.

The analysis reads the optimized HLO and the buffer assignment and never runs the machine code, yet
generating that code was nine tenths of each compile (seed-30b EP64-TP8 prefill on 1024 devices:
5.1 s, of which 0.6 s HLO passes). ``xla_backend_optimization_level=0`` skips LLVM's optimization
of it: the HLO and memory_analysis() are identical (same HLO text and every analyze figure on
seed-30b EP64-TP8-DP2, EP16-TP8-DP8, EP64-TP2-PP4-DP2), compiles take half the time.
``xla_cpu_use_fusion_emitters=False`` emits XLA:CPU's fusions with its older loop emitters instead of
the MLIR fusion emitters: compiles take another 2.5x less (planner: bench/plan_speed.py). It leaves
single ops unwrapped (a top-level ``reduce-window`` instead of a one-op fusion, the same FLOPs and
bytes) and fuses some ops of the pipeline (pp > 1) programs differently: on the seed search's eight
strategies, pp=1 figures are identical and pp > 1 ones move by at most 1.2% of peak memory
(XLA:CPU temporaries) and 0.7% of TPOT, ranking unchanged.

``xla_disable_hlo_passes``: XLA:CPU computes bf16 in f32: its
FloatNormalization pass (``float-normalization-bf16``) upcasts the bf16 dynamic-slice that picks
one layer out of the stacked [L, ...] weights (and the KV cache) inside the layer loop by
converting the whole stacked operand, and ``while-loop-invariant-code-motion`` then hoists that
loop-invariant convert out of the loop: an f32 copy of every layer's weights (twice the bf16
bytes, 123 GB for qwen3-30b-a3b on one device) among the temporaries. Without the hoist the
convert fuses into the slice and one layer at a time is upcast. Results are bit-identical (a
convert is exact wherever it runs); measured in bench/fit_cases.py. A run on CPU devices compiles
without the hoist too (`moe_jax.model.execution.Kernels.loop_converts_stay_in_loops`)."""


@contextmanager
def persistent_cache(directory: Path | None):
    """Within the block, keep jax's compiled executables in `directory` (jax's persistent compilation cache;
    None: leave jax's setting as it is): a program compiled once, in any process, is read back instead of
    compiled again (what an interrupted search already compiled, the same program reached by another objective
    or sweep). The setting before the block is restored after it.

    jax decides once per process, at its first compile, whether its cache is in use, and a changed directory
    needs `compilation_cache.reset_cache` to be seen: both are done here."""
    if directory is None:
        yield
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {name: getattr(jax.config, name) for name in names}
    wanted = {names[0]: str(directory),
              names[1]: 0.0,               # every compile: the analysis compiles take a second or two
              names[2]: -1}                # no size floor
    if wanted != before:
        for name, value in wanted.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
    try:
        yield
    finally:
        if wanted != before:
            for name, value in before.items():
                jax.config.update(name, value)
            compilation_cache.reset_cache()


MAX_BATCH = 1 << 20
"""Largest batch a workload may name."""
MAX_LENGTH = 1 << 22
"""Longest prompt or generation a workload may name (4M tokens)."""


@dataclass(frozen=True)
class Workload:
    """What is served: `batch` sequences of `prompt_len` prompt tokens, each generating `gen_len` tokens."""

    batch: int = 128
    prompt_len: int = 2048
    gen_len: int = 256

    def __post_init__(self):
        for name, limit in (("batch", MAX_BATCH), ("prompt_len", MAX_LENGTH), ("gen_len", MAX_LENGTH)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MoeJaxError(f"workload {name}={value!r} must be a positive integer")
            if value > limit:
                raise MoeJaxError(f"workload {name}={value:,} exceeds the supported {limit:,}")

    @property
    def cache_len(self) -> int:
        """KV cache positions: prompt + generated."""
        return self.prompt_len + self.gen_len

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {"batch": self.batch, "prompt_len": self.prompt_len, "gen_len": self.gen_len,
                "cache_len": self.cache_len}


class DoesNotFit(MoeJaxError):
    """The compiler found that a program does not fit in device memory."""


@dataclass
class CompiledPhase:
    """One compiled program and what its inputs hold, per device."""

    phase: str
    """``prefill`` or ``decode``."""
    compiled: object | None
    """`jax.stages.Compiled`, or None when it did not fit."""
    hlo_text: str
    """Optimized HLO ('' when it did not fit)."""
    input_bytes: dict[str, int]
    """Per-device bytes of the program's arguments by kind: weights, kv_cache, tokens."""
    compile_seconds: float
    fits: bool = True
    error: str = ""
    """The compiler's out-of-memory message when it did not fit."""


@dataclass
class CompiledProgram:
    """Prefill and decode compiled for one model, strategy, workload and backend."""

    cfg: ModelConfig
    strategy: Strategy
    """The strategy asked for."""
    compiled_strategy: Strategy
    """What was compiled: the same, or one data-parallel replica of it (see notes)."""
    workload: Workload
    backend: str
    target: str
    """Device kind compiled for (e.g. 'cpu', 'TPU v5', 'NVIDIA H200')."""
    phases: dict[str, CompiledPhase] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    topology: str = ""
    """Where it was compiled: the devices or topology (e.g. 'the first 6 of 8 chips of v5p:2x2x2')."""
    physical_order: list[int] = field(default_factory=list)
    """For each partition id (position in the mesh), the device's index in the topology's order:
    what decides which link a collective's group spans."""


def _shard_bytes(struct) -> int:
    shape = struct.sharding.shard_shape(struct.shape)
    return math.prod(shape) * struct.dtype.itemsize


def _tpu_devices(topology: str, n: int):
    """The first `n` chips of a deviceless TPU topology (libtpu), and how to name what was compiled on."""
    import os

    # libtpu takes a host-wide lock file; a deviceless compile needs no exclusive TPU access
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # TPU v4 chips have two TensorCores; megacore makes each chip one device, as on a real v4
    kw = {"chip_config_name": "megacore"} if topology.lower().startswith("v4:") else {}
    try:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kw).devices
    except Exception as e:  # libtpu missing or the name is not a topology
        raise MoeJaxError(f"cannot make TPU topology {topology!r}: {str(e).splitlines()[0][:200]}. "
                          "The tpu backend needs libtpu (pip install 'moe-jax[tpu]') and a topology "
                          "like v5p:8x8x16, v5e:16x16, v4:4x4x4, v6e:8x8") from None
    if len(devices) < n:
        raise MoeJaxError(f"TPU topology {topology} has {len(devices)} devices; the strategy needs {n}")
    where = topology if len(devices) == n else f"the first {n} of {len(devices)} chips of {topology}"
    return list(devices)[:n], where


GPUS_PER_HOST = 8
"""GPUs per server in a deviceless CUDA topology (HGX/DGX boards)."""


def _gpu_devices(target: Path, n: int):
    """The first `n` GPUs of the smallest deviceless CUDA topology of whole servers that holds them."""
    import os

    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    hosts = -(-n // GPUS_PER_HOST)
    per_host = n if hosts == 1 else GPUS_PER_HOST
    topology = f"1x{hosts}x{per_host}"
    try:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(platform="cuda", target_config=Path(target).read_text(),
                                               topology=topology).devices
    except Exception as e:
        raise MoeJaxError(f"cannot make a deviceless CUDA topology {topology} for {Path(target).stem}: "
                          f"{str(e).splitlines()[0][:200]}. The gpu backend needs jax's CUDA plugin "
                          "(pip install 'moe-jax[gpu]')") from None
    where = f"{hosts} x {per_host} GPUs (hosts x GPUs per host)"
    if len(devices) > n:
        where = f"the first {n} GPUs of {hosts} hosts x {per_host}"
    return list(devices)[:n], where


def _devices(backend: str, n: int, topology: str | None, gpu_target):
    """Devices to compile on, in their physical order, and a phrase naming where they are."""
    import jax

    if backend == Backend.CPU:
        have = jax.devices("cpu")
        if len(have) < n:
            raise MoeJaxError(f"the cpu backend needs {n} fake CPU devices but this process has {len(have)}; "
                              f"start it with XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                              "(the moe-jax CLI does this itself)")
        return have[:n], f"{n} fake CPU devices"
    if backend == Backend.REAL:
        have = jax.devices()
        if len(have) < n:
            raise MoeJaxError(f"the real backend sees {len(have)} {have[0].platform} devices; {n} are needed")
        return have[:n], f"{n} {have[0].platform} devices"
    if backend == Backend.TPU:
        if not topology:
            raise MoeJaxError("the tpu backend needs a topology (e.g. v5p:2x2x2); "
                              "`moe_jax.costs.backends.tpu_topology` "
                              "picks the smallest one for a hardware preset")
        return _tpu_devices(topology, n)
    from moe_jax.costs.backends import gpu_target_path

    return _gpu_devices(gpu_target_path(gpu_target or "h200"), n)


def compile_program(cfg: ModelConfig, strategy: Strategy, workload: Workload, *, backend: str = Backend.CPU,
                    topology: str | None = None, gpu_target: str | None = None,
                    phases=PHASES, prefill_microbatches: int | None = None,
                    decode_microbatches: int | None = None) -> CompiledProgram:
    """Lower and compile prefill (prompt → cache) and decode (one token, cache donated) ahead of time."""
    import jax
    import jax.numpy as jnp

    from moe_jax.model.execution import Kernels
    from moe_jax.parallel.mesh import build_mesh
    from moe_jax.programs.sharded import ShardedModel

    if backend not in BACKENDS:
        raise MoeJaxError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise MoeJaxError(f"unknown phase {unknown[0]!r}; valid: {', '.join(PHASES)}")
    validate(strategy, cfg, batch=workload.batch)
    from moe_jax.programs.guards import check_extents

    check_extents(cfg, workload.batch, workload.prompt_len, workload.cache_len, kv_copies(cfg, strategy))
    compiled_strategy, notes = strategy, []
    if backend == Backend.CPU and strategy.num_devices > MAX_CPU_DEVICES:
        replica = Strategy(ep=strategy.ep, tp=strategy.tp, pp=strategy.pp, dp=1)
        if replica.num_devices > MAX_CPU_DEVICES:
            raise MoeJaxError(f"{strategy.name}: one replica needs {replica.num_devices} devices, more than the "
                              f"{MAX_CPU_DEVICES} the cpu backend compiles in one process; use the tpu backend")
        compiled_strategy = replica
        workload = Workload(workload.batch // strategy.dp, workload.prompt_len, workload.gen_len)
        notes.append(f"{strategy.num_devices} devices exceed the cpu backend's {MAX_CPU_DEVICES}: compiled one "
                     f"data-parallel replica ({replica.name}, batch {workload.batch}); replicas do not "
                     "communicate at inference, so per-device figures are the same")
    devices, where = _devices(backend, compiled_strategy.num_devices, topology, gpu_target)
    mesh = build_mesh(compiled_strategy, devices, physical=backend != Backend.CPU)
    position = {id(d): i for i, d in enumerate(devices)}
    physical_order = [position[id(d)] for d in mesh.devices.flat]
    # the programs are built for the compile target's kernels (a deviceless TPU or GPU compile runs in a CPU process)
    sm = ShardedModel(cfg, compiled_strategy, mesh, prefill_microbatches=prefill_microbatches,
                      decode_microbatches=decode_microbatches, kernels=Kernels.for_platform(devices[0].platform))
    B, S, T = workload.batch, workload.prompt_len, workload.cache_len

    def struct(shape, dtype, sharding):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)

    params = jax.tree.map(lambda s, a: struct(a.shape, a.dtype, s), sm.param_shardings, sm.abstract_params)
    cache = {k: struct(v.shape, v.dtype, sm.cache_shardings(B, T)[k]) for k, v in sm.cache_shape(B, T).items()}
    weights_bytes = sum(_shard_bytes(x) for x in jax.tree.leaves(params))
    cache_bytes = sum(_shard_bytes(x) for x in cache.values())

    program = CompiledProgram(cfg, strategy, compiled_strategy, workload, backend,
                              devices[0].device_kind if hasattr(devices[0], "device_kind") else backend,
                              notes=notes, topology=where, physical_order=physical_order)
    for phase in phases:
        if phase == "prefill":
            tokens = struct((B, S), jnp.int32, sm.token_sharding(B, S))
            fn, args = sm.prefill, (params, tokens, cache)
        else:
            tokens = struct((B, 1), jnp.int32, sm.token_sharding(B, 1))
            pos = struct((), jnp.int32, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
            fn, args = sm.decode, (params, tokens, pos, cache)
        inputs = {"weights": weights_bytes, "kv_cache": cache_bytes,
                  "tokens": sum(_shard_bytes(a) for a in args if a is not params and a is not cache)}
        start = time.perf_counter()
        try:
            options = CPU_ANALYSIS_OPTIONS if backend == Backend.CPU else None
            compiled = fn.lower(*args).compile(compiler_options=options)
        except Exception as e:  # the XLA error type is not public; only out-of-memory is a result
            text = str(e)
            if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
                raise
            program.phases[phase] = CompiledPhase(phase, None, "", inputs, time.perf_counter() - start,
                                                  fits=False, error=text.strip().splitlines()[0][:500])
            continue
        program.phases[phase] = CompiledPhase(phase, compiled, compiled.as_text(), inputs,
                                              time.perf_counter() - start)
    return program
