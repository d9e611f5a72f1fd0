"""The planner's cache and workers under attack: unusable caches found before the search, write failures that
only warn, keys that follow the code and the compile (not the hardware's time model), jax's persistent compilation
cache, workers that die with their planner; strict JSON outputs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import clean_env

from moe_jax import Strategy, Workload, get_model
from moe_jax.errors import MoeJaxError
from moe_jax.files import dumps
from moe_jax.hardware.presets import get_hardware
from moe_jax.planner import cache as plan_cache
from moe_jax.planner.cache import cache_key, check_cache_dir, decode_cost, encode_cost, load_cost
from moe_jax.planner.search import plan


def test_a_cache_that_is_a_file_is_refused_before_any_compile(tmp_path):
    target = tmp_path / "cache"
    target.write_text("mine")
    with pytest.raises(MoeJaxError, match="is a file, not a directory"):
        plan(get_model("tiny"), 8, get_hardware("h100"), Workload(8, 16, 4), cache_dir=target)
    assert target.read_text() == "mine"
    with pytest.raises(MoeJaxError, match="cannot be created"):
        check_cache_dir(target / "below")


def test_a_failed_cache_write_only_warns(tmp_path, monkeypatch):
    def broken(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plan_cache, "cache_store", broken)
    with pytest.warns(UserWarning, match="No space left on device"):
        result = plan(get_model("tiny"), 8, get_hardware("h100"), Workload(8, 16, 4), top=1, workers=1,
                      cache_dir=tmp_path, backend="cpu")
    assert result.best


def test_cache_key_follows_the_code(monkeypatch):
    args = (get_model("tiny"), Strategy.parse("EP2-TP2-DP2"), Workload(8, 16, 4), "cpu", get_hardware("h100"), None)
    before = cache_key(*args)
    monkeypatch.setattr(plan_cache, "code_digest", lambda: "an edited checkout")
    assert cache_key(*args) != before


def test_cache_key_ignores_the_hardware_only_where_the_compile_does():
    cfg, s, work = get_model("tiny"), Strategy.parse("EP2-TP2-DP2"), Workload(8, 16, 4)
    h100, seed_gpu, v5p, mi300 = (get_hardware(n) for n in ("h100", "seed-gpu", "tpu-v5p", "mi300x"))
    cpu = cache_key(cfg, s, work, "cpu", h100, None)
    assert cache_key(cfg, s, work, "cpu", v5p, None) == cpu          # XLA:CPU compiles the same program for both
    assert cache_key(cfg, s, work, "auto", mi300, None) == cpu       # auto falls back to the cpu stand-in
    # a deviceless compile is for its target: seed-gpu compiles for the h100 target but is other hardware
    assert cache_key(cfg, s, work, "gpu", h100, None) != cache_key(cfg, s, work, "gpu", seed_gpu, None)
    assert cache_key(cfg, s, work, "gpu", h100, None) != cpu
    assert cache_key(cfg, s, work, "tpu", v5p, None) != cache_key(cfg, s, work, "tpu", get_hardware("tpu-v5e"), None)
    assert cache_key(cfg, s, Workload(8, 16, 5), "cpu", h100, None) != cpu


def test_compiled_statistics_round_trip_through_the_cache(tmp_path):
    from moe_jax.costs.walk import analyze_cost
    from moe_jax.planner.cache import cache_store, store_cost

    cost = analyze_cost(get_model("tiny"), Strategy.parse("EP2-TP2-PP2"), Workload(8, 16, 4), "cpu")
    assert decode_cost(json.loads(json.dumps(encode_cost(cost)))) == cost
    store_cost(tmp_path, "k", cost)
    back = load_cost(tmp_path, "k")
    assert back == cost and back.phases["decode"].hlo_text == cost.phases["decode"].hlo_text
    cache_store(tmp_path, "old", {"analysis": {"fits": True}, "markdown": "# x\n"})   # an older layout
    assert load_cost(tmp_path, "old") is None


def test_a_new_hardware_on_a_warm_cache_compiles_nothing(tmp_path, monkeypatch):
    import jax

    from moe_jax.costs import walk

    compiles, events = [], []
    real = walk.compile_program
    monkeypatch.setattr(walk, "compile_program", lambda *a, **k: compiles.append(a[1].name) or real(*a, **k))

    def listen(event, **kw):
        events.append(event)

    cfg, work = get_model("tiny"), Workload(8, 16, 4)
    jax.monitoring.register_event_listener(listen)
    try:
        first = plan(cfg, 2, get_hardware("h100"), work, top=4, workers=1, backend="cpu", cache_dir=tmp_path)
        assert len(compiles) == 4 and first.to_dict()["compiled"] == 4
        xla = list((tmp_path / "xla").iterdir())         # jax's persistent compilation cache: both phases each
        assert len(xla) >= 8
        second = plan(cfg, 2, get_hardware("tpu-v5p"), work, top=4, workers=1, backend="cpu", cache_dir=tmp_path)
        assert len(compiles) == 4                         # nothing compiled for the new hardware
        assert all(r.cached for r in second.candidates if r.compiled) and second.to_dict()["compiled"] == 4
        one = {r.strategy: r for r in first.candidates}
        for r in second.candidates:                       # same compiled program, other hardware's time model
            assert r.memory_bytes == one[r.strategy].memory_bytes
            assert r.tpot_s != one[r.strategy].tpot_s and r.ttft_s != one[r.strategy].ttft_s
        a, b = (x.compiled[x.best]["analysis"] for x in (first, second))
        assert (a["hardware"]["name"], b["hardware"]["name"]) == ("h100", "tpu-v5p")
        assert any("tpu-v5p" in n for n in b["notes"]) and not any("tpu-v5p" in n for n in a["notes"])
        # the compiled-statistics entries gone, the programs come back from jax's persistent cache
        for entry in tmp_path.glob("*.json"):
            entry.unlink()
        events.clear()
        third = plan(cfg, 2, get_hardware("h100"), work, top=4, workers=1, backend="cpu", cache_dir=tmp_path)
    finally:
        jax.monitoring.unregister_event_listener(listen)
    assert len(compiles) == 8 and events.count("/jax/compilation_cache/cache_hits") == 8
    assert [r.tpot_s for r in third.candidates] == [r.tpot_s for r in first.candidates]


def test_workers_end_with_their_planner():
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; "
              "from moe_jax.planner.workers import watch_parent; "
              "watch_parent(0.1); time.sleep(120)'])\n"
              "print(child.pid, flush=True)\ntime.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=clean_env())
    worker = int(parent.stdout.readline())
    time.sleep(3)                                             # the worker has started its watch
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        try:                                                   # reap it if it became our child
            os.waitpid(worker, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker outlived its planner by 20 s")


def test_json_outputs_are_strict():
    text = dumps({"ttft_s": float("inf"), "rows": [float("nan"), 1.5], "name": "x"})
    assert json.loads(text) == {"ttft_s": None, "rows": [None, 1.5], "name": "x"}
    assert "Infinity" not in text and "NaN" not in text


@pytest.mark.parametrize("command", ["analyze", "plan", "run", "verify"])
def test_the_largest_documented_sizes_are_a_clear_error_on_every_command(command, capsys):
    from moe_jax.cli import main

    strategy = {"plan": ["--devices", "8"], "verify": ["--strategy", "EP2-TP2-DP2"]}.get(command,
                                                                                      ["--mesh", "EP2-TP2-DP2"])
    args = [command, "--model", "tiny", *strategy, "--batch", "1048576", "--prompt-len", "4194304", "--gen-len", "8"]
    if command in ("analyze", "plan"):
        args += ["--hardware", "h100"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert "more than the 1.153e+18 XLA can index" in capsys.readouterr().err


def test_a_run_that_cannot_fit_this_host_stops_before_allocating(capsys):
    from moe_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["verify", "--model", "qwen3-235b-a22b", "--strategy", "EP8"])
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "of weights and KV cache" in err and "of this host's available memory" in err
