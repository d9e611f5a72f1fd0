"""The load sweep (`plan --sweep`): SLO parsing, the Pareto front, the pick, and the CLI's plot and JSON."""

import dataclasses
import json
import random

import pytest

from moe_jax.cli import main
from moe_jax.cli.options import parse_slo
from moe_jax.config import get_model
from moe_jax.costs.compile import Workload
from moe_jax.errors import MoeJaxError
from moe_jax.hardware.presets import get_hardware
from moe_jax.parallel.mesh import Strategy
from moe_jax.planner.search import estimate
from moe_jax.planner.spec import SearchSpec
from moe_jax.planner.sweep import PointFigures, SweepPoint, pareto_front, run_sweep, spread, sweep_strategy

TINY = get_model("tiny")
SMALL = dataclasses.replace(get_hardware("h100"), name="small", memory_bytes=2_000_000)
USABLE = 1_800_000                                           # 2 MB less the default 10% headroom
HW_TOML = ('name = "small"\nmemory_bytes = 2e6\npeak_flops = 100e12\nhbm_bandwidth = 1e12\ndevices_per_node = 8\n'
           '[node_link]\nbandwidth = 100e9\nlatency_s = 1e-6\n[network_link]\nbandwidth = 10e9\nlatency_s = 5e-6\n')


@pytest.mark.parametrize("text,seconds", [("200ms", 0.2), ("0.2s", 0.2), ("150", 0.15), (" 5 MS ", 0.005),
                                          ("1.5S", 1.5), (2, 0.002)])
def test_slo_parsing(text, seconds):
    assert parse_slo(text, "--slo-tpot") == pytest.approx(seconds)
    assert parse_slo(None, "--slo-tpot") is None


@pytest.mark.parametrize("text,message", [("fast", "--slo-ttft 'fast' is not a duration"),
                                          ("ms", "--slo-ttft 'ms' is not a duration"),
                                          ("-1", "--slo-ttft -1.0 must be a positive number"),
                                          ("0s", "--slo-ttft 0.0 must be a positive number"),
                                          ("nan", "--slo-ttft nan must be a positive number"),
                                          ("inf ms", "--slo-ttft inf must be a positive number")])
def test_bad_slo_is_named(text, message):
    with pytest.raises(MoeJaxError, match="^" + message.replace("(", r"\(")):
        parse_slo(text, "--slo-ttft")


def _point(name, batch, per_device, per_user, fits=True):
    return SweepPoint(name, 1, batch, PointFigures(fits, 1e-3, 1 / per_user, per_device, 0))


def _dominates(a, b):
    return (a.per_device >= b.per_device and a.per_user >= b.per_user
            and (a.per_device > b.per_device or a.per_user > b.per_user))


def test_front_is_non_dominated_and_holds_the_best_points():
    rng = random.Random(0)
    points = [_point(f"S{i % 7}", 2 ** (i % 9), rng.uniform(1, 100), rng.uniform(1, 100)) for i in range(300)]
    points += [dataclasses.replace(points[0]), _point("big", 1, 1e6, 1e6, fits=False)]   # a twin; one not fitting
    front = pareto_front(points)
    fitting = [p for p in points if p.estimate.fits]
    assert all(not _dominates(q, p) for p in front for q in fitting)                  # nothing beats a front point
    assert all(any(_dominates(f, p) or (f.per_device, f.per_user) == (p.per_device, p.per_user) for f in front)
               for p in fitting)                                                     # every other point is beaten
    assert front[0] is max(fitting, key=lambda p: p.per_device)                       # the best point is on it
    assert max(fitting, key=lambda p: p.per_user) in front
    assert all(p.strategy != "big" for p in front)
    assert [p.per_device for p in front] == sorted((p.per_device for p in front), reverse=True)
    assert len({(p.per_device, p.per_user) for p in front}) == len(front)               # twins kept once
    assert spread(front, 3)[0] is front[0] and spread(front, 3)[-1] is front[-1] and len(spread(front, 3)) == 3


def test_a_strategy_is_swept_up_to_its_estimated_capacity():
    s = Strategy.parse("EP1-TP2-PP1-DP4")
    points = sweep_strategy(TINY, s, SMALL, Workload(8, 16, 4), USABLE)
    assert [p.batch for p in points] == [4 * 2 ** k for k in range(len(points))] and len(points) > 2
    assert all(p.estimate.fits and p.estimate.memory_bytes <= USABLE for p in points)
    beyond = estimate(TINY, s, SMALL, Workload(points[-1].batch * 2, 16, 4))
    assert beyond.memory_total > USABLE                                # the next batch would not fit
    assert [p.batch for p in sweep_strategy(TINY, s, SMALL, Workload(8, 16, 4), USABLE, max_batch=16)] == [4, 8, 16]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return SearchSpec(TINY, 8, SMALL, Workload(8, 16, 4), backend="cpu", top=2, workers=1,
                      cache_dir=tmp_path_factory.mktemp("cache"))


def test_sweep_compiles_the_front_and_picks_within_the_slo(spec):
    sweep = run_sweep(dataclasses.replace(spec, slo_tpot=1.0))
    assert sweep.front and all(p.on_front for p in sweep.front)
    fitting = [p for p in sweep.points if p.estimate.fits]
    assert all(not _dominates(q, p) for p in sweep.front for q in fitting)
    assert sweep.front[0] is max(fitting, key=lambda p: p.per_device)
    assert sweep.front[0].compiled and sweep.front[-1].compiled          # the front's ends are compiled
    c = sweep.chosen
    assert c is not None and c.compiled.meets(None, 1.0) and c.compiled.tpot_s <= 1.0 and not sweep.message
    d = sweep.to_dict()
    assert d["chosen"]["compiled"]["tokens_per_s_per_device"] == pytest.approx(c.compiled.throughput_tok_s / 8)
    assert d["max_concurrency"] and all(v["max_concurrency"] > 0 for v in d["max_concurrency"].values())


def test_sweep_says_when_no_point_meets_the_slo(spec):
    sweep = run_sweep(dataclasses.replace(spec, slo_ttft=1e-9, slo_tpot=1e-9))
    assert sweep.chosen is None and sweep.closest is not None
    assert sweep.message.startswith("no swept point meets TTFT <= 1e-06 ms and TPOT <= 1e-06 ms; the closest is "
                                    f"{sweep.closest.strategy} at batch {sweep.closest.batch}")
    best = min(sweep.points, key=lambda p: p.best_known.miss(1e-9, 1e-9))
    assert sweep.closest.best_known.miss(1e-9, 1e-9) == best.best_known.miss(1e-9, 1e-9)


def test_plan_sweep_cli_writes_the_plot_and_the_json(tmp_path, capsys):
    hw = tmp_path / "small.toml"
    hw.write_text(HW_TOML)
    out, md = tmp_path / "plan.json", tmp_path / "best.md"
    with pytest.raises(SystemExit) as e:
        main(["plan", "--model", "tiny", "--devices", "8", "--hardware", str(hw), "--batch", "8", "--prompt-len", "16",
              "--gen-len", "4", "--top", "1", "--workers", "1", "--backend", "cpu", "--cache", str(tmp_path / "c"),
              "--sweep", "--slo-tpot", "200ms", "--json", str(out), "--markdown", str(md)])
    assert e.value.code == 0
    data = json.loads(out.read_text())
    sweep = data["sweep"]
    assert sweep["slo_tpot_s"] == pytest.approx(0.2) and sweep["headroom"] == 0.1 and sweep["front"]
    assert sweep["chosen"]["compiled"]["tpot_s"] <= 0.2 and sweep["chart"] == "best.sweep.png"
    assert {"estimate", "compiled", "batch", "strategy", "on_front"} <= set(sweep["front"][0])
    assert data["headroom"] == 0.1 and data["best"]["max_concurrency"] == data["max_concurrency"][data["best"][
        "strategy"]["name"]]
    assert data["best"]["max_concurrency"]["max_concurrency"] > 0
    png = tmp_path / "best.sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = md.read_text()
    assert "## Load sweep" in text and "![load sweep](best.sweep.png)" in text and "## Capacity" in text
    printed = capsys.readouterr().out
    assert "Load sweep:" in printed and "sweep pick (TPOT <= 200 ms)" in printed and "Capacity" in printed
