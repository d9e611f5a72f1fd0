"""moe-jax calibrate: the calibration data (curves, collective fits, lookups, TOML validation) and the
command end to end on emulated CPU devices."""

import json
import math
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import clean_env

from moe_jax.cli import main
from moe_jax.errors import MoeJaxError
from moe_jax.hardware.calibration import (
    MAX_BANDWIDTH,
    Calibration,
    CollectiveFit,
    Curve,
    write_hardware_toml,
)
from moe_jax.hardware.presets import get_hardware

# --- Curve --------------------------------------------------------------------------------


def test_curve_interpolates_log_log_and_extrapolates():
    c = Curve(((1e3, 1e-5), (1e6, 1e-3)))
    assert c.seconds(10) == 1e-5 and c.seconds(1e3) == 1e-5          # below the smallest: the fixed-cost floor
    assert c.seconds(1e6) == pytest.approx(1e-3)
    assert c.seconds(math.sqrt(1e9)) == pytest.approx(1e-4)           # half way in log size: half way in log time
    assert c.seconds(4e6) == pytest.approx(4e-3)                      # above: the largest point's throughput held
    assert c.throughput(4e6) == pytest.approx(1e9) and c.throughput(1e3) == pytest.approx(1e8)


def test_curve_fit_sorts_keeps_fastest_and_is_monotone():
    c = Curve.fit([(1e6, 3e-4), (1e3, 2e-5), (1e4, 1e-5), (1e3, 1e-5), (1e5, 5e-4)])
    # sorted; the faster of two samples at 1e3; the dip at 1e6 (3e-4 < 5e-4 at 1e5) lifted by the running max
    assert c.points == ((1e3, 1e-5), (1e4, 1e-5), (1e5, 5e-4), (1e6, 5e-4))
    sizes = [10 ** (k / 10) for k in range(0, 90)]
    times = [c.seconds(s) for s in sizes]
    assert all(b >= a for a, b in zip(times, times[1:], strict=False))


def test_curve_rejects_bad_points():
    with pytest.raises(MoeJaxError, match="must be larger than the size before"):
        Curve(((2.0, 1.0), (1.0, 2.0)))
    with pytest.raises(MoeJaxError, match="must not decrease"):
        Curve(((1.0, 2.0), (2.0, 1.0)))
    with pytest.raises(MoeJaxError, match="non-empty"):
        Curve(())


# --- CollectiveFit ------------------------------------------------------------------------


def test_collective_fit_recovers_latency_and_bandwidth():
    lat, bw = 20e-6, 10e9
    samples = [(b, lat + b / bw) for b in (1e3, 1e4, 1e5, 1e6, 1e7, 1e8)]
    fit = CollectiveFit.fit("all-reduce", "node", 4, samples)
    assert fit.latency_s == pytest.approx(lat, rel=1e-9) and fit.bandwidth == pytest.approx(bw, rel=1e-9)
    assert fit.seconds(5e6) == pytest.approx(lat + 5e6 / bw)
    assert fit.samples == tuple(samples) and (fit.kind, fit.tier, fit.group_size) == ("all-reduce", "node", 4)


def test_collective_fit_keeps_latency_non_negative_and_bandwidth_finite():
    # times proportional to size with a slight negative intercept: refitted through the origin
    fit = CollectiveFit.fit("all-gather", "node", 2, [(1e3, 0.9e-6), (1e6, 1e-3), (1e7, 1e-2)])
    assert fit.latency_s == 0.0 and fit.bandwidth == pytest.approx(1e9, rel=0.05)
    # every size latency-bound (flat or decreasing time): the latency is the mean, the bandwidth the upper bound
    flat = CollectiveFit.fit("all-to-all", "node", 2, [(1e3, 5e-5), (1e5, 4e-5)])
    assert flat.bandwidth == MAX_BANDWIDTH and 4e-5 < flat.latency_s < 5e-5


def _calibration(**kw):
    fits = tuple(CollectiveFit("all-to-all", "node", g, 1e-5 * g, 1e10 / g, ((1e3, 2e-5),)) for g in (2, 8))
    fields = dict(matmul={"bfloat16": Curve(((1e6, 1e-5), (1e9, 2e-3))), "float32": Curve(((1e6, 2e-5), (1e9, 8e-3)))},
                  memory=Curve(((1e4, 2e-6), (1e8, 1e-3))), read_reduce=Curve(((1e4, 3e-6), (1e8, 6e-4))),
                  op_overhead_s=2e-6, collectives=fits, meta={"date": "2026-01-01T00:00:00+00:00", "jax_version": "x"},
                  call_s=3e-5, call_per_argument_s=1e-6, kinds={"convert": Curve(((1e4, 1e-5), (1e8, 1e-2)))},
                  transcendental=Curve(((1e3, 1e-6), (1e6, 1e-3))),
                  fresh_buffer=Curve(((6.4e4, 1e-6), (1.6e7, 1e-5), (6.4e7, 2.4e-2))))
    fields.update(kw)
    return Calibration(**fields)


def test_collective_lookup_exact_then_nearest_group():
    cal = _calibration()
    assert cal.collective("all-to-all", "node", 8).group_size == 8
    assert cal.collective("all-to-all", "node", 3).group_size == 2          # nearest by ratio: 3/2 < 8/3
    assert cal.collective("all-to-all", "node", 4).group_size == 8          # a tie (x2 either way): the larger
    assert cal.collective("all-to-all", "node", 64).group_size == 8
    assert cal.collective("all-to-all", "network", 8) is None
    assert cal.collective("all-reduce", "node", 8) is None


def test_matmul_and_memory_lookups():
    cal = _calibration()
    assert cal.matmul_seconds(1e9, "float32") == pytest.approx(8e-3)
    assert cal.matmul_seconds(1e9, "float16") == pytest.approx(2e-3)       # same width as bfloat16
    only32 = _calibration(matmul={"float32": Curve(((1e6, 2e-5),))})
    assert only32.matmul_seconds(1e6, "bfloat16") == pytest.approx(2e-5)   # the nearest dtype measured
    assert cal.memory_seconds(2e8) == pytest.approx(2e-3)
    assert cal.call_seconds(100) == pytest.approx(3e-5 + 100 * 1e-6)
    assert cal.kind_seconds("convert", 1e8) == pytest.approx(1e-2)           # its own, slower curve
    assert cal.kind_seconds("transpose", 1e8) == pytest.approx(cal.memory_seconds(1e8))   # not measured: a copy
    assert cal.fresh_seconds(6.4e7) == pytest.approx(2.4e-2) and cal.fresh_seconds(1.28e8) == pytest.approx(4.8e-2)
    assert cal.fresh_seconds(0) == 0.0 and _calibration(fresh_buffer=None).fresh_seconds(1e9) == 0.0
    assert hash(cal) == hash(_calibration())


# --- TOML ---------------------------------------------------------------------------------


def test_toml_table_round_trip():
    cal = _calibration()
    assert Calibration.from_toml_table(cal.to_toml_table(), "f") == cal


def _mutate(path, value):
    table = _calibration().to_toml_table()
    *parents, last = path
    node = table
    for p in parents:
        node = node[p]
    if value is KeyError:
        node[last + "x"] = node.pop(last)            # a misspelt key
    else:
        node[last] = value
    return table


@pytest.mark.parametrize("path,value,message", [
    (("memory", 0, 1), -1.0, "memory[0] seconds=-1.0 must be a finite number > 0"),
    (("memory",), [[1e8, 1e-3], [1e4, 2e-3]], "memory[1] size 10000 must be larger than the size before it"),
    (("memory",), KeyError, "unknown key 'memoryx'"),
    (("op_overhead_s",), 0, "op_overhead_s=0 must be a finite number > 0"),
    (("call_per_argument_s",), -1e-6, "call_per_argument_s=-1e-06 must be a finite number >= 0"),
    (("kinds", "gather"), [[1, 1]], "kinds.gather: unknown op kind"),
    (("fresh_buffer", 1, 1), -1.0, "fresh_buffer[1] seconds=-1.0 must be a finite number > 0"),
    (("matmul", "bf16"), [[1, 1]], "matmul.bf16: unknown dtype"),
    (("collective", 0, "kind"), "all_to_all", "kind='all_to_all' (did you mean 'all-to-all'?)"),
    (("collective", 0, "tier"), "rack", "tier='rack'; valid: node, network"),
    (("collective", 0, "group_size"), 1, "group_size=1 must be a whole number from 2"),
    (("collective", 0, "bandwidth"), math.inf, "bandwidth=inf must be a finite number"),
    (("collective", 0, "samples"), [[1e3]], "samples[0]=[1000.0] must be a [bytes, seconds] pair"),
    (("collective", 1, "group_size"), 2, "a second fit of all-to-all on the node tier over 2 devices"),
    (("meta", "date"), {"a": 1}, "meta.date="),
])
def test_toml_table_errors_name_the_bad_value(path, value, message):
    with pytest.raises(MoeJaxError) as e:
        Calibration.from_toml_table(_mutate(path, value), "hardware file 'x.toml'")
    assert "hardware file 'x.toml' [calibration]" in str(e.value) and message in str(e.value)


def test_hardware_toml_round_trip_and_no_overwrite(tmp_path):
    hw = replace(get_hardware("h100"), name="h100-calibrated", calibration=_calibration())
    path = tmp_path / "hw.toml"
    write_hardware_toml(hw, hw.calibration, path)
    loaded = get_hardware(path)
    assert loaded == hw
    json.dumps(loaded.to_dict())                                           # analyze's JSON still serialises
    before = path.read_bytes()
    with pytest.raises(MoeJaxError, match="exists"):
        write_hardware_toml(hw, hw.calibration, path)
    assert path.read_bytes() == before
    write_hardware_toml(replace(hw, name="again"), hw.calibration, path, overwrite=True)
    assert get_hardware(path).name == "again"


def test_calibration_beside_a_hardware_table(tmp_path):
    import tomllib

    import tomli_w

    flat = tmp_path / "flat.toml"
    write_hardware_toml(get_hardware("h200"), _calibration(), flat)
    data = tomllib.loads(flat.read_text())
    cal = data.pop("calibration")
    nested = tmp_path / "nested.toml"
    nested.write_text(tomli_w.dumps({"hardware": data, "calibration": cal}))
    assert get_hardware(nested).calibration == _calibration()
    both = tmp_path / "both.toml"
    both.write_text(tomli_w.dumps({"hardware": {**data, "calibration": cal}, "calibration": cal}))
    with pytest.raises(MoeJaxError, match="two calibrations"):
        get_hardware(both)


# --- the command --------------------------------------------------------------------------


def _command():
    script = Path(sys.executable).with_name("moe-jax")
    return [str(script)] if script.exists() else [sys.executable, "-m", "moe_jax.cli"]


def _cli(*argv):
    return subprocess.run(_command() + list(argv), capture_output=True, text=True, env=clean_env(), timeout=300)


def test_time_per_iteration_takes_off_the_cost_of_a_loop_iteration(monkeypatch):
    """A loop's slope counts the loop's own iteration (XLA:GPU runs loops from the host: ~10 us an iteration on
    an H200, which made every small op of a GPU calibration cost ~11 us): `Plan.loop_s` is taken off it."""
    import jax.numpy as jnp

    from moe_jax.runtime import calibrate as cal

    medians = iter([1e-3, 2e-3 + 5e-5, 10e-3 + 5e-5])      # k = 1, then k1 = 2 and k2 = 10: 1 ms an iteration
    monkeypatch.setattr(cal, "time_compiled", lambda fn, args, plan, reps=None: cal.Sample(next(medians), 0.0, 1))
    plan = replace(cal.make_plan("cpu", quick=True), target_s=0.01, loop_s=4e-4)
    per, samples, ks = cal.time_per_iteration(lambda c: c + 1.0, jnp.float32(0), (), plan)
    assert ks == (2, 10) and len(samples) == 2
    assert per == pytest.approx(1e-3 - 4e-4)


def test_a_sample_timed_as_one_call_is_taken_without_its_fresh_buffers(monkeypatch):
    """An op longer than the sample budget is timed as one call of a one-iteration loop: what that call pays for
    the buffers it allocates (page faults on XLA:CPU) is the fresh-buffer term's, not the op's."""
    import jax.numpy as jnp

    from moe_jax.runtime import calibrate as cal

    monkeypatch.setattr(cal, "time_compiled", lambda fn, args, plan, reps=None: cal.Sample(1.0, 1.0, 1))
    monkeypatch.setattr(cal, "fresh_bytes", lambda compiled: (64 << 20, 16 << 20))
    fresh = Curve(((16 << 20, 1e-3), (64 << 20, 0.1)))
    plan = replace(cal.make_plan("cpu", quick=True), target_s=0.5, fresh_buffer=fresh)
    per, samples, ks = cal.time_per_iteration(lambda c: c + 1.0, jnp.float32(0), (), plan)
    assert ks == (1, 1) and per == pytest.approx(1.0 - 0.1 - 1e-3)
    assert cal.time_per_iteration(lambda c: c + 1.0, jnp.float32(0), (), replace(plan, fresh_buffer=None))[0] == 1.0


def test_the_conversion_is_timed_inside_the_loop():
    """XLA:CPU converts a bf16 array a loop reads to f32 whole, ahead of the loop: a conversion sample over a
    bf16 pool timed slices of that f32 copy and no conversion (402 MB "converted" at 2.3 GB/s). The pool holds
    the bits as uint16, so the loop carries no f32 copy of it and each iteration converts its pick."""
    import jax
    import jax.numpy as jnp

    from moe_jax.runtime import calibrate as cal

    pool = jnp.full((64, 4096), 0x3F80, jnp.uint16)                # bf16 1.0
    carry = (jnp.int32(0), jnp.zeros((4096,), jnp.float32))
    looped = jax.jit(lambda c, p: jax.lax.fori_loop(0, 3, lambda i, x: cal._convert_step(x, p), c))
    compiled = looped.lower(carry, pool).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < pool.size * 4 // 4      # no f32 copy of the pool
    assert float(looped(carry, pool)[1][0]) == 3.0                                # 1.0 converted, three times


def test_fresh_buffers_are_measured_by_size_with_their_page_faults():
    from moe_jax.runtime import calibrate as cal

    plan = replace(cal.make_plan("cpu", quick=True), min_reps=2)
    curve, raw = cal.measure_fresh_buffers(plan)
    sizes = [b for b in plan.memory_bytes if b >= 64 << 10]
    assert [p[0] for p in curve.points] == sizes and len(raw) == len(sizes)
    assert all("new_output_s=" in r and "donated_output_s=" in r and "page_faults=" in r for r in raw)


def test_calibrate_end_to_end_on_emulated_cpu_devices(tmp_path):
    path = tmp_path / "hw.toml"
    done = _cli("calibrate", "--quick", "--devices", "4", "--output", str(path))
    assert done.returncode == 0, done.stderr
    assert f"wrote {path}" in done.stdout.replace("\n", "")
    hw = get_hardware(path)
    cal = hw.calibration
    assert hw.name == "host-cpu" and hw.devices_per_node == 4
    assert set(cal.matmul) == {"bfloat16", "float32"} and all(len(c.points) >= 2 for c in cal.matmul.values())
    assert len(cal.memory.points) >= 2 and len(cal.read_reduce.points) >= 2 and cal.op_overhead_s > 0
    assert cal.call_s + 100 * cal.call_per_argument_s > 0 and cal.meta["samples_program_call"]
    assert set(cal.kinds) == {"convert", "transpose"} and all(len(c.points) >= 2 for c in cal.kinds.values())
    assert cal.transcendental is not None and len(cal.transcendental.points) >= 2
    assert cal.fresh_buffer is not None and cal.meta["samples_fresh_buffer"]
    for kind in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute"):
        for g in (2, 4):
            fit = cal.collective(kind, "node", g)
            assert fit is not None and fit.group_size == g and len(fit.samples) >= 2, (kind, g)
    assert cal.meta["date"] and cal.meta["jax_version"] and cal.meta["emulated_devices"] is True
    assert cal.meta["device_count"] == 4 and cal.meta["samples_matmul"] and cal.meta["samples_loop_iteration"]
    assert 0 < hw.flops_efficiency <= 1 and 0 < hw.hbm_efficiency <= 1

    analyze = _cli("analyze", "--model", "tiny", "--mesh", "EP1-TP1-PP1-DP1", "--hardware", str(path),
                   "--backend", "cpu", "--batch", "1", "--prompt-len", "16", "--gen-len", "4")
    assert analyze.returncode == 0, analyze.stderr

    before = path.read_bytes()
    again = _cli("calibrate", "--quick", "--devices", "2", "--output", str(path))
    assert again.returncode == 2 and "add --force" in again.stderr and "Traceback" not in again.stderr
    assert path.read_bytes() == before


def test_calibrate_two_processes_measures_the_network_tier(tmp_path):
    """One device in each of two processes: every collective crosses the process boundary (gloo on CPU)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "hw.toml"
    procs = [subprocess.Popen(_command() + ["calibrate", "--quick", "--devices", "2", "--output", str(path),
                                            "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                            "--process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
             for i in range(2)]
    try:
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    assert "wrote" in results[0][0] and "wrote" not in results[1][0]        # process 0 reports and writes
    hw = get_hardware(path)
    cal = hw.calibration
    assert cal.meta["process_count"] == 2 and cal.meta["local_device_count"] == 1
    assert {(f.kind, f.tier, f.group_size) for f in cal.collectives} == {
        (kind, "network", 2) for kind in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                                          "collective-permute")}
    assert hw.network_link.name.startswith("measured (network")
    assert any("node tier" in note for note in cal.meta["notes"])


@pytest.mark.parametrize("argv,message", [
    (["--dtypes", "bfloat16,int8"], "--dtypes: unknown dtype 'int8'; valid: bfloat16, float16, float32"),
    (["--base", "h2000"], "unknown hardware 'h2000'"),
    (["--max-bytes", "0"], "0 must be at least 1"),
])
def test_calibrate_bad_input_exits_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--output", str(tmp_path / "hw.toml"), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "hw.toml").exists()


def test_calibrate_refuses_an_existing_output_before_measuring(tmp_path, capsys):
    path = tmp_path / "mine.toml"
    path.write_text("# the user's own file\n")
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--quick", "--output", str(path)])
    assert e.value.code == 2 and "exists; add --force" in capsys.readouterr().err
    assert path.read_text() == "# the user's own file\n"
