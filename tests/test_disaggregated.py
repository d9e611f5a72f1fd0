"""Disaggregated serving (`plan --disaggregated`): pool sizing and the KV transfer against hand computations, a
plan of the tiny model on 8 CPU devices with both pools compiled, the CLI's JSON, and the errors users can cause."""

import dataclasses
import json
import math

import pytest

from moe_jax.cli import main
from moe_jax.config import get_model
from moe_jax.costs.compile import Workload
from moe_jax.errors import MoeJaxError
from moe_jax.hardware.presets import LinkTier, get_hardware
from moe_jax.parallel.mesh import Strategy
from moe_jax.planner.disaggregated import (
    PhaseCandidate,
    check_rate,
    distinct,
    kv_transfer,
    plan_disaggregated,
    size_pools,
)
from moe_jax.planner.search import plan
from moe_jax.planner.spec import SearchSpec

TINY = get_model("tiny")
HW_TOML = ('name = "small"\nmemory_bytes = 2e6\npeak_flops = 100e12\nhbm_bandwidth = 1e12\ndevices_per_node = 8\n'
           '[node_link]\nbandwidth = 100e9\nlatency_s = 1e-6\n[network_link]\nbandwidth = 10e9\nlatency_s = 5e-6\n')
"""2 MB per device, links with one protocol, no call overhead and full efficiency: a transfer takes
latency + bytes / bandwidth."""
WORKLOAD = Workload(8, 16, 4)
BYTES = 16 * TINY.kv_bytes_per_token                       # one request's prompt: 16 tokens


def test_pools_are_sized_for_a_budget_as_by_hand():
    # prefill 10 requests/s on 1 device, decode 3 on 2, 8 devices: x = 1, y = 3 serves min(10, 9) = 9 on 7
    # devices; x = 2, y = 3 also serves 9 but on 8; x = 4, y = 2 serves 6
    p = size_pools(10.0, 1, 3.0, 2, budget=8)
    assert (p.prefill_replicas, p.decode_replicas, p.devices, p.served_rate) == (1, 3, 7, 9.0)
    assert p.limited_by == "decode" and p.to_dict()["idle_devices"] == 1
    # prefill 2 on 2 devices, decode 10 on 1: x = 1, 2, 3 give min(2, 60), min(4, 40), min(6, 20): x = 3, y = 2
    p = size_pools(2.0, 2, 10.0, 1, budget=8)
    assert (p.prefill_replicas, p.decode_replicas, p.devices, p.served_rate, p.limited_by) == (3, 2, 8, 6.0,
                                                                                            "prefill")
    assert size_pools(1.0, 4, 1.0, 4, budget=7) is None                 # not one replica of each


def test_pools_are_sized_for_a_rate_as_by_hand():
    # 25 requests/s: ceil(25 / 10) = 3 prefill replicas of 1 device, ceil(25 / 3) = 9 decode replicas of 2
    p = size_pools(10.0, 1, 3.0, 2, rate=25.0)
    assert (p.prefill_replicas, p.decode_replicas, p.devices) == (3, 9, 21)
    assert p.prefill_rate == 30.0 and p.decode_rate == 27.0 and p.served_rate == 27.0 >= 25.0
    assert size_pools(10.0, 1, 2.5, 1, rate=25.0).decode_replicas == 10        # exactly divisible: no extra


def _hw(devices_per_node=8):
    return dataclasses.replace(get_hardware("h100"), name="small", memory_bytes=2_000_000,
                               devices_per_node=devices_per_node, calibration=None,
                               node_link=LinkTier("test-node", 100e9, 1e-6),
                               network_link=LinkTier("test-net", 10e9, 5e-6))


def test_kv_transfer_takes_bytes_over_bandwidth_plus_latency():
    # 16 prompt tokens x 1024 B; the prefill replica splits a sequence's cache 2 ways, the decode replica 4:
    # the prefill side's half crosses one link
    node = kv_transfer(_hw(), 16, 1024, 2, 4, devices=8)
    assert node.bytes_per_request == 16384 and node.bytes_per_link == 8192
    assert node.tier == "node" and node.link == "test-node" and node.bandwidth == 100e9
    assert node.seconds == pytest.approx(1e-6 + 8192 / 100e9, rel=1e-12)
    # 8 devices over nodes of 4: the pools sit on different nodes; the network link
    net = kv_transfer(_hw(devices_per_node=4), 16, 1024, 2, 4, devices=8, sequences_per_prefill_device=3)
    assert net.tier == "network" and net.link == "test-net" and "different nodes" in net.why
    assert net.seconds == pytest.approx(5e-6 + 8192 / 10e9, rel=1e-12)
    assert net.batch_seconds == pytest.approx(5e-6 + 3 * 8192 / 10e9, rel=1e-12)


def test_kv_transfer_sends_only_the_rings_of_sliding_layers():
    """gpt-oss-120b, a 4,096-token prompt: its 18 sliding layers send their last 128 positions, not 4,096; the
    sentence gives both figures."""
    from moe_jax.config import get_model
    from moe_jax.reporting.disaggregated import kv_text

    cfg = get_model("gpt-oss-120b")
    per_layer = cfg.kv_bytes_per_token // cfg.num_layers
    nbytes = cfg.kv_bytes(4096)
    assert nbytes == per_layer * (18 * 4096 + 18 * 128) < 4096 * cfg.kv_bytes_per_token
    kv = kv_transfer(_hw(), 4096, cfg.kv_bytes_per_token, 1, 1, devices=2, nbytes=nbytes)
    assert kv.bytes_per_request == nbytes
    text = kv_text({"kv_transfer": kv.to_dict()})
    assert "4,096 prompt tokens x 73,728 B" in text and "rings" in text


def test_each_phase_is_ranked_on_its_own_figure_and_the_shortlist_skips_dp_copies():
    def cand(phase, name, ttft, tpot):
        n = Strategy.parse(name).num_devices
        return PhaseCandidate(phase, name, n, n, 4, {"fits": True, "ttft_s": ttft, "tpot_s": tpot, "memory_bytes": 0})

    # prompts/s per device: b / TTFT / n = 1 / TTFT for b = n; decode tokens/s per device: 1 / TPOT
    pre = sorted([cand("prefill", "EP1-TP2-PP1-DP1", 1.0, 9.0), cand("prefill", "EP1-TP2-PP1-DP2", 1.0, 9.0),
                  cand("prefill", "EP2-TP1-PP1-DP1", 2.0, 1.0), cand("prefill", "EP1-TP1-PP2-DP1", 0.5, 9.0)],
                 key=PhaseCandidate.rank_key)
    assert [c.strategy for c in pre] == ["EP1-TP1-PP2-DP1", "EP1-TP2-PP1-DP1", "EP1-TP2-PP1-DP2", "EP2-TP1-PP1-DP1"]
    assert [c.strategy for c in distinct(pre, 3)] == ["EP1-TP1-PP2-DP1", "EP1-TP2-PP1-DP1", "EP2-TP1-PP1-DP1"]
    dec = sorted([cand("decode", c.strategy, c.estimate["ttft_s"], c.estimate["tpot_s"]) for c in pre],
                 key=PhaseCandidate.rank_key)
    assert dec[0].strategy == "EP2-TP1-PP1-DP1" and dec[0].per_device() == pytest.approx(1.0)    # 2 / 1 s / 2
    slow = dataclasses.replace(dec[0], slo_tpot=0.5)          # misses its TPOT SLO: ranked after those that meet it
    assert not slow.meets_slo() and sorted([slow, dataclasses.replace(dec[1], slo_tpot=10.0)],
                                           key=PhaseCandidate.rank_key)[0] is not slow


def _shards(name: str) -> int:
    """Devices one sequence's cache is split over, by hand: pp stages x the tp ranks holding distinct KV heads
    (K = 4: tp = 8 holds each head twice)."""
    s = Strategy.parse(name)
    return s.pp * min(s.tp, TINY.num_kv_heads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The hardware file, a compile cache the CLI test shares, and the aggregated plan on 8 CPU devices."""
    root = tmp_path_factory.mktemp("disagg")
    hw_file = root / "small.toml"
    hw_file.write_text(HW_TOML)
    hw = get_hardware(str(hw_file))
    result = plan(TINY, 8, hw, WORKLOAD, backend="cpu", top=1, workers=1, cache_dir=root / "cache")
    return hw_file, root / "cache", result


def test_disaggregated_plan_compiles_both_pools(setup):
    _, _, result = setup
    steps = []
    d = plan_disaggregated(result.spec, result, top=1, progress=lambda kind, *rest: steps.append(kind))
    c = d.chosen
    assert c is not None and not d.message
    assert "disaggregated compile" in steps and "disaggregated estimate" in steps
    for phase in (c.prefill, c.decode):                      # both pools compiled, at their replicas' batch
        assert phase.compiled is not None and phase.analysis["strategy"]["name"] == phase.strategy
        assert phase.devices < 8 and phase.batch == 8 * phase.devices // 8
        assert phase.analysis["workload"]["batch"] == phase.batch
    p, dec = c.prefill.compiled, c.decode.compiled
    assert c.prefill.requests_per_s() == pytest.approx(c.prefill.batch / p["ttft_s"])
    assert c.decode.requests_per_s() == pytest.approx(c.decode.batch / (4 * dec["tpot_s"]))
    pools = c.pools
    assert pools.devices <= 8 and pools.prefill_replicas >= 1 and pools.decode_replicas >= 1
    assert pools == size_pools(c.prefill.requests_per_s(), c.prefill.devices, c.decode.requests_per_s(),
                               c.decode.devices, budget=8)
    # the KV transfer by hand: the node link (8 devices in a node of 8), the larger shard on one link
    per_link = BYTES / min(_shards(c.prefill.strategy), _shards(c.decode.strategy))
    assert c.kv.bytes_per_request == BYTES and c.kv.tier == "node" and c.kv.bandwidth == 100e9
    assert c.kv.seconds == pytest.approx(1e-6 + per_link / 100e9, rel=1e-12)
    assert c.ttft_s == pytest.approx(p["ttft_s"] + c.kv.seconds)
    # the comparison: the aggregated plan's compiled strategy, B / (TTFT + G x TPOT) requests/s on 8 devices
    cmp = d.comparison
    agg = result.compiled[cmp["aggregated"]["strategy"]]["analysis"]
    rate = 8 / (agg["ttft_s"] + 4 * agg["tpot_s"])
    assert cmp["aggregated"]["requests_per_s"] == pytest.approx(rate) and cmp["aggregated"]["devices"] == 8
    assert cmp["disaggregated"]["requests_per_s"] == pytest.approx(pools.served_rate)
    assert cmp["disaggregated"]["tokens_per_s_per_device"] == pytest.approx(pools.served_rate * 4 / pools.devices)
    winner = "disaggregated" if pools.served_rate > rate else "aggregated"
    assert cmp["winner"] == winner and cmp["statement"].startswith(f"{winner} wins: ")
    assert cmp["ratio"] == pytest.approx(max(rate, pools.served_rate) / min(rate, pools.served_rate))
    out = d.to_dict()
    assert {"prefill", "decode", "pools", "kv_transfer", "comparison"} <= set(out)
    assert json.loads(json.dumps(out))["kv_transfer"]["seconds"] == pytest.approx(c.kv.seconds)

    # for a rate: ceil(rate / replica rate) replicas of each, compiled from the cache
    r = plan_disaggregated(result.spec, result, top=1, rate=3 * c.decode.requests_per_s())
    rp = r.chosen.pools
    assert rp.rate is not None and rp.decode_replicas == math.ceil(3 * c.decode.requests_per_s()
                                                                   / r.chosen.decode.requests_per_s() - 1e-12)
    assert rp.served_rate >= rp.rate and r.comparison["disaggregated"]["devices"] == rp.devices


def test_too_small_a_budget_is_named():
    hw = dataclasses.replace(_hw(), memory_bytes=800_000)    # one device does not hold the tiny model's weights
    spec = SearchSpec(TINY, 2, hw, WORKLOAD, backend="cpu", top=1, workers=1)
    with pytest.raises(MoeJaxError, match=r"^--devices 2 is too small for one prefill and one decode replica: the "
                                          r"smallest replica of tiny that fits is 2 devices \(EP1-TP1-PP2-DP1\), so "
                                          r"the two pools need at least 4"):
        plan_disaggregated(spec)
    with pytest.raises(MoeJaxError, match=r"^--devices 1 is too small .* no replica size below 1"):
        plan_disaggregated(dataclasses.replace(spec, devices=1, hw=_hw()))


@pytest.mark.parametrize("rate", [0, -2.5, float("inf"), float("nan")])
def test_bad_rate_is_named(rate):
    with pytest.raises(MoeJaxError, match=r"^--rate .* must be a positive number of requests per second"):
        check_rate(rate)


@pytest.mark.parametrize("args,message", [(["--disaggregated", "--rate", "0"], "--rate 0.0 must be a positive"),
                                          (["--rate", "5"], "--rate 5 sizes the pools of --disaggregated")])
def test_cli_rejects_bad_rates_before_searching(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--model", "tiny", "--devices", "8", "--backend", "cpu", "--cache", "", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_plan_disaggregated_cli_writes_the_json_object(setup, tmp_path, capsys):
    hw_file, cache, _ = setup
    out, md = tmp_path / "plan.json", tmp_path / "best.md"
    with pytest.raises(SystemExit) as e:
        main(["plan", "--model", "tiny", "--devices", "8", "--hardware", str(hw_file), "--batch", "8",
              "--prompt-len", "16", "--gen-len", "4", "--top", "1", "--workers", "1", "--backend", "cpu",
              "--cache", str(cache), "--disaggregated", "--json", str(out), "--markdown", str(md)])
    assert e.value.code == 0
    d = json.loads(out.read_text())["disaggregated"]
    assert d["mode"] == "budget" and d["devices"] == 8 and d["rate"] is None
    assert d["prefill"]["compiled"] and d["decode"]["compiled"]
    assert d["pools"]["devices"] <= 8 and d["pools"]["served_rate"] == min(d["pools"]["prefill_rate"],
                                                                          d["pools"]["decode_rate"])
    k = d["kv_transfer"]
    assert k["bytes_per_request"] == BYTES and k["tier"] == "node" and k["link"]
    assert k["seconds"] == pytest.approx(k["latency_s"] + k["bytes_per_link"] / k["bandwidth"])
    assert d["ttft_s"] == pytest.approx(d["prefill"]["compiled"]["ttft_s"] + k["seconds"])
    assert d["comparison"]["winner"] in ("disaggregated", "aggregated", "tie") and d["comparison"]["aggregated"]
    assert "## Disaggregated serving" in md.read_text() and d["comparison"]["statement"] in md.read_text()
    printed = capsys.readouterr().out
    assert "Disaggregated serving (on 8 devices, compiled)" in printed and "KV transfer per request" in printed
