"""Compiling the shortlist: through the cache, in this process or in spawned worker processes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed

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

    Returns (strategy name → {"analysis": analyze JSON, "markdown": report}, the names read from the cache).
    """
    payloads, cached, todo = {}, set(), []
    for name in names:
        s = Strategy.parse(name)
        key = cache.cache_key(spec.cfg, s, spec.workload, spec.backend, spec.hw, spec.topology)
        hit = cache.cache_load(spec.cache_dir, key) if spec.cache_dir else None
        if hit is not None:
            payloads[name] = hit
            cached.add(name)
        else:
            todo.append((name, s, key))
    done = len(names) - len(todo)
    if progress:
        progress("compile", f"{done} cached", done, len(names))
    if not todo:
        return payloads, cached
    from moe_jax.costs.backends import resolve

    on_cpu = resolve(spec.hw, spec.backend).backend == Backend.CPU
    need = max(s.num_devices if s.num_devices <= MAX_CPU_DEVICES else s.num_devices // s.dp for _, s, _ in todo)
    need = need if on_cpu else 1          # deviceless TPU/GPU compiles need no fake CPU devices
    if spec.backend == Backend.REAL or spec.workers <= 1 or len(todo) == 1:
        from moe_jax.parallel.devices import request_cpu_devices

        if spec.backend != Backend.REAL:
            request_cpu_devices(need)     # fake CPU devices, or one for a deviceless TPU/GPU compile
        for name, s, key in todo:
            if progress:
                progress("compile", f"compiling {name}", done, len(names))
            payloads[name] = _stored(spec, name, key, compile_one(spec, s, CHART_NAME))
            done += 1
        return payloads, cached
    import multiprocessing

    with ProcessPoolExecutor(max_workers=min(spec.workers, len(todo)),
                             mp_context=multiprocessing.get_context("spawn"),
                             initializer=init_worker, initargs=(need,)) as pool:
        futures = {pool.submit(compile_one, spec, s, CHART_NAME): (name, key) for name, s, key in todo}
        if progress:
            progress("compile", f"compiling {', '.join(n for n, _, _ in todo[:spec.workers])}", done, len(names))
        for future in as_completed(futures):
            name, key = futures[future]
            payloads[name] = _stored(spec, name, key, future.result())
            done += 1
            if progress:
                progress("compile", f"compiled {name}", done, len(names))
    return payloads, cached


def _stored(spec: SearchSpec, name: str, key: str, payload: dict) -> dict:
    """`payload`, written to the cache when there is one."""
    if spec.cache_dir:
        try:
            cache.cache_store(spec.cache_dir, key, payload)
        except OSError as e:                     # the result stands; only the cache entry is lost
            import warnings

            warnings.warn(f"could not write the cache entry for {name} in {str(spec.cache_dir)!r}: "
                          f"{e.strerror or e}", stacklevel=2)
    return payload


def compile_one(spec: SearchSpec, strategy: Strategy, chart_name: str) -> dict:
    """Analyze one strategy (compile, cost walk, time model): the cache's payload."""
    from moe_jax.perf.analysis import analyze
    from moe_jax.reporting.markdown import markdown

    kw = {"topology": spec.topology} if spec.topology else {}
    a = analyze(spec.cfg, strategy, spec.hw, spec.workload, backend=spec.backend, **kw)
    return {"analysis": a.to_dict(), "markdown": markdown(a, chart_name)}


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
