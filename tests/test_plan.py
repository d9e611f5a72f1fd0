"""The planner: enumeration, ranking, SLOs, infeasible searches, the compile cache."""

import itertools
import json
import re

import pytest

from moe_jax.cli import main
from moe_jax.config import get_model
from moe_jax.costs.compile import Workload
from moe_jax.hardware.presets import get_hardware
from moe_jax.parallel.mesh import Strategy
from moe_jax.planner.cache import cache_key
from moe_jax.planner.search import enumerate_strategies, fewest_devices, plan, rank_estimates


def _brute_force(cfg, n, batch):
    """Count valid strategies without moe_jax.parallel.mesh.validate."""
    count = 0
    for ep, tp, pp in itertools.product(range(1, n + 1), repeat=3):
        if n % (ep * tp * pp):
            continue
        dp = n // (ep * tp * pp)
        K, t = cfg.num_kv_heads, tp
        ok = (cfg.num_experts % ep == 0 and cfg.num_heads % t == 0 and cfg.expert_ffn % t == 0
              and cfg.vocab_size % t == 0 and (K % t == 0 or t % K == 0)
              and cfg.num_layers % pp == 0 and batch % dp == 0)
        count += ok
    return count


@pytest.mark.parametrize("model,n,batch", [("tiny", 8, 8), ("tiny", 12, 6), ("seed-30b", 64, 128),
                                           ("mixtral-8x7b", 32, 16), ("qwen3-30b-a3b", 48, 96)])
def test_enumeration_matches_brute_force(model, n, batch):
    cfg = get_model(model)
    found = enumerate_strategies(cfg, n, batch)
    assert len(found) == _brute_force(cfg, n, batch) > 0
    assert len({s.name for s in found}) == len(found)
    assert all(s.num_devices == n for s in found)


SEED, SEED_GPU, WORK = get_model("seed-30b"), get_hardware("seed-gpu"), Workload()


@pytest.mark.parametrize("objective,key,reverse", [("throughput", "throughput_tok_s", True), ("ttft", "ttft_s", False),
                                                   ("tpot", "tpot_s", False)])
def test_ranking_follows_the_objective(objective, key, reverse):
    rows = rank_estimates(SEED, 64, SEED_GPU, WORK, objective=objective)
    feasible = [r for r in rows if r.feasible]
    assert feasible and rows[:len(feasible)] == feasible            # feasible first
    values = [getattr(r, key) for r in feasible]
    assert values == sorted(values, reverse=reverse)


def test_slo_filters():
    rows = rank_estimates(SEED, 64, SEED_GPU, WORK, objective="throughput")
    best_tpot = min(r.tpot_s for r in rows if r.fits)
    limited = rank_estimates(SEED, 64, SEED_GPU, WORK, slo_tpot=best_tpot * 1.5)
    assert all(r.tpot_s <= best_tpot * 1.5 for r in limited if r.feasible)
    assert any(r.fits and not r.feasible for r in limited)
    none = rank_estimates(SEED, 64, SEED_GPU, WORK, slo_tpot=1e-9)
    assert not any(r.feasible for r in none)


def test_fewest_devices_stops_at_the_first_feasible_count():
    n, rows = fewest_devices(SEED, 64, SEED_GPU, WORK)
    counts = sorted({r.devices for r in rows})
    assert counts == [c for c in range(1, n + 1) if enumerate_strategies(SEED, c, WORK.batch)]
    assert any(r.feasible for r in rows if r.devices == n)
    assert not any(r.feasible for r in rows if r.devices < n)
    assert n >= 2                                                   # 79 GB of weights + KV exceed 64 GB
    again, _ = fewest_devices(SEED, 64, SEED_GPU, WORK, start=n + 1)  # escalation continues past n
    assert again is None or again > n


def test_nothing_fits_names_the_smallest_shortfall(tmp_path):
    result = plan(SEED, 1, SEED_GPU, WORK, top=1, workers=1, cache_dir=tmp_path)
    assert result.best is None
    assert "nothing feasible" in result.message and "GB over 64 GB" in result.message
    assert result.to_dict()["best"] is None


def test_cache_second_run_compiles_nothing_and_truncated_entries_recompute(tmp_path):
    cfg = get_model("tiny")
    hw, work = get_hardware("h100"), Workload(8, 16, 4)
    first = plan(cfg, 8, hw, work, top=2, workers=1, cache_dir=tmp_path)
    assert first.best and first.to_dict()["compiled"] == 2
    assert not any(r.cached for r in first.candidates)
    second = plan(cfg, 8, hw, work, top=2, workers=1, cache_dir=tmp_path)
    compiled = [r for r in second.candidates if r.compiled]
    assert len(compiled) == 2 and all(r.cached for r in compiled)
    assert second.best == first.best
    victim = tmp_path / f"{cache_key(cfg, Strategy.parse(first.best), work, 'auto', hw, None)}.json"
    victim.write_text(victim.read_text()[: len(victim.read_text()) // 2])   # truncated by a crash
    third = plan(cfg, 8, hw, work, top=2, workers=1, cache_dir=tmp_path)
    redone = next(r for r in third.candidates if r.strategy == first.best)
    assert redone.compiled and not redone.cached
    assert json.loads(victim.read_text())["payload"]["strategy"] == first.best


def test_plan_cli_with_baseline(tmp_path, capsys):
    md = tmp_path / "best.md"
    out = tmp_path / "plan.json"
    with pytest.raises(SystemExit) as e:
        main(["plan", "--model", "tiny", "--devices", "8", "--hardware", "h100", "--batch", "8", "--prompt-len", "16",
              "--gen-len", "4", "--top", "2", "--workers", "1", "--baseline", "EP2-TP2-PP2", "--cache",
              str(tmp_path / "cache"), "--json", str(out), "--markdown", str(md)])
    assert e.value.code == 0
    data = json.loads(out.read_text())
    assert data["best"]["strategy"]["devices"] == 8 and data["baseline"]["strategy"]["name"] == "EP2-TP2-PP2-DP1"
    assert data["searched"] == len(data["candidates"]) and data["compiled"] == 3
    assert {"strategy", "fits", "ttft_s", "tpot_s", "throughput_tok_s", "compiled"} <= set(data["candidates"][0])
    text = md.read_text()
    assert "Compared with the baseline EP2-TP2-PP2-DP1" in text and "x the best" in text
    # the ranked table, as the terminal shows it: every searched strategy (up to 20), the compiled ones marked
    assert f"## Strategies searched: {data['searched']}, 3 compiled" in text
    ranked = [line for line in text.splitlines() if re.match(r"\| \d+ \| EP", line)]
    assert len(ranked) == min(20, data["searched"])
    assert sum("| compiled" in line for line in ranked) == 3 and "EP2-TP2-PP2-DP1 (baseline)" in text
    for name in ("best.baseline.md", "best.pareto.png", "best.memory.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "best:" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--devices", "0"], "0 must be at least 1"),
    (["--devices", "8", "--objective", "speed"], "Invalid value for '--objective'"),
    (["--devices", "64", "--baseline", "EP3"], "ep=3 does not divide 64 experts"),
    (["--devices", "64", "--slo-tpot", "-1"], "--slo-tpot -1.0 must be a positive number"),
    (["--devices", "64", "--markdown", "/no/such/dir/x.md"], "directory '/no/such/dir' does not exist"),
])
def test_plan_bad_input(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["plan", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
