"""Many processes, one mesh: jax's multi-controller runtime (`jax.distributed`) set up for moe-jax.

Every process runs the same program on its local devices; together they form one global
mesh. This module holds what that takes and nothing more:

- `ClusterSpec`: who the coordinator is, how many processes, which one this is, and the
  timeout, from flags, ``MOE_JAX_*`` environment variables, or a cluster launcher that
  jax detects itself (SLURM, Open MPI, TPU pods, Kubernetes).
- `Cluster`: joins the cluster before any jax backend starts (on CPU: gloo collectives
  and each process emulating its share of the mesh), watches for a peer that died or
  never arrived (`Watchdog`), and turns such failures into one message and exit status
  `CLUSTER_EXIT_STATUS` instead of a hang or a traceback.
- `to_host`: an array spread over processes, gathered to host memory.

Environment variables (a flag wins over its variable): ``MOE_JAX_COORDINATOR``
(``HOST:PORT`` or ``auto``), ``MOE_JAX_NUM_PROCESSES``, ``MOE_JAX_PROCESS_ID``,
``MOE_JAX_TIMEOUT`` (seconds).
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from dataclasses import dataclass

from moe_jax.compat import backend_started, distributed_process
from moe_jax.errors import MoeJaxError
from moe_jax.runtime import supervise

DEFAULT_TIMEOUT = 300.0
"""Seconds a process may wait on its peers (joining, one step of the run, shutting down)."""

CLUSTER_EXIT_STATUS = 4
"""Exit status when a peer died, stopped responding or never arrived (bad input stays 2)."""

ENV = {"coordinator": "MOE_JAX_COORDINATOR", "num_processes": "MOE_JAX_NUM_PROCESSES",
       "process_id": "MOE_JAX_PROCESS_ID", "timeout": "MOE_JAX_TIMEOUT"}
"""The environment variable behind each cluster flag."""

AUTO = "auto"

class ClusterError(MoeJaxError):
    """A peer process died, stopped responding or never arrived; the run cannot go on."""

    exit_status = CLUSTER_EXIT_STATUS


# --- the cluster spec ---------------------------------------------------------------


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) → (host, port), port 1 to 65535."""
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", text.strip()) if isinstance(text, str) else None
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise MoeJaxError(f"--coordinator {text!r} is not HOST:PORT (for example 10.0.0.1:1234 or [::1]:1234, "
                          f"port 1 to 65535), nor {AUTO!r} to let jax detect the cluster")
    return m.group(1), int(m.group(2))


@dataclass(frozen=True)
class ClusterSpec:
    """How this process joins a multi-process run."""

    coordinator: str
    """``HOST:PORT`` of process 0's coordination service, or ``auto``: jax detects the cluster
    (SLURM, Open MPI, Cloud TPU pod, Kubernetes) and fills in the rest."""
    num_processes: int | None
    """Processes in the run (None with ``auto``: the launcher says)."""
    process_id: int | None
    """This process, 0 to num_processes − 1 (None with ``auto``)."""
    timeout: float = DEFAULT_TIMEOUT
    """Seconds to wait for peers: to join, for each step of the run, and to shut down."""
    source: str = "flags"
    """Where the spec came from: ``flags``, ``environment``, or the launcher jax detects."""

    def __post_init__(self):
        if not isinstance(self.timeout, (int, float)) or not 1 <= self.timeout <= 86400:
            raise MoeJaxError(f"--timeout {self.timeout!r} must be 1 to 86400 seconds")
        if self.coordinator == AUTO:
            return
        parse_address(self.coordinator)
        n, i = self.num_processes, self.process_id
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise MoeJaxError(f"--num-processes {n!r} must be a positive integer")
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n:
            raise MoeJaxError(f"--process-id {i!r} is out of range for {n} processes; valid: 0 to {n - 1}")

    @property
    def auto(self) -> bool:
        """True when jax detects the cluster."""
        return self.coordinator == AUTO

    def cpu_devices_per_process(self, total: int, processes: int | None = None) -> int:
        """Fake CPU devices each process emulates so that all of them together make `total`."""
        n = processes or self.num_processes
        if n is None:
            raise MoeJaxError("the process count is not known before joining the cluster")
        if total % n:
            from moe_jax.parallel.mesh import divisors

            raise MoeJaxError(f"the mesh's {total} devices cannot be shared equally by {n} processes; valid "
                              f"process counts: {', '.join(map(str, divisors(total)))}")
        return total // n


def _int(value, flag: str):
    if value is None or isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise MoeJaxError(f"{flag} {value!r} is not an integer") from None


def _float(value, flag: str):
    if value is None or isinstance(value, (int, float)):
        return value
    try:
        return float(str(value).strip())
    except ValueError:
        raise MoeJaxError(f"{flag} {value!r} is not a number of seconds") from None


def launcher(env=None) -> str | None:
    """The multi-process launcher jax can read this process's place from, if any.

    Only environment variables are read (no network): SLURM with more than one task,
    Open MPI with more than one rank. A Cloud TPU pod needs no detection here: its
    runtime joins the hosts itself (or pass ``--coordinator auto``).
    """
    env = os.environ if env is None else env
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and env["SLURM_NTASKS"].strip().isdigit() and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and env.get("OMPI_COMM_WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        return "ompi"
    return None


def resolve(coordinator=None, num_processes=None, process_id=None, timeout=None, env=None) -> ClusterSpec | None:
    """The cluster spec from flags, then ``MOE_JAX_*`` variables, then a detected launcher; None: one process.

    Coordinator, process count and process id come together (all three, or ``auto``
    alone); a lone ``--num-processes 1`` is one process.
    """
    env = os.environ if env is None else env
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id,
             "timeout": timeout}
    from_env = False
    for key, var in ENV.items():
        if given[key] is None and env.get(var, "").strip():
            given[key] = env[var].strip()
            from_env = from_env or key != "timeout"
    flag = {"coordinator": "--coordinator", "num_processes": "--num-processes", "process_id": "--process-id"}
    n = _int(given["num_processes"], f"--num-processes (or {ENV['num_processes']})")
    i = _int(given["process_id"], f"--process-id (or {ENV['process_id']})")
    t = _float(given["timeout"], f"--timeout (or {ENV['timeout']})")
    t = DEFAULT_TIMEOUT if t is None else t
    c = given["coordinator"]
    source = "environment" if from_env else "flags"
    if c is not None and str(c).strip().lower() == AUTO:
        return ClusterSpec(AUTO, n, i, t, source)
    if c is None and i is None and n in (None, 1):
        found = launcher(env)
        return ClusterSpec(AUTO, None, None, t, found) if found else None
    if c is not None:
        parse_address(str(c))                        # a malformed address is named before what is missing
    missing = [flag[k] for k, v in (("coordinator", c), ("num_processes", n), ("process_id", i)) if v is None]
    if missing:
        raise MoeJaxError(f"a multi-process run needs --coordinator HOST:PORT, --num-processes N and --process-id I "
                          f"together (or {', '.join(v for k, v in ENV.items() if k != 'timeout')}); missing: "
                          f"{', '.join(missing)}")
    return ClusterSpec(str(c).strip(), n, i, t, source)


# --- the watchdog -------------------------------------------------------------------


class Watchdog:
    """Ends the process with a message when no step completes within `timeout` seconds.

    A collective whose peer died never returns (and jax's heartbeat only aborts later,
    with a stack trace): `beat(what)` marks progress and names the step now running;
    a thread exits the process with `CLUSTER_EXIT_STATUS` when a step overruns.
    """

    def __init__(self, timeout: float, who: str):
        self.timeout = timeout
        self.who = who
        self._what = "starting"
        self._message = None
        self._deadline = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._watch, name="moe-jax-watchdog", daemon=True)
        self._thread.start()

    def beat(self, what: str, timeout: float | None = None, message: str | None = None) -> None:
        """Progress: `what` starts now and must finish within `timeout` (default: the watchdog's).

        message: what to say if it does not (default: no progress, a peer died).
        """
        with self._cond:
            self._what = what
            self._message = message
            self._deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            self._cond.notify()

    @property
    def what(self) -> str:
        """The step now running."""
        return self._what

    def stop(self) -> None:
        """Stop watching (the run is over)."""
        with self._cond:
            self._deadline = None
            self._cond.notify()

    def _watch(self) -> None:
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                _die(self._message or f"{self.who}: no progress for {self.timeout:g} s during {self._what} (--timeout "
                     f"{self.timeout:g}): a peer process died or stopped responding; stopping this process",
                     CLUSTER_EXIT_STATUS)


def _native_stdout_to_stderr() -> None:
    """Send what native libraries print on stdout (gloo's connection notes) to stderr.

    Python's `sys.stdout` keeps the real stdout, so a report or ``--json -`` stays clean.
    """
    try:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
    except (OSError, AttributeError, ValueError):  # no real stdout (e.g. captured): nothing to protect
        return
    sys.stdout = open(saved, "w", buffering=1, encoding=getattr(sys.stdout, "encoding", None) or "utf-8")


def _die(message: str, status: int) -> None:
    """Print and leave now: peers may be gone, so skip jax's shutdown barrier and atexit hooks."""
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001  (stdout may be closed; the message still goes to stderr)
        pass
    os.write(2, f"moe-jax: error: {message}\n".encode())
    os._exit(status)


# --- the cluster --------------------------------------------------------------------


class Cluster:
    """This process's membership of a run: join, watch, report, leave.

    With `spec` None it is one process: nothing is started and every method is cheap,
    except that a runtime that joined hosts by itself (a Cloud TPU pod) still has only
    process 0 report.
    """

    def __init__(self, spec: ClusterSpec | None, *, cpu_devices: int | None = None, progress: bool = False,
                 command: list[str] | None = None):
        """cpu_devices: the mesh's device count when each process emulates its share on CPU.
        command: the command line of this invocation: `start` runs the work as its supervised child
        (`moe_jax.runtime.supervise`); None to work in this process."""
        self.spec = spec
        self.command = command
        self.cpu_devices = cpu_devices
        self.show_progress = progress
        self.watchdog: Watchdog | None = None
        self._index, self._count = (spec.process_id, spec.num_processes) if spec else (0, 1)

    @property
    def multi(self) -> bool:
        """True when this run spans more than one process (known after `start`)."""
        return self.spec is not None and (self._count or 0) > 1

    @property
    def process_index(self) -> int:
        if self.spec is None and backend_started():     # never starts a backend just to ask
            import jax

            return jax.process_index()
        return self._index or 0

    @property
    def process_count(self) -> int:
        if self.spec is None and backend_started():     # never starts a backend just to ask
            import jax

            return jax.process_count()
        return self._count or 1

    @property
    def is_leader(self) -> bool:
        """Process 0: the one that prints the report and writes files."""
        return self.process_index == 0

    @property
    def who(self) -> str:
        return f"process {self.process_index} of {self.process_count}"

    def start(self) -> Cluster:
        """Join the cluster (before any jax backend starts); with no spec, only set up fake CPU devices."""
        from moe_jax.parallel.devices import request_cpu_devices

        spec = self.spec
        if spec is None:
            if self.cpu_devices is not None:
                request_cpu_devices(self.cpu_devices)
            return self
        share = spec.cpu_devices_per_process(self.cpu_devices) if self.cpu_devices and spec.num_processes else None
        label = (f"process {spec.process_id} of {spec.num_processes}" if not spec.auto else "this process")
        if supervise.supervised():
            supervise.adopt()
        elif self.command is not None:
            sys.exit(supervise.run_supervised(self.command, label, CLUSTER_EXIT_STATUS))
        if share is not None:
            request_cpu_devices(share)                          # before jax reads XLA_FLAGS
        import jax

        if backend_started():
            raise MoeJaxError("jax's backend is already running in this process: join the cluster (--coordinator) "
                              "in a fresh process, before anything uses jax")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU devices across processes
        _native_stdout_to_stderr()
        where = spec.coordinator if not spec.auto else f"the coordinator {spec.source} names"
        self.watchdog = Watchdog(spec.timeout, label)
        self.watchdog.beat(f"joining the cluster at {where}", message=(
            f"{label} could not join the cluster at {where} within {spec.timeout:g} s (--timeout): "
            f"{spec.num_processes or 'all'} processes must start with the same --coordinator and --num-processes "
            "and distinct --process-id values, and process 0 must be reachable; a peer never arrived"))
        self._progress(f"joining the cluster at {where}")
        t = max(1, int(round(spec.timeout)))
        # jax's own limits sit behind the watchdog's (which speaks first, without a native stack trace)
        kwargs = dict(initialization_timeout=t + 30, heartbeat_timeout_seconds=2 * t + 10,
                      shutdown_timeout_seconds=t + 30)
        if not spec.auto:
            kwargs.update(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                          process_id=spec.process_id)
        try:
            jax.distributed.initialize(**kwargs)
        except Exception as e:  # noqa: BLE001  (jax raises ValueError, RuntimeError or its runtime error)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            if spec.auto:
                raise ClusterError(f"could not join a cluster detected from {spec.source}: {first}. Pass "
                                   "--coordinator HOST:PORT --num-processes N --process-id I instead") from None
            _die(f"{label} could not join the cluster at {spec.coordinator} within {spec.timeout:g} s "
                 f"(--timeout): {first}. Every process must be started with the same --coordinator and "
                 f"--num-processes, a distinct --process-id, and process 0 must be reachable", CLUSTER_EXIT_STATUS)
        self._index, self._count = distributed_process()   # the count before any backend starts (auto mode)
        self.watchdog.who = self.who
        if self.cpu_devices is not None and spec.auto:
            request_cpu_devices(spec.cpu_devices_per_process(self.cpu_devices, self._count))
        self.beat("starting the backend")
        return self

    def agree(self, facts: dict) -> None:
        """Every process must run the same thing: exchange `facts` (model, strategy, workload, seed, inputs ...)
        through the cluster's key-value store and stop every process with exit status 2, naming the first
        difference, when they disagree. Without this, processes given different meshes or sizes build
        programs whose collectives do not match, and the runtime aborts with no word on why."""
        if not self.multi:
            return
        import json

        from moe_jax.compat import distributed_client

        def canonical(value) -> str:
            return json.dumps(value, sort_keys=True, default=str)

        client = distributed_client()
        mine = canonical(facts)
        wait_ms = max(1000, int(self.spec.timeout * 1000))
        self.beat("checking that every process was started alike")
        client.key_value_set(f"moe-jax/agree/{self.process_index}", mine)
        theirs = {i: client.blocking_key_value_get(f"moe-jax/agree/{i}", wait_ms)
                  for i in range(self.process_count) if i != self.process_index}
        client.wait_at_barrier("moe-jax/agreed", wait_ms)      # nobody leaves before every process has read
        for i, text in sorted(theirs.items()):
            if text != mine:
                other = json.loads(text)
                diffs = [f"{k}={facts.get(k)!r} here, {other.get(k)!r} on process {i}"
                         for k in sorted(set(facts) | set(other)) if canonical(facts.get(k)) != canonical(other.get(k))]
                self._leave_together(client, wait_ms)
                _die(f"{self.who}: the processes were not started alike: {'; '.join(diffs[:4])}. Every process of "
                     "a run must be given the same model, mesh, sizes, seed, weights and prompt", 2)

    def _leave_together(self, client, wait_ms: int) -> None:
        """Before every process stops on the same finding: the coordinator (process 0) leaves last.

        Its process hosts the coordination service; were it to exit first, jax's client in the others
        would end them with a native abort before they could say why. So the others mark that they are
        leaving and go; process 0 waits for every mark, and a moment for those processes to exit."""
        if self.process_index != 0:
            client.key_value_set(f"moe-jax/leaving/{self.process_index}", "1")
            return
        for i in range(1, self.process_count):
            try:
                client.blocking_key_value_get(f"moe-jax/leaving/{i}", wait_ms)
            except Exception:  # noqa: BLE001  (a peer already gone: nothing to wait for)
                pass
        time.sleep(1.0)

    def check_devices(self, needed: int) -> None:
        """Across processes, jax must see exactly the mesh's devices (each process its share)."""
        if not self.multi:
            return
        import jax

        have, local = jax.device_count(), jax.local_device_count()
        if have != needed:
            raise MoeJaxError(f"the mesh needs {needed} devices but the {self.process_count} processes have {have} "
                              f"({local} on {self.who}); start {needed // local if needed % local == 0 else 'N'} "
                              f"processes with {local} devices each, or a mesh of {have} devices")

    def beat(self, what: str) -> None:
        """Progress: `what` starts now (and, with progress on, say so on stderr)."""
        if self.watchdog is not None:
            self.watchdog.beat(what)
        self._progress(what)

    def _progress(self, what: str) -> None:
        if self.show_progress:
            print(f"moe-jax: {self.who}: {what}", file=sys.stderr, flush=True)

    def fail(self, error: BaseException) -> None:
        """End a multi-process run on `error` at once (peers may be gone): message, exit status, no barrier.

        A user error exits 2, a failed collective or runtime call 4 (a peer died), anything
        else (a bug) 1 with its traceback.
        """
        if isinstance(error, MoeJaxError):
            _die(f"{self.who}: {error}", getattr(error, "exit_status", 2))
        step = self.watchdog.what if self.watchdog else "the run"
        if type(error).__name__ in ("JaxRuntimeError", "XlaRuntimeError"):
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            _die(f"{self.who}: {step} failed: {first}; a peer process probably died or stopped responding",
                 CLUSTER_EXIT_STATUS)
        import traceback

        traceback.print_exception(error, file=sys.stderr)
        sys.stderr.flush()
        _die(f"{self.who}: {step} failed with the internal error above", 1)

    def finish(self) -> None:
        """Leave the cluster: wait (bounded by the timeout) until every process is done."""
        if not self.multi:
            return
        import jax

        self.beat("waiting for the other processes to finish")
        try:
            jax.distributed.shutdown()
        except Exception as e:  # noqa: BLE001  (a peer that died before the shutdown barrier)
            self.fail(e)
        self.watchdog.stop()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, kind, error, tb) -> bool:
        if error is None:
            self.finish()
            return False
        if self.multi and isinstance(error, Exception):
            self.fail(error)
        if self.watchdog is not None:
            self.watchdog.stop()
        return False


def to_host(x):
    """A numpy copy of `x`, also when its shards live on other processes (gathered from all of them)."""
    import numpy as np

    if getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
