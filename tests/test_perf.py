"""The time model against hand calculations, on hand-made costs."""

import dataclasses
import re

import pytest

from moe_jax.costs.types import CollectiveCost, MemoryBreakdown, OpCost, PhaseCost
from moe_jax.errors import MoeJaxError
from moe_jax.hardware.presets import LinkTier, get_hardware, hardware_names
from moe_jax.perf.collectives import collective_seconds, group_span, one_tier
from moe_jax.perf.timemodel import collective_time, link_for, memory_kind, op_seconds, op_time, phase_time

H200 = get_hardware("h200")


def test_presets_have_the_reference_figures():
    assert set(hardware_names()) >= {"seed-gpu", "a100-80g", "h100", "h200", "b200", "mi300x", "tpu-v4",
                                     "tpu-v5e", "tpu-v5p", "tpu-v6e"}
    seed = get_hardware("seed-gpu")
    assert (seed.memory_bytes, seed.peak_flops, seed.hbm_bandwidth) == (64e9, 400e12, 1.8e12)
    assert "assumed" in seed.assumptions and seed.source
    # "141 GB" on the datasheet; 141 GiB is what the CUDA driver reports and a program can allocate
    assert (H200.memory_bytes, H200.peak_flops, H200.hbm_bandwidth) == (151_397_597_184, 989e12, 4.8e12)
    assert H200.node_link.bandwidth == 450e9 and H200.network_link.bandwidth == 50e9


def test_pure_compute_op():
    flops = 2 * 8192 ** 3                                   # an 8192^3 matmul, bytes negligible
    seconds, bound = op_time(flops, 3 * 8192 * 8192 * 2, H200, matmul_flops=flops)
    assert bound == "compute"
    assert seconds == pytest.approx(flops / (989e12 * 0.8))


def test_non_matmul_flops_run_at_the_vector_rate():
    # an elementwise/reduction op's FLOPs run on the FP32 vector units (67 TFLOP/s on an H200), not the tensor
    # cores: 14.8x slower per FLOP than the bf16 matmul peak
    # at the fraction XLA:GPU's reduction kernels reached on one H200 (5-6.5 TFLOP/s, bench/RESULTS-gpu.md)
    flops = 1e12
    seconds, bound = op_time(flops, 1.0, H200)
    assert bound == "compute" and H200.peak_vector_flops == 67e12 and H200.vector_efficiency == 0.09
    assert seconds == pytest.approx(flops / (67e12 * 0.09))
    mixed, _ = op_time(3 * flops, 1.0, H200, matmul_flops=2 * flops)
    assert mixed == pytest.approx(2 * flops / (989e12 * 0.8) + flops / (67e12 * 0.09))
    tpu = get_hardware("tpu-v5p")                          # no published vector figure: the matmul peak
    assert tpu.peak_vector_flops == 0 and tpu.achievable_vector_flops == tpu.achievable_flops


def test_pure_memory_op():
    seconds, bound = op_time(1e6, 4.3e9, H200)             # a 4.3 GB copy
    assert bound == "memory"
    assert seconds == pytest.approx(4.3e9 / (4.8e12 * 0.9))


def test_an_op_takes_at_least_the_hardware_op_floor():
    """A GPU kernel takes at least ~1.3 us however little it moves (measured on one H200: decode's 965 tiny
    kernels a step took 1.3 ms, which the roofline put at 0); a TPU preset has no floor measured."""
    tiny = OpCost("loop_add_fusion", "fusion", "other", 64, 0, 0, 512, 48)
    assert op_seconds(tiny, H200) == (1.3e-6, "overhead")
    big = OpCost("copy", "fusion", "other", 0, 0, 0, 4.3e9, 1)
    assert op_seconds(big, H200) == (pytest.approx(4.3e9 / (4.8e12 * 0.9)), "memory")
    tpu = get_hardware("tpu-v5p")
    assert tpu.op_floor_s == 0 and op_seconds(tiny, tpu)[0] < 1e-8
    t = phase_time(PhaseCost("decode", "gpu", True, ops=[tiny]), H200)
    assert t.overhead_s == pytest.approx(48 * 1.3e-6) and t.memory_s == 0


LINK = LinkTier("test link", 100e9, 2e-6, 5e-6, 0.8)            # 80 GB/s reached, 2 us per step, 5 us per call


def test_all_reduce_inside_a_node_and_across_nodes():
    nbytes, n = 64e6, 8
    inside = link_for(list(range(8)), H200)                 # devices 0..7: one node
    across = link_for([0, 8, 16, 24, 32, 40, 48, 56], H200)  # one device per node
    assert inside is H200.node_link and across is H200.network_link
    t_in = collective_time("all-reduce", nbytes, n, inside)
    t_out = collective_time("all-reduce", nbytes, n, across)
    assert t_out > 5 * t_in


def test_all_reduce_is_a_tree_when_small_and_a_ring_when_large():
    # tree: 5 us + 2 log2(8) x 2 us + 2 S / 80 GB/s; ring: 5 us + 14 x 2 us + 2 S 7/8 / 80 GB/s
    assert collective_time("all-reduce", 1e3, 8, LINK) == pytest.approx(5e-6 + 12e-6 + 2e3 / 80e9)
    assert one_tier("all-reduce", 1e3, 8, LINK)[1] == "tree, bulk"
    assert collective_time("all-reduce", 1e9, 8, LINK) == pytest.approx(5e-6 + 28e-6 + 2e9 * 7 / 8 / 80e9)
    assert one_tier("all-reduce", 1e9, 8, LINK)[1] == "ring, bulk"


def test_the_faster_protocol_is_taken():
    # low-latency: 1 us per step at 40% of 100 GB/s; bulk: 4 us per step at 80%, 120% for an all-reduce (in-switch)
    two = LinkTier("two", 100e9, 1e-6, 5e-6, 0.8, bulk_latency_s=4e-6, small_efficiency=0.4,
                   all_reduce_efficiency=1.2)
    small, algo = one_tier("all-reduce", 1e3, 8, two)
    assert small == pytest.approx(5e-6 + 6 * 1e-6 + 2e3 / 40e9) and algo == "tree, low-latency"
    large, algo = one_tier("all-reduce", 1e9, 8, two)
    assert large == pytest.approx(5e-6 + 14 * 4e-6 + 2e9 * 7 / 8 / 120e9) and algo == "ring, bulk"
    gather, algo = one_tier("all-gather", 1e9, 8, two)          # no in-switch reduction for a gather
    assert gather == pytest.approx(5e-6 + 7 * 4e-6 + 1e9 * 7 / 8 / 80e9) and algo == "ring, bulk"
    peers = LinkTier("peers", 100e9, 2e-6, 5e-6, 0.8, per_peer_s=0.1e-6)
    assert collective_time("all-to-all", 8e6, 64, peers) == pytest.approx(
        5e-6 + 2e-6 + 63 * 0.1e-6 + 8e6 * 63 / 64 / 80e9)


def test_other_collective_algorithms():
    assert collective_time("all-gather", 8e6, 4, LINK) == pytest.approx(5e-6 + 3 * 2e-6 + 8e6 * 3 / 4 / 80e9)
    assert collective_time("reduce-scatter", 8e6, 4, LINK) == pytest.approx(5e-6 + 3 * 2e-6 + 8e6 * 3 / 4 / 80e9)
    # pairwise: every peer at once, one step of latency whatever the group size
    assert collective_time("all-to-all", 8e6, 64, LINK) == pytest.approx(5e-6 + 2e-6 + 8e6 * 63 / 64 / 80e9)
    assert collective_time("collective-permute", 8e6, 2, LINK) == pytest.approx(5e-6 + 2e-6 + 8e6 / 80e9)
    assert collective_time("all-reduce", 8e6, 1, LINK) == 0.0
    with pytest.raises(ValueError, match="unknown collective kind 'all-sum'"):
        collective_time("all-sum", 8e6, 4, LINK)


def test_collectives_spanning_nodes_are_hierarchical():
    hw = dataclasses.replace(H200, node_link=LinkTier("node", 400e9, 1e-6, 15e-6, 1.0),
                             network_link=LinkTier("net", 50e9, 5e-6, 10e-6, 1.0))
    group = list(range(16))                                   # 2 nodes of 8
    span = group_span(group, hw)
    assert (span.size, span.nodes, span.per_node, span.tiers) == (16, 2, 8, "hierarchical")
    S = 32e6
    t, algo = collective_seconds("all-to-all", S, span, hw)
    # 8/16 of the buffer leaves through the network while 7/16 crosses NVLink: the network's share decides
    assert t == pytest.approx(10e-6 + 5e-6 + max(S * 8 / 16 / 50e9, S * 7 / 16 / 400e9))
    assert "pairwise" in algo
    # stages pipelined: their latencies add, their transfers overlap (the slowest decides)
    def lat_and_bytes(kind, nbytes, n, link):
        lat = one_tier(kind, 0.0, n, link)[0]
        return lat, one_tier(kind, nbytes, n, link)[0] - lat

    t, algo = collective_seconds("all-reduce", S, span, hw)
    stages = [lat_and_bytes("reduce-scatter", S, 8, hw.node_link), lat_and_bytes("all-gather", S, 8, hw.node_link),
              lat_and_bytes("all-reduce", S / 8, 2, hw.network_link)]
    assert t == pytest.approx(sum(lat for lat, _ in stages) + max(b for _, b in stages))
    assert algo.startswith("hierarchical")
    t, _ = collective_seconds("all-gather", S, span, hw)
    stages = [lat_and_bytes("all-gather", S / 8, 2, hw.network_link), lat_and_bytes("all-gather", S, 8, hw.node_link)]
    assert t == pytest.approx(sum(lat for lat, _ in stages) + max(b for _, b in stages))
    # a tiny all-reduce is one tree over all 16 members on the network tier (cheaper than three stages)
    t, algo = collective_seconds("all-reduce", 64, span, hw)
    assert t == pytest.approx(one_tier("all-reduce", 64, 16, hw.network_link)[0]) and "over 16" in algo
    one_per_node = group_span([0, 8], hw)
    assert one_per_node.tiers == "network"
    assert collective_seconds("all-reduce", S, one_per_node, hw)[0] == one_tier("all-reduce", S, 2, hw.network_link)[0]
    assert group_span(list(range(8)), hw).tiers == "node"


def test_phase_time_sums_ops_and_collectives_with_counts():
    ops = [OpCost("dot", "fusion", "experts", 2e12, 2e12, 0, 1e6, 10),      # compute-bound, 10 times
           OpCost("copy", "copy", "other", 0, 0, 0, 1e9, 3)]                 # memory-bound, 3 times
    coll = [CollectiveCost("all-reduce", ["tp"], 8, 1e6, 5, "attention", "ar", list(range(8)))]
    cost = PhaseCost("decode", "cpu", True, ops=ops, collectives=coll)
    t = phase_time(cost, H200, floor_s=1.0, floor_detail="test")
    assert t.compute_s == pytest.approx(10 * 2e12 / (989e12 * 0.8))
    assert t.memory_s == pytest.approx(3 * 1e9 / (4.8e12 * 0.9))
    assert t.comm_s == pytest.approx(5 * collective_time("all-reduce", 1e6, 8, H200.node_link))
    assert t.call_s == H200.decode_step_overhead_s == 1.1e-3          # the host's cost of one greedy step
    assert t.no_overlap_s == pytest.approx(t.compute_s + t.memory_s + t.comm_s + t.call_s)
    assert t.full_overlap_s == pytest.approx(max(t.compute_s + t.memory_s, t.comm_s) + t.call_s)
    assert phase_time(dataclasses.replace(cost, phase="prefill"), H200).call_s == 0.0
    assert t.total_s == 1.0                                  # the floor wins: never below it
    assert t.comm_breakdown[0]["kind"] == "all-reduce" and t.comm_breakdown[0]["calls"] == 5


def test_hardware_toml(tmp_path):
    good = tmp_path / "gpu.toml"
    good.write_text('name = "my-gpu"\nmemory_bytes = 40e9\npeak_flops = 100e12\nhbm_bandwidth = 1e12\n'
                    'devices_per_node = 4\n[node_link]\nbandwidth = 100e9\nlatency_s = 1e-6\n'
                    '[network_link]\nbandwidth = 10e9\nlatency_s = 5e-6\n')
    hw = get_hardware(str(good))
    assert hw.name == "my-gpu" and hw.devices_per_node == 4 and hw.network_link.bandwidth == 10e9
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("peak_flops", "peak_flop"))
    with pytest.raises(MoeJaxError, match="unknown key 'peak_flop'.*did you mean 'peak_flops'"):
        get_hardware(str(bad))
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(MoeJaxError, match="not valid TOML"):
        get_hardware(str(broken))
    with pytest.raises(MoeJaxError, match="unknown hardware 'h300'.*presets: seed-gpu"):
        get_hardware("h300")


@pytest.mark.parametrize("edit,message", [
    (("peak_flops = 100e12", "peak_flops = nan"), "peak_flops=nan must be a finite number > 1e+09 and <= 1e+19"),
    (("bandwidth = 100e9", "bandwidth = inf"), "[node_link] bandwidth=inf must be a finite number > 1e+06"),
    (("latency_s = 1e-6", "latency_s = \"1us\""), "[node_link] latency_s='1us' must be a finite number >= 0"),
    (("latency_s = 1e-6", "latency_s = -1.0"), "[node_link] latency_s=-1.0 must be a finite number >= 0"),
    (("devices_per_node = 4", "devices_per_node = 0.5"), "devices_per_node=0.5 must be a whole number from 1"),
    (("peak_flops = 100e12", "peak_flops = 100e12\nflops_efficiency = 80"),
     "flops_efficiency=80 must be a finite number > 0 and <= 1"),
    # finite values whose derived times, ratios or bytes would overflow to inf or underflow to 0
    (("bandwidth = 100e9", "bandwidth = 1e-300"), "[node_link] bandwidth=1e-300 must be a finite number > 1e+06"),
    (("memory_bytes = 40e9", "memory_bytes = 1e308"), "memory_bytes=1e+308 must be a finite number > 1e+06"),
    (("peak_flops = 100e12", "peak_flops = 5e-324"), "peak_flops=5e-324 must be a finite number > 1e+09"),
    (("latency_s = 1e-6", "latency_s = 1e300"), "[node_link] latency_s=1e+300 must be a finite number >= 0"),
    (("devices_per_node = 4", "devices_per_node = 9223372036854775807"), "devices_per_node=9223372036854775807"),
    # shapes that are not what a hardware file holds
    (("[node_link]\nbandwidth", "[node_link]\nname = 7\nbandwidth"), "[node_link] name=7 must be a string"),
    (('name = "my-gpu"', 'hardware = "h100"\nname = "my-gpu"'), "[hardware] must be a table"),
])
def test_hardware_toml_values_are_checked(tmp_path, edit, message):
    text = ('name = "my-gpu"\nmemory_bytes = 40e9\npeak_flops = 100e12\nhbm_bandwidth = 1e12\n'
            'devices_per_node = 4\n[node_link]\nbandwidth = 100e9\nlatency_s = 1e-6\n'
            '[network_link]\nbandwidth = 10e9\nlatency_s = 5e-6\n')
    f = tmp_path / "hw.toml"
    f.write_text(text.replace(*edit, 1))
    with pytest.raises(MoeJaxError, match=re.escape(message)):
        get_hardware(str(f))


def test_reports_keep_normal_file_permissions(tmp_path):
    import os

    from moe_jax.files import write_atomic

    new = tmp_path / "new.json"
    write_atomic(new, "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask
    mine = tmp_path / "mine.md"
    mine.write_text("old")
    mine.chmod(0o640)
    write_atomic(mine, "new")
    assert mine.stat().st_mode & 0o777 == 0o640 and mine.read_text() == "new"


def test_a_call_pays_for_the_buffers_it_allocates():
    """A compiled phase's temporaries and its outputs not aliased to an argument are allocated anew each call: on
    the calibration's fresh-buffer curve (XLA:CPU page-faults each 4 KiB page of a large one), in every bound;
    nothing without that curve or without the compiled memory analysis."""
    from moe_jax.hardware.calibration import Calibration, Curve

    fresh = Curve(((1 << 20, 1e-5), (64 << 20, 2.5e-2)))
    cal = Calibration(matmul={"bfloat16": Curve(((1e3, 1e-6), (1e9, 1e-2)))},
                      memory=Curve(((1e3, 2e-7), (1e9, 1e-2))), read_reduce=Curve(((1e3, 2e-7), (1e9, 1e-2))),
                      op_overhead_s=5e-7, fresh_buffer=fresh)
    hw = dataclasses.replace(H200, calibration=cal, decode_step_overhead_s=0.0)
    memory = MemoryBreakdown(weights=1 << 30, kv_cache=1 << 20, tokens=0, arguments=(1 << 30) + (1 << 20),
                             outputs=(1 << 20) + (1 << 20), aliased=1 << 20, temporaries=128 << 20,
                             generated_code=0, source="cpu memory_analysis()")
    cost = PhaseCost("prefill", "real", True, memory=memory, ops=[OpCost("add", "fusion", "other", 0, 0, 0, 1e9, 1)])
    t = phase_time(cost, hw)
    assert t.fresh_s == pytest.approx(5e-2 + 1e-5)              # 128 MiB of temporaries + the 1 MiB new output
    assert t.total_s == pytest.approx(t.memory_s + t.fresh_s) and t.no_overlap_s == pytest.approx(t.total_s)
    assert t.full_overlap_s == pytest.approx(t.total_s)
    assert phase_time(dataclasses.replace(cost, memory=dataclasses.replace(memory, source="analytic")), hw).fresh_s == 0
    assert phase_time(cost, dataclasses.replace(hw, calibration=dataclasses.replace(cal, fresh_buffer=None))
                      ).fresh_s == 0
    assert phase_time(cost, H200).fresh_s == 0                   # a datasheet preset: no such term


def test_calibrated_hardware_times_ops_on_its_curves():
    from moe_jax.hardware.calibration import Calibration, Curve

    cal = Calibration(matmul={"bfloat16": Curve(((1e3, 1e-6), (1e9, 1e-2)))},
                      memory=Curve(((1e3, 2e-7), (1e9, 1e-2))), read_reduce=Curve(((1e3, 2e-7), (1e9, 1e-2))),
                      op_overhead_s=5e-7, call_s=1e-4, call_per_argument_s=1e-6)
    hw = dataclasses.replace(H200, calibration=cal)
    big = OpCost("dot", "fusion", "experts", 1e9, 1e9, 0, 1e3, 1)
    assert op_seconds(big, hw) == (pytest.approx(1e-2), "compute")             # on the curve, not at 80% of peak
    copy = OpCost("copy", "copy", "other", 0, 0, 0, 1e9, 1)
    assert op_seconds(copy, hw) == (pytest.approx(1e-2), "memory")
    assert memory_kind(OpCost("wrapped_convert", "fusion", "other", 0, 0, 0, 1, 1)) == "convert"
    assert memory_kind(OpCost("transpose_copy_fusion", "fusion", "other", 0, 0, 0, 1, 1)) == "transpose"
    assert memory_kind(copy) == "copy"
    fused = OpCost("copy_bitcast_fusion", "fusion", "experts", 0, 0, 0, 1, 1, kind="transpose")
    assert memory_kind(fused) == "transpose"                                   # what it fuses, not its name
    slow = dataclasses.replace(hw, calibration=dataclasses.replace(cal, kinds={"convert": Curve(((1e3, 1e-6),
                                                                                                  (1e9, 5e-2)))}))
    assert op_seconds(OpCost("wrapped_convert", "fusion", "other", 0, 0, 0, 1e9, 1), slow)[0] == pytest.approx(5e-2)
    exp = OpCost("softmax", "fusion", "attention", 0, 0, 1e6, 8e6, 1)
    timed = dataclasses.replace(hw, calibration=dataclasses.replace(cal, transcendental=Curve(((1e3, 1e-6),
                                                                                                (1e9, 1.0)))))
    assert op_seconds(exp, timed) == (pytest.approx(1e-3), "compute")         # 1e6 exp at 1e9 per second
    tiny = OpCost("add", "fusion", "other", 10, 0, 0, 16, 1)
    assert op_seconds(tiny, hw) == (5e-7, "overhead")                           # never under one tiny op
    hlo = ("HloModule m, is_scheduled=true\n\nENTRY %main (a: f32[4], b: f32[4]) -> f32[4] {\n"
           "  %a = f32[4]{0} parameter(0)\n  %b = f32[4]{0} parameter(1)\n"
           "  ROOT %dot = f32[4]{0} add(%a, %b)\n}\n")
    cost = PhaseCost("decode", "real", True, ops=[OpCost("dot", "add", "other", 1e9, 1e9, 0, 1e3, 1)], hlo_text=hlo)
    t = phase_time(dataclasses.replace(cost, phase="prefill"), hw)
    assert t.call_s == pytest.approx(1e-4 + 2 * 1e-6)                          # two argument arrays
    assert phase_time(cost, hw).call_s == hw.decode_step_overhead_s            # a decode step: the larger
    assert t.scheduled_s == pytest.approx(1e-2) and t.total_s == pytest.approx(1e-2 + t.call_s)
