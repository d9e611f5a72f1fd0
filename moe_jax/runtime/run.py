"""Run the sharded model for real, measure TTFT and TPOT, and hold the prediction against them.

Timing: every program is compiled and run once before it is timed (warm-up), each run
ends with `block_until_ready`, prefill is timed over `repeats` runs on fresh caches and
decode over every generated step after the first; medians are reported with the
spread (min, max). On emulated CPU devices the devices share the host's cores: the
run is a functional check, not a timing claim, and the result says so.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from moe_jax.config import ModelConfig
from moe_jax.costs.compile import Workload
from moe_jax.errors import MoeJaxError
from moe_jax.names import AUTO, Backend, Dispatch
from moe_jax.parallel.mesh import Strategy


@dataclass
class Timing:
    """Wall-clock seconds of repeated runs."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.samples), max(self.samples)

    def to_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.spread[0], "max_s": self.spread[1], "runs": len(self.samples)}


def time_call(fn, *args, repeats: int = 5, warmup: int = 1) -> Timing:
    """Time `fn(*args)` (blocking on its result): `warmup` untimed calls, then `repeats` timed ones."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return Timing(samples)


def read_prompt_file(path: str | Path) -> list[list[int]]:
    """Token ids from JSON ``{"prompt": [[ids...], ...]}``; all rows the same length."""
    from moe_jax.files import read_json

    p = Path(path)
    data = read_json(p, "prompt file")
    rows = data.get("prompt") if isinstance(data, dict) else None
    if (not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows)
            or not all(isinstance(t, int) and not isinstance(t, bool) for r in rows for t in r)):
        raise MoeJaxError(f"prompt file {str(p)!r}: expected {{\"prompt\": [[token ids...], ...]}} with non-empty "
                          "rows of integers")
    if len({len(r) for r in rows}) != 1:
        raise MoeJaxError(f"prompt file {str(p)!r}: rows have lengths {sorted({len(r) for r in rows})}; "
                          "all must be equal")
    return rows


@dataclass
class RunResult:
    """A measured run and the prediction for the same program."""

    model: str
    strategy: str
    backend: str
    device_kind: str
    workload: dict
    ttft: Timing
    tpot: Timing
    tokens: list[list[int]]
    predicted: dict | None = None
    notes: list[str] = field(default_factory=list)
    processes: int = 1
    """Processes that ran the program together (jax.distributed), each on its share of the mesh."""
    dropped: dict | None = None
    """Token-expert assignments the run's programs dropped (capacity dispatch past its slots, or a bounded
    dropless buffer): ``{"prefill", "decode", "total", "assignments", "fraction", "per_layer", "worst_layer"}``,
    counted from the programs' own outputs (decode summed over its steps). ``per_layer`` holds
    ``{"prefill": [...], "decode": [...]}``, one count per layer of the model (a dense leading layer's is 0);
    ``worst_layer`` is the layer that dropped the most (None when nothing was dropped)."""
    prefill_logits: object | None = None
    """Prefill logits [B, S, V] (every prompt position) as a numpy array when asked for (`keep_logits`);
    not in the JSON."""

    @property
    def measured(self) -> dict:
        return {"ttft_s": self.ttft.median, "tpot_s": self.tpot.median,
                "throughput_tok_s": self.workload["batch"] / self.tpot.median}

    @property
    def error(self) -> dict:
        """(predicted − measured) / measured, per metric."""
        if not self.predicted:
            return {}
        return {k: (self.predicted[k] - v) / v for k, v in self.measured.items() if self.predicted.get(k)}

    def to_dict(self) -> dict:
        return {"schema": "moe-jax.run/1", "model": self.model, "strategy": self.strategy, "backend": self.backend,
                "device_kind": self.device_kind, "processes": self.processes, "workload": self.workload,
                "measured": self.measured,
                "timing": {"ttft": self.ttft.to_dict(), "tpot": self.tpot.to_dict()}, "predicted": self.predicted,
                "error": self.error, "dropped": self.dropped, "tokens": self.tokens, "notes": self.notes}


def _full_prefill_logits(sm, params, tokens, batch: int, cache_len: int):
    """Every prompt position's logits [B, S, V]: the prefill built with full logits, run once on `sm`'s mesh."""
    from moe_jax.programs.sharded import ShardedModel

    full = ShardedModel(sm.cfg, sm.strategy, sm.mesh, full_logits=True,
                        prefill_microbatches=sm.prefill_microbatches, kernels=sm.kernels)
    return full.prefill(params, tokens, sm.init_cache(batch, cache_len)).logits


def _per_layer(cfg: ModelConfig, dropped) -> list[int]:
    """A program's dropped counts [L_moe, G] (per MoE layer and token group) as one count per layer of the model:
    the dense layers, which route nothing (the ``first_dense_layers``, and those between MoE layers with
    ``moe_interleave``), with 0."""
    counts = dropped.reshape(cfg.moe_layers, -1).sum(axis=1)
    per_layer = [0] * cfg.num_layers
    for layer, c in zip(cfg.moe_layer_indices, counts, strict=True):
        per_layer[layer] = int(c)
    return per_layer


PROFILED_DECODE_STEPS = 3
"""Decode steps `run` traces when asked for a profile (after the timed ones)."""


def _profile(where: str | Path, prefill_once, decode_at, positions) -> None:
    """Trace one prefill and a decode step at each of `positions` (each blocking) into `where`. The Python
    tracer is off: the trace holds the device's kernels and the host's dispatch, not every Python call."""
    import jax

    from moe_jax.runtime.oprofile import quiet_profile_options

    Path(where).mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(where), create_perfetto_trace=True, profiler_options=quiet_profile_options()):
        prefill_once()
        for pos in positions:
            jax.block_until_ready(decode_at(pos).logits)


def run(cfg: ModelConfig, strategy: Strategy, workload: Workload, *, weights: str | Path | None = None,
        prompt: list[list[int]] | None = None, seed: int = 0, hardware=None, backend: str = Backend.CPU,
        repeats: int = 3, predict: bool = True, max_steps: int | None = None, keep_logits: bool = False,
        progress=None, profile_dir: str | Path | None = None) -> RunResult:
    """Initialise (or load) the sharded model, prefill, decode greedily, time both, and predict.

    prompt: token ids [B][S] (default: random from `seed`, the same on every mesh).
    max_steps: decode at most this many tokens (the cache still holds prompt + gen_len), to
    measure TPOT without a whole generation.
    keep_logits: also return the prefill logits of every prompt position on the host
    (`RunResult.prefill_logits`, [B, S, V]). They come from one extra call of a prefill built
    with full logits; the timed prefill is the serving program (last position's logits only).
    progress: called with the name of each step as it starts (a multi-process run's watchdog).
    profile_dir: after the timed runs, trace one more prefill and `PROFILED_DECODE_STEPS` decode steps
    with ``jax.profiler`` into this folder (a Perfetto ``perfetto_trace.json.gz`` beside the
    TensorBoard files): each kernel's time on the device, outside the timed samples.

    Several processes (`jax.distributed`) run this together: the mesh spans all their
    devices, every process passes the same prompt and seed (inputs are built as global
    arrays from them), and each gets the whole result (tokens and logits gathered).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moe_jax.parallel.mesh import validate
    from moe_jax.programs.sharded import ShardedModel

    B, S, G = workload.batch, workload.prompt_len, workload.gen_len
    validate(strategy, cfg, batch=B, num_devices=None)
    if G < 3:
        raise MoeJaxError(f"--gen-len {G}: at least 3 generated tokens are needed (one decode step compiles "
                          "the program, the next is timed)")
    from moe_jax.parallel.mesh import build_mesh
    from moe_jax.runtime.distributed import to_host

    step_done = progress or (lambda what: None)
    have = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))   # process by process: tp stays local
    if len(have) < strategy.num_devices or (jax.process_count() > 1 and len(have) != strategy.num_devices):
        raise MoeJaxError(f"{strategy.name} needs {strategy.num_devices} devices; jax sees {len(have)} "
                          f"{have[0].platform} device(s) in {jax.process_count()} process(es)"
                          + (" (a multi-process run uses all of them)" if jax.process_count() > 1 else ""))
    step_done("building the sharded model")
    sm = ShardedModel(cfg, strategy, build_mesh(strategy, have[:strategy.num_devices]))
    step_done("loading the weights" if weights is not None else "initialising the weights")
    if weights is not None:
        from moe_jax.checkpoints.weights import load_params

        params = load_params(weights, cfg, sm.param_shardings, sm.abstract_params)
    else:
        params = sm.init_params(seed)                       # created in their shards, never whole on one device
    if prompt is None:
        prompt = np.asarray(jax.random.randint(jax.random.key(seed + 1), (B, S), 0, cfg.vocab_size))
    step_done("placing the prompt")
    tokens = sm.put_tokens(np.asarray(prompt, np.int32))      # a host array: every process cuts its shards

    def prefill_once():
        cache = jax.block_until_ready(sm.init_cache(B, S + G))   # allocation is not part of TTFT
        start = time.perf_counter()
        result = jax.block_until_ready(sm.prefill(params, tokens, cache))
        return time.perf_counter() - start, result

    step_done("prefill (compiling)")
    _, out = prefill_once()                                      # warm-up: compiles prefill
    from moe_jax.runtime.health import check_logits

    check_logits(out.logits, sm.graphdef, params, tokens, f"prefill of {cfg.name}")
    logits = None
    if keep_logits:
        step_done("prefill with full logits (compiling)")
        logits = to_host(_full_prefill_logits(sm, params, tokens, B, S + G))
    samples = []
    for i in range(repeats):
        step_done(f"timed prefill {i + 1} of {repeats}")
        # the same prefill again: its result replaces the last, whose KV cache goes before the next one is
        # allocated (two caches at once ran mixtral-8x7b at batch 64 out of an H200's memory, which the
        # planner had found to fit)
        out = None
        seconds, out = prefill_once()
        samples.append(seconds)
    ttft = Timing(samples)
    cache = out.cache
    token = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
    generated, steps = [to_host(token)], []
    prefill_layers, decode_dropped = _per_layer(cfg, to_host(out.dropped)), None   # decode's groups: its own shape
    last = S + G - 1 if max_steps is None else min(S + G - 1, S + max_steps)
    for pos in range(S, last):
        step_done(f"decode step {pos - S + 1} of {last - S}" + (" (compiling)" if pos == S else ""))
        start = time.perf_counter()
        step = sm.decode(params, sm.put_tokens(token), jnp.int32(pos), cache)
        token = jnp.argmax(step.logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
        jax.block_until_ready(token)
        steps.append(time.perf_counter() - start)
        cache = step.cache
        generated.append(to_host(token))
        # summed on the devices: one transfer after the loop
        decode_dropped = step.dropped if decode_dropped is None else decode_dropped + step.dropped
    decode = Timing(steps[1:])                                   # the first step compiles: warm-up
    profile_failed = None
    if profile_dir is not None and last < S + G - 1:
        step_done("profiling one prefill and the next decode steps")
        held = {"cache": cache}                        # each step donates the cache it is given

        def decode_at(pos):
            step = sm.decode(params, sm.put_tokens(token), jnp.int32(pos), held["cache"])
            held["cache"] = step.cache
            return step

        try:
            _profile(profile_dir, prefill_once, decode_at, range(last, min(S + G - 1, last + PROFILED_DECODE_STEPS)))
        except Exception as e:                     # the timed samples stand; the run says why no trace came
            profile_failed = f"the profile was not written: {type(e).__name__}: {e}"
    device = jax.devices()[0]
    result = RunResult(cfg.name, strategy.name, backend, getattr(device, "device_kind", device.platform),
                       workload.to_dict(), ttft, decode, np.concatenate(generated, axis=1).tolist(),
                       processes=jax.process_count(), prefill_logits=logits)
    steps_run = len(generated) - 1
    per_moe_layer = B * (S + steps_run) * cfg.top_k                # assignments of one MoE layer
    assignments = per_moe_layer * cfg.moe_layers                    # dense leading layers route nothing
    decode_layers = [0] * cfg.num_layers if decode_dropped is None else _per_layer(cfg, to_host(decode_dropped))
    dropped_prefill, dropped_decode = sum(prefill_layers), sum(decode_layers)
    total = dropped_prefill + dropped_decode
    by_layer = [p + d for p, d in zip(prefill_layers, decode_layers, strict=True)]
    worst = max(range(cfg.num_layers), key=by_layer.__getitem__) if total else None
    result.dropped = {"prefill": dropped_prefill, "decode": dropped_decode, "total": total,
                      "assignments": assignments, "fraction": total / assignments,
                      "per_layer": {"prefill": prefill_layers, "decode": decode_layers}, "worst_layer": worst}
    if total:
        result.notes.append(
            f"{cfg.dispatch} dispatch dropped {total:,} of {assignments:,} token-expert assignments "
            f"({total / assignments:.2%}; prefill {dropped_prefill:,}, decode {dropped_decode:,}; most in layer "
            f"{worst}: {by_layer[worst]:,} of its {per_moe_layer:,}, {by_layer[worst] / per_moe_layer:.2%}): those "
            "tokens skip the dropped experts, so the generated tokens can differ from a dropless run or the reference "
            + ("(--capacity-factor raises the slots; E/k drops nothing)" if cfg.dispatch == Dispatch.CAPACITY
               else "(--dropless-buffer bounds the receive buffer)"))
    if profile_failed:
        result.notes.append(profile_failed)
    if device.platform == Backend.CPU:
        result.notes.append("emulated CPU devices share the host's cores: a functional check, not a timing claim")
    if predict and hardware is not None:
        from moe_jax.perf.analysis import analyze

        step_done("predicting (compiling the program ahead of time)")
        # on real devices the program that ran is compiled; otherwise the hardware's own compiler (auto)
        a = analyze(cfg, strategy, hardware, workload, backend=Backend.REAL if backend == Backend.REAL else AUTO)
        if a.prediction is not None:
            result.predicted = {"ttft_s": a.prediction.ttft_s, "tpot_s": a.prediction.tpot_s,
                                "throughput_tok_s": a.prediction.throughput_tok_s,
                                "hardware": hardware.name, "backend": a.cost.backend,
                                "compiled_for": a.cost.compiled_for,
                                "decode_time": a.prediction.decode.to_dict(),
                                "prefill_time": a.prediction.prefill.to_dict()}
    return result
