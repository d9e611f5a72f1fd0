"""The compiled-schedule simulation: hand-written scheduled programs with made-up op times, the critical path
worked out by hand in the comments, and one real compiled program checked against its bounds."""

import json
import re

import pytest
from conftest import require_compiler

from moe_jax.costs.hlo import Module
from moe_jax.perf.schedule import Event, Schedule, chrome_trace, merge_traces, simulate

HEADER = "HloModule m, is_scheduled=true\n\n"
ADD = """%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

"""


def entry(*lines: str, computations: str = "") -> str:
    """A scheduled module: the reducer, `computations`, and an entry made of `lines` in order."""
    body = "\n".join(f"  {line}" for line in lines)
    return f"{HEADER}{ADD}{computations}ENTRY %main (p0: f32[8], p1: f32[8]) -> f32[8] {{\n{body}\n}}\n"


def times(table: dict[str, float]):
    """A time callable over `table` (0 for anything not in it, as for ops that move nothing)."""
    return lambda name: table.get(name, 0.0)


def check_bounds(s: Schedule) -> None:
    eps = 1e-12 * max(1.0, s.no_overlap_s)
    assert s.full_overlap_s - eps <= s.total_s <= s.no_overlap_s + eps
    assert 0.0 <= s.exposed_comm_s <= s.comm_busy_s + eps
    assert s.overlapped_comm_s == pytest.approx(s.comm_busy_s - s.exposed_comm_s)
    for track in ("compute", "collectives", "copies"):     # one op at a time on each stream, all within the total
        spans = sorted((e.start_s, e.start_s + e.dur_s) for e in s.events if e.track == track)
        assert all(b[0] >= a[1] - eps for a, b in zip(spans, spans[1:], strict=False)), track
        assert all(0.0 <= start and end <= s.total_s + eps for start, end in spans), track


PARAMS = ["%p0 = f32[8]{0} parameter(0)", "%p1 = f32[8]{0} parameter(1)"]
OVERLAPPED = entry(
    *PARAMS,
    "%a = f32[8]{0} fusion(%p0), kind=kLoop, calls=%add",
    "%ars = f32[8]{0} all-reduce-start(%a), channel_id=1, replica_groups={{0,1}}, to_apply=%add",
    "%b = f32[8]{0} fusion(%p1), kind=kLoop, calls=%add",
    "%c = f32[8]{0} fusion(%b), kind=kLoop, calls=%add",
    "%ard = f32[8]{0} all-reduce-done(%ars)",
    "ROOT %d = f32[8]{0} fusion(%ard, %c), kind=kLoop, calls=%add",
)
OPS = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 1.0}


def test_collective_hidden_behind_independent_compute():
    # a [0,1]; the all-reduce starts at 1 and takes 4: [1,5]; b [1,3], c [3,6]; the done at 6 does not wait;
    # d [6,7]. Total 7 = compute alone; the 4 s of communication are all hidden.
    s = simulate(OVERLAPPED, times(OPS), times({"ars": 4.0}))
    assert s.total_s == pytest.approx(7.0)
    assert (s.compute_busy_s, s.comm_busy_s, s.exposed_comm_s, s.overlapped_comm_s) == (7.0, 4.0, 0.0, 4.0)
    assert s.no_overlap_s == 11.0 and s.full_overlap_s == 7.0
    check_bounds(s)
    [comm] = [e for e in s.events if e.track == "collectives"]
    assert (comm.name, comm.start_s, comm.dur_s, comm.opcode) == ("ars", 1.0, 4.0, "all-reduce-start")
    assert [(e.name, e.start_s) for e in s.events if e.track == "compute"] == [("a", 0), ("b", 1), ("c", 3), ("d", 6)]


def test_collective_longer_than_the_compute_it_overlaps():
    # the all-reduce takes 8: [1,9]; b and c end at 6, so the done waits 3 s; d [9,10]. Total 10 =
    # max(compute 7, a + collective + d = 10); exposed 3, overlapped 5.
    s = simulate(OVERLAPPED, times(OPS), times({"ars": 8.0}))
    assert s.total_s == pytest.approx(10.0)
    assert s.exposed_comm_s == pytest.approx(3.0) and s.overlapped_comm_s == pytest.approx(5.0)
    assert s.full_overlap_s == 8.0 and s.no_overlap_s == 15.0
    check_bounds(s)


def test_collective_not_overlapped_costs_its_whole_time():
    # done right after start: a [0,1], all-reduce [1,5] waited for, b [5,7], c [7,10], d [10,11]: the sum 11
    waited = entry(
        *PARAMS,
        "%a = f32[8]{0} fusion(%p0), kind=kLoop, calls=%add",
        "%ars = f32[8]{0} all-reduce-start(%a), channel_id=1, replica_groups={{0,1}}, to_apply=%add",
        "%ard = f32[8]{0} all-reduce-done(%ars)",
        "%b = f32[8]{0} fusion(%p1), kind=kLoop, calls=%add",
        "%c = f32[8]{0} fusion(%b), kind=kLoop, calls=%add",
        "ROOT %d = f32[8]{0} fusion(%ard, %c), kind=kLoop, calls=%add",
    )
    s = simulate(waited, times(OPS), times({"ars": 4.0}))
    assert s.total_s == s.no_overlap_s == 11.0 and s.exposed_comm_s == 4.0 and s.overlapped_comm_s == 0.0
    # a synchronous all-reduce (XLA:CPU) in the same place: the same 11
    sync = OVERLAPPED.replace("all-reduce-start(%a)", "all-reduce(%a)").replace(
        "%ard = f32[8]{0} all-reduce-done(%ars)", "%ard = f32[8]{0} copy(%ars)")
    s = simulate(sync, times(OPS), times({"ars": 4.0}))
    assert s.total_s == s.no_overlap_s == 11.0 and s.exposed_comm_s == 4.0
    # the GPU compiler's is_sync start runs on the compute stream even with compute scheduled before its done
    marked = OVERLAPPED.replace("to_apply=%add", 'to_apply=%add, backend_config={"collective_backend_config":'
                                                 '{"is_sync":true,"is_pipelined":false}}')
    s = simulate(marked, times(OPS), times({"ars": 4.0}))
    assert s.total_s == s.no_overlap_s == 11.0
    check_bounds(s)


def test_collectives_queue_on_one_stream():
    # two all-gathers started back to back take 3 s each: [0,3] and [3,6]; compute x [0,2]; the first done
    # waits until 3, y [3,4], the second done waits until 6, z [6,7]: total 7, exposed 1 + 2 = 3.
    text = entry(
        *PARAMS,
        "%s1 = (f32[8]{0}, f32[16]{0}) all-gather-start(%p0), replica_groups={{0,1}}, dimensions={0}",
        "%s2 = (f32[8]{0}, f32[16]{0}) all-gather-start(%p1), replica_groups={{0,1}}, dimensions={0}",
        "%x = f32[8]{0} fusion(%p0), kind=kLoop, calls=%add",
        "%d1 = f32[16]{0} all-gather-done(%s1)",
        "%y = f32[8]{0} fusion(%d1), kind=kLoop, calls=%add",
        "%d2 = f32[16]{0} all-gather-done(%s2)",
        "ROOT %z = f32[8]{0} fusion(%d2, %y), kind=kLoop, calls=%add",
    )
    s = simulate(text, times({"x": 2.0, "y": 1.0, "z": 1.0}), times({"s1": 3.0, "s2": 3.0}))
    assert s.total_s == 7.0 and s.exposed_comm_s == 3.0 and s.comm_busy_s == 6.0
    assert [(e.name, e.start_s) for e in s.events if e.track == "collectives"] == [("s1", 0.0), ("s2", 3.0)]
    check_bounds(s)


def test_async_wrapped_collective_and_copies():
    # an async-start wrapping a reduce-scatter: the caller knows the wrapped instruction's time (2 s), not the
    # start's. A copy-start runs on the copies stream (op_seconds of the start: 5 s).
    # rs [0,2] and copy [0,5] start together; w [0,1]; the rs done waits 1 s (to 2); v [2,3]; the copy done
    # waits 2 s (to 5); u [5,6]. Total 6.
    wrapped = """%wrapped_rs (q: f32[8]) -> f32[4] {
  %q = f32[8]{0} parameter(0)
  ROOT %rs = f32[4]{0} reduce-scatter(%q), replica_groups={{0,1}}, dimensions={0}, to_apply=%add
}

"""
    text = entry(
        *PARAMS,
        "%ast = ((f32[8]{0}), f32[4]{0}) async-start(%p0), calls=%wrapped_rs",
        "%cs = (f32[8]{0}, f32[8]{0}, u32[]) copy-start(%p1)",
        "%w = f32[8]{0} fusion(%p1), kind=kLoop, calls=%add",
        "%ad = f32[4]{0} async-done(%ast)",
        "%v = f32[4]{0} fusion(%ad), kind=kLoop, calls=%add",
        "%cd = f32[8]{0} copy-done(%cs)",
        "ROOT %u = f32[8]{0} fusion(%cd, %v), kind=kLoop, calls=%add",
        computations=wrapped,
    )
    s = simulate(text, times({"w": 1.0, "v": 1.0, "u": 1.0, "cs": 5.0}), times({"rs": 2.0}))
    assert s.total_s == 6.0
    assert (s.comm_busy_s, s.exposed_comm_s, s.copy_busy_s, s.exposed_copy_s) == (2.0, 1.0, 5.0, 2.0)
    assert {(e.track, e.name) for e in s.events if e.track != "compute"} == {("collectives", "ast"), ("copies", "cs")}
    check_bounds(s)


# --- loops ---------------------------------------------------------------------------------------------------

def loop_module(trip_attr: str, body_ops: list[str], cond_root: str = "compare(%i, %n), direction=LT",
                extra: str = "", after: tuple[str, ...] = ()) -> str:
    """A while loop over (counter, x) whose body runs `body_ops` (ending in a value %v) and counts."""
    body = "\n".join(f"  {line}" for line in body_ops)
    comps = f"""%cond (cp: (s32[], f32[8])) -> pred[] {{
  %cp = (s32[], f32[8]{{0}}) parameter(0)
  %i = s32[] get-tuple-element(%cp), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] {cond_root}
}}

%body (bp: (s32[], f32[8])) -> (s32[], f32[8]) {{
  %bp = (s32[], f32[8]{{0}}) parameter(0)
  %j = s32[] get-tuple-element(%bp), index=0
  %x = f32[8]{{0}} get-tuple-element(%bp), index=1
  %one = s32[] constant(1)
  %j1 = s32[] add(%j, %one)
{body}
  ROOT %t = (s32[], f32[8]{{0}}) tuple(%j1, %v)
}}

{extra}"""
    return entry(*PARAMS, "%zero = s32[] constant(0)", "%init = (s32[], f32[8]{0}) tuple(%zero, %p0)",
                 f"%w = (s32[], f32[8]{{0}}) while(%init), condition=%cond, body=%body{trip_attr}",
                 "%out = f32[8]{0} get-tuple-element(%w), index=1", *after,
                 "ROOT %r = f32[8]{0} fusion(%out), kind=kLoop, calls=%add", computations=comps)


KNOWN = ', backend_config={"known_trip_count":{"n":"4"}}'
BODY = ["%s = f32[8]{0} all-reduce-start(%x), channel_id=1, replica_groups={{0,1}}, to_apply=%add",
        "%u = f32[8]{0} fusion(%x), kind=kLoop, calls=%add",
        "%dn = f32[8]{0} all-reduce-done(%s)",
        "%v = f32[8]{0} fusion(%dn, %u), kind=kLoop, calls=%add"]
LOOP_OPS = {"lt": 0.25, "j1": 0.25, "u": 1.0, "v": 1.0, "r": 0.5}


def test_loop_with_an_async_collective_in_its_body():
    # one iteration: condition lt 0.25, j1 0.25, the all-reduce starts at 0.5 beside u (1 s), its done at
    # max(1.5, 0.5 + C), v 1 s. C = 2: 0.25 + 0.25 + 2 + 1 = 3.5 per iteration (1 s exposed), x 4 = 14, then
    # the last condition 0.25 and r 0.5: 14.75.
    text = loop_module(KNOWN, BODY)
    s = simulate(text, times(LOOP_OPS), times({"s": 2.0}))
    assert s.total_s == pytest.approx(14.75)
    assert s.exposed_comm_s == pytest.approx(4.0) and s.comm_busy_s == pytest.approx(8.0)
    assert s.compute_busy_s == pytest.approx(4 * 2.5 + 0.25 + 0.5) and not s.unknown_loops
    check_bounds(s)
    # C = 0.5: hidden behind u: 2.5 per iteration, 10 + 0.25 + 0.5 = 10.75, nothing exposed
    s = simulate(text, times(LOOP_OPS), times({"s": 0.5}))
    assert s.total_s == pytest.approx(10.75) and s.exposed_comm_s == 0.0
    # 4 iterations of (lt, j1, u, v) + the last lt + r on compute, 4 all-reduces
    assert sum(e.track == "compute" for e in s.events) == 4 * 4 + 2
    assert [e.start_s for e in s.events if e.track == "collectives"] == pytest.approx([0.5, 3.0, 5.5, 8.0])


def test_loop_found_by_its_condition_and_an_unknown_one():
    # no known_trip_count: the condition `i < 4` with i from 0 gives 4 iterations, as above
    s = simulate(loop_module("", BODY), times(LOOP_OPS), times({"s": 2.0}))
    assert s.total_s == pytest.approx(14.75) and not s.unknown_loops
    # a condition the trip count cannot be read from: run once, and listed
    unknown = loop_module("", BODY, cond_root="compare(%n, %i), direction=GT")
    s = simulate(unknown, times(LOOP_OPS), times({"s": 2.0}))
    assert s.unknown_loops == ("w",)
    assert s.total_s == pytest.approx(3.5 + 0.25 + 0.5)


def unrolled(iterations: int, body_ops: list[str]) -> str:
    """The loop's body written out `iterations` times in the entry (names suffixed _k), and no loop."""
    lines = [*PARAMS, "%x_0 = f32[8]{0} copy(%p0)"]
    for k in range(iterations):
        for line in ["%lt = pred[] compare(%p0, %p1), direction=LT", "%j1 = s32[] add(%p0, %p1)", *body_ops]:
            line = re.sub(r"%(\w+)", lambda m, k=k: f"%{m[1]}_{k}" if m[1] != "add" else "%add", line)
            lines.append(line)
        lines.append(f"%x_{k + 1} = f32[8]{{0}} bitcast(%v_{k})")
    lines += [f"%lt_{iterations} = pred[] compare(%p0, %p1), direction=LT",
              f"ROOT %r = f32[8]{{0}} fusion(%x_{iterations}), kind=kLoop, calls=%add"]
    return entry(*lines)


@pytest.mark.parametrize("comm", [0.5, 2.0])
def test_loop_matches_its_unrolled_program(comm):
    """Replaying and multiplying iterations gives the times of running each one."""
    names = ["lt", "j1", "u", "v", "s"]
    table = {f"{n}_{k}": LOOP_OPS.get(n, 0.0) for n in names for k in range(5)} | {"r": 0.5}
    flat = simulate(unrolled(4, BODY), times(table), times({f"s_{k}": comm for k in range(4)}))
    looped = simulate(loop_module(KNOWN, BODY), times(LOOP_OPS), times({"s": comm}))
    for field in ("total_s", "compute_busy_s", "comm_busy_s", "exposed_comm_s", "no_overlap_s"):
        assert getattr(looped, field) == pytest.approx(getattr(flat, field), rel=1e-12), field
    assert len(looped.events) == len(flat.events)


def test_collective_left_running_carries_into_the_next_iteration():
    # a collective-permute started at the end of each iteration (3 s) whose done is never reached in the body
    # (the carry case): iteration k runs u [k, k+1]; permutes queue on the collectives stream, the first from 1,
    # so the stream is busy until 1 + 3 * 4 = 13; compute ends at 4 + r 0.5. Total 13, nothing exposed.
    body = ["%u = f32[8]{0} fusion(%x), kind=kLoop, calls=%add",
            "%s = (f32[8]{0}, f32[8]{0}) collective-permute-start(%u), source_target_pairs={{0,1},{1,0}}",
            "%v = f32[8]{0} copy(%u)"]
    ops = {"u": 1.0, "r": 0.5}
    s = simulate(loop_module(KNOWN, body), times(ops), times({"s": 3.0}))
    assert s.total_s == pytest.approx(13.0) and s.exposed_comm_s == 0.0 and s.compute_busy_s == 4.5
    assert [e.start_s for e in s.events if e.track == "collectives"] == pytest.approx([1.0, 4.0, 7.0, 10.0])
    check_bounds(s)


def test_nested_loops_and_a_conditional():
    # the outer loop (3 trips) runs the inner loop of the tests above (4 trips of 3.5 s + the last condition
    # 0.25 = 14.25), then a conditional whose longer branch takes 2 s: (0.25 + 0.25 + 14.25 + 2) x 3 = 50.25,
    # + the outer loop's last condition 0.25, + r 0.5 = 51.
    inner = loop_module(KNOWN, BODY)
    comps = inner[inner.index("%cond"):inner.index("ENTRY")]
    branches = """%small (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  ROOT %fa = f32[8]{0} fusion(%a), kind=kLoop, calls=%add
}

%big (b: f32[8]) -> f32[8] {
  %b = f32[8]{0} parameter(0)
  ROOT %fb = f32[8]{0} fusion(%b), kind=kLoop, calls=%add
}

%ocond (ocp: (s32[], f32[8])) -> pred[] {
  %ocp = (s32[], f32[8]{0}) parameter(0)
  %oi = s32[] get-tuple-element(%ocp), index=0
  %on = s32[] constant(3)
  ROOT %olt = pred[] compare(%oi, %on), direction=LT
}

%obody (obp: (s32[], f32[8])) -> (s32[], f32[8]) {
  %obp = (s32[], f32[8]{0}) parameter(0)
  %oj = s32[] get-tuple-element(%obp), index=0
  %ox = f32[8]{0} get-tuple-element(%obp), index=1
  %oone = s32[] constant(1)
  %oj1 = s32[] add(%oj, %oone)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]{0}) tuple(%zero, %ox)
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %wx = f32[8]{0} get-tuple-element(%w), index=1
  %pick = s32[] constant(1)
  %br = f32[8]{0} conditional(%pick, %wx, %wx), branch_computations={%small, %big}
  ROOT %ot = (s32[], f32[8]{0}) tuple(%oj1, %br)
}

"""
    text = entry(*PARAMS, "%z = s32[] constant(0)", "%oinit = (s32[], f32[8]{0}) tuple(%z, %p0)",
                 "%ow = (s32[], f32[8]{0}) while(%oinit), condition=%ocond, body=%obody",
                 "%out = f32[8]{0} get-tuple-element(%ow), index=1",
                 "ROOT %r = f32[8]{0} fusion(%out), kind=kLoop, calls=%add", computations=comps + branches)
    ops = LOOP_OPS | {"olt": 0.25, "oj1": 0.25, "fa": 1.0, "fb": 2.0}
    s = simulate(text, times(ops), times({"s": 2.0}))
    assert s.total_s == pytest.approx(51.0)
    assert s.exposed_comm_s == pytest.approx(12.0) and s.comm_busy_s == pytest.approx(24.0)
    assert [n for n in s.notes if "conditional" in n and "big" in n]
    assert sum(e.name == "fb" for e in s.events) == 3 and not any(e.name == "fa" for e in s.events)
    check_bounds(s)


# --- the timeline ----------------------------------------------------------------------------------------------

def test_chrome_trace_loads_as_json_with_named_tracks():
    s = simulate(loop_module(KNOWN, BODY), times(LOOP_OPS), times({"s": 2.0}))
    trace = json.loads(json.dumps(chrome_trace(s, process_name="decode", pid=1)))
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    meta = [e for e in trace["traceEvents"] if e["ph"] == "M"]
    assert len(spans) == len(s.events) == 4 * 4 + 2 + 4
    for e in spans:
        assert {"name", "cat", "ts", "dur", "pid", "tid", "args"} <= set(e) and e["pid"] == 1 and e["dur"] > 0
        assert e["args"]["scope"] == e["cat"]
    threads = {e["tid"]: e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    assert set(threads.values()) == {"compute", "collectives"}
    assert {threads[e["tid"]] for e in spans} == {"compute", "collectives"}
    assert [e["args"]["name"] for e in meta if e["name"] == "process_name"] == ["decode"]
    first = next(e for e in spans if e["name"] == "s")
    assert first["ts"] == pytest.approx(0.5e6) and first["dur"] == pytest.approx(2e6)   # microseconds
    assert trace["otherData"]["1"]["total_s"] == pytest.approx(s.total_s)

    prefill = chrome_trace(simulate(OVERLAPPED, times(OPS), times({"ars": 4.0})), process_name="prefill", pid=0)
    merged = json.loads(json.dumps(merge_traces([prefill, trace])))
    assert {e["pid"] for e in merged["traceEvents"]} == {0, 1}
    assert len(merged["traceEvents"]) == len(prefill["traceEvents"]) + len(trace["traceEvents"])
    names = {e["pid"]: e["args"]["name"] for e in merged["traceEvents"] if e["name"] == "process_name"}
    assert names == {0: "prefill", 1: "decode"}
    # two traces with the same pid stay apart
    again = merge_traces([prefill, prefill])
    assert {e["pid"] for e in again["traceEvents"]} == {0, 1}


def test_truncated_events_keep_the_times():
    text = loop_module(', backend_config={"known_trip_count":{"n":"50"}}', BODY)
    full = simulate(text, times(LOOP_OPS), times({"s": 2.0}))
    cut = simulate(text, times(LOOP_OPS), times({"s": 2.0}), max_events=20)
    assert not full.events_truncated and len(full.events) == 50 * 5 + 2
    assert cut.events_truncated and len(cut.events) <= 21
    assert (cut.total_s, cut.exposed_comm_s, cut.comm_busy_s) == (full.total_s, full.exposed_comm_s, full.comm_busy_s)
    [summary] = [e for e in cut.events if "iterations" in e.name]
    assert re.fullmatch(r"w iterations \d+-50", summary.name) and summary.track == "compute"
    assert summary.start_s + summary.dur_s == pytest.approx(full.total_s - 0.25 - 0.5)   # up to the last condition
    assert all(isinstance(e, Event) for e in cut.events)
    check_bounds(cut)
    assert json.loads(json.dumps(chrome_trace(cut)))["traceEvents"]
    assert simulate(text, times(LOOP_OPS), times({"s": 2.0}), max_events=0).events == ()


def test_a_parsed_module_and_default_scopes():
    text = OVERLAPPED.replace("%ars = f32[8]{0} all-reduce-start(%a), channel_id=1,",
                              '%ars = f32[8]{0} all-reduce-start(%a), channel_id=1, metadata={op_name='
                              '"jit(f)/moe/dispatch/psum"},')
    s = simulate(Module.parse(text), times(OPS), times({"ars": 4.0}))
    assert {e.name: e.scope for e in s.events}["ars"] == "dispatch"
    assert s.to_dict()["total_s"] == s.total_s and json.dumps(s.to_dict())


# --- a real compiled program -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["gpu", "cpu"])
def test_compiled_tiny_model_within_its_bounds(backend):
    """The tiny model compiled for EP2-TP2: the simulated time lies between the full-overlap and no-overlap
    bounds; every op and collective runs as many times as the walk counts; on XLA:CPU (synchronous
    collectives) nothing overlaps."""
    if backend == "gpu":
        require_compiler("gpu")
    from moe_jax.config import get_model
    from moe_jax.costs.compile import Workload
    from moe_jax.costs.walk import analyze_cost
    from moe_jax.hardware.presets import get_hardware
    from moe_jax.parallel.mesh import Strategy
    from moe_jax.perf.timemodel import collective_time, link_for, op_time

    hw = get_hardware("h100")
    kw = {"gpu_target": "h100"} if backend == "gpu" else {}
    report = analyze_cost(get_model("tiny"), Strategy.parse("EP2-TP2-PP1-DP1"), Workload(2, 16, 4),
                          backend=backend, **kw)
    for phase in report.phases.values():
        assert phase.fits and "is_scheduled=true" in phase.hlo_text.splitlines()[0]
        ops = {o.name: op_time(o.flops, o.bytes, hw)[0] for o in phase.ops if not o.collective}
        colls = {c.name: collective_time(c.kind, c.bytes_per_call, c.group_size,
                                         link_for(c.group, hw, report.physical_order)) for c in phase.collectives}
        scopes = {o.name: o.scope for o in phase.ops}
        s = simulate(phase.hlo_text, times(ops), times(colls), scope_of=lambda n, scopes=scopes: scopes.get(n, "other"))
        check_bounds(s)
        assert not s.unknown_loops and s.comm_busy_s > 0
        assert s.compute_busy_s == pytest.approx(sum(ops[o.name] * o.count for o in phase.ops if not o.collective),
                                                 rel=1e-9)
        assert s.comm_busy_s == pytest.approx(sum(colls[c.name] * c.calls for c in phase.collectives), rel=1e-9)
        assert {e.track for e in s.events} == {"compute", "collectives"}
        if backend == "cpu":
            assert s.total_s == pytest.approx(s.no_overlap_s, rel=1e-9)
            assert s.exposed_comm_s == pytest.approx(s.comm_busy_s, rel=1e-9)
        else:
            assert any(e.opcode.endswith("-start") for e in s.events if e.track == "collectives")
