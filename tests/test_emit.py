"""`plan --emit DIR`: the launch files parse, say what does not carry over, and the `moe-jax run` command runs."""

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import clean_env

from moe_jax.cli import main
from moe_jax.cli.running import run_cmd
from moe_jax.config import get_model
from moe_jax.costs.compile import Workload
from moe_jax.errors import MoeJaxError
from moe_jax.hardware.presets import get_hardware
from moe_jax.parallel.mesh import Strategy
from moe_jax.reporting.launch import (
    LAUNCH_FILES,
    NOT_CARRIED,
    LaunchSpec,
    check_emit_dir,
    ici_dcn,
    launch_files,
    write_launch,
)

ROOT = Path(__file__).resolve().parent.parent


SEED = Workload(128, 2048, 256)


def _spec(model="seed-30b", strategy="EP64-TP8-PP2-DP1", hardware="seed-gpu", workload=SEED, **replace):
    cfg = get_model(model)
    cfg = cfg.replace(**replace) if replace else cfg
    return LaunchSpec.of(cfg, Strategy.parse(strategy), get_hardware(hardware), workload, model=model,
                         hardware=hardware)


def _exec_args(script: str) -> list[str]:
    """The words of a script's `exec` line (the command it runs)."""
    (line,) = [ln for ln in script.splitlines() if ln.startswith("exec ")]
    return shlex.split(line)[1:]


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("strategy,per_node,ici,dcn", [
    ("EP64-TP8-PP2-DP1", 8, dict(tp=8, ep=1, pp=1, dp=1), dict(tp=1, ep=64, pp=2, dp=1)),
    ("EP4-TP2-PP2-DP2", 4, dict(tp=2, ep=2, pp=1, dp=1), dict(tp=1, ep=2, pp=2, dp=2)),
    ("EP2-TP2", 8, dict(tp=2, ep=2, pp=1, dp=1), dict(tp=1, ep=1, pp=1, dp=1)),       # less than one node
    ("TP16-DP4", 8, dict(tp=8, ep=1, pp=1, dp=1), dict(tp=2, ep=1, pp=1, dp=4)),     # tp itself spans nodes
])
def test_ici_inside_a_node_dcn_across_nodes(strategy, per_node, ici, dcn):
    s = Strategy.parse(strategy)
    got_ici, got_dcn, note = ici_dcn(s, per_node)
    assert (got_ici, got_dcn, note) == (ici, dcn, None)
    assert math.prod(got_ici.values()) == min(per_node, s.num_devices)
    assert math.prod(got_dcn.values()) == -(-s.num_devices // per_node)
    assert all(got_ici[a] * got_dcn[a] == size for a, size in s.mesh_shape.items())


def test_a_node_that_cuts_an_axis_unevenly_is_said():
    ici, dcn, note = ici_dcn(Strategy(tp=3, dp=4), 8)
    assert "does not hold whole blocks" in note and "tp=3" in note
    assert ici == Strategy(tp=3, dp=4).mesh_shape and set(dcn.values()) == {1}


@pytest.mark.parametrize("strategy,dispatch", [("EP64-TP8-PP2-DP1", "capacity"), ("EP8-TP2-DP4", "dropless"),
                                               ("TP4-PP2-DP2", "capacity")])
def test_every_file_parses_and_says_what_does_not_carry_over(tmp_path, strategy, dispatch):
    spec = _spec(strategy=strategy, dispatch=dispatch)
    written = write_launch(tmp_path / "out", spec)
    assert sorted(p.name for p in written) == sorted(LAUNCH_FILES)
    for path in written:
        text = path.read_text()
        if path.suffix == ".sh":
            done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            assert path.stat().st_mode & 0o111 and text.startswith("#!/usr/bin/env bash\n")
        if path.name != "README.md":
            assert sum(line.startswith(NOT_CARRIED) for line in text.splitlines()) == 1, path.name
    data = yaml.safe_load((tmp_path / "out" / "maxtext.yml").read_text())
    s = spec.strategy
    for key, axis in (("data", "dp"), ("pipeline", "pp"), ("expert", "ep"), ("tensor", "tp")):
        assert data[f"ici_{key}_parallelism"] * data[f"dcn_{key}_parallelism"] == getattr(s, axis)
    assert data["ici_fsdp_parallelism"] == data["dcn_fsdp_parallelism"] == 1     # MaxText's default is -1 (auto)
    assert math.prod(data[f"ici_{k}_parallelism"] for k in ("data", "pipeline", "expert", "tensor")) == 8
    assert data["capacity_factor"] == (1.25 if dispatch == "capacity" else -1.0)
    assert data["max_target_length"] == 2048 + 256 and data["per_device_batch_size"] == 128 / s.num_devices
    # the emitted `moe-jax run` command is exactly what run accepts: click parses it, and it names the plan's
    args = _exec_args((tmp_path / "out" / "run.sh").read_text())
    assert args[:2] == ["${MOE_JAX:-moe-jax}", "run"] and args[-1] == "$@"
    ctx = run_cmd.make_context("run", args[2:-1])
    assert (ctx.params["strategy_spec"], ctx.params["dispatch"], ctx.params["backend"]) == (s.name, dispatch, "real")
    assert (ctx.params["batch"], ctx.params["prompt_len"], ctx.params["gen_len"]) == (128, 2048, 256)


def test_vllm_and_sglang_flags_and_what_they_cannot_say():
    spec = _spec(strategy="EP4-TP2-PP2-DP2", workload=Workload(64, 1024, 128), dispatch="capacity")
    files = launch_files(spec)
    vllm = _exec_args(files["vllm.sh"])
    assert vllm[:3] == ["vllm", "serve", "$MODEL"]
    assert [_flag(vllm, f) for f in ("--tensor-parallel-size", "--pipeline-parallel-size", "--data-parallel-size",
                                      "--max-num-seqs", "--max-model-len")] == ["2", "2", "4", "32", "1152"]
    assert "--enable-expert-parallel" in vllm
    lost = next(line for line in files["vllm.sh"].splitlines() if line.startswith(NOT_CARRIED))
    assert "TP x DP = 8, not a free axis" in lost and "dp=2 independent replicas" in lost
    assert "capacity dispatch (factor 1.25) has no equivalent" in lost
    assert "no Hugging Face checkpoint is known for preset 'seed-30b'" in lost
    sglang = _exec_args(files["sglang.sh"])
    assert sglang[:4] == ["python", "-m", "sglang.launch_server", "--model-path"]
    assert [_flag(sglang, f) for f in ("--tp-size", "--dp-size", "--ep-size", "--pp-size")] == ["8", "4", "4", "2"]
    assert "--enable-dp-attention" in sglang
    # a preset with a published checkpoint names it; Mixtral's 8 experts cannot go over vLLM's TP x DP = 16
    qwen = launch_files(_spec(model="qwen3-30b-a3b", strategy="EP16-TP4-DP2", workload=Workload(64, 1024, 128)))
    assert "MODEL=${MODEL:-Qwen/Qwen3-30B-A3B}" in qwen["vllm.sh"]
    mixtral = launch_files(_spec(model="mixtral-8x7b", strategy="EP8-TP2", workload=Workload(64, 1024, 128)))
    assert "EP 16 does not divide the 8 experts" in mixtral["vllm.sh"]


def test_existing_files_are_not_overwritten_without_force(tmp_path):
    spec = _spec()
    d = tmp_path / "launch"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    (d / "run.sh").write_text("echo mine")
    (d / "README.md").write_text("mine")
    with pytest.raises(MoeJaxError, match=r"already holds run.sh, README.md; .* add --force"):
        write_launch(d, spec)
    assert (d / "run.sh").read_text() == "echo mine"
    write_launch(d, spec, force=True)
    assert "moe-jax run" not in (d / "notes.txt").read_text() and "exec " in (d / "run.sh").read_text()
    (tmp_path / "file").write_text("")
    with pytest.raises(MoeJaxError, match="exists and is not a directory"):
        check_emit_dir(tmp_path / "file")
    with pytest.raises(MoeJaxError, match="does not exist"):
        check_emit_dir(tmp_path / "no" / "such")


def test_plan_emit_writes_a_run_command_that_runs(tmp_path, capsys):
    out = tmp_path / "launch"
    plan = ["plan", "--model", "tiny", "--devices", "4", "--hardware", "h100", "--backend", "cpu", "--batch", "4",
            "--prompt-len", "8", "--gen-len", "4", "--top", "1", "--workers", "1", "--cache", "",
            "--dispatch", "dropless", "--emit", str(out)]
    with pytest.raises(SystemExit) as e:
        main(plan)
    assert e.value.code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(LAUNCH_FILES)
    args = _exec_args((out / "run.sh").read_text())
    strategy = _flag(args, "--mesh")
    assert Strategy.parse(strategy).num_devices == 4 and _flag(args, "--dispatch") == "dropless"
    assert strategy in (out / "README.md").read_text()
    # the command it wrote runs the tiny model (on emulated CPU devices: the arguments after it are passed on)
    result = tmp_path / "run.json"
    done = subprocess.run(["bash", str(out / "run.sh"), "--backend", "cpu", "--repeats", "1", "--json", str(result)],
                          capture_output=True, text=True, timeout=600,
                          env=clean_env(MOE_JAX=f"{sys.executable} -m moe_jax.cli"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(result.read_text())
    assert data["strategy"] == Strategy.parse(strategy).name and data["model"] == "tiny"
    assert len(data["tokens"]) == 4 and len(data["tokens"][0]) == 4 and data["predicted"]["hardware"] == "h100"
    # again into the same directory: refused before any search, naming the files
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(plan)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "already holds run.sh, maxtext.yml, vllm.sh, sglang.sh, README.md" in err
