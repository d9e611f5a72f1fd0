"""Compiling the shortlist: through the cache, in this process or in worker processes that stay warm.

What is cached is the compiled statistics of a strategy (`moe_jax.costs.types.CostReport`, keyed by what the
compile depends on: `moe_jax.planner.cache.cache_key`); the hardware's time model, checks and report are applied
to them afterwards (`moe_jax.perf.analysis.analysis_of`), so a new ``--hardware`` on the cpu backend compiles
nothing. jax's own persistent compilation cache sits beside it (``<cache>/xla``, cpu and real backends): a
program whose entry is gone or was never written (an interrupted search) is read back instead of compiled.

Worker processes import jax once and serve every compile of the process's searches (each ``--objective cost``
escalation, the dispatch comparison, the load sweep, the disaggregated pools): `worker_pool`.
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed

from moe_jax.costs.types import CostReport
from moe_jax.names import Backend
from moe_jax.parallel.devices import MAX_CPU_DEVICES
from moe_jax.parallel.mesh import Strategy
from moe_jax.planner import cache
from moe_jax.planner.spec import SearchSpec

Progress = Callable[[str, str, int, int], None]
"""`progress(kind, text, done, total)`."""

CHART_NAME = "memory.png"
"""The memory chart a compiled report links to; the CLI renames it beside the report it writes."""


def compile_all(spec: SearchSpec, names: Sequence[str], *, progress: Progress | None = None
                ) -> tuple[dict[str, dict], set[str]]:
    """Compile the strategies `names` of `spec` (cached ones are read, new ones stored).

    Returns (strategy name → {"analysis": analyze JSON, "markdown": report}, the names whose compiled statistics
    were read from the cache).
    """
    from moe_jax.costs.backends import resolve

    compiler = resolve(spec.hw, spec.backend)
    payloads, cached, todo = {}, set(), []
    for name in names:
        s = Strategy.parse(name)
        key = cache.cache_key(spec.cfg, s, spec.workload, spec.backend, spec.hw, spec.topology)
        hit = cache.load_cost(spec.cache_dir, key) if spec.cache_dir else None
        if hit is not None:
            payloads[name] = payload_of(spec, s, hit, CHART_NAME, compiler)
            cached.add(name)
        else:
            todo.append((name, s, key))
    done = len(names) - len(todo)
    if progress:
        progress("compile", f"{done} cached", done, len(names))
    if not todo:
        return payloads, cached
    need = devices_needed(spec, [s for _, s, _ in todo])
    if spec.backend == Backend.REAL or spec.workers <= 1 or len(todo) == 1:
        from moe_jax.parallel.devices import request_cpu_devices

        if spec.backend != Backend.REAL:
            request_cpu_devices(need)     # fake CPU devices, or one for a deviceless TPU/GPU compile
        for name, s, key in todo:
            if progress:
                progress("compile", f"compiling {name}", done, len(names))
            cost = compile_cost(spec, s)
            _stored(spec, name, key, cost)
            payloads[name] = payload_of(spec, s, cost, CHART_NAME, compiler)
            done += 1
        return payloads, cached
    pool = worker_pool(spec.workers, need)
    futures = {pool.submit(compile_task, spec, s, CHART_NAME): (name, key) for name, s, key in todo}
    if progress:
        progress("compile", f"compiling {', '.join(n for n, _, _ in todo[:spec.workers])}", done, len(names))
    for future in as_completed(futures):
        name, key = futures[future]
        cost, payloads[name] = future.result()
        _stored(spec, name, key, cost)
        done += 1
        if progress:
            progress("compile", f"compiled {name}", done, len(names))
    return payloads, cached


def devices_needed(spec: SearchSpec, strategies: Sequence[Strategy]) -> int:
    """The fake CPU devices a process compiling `strategies` for `spec` needs (1 for a deviceless compile)."""
    from moe_jax.costs.backends import resolve

    if spec.backend != Backend.REAL and resolve(spec.hw, spec.backend).backend != Backend.CPU:
        return 1                          # deviceless TPU/GPU compiles need no fake CPU devices
    return max((s.num_devices if s.num_devices <= MAX_CPU_DEVICES else s.num_devices // s.dp for s in strategies),
               default=1)


def _stored(spec: SearchSpec, name: str, key: str, cost: CostReport) -> None:
    """Write `cost` to the cache when there is one; a failed write only warns."""
    if spec.cache_dir:
        try:
            cache.store_cost(spec.cache_dir, key, cost)
        except OSError as e:                     # the result stands; only the cache entry is lost
            import warnings

            warnings.warn(f"could not write the cache entry for {name} in {str(spec.cache_dir)!r}: "
                          f"{e.strerror or e}", stacklevel=2)


def compile_cost(spec: SearchSpec, strategy: Strategy) -> CostReport:
    """Compile one strategy and read its compiled statistics (no hardware figures applied)."""
    from moe_jax.costs.backends import resolve, tpu_topology
    from moe_jax.costs.compile import persistent_cache
    from moe_jax.costs.walk import analyze_cost

    compiler = resolve(spec.hw, spec.backend)
    kw: dict = {"topology": spec.topology} if spec.topology else {}
    if compiler.backend == Backend.TPU and not spec.topology:
        kw["topology"] = tpu_topology(spec.hw, strategy.num_devices)
    if compiler.backend == Backend.GPU:
        kw["gpu_target"] = compiler.gpu_target
    # jax 0.10.2 writes a deviceless GPU/TPU executable to its cache but cannot read it back ("PjRtCompiler must
    # be constructed with a Client to call DeserializeLoadedExecutable"): only compiles on devices use the cache
    xla = spec.cache_dir and compiler.backend in (Backend.CPU, Backend.REAL)
    with persistent_cache(cache.xla_cache_dir(spec.cache_dir) if xla else None):
        return analyze_cost(spec.cfg, strategy, spec.workload, compiler.backend, **kw)


def payload_of(spec: SearchSpec, strategy: Strategy, cost: CostReport, chart_name: str, compiler=None) -> dict:
    """The planner's record of one compiled strategy on `spec.hw`: {"analysis": analyze JSON, "markdown": report}."""
    from moe_jax.costs.backends import resolve
    from moe_jax.perf.analysis import analysis_of
    from moe_jax.reporting.markdown import markdown

    a = analysis_of(spec.cfg, strategy, spec.hw, spec.workload, cost, compiler or resolve(spec.hw, spec.backend))
    return {"analysis": a.to_dict(), "markdown": markdown(a, chart_name)}


def compile_one(spec: SearchSpec, strategy: Strategy, chart_name: str) -> dict:
    """Analyze one strategy (compile, cost walk, time model): the planner's record of it (`payload_of`)."""
    return compile_task(spec, strategy, chart_name)[1]


def compile_task(spec: SearchSpec, strategy: Strategy, chart_name: str) -> tuple[CostReport, dict]:
    """A worker's task: the compiled statistics (for the cache) and the planner's record of one strategy."""
    cost = compile_cost(spec, strategy)
    return cost, payload_of(spec, strategy, cost, chart_name)


_POOL: tuple[ProcessPoolExecutor, int, int] | None = None
"""The warm workers: (pool, workers, fake CPU devices each started with)."""


def worker_pool(workers: int, devices: int) -> ProcessPoolExecutor:
    """`workers` compile processes with at least `devices` fake CPU devices, started once and kept for the
    process's later searches (a worker's start, importing jax, is about a second on 2 cores); a request for
    more workers or devices than the running pool has replaces it."""
    global _POOL
    if _POOL is not None:
        pool, have_workers, have_devices = _POOL
        if have_workers == workers and have_devices >= devices and not getattr(pool, "_broken", False):
            return pool
        shutdown_workers()
    import multiprocessing

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=init_worker, initargs=(devices,))
    _POOL = (pool, workers, devices)
    return pool


def shutdown_workers() -> None:
    """Stop the warm workers (at exit, or before a pool of another size starts)."""
    global _POOL
    if _POOL is not None:
        _POOL[0].shutdown(wait=True, cancel_futures=True)
        _POOL = None


atexit.register(shutdown_workers)


def init_worker(devices: int) -> None:
    """A compile worker's start: die with the planner, and ask for the fake CPU devices its compiles need."""
    from moe_jax.parallel.devices import request_cpu_devices

    watch_parent()
    request_cpu_devices(devices)


def watch_parent(interval: float = 1.0) -> None:
    """End this (worker) process when its parent dies: a killed `plan` must not leave compile workers behind."""
    import threading

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(interval)
            if os.getppid() != parent:           # re-parented: the planner is gone
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="moe-jax-parent-watch").start()
