"""The planner's cache and workers under attack: unusable caches found before the search, write failures that
only warn, keys that follow the code, workers that die with their planner; strict JSON outputs."""

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
from moe_jax.planner.cache import cache_key, check_cache_dir
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
