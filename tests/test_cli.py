"""The command line: tables and JSON from library functions; bad input → exit 2, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moe_jax.cli import main
from moe_jax.config import get_model

ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_models_table_and_json(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and "seed-30b" in out and "29.93B" in out and "qwen3-235b-a22b" in out
    assert "59.86 GB (bfloat16)" in out                          # weights as stored, in the stored dtype
    code, out, _ = run(capsys, "models", "--json")
    rows = json.loads(out)
    seed = next(r for r in rows if r["name"] == "seed-30b")
    for key in ("name", "params_total", "params_active", "layers", "experts", "top_k"):
        assert key in seed
    assert seed["params_total"] == get_model("seed-30b").params_total and seed["experts"] == 64


def test_describe_seed(capsys):
    code, out, _ = run(capsys, "describe", "--model", "seed-30b", "--strategy",
                       str(ROOT / "meshes" / "ep64-tp8-pp2-dp1.toml"))
    assert code == 0
    assert "EP64-TP8-PP2-DP1 on 1024 devices" in out
    assert "batch 128, prompt 2048 tokens, 256 generated" in out
    assert "2304 / tp=8" in out and "288" in out


def test_describe_json(capsys):
    code, out, _ = run(capsys, "describe", "--model", "mixtral-8x7b", "--strategy", "EP8-TP2", "--batch", "16",
                       "--json")
    data = json.loads(out)
    assert code == 0 and data["strategy"]["devices"] == 16
    assert data["facts"]["experts_per_device_per_layer"] == 1
    assert data["workload"] == {"batch": 16, "prompt_len": 2048, "gen_len": 256}


@pytest.mark.parametrize("argv,message", [
    (["describe", "--model", "gpt-5"], "unknown model 'gpt-5'"),
    (["describe", "--strategy", "EP3-TP8"], "ep=3 does not divide 64 experts; valid ep: 1, 2, 4"),
    (["describe", "--strategy", "EP64-TP8-PP2", "--devices", "512"], "uses ep·tp·pp·dp = 1024 devices, but 512"),
    (["describe", "--batch", "0"], "0 must be at least 1"),
    (["describe", "--batch", "many"], "'many' is not a valid integer"),
    (["describe", "--strategy", "missing.toml"], "cannot read strategy file 'missing.toml'"),
    (["verify", "--strategy", "EP2-TP1-PP3"], "pp=3 does not divide 4 layers; valid pp: 1, 2, 4"),
    (["verify", "--strategy", "EP4-TP4"], "jax already started with 8 CPU devices; 16 are needed"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_bad_input_exits_2_with_a_message(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err + out


def test_verify_in_process_on_the_test_devices(capsys):
    code, out, _ = run(capsys, "verify", "--strategy", "EP2-TP2-DP2", "--json")
    data = json.loads(out)
    assert code == 0 and data["passed"] and data["strategy"] == "EP2-TP2-PP1-DP2"
    assert data["decode_max_abs"] < 1e-4 and data["dropped"] == 0


def test_console_script_sets_up_its_own_devices():
    """A fresh process: the CLI requests the fake devices itself, before jax starts."""
    script = Path(sys.executable).with_name("moe-jax")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "moe_jax.cli"]
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    ok = subprocess.run(cmd + ["verify", "--strategy", "EP4-TP1-DP1", "--batch", "4"], capture_output=True,
                        text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "PASS" in ok.stdout
    bad = subprocess.run(cmd + ["describe", "--strategy", "EP5"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "valid ep" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("argv,message", [
    (["analyze", "--model", "tiny", "--mesh", "EP8", "--dispatch", "dropless", "--capacity-factor", "2"],
     "--capacity-factor 2 applies to capacity dispatch; this run uses dropless"),
    (["analyze", "--model", "tiny", "--mesh", "EP8", "--capacity-factor", "0"], "--capacity-factor 0 must be > 0"),
    (["plan", "--model", "tiny", "--devices", "8", "--hardware", "h100", "--capacity-factor", "100"],
     "at most the expert count 8"),
])
def test_capacity_factor_is_checked_before_any_work(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
