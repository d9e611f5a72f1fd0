"""The cost analyzer: loop-corrected counts, memory that adds up, collectives with their axes."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import clean_env, run_tpu_script  # noqa: E402

from moe_jax.config import get_model
from moe_jax.costs.compile import Workload, compile_program
from moe_jax.costs.hlo import group_axes
from moe_jax.costs.walk import analyze_cost, walk
from moe_jax.errors import MoeJaxError
from moe_jax.parallel.mesh import MESH_AXES, Strategy
from moe_jax.programs.placement import describe

LAYERS = 16


def _layer(h, w):
    return jnp.tanh(h @ w), None


def _scanned(x, ws):
    return jax.lax.scan(_layer, x, ws)[0]


def _unrolled(x, ws):
    for i in range(LAYERS):
        x, _ = _layer(x, ws[i])
    return x


def test_scanned_and_unrolled_programs_report_the_same_flops():
    x = jax.ShapeDtypeStruct((64, 256), jnp.float32)
    ws = jax.ShapeDtypeStruct((LAYERS, 256, 256), jnp.float32)
    scanned = jax.jit(_scanned).lower(x, ws).compile()
    unrolled = jax.jit(_unrolled).lower(x, ws).compile()
    mesh = {"dp": 1}
    ours_scanned = walk(scanned.as_text(), mesh)
    ours_unrolled = walk(unrolled.as_text(), mesh)
    xla_unrolled = unrolled.cost_analysis()["flops"]
    expected_matmul = LAYERS * 2 * 64 * 256 * 256
    assert ours_scanned.matmul_flops == ours_unrolled.matmul_flops == expected_matmul
    assert ours_scanned.flops == pytest.approx(xla_unrolled, rel=0.01)
    assert ours_unrolled.flops == pytest.approx(xla_unrolled, rel=0.01)
    assert ours_scanned.transcendentals == LAYERS * 64 * 256
    # the trap: XLA counts the scanned body once
    assert scanned.cost_analysis()["flops"] < xla_unrolled / (LAYERS / 2)
    # and the weights are read once per layer, not all layers per iteration
    assert ours_scanned.hbm_bytes == pytest.approx(ours_unrolled.hbm_bytes, rel=0.25)


@pytest.mark.parametrize("varying", MESH_AXES)
def test_axis_recovery_on_2x2x2_meshes(varying):
    others = [a for a in MESH_AXES if a != varying][:2]
    mesh = {a: (2 if a in (varying, *others) else 1) for a in MESH_AXES}
    shape = tuple(mesh.values())
    import numpy as np

    ids = np.arange(8).reshape(shape)
    axis = MESH_AXES.index(varying)
    groups = np.moveaxis(ids, axis, -1).reshape(-1, 2)
    assert {group_axes(g, mesh) for g in groups} == {(varying,)}


@pytest.fixture(scope="module")
def tiny_reports():
    cfg = get_model("tiny")
    workload = Workload(batch=8, prompt_len=16, gen_len=4)
    return {s: analyze_cost(cfg, Strategy.parse(s), workload) for s in ("EP2-TP2-DP2", "EP2-TP2-PP2", "DP8", "TP8")}


@pytest.mark.parametrize("strategy", ["EP2-TP2-DP2", "EP2-TP2-PP2", "DP8", "TP8"])
def test_memory_components_add_up_and_weights_match_placement(tiny_reports, strategy):
    report = tiny_reports[strategy]
    placement = describe(get_model("tiny"), Strategy.parse(strategy), batch=8, cache_len=20)
    for phase in report.phases.values():
        m = phase.memory
        assert m.arguments == m.weights + m.kv_cache + m.tokens        # exact on the cpu backend
        assert m.peak == m.arguments + m.outputs + m.temporaries - m.aliased
        assert m.weights == pytest.approx(placement.weight_bytes_per_device, rel=0.02)
        assert m.kv_cache == placement.kv_cache_bytes_per_device
        assert "cpu" in m.source
    assert report.phases["decode"].memory.aliased == report.phases["decode"].memory.kv_cache  # donated cache


def test_walk_agrees_with_xla_where_loops_are_counted_once(tiny_reports):
    """The raw walk (each loop once) against XLA's cost analysis, where the two count alike: XLA counts a fusion's
    operand whole, and converts every element of it, where the walk counts what the fusion reads and computes (a
    layer converted then sliced out of the stacked weights, XLA:CPU computing bf16 in f32): restated XLA's way
    (`like_xla`)."""
    from test_walk_xla import like_xla

    for strategy, report in tiny_reports.items():
        for phase in report.phases.values():
            like = like_xla(phase.hlo_text, Strategy.parse(strategy).mesh_shape)
            assert (like["raw_flops"], like["raw_bytes"]) == (phase.walk_uncorrected.flops,
                                                              phase.walk_uncorrected.hbm_bytes)
            assert like["flops"] == pytest.approx(phase.xla_cost["flops"], rel=0.1)
            assert like["bytes"] == pytest.approx(phase.xla_cost["bytes accessed"], rel=0.1)
            assert phase.flops > phase.walk_uncorrected.flops       # layers run in a loop


def test_collectives_carry_axes_phase_and_trip_counts(tiny_reports):
    report = tiny_reports["EP2-TP2-PP2"]
    prefill = {(c["kind"], tuple(c["axes"]), c["phase"]): c for c in report.phases["prefill"].collective_summary()}
    L, pp = get_model("tiny").num_layers, 2
    dispatch = prefill[("all-to-all", ("ep",), "dispatch")]
    combine = prefill[("all-to-all", ("ep",), "combine")]
    assert dispatch["group_size"] == 2 and dispatch["calls"] == combine["calls"]
    # one per layer of the stage, per pipeline tick (microbatches + pp - 1)
    sched = describe(get_model("tiny"), Strategy.parse("EP2-TP2-PP2"), batch=8, prompt_len=16).facts()
    assert dispatch["calls"] == (L // pp) * sched["pipeline_prefill"]["ticks"]
    assert ("collective-permute", ("pp",), "pipeline") in prefill
    assert ("all-reduce", ("tp",), "attention") in prefill
    assert not any(k[0] == "all-to-all" for k in
                   {(c["kind"], tuple(c["axes"])) for c in tiny_reports["TP8"].phases["prefill"].collective_summary()})


def test_analytic_cross_check(tiny_reports):
    dp = tiny_reports["DP8"].analytic
    # without tp or ep every matmul is the model's: compiled and analytic agree closely
    assert dp.prefill.compiled_over_analytic == pytest.approx(1.0, abs=0.02)
    assert dp.decode.compiled_over_analytic == pytest.approx(1.0, abs=0.02)
    assert dp.prefill.capacity_overhead > 0


def test_analytic_and_estimated_prefill_count_the_head_once_per_sequence():
    """The serving prefill's head sees the last position only: useful FLOPs, the planner's estimate and its
    outputs follow (full logits, every position, only where asked)."""
    from moe_jax.costs.analytic import analytic_flops, estimate_phase

    cfg, work = get_model("qwen3-30b-a3b"), Workload(64, 2048, 128)
    D, V, B, S = cfg.d_model, cfg.vocab_size, 64, 2048
    serving, full = analytic_flops(cfg, work, "prefill"), analytic_flops(cfg, work, "prefill", full_logits=True)
    assert full.useful - serving.useful == 2 * D * V * B * (S - 1)
    assert analytic_flops(cfg, work, "decode") == analytic_flops(cfg, work, "decode", full_logits=True)
    s = Strategy.parse("EP2-TP2-PP2")
    p = describe(cfg, s, batch=B, cache_len=work.cache_len)
    est = estimate_phase(cfg, s, work, "prefill", p.weight_bytes_per_device, p.kv_cache_bytes_per_device)
    head = next(o for o in est.ops if o.name == "head")
    local_seqs, local_vocab = B // 2, V // 4                       # batch over ep, vocab over pp x tp
    assert head.matmul_flops == 2 * local_seqs * D * local_vocab and head.count == 1
    assert est.memory.outputs == local_seqs * local_vocab * 4 + p.kv_cache_bytes_per_device
    hand_back = [c for c in est.collectives if c.kind == "all-reduce" and c.axes == ["pp"]]
    assert [c.bytes_per_call for c in hand_back] == [local_seqs * D * cfg.dtype_bytes]


def test_report_is_json(tiny_reports):
    data = json.loads(tiny_reports["EP2-TP2-PP2"].to_json())
    assert data["workload"]["cache_len"] == 20 and data["backend"] == "cpu"
    assert data["phases"]["decode"]["memory"]["peak"] > 0
    assert data["phases"]["prefill"]["collective_summary"]


def test_bad_backend_and_too_few_devices():
    with pytest.raises(MoeJaxError, match="unknown backend 'fpga'; valid: cpu, tpu, gpu, real"):
        compile_program(get_model("tiny"), Strategy(dp=8), Workload(8, 4, 4), backend="fpga")
    with pytest.raises(MoeJaxError, match="needs 16 fake CPU devices but this process has 8"):
        compile_program(get_model("tiny"), Strategy(ep=8, tp=2), Workload(8, 4, 4))




SEED_SCRIPT = """
import json, resource
from moe_jax.parallel.devices import request_cpu_devices
request_cpu_devices(1024)
from moe_jax.costs.compile import Workload
from moe_jax.config import get_model
from moe_jax.costs.walk import analyze_cost
from moe_jax.parallel.mesh import Strategy
r = analyze_cost(get_model("seed-30b"), Strategy.parse("EP64-TP8-PP2-DP1"), Workload(128, 2048, 256))
out = {n: {"weights": p.memory.weights, "kv": p.memory.kv_cache, "args": p.memory.arguments,
           "flops": p.flops, "collectives": p.collective_summary()} for n, p in r.phases.items()}
out["placement"] = r.analytic.weights_per_device_placement
out["rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print(json.dumps(out))
"""


def test_seed_scenario_compiles_on_1024_cpu_devices():
    done = subprocess.run([sys.executable, "-c", SEED_SCRIPT], capture_output=True, text=True, timeout=900,
                          env=clean_env())
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(done.stdout.strip().splitlines()[-1])
    for phase in ("prefill", "decode"):
        p = data[phase]
        assert p["weights"] == data["placement"]                      # 177.6 MB per device
        assert p["kv"] == 2 * 8 * 2 * 2304 * 1 * 128 * 2              # [L/pp, B/(dp*ep), T, K/tp, Dh]
        kinds = {(c["kind"], tuple(c["axes"])) for c in p["collectives"]}
        assert ("all-to-all", ("ep",)) in kinds and ("collective-permute", ("pp",)) in kinds
        assert not any(k == "all-gather" and "pp" in axes for k, axes in kinds)
    assert data["rss_gb"] < 12


TPU_SCRIPT = """
import json
from moe_jax.costs.compile import Workload
from moe_jax.config import get_model
from moe_jax.costs.walk import analyze_cost
from moe_jax.parallel.mesh import Strategy
fits = analyze_cost(get_model("seed-30b"), Strategy.parse("EP8-TP2-PP2-DP1"), Workload(32, 512, 64),
                    backend="tpu", topology="v5p:2x4x4")
big = analyze_cost(get_model("qwen3-235b-a22b"), Strategy.parse("EP4"), Workload(4, 128, 16),
                   backend="tpu", topology="v5e:2x2")
print(json.dumps({"target": fits.target,
                  "fits": {n: [p.fits, p.memory.weights, p.memory.arguments] for n, p in fits.phases.items()},
                  "placement": fits.analytic.weights_per_device_placement,
                  "big": {n: [p.fits, p.error] for n, p in big.phases.items()}}))
"""


def test_tpu_backend_when_libtpu_is_installed():
    lines = run_tpu_script(TPU_SCRIPT)
    data = json.loads(lines[-1])
    assert data["target"].startswith("TPU v5")
    for fits, weights, arguments in data["fits"].values():
        assert fits and weights == data["placement"] and arguments >= weights
    for fits, error in data["big"].values():                        # 470 GB of weights on 4 x 16 GB
        assert not fits and ("RESOURCE_EXHAUSTED" in error or "memory" in error.lower())
