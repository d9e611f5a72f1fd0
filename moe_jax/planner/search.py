"""The planner: every (ep, tp, pp, dp) for a device count, ranked analytically, the best compiled.

1. Enumerate every factorisation of N into ep · tp · pp · dp that `moe_jax.parallel.mesh.validate`
   accepts for the model and batch.
2. Estimate each with `moe_jax.costs.analytic` fed to the same time model as compiled costs.
3. Rank by the objective (feasible first: fits in memory and meets the SLOs), compile the
   top K with the cost analyzer in worker processes, and re-rank on compiled numbers.
   Compiled results are cached on disk, keyed by everything that changes them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from moe_jax.config import ModelConfig
from moe_jax.costs.compile import Workload
from moe_jax.costs.walk import CostReport, analytic_flops
from moe_jax.errors import MoeJaxError, StrategyError
from moe_jax.hardware.presets import Hardware
from moe_jax.names import Dispatch, Objective
from moe_jax.parallel.devices import MAX_CPU_DEVICES
from moe_jax.parallel.mesh import Strategy, divisors, validate

OBJECTIVES = tuple(Objective)
MAX_DEVICES = 1 << 20
"""Largest device count the planner searches (a million accelerators)."""


def enumerate_strategies(cfg: ModelConfig, devices: int, batch: int) -> list[Strategy]:
    """Every valid (ep, tp, pp, dp) whose product is `devices`."""
    found = []
    for ep in divisors(devices):
        for tp in divisors(devices // ep):
            for pp in divisors(devices // (ep * tp)):
                s = Strategy(ep=ep, tp=tp, pp=pp, dp=devices // (ep * tp * pp))
                try:
                    validate(s, cfg, batch=batch)
                except StrategyError:
                    continue
                found.append(s)
    return found


@dataclass
class Estimate:
    """Analytic prediction for one strategy."""

    strategy: Strategy
    fits: bool
    memory_total: int
    ttft_s: float
    tpot_s: float
    throughput_tok_s: float
    meets_slo: bool = True

    @property
    def feasible(self) -> bool:
        return self.fits and self.meets_slo


def estimate(cfg: ModelConfig, strategy: Strategy, hw: Hardware, workload: Workload,
             placement_cache: dict | None = None) -> Estimate:
    """Analytic memory and latency of one strategy (no compile)."""
    from moe_jax.costs.analytic import estimate_phase
    from moe_jax.costs.routing import decode_floor_weights
    from moe_jax.perf.timemodel import predict
    from moe_jax.programs.placement import describe

    p = describe(cfg, strategy, batch=workload.batch, cache_len=workload.cache_len)
    weights, kv = p.weight_bytes_per_device, p.kv_cache_bytes_per_device
    phases = {ph: estimate_phase(cfg, strategy, workload, ph, weights, kv) for ph in ("prefill", "decode")}
    analytic = {ph: analytic_flops(cfg, workload, ph) for ph in phases}
    analytic["decode_weights_read"] = decode_floor_weights(cfg, strategy, weights, workload.batch)
    report = CostReport(cfg.name, strategy.name, strategy.name, workload.to_dict(), "analytic", "estimate",
                        strategy.num_devices, phases, [], analytic)
    pred = predict(report, hw, workload.batch, workload.gen_len)
    total = max(ph.memory.peak for ph in phases.values())
    return Estimate(strategy, total <= hw.memory_bytes, total, pred.ttft_s, pred.tpot_s, pred.throughput_tok_s)


def rank_estimates(cfg: ModelConfig, devices: int, hw: Hardware, workload: Workload, *,
                   objective: str = "throughput", slo_ttft: float | None = None, slo_tpot: float | None = None,
                   progress=None) -> list[dict]:
    """Every strategy for `devices` estimated and ranked (feasible first, then by the objective)."""
    rows = []
    for s in enumerate_strategies(cfg, devices, workload.batch):
        e = estimate(cfg, s, hw, workload)
        e.meets_slo = ((slo_ttft is None or e.ttft_s <= slo_ttft) and (slo_tpot is None or e.tpot_s <= slo_tpot))
        rows.append({"strategy": s.name, "devices": devices, "fits": e.fits, "feasible": e.feasible,
                     "memory_bytes": e.memory_total, "ttft_s": e.ttft_s, "tpot_s": e.tpot_s,
                     "throughput_tok_s": e.throughput_tok_s,
                     "throughput_per_device": e.throughput_tok_s / devices, "compiled": False,
                     "estimate": {"fits": e.fits, "ttft_s": e.ttft_s, "tpot_s": e.tpot_s,
                                  "throughput_tok_s": e.throughput_tok_s, "memory_bytes": e.memory_total}})
    if progress:
        progress("estimate", f"estimated {len(rows)} strategies on {devices} devices", 1, 1)
    return sorted(rows, key=_rank_key(objective))


def fewest_devices(cfg: ModelConfig, devices: int, hw: Hardware, workload: Workload, *, start: int = 1,
                   slo_ttft: float | None = None, slo_tpot: float | None = None) -> tuple[int | None, list[dict]]:
    """The smallest device count from `start` up to `devices` with an estimated-feasible strategy.

    Returns (count or None, the ranked estimates of every count tried).
    """
    tried = []
    for n in range(start, devices + 1):
        rows = rank_estimates(cfg, n, hw, workload, objective="cost", slo_ttft=slo_ttft, slo_tpot=slo_tpot)
        tried += rows
        if any(r["feasible"] for r in rows):
            return n, tried
    return None, tried


def _rank_key(objective: str):
    def key(x):
        feasible = x["feasible"]
        metric = {"throughput": (-x["throughput_tok_s"],), "ttft": (x["ttft_s"],), "tpot": (x["tpot_s"],),
                  "cost": (x["devices"], -x["throughput_tok_s"])}[objective]
        return (not feasible, *metric)
    return key


# --- the compile cache ----------------------------------------------------------------

def cache_key(cfg: ModelConfig, strategy: Strategy, workload: Workload, backend: str, hw: Hardware,
              topology: str | None) -> str:
    """sha256 of everything that changes a compiled analysis."""
    from moe_jax.costs.backends import resolve

    versions = {pkg: metadata.version(pkg) for pkg in ("jax", "jaxlib", "flax")}
    versions["moe-jax"] = code_digest()           # an edited checkout never reads another code's entries
    compiler = resolve(hw, backend)
    target = compiler.gpu_target.read_text() if compiler.gpu_target else None
    blob = json.dumps({"model": cfg.summary(), "strategy": strategy.name, "workload": workload.to_dict(),
                       "backend": backend, "compiler": compiler.to_dict(), "gpu_target": target,
                       "topology": topology, "hardware": hw.to_dict(), "versions": versions},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of moe-jax's own source and target files: what a compiled result depends on besides its inputs."""
    root = Path(__file__).resolve().parent.parent   # the moe_jax package
    h = hashlib.sha256()
    for path in sorted(list(root.rglob("*.py")) + list(root.rglob("*.txtpb"))):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def check_cache_dir(directory: Path) -> None:
    """Fail before any compile when the cache cannot be used: a file where the folder should be, or a folder
    that cannot be created or written (a whole search must not be lost to its cache)."""
    if directory.exists() and not directory.is_dir():
        raise MoeJaxError(f"--cache {str(directory)!r} is a file, not a directory; name a directory or '' to "
                          "disable the cache")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoeJaxError(f"--cache {str(directory)!r} cannot be created: {e.strerror or e}; name another "
                          "directory or '' to disable the cache") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise MoeJaxError(f"--cache {str(directory)!r} is not writable; name another directory or '' to disable "
                          "the cache")


def cache_load(directory: Path, key: str) -> dict | None:
    """A cached result, or None when absent, truncated, corrupt or for another key."""
    path = directory / f"{key}.json"
    try:
        entry = json.loads(path.read_text())
        payload = entry["payload"]
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        if entry.get("key") != key or entry.get("sha256") != digest:
            return None
        return payload
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cache_store(directory: Path, key: str, payload: dict) -> None:
    """Write atomically (temporary file, then rename): an interrupted search leaves no partial entry."""
    from moe_jax.files import write_atomic

    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    write_atomic(directory / f"{key}.json", json.dumps({"key": key, "sha256": digest, "payload": payload}))


DISPATCH_METHODS = (Dispatch.CAPACITY, Dispatch.DROPLESS)


def compare_dispatch(result: PlanResult, cfg: ModelConfig, hw: Hardware, workload: Workload, *,
                     backend: str = "auto", topology: str | None = None, cache_dir: Path | None = None,
                     progress=None) -> dict | None:
    """Compile the best strategy of `result` with every dispatch method; sets and returns the comparison.

    The search itself ran with `cfg.dispatch`; this answers "what would the other method do
    on the same strategy", from compiled programs on both sides.
    """
    if not result.best:
        return None
    methods = {}
    for method in DISPATCH_METHODS:
        if method == cfg.dispatch:
            a = result.compiled[result.best]["analysis"]
        else:
            holder = PlanResult(result.objective, result.devices, [])
            _compile_all(holder, [result.best], {result.best: {}}, cfg.replace(dispatch=method), hw, workload,
                         backend, topology, cache_dir, 1, progress)
            a = holder.compiled[result.best]["analysis"]
        methods[method] = {"fits": a["fits"], "ttft_s": a["ttft_s"], "tpot_s": a["tpot_s"],
                           "throughput_tok_s": a["throughput_tok_s"], "memory_bytes": a["memory"]["total"],
                           "prefill_matmul_flops": a["phases"].get("prefill", {}).get("matmul_flops")}
    result.dispatch_comparison = {"strategy": result.best, "searched_with": cfg.dispatch, "methods": methods,
                                  "dropless_buffer": cfg.dropless_buffer}
    return result.dispatch_comparison


# --- compiling in worker processes ------------------------------------------------------

def _init_worker(devices: int) -> None:
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


def _compile_one(cfg, strategy, hw, workload, backend, topology, chart_name) -> dict:
    from moe_jax.perf.analysis import analyze
    from moe_jax.reporting.markdown import markdown

    kw = {"topology": topology} if topology else {}
    a = analyze(cfg, strategy, hw, workload, backend=backend, **kw)
    return {"analysis": a.to_dict(), "markdown": markdown(a, chart_name)}


@dataclass
class PlanResult:
    """What `plan` found."""

    objective: str
    devices: int
    candidates: list[dict]
    """Every strategy searched, ranked: estimate and (for the compiled ones) compiled figures."""
    compiled: dict[str, dict] = field(default_factory=dict)
    """Strategy name → {"analysis": analyze JSON, "markdown": report}."""
    best: str | None = None
    baseline: str | None = None
    seconds: float = 0.0
    searched_device_counts: list[int] = field(default_factory=list)
    message: str = ""
    estimate_bias: float | None = None
    """Median (estimated TPOT / compiled TPOT − 1) over the compiled candidates: how far the
    uncompiled rows' estimates are likely off on this backend."""
    dispatch_comparison: dict | None = None
    """The best strategy compiled with each expert dispatch method (`compare_dispatch`)."""

    def to_dict(self) -> dict:
        """The plan JSON: best and baseline in the analyze schema, candidates, counts, seconds."""
        return {
            "schema": "moe-jax.plan/1", "objective": self.objective, "devices": self.devices,
            "best": self.compiled[self.best]["analysis"] if self.best else None,
            "baseline": self.compiled[self.baseline]["analysis"] if self.baseline else None,
            "candidates": self.candidates, "searched": len(self.candidates),
            "compiled": sum(1 for c in self.candidates if c["compiled"]),
            "searched_device_counts": self.searched_device_counts, "seconds": self.seconds,
            "message": self.message, "estimate_bias_tpot": self.estimate_bias,
            "dispatch_comparison": self.dispatch_comparison,
        }


def plan(cfg: ModelConfig, devices: int, hw: Hardware, workload: Workload, *, objective: str = "throughput",
         slo_ttft: float | None = None, slo_tpot: float | None = None, baseline: Strategy | None = None,
         top: int = 8, backend: str = "auto", topology: str | None = None, cache_dir: Path | None = None,
         workers: int = 2, progress=None) -> PlanResult:
    """Search, estimate, compile the best `top`, and rank; `progress(kind, text, done, total)` reports."""
    start = time.perf_counter()
    if objective not in OBJECTIVES:
        raise MoeJaxError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if devices < 1 or devices > MAX_DEVICES:
        raise MoeJaxError(f"--devices {devices} must be between 1 and {MAX_DEVICES:,}")
    from moe_jax.programs.guards import check_extents

    check_extents(cfg, workload.batch, workload.prompt_len, workload.cache_len)
    if cache_dir:
        check_cache_dir(Path(cache_dir))
    if objective == "cost":
        return _plan_fewest(cfg, devices, hw, workload, slo_ttft=slo_ttft, slo_tpot=slo_tpot, baseline=baseline,
                            top=top, backend=backend, topology=topology, cache_dir=cache_dir, workers=workers,
                            progress=progress, start=start)
    rows = rank_estimates(cfg, devices, hw, workload, objective=objective, slo_ttft=slo_ttft, slo_tpot=slo_tpot,
                          progress=progress)
    return _compile_and_rank(rows, rows, cfg, devices, hw, workload, objective, slo_ttft, slo_tpot, baseline, top,
                             backend, topology, cache_dir, workers, progress, start)


MAX_COST_ESCALATIONS = 4
"""--objective cost: device counts whose top candidates are compiled before giving up."""


def _plan_fewest(cfg, devices, hw, workload, *, slo_ttft, slo_tpot, baseline, top, backend, topology, cache_dir,
                 workers, progress, start) -> PlanResult:
    """Smallest estimated-feasible device count first; if none of its compiled candidates is feasible
    (estimates are optimistic), the next count, up to MAX_COST_ESCALATIONS counts."""
    rows, n, result = [], 0, None
    for _ in range(MAX_COST_ESCALATIONS):
        n, tried = fewest_devices(cfg, devices, hw, workload, start=n + 1, slo_ttft=slo_ttft, slo_tpot=slo_tpot)
        rows += tried
        if progress:
            progress("estimate", f"estimated {len(rows)} strategies up to {n or devices} devices", 1, 1)
        if n is None:
            break
        pool = [r for r in rows if r["devices"] == n]
        result = _compile_and_rank(rows, pool, cfg, devices, hw, workload, "cost", slo_ttft, slo_tpot, baseline,
                                   top, backend, topology, cache_dir, workers, progress, start)
        if result.best:
            return result
    if not rows:
        raise MoeJaxError(f"no valid strategy for {cfg.name} on up to {devices} devices with batch {workload.batch}")
    if result is None:
        result = _compile_and_rank(rows, [], cfg, devices, hw, workload, "cost", slo_ttft, slo_tpot, baseline, top,
                                   backend, topology, cache_dir, workers, progress, start)
    return result


def _compile_and_rank(rows, pool, cfg, devices, hw, workload, objective, slo_ttft, slo_tpot, baseline, top,
                      backend, topology, cache_dir, workers, progress, start) -> PlanResult:
    if not rows:
        raise MoeJaxError(f"no valid strategy for {cfg.name} on {devices} devices with batch {workload.batch}: "
                          "check that the device count has divisors matching experts, heads, layers and batch")
    searched_counts = sorted({r["devices"] for r in rows})
    pool = sorted(pool, key=_rank_key(objective))
    chosen = [r["strategy"] for r in pool[:top] if r["feasible"]] or [r["strategy"] for r in pool[:top]]
    names = list(dict.fromkeys(chosen + ([baseline.name] if baseline else [])))
    by_name = {r["strategy"]: r for r in rows}
    if baseline and baseline.name not in by_name:
        validate(baseline, cfg, batch=workload.batch)
        by_name[baseline.name] = {"strategy": baseline.name, "devices": baseline.num_devices, "compiled": False,
                                  "estimate": None, "feasible": False, "fits": False}
        rows.append(by_name[baseline.name])

    result = PlanResult(objective, devices, rows, searched_device_counts=searched_counts)
    _compile_all(result, names, by_name, cfg, hw, workload, backend, topology, cache_dir, workers, progress)
    for name, entry in result.compiled.items():
        a, r = entry["analysis"], by_name[name]
        meets = ((slo_ttft is None or (a["ttft_s"] or 1e30) <= slo_ttft)
                 and (slo_tpot is None or (a["tpot_s"] or 1e30) <= slo_tpot))
        r.update(compiled=True, fits=a["fits"], feasible=a["fits"] and meets, ttft_s=a["ttft_s"] or float("inf"),
                 tpot_s=a["tpot_s"] or float("inf"), throughput_tok_s=a["throughput_tok_s"] or 0.0,
                 memory_bytes=a["memory"]["total"], throughput_per_device=(a["throughput_tok_s"] or 0.0)
                 / r["devices"])
        est = r.get("estimate")
        if est and a["tpot_s"]:
            r["estimate_vs_compiled"] = {k: est[k] / a[k] - 1 for k in ("ttft_s", "tpot_s") if a[k]}
    result.candidates = sorted(rows, key=lambda x: (not x["compiled"],) + _rank_key(objective)(x))
    compiled_ok = [r for r in result.candidates if r["compiled"] and r["feasible"]
                   and (baseline is None or r["strategy"] != baseline.name or r["strategy"] in chosen)]
    result.best = compiled_ok[0]["strategy"] if compiled_ok else None
    result.baseline = baseline.name if baseline else None
    if result.best is None:
        short = min((r for r in rows if r.get("memory_bytes")), key=lambda r: r["memory_bytes"], default=None)
        result.message = ("nothing feasible: no strategy fits and meets the SLOs" + (
            f"; the smallest memory need is {short['strategy']} at {short['memory_bytes'] / 1e9:.2f} GB per device, "
            f"{(short['memory_bytes'] - hw.memory_bytes) / 1e9:.2f} GB over {hw.memory_bytes / 1e9:.0f} GB"
            if short and short["memory_bytes"] > hw.memory_bytes else ""))
    ratios = sorted(r["estimate_vs_compiled"]["tpot_s"] for r in rows if r.get("estimate_vs_compiled", {}).get("tpot_s")
                    is not None)
    if ratios:
        result.estimate_bias = ratios[len(ratios) // 2]
    result.seconds = time.perf_counter() - start
    return result


def _compile_all(result, names, by_name, cfg, hw, workload, backend, topology, cache_dir, workers, progress):
    todo = []
    for name in names:
        s = Strategy.parse(name)
        key = cache_key(cfg, s, workload, backend, hw, topology)
        cached = cache_load(cache_dir, key) if cache_dir else None
        if cached is not None:
            result.compiled[name] = cached
            by_name[name]["cached"] = True
        else:
            todo.append((name, s, key))
    done = len(names) - len(todo)
    if progress:
        progress("compile", f"{done} cached", done, len(names))
    if not todo:
        return
    from moe_jax.costs.backends import resolve

    on_cpu = resolve(hw, backend).backend == "cpu"
    need = max(s.num_devices if s.num_devices <= MAX_CPU_DEVICES else s.num_devices // s.dp for _, s, _ in todo)
    need = need if on_cpu else 1          # deviceless TPU/GPU compiles need no fake CPU devices
    if backend == "real" or workers <= 1 or len(todo) == 1:
        from moe_jax.parallel.devices import request_cpu_devices

        if backend != "real":
            request_cpu_devices(need)     # fake CPU devices, or one for a deviceless TPU/GPU compile
        for name, s, key in todo:
            if progress:
                progress("compile", f"compiling {name}", done, len(names))
            _finish(result, name, key, _compile_one(cfg, s, hw, workload, backend, topology, "memory.png"),
                    cache_dir)
            done += 1
        return
    import multiprocessing

    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(need,)) as pool:
        futures = {pool.submit(_compile_one, cfg, s, hw, workload, backend, topology, "memory.png"): (name, key)
                   for name, s, key in todo}
        if progress:
            progress("compile", f"compiling {', '.join(n for n, _, _ in todo[:workers])}", done, len(names))
        for future in as_completed(futures):
            name, key = futures[future]
            _finish(result, name, key, future.result(), cache_dir)
            done += 1
            if progress:
                progress("compile", f"compiled {name}", done, len(names))


def _finish(result, name, key, payload, cache_dir):
    result.compiled[name] = payload
    if cache_dir:
        try:
            cache_store(cache_dir, key, payload)
        except OSError as e:                     # the result stands; only the cache entry is lost
            import warnings

            warnings.warn(f"could not write the cache entry for {name} in {str(cache_dir)!r}: {e.strerror or e}",
                          stacklevel=2)


def pareto_plot(result: PlanResult, path: str | Path) -> Path:
    """Throughput per device against TPOT for every candidate; compiled and feasible ones marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in result.candidates:
        if not r.get("estimate"):
            continue
        est = r["estimate"]
        ax.scatter(est["tpot_s"] * 1e3, est["throughput_tok_s"] / r["devices"], s=14,
                   color="#4c72b0" if r["fits"] else "#c44e52", alpha=0.35, marker="o" if r["feasible"] else "x")
    for r in result.candidates:
        if r["compiled"] and r["tpot_s"] != float("inf"):
            ax.scatter(r["tpot_s"] * 1e3, r["throughput_per_device"], s=60, facecolors="none",
                       edgecolors="black" if r["feasible"] else "#c44e52", linewidths=1.2)
            ax.annotate(r["strategy"], (r["tpot_s"] * 1e3, r["throughput_per_device"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    for name, marker, label in ((result.best, "*", "best"), (result.baseline, "D", "baseline")):
        r = next((x for x in result.candidates if x["strategy"] == name), None)
        if r and r["compiled"] and r["tpot_s"] != float("inf"):
            ax.scatter(r["tpot_s"] * 1e3, r["throughput_per_device"], s=160, marker=marker, color="#dd8452",
                       label=f"{label}: {name}", zorder=5)
    ax.scatter([], [], color="#4c72b0", alpha=0.5, label="estimate, fits")
    ax.scatter([], [], color="#c44e52", marker="x", label="estimate, does not fit / misses SLO")
    ax.scatter([], [], facecolors="none", edgecolors="black", label="compiled")
    ax.set_xscale("log")
    ax.set_xlabel("TPOT (ms, log)")
    ax.set_ylabel("decode tokens/s per device")
    ax.set_title(f"{len(result.candidates)} strategies, objective {result.objective}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, metadata={"Software": "moe-jax"})
    plt.close(fig)
    return path
