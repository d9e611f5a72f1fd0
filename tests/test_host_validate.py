"""bench/host_validate.py: the calibrated time model against measurements on this host (its quick form)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("host_validate", ROOT / "bench" / "host_validate.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "bench"))
    spec.loader.exec_module(module)
    return module


def _row(**kw):
    terms = {"compute_s": 1e-3, "memory_s": 3e-3, "overhead_s": 0.0, "comm_s": 0.0, "call_s": 1e-4,
             "scheduled_s": 4e-3, "floor_s": 0.0, "total_s": 4.1e-3}
    row = {"model": "m", "batch": 1, "prompt_len": 8, "ttft": 0.01, "tpot": 0.004, "ttft_pred": 0.012,
           "tpot_pred": 0.003, "terms": {"prefill": terms, "decode": terms}}
    row.update(kw)
    return row


def test_table_errors_and_the_term_that_decides():
    bench = _bench()
    text, summary = bench.table([_row(), _row(ttft_pred=0.009, tpot_pred=0.004), _row(error="over 1800 s")])
    assert "| +20% |" in text and "| -25% |" in text and "memory 73%" in text and "failed: over 1800 s" in text
    assert summary["ttft"] == {"median": pytest.approx(0.15), "worst": pytest.approx(0.2)}
    assert summary["tpot"] == {"median": pytest.approx(0.125), "worst": pytest.approx(0.25)}


def test_category_table_names_ops_the_trace_did_not_reach():
    bench = _bench()
    cats = [{"category": "matmul", "ops": 3, "measured_s": 2e-3, "predicted_s": 1e-3, "bytes": 1, "flops": 1},
            {"category": "small op", "ops": 2, "measured_s": 0.0, "predicted_s": 1e-6, "bytes": 1, "flops": 1}]
    text = bench.category_table([_row(by_category={"decode": cats})])
    assert "| decode | matmul | 3 | 2.000 ms | 1.000 ms | 0.50 |" in text and "not traced" in text


def test_quick_run_calibrates_measures_and_predicts(capsys):
    summary = _bench().main(["--quick", "--no-append", "--steps", "4"])
    out = capsys.readouterr().out
    assert set(summary) == {"ttft", "tpot"}
    for metric in summary.values():
        assert 0 <= metric["median"] <= metric["worst"] < 100           # finite: both sides were numbers
    assert out.count("| tiny |") == 2 and "TTFT median |error|" in out


def test_ops_are_joined_with_their_prediction_and_summed_by_category():
    from moe_jax.costs.types import OpCost
    from moe_jax.runtime.oprofile import category, compare_ops

    ops = [OpCost("ynn_fusion.1", "fusion", "experts", 2e9, 2e9, 0, 1 << 20, 4),
           OpCost("wrapped_convert", "fusion", "other", 0, 0, 0, 1 << 22, 1),
           OpCost("dynamic-update-slice_fusion", "fusion", "attention", 0, 0, 0, 1 << 12, 4),
           OpCost("transpose_copy_fusion", "fusion", "other", 0, 0, 0, 1 << 22, 2),
           OpCost("add.1", "add", "other", 64, 0, 0, 512, 8),
           OpCost("all-reduce-start", "all-reduce-start", "moe", 0, 0, 0, 1 << 20, 4, collective=True)]
    assert [category(o) for o in ops[:5]] == ["matmul", "dtype conversion", "in-place update", "copy / transpose",
                                              "small op"]
    predicted = {"ynn_fusion.1": 1e-3, "wrapped_convert": 2e-3, "transpose_copy_fusion": 5e-4, "add.1": 1e-6}
    measured = {"ynn_fusion.1": 8e-3, "wrapped_convert": 1e-3, "transpose_copy_fusion": 3e-3}   # per call, traced
    rows = {c.category: c for c in compare_ops(ops, predicted, measured)}
    assert sum(c.ops for c in rows.values()) == 5                     # the collective is not an op here
    assert rows["matmul"].predicted_s == pytest.approx(4e-3) and rows["matmul"].measured_s == 8e-3   # x 4 runs
    assert rows["copy / transpose"].predicted_s == pytest.approx(1e-3)
    assert rows["in-place update"].measured_s == 0.0 and rows["small op"].predicted_s == pytest.approx(8e-6)
    assert list(rows)[0] == "matmul"                                  # largest first


def test_gpu_kernels_join_their_ops_by_name(tmp_path):
    """A GPU trace names kernels: XLA's own after the fusion they run (``.N`` written ``_N``), inside a CUDA graph
    whose ``hlo_op`` is the graph's. A cuBLAS kernel in a graph joins the matmul category, a slice copy's
    memcpy the copies (where its dynamic-slice fusion sits); anything else is its own row."""
    import gzip
    import json

    from moe_jax.costs.types import OpCost
    from moe_jax.runtime.oprofile import UNJOINED, compare_ops, device_kernel_seconds

    def kernel(name, dur, op="command_buffer_7", module="jit__decode"):
        return {"ph": "X", "pid": 1, "tid": 14, "ts": 0, "dur": dur, "name": name,
                "args": {"hlo_module": module, "hlo_op": op}}

    events = [kernel("input_reduce_fusion_2", 800.0), kernel("input_reduce_fusion_2", 820.0),
              kernel("gemm_fusion_dot_22", 60.0),                          # XLA's own Triton gemm
              kernel("nvjet_sm90_tss_128x64", 100.0), kernel("memcpy128", 300.0), kernel("mystery", 5.0),
              kernel("custom_call_kernel", 40.0, op="custom-call.3"),      # outside a graph: its own op
              kernel("loop_add_fusion", 9.0, module="jit__prefill")]       # another program
    trace = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    measured = device_kernel_seconds(str(trace), "jit__decode", calls=2)
    assert measured["input_reduce_fusion.2"] == pytest.approx(810e-6)       # per call of 2
    assert measured["custom-call.3"] == pytest.approx(20e-6) and "loop_add_fusion" not in measured
    assert measured["gemm_fusion_dot.22"] == pytest.approx(30e-6)
    ops = [OpCost("input_reduce_fusion.2", "fusion", "experts", 4e9, 0, 0, 1 << 30, 1),
           OpCost("custom-call.3", "custom-call", "attention", 2e9, 2e9, 0, 1 << 20, 1),
           OpCost("loop_dynamic_slice_fusion.1", "fusion", "other", 0, 0, 0, 1 << 30, 1)]
    ops.append(OpCost("gemm_fusion_dot.22", "fusion", "experts", 2e9, 2e9, 0, 1 << 20, 1))
    rows = {c.category: c for c in compare_ops(ops, {o.name: 1e-4 for o in ops}, measured, unjoined=True)}
    assert rows["matmul"].measured_s == pytest.approx(20e-6 + 30e-6 + 50e-6)   # two joined ops, the cuBLAS kernel
    assert rows["matmul"].ops == 2
    assert rows["copy / transpose"].measured_s == pytest.approx(150e-6) and rows["copy / transpose"].ops == 1
    assert rows[UNJOINED].measured_s == pytest.approx(2.5e-6) and rows[UNJOINED].ops == 1
    assert UNJOINED not in {c.category for c in compare_ops(ops, {}, measured)}   # a host trace: no such row
