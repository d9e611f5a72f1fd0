"""`moe-jax analyze` on the seed scenario: each mistake of docs/seed-errors.md made impossible."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moe_jax.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _cli():
    script = Path(sys.executable).with_name("moe-jax")
    return [str(script)] if script.exists() else [sys.executable, "-m", "moe_jax.cli"]


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    """The seed scenario analysed once, in a fresh process with 1024 fake devices."""
    d = tmp_path_factory.mktemp("seed")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    mesh = str(ROOT / "meshes/ep64-tp8-pp2-dp1.toml")
    done = subprocess.run(_cli() + ["analyze", "--model", "seed-30b", "--mesh", mesh,
                                    "--hardware", "seed-gpu", "--batch", "128", "--prompt-len", "2048",
                                    "--gen-len", "256", "--json", str(d / "seed.json"), "--markdown",
                                    str(d / "seed.md"), "--trace", str(d / "seed.trace.json")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((d / "seed.json").read_text())
    return data, (d / "seed.md").read_text(), done.stdout, d


def _check(data, name):
    return next(c for c in data["checks"] if c["name"] == name)


def test_schema(seed):
    data = seed[0]
    assert data["model"]["name"] == "seed-30b" and data["model"]["params_total"] > 29e9
    assert data["strategy"] == {"name": "EP64-TP8-PP2-DP1", "ep": 64, "tp": 8, "pp": 2, "dp": 1, "devices": 1024}
    assert {"name", "memory_bytes", "peak_flops", "hbm_bandwidth"} <= set(data["hardware"])
    assert data["workload"] == {"batch": 128, "prompt_len": 2048, "gen_len": 256}
    assert data["backend"] == "gpu" and data["fits"] is True          # seed-gpu compiles for its H100 target
    assert {"weights", "kv_cache", "activations", "total", "capacity"} <= set(data["memory"])
    for phase in ("prefill", "decode"):
        p = data["phases"][phase]
        assert p["flops"] > 0 and p["hbm_bytes"] > 0
        assert {"compute", "memory", "comm", "total"} <= set(p["time"])
        assert all({"kind", "axes", "group_size", "bytes", "count"} <= set(c) for c in p["collectives"])
    for key in ("ttft_s", "tpot_s", "throughput_tok_s", "mfu", "mbu"):
        assert data[key] > 0
    assert all({"name", "passed", "detail"} == set(c) for c in data["checks"])
    assert (seed[3] / "seed.memory.png").stat().st_size > 1000


def test_1_memory_check_is_per_device_and_passes_on_its_numbers(seed):
    data = seed[0]
    c = _check(data, "memory_fits")
    per_device, capacity = data["memory"]["total"], data["memory"]["capacity"]
    assert capacity == 64e9 and per_device < 5e9              # per device, not the whole model's 76 GB
    assert c["passed"] == (per_device <= capacity)
    assert f"{per_device / 1e9:.2f} GB" in c["detail"] and "64.00 GB" in c["detail"]


def test_2_per_device_memory_from_the_compiled_program_and_waste_is_named(seed):
    data = seed[0]
    naive = 59.86e9 / 1024                                     # the seed's "0.07 GB"
    assert data["memory"]["weights"] > 3 * naive               # replicated attention, router, embeddings
    assert data["memory"]["weights"] == data["analytic"]["weights_per_device_placement"]
    well_used = _check(data, "memory_well_used")
    assert not well_used["passed"]                             # ~1.5% use is waste, not excellence
    assert re.search(r"would fit in \d+ devices", well_used["detail"])
    assert any("Over-provisioned" in r for r in data["recommendations"])


def test_3_tpot_at_or_above_the_floor_with_its_parts(seed):
    data = seed[0]
    t = data["phases"]["decode"]["time"]
    floor = (data["memory"]["weights"] + data["memory"]["kv_cache"]) / 1.8e12
    assert t["floor"] == pytest.approx(floor, rel=1e-6)
    assert data["tpot_s"] >= floor > 0
    assert t["total"] == pytest.approx(data["tpot_s"])
    assert t["compute"] + t["memory"] + t["overhead"] + t["comm"] + t["call"] == pytest.approx(t["no_overlap"])
    assert _check(data, "tpot_at_or_above_floor")["passed"]


def test_the_quoted_time_is_the_compiled_schedule_between_its_bounds(seed):
    data, md = seed[0], seed[1]
    for phase in ("prefill", "decode"):
        t = data["phases"][phase]["time"]
        quoted = t["scheduled"] + t["call"]                  # the host's cost of a call is in every bound
        assert t["full_overlap"] * (1 - 1e-9) <= quoted <= t["no_overlap"] * (1 + 1e-9)
        assert 0 <= t["exposed_comm"] <= t["comm"] * (1 + 1e-9)
        assert t["total"] == pytest.approx(max(quoted, t["floor"]))
        assert t["call"] == (1.1e-3 if phase == "decode" else 0.0)   # seed-gpu: XLA:GPU's measured step cost
    hw = data["hardware"]
    assert (hw["op_floor_s"], hw["decode_step_overhead_s"], hw["vector_efficiency"]) == (1.3e-6, 1.1e-3, 0.0)
    assert "over the compiled schedule" in md and "no-overlap bound" in md


def test_trace_holds_each_phase_as_a_process_with_its_streams(seed):
    data, d = seed[0], seed[3]
    trace = json.loads((d / "seed.trace.json").read_text())
    events = trace["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert sorted(name.split(":")[0] for name in processes.values()) == ["decode", "prefill"]
    tracks = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"compute", "collectives"} <= tracks
    decode = next(pid for pid, name in processes.items() if name.startswith("decode"))
    spans = [e for e in events if e["ph"] == "X" and e["pid"] == decode]
    assert spans and all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    end = max(e["ts"] + e["dur"] for e in spans) * 1e-6      # µs: the last op ends when the step does
    assert end == pytest.approx(data["phases"]["decode"]["time"]["scheduled"], rel=1e-6)
    assert {e["cat"] for e in spans} & {"attention", "experts", "dispatch"}


def test_4_workload_stated_and_numbers_from_the_program(seed):
    data, md = seed[0], seed[1]
    assert "batch 128 sequences, prompt 2048 tokens, 256 generated" in md
    pre = data["phases"]["prefill"]
    assert data["ttft_s"] >= pre["flops"] / 400e12             # at least the compiled FLOPs at peak
    assert data["throughput_tok_s"] == pytest.approx(128 / data["tpot_s"])
    assert data["ttft_s"] < 40.96 and data["throughput_tok_s"] > 3.12   # the seed's numbers were absurd


def test_5_ratios_name_their_baseline(seed):
    md = seed[1]
    assert "Optimization" not in md
    for line in md.splitlines():
        if line.startswith("| MFU") or line.startswith("| MBU"):
            assert "peak" in line and "/" in line               # numerator / (denominator) shown
    assert "ratio" in md and "2 x layer parameters x tokens + the output head once per sequence" in md


def test_6_exact_shard_per_device(seed):
    data, md = seed[0], seed[1]
    assert data["placement"]["expert_ffn_columns_per_device"] == 288
    assert "1/64 experts x 288/2304 FFN columns" in md
    assert "4 query heads, 1 of 8 KV heads" in md


def test_7_validation_checks_what_can_fail_with_values(seed):
    data = seed[0]
    names = {c["name"] for c in data["checks"]}
    assert {"experts_split_evenly", "heads_split_evenly", "layers_split_evenly", "batch_split_evenly"} <= names
    assert "64 experts / ep=64" in _check(data, "experts_split_evenly")["detail"]
    assert not any("parts match" in c["detail"] for c in data["checks"])


def test_8_sequences_per_replica_and_per_device(seed):
    data, md = seed[0], seed[1]
    assert data["placement"]["sequences_per_replica"] == 128 and data["placement"]["sequences_per_device"] == 2
    assert "| sequences per device (attention) | 2 |" in md


def test_9_communication_per_collective_kind_and_axis_as_share(seed):
    data, md = seed[0], seed[1]
    breakdown = data["phases"]["decode"]["time"]["comm_breakdown"]
    kinds = {(c["kind"], tuple(c["axes"])) for c in breakdown}
    assert ("all-to-all", ("ep",)) in kinds and ("collective-permute", ("pp",)) in kinds
    assert all(0 <= c["share"] <= 1 for c in breakdown)
    assert "share of step" in md


def test_10_no_claim_of_readiness_or_optimality(seed):
    md = seed[1]
    assert "ready for deployment" not in md.lower() and "optimal" not in md.lower()
    assert "not compared with a search" in md


def test_summary_printed(seed):
    assert "TTFT" in seed[2] and "TPOT" in seed[2] and "fits" in seed[2]


def test_not_fitting_strategy_exits_3_with_both_numbers(tmp_path, capsys):
    out = tmp_path / "one.json"
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--model", "seed-30b", "--mesh", "EP1-TP1-PP1-DP1", "--hardware", "seed-gpu",
              "--json", str(out)])
    assert e.value.code == 3
    data = json.loads(out.read_text())
    assert data["fits"] is False
    c = _check(data, "memory_fits")
    assert not c["passed"] and "64.00 GB" in c["detail"]
    assert data["memory"]["weights"] == pytest.approx(59.86e9, rel=0.01)
    assert data["memory"]["kv_cache"] == pytest.approx(19.33e9, rel=0.01)
    assert "does not fit" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--model", "gpt-9"], "unknown model 'gpt-9'"),
    (["--hardware", "h900"], "unknown hardware 'h900'"),
    (["--hardware", "missing.toml"], "cannot read hardware file 'missing.toml'"),
    (["--mesh", "missing.toml"], "cannot read strategy file 'missing.toml'"),
    (["--mesh", "EP3-TP8-PP2"], "ep=3 does not divide 64 experts"),
    (["--json", "/nonexistent-dir/x.json"], "directory '/nonexistent-dir' does not exist"),
    (["--backend", "quantum"], "Invalid value for '--backend'"),
    (["--trace", "/nonexistent-dir/t.json"], "--trace '/nonexistent-dir/t.json': directory '/nonexistent-dir'"),
    (["--json", "same.json", "--trace", "same.json"], "--trace and --json both write 'same.json'"),
])
def test_bad_input_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["analyze", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_malformed_hardware_toml_exit_2(tmp_path, capsys):
    bad = tmp_path / "hw.toml"
    bad.write_text("name = 'x'\nmemory_bytes = [\n")
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--hardware", str(bad)])
    assert e.value.code == 2 and "not valid TOML" in capsys.readouterr().err


def test_hardware_command(capsys):
    main(["hardware"])
    text = capsys.readouterr().out
    assert "seed-gpu" in text and "tpu-v5p" in text and "assumed" in text
    main(["hardware", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= {"h200", "mi300x"}
