"""One strategy, analysed: compile, cost, time, checks and recommendations, in the JSON schema of the README.

Every number here comes from the compiled program (`moe_jax.costs.walk`), the time model
(`moe_jax.perf.timemodel`, whose inputs are listed), or the placement (`moe_jax.programs.placement`).
A check passes only when its own numbers pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moe_jax.config import ModelConfig
from moe_jax.costs.compile import Workload
from moe_jax.costs.types import CostReport
from moe_jax.costs.walk import analyze_cost
from moe_jax.hardware.presets import Hardware
from moe_jax.names import Backend, Dispatch
from moe_jax.parallel.mesh import Strategy, kv_replicated
from moe_jax.perf.timemodel import Prediction, predict
from moe_jax.programs.placement import Placement, describe
from moe_jax.units import gb as _gb

WELL_USED = 0.25
"""Below this share of device memory a strategy is flagged as over-provisioned."""


@dataclass
class Check:
    """A validation with the numbers it compared."""

    name: str
    passed: bool
    detail: str


@dataclass
class Analysis:
    """Everything `moe-jax analyze` reports."""

    cfg: ModelConfig
    strategy: Strategy
    hardware: Hardware
    workload: Workload
    cost: CostReport
    placement: Placement
    prediction: Prediction | None
    fits: bool
    memory: dict
    checks: list[Check] = field(default_factory=list)
    recommendations: list[str] = field(default_factory=list)
    fit_confirmed: bool = True
    """The fit verdict stands on the planned hardware's own compiler, or on exact sizes alone (weights, KV
    cache, inputs and outputs over capacity). False for an XLA:CPU stand-in's verdict that rests on its
    temporaries, which are not the GPU's or TPU's (bench/fit_cases.py measures how far off)."""

    def to_dict(self) -> dict:
        """The stable JSON schema (documented in the README)."""
        cfg, s, hw, p = self.cfg, self.strategy, self.hardware, self.prediction
        phases = {}
        for name, phase in self.cost.phases.items():
            t = getattr(p, name) if p else None
            phases[name] = {
                "fits": phase.fits, "error": phase.error,
                "flops": phase.flops, "matmul_flops": phase.matmul_flops, "hbm_bytes": phase.hbm_bytes,
                "transcendentals": phase.transcendentals,
                "memory": None if phase.memory is None else {
                    "weights": phase.memory.weights, "kv_cache": phase.memory.kv_cache,
                    "tokens": phase.memory.tokens, "arguments": phase.memory.arguments,
                    "outputs": phase.memory.outputs, "aliased": phase.memory.aliased,
                    "temporaries": phase.memory.temporaries, "peak": phase.memory.peak,
                    "source": phase.memory.source},
                "collectives": [{"kind": c["kind"], "axes": c["axes"], "group_size": c["group_size"],
                                 "bytes": c["bytes"], "count": c["calls"], "phase": c["phase"],
                                 **({"worst_bytes": c["worst_bytes"]} if "worst_bytes" in c else {})}
                                for c in phase.collective_summary()],
                "flops_by_scope": phase.flops_by_scope,
                "xla_cost_analysis": phase.xla_cost,
                "time": None if t is None else {
                    "compute": t.compute_s, "memory": t.memory_s, "comm": t.comm_s, "total": t.total_s,
                    "no_overlap": t.no_overlap_s, "full_overlap": t.full_overlap_s, "floor": t.floor_s,
                    "floor_detail": t.floor_detail, "comm_breakdown": t.comm_breakdown, "overhead": t.overhead_s,
                    "scheduled": t.scheduled_s, "exposed_comm": t.exposed_comm_s, "call": t.call_s,
                    "fresh_buffers": t.fresh_s},
            }
        return {
            "schema": "moe-jax.analyze/1",
            "model": {"name": cfg.name, "params_total": cfg.params_total, "params_active": cfg.params_active,
                      "dtype": cfg.dtype, "dispatch": cfg.dispatch, "capacity_factor": cfg.capacity_factor,
                      "weight_dtype": cfg.param_dtype, "kv_dtype": cfg.cache_dtype, "weight_bytes": cfg.weight_bytes,
                      "kv_bytes_per_token": cfg.kv_bytes_per_token},
            "strategy": {"name": s.name, "ep": s.ep, "tp": s.tp, "pp": s.pp, "dp": s.dp,
                         "devices": s.num_devices},
            "hardware": {"name": hw.name, "memory_bytes": hw.memory_bytes, "peak_flops": hw.peak_flops,
                         "hbm_bandwidth": hw.hbm_bandwidth, "devices_per_node": hw.devices_per_node,
                         "flops_efficiency": hw.flops_efficiency, "hbm_efficiency": hw.hbm_efficiency,
                         "peak_flops_fp8": hw.peak_flops_fp8, "peak_vector_flops": hw.peak_vector_flops,
                         "vector_efficiency": hw.vector_efficiency, "op_floor_s": hw.op_floor_s,
                         "decode_step_overhead_s": hw.decode_step_overhead_s,
                         "source": hw.source, "assumptions": hw.assumptions},
            "workload": {"batch": self.workload.batch, "prompt_len": self.workload.prompt_len,
                         "gen_len": self.workload.gen_len},
            "backend": self.cost.backend, "target": self.cost.target, "compiled_for": self.cost.compiled_for,
            "compiled_strategy": self.cost.compiled_strategy, "notes": self.cost.notes,
            "fits": self.fits, "fit_confirmed": self.fit_confirmed, "memory": self.memory,
            "placement": self.placement.facts(),
            "phases": phases,
            "ttft_s": p.ttft_s if p else None, "tpot_s": p.tpot_s if p else None,
            "throughput_tok_s": p.throughput_tok_s if p else None,
            "request_latency_s": p.request_latency_s if p else None,
            "mfu": p.mfu if p else None, "mbu": p.mbu if p else None,
            "decode_mfu": p.decode_mfu if p else None,
            "assumptions": p.assumptions if p else [],
            "analytic": self.cost.analytic.to_dict(),
            "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in self.checks],
            "recommendations": self.recommendations,
        }


def _memory(cost: CostReport, hw: Hardware) -> dict:
    compiled = [p for p in cost.phases.values() if p.fits]
    if not compiled:
        return {"weights": None, "kv_cache": None, "activations": None, "total": None,
                "capacity": hw.memory_bytes, "utilization": None, "peak_phase": None}
    peak = max(compiled, key=lambda p: p.memory.peak)
    m = peak.memory
    return {"weights": m.weights, "kv_cache": m.kv_cache, "activations": m.temporaries,
            "outputs_and_inputs": m.peak - m.weights - m.kv_cache - m.temporaries,
            "total": m.peak, "capacity": hw.memory_bytes, "utilization": m.peak / hw.memory_bytes,
            "peak_phase": peak.phase, "source": m.source}


def _fit_confirmed(cost: CostReport, memory: dict, hw: Hardware) -> bool:
    """See `Analysis.fit_confirmed`: only the hardware's own compiler (or exact sizes alone) backs a verdict."""
    if cost.backend != Backend.CPU:
        return True
    if memory["total"] is None:
        return False
    exact = memory["total"] - memory["activations"]           # arguments + outputs - aliased: dtype-exact
    return exact > hw.memory_bytes


def unconfirmed_fit_note(a: Analysis) -> str:
    """Why an XLA:CPU stand-in's fit verdict is not a claim (empty when the verdict is confirmed)."""
    if a.fit_confirmed:
        return ""
    return (f"{'fits' if a.fits else 'does not fit'} on XLA:CPU's numbers only, not confirmed for {a.hardware.name}: "
            f"weights, KV cache, inputs and outputs are exact, but the {_gb(a.memory['activations'] or 0)} of "
            "activations are XLA:CPU's temporaries (it computes bf16 in f32 and fuses differently: 0.65x to 1.7x "
            "of the GPU or TPU compiler's in bench/fit_cases.py); compile with the hardware's own compiler "
            "(--backend auto with 'moe-jax[gpu]' or 'moe-jax[tpu]' installed) for a verdict")


def _checks(a: Analysis) -> list[Check]:
    cfg, s, hw, w, mem, f = a.cfg, a.strategy, a.hardware, a.workload, a.memory, a.placement.facts()
    checks = []
    if mem["total"] is None:
        errors = "; ".join(p.error for p in a.cost.phases.values() if p.error)
        checks.append(Check("memory_fits", False, f"the compiler reports the program does not fit in "
                                                  f"{_gb(hw.memory_bytes)}: {errors}"))
    else:
        ok = mem["total"] <= hw.memory_bytes
        checks.append(Check("memory_fits", ok, (
            f"peak per device {_gb(mem['total'])} ({mem['peak_phase']}: weights {_gb(mem['weights'])} + KV cache "
            f"{_gb(mem['kv_cache'])} + activations {_gb(mem['activations'])} + inputs/outputs "
            f"{_gb(mem['outputs_and_inputs'])}) {'<=' if ok else '>'} {_gb(hw.memory_bytes)} per {hw.name}"
            + (f"; {unconfirmed_fit_note(a)}" if not a.fit_confirmed else ""))))
    E, H, K, L = cfg.num_experts, cfg.num_heads, cfg.num_kv_heads, cfg.moe_layers   # pp splits the MoE layers
    checks.append(Check("experts_split_evenly", E % s.ep == 0,
                        f"{E} experts / ep={s.ep} = {E / s.ep:g} per device per layer"))
    kv = (f"KV heads {K} < tp={s.tp}: each tp rank keeps the 1 KV head its query heads read, each head shared "
          f"by {s.tp // K} ranks" if kv_replicated(cfg, s) and s.tp % K == 0
          else f"{K} KV heads / tp={s.tp} = {K // s.tp}" if K % s.tp == 0 else f"{K} KV heads, tp={s.tp}")
    checks.append(Check("heads_split_evenly", H % s.tp == 0 and (K % s.tp == 0 or s.tp % K == 0),
                        f"{H} query heads / tp={s.tp} = {H / s.tp:g}; {kv}"))
    checks.append(Check("expert_width_split_evenly", cfg.expert_ffn % s.tp == 0,
                        f"expert FFN width {cfg.expert_ffn} / tp={s.tp} = {cfg.expert_ffn / s.tp:g} columns"))
    dense = (f" (+ the {cfg.first_dense_layers} dense first layers, on every stage's devices)"
             if cfg.first_dense_layers else "")
    unit = f"groups of {cfg.moe_interleave} layers" if cfg.moe_interleave > 1 else "layers"   # dense then MoE
    checks.append(Check("layers_split_evenly", L % s.pp == 0,
                        f"{L} {'MoE ' if dense else ''}{unit} / pp={s.pp} = {L / s.pp:g} per stage{dense}"))
    checks.append(Check("batch_split_evenly", w.batch % s.dp == 0,
                        f"batch {w.batch} / dp={s.dp} = {w.batch / s.dp:g} sequences per replica; "
                        f"{f['sequences_per_device']} per device in attention (split {f['batch_split']} ways)"))
    p = a.prediction
    if p is not None:
        for name, t in (("ttft", p.prefill), ("tpot", p.decode)):
            ok = t.raw_s >= t.floor_s
            checks.append(Check(f"{name}_at_or_above_floor", ok, (
                f"model {t.raw_s * 1e3:.3f} ms {'>=' if ok else '<'} floor {t.floor_s * 1e3:.3f} ms "
                f"({t.floor_detail})" + ("" if ok else "; the floor is reported instead"))))
    if mem["total"] is not None:
        util = mem["total"] / hw.memory_bytes
        kv = w.batch * cfg.kv_bytes(w.cache_len, s.pp)          # sliding/chunked layers: their rings only
        need = cfg.weight_bytes + kv
        fewest = max(1, math.ceil(need / hw.memory_bytes))
        checks.append(Check("memory_well_used", util >= WELL_USED, (
            f"{util:.1%} of {_gb(hw.memory_bytes)} used per device (threshold {WELL_USED:.0%}); weights "
            f"{_gb(cfg.weight_bytes)} + KV cache "
            f"{_gb(kv)}"
            f" = {_gb(need)} would fit in {fewest} devices' memory before activations and replication "
            f"(this strategy uses {s.num_devices})")))
    return checks


def _recommendations(a: Analysis) -> list[str]:
    recs, p, mem, s = [], a.prediction, a.memory, a.strategy
    if not a.fits:
        recs.append(f"Does not fit: {a.checks[0].detail}. Split the model over more devices (ep, tp, pp) or "
                    "lower the batch or context length.")
    if mem["total"] is not None and mem["total"] < WELL_USED * a.hardware.memory_bytes:
        fewest = next(c for c in a.checks if c.name == "memory_well_used").detail
        recs.append(f"Over-provisioned: {fewest}. Fewer devices per replica and more replicas (dp) would serve "
                    "more requests per device; no search was run here (`moe-jax plan` compares strategies).")
    if p is not None:
        for name, t in (("Prefill", p.prefill), ("Decode", p.decode)):
            exposed = t.comm_s if t.exposed_comm_s is None else t.exposed_comm_s
            parts = {"compute": t.compute_s, "HBM traffic": t.memory_s, "communication": exposed}
            top = max(parts, key=parts.get)
            total = t.no_overlap_s or 1.0
            line = f"{name} is dominated by {top} ({parts[top] / total:.0%} of {t.no_overlap_s * 1e3:.2f} ms)"
            if top == "communication" and t.comm_breakdown:
                c = t.comm_breakdown[0]
                line += (f"; the largest is {c['kind']} over {'x'.join(c['axes']) or 'all'} ({c['link']}) "
                         f"({c['share']:.0%}): keep that axis inside a node or shrink it")
            elif top == "HBM traffic" and name == "Decode":
                line += "; a larger batch per device raises throughput at little TPOT cost (memory-bound)"
            recs.append(line + ".")
    f = a.placement.facts()
    if s.pp > 1 and "pipeline_prefill" in f:
        pre, dec = f["pipeline_prefill"], f["pipeline_decode"]
        recs.append(f"Pipeline: prefill bubble {pre['bubble_fraction']:.0%} with {pre['microbatches']} microbatches; "
                    f"each decode step runs {dec['ticks']} stage passes for {dec['microbatches']} microbatches, "
                    f"re-reading the stage's weights each pass. Fewer stages (pp) help decode.")
    pre = a.cost.analytic.phases.get("prefill")
    if pre is not None and pre.capacity_overhead and pre.useful:
        recs.append(f"Capacity dispatch adds {pre.capacity_overhead / pre.useful:.0%} to the useful prefill "
                    f"FLOPs (padded expert slots; capacity factor "
                    f"{a.cfg.capacity_factor}).")
    routing = a.cost.analytic.dropless
    if routing:
        read = a.cost.analytic.decode_weights_read
        touched = 1 if read is None or read.touched_fraction is None else read.touched_fraction
        recs.append(f"Dropless: under {routing.assumption}, the busiest of the ep={s.ep} expert shards receives "
                    f"{routing.imbalance['prefill']:.2f}x the mean rows in prefill and "
                    f"{routing.imbalance['decode']:.2f}x in decode (expert time on that shard scales with it); "
                    + ("no tokens leave the shard (ep=1)" if s.ep == 1 else
                       f"each shard's receive buffer is sized for the worst case, {1 / routing.row_fraction:.1f}x "
                       "the expected rows (`--dropless-buffer 2` would bound it, dropping and counting overflow)"
                       if routing.buffer is None else
                       f"the receive buffer holds {1 / routing.row_fraction:.1f}x the expected rows "
                       f"(--dropless-buffer {routing.buffer:g}); rows routed past it are dropped and counted")
                    + f". A decode step touches {touched:.0%} of the local experts on average.")
    elif a.cfg.dispatch == Dispatch.CAPACITY and s.ep > 1:
        recs.append("Dropless dispatch (`--dispatch dropless`) computes only the routed rows and never drops a "
                    "token; `moe-jax plan --dispatch both` compares the two.")
    ratio = pre.compiled_over_analytic if pre is not None else None
    if ratio and ratio > 1.2:
        recs.append(f"The compiled prefill does {ratio:.2f}x the model's matmul FLOPs: work repeated on every tp "
                    "rank (routing, dispatch) and pipeline bubble ticks.")
    return recs


def analyze(cfg: ModelConfig, strategy: Strategy, hardware: Hardware, workload: Workload, *,
            backend: str = "auto", **compile_kw) -> Analysis:
    """Compile, cost and time one strategy; validate it with its own numbers.

    backend: ``auto`` (the hardware's own compiler, or the cpu stand-in when it is not here;
    see `moe_jax.costs.backends`), or cpu, tpu, gpu, real.
    """
    from moe_jax.costs.backends import resolve, tpu_topology

    compiler = resolve(hardware, backend)
    if compiler.backend == Backend.TPU and not compile_kw.get("topology"):
        compile_kw["topology"] = tpu_topology(hardware, strategy.num_devices)
    if compiler.backend == Backend.GPU:
        compile_kw.setdefault("gpu_target", compiler.gpu_target)
    cost = analyze_cost(cfg, strategy, workload, compiler.backend, **compile_kw)
    return analysis_of(cfg, strategy, hardware, workload, cost, compiler)


def analysis_of(cfg: ModelConfig, strategy: Strategy, hardware: Hardware, workload: Workload, cost: CostReport,
                compiler) -> Analysis:
    """The analysis of an already compiled `cost` (`analyze_cost`, or the planner's cache) on `hardware`: the
    time model, checks and recommendations, the part that depends on the hardware. `cost` is left unchanged.

    compiler: the `moe_jax.costs.backends.Compiler` that produced `cost`."""
    from dataclasses import replace

    cost = replace(cost, notes=list(cost.notes))
    cost.compiled_for = {**compiler.to_dict(), "target": cost.target, "topology": cost.topology}
    if compiler.reason:
        cost.notes.insert(0, f"{compiler.reason}: the numbers come from XLA:CPU as a stand-in")
    cost.notes[len(cost.notes):] = [c for c in compiler.caveats if c not in cost.notes]
    placement = describe(cfg, strategy, batch=workload.batch, cache_len=workload.cache_len,
                         prompt_len=workload.prompt_len)
    memory = _memory(cost, hardware)
    compiled_all = all(p.fits for p in cost.phases.values())
    fits = compiled_all and memory["total"] is not None and memory["total"] <= hardware.memory_bytes
    prediction = (predict(cost, hardware, workload.batch, workload.gen_len, cfg.dtype)
                  if compiled_all else None)
    a = Analysis(cfg, strategy, hardware, workload, cost, placement, prediction, fits, memory)
    a.fit_confirmed = _fit_confirmed(cost, memory, hardware)
    a.checks = _checks(a)
    a.recommendations = _recommendations(a)
    return a
