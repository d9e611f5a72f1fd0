"""Launch files for a planned strategy (``plan --emit DIR``): the `moe-jax run` command that runs it, and its
closest form in MaxText (a parallelism override file), vLLM and SGLang (launch commands).

moe-jax's mesh is (dp, pp, ep, tp), tp on neighbouring devices (`moe_jax.parallel.mesh`): attention is split
over tp with the batch split over dp × ep, the experts over ep (whole experts) and tp (each expert's FFN width),
the layers over pp, and dp replicas are independent. Each file says, in a ``Does not carry over:`` comment line,
where the other system cannot express that (or expresses it differently).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moe_jax.config import ModelConfig
from moe_jax.costs.compile import Workload
from moe_jax.errors import MoeJaxError
from moe_jax.files import write_atomic
from moe_jax.hardware.presets import Hardware
from moe_jax.names import DTYPE_BY_SHORT, Dispatch
from moe_jax.parallel.mesh import Strategy

if TYPE_CHECKING:                     # the planner is a later stage: its result is only read here
    from moe_jax.planner.result import PlanResult

HF_IDS = {
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen3-235b-a22b": "Qwen/Qwen3-235B-A22B",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "mixtral-8x22b": "mistralai/Mixtral-8x22B-v0.1",
    "olmoe-1b-7b": "allenai/OLMoE-1B-7B-0924",
    "dbrx": "databricks/dbrx-base",
    "deepseek-v3": "deepseek-ai/DeepSeek-V3",
    "kimi-k2": "moonshotai/Kimi-K2-Instruct",
    "glm-4.5": "zai-org/GLM-4.5",
    "glm-4.5-air": "zai-org/GLM-4.5-Air",
    "gpt-oss-120b": "openai/gpt-oss-120b",
    "gpt-oss-20b": "openai/gpt-oss-20b",
}
"""The Hugging Face repository of each preset whose config is a published checkpoint's (the seed model and the
test models have none)."""

LAUNCH_FILES = ("run.sh", "maxtext.yml", "vllm.sh", "sglang.sh", "README.md")
"""What ``plan --emit DIR`` writes into DIR."""

MAXTEXT_AXES = (("data", "dp"), ("fsdp", None), ("pipeline", "pp"), ("expert", "ep"), ("tensor", "tp"))
"""MaxText's parallelism keys (``ici_<axis>_parallelism``, ``dcn_<axis>_parallelism``) and the strategy axis each
one holds (fsdp: none, written as 1 since MaxText's default shards over it)."""

NOT_CARRIED = "# Does not carry over: "
"""How each emitted file begins the line saying what the other system cannot express."""


@dataclass(frozen=True)
class LaunchSpec:
    """What the launch files describe: the planned model, strategy, hardware and workload."""

    cfg: ModelConfig
    strategy: Strategy
    hw: Hardware
    workload: Workload
    model_arg: str
    """What `moe-jax run --model` gets: a preset name or a checkpoint directory (absolute)."""
    hardware_arg: str
    """What `moe-jax run --hardware` gets: a preset name or a hardware TOML file (absolute)."""
    predicted: dict | None = None
    """The plan's figures for this strategy (``ttft_s``, ``tpot_s``, ``throughput_tok_s``), for the README."""

    @classmethod
    def of(cls, cfg: ModelConfig, strategy: Strategy, hw: Hardware, workload: Workload, *, model: str,
           hardware: str, predicted: dict | None = None) -> LaunchSpec:
        """A spec from the plan's inputs; `model` and `hardware` as the user gave them (files made absolute, so
        the emitted commands work from any directory)."""
        return cls(cfg, strategy, hw, workload, _absolute(model), _absolute(hardware), predicted)

    @property
    def nodes(self) -> int:
        """Nodes the strategy's devices fill (the last one possibly in part)."""
        return -(-self.strategy.num_devices // self.hw.devices_per_node)


def _absolute(arg: str) -> str:
    p = Path(arg)
    return str(p.resolve()) if p.exists() else arg


def hf_model(spec: LaunchSpec) -> tuple[str, str | None]:
    """(the model vLLM and SGLang load, a note when it is not a known Hugging Face id)."""
    if Path(spec.model_arg).is_dir():
        return spec.model_arg, None
    hf = HF_IDS.get(spec.cfg.name)
    if hf:
        return hf, None
    return spec.cfg.name, (f"no Hugging Face checkpoint is known for preset {spec.cfg.name!r}: MODEL is its name; "
                           "set MODEL to a checkpoint (id or directory) with this architecture")


def ici_dcn(strategy: Strategy, devices_per_node: int) -> tuple[dict[str, int], dict[str, int], str | None]:
    """Each axis's size inside a node (ici) and across nodes (dcn), by axis name (dp, pp, ep, tp), with a note
    when the nodes do not cut the mesh into whole blocks.

    The devices are numbered over the mesh (dp, pp, ep, tp) with tp fastest, and a node holds
    `devices_per_node` consecutive ones: from tp outwards each axis is inside the node while the node has room
    for it, split when the node holds a whole fraction of it, and across nodes after that.
    """
    room = min(devices_per_node, strategy.num_devices)
    ici, dcn, note = {}, {}, None
    for axis in ("tp", "ep", "pp", "dp"):
        size = getattr(strategy, axis)
        if room % size == 0:
            ici[axis], room = size, room // size
        elif size % room == 0:
            ici[axis], room = room, 1
        else:
            note = (f"a node of {devices_per_node} devices does not hold whole blocks of the mesh "
                    f"({strategy.name}: {axis}={size} with {room} device(s) of the node left), so no ici × dcn "
                    "split per axis describes it; every axis is written as ici")
            return strategy.mesh_shape, dict.fromkeys(strategy.mesh_shape, 1), note
        dcn[axis] = size // ici[axis]
    return ici, dcn, note


def run_command(spec: LaunchSpec) -> list[str]:
    """The `moe-jax run` arguments (after ``moe-jax``) that run the planned program on the devices jax sees."""
    cfg, w = spec.cfg, spec.workload
    args = ["run", "--model", spec.model_arg, "--mesh", spec.strategy.name, "--batch", str(w.batch),
            "--prompt-len", str(w.prompt_len), "--gen-len", str(w.gen_len), "--dispatch", str(cfg.dispatch)]
    if cfg.dispatch == Dispatch.CAPACITY:
        args += ["--capacity-factor", f"{cfg.capacity_factor:g}"]
    elif cfg.dispatch == Dispatch.DROPLESS and cfg.dropless_buffer is not None:
        args += ["--dropless-buffer", f"{cfg.dropless_buffer:g}"]
    short = {d.name: s for s, d in DTYPE_BY_SHORT.items()}.get(cfg.dtype)
    if short:
        args += ["--dtype", short]
    return args + ["--hardware", spec.hardware_arg, "--backend", "real"]


def _header(spec: LaunchSpec, what: str) -> list[str]:
    s, hw = spec.strategy, spec.hw
    w = spec.workload
    return [f"# {what}: {spec.cfg.name} under {s.name} on {s.num_devices} x {hw.name} "
            f"({hw.devices_per_node} per node: {spec.nodes} node(s)), batch {w.batch}, prompt {w.prompt_len}, "
            f"generate {w.gen_len}.",
            "# Written by `moe-jax plan --emit`."]


def run_script(spec: LaunchSpec) -> str:
    """run.sh: the `moe-jax run` command for the planned strategy (extra arguments are passed on)."""
    lines = ["#!/usr/bin/env bash", *_header(spec, "moe-jax runs the planned program"),
             NOT_CARRIED + "nothing: this is the program the plan compiled, run on the devices jax sees "
             "(random weights unless you add --weights DIR; add --backend cpu to try it on emulated CPU devices).",
             "# MOE_JAX names the command (default: moe-jax on PATH)."]
    if spec.nodes > 1:
        lines.append(f"# The mesh spans {spec.nodes} nodes: run this on each of them with MOE_JAX_COORDINATOR="
                     f"HOST:PORT MOE_JAX_NUM_PROCESSES={spec.nodes} MOE_JAX_PROCESS_ID=0..{spec.nodes - 1} "
                     "(or MOE_JAX_COORDINATOR=auto under SLURM / Open MPI).")
    cmd = " ".join(shlex.quote(a) for a in run_command(spec))
    lines += ["set -euo pipefail", f'exec ${{MOE_JAX:-moe-jax}} {cmd} "$@"', ""]
    return "\n".join(lines)


def maxtext_yaml(spec: LaunchSpec) -> str:
    """maxtext.yml: MaxText's ici_*/dcn_* parallelism per axis, the MoE and workload keys."""
    s, cfg, w = spec.strategy, spec.cfg, spec.workload
    ici, dcn, note = ici_dcn(s, spec.hw.devices_per_node)
    lost = ["MaxText builds its own device mesh from these sizes (its axis order, not moe-jax's dp, pp, ep, tp with "
            "tp on neighbouring devices)"]
    if note:
        lost.append(note)
    if cfg.dispatch == Dispatch.CAPACITY:
        lost.append("capacity_factor carries, but MaxText forms its own token groups, so which assignments drop "
                    "can differ")
    lines = [*_header(spec, "MaxText parallelism overrides"), NOT_CARRIED + "; ".join(lost) + ".",
             f"# ici: inside a node ({spec.hw.devices_per_node} devices), dcn: across the {spec.nodes} node(s) "
             "(num_slices).", f"model_name: {cfg.name}"]
    for prefix, sizes in (("ici", ici), ("dcn", dcn)):
        for key, axis in MAXTEXT_AXES:
            lines.append(f"{prefix}_{key}_parallelism: {sizes[axis] if axis else 1}")
    lines += [f"num_experts: {cfg.num_experts}", f"num_experts_per_tok: {cfg.top_k}",
              f"capacity_factor: {cfg.capacity_factor if cfg.dispatch == Dispatch.CAPACITY else -1.0}",
              f"per_device_batch_size: {w.batch / s.num_devices}",
              f"max_prefill_predict_length: {w.prompt_len}", f"max_target_length: {w.cache_len}", ""]
    return "\n".join(lines)


def _replicas_note(spec: LaunchSpec, system: str) -> str | None:
    dp = spec.strategy.dp
    if dp == 1:
        return None
    per = spec.strategy.num_devices // dp
    return (f"dp={dp} independent replicas: start {dp} {system} servers of {per} devices each (this command is "
            "one) behind a load balancer")


def _dispatch_note(cfg: ModelConfig) -> str | None:
    if cfg.dispatch == Dispatch.CAPACITY:
        return (f"capacity dispatch (factor {cfg.capacity_factor:g}) has no equivalent: the server's MoE is "
                "dropless, so its tokens can differ from this plan's capacity run")
    return None


def vllm_script(spec: LaunchSpec) -> str:
    """vllm.sh: ``vllm serve`` with TP = tp, DP = ep (attention data-parallel, experts split over TP × DP), PP = pp.

    vLLM's expert-parallel size is not a flag: with --enable-expert-parallel it is TP × DP, whole experts per
    rank, where moe-jax splits E/ep experts over ep and each one's width over tp (the same bytes per device).
    """
    s, cfg, w = spec.strategy, spec.cfg, spec.workload
    model, model_note = hf_model(spec)
    ep_size = s.tp * s.ep
    lost = [n for n in (model_note, _replicas_note(spec, "vLLM"), _dispatch_note(cfg)) if n]
    if s.ep > 1:
        lost.append(f"vLLM's expert-parallel size is TP x DP = {ep_size}, not a free axis: it places whole experts "
                    f"on {ep_size} ranks where this plan splits {cfg.num_experts // s.ep} experts per ep rank over "
                    f"ep={s.ep} and each expert's width over tp={s.tp}")
        if cfg.num_experts % ep_size:
            lost.append(f"EP {ep_size} does not divide the {cfg.num_experts} experts")
    flags = ["--tensor-parallel-size", str(s.tp), "--pipeline-parallel-size", str(s.pp),
             "--data-parallel-size", str(s.ep)]
    if s.ep > 1:
        flags.append("--enable-expert-parallel")
    flags += ["--max-num-seqs", str(w.batch // s.dp), "--max-model-len", str(w.cache_len)]
    return _server_script(spec, "vLLM launch", model, lost, "vllm serve \"$MODEL\"", flags)


def sglang_script(spec: LaunchSpec) -> str:
    """sglang.sh: ``python -m sglang.launch_server`` with TP = ep × tp GPUs per stage, DP attention over ep (each
    attention group tp wide), EP = ep (each expert's width over the remaining tp), PP = pp."""
    s, cfg, w = spec.strategy, spec.cfg, spec.workload
    model, model_note = hf_model(spec)
    lost = [n for n in (model_note, _replicas_note(spec, "SGLang"), _dispatch_note(cfg)) if n]
    flags = ["--tp-size", str(s.ep * s.tp)]
    if s.ep > 1:
        flags += ["--dp-size", str(s.ep), "--enable-dp-attention", "--ep-size", str(s.ep)]
        lost.append("DP attention is implemented for some architectures only (DeepSeek's MLA, Qwen MoE, ...): "
                    "without it attention is split tp x ep ways, not tp ways over ep batch shards")
    flags += ["--pp-size", str(s.pp), "--max-running-requests", str(w.batch // s.dp),
              "--context-length", str(w.cache_len)]
    return _server_script(spec, "SGLang launch", model, lost, "python -m sglang.launch_server --model-path \"$MODEL\"",
                          flags)


def _server_script(spec: LaunchSpec, what: str, model: str, lost: list[str], command: str, flags: list[str]) -> str:
    lines = ["#!/usr/bin/env bash", *_header(spec, what),
             NOT_CARRIED + ("; ".join(lost) if lost else "nothing known") + ".",
             "set -euo pipefail", f"MODEL=${{MODEL:-{shlex.quote(model)}}}"]
    if spec.nodes > 1:
        lines.insert(-2, f"# Spans {spec.nodes} nodes: add the server's multi-node options (its docs: node count, "
                         "rank, head address).")
    lines += [f"exec {command} {' '.join(flags)} \"$@\"", ""]
    return "\n".join(lines)


def readme(spec: LaunchSpec) -> str:
    """README.md: what each file is, and the plan's figures for the strategy."""
    s, w = spec.strategy, spec.workload
    lines = [f"# Launching {spec.cfg.name} under {s.name}", "",
             f"Planned by `moe-jax plan` for {s.num_devices} x {spec.hw.name} ({spec.hw.devices_per_node} per "
             f"node, {spec.nodes} node(s)); batch {w.batch}, prompt {w.prompt_len}, generate {w.gen_len}; "
             f"{spec.cfg.dispatch} dispatch.", ""]
    if spec.predicted:
        p = spec.predicted
        lines += [f"Predicted: TTFT {p['ttft_s'] * 1e3:.3g} ms, TPOT {p['tpot_s'] * 1e3:.3g} ms, "
                  f"{p['throughput_tok_s']:,.0f} tokens/s.", ""]
    lines += ["| file | what |", "|---|---|",
              "| `run.sh` | the `moe-jax run` command that runs the planned program (extra arguments are passed on) |",
              "| `maxtext.yml` | MaxText parallelism overrides: `ici_*` (inside a node) and `dcn_*` (across nodes) "
              "per axis |",
              "| `vllm.sh` | `vllm serve` with the closest tensor / pipeline / data / expert parallel flags |",
              "| `sglang.sh` | `python -m sglang.launch_server` with the closest flags |",
              "| `README.md` | this list |", "",
              "Each file has a `# Does not carry over:` line saying what the other system cannot express.", ""]
    return "\n".join(lines)


def launch_files(spec: LaunchSpec) -> dict[str, str]:
    """File name → text, for every file of `LAUNCH_FILES`."""
    return {"run.sh": run_script(spec), "maxtext.yml": maxtext_yaml(spec), "vllm.sh": vllm_script(spec),
            "sglang.sh": sglang_script(spec), "README.md": readme(spec)}


def check_emit_dir(directory: str | Path, force: bool = False) -> Path:
    """The --emit directory, checked before any work: it may be new (its parent must exist) or a directory; if
    it already holds any of `LAUNCH_FILES`, they are replaced only with `force`."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise MoeJaxError(f"--emit {str(directory)!r} exists and is not a directory")
    if not d.exists():
        if not d.parent.exists():
            raise MoeJaxError(f"--emit {str(directory)!r}: directory {str(d.parent)!r} does not exist")
        return d
    existing = [name for name in LAUNCH_FILES if (d / name).exists() or (d / name).is_symlink()]
    if existing and not force:
        raise MoeJaxError(f"--emit {str(directory)!r} already holds {', '.join(existing)}; they would be "
                          "overwritten: choose another directory, remove them, or add --force")
    return d


def write_launch(directory: str | Path, spec: LaunchSpec, force: bool = False) -> list[Path]:
    """Write `launch_files` into `directory` (checked again by `check_emit_dir`); the scripts executable.
    Returns the paths written."""
    d = check_emit_dir(directory, force)
    try:
        d.mkdir(exist_ok=True)
    except OSError as e:
        raise MoeJaxError(f"--emit {str(directory)!r}: cannot create it: {e.strerror or e}") from None
    written = []
    for name, text in launch_files(spec).items():
        path = d / name
        write_atomic(path, text)
        if name.endswith(".sh"):
            path.chmod(path.stat().st_mode | 0o111)
        written.append(path)
    return written


def spec_from_plan(result: PlanResult, *, model: str, hardware: str) -> LaunchSpec | None:
    """The `LaunchSpec` of a plan's best strategy (None when nothing was chosen), with its compiled figures."""
    if not result.best:
        return None
    spec = result.spec
    best = next((c for c in result.candidates if c.strategy == result.best), None)
    predicted = None
    if best is not None and best.ttft_s and best.tpot_s and best.throughput_tok_s:
        predicted = {"ttft_s": best.ttft_s, "tpot_s": best.tpot_s, "throughput_tok_s": best.throughput_tok_s}
    return LaunchSpec.of(spec.cfg, Strategy.parse(result.best), spec.hw, spec.workload, model=model,
                         hardware=hardware, predicted=predicted)
