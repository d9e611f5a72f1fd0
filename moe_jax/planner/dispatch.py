"""The best strategy compiled with each expert dispatch method, side by side."""

from __future__ import annotations

from dataclasses import replace

from moe_jax.names import Dispatch
from moe_jax.planner.result import PlanResult
from moe_jax.planner.workers import Progress, compile_all

DISPATCH_METHODS = (Dispatch.CAPACITY, Dispatch.DROPLESS)


def compare_dispatch(result: PlanResult, *, progress: Progress | None = None) -> dict | None:
    """Compile the best strategy of `result` with every dispatch method; sets and returns the comparison.

    The search itself ran with its model's dispatch; this answers "what would the other method do
    on the same strategy", from compiled programs on both sides (same hardware, workload, backend and cache).
    """
    if not result.best:
        return None
    spec = result.spec
    methods = {}
    for method in DISPATCH_METHODS:
        if method == spec.cfg.dispatch:
            a = result.compiled[result.best]["analysis"]
        else:
            other = replace(spec, cfg=spec.cfg.replace(dispatch=method), workers=1)
            a = compile_all(other, [result.best], progress=progress)[0][result.best]["analysis"]
        methods[method] = {"fits": a["fits"], "ttft_s": a["ttft_s"], "tpot_s": a["tpot_s"],
                           "throughput_tok_s": a["throughput_tok_s"], "memory_bytes": a["memory"]["total"],
                           "prefill_matmul_flops": a["phases"].get("prefill", {}).get("matmul_flops")}
    result.dispatch_comparison = {"strategy": result.best, "searched_with": spec.cfg.dispatch, "methods": methods,
                                  "dropless_buffer": spec.cfg.dropless_buffer}
    return result.dispatch_comparison
