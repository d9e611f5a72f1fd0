"""The compiled schedule, simulated: one program's critical path with its collectives overlapped (or not) as
the compiler scheduled them, and a timeline of it (`chrome_trace` writes it for Perfetto / chrome://tracing).

The compiler prints a scheduled module (``is_scheduled=true``) with each computation's instructions in the
order they run. `simulate` walks that order with three streams:

- compute: every top-level op (a fusion is one op; its fused computation is not entered), one after another,
  each taking ``op_seconds(name)``. In order, so an operand is ready when its user starts, except the result
  of an asynchronous op, which its ``*-done`` waits for.
- collectives: one collective at a time, in the order they start. An async collective (``all-reduce-start``,
  ``all-gather-start``, ``collective-permute-start``, ``all-to-all-start``, ``send``/``recv``, or an
  ``async-start`` wrapping a collective) starts when the compute stream reaches its start and the
  collectives stream is free, and takes ``collective_seconds(name)`` (of the start; for an ``async-start``
  that gets 0, of the wrapped collective); its ``*-done`` makes the compute stream wait for its end. A
  synchronous collective (XLA:CPU's, or one the GPU compiler marks ``"is_sync":true``) occupies both streams:
  compute waits for it to end.
- copies: other asynchronous work (TPU ``copy-start``/``copy-done``, an ``async-start`` wrapping a
  non-collective op), one at a time, ``op_seconds`` of the start (for an ``async-start`` that gets 0, the
  wrapped computation's ops); its done makes compute wait.

Control flow: ``call`` runs its callee in place; ``conditional`` runs its longest branch (noted in
`Schedule.notes`); ``while`` runs its condition trip + 1 times and its body trip times
(`moe_jax.costs.hlo.Module.trip_count`; an unknown count runs once and is listed in
`Schedule.unknown_loops`). Stream times carry across iterations (a collective left running at the end of
one iteration delays the next one's), and a start is matched with its done within one run of a
computation. An iteration's effect depends only on how far the collectives and copies streams are ahead
of the compute stream when it starts, so each distinct such state is simulated once and replayed, and
once an iteration starts in the state the previous one did, the remaining ones are added in one step: the
times are those of running every iteration (to a picosecond per iteration, the resolution states are
compared at).

Not modelled: several collectives in flight at once (the GPU runs collectives on more than one stream;
here they are serialised on one); compute ops overlapping each other (concurrent kernels, or a collective
slowing the compute it overlaps by sharing HBM and SMs); launch gaps between ops; the compute-side cost of
starting a collective (``op_seconds`` is never asked for a collective's start, done or synchronous op).

Totals: total_s is when every stream is idle at the end (the critical path); no_overlap_s the sum of every
op, collective and copy time; full_overlap_s the busiest stream's time. full_overlap_s <= total_s <=
no_overlap_s, and exposed_comm_s (compute waiting on collectives) <= comm_busy_s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from moe_jax.costs.hlo import COLLECTIVE_KINDS, Computation, Instruction, Module

COMPUTE, COLLECTIVES, COPIES = "compute", "collectives", "copies"
TRACKS = (COMPUTE, COLLECTIVES, COPIES)
"""The timeline's tracks, in display order."""

_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "partition-id",
         "replica-id", "opt-barrier", "add-dependency", "domain"}
"""Ops that move nothing: not asked for a time."""
_P2P = {"send", "recv"}
"""Point-to-point transfers: async, on the collectives stream, matched by send-done / recv-done."""
_RESOLUTION = 1e-12
"""Loop states closer than this (seconds) count as the same state."""


@dataclass(frozen=True)
class Event:
    """One interval of the timeline."""

    track: str
    """compute, collectives or copies."""
    name: str
    """The HLO instruction (or, for a summarised block of loop iterations, the loop and the iterations)."""
    scope: str
    """The model scope it came from (attention, experts, ...)."""
    start_s: float
    dur_s: float
    opcode: str = ""


@dataclass(frozen=True)
class Schedule:
    """One program's simulated schedule (see the module docstring for the model)."""

    total_s: float
    """The critical path: when every stream is idle at the end."""
    compute_busy_s: float
    """Sum of the compute stream's op times."""
    comm_busy_s: float
    """Sum of collective times."""
    exposed_comm_s: float
    """Time the compute stream spent waiting for collectives."""
    overlapped_comm_s: float
    """comm_busy_s - exposed_comm_s: collective time hidden behind compute."""
    no_overlap_s: float
    """Sum of every op, collective and copy time: nothing overlapped."""
    full_overlap_s: float
    """The busiest stream's time: everything overlapped."""
    unknown_loops: tuple[str, ...] = ()
    """While loops whose trip count is unknown (run once)."""
    events: tuple[Event, ...] = ()
    """The timeline, ordered as simulated (by track, nearly by start)."""
    events_truncated: bool = False
    """More events than max_events: events past it are dropped, and the rest of a loop's iterations is one
    summary event ("while.3 iterations 17-48", on the compute track), which may go past max_events by one per
    summarised loop."""
    copy_busy_s: float = 0.0
    """Sum of async non-collective (copies stream) times."""
    exposed_copy_s: float = 0.0
    """Time the compute stream spent waiting for copies."""
    notes: tuple[str, ...] = ()
    """What the simulation assumed (conditionals: the longest branch taken)."""

    def to_dict(self) -> dict:
        """JSON-ready numbers (the events left out: see `chrome_trace`)."""
        return {"total_s": self.total_s, "compute_busy_s": self.compute_busy_s, "comm_busy_s": self.comm_busy_s,
                "exposed_comm_s": self.exposed_comm_s, "overlapped_comm_s": self.overlapped_comm_s,
                "copy_busy_s": self.copy_busy_s, "exposed_copy_s": self.exposed_copy_s,
                "no_overlap_s": self.no_overlap_s, "full_overlap_s": self.full_overlap_s,
                "unknown_loops": list(self.unknown_loops), "events": len(self.events),
                "events_truncated": self.events_truncated, "notes": list(self.notes)}


@dataclass
class _State:
    """Where the three streams are, what they have done, and the events emitted so far."""

    t_compute: float = 0.0
    t_comm: float = 0.0
    t_copy: float = 0.0
    compute_busy: float = 0.0
    comm_busy: float = 0.0
    copy_busy: float = 0.0
    exposed_comm: float = 0.0
    exposed_copy: float = 0.0
    events: list | None = field(default_factory=list)
    """(track, name, scope, start, dur, opcode) tuples; None: not recording."""
    cap: int = 0
    truncated: bool = False

    def key(self) -> tuple[int, int]:
        """How far the collectives and copies streams are ahead of compute (what the next op's timing depends
        on; a stream already idle is 0 ahead), in units of `_RESOLUTION`."""
        return (round(max(0.0, self.t_comm - self.t_compute) / _RESOLUTION),
                round(max(0.0, self.t_copy - self.t_compute) / _RESOLUTION))

    def emit(self, track: str, name: str, scope: str, start: float, dur: float, opcode: str) -> None:
        if self.events is None or dur <= 0.0:
            return
        if len(self.events) >= self.cap:
            self.truncated = True
            return
        self.events.append((track, name, scope, start, dur, opcode))

    @property
    def full(self) -> bool:
        return self.events is None or len(self.events) >= self.cap


@dataclass
class _Step:
    """The effect of one loop iteration started at a given state, in coordinates where it starts at 0."""

    end_compute: float
    end_comm: float
    end_copy: float
    compute_busy: float
    comm_busy: float
    copy_busy: float
    exposed_comm: float
    exposed_copy: float
    events: list | None
    truncated: bool

    def apply(self, s: _State, times: int = 1) -> None:
        """Advance `s` by `times` iterations that each start in this step's state (events not touched)."""
        base = s.t_compute + (times - 1) * self.end_compute
        s.t_compute = base + self.end_compute
        s.t_comm = max(s.t_comm, base + self.end_comm)
        s.t_copy = max(s.t_copy, base + self.end_copy)
        s.compute_busy += times * self.compute_busy
        s.comm_busy += times * self.comm_busy
        s.copy_busy += times * self.copy_busy
        s.exposed_comm += times * self.exposed_comm
        s.exposed_copy += times * self.exposed_copy


class _Simulator:
    def __init__(self, module: Module, op_seconds, collective_seconds, scope_of):
        self.module = module
        self.op_seconds = op_seconds
        self.collective_seconds = collective_seconds
        self.scope_of = scope_of
        self.unknown_loops: dict[str, None] = {}
        self.notes: dict[str, None] = {}
        self.steps: dict[tuple, _Step] = {}

    # --- one computation, in scheduled order ---------------------------------------------------------

    def run(self, comp: Computation, s: _State) -> None:
        inflight: dict[str, tuple[str, float]] = {}      # start name -> (stream, end time)
        alias: dict[str, str] = {}                       # async-update -> its async-start
        for instr in comp.instructions:
            op = instr.opcode
            if op in _FREE:
                continue
            base = op.removesuffix("-start")
            if op == "while":
                self.loop(instr, s)
            elif op == "call":
                for _, callee in self.module.calls(instr):
                    self.run(self.module.computations[callee], s)
            elif op == "conditional":
                self.conditional(instr, s)
            elif op in COLLECTIVE_KINDS:
                self.sync_collective(instr, instr.name, s)
            elif (op.endswith("-start") and base in COLLECTIVE_KINDS) or op in _P2P:
                if '"is_sync":true' in instr.attrs:
                    self.sync_collective(instr, instr.name, s)
                else:
                    inflight[instr.name] = (COLLECTIVES, self.start_collective(instr, instr.name, s))
            elif op == "async-start":
                wrapped = self.wrapped_collective(instr)
                if wrapped is None:
                    inflight[instr.name] = (COPIES, self.start_copy(instr, self.async_op_seconds(instr), s))
                elif '"is_sync":true' in instr.attrs:
                    self.sync_collective(instr, wrapped, s)
                else:
                    inflight[instr.name] = (COLLECTIVES, self.start_collective(instr, wrapped, s))
            elif op == "async-update":
                if instr.operands:
                    alias[instr.name] = alias.get(instr.operands[0], instr.operands[0])
            elif op.endswith("-done"):
                start = alias.get(instr.operands[0], instr.operands[0]) if instr.operands else ""
                stream, end = inflight.pop(start, ("", 0.0))
                wait = end - s.t_compute
                if wait > 0.0:
                    if stream == COLLECTIVES:
                        s.exposed_comm += wait
                    else:
                        s.exposed_copy += wait
                    s.t_compute = end
            elif op.endswith("-start"):                   # copy-start and other async non-collective work
                inflight[instr.name] = (COPIES, self.start_copy(instr, self.op_seconds(instr.name), s))
            else:
                d = self.op_seconds(instr.name)
                if d > 0.0:
                    s.emit(COMPUTE, instr.name, self.scope_of(instr.name), s.t_compute, d, op)
                    s.t_compute += d
                    s.compute_busy += d

    def collective_time(self, instr: Instruction, wrapped: str) -> float:
        d = self.collective_seconds(instr.name)
        if not d and wrapped != instr.name:
            d = self.collective_seconds(wrapped)
        return d

    def sync_collective(self, instr: Instruction, wrapped: str, s: _State) -> None:
        d = self.collective_time(instr, wrapped)
        start = max(s.t_compute, s.t_comm)
        end = start + d
        s.emit(COLLECTIVES, instr.name, self.scope_of(instr.name), start, d, instr.opcode)
        s.comm_busy += d
        s.exposed_comm += end - s.t_compute
        s.t_comm = s.t_compute = end

    def start_collective(self, instr: Instruction, wrapped: str, s: _State) -> float:
        d = self.collective_time(instr, wrapped)
        start = max(s.t_compute, s.t_comm)
        s.emit(COLLECTIVES, instr.name, self.scope_of(instr.name), start, d, instr.opcode)
        s.comm_busy += d
        s.t_comm = start + d
        return s.t_comm

    def start_copy(self, instr: Instruction, d: float, s: _State) -> float:
        start = max(s.t_compute, s.t_copy)
        s.emit(COPIES, instr.name, self.scope_of(instr.name), start, d, instr.opcode)
        s.copy_busy += d
        s.t_copy = start + d
        return s.t_copy

    def wrapped_collective(self, instr: Instruction) -> str | None:
        """The collective an async-start wraps (its name), or None when it wraps other work."""
        for _, callee in self.module.calls(instr):
            comp = self.module.computations[callee]
            found = [i for i in comp.instructions if i.opcode.removesuffix("-start") in COLLECTIVE_KINDS]
            if found:
                root = comp.root
                return root.name if root in found else found[0].name
        return None

    def async_op_seconds(self, instr: Instruction) -> float:
        d = self.op_seconds(instr.name)
        if d:
            return d
        return sum(self.op_seconds(i.name) for _, callee in self.module.calls(instr)
                   for i in self.module.computations[callee].instructions if i.opcode not in _FREE)

    # --- control flow -----------------------------------------------------------------------------------

    def conditional(self, instr: Instruction, s: _State) -> None:
        branches = [self.module.computations[c] for _, c in self.module.calls(instr)]
        if not branches:
            return
        ends = []
        for comp in branches:
            trial = _State(0.0, max(0.0, s.t_comm - s.t_compute), max(0.0, s.t_copy - s.t_compute), events=None)
            self.run(comp, trial)
            ends.append((max(trial.t_compute, trial.t_comm, trial.t_copy), trial.t_compute))
        longest = max(range(len(branches)), key=lambda i: ends[i])
        if len(branches) > 1:
            self.notes[f"{instr.name}: conditional, its longest branch ({branches[longest].name}) taken"] = None
        self.run(branches[longest], s)

    def step(self, loop: Instruction, cond: Computation | None, body: Computation | None, s: _State) -> _Step:
        """One iteration (condition, then body) from `s`'s state, simulated once per distinct state."""
        key = (loop.name, s.key())
        step = self.steps.get(key)
        want_events = s.events is not None and not s.full
        if step is not None and (step.events is not None or not want_events):
            return step
        local = _State(0.0, key[1][0] * _RESOLUTION, key[1][1] * _RESOLUTION,
                       events=[] if want_events else None, cap=s.cap - len(s.events) if want_events else 0)
        for comp in (cond, body):
            if comp is not None:
                self.run(comp, local)
        fresh = _Step(local.t_compute, local.t_comm, local.t_copy, local.compute_busy, local.comm_busy,
                      local.copy_busy, local.exposed_comm, local.exposed_copy, local.events, local.truncated)
        if step is None:
            self.steps[key] = fresh
            return fresh
        step.events, step.truncated = fresh.events, fresh.truncated   # the same arithmetic, now with its events
        return step

    def loop(self, instr: Instruction, s: _State) -> None:
        calls = dict((role, self.module.computations[c]) for role, c in self.module.calls(instr))
        cond, body = calls.get("condition"), calls.get("body")
        trip = self.module.trip_count(instr)
        if trip is None:
            self.unknown_loops[instr.name] = None
            trip = 1
        block: tuple[int, float] | None = None            # (first iteration, its start) of the summarised rest
        i, previous = 0, None
        while i < trip:
            key = s.key()
            step = self.step(instr, cond, body, s)
            # an iteration starting in the state the previous one started in ends in it too: the rest repeat it
            times = trip - i if key == previous else 1
            for k in range(times):
                if block is not None:
                    break
                at = s.t_compute + k * step.end_compute
                if not self.replay(step, s, at):
                    block = (i + k, at)
            step.apply(s, times)
            previous, i = key, i + times
        if block is not None and s.events is not None:
            first, at = block
            s.truncated = True
            s.events.append((COMPUTE, f"{instr.name} iterations {first + 1}-{trip}", self.scope_of(instr.name),
                             at, s.t_compute - at, "while"))
        if cond is not None:
            self.run(cond, s)

    def replay(self, step: _Step, s: _State, at: float) -> bool:
        """Emit one iteration's events shifted to start at `at`; False when they do not all fit (or are not
        being recorded): the caller summarises the rest of the loop."""
        if s.events is None:
            return True
        if step.events is None or len(s.events) + len(step.events) > s.cap:
            return False
        s.events.extend((t, n, sc, at + st, d, op) for t, n, sc, st, d, op in step.events)
        s.truncated = s.truncated or step.truncated
        return True


def simulate(hlo_text_or_module: str | Module, op_seconds: Callable[[str], float],
             collective_seconds: Callable[[str], float], *, scope_of: Callable[[str], str] | None = None,
             max_events: int = 200_000) -> Schedule:
    """Simulate one compiled program's schedule (see the module docstring for the model).

    hlo_text_or_module: optimized HLO text printed with ``is_scheduled=true`` (``compiled.as_text()``), or it
    parsed (`moe_jax.costs.hlo.Module`). op_seconds(name): seconds of one execution of that top-level
    instruction (0.0 for ops that move nothing). collective_seconds(name): seconds of one call of the
    collective a ``*-start``, ``async-start`` or synchronous collective instruction runs. scope_of(name):
    the model scope an event is named with (default: from the instruction's op_name metadata).
    max_events: the most timeline events kept; past it, the rest of each loop is one summary event per block
    of iterations (`Schedule.events_truncated`), and the times are unchanged; 0: no timeline at all.
    """
    module = hlo_text_or_module if isinstance(hlo_text_or_module, Module) else Module.parse(hlo_text_or_module)
    if scope_of is None:
        from moe_jax.costs.walk import model_phase

        by_name = {i.name: i for comp in module.computations.values() for i in comp.instructions}

        def scope_of(name: str) -> str:
            return model_phase(by_name[name].op_name) if name in by_name else "other"
    sim = _Simulator(module, op_seconds, collective_seconds, scope_of)
    s = _State(cap=max_events, events=[] if max_events > 0 else None)
    sim.run(module.computations[module.entry], s)
    total = max(s.t_compute, s.t_comm, s.t_copy)
    exposed = min(s.exposed_comm, s.comm_busy)           # equal at most; the min drops rounding
    return Schedule(
        total_s=total, compute_busy_s=s.compute_busy, comm_busy_s=s.comm_busy, exposed_comm_s=exposed,
        overlapped_comm_s=s.comm_busy - exposed,
        no_overlap_s=s.compute_busy + s.comm_busy + s.copy_busy,
        full_overlap_s=max(s.compute_busy, s.comm_busy, s.copy_busy),
        unknown_loops=tuple(sim.unknown_loops), events=tuple(Event(*e) for e in s.events or ()),
        events_truncated=s.truncated, copy_busy_s=s.copy_busy, exposed_copy_s=s.exposed_copy,
        notes=tuple(sim.notes))


# --- Chrome trace event format (Perfetto, chrome://tracing) ---------------------------------------------------

_TIDS = {track: tid for tid, track in enumerate(TRACKS, start=1)}


def chrome_trace(schedule: Schedule, *, process_name: str = "moe-jax", pid: int = 0) -> dict:
    """The schedule's timeline in the Chrome trace event format (``json.dump`` it; Perfetto and
    chrome://tracing load it): one process, one thread per track (compute, collectives, and copies when used),
    a complete event (``ph: "X"``, ts and dur in microseconds) per timeline event named for its instruction,
    with the model scope as its category, and the schedule's totals under ``otherData``."""
    used = {e.track for e in schedule.events}
    tracks = [t for t in TRACKS if t in (COMPUTE, COLLECTIVES) or t in used]
    meta = [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": process_name}},
            {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}}]
    for track in tracks:
        tid = _TIDS[track]
        meta += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": track}},
                 {"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}}]
    spans = [{"ph": "X", "name": e.name, "cat": e.scope, "ts": e.start_s * 1e6, "dur": e.dur_s * 1e6, "pid": pid,
              "tid": _TIDS[e.track], "args": {"scope": e.scope, "opcode": e.opcode, "track": e.track}}
             for e in schedule.events]
    return {"traceEvents": meta + spans, "displayTimeUnit": "ns",
            "otherData": {str(pid): {"process": process_name, **schedule.to_dict()}}}


def merge_traces(traces: list[dict]) -> dict:
    """Several `chrome_trace` outputs as one trace (e.g. prefill as pid 0 and decode as pid 1). A trace whose
    pid an earlier one already uses is moved to the next free pid."""
    events, other, taken = [], {}, set()
    for trace in traces:
        pids = sorted({e.get("pid", 0) for e in trace.get("traceEvents", [])})
        moved = {}
        for p in pids:
            q = p
            while q in taken:
                q += 1
            moved[p] = q
            taken.add(q)
        for e in trace.get("traceEvents", []):
            pid = moved.get(e.get("pid", 0), e.get("pid", 0))
            e = {**e, "pid": pid}
            if e.get("name") == "process_sort_index":
                e["args"] = {"sort_index": pid}
            events.append(e)
        for key, value in trace.get("otherData", {}).items():
            new = str(moved.get(int(key), key)) if key.lstrip("-").isdigit() else key
            other[new] = value
    return {"traceEvents": events, "displayTimeUnit": "ns", "otherData": other}
