"""Capacity (max concurrency): the compiled programs' memory split into fixed and per-sequence bytes, checked
against a hand computation on the tiny model, against a compile at the capacity itself, and through the CLI."""

import dataclasses
import json
import math

import pytest

from moe_jax.cli import main
from moe_jax.config import get_model
from moe_jax.costs.compile import Workload
from moe_jax.errors import MoeJaxError
from moe_jax.hardware.presets import get_hardware
from moe_jax.parallel.mesh import Strategy
from moe_jax.perf.analysis import analyze
from moe_jax.planner.capacity import TWO_BATCHES, capacity

TINY = get_model("tiny")
STRATEGY = Strategy.parse("EP2-TP2-PP1-DP2")
SMALL = dataclasses.replace(get_hardware("h100"), name="small", memory_bytes=2_000_000)
"""2 MB per device: the tiny model's capacity lands in the tens of sequences, so it can be compiled."""


@pytest.fixture(scope="module")
def compiled():
    """The tiny model on EP2-TP2-PP1-DP2 (8 CPU devices) compiled at batch 8 and 32: analyze JSON by batch."""
    return {b: analyze(TINY, STRATEGY, SMALL, Workload(b, 16, 4), backend="cpu").to_dict() for b in (8, 32)}


def test_capacity_matches_a_hand_computation(compiled):
    a = compiled[8]
    c = capacity(a, headroom=0.1)
    # KV cache per sequence, by hand: L layers x (k and v) x the K/tp heads of a tp rank x T positions x Dh
    # x 2 bytes (bf16), the batch split over dp x ep (each device's attention holds batch / 4 sequences)
    L, K, Dh, T = TINY.num_layers, TINY.num_kv_heads, TINY.head_dim, 16 + 4
    kv_per_sequence = L * 2 * (K // STRATEGY.tp) * T * Dh * 2 / (STRATEGY.dp * STRATEGY.ep)
    assert c.kv_per_sequence_bytes == kv_per_sequence == 2560
    usable = 2_000_000 - 200_000
    counts = {}
    for phase, p in a["phases"].items():
        m = p["memory"]
        fixed = m["weights"] + (m["arguments"] - m["weights"] - m["kv_cache"] - m["tokens"])
        per_sequence = kv_per_sequence + (m["temporaries"] + m["tokens"] + m["outputs"] - m["aliased"]) / 8
        counts[phase] = math.floor((usable - fixed) / per_sequence)
        assert c.phases[phase].fixed_bytes == fixed and c.phases[phase].per_sequence_bytes == pytest.approx(
            per_sequence)
        # fixed + per sequence x batch rebuilds the compiled peak at the compiled batch
        assert fixed + per_sequence * 8 == pytest.approx(m["peak"])
    limiting = min(counts, key=counts.get)
    assert c.limiting_phase == limiting
    assert c.max_concurrency == counts[limiting] // 2 * 2 > 8          # a multiple of dp = 2
    assert c.per_replica == c.max_concurrency // 2
    assert (c.headroom_bytes, c.usable_bytes, c.compiled_batch, c.context_len) == (200_000, usable, 8, 20)
    assert c.method == "per-sequence at the compiled batch" and not c.capped


def test_the_capacity_compiled_fits_the_usable_memory(compiled):
    """A lower bound: the programs compiled at the capacity's batch fit the memory less the headroom."""
    c = capacity(compiled[8], headroom=0.1)
    at = analyze(TINY, STRATEGY, SMALL, Workload(c.max_concurrency, 16, 4), backend="cpu").to_dict()
    assert max(p["memory"]["peak"] for p in at["phases"].values()) <= c.usable_bytes


def test_two_compiled_batches_count_fixed_temporaries_once(compiled):
    one = capacity(compiled[32], headroom=0.1)
    two = capacity(compiled[8], headroom=0.1, other=compiled[32])      # either order: the larger batch leads
    assert two.method == TWO_BATCHES and (two.other_batch, two.compiled_batch) == (8, 32)
    for phase, p in two.phases.items():
        low, high = compiled[8]["phases"][phase]["memory"], compiled[32]["phases"][phase]["memory"]
        slope = (high["peak"] - low["peak"]) / 24
        assert p.per_sequence_bytes == pytest.approx(max(slope, 2560))
        assert p.fixed_bytes >= high["weights"]
        assert p.fixed_bytes + p.per_sequence_bytes * 32 >= high["peak"] - 1    # never below the larger compile
    assert two.max_concurrency >= one.max_concurrency        # one batch takes every temporary per sequence


def test_capacity_inputs_are_checked(compiled):
    with pytest.raises(MoeJaxError, match=r"--headroom 1.5 must be a fraction of device memory in \[0, 1\)"):
        capacity(compiled[8], headroom=1.5)
    other = json.loads(json.dumps(compiled[32]))
    other["workload"]["prompt_len"] = 64
    with pytest.raises(MoeJaxError, match="one strategy and context"):
        capacity(compiled[8], other=other)
    failed = json.loads(json.dumps(compiled[8]))
    failed["phases"]["decode"]["memory"] = None
    assert capacity(failed) is None


def test_analyze_reports_max_concurrency(tmp_path, capsys):
    hw = tmp_path / "small.toml"
    hw.write_text('name = "small"\nmemory_bytes = 2e6\npeak_flops = 100e12\nhbm_bandwidth = 1e12\n'
                  'devices_per_node = 8\n[node_link]\nbandwidth = 100e9\nlatency_s = 1e-6\n'
                  '[network_link]\nbandwidth = 10e9\nlatency_s = 5e-6\n')
    out, md = tmp_path / "a.json", tmp_path / "a.md"
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--model", "tiny", "--mesh", "EP2-TP2-PP1-DP2", "--hardware", str(hw), "--batch", "8",
              "--prompt-len", "16", "--gen-len", "4", "--backend", "cpu", "--headroom", "0.2", "--json", str(out),
              "--markdown", str(md)])
    assert e.value.code == 0
    data = json.loads(out.read_text())
    cap = data["max_concurrency"]
    assert cap["headroom"] == 0.2 and cap["headroom_bytes"] == 400_000 and cap["strategy"] == "EP2-TP2-PP1-DP2"
    assert cap["max_concurrency"] == capacity(data, headroom=0.2).max_concurrency > 0
    assert {"fixed_bytes", "per_sequence_bytes", "kv_per_sequence_bytes", "method"} <= set(cap)
    text = md.read_text()
    assert "## Capacity (max concurrency)" in text and f"| EP2-TP2-PP1-DP2 | {cap['max_concurrency']} |" in text
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--model", "tiny", "--headroom", "1"])
    assert e.value.code == 2 and "--headroom 1.0 must be a fraction" in capsys.readouterr().err
