"""The options several commands share, declared once: workload, outputs, compiler, dispatch, cluster.

Choices come from `moe_jax.names`; each command keeps its own defaults (a quick check on fake CPU
devices wants a smaller workload than the seed scenario).
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import click

from moe_jax.config import preset_names
from moe_jax.errors import MoeJaxError
from moe_jax.names import AUTO, BACKEND_CHOICES, DTYPE_BY_SHORT, FP8, Dispatch


def positive(ctx, param, value):
    """Click callback: an integer option must be at least 1."""
    if value is not None and value < 1:
        raise click.BadParameter(f"{value} must be at least 1")
    return value


def choice(values) -> click.Choice:
    """A click choice of the names' plain strings: click would list and match a `StrEnum` by its member name
    (``CPU``), the CLI spells them by value (``cpu``)."""
    return click.Choice([str(v) for v in values])


class WorkloadDefaults(NamedTuple):
    """A command's defaults for --batch, --prompt-len, --gen-len."""

    batch: int
    prompt_len: int
    gen_len: int


SEED_WORKLOAD = WorkloadDefaults(128, 2048, 256)
"""The seed scenario: describe, analyze and plan."""
VERIFY_WORKLOAD = WorkloadDefaults(8, 16, 4)
"""verify: both the sharded model and the one-device reference run on this host."""
RUN_WORKLOAD = WorkloadDefaults(8, 32, 8)
"""run: emulated devices by default."""

_WORKLOAD_HELP = ("Sequences served together.", "Prompt tokens per sequence.",
                  "Generated tokens per sequence (the KV cache holds prompt + generated).")


def workload_options(defaults: WorkloadDefaults, *, explained: bool = False):
    """--batch, --prompt-len, --gen-len (positive integers) with `defaults`; `explained` adds their help."""
    helps = _WORKLOAD_HELP if explained else (None, None, None)

    def decorate(fn):
        for flag, default, text in reversed(list(zip(("--batch", "--prompt-len", "--gen-len"), defaults, helps,
                                                      strict=True))):
            fn = click.option(flag, type=int, default=default, show_default=True, callback=positive, help=text)(fn)
        return fn
    return decorate


def json_flag(help_text: str = "Print JSON."):
    """--json as a flag: print JSON on stdout instead of tables (`as_json`)."""
    return click.option("--json", "as_json", is_flag=True, help=help_text)


def output_options(json_help: str, markdown_help: str | None = None):
    """--json FILE ('-' for stdout; `json_path`) and, with `markdown_help`, --markdown FILE (`md_path`);
    `moe_jax.cli.outputs` checks and writes them."""
    def decorate(fn):
        if markdown_help is not None:
            fn = click.option("--markdown", "md_path", help=markdown_help)(fn)
        return click.option("--json", "json_path", help=json_help)(fn)
    return decorate


model_option = click.option("--model", "model_name", default="seed-30b", show_default=True,
                            help=f"Model preset ({', '.join(preset_names())}).")
"""--model for the commands that plan a model (a preset, the seed model by default)."""

SEED_STRATEGY = "EP64-TP8-PP2-DP1"
SEED_STRATEGY_HELP = "Strategy name like EP64-TP8-PP2-DP1, or a TOML file (see meshes/)."


def strategy_option(default: str = SEED_STRATEGY, help_text: str = SEED_STRATEGY_HELP, *, mesh: bool = False):
    """--strategy (`strategy_spec`): a strategy name or TOML file; `mesh` also accepts it as --mesh."""
    flags = ("--mesh", "--strategy") if mesh else ("--strategy",)
    return click.option(*flags, "strategy_spec", default=default, show_default=True, help=help_text)


def hardware_option(help_text: str):
    """--hardware (`hardware_spec`): a hardware preset or TOML file, the seed's GPU by default."""
    return click.option("--hardware", "hardware_spec", default="seed-gpu", show_default=True, help=help_text)


def backend_option(help_text: str):
    """--backend: which compiler produces the programs (`moe_jax.names.BACKEND_CHOICES`, auto by default)."""
    return click.option("--backend", type=choice(BACKEND_CHOICES), default=AUTO, show_default=True, help=help_text)


seed_option = click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True)
"""--seed: of the random weights and tokens."""


def dispatch_option(both: bool = False):
    """--dispatch: the expert path (the model's own setting when not given); `both` adds the plan's comparison."""
    choices = [Dispatch.CAPACITY, Dispatch.DROPLESS] + (["both"] if both else [])
    return click.option("--dispatch", type=choice(choices),
                        help="Expert dispatch: capacity (GShard slots, overflow dropped) or dropless (sorted "
                             "tokens, grouped matmul, ragged all-to-all)" +
                             ("; both: search with the model's, then compile the best strategy with each" if both
                              else "") + ". Default: the model's (capacity for presets).")


buffer_option = click.option(
    "--dropless-buffer", type=float, help="Dropless with ep > 1: bound each shard's receive buffer to this many "
    "times the expected rows (rows past it are dropped and counted). Default: the worst case, nothing dropped.")
"""--dropless-buffer: a bound on dropless dispatch's receive buffers."""


capacity_option = click.option(
    "--capacity-factor", type=float, help="Capacity dispatch: each expert gets ceil(factor x Sg x k / E) slots per "
    "token group of Sg tokens; assignments past them are dropped (E/k drops nothing). Default: the model's "
    "(1.25 for presets).")
"""--capacity-factor: capacity dispatch's slots per expert."""


def apply_dispatch(cfg, dispatch: str | None, buffer: float | None = None, capacity_factor: float | None = None):
    """`cfg` with --dispatch, --dropless-buffer and --capacity-factor applied (``both`` keeps the model's
    dispatch)."""
    if dispatch not in (None, "both"):
        cfg = cfg.replace(dispatch=dispatch)
    if capacity_factor is not None:
        if cfg.dispatch != Dispatch.CAPACITY and dispatch != "both":
            raise MoeJaxError(f"--capacity-factor {capacity_factor:g} applies to capacity dispatch; this run uses "
                              f"{cfg.dispatch} (add --dispatch capacity)")
        if not (capacity_factor > 0 and capacity_factor <= cfg.num_experts):
            raise MoeJaxError(f"--capacity-factor {capacity_factor:g} must be > 0 and at most the expert count "
                              f"{cfg.num_experts} (E/k = {cfg.num_experts / cfg.top_k:g} already drops nothing)")
        cfg = cfg.replace(capacity_factor=capacity_factor)
    if buffer is not None:
        if cfg.dispatch != Dispatch.DROPLESS and dispatch != "both":
            raise MoeJaxError(f"--dropless-buffer {buffer:g} applies to dropless dispatch; add --dispatch dropless")
        cfg = cfg.replace(dropless_buffer=buffer)
    return cfg


def parse_slo(value, name: str) -> float | None:
    """An SLO in seconds from the command line's text: ``200ms``, ``0.2s``, or a plain number of milliseconds
    (``150``); None stays None. Anything else, or a value not above zero, is a `MoeJaxError` naming `name`."""
    if value is None:
        return None
    text = str(value).strip().lower()
    scale, number = 1e-3, text                           # a plain number is milliseconds
    for suffix, factor in (("ms", 1e-3), ("s", 1.0)):    # "ms" before "s": "200ms" also ends in "s"
        if text.endswith(suffix):
            scale, number = factor, text[: -len(suffix)].strip()
            break
    try:
        amount = float(number)
    except ValueError:
        raise MoeJaxError(f"{name} {value!r} is not a duration: write milliseconds as 200ms or 200, or seconds "
                          "as 0.2s") from None
    if not (amount > 0 and amount != float("inf")):
        raise MoeJaxError(f"{name} {amount} must be a positive number (milliseconds: 200ms or 200; seconds: 0.2s)")
    return amount * scale


def slo_option(flag: str, what: str):
    """--slo-ttft / --slo-tpot: a latency limit, parsed by `parse_slo` to seconds."""
    return click.option(flag, callback=lambda ctx, param, value: parse_slo(value, flag), metavar="DURATION",
                        help=f"Largest acceptable {what}: 200ms, 0.2s, or a plain number of milliseconds.")


headroom_option = click.option(
    "--headroom", type=float, default=0.10, show_default=True,
    help="Share of device memory kept free when sizing the capacity (max concurrency): 0.1 keeps 10%.")
"""--headroom: the capacity's free share of device memory (`moe_jax.planner.capacity`)."""


def disaggregated_options(fn):
    """--disaggregated and --rate: a prefill pool and a decode pool (`moe_jax.planner.disaggregated`)."""
    fn = click.option("--rate", type=float, help="With --disaggregated: size the pools for this many requests/s "
                      "(default: the most requests/s the --devices serve).")(fn)
    return click.option("--disaggregated", is_flag=True, help="Also plan prefill and decode on separate pools, each "
                        "its own strategy (replicas of a divisor of --devices), size the pools for --rate or the "
                        "--devices, time the KV cache's move between them, and compare with the best aggregated "
                        "deployment (both compiled).")(fn)


dtype_option = click.option(
    "--dtype", type=choice(DTYPE_BY_SHORT), help="Weights' dtype: bf16, f16 or f32 (activations and every parameter "
    "in it), or fp8 (the layers' matmul weights in FP8 E4M3 with a scale per matrix, dequantized before each "
    "matmul; activations, embedding, head, norms and router stay in the model's dtype). Default: the model's.")
"""--dtype: the weights' dtype (fp8: FP8 matmul weights)."""

kv_dtype_option = click.option(
    "--kv-dtype", type=choice(DTYPE_BY_SHORT), help="KV cache dtype: fp8 (E4M3, a saturating cast, read back to the "
    "activations' dtype), bf16, f16 or f32. Default: the activations' dtype.")
"""--kv-dtype: the KV cache's dtype."""


def apply_dtypes(cfg, dtype: str | None, kv_dtype: str | None):
    """`cfg` with --dtype and --kv-dtype (CLI spellings, `moe_jax.names.DTYPE_BY_SHORT`) applied: fp8 stores the
    matmul weights in FP8 and keeps the compute dtype; another dtype becomes the compute dtype of everything."""
    for flag, value in (("--dtype", dtype), ("--kv-dtype", kv_dtype)):
        if value is not None and value not in DTYPE_BY_SHORT:
            raise MoeJaxError(f"{flag} {value!r}: valid: {', '.join(DTYPE_BY_SHORT)}")
    if dtype is not None:
        name = DTYPE_BY_SHORT[dtype].name
        cfg = cfg.replace(weight_dtype=name) if name == FP8 else cfg.replace(dtype=name, weight_dtype=None)
    if kv_dtype is not None:
        cfg = cfg.replace(kv_dtype=DTYPE_BY_SHORT[kv_dtype].name)
    return cfg


def cluster_options(fn):
    """--coordinator, --num-processes, --process-id, --timeout: one mesh over several processes."""
    for option in reversed([
        click.option("--coordinator", help="HOST:PORT of process 0 in a multi-process run (jax.distributed), or "
                                           "'auto' to let jax read SLURM / Open MPI / TPU pod settings "
                                           "[env MOE_JAX_COORDINATOR]."),
        click.option("--num-processes", help="Processes in the run; their devices form one mesh "
                                             "[env MOE_JAX_NUM_PROCESSES]."),
        click.option("--process-id", help="This process, 0 to N-1; process 0 reports [env MOE_JAX_PROCESS_ID]."),
        click.option("--timeout", help="Seconds to wait for peers (joining, each step, shutting down) before "
                                       "exiting with status 4 [env MOE_JAX_TIMEOUT; default 300]."),
    ]):
        fn = option(fn)
    return fn


def cluster_from(coordinator, num_processes, process_id, timeout, *, cpu_devices=None, progress=False):
    """The `Cluster` the `cluster_options` name (one process when no cluster is named).

    A process of a multi-process run does its work in a supervised child of this same command
    (`moe_jax.runtime.supervise`: jax's runtime would otherwise end it with an abort when the
    coordinator dies), started when the cluster is entered, after the command's own checks.
    """
    from moe_jax.runtime.distributed import Cluster, resolve

    spec = resolve(coordinator, num_processes, process_id, timeout)
    return Cluster(spec, cpu_devices=cpu_devices, progress=progress, command=this_command() if spec else None)


def this_command() -> list[str]:
    """The command line that runs this same moe-jax invocation again: the process's own when `main` read
    `sys.argv`, else ``python -m moe_jax.cli`` with the arguments `main` was given."""
    ctx = click.get_current_context(silent=True)
    argv = ctx.find_root().obj.get("argv") if ctx is not None and isinstance(ctx.find_root().obj, dict) else None
    if argv is None:
        return list(sys.orig_argv)
    return [sys.executable, "-m", "moe_jax.cli", *argv]
