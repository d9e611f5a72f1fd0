"""Several processes, one mesh (jax.distributed on 127.0.0.1 with gloo CPU collectives).

Two processes with 4 fake CPU devices each must produce the single-process 8-device
run's logits and tokens; a peer that dies, hangs or never arrives must end the other
process with a message and exit status 4 within the timeout. Every child process is
killed in `finally`, whatever happens.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moe_jax.cli import main
from moe_jax.errors import MoeJaxError
from moe_jax.runtime.distributed import CLUSTER_EXIT_STATUS, ClusterSpec, launcher, parse_address, resolve

RUN = ["run", "--model", "tiny", "--dtype", "f32", "--batch", "8", "--prompt-len", "6", "--gen-len", "4",
       "--repeats", "1", "--seed", "5"]


# --- the cluster spec (no processes) --------------------------------------------------


def test_spec_from_flags_env_and_launchers():
    assert resolve(env={}) is None
    assert resolve(num_processes="1", env={}) is None
    spec = resolve("127.0.0.1:1234", "2", "1", "30", env={})
    assert (spec.coordinator, spec.num_processes, spec.process_id, spec.timeout, spec.source) == \
        ("127.0.0.1:1234", 2, 1, 30.0, "flags")
    env = {"MOE_JAX_COORDINATOR": "node0:999", "MOE_JAX_NUM_PROCESSES": "4", "MOE_JAX_PROCESS_ID": "3",
           "MOE_JAX_TIMEOUT": "12"}
    spec = resolve(env=env)
    assert (spec.num_processes, spec.process_id, spec.timeout, spec.source) == (4, 3, 12.0, "environment")
    assert resolve(process_id=0, env=env).process_id == 0                  # a flag wins over its variable
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "0"}
    assert launcher(slurm) == "slurm" and resolve(env=slurm).auto and resolve(env=slurm).source == "slurm"
    assert launcher({**slurm, "SLURM_NTASKS": "1"}) is None
    assert launcher({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "8"}) == "ompi"
    assert resolve("auto", env={}).auto
    assert parse_address("[::1]:80") == ("[::1]", 80)
    assert ClusterSpec("h:1", 2, 0).cpu_devices_per_process(8) == 4


@pytest.mark.parametrize("kwargs,message", [
    ({"coordinator": "localhost"}, "--coordinator 'localhost' is not HOST:PORT"),
    ({"coordinator": "h:70000", "num_processes": 2, "process_id": 0}, "port 1 to 65535"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, "--process-id 2 is out of range for 2 processes; "
                                                                   "valid: 0 to 1"),
    ({"coordinator": "h:1", "num_processes": "two", "process_id": 0}, "--num-processes (or MOE_JAX_NUM_PROCESSES) "
                                                                       "'two' is not an integer"),
    ({"coordinator": "h:1", "num_processes": 0, "process_id": 0}, "--num-processes 0 must be a positive integer"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 0, "timeout": 0}, "--timeout 0 must be 1 to 86400"),
    ({"num_processes": 2}, "missing: --coordinator, --process-id"),
])
def test_bad_specs_name_the_value_and_the_valid_choices(kwargs, message):
    with pytest.raises(MoeJaxError) as e:
        resolve(env={}, **kwargs)
    assert message in str(e.value)


def test_devices_that_do_not_divide_among_processes():
    with pytest.raises(MoeJaxError, match="the mesh's 8 devices cannot be shared equally by 3 processes; "
                                          "valid process counts: 1, 2, 4, 8"):
        ClusterSpec("h:1", 3, 0).cpu_devices_per_process(8)


def test_cli_rejects_a_bad_cluster_before_starting(capsys):
    with pytest.raises(SystemExit) as e:
        main(RUN + ["--mesh", "EP2-TP2-DP2", "--coordinator", "127.0.0.1:1", "--num-processes", "3",
                    "--process-id", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot be shared equally by 3 processes" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--model", "tiny", "--mesh", "EP2", "--coordinator", "127.0.0.1:1", "--num-processes", "2",
              "--process-id", "0"])
    assert e.value.code == 2 and "needs --backend real" in capsys.readouterr().err


# --- real processes -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return {**env, **extra}


# Fault injection lives here, not in the package: this wrapper runs `moe-jax <argv>` with `Cluster.beat` patched so
# that process VICTIM signals itself (KILL: a peer lost; STOP: a peer hung) as soon as the step named STEP starts.
_DIE_AT = """
import os, signal, sys
from moe_jax.runtime import distributed
victim, step, sig, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
beat = distributed.Cluster.beat
def beat_then_die(self, what):
    beat(self, what)
    if self.multi and self.process_index == victim and what.startswith(step):
        os.kill(os.getpid(), getattr(signal, "SIG" + sig))
distributed.Cluster.beat = beat_then_die
from moe_jax.cli import main
sys.argv = ["moe-jax", *argv]     # main() reads sys.argv: its supervised child reruns this same wrapper
main()
"""


def _launch(tmp_path, argv, ids, processes=2, env=None, die_at=None):
    """Start `moe-jax <argv>` as processes `ids` of `processes`; stdout/stderr go to files in tmp_path.

    die_at: (victim process, step name prefix, signal name) to inject a fault through `_DIE_AT`.
    """
    port, procs = _free_port(), []
    program = ["-c", _DIE_AT, *map(str, die_at)] if die_at else ["-m", "moe_jax.cli"]
    for i in ids:
        cmd = [sys.executable, *program, *argv, "--coordinator", f"127.0.0.1:{port}",
               "--num-processes", str(processes), "--process-id", str(i)]
        out, err = open(tmp_path / f"p{i}.out", "w"), open(tmp_path / f"p{i}.err", "w")
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, env=env or _env()))
    return procs


def _wait(procs, seconds):
    deadline = time.monotonic() + seconds
    for p in procs:
        p.wait(timeout=max(1, deadline - time.monotonic()))
    return [p.returncode for p in procs]


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)


def _read(tmp_path, i, stream="err"):
    return (tmp_path / f"p{i}.{stream}").read_text()


@pytest.mark.parametrize("mesh", ["EP2-TP2-DP2", "EP2-TP2-PP2"])   # (ep, tp, pp, dp) = (2,2,1,2) and (2,2,2,1)
def test_two_processes_equal_one_process_with_eight_devices(tmp_path, capsys, mesh):
    """pp = 2 puts one pipeline stage on each process: activations cross the process boundary."""
    single = tmp_path / "single"
    single.mkdir()
    main(RUN + ["--mesh", mesh, "--json", str(single / "run.json"), "--save-logits", str(single / "logits.npy")])
    capsys.readouterr()
    procs = _launch(tmp_path, RUN + ["--mesh", mesh, "--json", str(tmp_path / "run.json"), "--save-logits",
                                     str(tmp_path / "logits.npy")], ids=[0, 1])
    try:
        codes = _wait(procs, 400)
    finally:
        _kill(procs)
    assert codes == [0, 0], _read(tmp_path, 0)[-3000:] + _read(tmp_path, 1)[-3000:]
    want, got = json.loads((single / "run.json").read_text()), json.loads((tmp_path / "run.json").read_text())
    assert got["processes"] == 2 and want["processes"] == 1 and got["strategy"] == want["strategy"]
    assert got["tokens"] == want["tokens"]
    logits, ref = np.load(tmp_path / "logits.npy"), np.load(single / "logits.npy")
    assert logits.shape == ref.shape == (8, 6, 256)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
    assert _read(tmp_path, 1, "out") == ""                         # only process 0 reports
    assert not (tmp_path / "p1.err").read_text().count("moe-jax: error")


@pytest.mark.parametrize("victim,signal_name", [(1, "KILL"), (0, "KILL"), (1, "STOP")])
def test_a_peer_lost_mid_run_ends_the_survivor_within_the_timeout(tmp_path, victim, signal_name):
    """KILL: the survivor's collective fails at once; STOP: it hangs and the watchdog ends it."""
    timeout = 60                         # generous: each step (compiles included) must finish within it
    procs = _launch(tmp_path, RUN + ["--mesh", "EP2-TP2-DP2", "--gen-len", "6", "--timeout", str(timeout),
                                     "--progress"], ids=[0, 1], die_at=(victim, "decode step 2", signal_name))
    survivor, lost = procs[1 - victim], procs[victim]
    try:
        deadline = time.monotonic() + 400
        while "decode step 2" not in _read(tmp_path, victim) and time.monotonic() < deadline:
            assert survivor.poll() is None, _read(tmp_path, 1 - victim)[-3000:]
            time.sleep(0.2)
        seen = time.monotonic()
        survivor.wait(timeout=timeout + 60)
        took = time.monotonic() - seen
    finally:
        _kill(procs)
    err = _read(tmp_path, 1 - victim)
    assert survivor.returncode == CLUSTER_EXIT_STATUS, err[-3000:]
    assert f"moe-jax: error: process {1 - victim} of 2" in err and "Traceback" not in err
    if signal_name == "STOP":
        # the step the survivor is stuck in: 2, or 1 when the victim dispatched step 1 asynchronously and stopped
        # at step 2 while the survivor was still compiling or running step 1 (seen under load)
        assert re.search(rf"no progress for {timeout} s during decode step [12]\b", err), err[-3000:]
        assert "a peer process died" in err
    elif victim == 0:                    # the collective fails, or jax's client aborts first (the supervisor says so)
        assert "a peer process probably died" in err or "coordinator (process 0) is gone" in err, err[-3000:]
        assert "Check failure" not in err
    else:
        assert "a peer process probably died" in err
    assert took < timeout + 30
    assert lost.poll() is not None and survivor.poll() is not None


def test_the_coordinators_death_is_exit_4_not_an_abort(tmp_path):
    """Process 0 (the coordinator) dies right after the join, before any collective: jax's coordination client
    in the survivor ends its process with a native abort (SIGABRT, 134); the supervising parent says why and
    exits 4 instead."""
    procs = _launch(tmp_path, RUN + ["--mesh", "EP2-TP2-DP2", "--timeout", "60", "--progress"], ids=[0, 1],
                    die_at=(0, "starting the backend", "KILL"))
    try:
        codes = _wait(procs, 300)
    finally:
        _kill(procs)
    err = _read(tmp_path, 1)
    assert codes[1] == CLUSTER_EXIT_STATUS, err[-3000:]
    assert "moe-jax: error: process 1 of 2" in err, err[-3000:]
    assert "Traceback" not in err and "Check failure" not in err and "*** " not in err, err[-3000:]


def test_processes_started_differently_stop_with_exit_2_naming_the_difference(tmp_path):
    port, procs = _free_port(), []
    for i, seed in ((0, "5"), (1, "6")):
        argv = RUN[:-1] + [seed, "--mesh", "EP2-TP2-DP2", "--timeout", "60", "--coordinator", f"127.0.0.1:{port}",
                           "--num-processes", "2", "--process-id", str(i)]
        out, err = open(tmp_path / f"p{i}.out", "w"), open(tmp_path / f"p{i}.err", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "moe_jax.cli", *argv], stdout=out, stderr=err,
                                      env=_env()))
    try:
        codes = _wait(procs, 300)
    finally:
        _kill(procs)
    assert codes == [2, 2], _read(tmp_path, 0)[-2000:] + _read(tmp_path, 1)[-2000:]
    assert "the processes were not started alike: seed=5 here, 6 on process 1" in _read(tmp_path, 0)
    assert "seed=6 here, 5 on process 0" in _read(tmp_path, 1)
    assert "Traceback" not in _read(tmp_path, 0) + _read(tmp_path, 1)


@pytest.mark.parametrize("present", [0, 1])
def test_a_peer_that_never_arrives_is_an_error_within_the_timeout(tmp_path, present):
    procs = _launch(tmp_path, RUN + ["--mesh", "EP2-TP2-DP2", "--timeout", "3"], ids=[present])
    try:
        start = time.monotonic()
        codes = _wait(procs, 120)
        took = time.monotonic() - start
    finally:
        _kill(procs)
    err = _read(tmp_path, present)
    assert codes == [CLUSTER_EXIT_STATUS], err[-3000:]
    assert f"process {present} of 2 could not join the cluster at 127.0.0.1:" in err and "within 3 s" in err
    assert took < 90 and "Traceback" not in err


def test_watchdog_ends_a_stuck_process(tmp_path):
    code = ("import time\nfrom moe_jax.runtime.distributed import Watchdog\nw = Watchdog(1, 'process 0 of 2')\n"
            "w.beat('prefill')\ntime.sleep(30)\n")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert done.returncode == CLUSTER_EXIT_STATUS and time.monotonic() - start < 20
    assert "moe-jax: error: process 0 of 2: no progress for 1 s during prefill" in done.stderr
