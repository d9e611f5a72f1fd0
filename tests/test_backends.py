"""Compiling for the machine being planned: which compiler, which target, which devices, stand-ins named."""

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import clean_env, require_compiler, run_tpu_script

from moe_jax.costs import backends
from moe_jax.costs.backends import gpu_target_path, resolve, shipped_targets, tpu_topology
from moe_jax.errors import MoeJaxError
from moe_jax.hardware.presets import get_hardware, hardware_names

ROOT = Path(__file__).resolve().parent.parent
NVIDIA = [n for n in hardware_names() if get_hardware(n).vendor == "nvidia"]


def _field(text: str, name: str) -> str:
    return re.search(rf"\b{name}:\s*(\S+)", text).group(1).strip('"')


def _capability(text: str) -> str:
    block = re.search(r"cuda_compute_capability\s*\{([^}]*)\}", text).group(1)
    major = re.search(r"major:\s*(\d+)", block)
    minor = re.search(r"minor:\s*(\d+)", block)
    return f"{major.group(1) if major else 0}.{minor.group(1) if minor else 0}"


@pytest.mark.parametrize("name", NVIDIA)
def test_every_nvidia_preset_has_a_target_that_matches_its_datasheet(name):
    hw = get_hardware(name)
    text = gpu_target_path(hw.compile_target).read_text()
    assert int(_field(text, "device_memory_size")) == hw.memory_bytes or name == "seed-gpu"
    if name == "seed-gpu":                         # the seed's GPU has no compiler of its own: an H100 stands in
        assert hw.compile_target == "h100" and "H100" in hw.assumptions
        return
    assert int(_field(text, "core_count")) == hw.sm_count
    assert _capability(text) == hw.compute_capability
    assert abs(float(_field(text, "memory_bandwidth")) - hw.hbm_bandwidth) / hw.hbm_bandwidth < 0.05


def test_shipped_targets_and_unknown_ones():
    assert {"a100", "h100", "h200", "b200"} <= set(shipped_targets())
    with pytest.raises(MoeJaxError, match="no GPU target description for 'v100'; shipped: a100, b200, h100, h200"):
        gpu_target_path("v100")
    with pytest.raises(MoeJaxError, match="is not a file"):
        gpu_target_path("/nowhere/x.txtpb")


def test_auto_picks_the_hardware_own_compiler(monkeypatch):
    monkeypatch.setattr(backends, "gpu_compiler_installed", lambda: True)
    monkeypatch.setattr(backends, "tpu_compiler_installed", lambda: True)
    for name in NVIDIA:
        c = resolve(get_hardware(name))
        assert c.backend == "gpu" and not c.stand_in and c.gpu_target.stem == get_hardware(name).compile_target
    assert resolve(get_hardware("tpu-v5p")).backend == "tpu"
    seed, h100 = resolve(get_hardware("seed-gpu")), resolve(get_hardware("h100"))
    assert "seed-gpu has no target description of its own" in seed.caveats[0] and not h100.caveats
    amd = resolve(get_hardware("mi300x"))
    assert amd.backend == "cpu" and amd.stand_in and "AMD" in amd.reason and amd.caveats


def test_auto_falls_back_to_a_named_cpu_stand_in(monkeypatch):
    monkeypatch.setattr(backends, "gpu_compiler_installed", lambda: False)
    monkeypatch.setattr(backends, "tpu_compiler_installed", lambda: False)
    gpu, tpu = resolve(get_hardware("h100")), resolve(get_hardware("tpu-v5e"))
    assert gpu.backend == tpu.backend == "cpu"
    assert "CUDA plugin is not installed" in gpu.reason and "libtpu is not installed" in tpu.reason
    assert gpu.to_dict()["stand_in"] is True and "XLA:CPU stand-in for h100" in gpu.caveats[0]
    explicit = resolve(get_hardware("h100"), "cpu")
    assert explicit.backend == "cpu" and not explicit.stand_in and explicit.caveats


def test_explicit_gpu_for_a_tpu_is_refused():
    with pytest.raises(MoeJaxError, match="--backend gpu compiles for a CUDA target; 'tpu-v5p' is a TPU"):
        resolve(get_hardware("tpu-v5p"), "gpu")
    with pytest.raises(MoeJaxError, match="unknown backend 'fpga'; valid: auto, cpu, tpu, gpu, real"):
        resolve(get_hardware("h100"), "fpga")


def test_hardware_toml_names_a_shipped_target_or_a_file(tmp_path):
    base = ('name = "my-gpu"\nmemory_bytes = 80e9\npeak_flops = 1e15\nhbm_bandwidth = 3e12\ndevices_per_node = 8\n'
            '[node_link]\nbandwidth = 4.5e11\nlatency_s = 1e-6\n[network_link]\nbandwidth = 5e10\nlatency_s = 5e-6\n')
    shipped = tmp_path / "a.toml"
    shipped.write_text('compile_target = "b200"\n' + base)
    assert resolve(get_hardware(shipped), "gpu").gpu_target == gpu_target_path("b200")
    (tmp_path / "mine.txtpb").write_text(gpu_target_path("h100").read_text())
    own = tmp_path / "b.toml"
    own.write_text('compile_target = "mine.txtpb"\n' + base)         # relative to the TOML file
    assert resolve(get_hardware(own), "gpu").gpu_target == tmp_path / "mine.txtpb"
    bad = tmp_path / "c.toml"
    bad.write_text('vendor = "intel"\n' + base)
    with pytest.raises(MoeJaxError, match="vendor='intel'; valid: nvidia, amd, google"):
        get_hardware(bad)


@pytest.mark.parametrize("n, v5p, v5e", [(1, "v5p:2x2x1", "v5e:2x2"), (3, "v5p:2x2x1", "v5e:2x2"),
                                         (6, "v5p:2x2x2", "v5e:2x4"), (12, "v5p:2x2x4", "v5e:4x4"),
                                         (24, "v5p:2x4x4", "v5e:4x8"), (1024, "v5p:8x8x16", None)])
def test_smallest_tpu_topology_that_holds_the_devices(n, v5p, v5e):
    assert tpu_topology(get_hardware("tpu-v5p"), n) == v5p
    if v5e:
        assert tpu_topology(get_hardware("tpu-v5e"), n) == v5e
    else:
        with pytest.raises(MoeJaxError, match="exceed one tpu-v5e slice of 256"):
            tpu_topology(get_hardware("tpu-v5e"), n)


def test_one_two_and_six_device_strategies_compile_on_the_tpu_backend():
    lines = run_tpu_script("""
from moe_jax import Strategy, Workload, get_model
from moe_jax.perf.analysis import analyze
from moe_jax.hardware.presets import get_hardware
cfg = get_model("tiny")
for s, hw in (("EP1", "tpu-v5p"), ("EP2-TP1-DP3", "tpu-v5p"), ("EP2", "tpu-v4"), ("DP6", "tpu-v6e")):
    a = analyze(cfg, Strategy.parse(s), get_hardware(hw), Workload(6, 16, 4))
    print(a.strategy.name, a.cost.backend, a.cost.devices, a.cost.topology, "|", a.fits, a.prediction.tpot_s > 0)
""")
    assert lines[-4] == "EP1-TP1-PP1-DP1 tpu 1 the first 1 of 4 chips of v5p:2x2x1 | True True"
    assert lines[-3] == "EP2-TP1-PP1-DP3 tpu 6 the first 6 of 8 chips of v5p:2x2x2 | True True"
    assert lines[-2] == "EP2-TP1-PP1-DP1 tpu 2 the first 2 of 4 chips of v4:2x2x1 | True True"   # megacore chips
    assert lines[-1] == "EP1-TP1-PP1-DP6 tpu 6 the first 6 of 8 chips of v6e:2x4 | True True"


@pytest.mark.parametrize("name", ["a100-80g", "h100", "h200", "b200", "seed-gpu"])
def test_every_nvidia_preset_compiles_deviceless_for_its_own_target(name):
    require_compiler("gpu")
    from moe_jax import Strategy, Workload, get_model
    from moe_jax.perf.analysis import analyze

    hw = get_hardware(name)
    a = analyze(get_model("tiny"), Strategy.parse("EP2-TP2-DP3"), hw, Workload(6, 16, 4))
    kind = {"a100": "A100", "h100": "H100", "h200": "H200", "b200": "B200"}[hw.compile_target]
    assert a.cost.backend == "gpu" and kind in a.cost.target and a.fits
    assert a.cost.topology == "the first 12 GPUs of 2 hosts x 8"           # 12 is no whole number of servers
    assert a.to_dict()["compiled_for"]["stand_in"] is False
    assert sorted(a.cost.physical_order) == list(range(12))


def test_gpu_mesh_keeps_tp_inside_a_server_and_links_follow_the_placement():
    require_compiler("gpu")
    import numpy as np

    from moe_jax import Strategy
    from moe_jax.costs.compile import _gpu_devices
    from moe_jax.parallel.mesh import build_mesh
    from moe_jax.perf.timemodel import link_for

    devices, where = _gpu_devices(gpu_target_path("h100"), 16)
    mesh = build_mesh(Strategy.parse("TP8-DP2"), devices, physical=True)
    hosts = np.vectorize(lambda d: d.process_index)(mesh.devices)
    assert (hosts.min(axis=-1) == hosts.max(axis=-1)).all()             # each tp group on one server
    hw = get_hardware("h100")
    order = [devices.index(d) for d in mesh.devices.flat]
    assert link_for(list(range(8)), hw, order) is hw.node_link
    assert link_for([0, 8], hw, order) is hw.network_link
    swapped = list(range(16))                                            # placement decides, not the partition id
    swapped[1], swapped[8] = 8, 1
    assert link_for([0, 8], hw, swapped) is hw.node_link
    assert link_for(list(range(8)), hw, swapped) is hw.network_link


def _analyze_cli(tmp_path, *args):
    out = tmp_path / "a.json"
    md = tmp_path / "a.md"
    done = subprocess.run([sys.executable, "-m", "moe_jax.cli", "analyze", "--model", "tiny", "--batch", "8",
                           "--prompt-len", "16", "--gen-len", "4", "--json", str(out), "--markdown", str(md), *args],
                          capture_output=True, text=True, timeout=600, env=clean_env(TPU_SKIP_MDS_QUERY="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), md.read_text(), done.stdout


def test_analyze_without_backend_compiles_for_the_hardware(tmp_path):
    require_compiler("gpu")
    data, md, text = _analyze_cli(tmp_path, "--mesh", "EP2-TP2-DP2", "--hardware", "h100")
    assert data["backend"] == "gpu" and data["compiled_for"]["requested"] == "auto"
    assert "H100" in data["target"] and "XLA:GPU, deviceless, for NVIDIA H100" in md
    assert "compiled by: XLA:GPU" in text
    require_compiler("tpu")
    data, md, text = _analyze_cli(tmp_path, "--mesh", "EP2-TP1-DP3", "--batch", "6", "--hardware", "tpu-v5p")
    assert data["backend"] == "tpu" and data["compiled_for"]["topology"] == "the first 6 of 8 chips of v5p:2x2x2"


def test_cpu_fallback_report_names_itself(tmp_path):
    data, md, text = _analyze_cli(tmp_path, "--mesh", "EP2-TP2-DP2", "--hardware", "mi300x")
    c = data["compiled_for"]
    assert data["backend"] == "cpu" and c["stand_in"] is True and "no AMD compiler" in c["reason"]
    assert "XLA:CPU as a stand-in for mi300x" in md and "XLA:CPU stand-in for mi300x" in md
    assert "on XLA:CPU's numbers only, not confirmed for mi300x" in text and data["fit_confirmed"] is False


def test_target_descriptions_ship_in_the_wheel(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(tmp_path.glob("moe_jax-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for target in shipped_targets():
        assert f"moe_jax/hardware/targets/{target}.txtpb" in names


def test_plan_compiles_for_the_hardware_in_worker_processes():
    require_compiler("gpu")
    from moe_jax import Workload, get_model
    from moe_jax.planner.search import plan

    result = plan(get_model("tiny"), 8, get_hardware("h100"), Workload(8, 16, 4), top=2, workers=2, cache_dir=None)
    compiled = [result.compiled[r.strategy]["analysis"] for r in result.candidates if r.compiled]
    assert len(compiled) == 2
    assert all(a["backend"] == "gpu" and "H100" in a["target"] and a["fit_confirmed"] for a in compiled)
