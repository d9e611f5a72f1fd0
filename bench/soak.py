"""Soak: many random sharded-vs-unsharded runs and many fuzzed inputs to every parser, outside the unit suite.

Part 1 (sharded): random small models (layers, widths, heads, KV heads, experts, top-k, norms,
shared experts, routing normalisation, group sizes) under the dispatch modes (capacity, dropless,
dense) and random valid meshes over the 8 fake CPU devices, each run by `verify_sharding`
(prefill, decode steps and a full forward, sharded against one device, in f32 with capacity
E/k so nothing is dropped). An example fails when the logits differ beyond the tolerance or when
anything raises.

Part 2 (fuzz): mutated and random inputs to every parser of user files: strategy names, strategy
TOML, hardware TOML, Hugging Face config.json, safetensors checkpoints (header and data), prompt
JSON and planner cache entries. An input fails when its parser raises anything but a
`MoeJaxError` with a message, or changes the file it read.

    python bench/soak.py --examples 500 --fuzz 10000            # the full soak (about 11 s per example
                                                               # per core on a small CPU: plan the hours)
    python bench/soak.py --examples 500 --workers 8             # examples split over 8 processes

Prints a table and appends it to bench/RESULTS.md (with the command and the machine); exit
status 1 when anything failed. `tests/test_soak.py` runs a small fixed-seed slice of both parts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEVICES = 8
DISPATCHES = ("capacity", "dropless", "dense")


# --- part 1: sharded against one device ---------------------------------------------------


FAMILIES = ("tiny", "deepseek-v3-tiny", "glm-4.5-tiny", "gpt-oss-tiny", "llama4-tiny", "llama4-maverick-tiny")
"""The presets the sharded part draws from: the base architecture and each family's (MLA, group routing,
sinks and sliding windows, chunked and NoPE layers, interleaved dense layers), every feature varied."""


def _base_variant(rng: random.Random):
    """The base architecture (Qwen3/Mixtral/OLMoE/DBRX features) at random test sizes."""
    from moe_jax.config import get_model

    H = rng.choice([4, 8])
    return get_model("tiny").replace(
        num_layers=rng.choice([1, 2, 4]), d_model=rng.choice([32, 64]), num_heads=H,
        num_kv_heads=rng.choice([k for k in (1, 2, 4, 8) if H % k == 0]), head_dim=rng.choice([8, 16]),
        expert_ffn=rng.choice([16, 32]), num_experts=rng.choice([2, 4, 8]), vocab_size=rng.choice([64, 128]),
        qk_norm=rng.choice(["none", "head", "full"]), norm=rng.choice(["rms", "layer"]),
        moe_group_size=rng.choice([4, 16]), router_norm_topk=rng.random() < 0.5,
        num_shared_experts=rng.choice([0, 0, 1]), dispatch=rng.choice(DISPATCHES))


def _family_variant(rng: random.Random, name: str):
    """The family preset `name` with its features drawn at random (a draw may be an invalid config)."""
    from moe_jax.config import get_model

    cfg = get_model(name)
    L = rng.choice([2, 3, 4]) if cfg.moe_interleave == 1 else 2 * rng.choice([1, 2])
    E = rng.choice([4, 8])
    common = dict(num_layers=L, num_experts=E, moe_group_size=rng.choice([4, 16]),
                  num_shared_experts=rng.choice([0, 1]), dispatch=rng.choice(DISPATCHES))
    dense = rng.choice([0, 1])
    groups = rng.choice([g for g in (1, 2, 4) if E // g >= 2])     # group routing scores a group by its best two
    if cfg.attention == "mla":                   # DeepSeek-V3 / Kimi K2
        return cfg.replace(**common, first_dense_layers=dense, dense_ffn=96 * dense, router_groups=groups,
                           router_topk_groups=rng.randint(1, groups), kv_lora_rank=rng.choice([8, 16]),
                           q_lora_rank=rng.choice([0, 32]), qk_rope_head_dim=rng.choice([4, 8]),
                           routed_scaling=rng.choice([1.0, 2.5]), router_norm_topk=rng.random() < 0.5)
    if cfg.family == "glm4_moe":
        return cfg.replace(**common, first_dense_layers=dense, dense_ffn=96 * dense, router_groups=groups,
                           router_topk_groups=rng.randint(1, groups), qk_norm=rng.choice(["head", "none"]),
                           rotary_dim=rng.choice([0, 8]), num_kv_heads=rng.choice([1, 2, 4, 8]),
                           attention_bias=rng.random() < 0.5)
    kv = rng.choice([1, 2, 4, 8])
    if cfg.family == "gpt_oss":
        types = tuple(rng.choice(["sliding_attention", "full_attention"]) for _ in range(L))
        return cfg.replace(**{**common, "num_shared_experts": 0}, layer_types=types, num_kv_heads=kv,
                           sliding_window=rng.choice([2, 4, 8]), attention_sinks=rng.random() < 0.8,
                           attention_out_bias=rng.random() < 0.5)
    types = tuple(rng.choice(["chunked_attention", "full_attention"]) for _ in range(L))   # Llama 4
    return cfg.replace(**{**common, "num_shared_experts": rng.choice([0, 1, 1])}, layer_types=types,
                       num_kv_heads=kv, attention_chunk=rng.choice([2, 4, 8]), qk_norm=rng.choice(["l2", "none"]),
                       full_layers_nope=rng.random() < 0.7, attn_temperature_tuning=rng.random() < 0.5)


def random_example(rng: random.Random):
    """(cfg, strategy, batch, prompt_len, gen_len) drawn from `rng`: a small model and a valid mesh.

    None when the draw is not a valid configuration or no mesh over the devices divides it (the caller
    draws again)."""
    from moe_jax.errors import ConfigError
    from moe_jax.parallel.mesh import Strategy, divisors, validate
    from moe_jax.runtime.verify import exact_config

    family = rng.choice(FAMILIES)
    try:
        cfg = _base_variant(rng) if family == "tiny" else _family_variant(rng, family)
        cfg = exact_config(cfg.replace(top_k=rng.randint(1, min(2 if family == "tiny" else 4, cfg.num_experts))))
    except ConfigError:
        return None
    n = DEVICES                                   # verify_sharding runs on every device jax sees
    batch = rng.choice([2, 4, 8])
    meshes = []
    for ep in divisors(n):
        for tp in divisors(n // ep):
            for pp in divisors(n // ep // tp):
                s = Strategy(ep=ep, tp=tp, pp=pp, dp=n // ep // tp // pp)
                try:
                    validate(s, cfg, batch=batch)
                except Exception:  # noqa: BLE001  (only valid meshes are drawn)
                    continue
                meshes.append(s)
    if not meshes:
        return None
    # prompts past the family's windows and chunks (at most 8 at these sizes), so decode crosses them too
    prompt_len = rng.randint(2, 6) if family == "tiny" else rng.randint(2, 12)
    return cfg, rng.choice(meshes), batch, prompt_len, rng.randint(1, 3)


def describe(cfg) -> str:
    """`cfg` as its preset's name and the fields that differ from it: enough to rebuild a failing example."""
    import dataclasses

    from moe_jax.config import get_model

    base = get_model(cfg.name)
    changed = [f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
               if getattr(cfg, f.name) != getattr(base, f.name)]
    return f"{cfg.name}({', '.join(changed)})"


def sharded(examples: int, seed: int, progress=None) -> dict:
    """Run `examples` random sharded-vs-unsharded checks; counts, failures and seconds."""
    import jax

    from moe_jax.runtime.verify import verify_sharding

    rng = random.Random(seed)
    done, failures, start = 0, [], time.perf_counter()
    while done < examples:
        drawn = random_example(rng)
        if drawn is None:
            continue
        cfg, strategy, batch, prompt_len, gen_len = drawn
        weights_seed = rng.randrange(1 << 16)
        what = f"{describe(cfg)} {strategy.name} b{batch} s{prompt_len} g{gen_len} seed {weights_seed}"
        try:
            v = verify_sharding(cfg, strategy, batch=batch, prompt_len=prompt_len, gen_len=gen_len,
                                seed=weights_seed)
            if not v.passed:
                failures.append(f"{what}: max |diff| {max(v.forward_max_abs, v.prefill_max_abs, v.decode_max_abs):.3g}"
                                f" over tolerance {v.tolerance:g}")
        except Exception as e:  # noqa: BLE001  (any exception is a finding)
            failures.append(f"{what}: {type(e).__name__}: {str(e)[:200]}")
        done += 1
        jax.clear_caches()                       # bound memory over hundreds of compiles
        if progress:
            progress(done, examples, len(failures))
    return {"examples": done, "failures": failures, "seconds": time.perf_counter() - start}


# --- part 2: fuzzed inputs ----------------------------------------------------------------

VALID = {
    "strategy-toml": b'[strategy]\ndescription = "x"\nep = 2\ntp = 2\npp = 1\ndp = 2\n',
    "hardware-toml": (b'name = "my-gpu"\nmemory_bytes = 40e9\npeak_flops = 100e12\nhbm_bandwidth = 1e12\n'
                      b'devices_per_node = 4\n[node_link]\nbandwidth = 100e9\nlatency_s = 1e-6\n'
                      b'[network_link]\nbandwidth = 10e9\nlatency_s = 5e-6\n'),
    "hf-config": json.dumps({"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                             "vocab_size": 128, "num_experts": 4, "num_experts_per_tok": 2,
                             "moe_intermediate_size": 32, "intermediate_size": 32, "rope_theta": 1e4}).encode(),
    "prompt-json": json.dumps({"prompt": [[1, 2, 3], [4, 5, 6]]}).encode(),
    "cache-entry": b"",                           # filled in by _valid_cache_entry
    "safetensors": b"",                           # filled in by _valid_checkpoint
}
INSERTS = [b"-", b"0", b'"', b"[", b"]", b"{", b"}", b"=", b"1e999", b"\xff", b"null", b"\n", b"nan", b"inf",
           b"[[[[[[[[", b"99999999999999999999", b"\x00"]


ODD_VALUES = [None, 0, -1, 1, 2, 3, 0.5, -0.0, 1e308, -1e308, 2**63, 10**40, "", "x", "sliding_attention", True,
              False, [], [0], [None], {}, {"rope_type": "yarn"}, {"rope_type": "llama3", "factor": 0},
              [[[[[[0]]]]]]]


def mutate_fields(data: dict, rng: random.Random) -> bytes:
    """`data` as JSON with one to three fields deleted, set to an odd value or added: valid JSON whose
    meaning is wrong, which byte mutations rarely reach."""
    out = dict(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["delete", "set", "set", "add"])
        if op == "delete" and out:
            out.pop(rng.choice(sorted(out)))
        elif op == "set" and out:
            key = rng.choice(sorted(out))
            value = out[key]
            if isinstance(value, dict) and value and rng.random() < 0.5:   # one level down (rope_parameters)
                inner = dict(value)
                inner[rng.choice(sorted(inner))] = rng.choice(ODD_VALUES)
                out[key] = inner
            elif isinstance(value, list) and value and rng.random() < 0.5:  # one entry (layer_types, moe_layers)
                out[key] = [rng.choice(ODD_VALUES) if i == 0 else v for i, v in enumerate(value)]
            else:
                out[key] = rng.choice(ODD_VALUES)
        else:
            out[rng.choice(["q_lora_rank", "sliding_window", "n_group", "layer_types", "rope_scaling",
                            "interleave_moe_layer_step", "first_k_dense_replace", "partial_rotary_factor",
                            "attention_chunk_size", "rope_parameters"])] = rng.choice(ODD_VALUES)
    return json.dumps(out).encode()


def hf_configs() -> list[dict]:
    """Valid config.json contents of every family moe-jax imports, at test size (the fuzz's seeds)."""
    from moe_jax.config import get_model
    from moe_jax.config.hf import to_hf_dict

    configs = [json.loads(VALID["hf-config"])]
    for name in ("deepseek-v3-tiny", "glm-4.5-tiny", "gpt-oss-tiny", "llama4-tiny", "llama4-maverick-tiny"):
        configs.append(to_hf_dict(get_model(name)))
    for cfg in configs[1:]:
        cfg.setdefault("torch_dtype", cfg.get("dtype", "bfloat16"))
    return configs


def mutate(data: bytes, rng: random.Random) -> bytes:
    """A few random flips, deletions, insertions or a truncation of `data`, or random bytes."""
    if not data or rng.random() < 0.1:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        if not out:
            break
        i = rng.randrange(len(out))
        op = rng.choice(["flip", "delete", "insert", "truncate"])
        if op == "flip":
            out[i] = rng.randrange(256)
        elif op == "delete":
            del out[i]
        elif op == "insert":
            out[i:i] = rng.choice(INSERTS)
        else:
            del out[i:]
    return bytes(out)


def _valid_cache_entry(directory: Path) -> tuple[bytes, str]:
    from moe_jax.planner.cache import cache_store

    key = "0" * 64
    cache_store(directory, key, {"analysis": {"fits": True}, "markdown": "# x\n"})
    return (directory / f"{key}.json").read_bytes(), key


def _valid_checkpoint(directory: Path) -> bytes:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float32)},
              str(directory / "model.safetensors"))
    return (directory / "model.safetensors").read_bytes()


def _read_checkpoint(directory: Path) -> None:
    from moe_jax.checkpoints.weights import Checkpoint

    ckpt = Checkpoint(directory)
    for name in ckpt.location:
        ckpt.shape(name)
        ckpt.dtype(name)
        ckpt.read(name, tuple(slice(None) for _ in ckpt.shape(name)))


def fuzz(inputs: int, seed: int, progress=None) -> dict:
    """`inputs` fuzzed inputs spread over the parsers; per-parser counts, failures and seconds."""
    from moe_jax.config.hf import from_hf
    from moe_jax.errors import MoeJaxError
    from moe_jax.hardware.presets import get_hardware
    from moe_jax.parallel.mesh import Strategy
    from moe_jax.planner.cache import cache_load
    from moe_jax.runtime.run import read_prompt_file

    rng = random.Random(seed)
    counts, failures, start = {}, [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "cache").mkdir()
        VALID["cache-entry"], key = _valid_cache_entry(tmp / "cache")
        (tmp / "ckpt").mkdir()
        VALID["safetensors"] = _valid_checkpoint(tmp / "ckpt")
        paths = {"strategy-toml": tmp / "s.toml", "hardware-toml": tmp / "hw.toml", "hf-config": tmp / "config.json",
                 "prompt-json": tmp / "prompt.json", "cache-entry": tmp / "cache" / f"{key}.json",
                 "safetensors": tmp / "ckpt" / "model.safetensors"}
        parse = {"strategy-toml": lambda p: Strategy.load(str(p)), "hardware-toml": lambda p: get_hardware(str(p)),
                 "hf-config": lambda p: from_hf(p), "prompt-json": lambda p: read_prompt_file(p),
                 "cache-entry": lambda p: cache_load(p.parent, key),
                 "safetensors": lambda p: _read_checkpoint(p.parent),
                 "strategy-name": lambda text: Strategy.parse(text)}
        kinds = sorted(parse)
        families = hf_configs()
        for i in range(inputs):
            kind = kinds[i % len(kinds)]
            counts[kind] = counts.get(kind, 0) + 1
            if kind == "strategy-name":
                alphabet = "epdtEPDT0123456789-_ ,x"
                content = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
                target = content
            elif kind == "hf-config":             # every family; half byte-level, half field-level
                base = rng.choice(families)
                content = mutate(json.dumps(base).encode(), rng) if rng.random() < 0.5 else mutate_fields(base, rng)
                target = paths[kind]
                target.write_bytes(content)
            else:
                content = mutate(VALID[kind], rng)
                target = paths[kind]
                target.write_bytes(content)
            try:
                parse[kind](target)
            except MoeJaxError as e:
                if not str(e):
                    failures.append(f"{kind}: an empty error message for {content[:80]!r}")
            except Exception as e:  # noqa: BLE001  (anything else is a finding)
                tb = traceback.extract_tb(e.__traceback__)[-1]
                failures.append(f"{kind}: {type(e).__name__}: {str(e)[:160]} at {Path(tb.filename).name}:{tb.lineno} "
                                f"for {content[:80]!r}")
            if kind != "strategy-name" and kind != "cache-entry" and target.read_bytes() != content:
                failures.append(f"{kind}: the parser changed the file it read")
            if progress and (i + 1) % 100 == 0:
                progress(i + 1, inputs, len(failures))
    return {"inputs": inputs, "by_parser": counts, "failures": failures, "seconds": time.perf_counter() - start}


# --- driver -------------------------------------------------------------------------------


def _shards(examples: int, workers: int, seed: int) -> dict:
    """Part 1 over `workers` processes (each its own fake devices), merged."""
    per = [examples // workers + (i < examples % workers) for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, __file__, "--examples", str(n), "--fuzz", "0", "--seed",
                               str(seed + 1000 * i), "--json-only"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
             for i, n in enumerate(per) if n]
    merged = {"examples": 0, "failures": [], "seconds": 0.0}
    for p in procs:
        out, _ = p.communicate()
        part = json.loads(out.strip().splitlines()[-1])["sharded"]
        merged["examples"] += part["examples"]
        merged["failures"] += part["failures"]
        merged["seconds"] = max(merged["seconds"], part["seconds"])
    return merged


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=500, help="sharded-vs-unsharded examples")
    ap.add_argument("--fuzz", type=int, default=10_000, help="fuzzed parser inputs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes for the sharded part")
    ap.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from moe_jax import request_cpu_devices

    request_cpu_devices(DEVICES)

    def show(label):
        def report(done, total, failed):
            if not args.json_only:
                print(f"\r{label}: {done}/{total}, {failed} failed", end="", file=sys.stderr, flush=True)
        return report

    if args.workers > 1 and args.examples:
        part1 = _shards(args.examples, args.workers, args.seed)
    else:
        part1 = sharded(args.examples, args.seed, show("sharded")) if args.examples else None
    if not args.json_only:
        print(file=sys.stderr)
    part2 = fuzz(args.fuzz, args.seed, show("fuzz")) if args.fuzz else None
    if args.json_only:
        print(json.dumps({"sharded": part1, "fuzz": part2}))
        return 0
    print(file=sys.stderr)
    rows = ["| part | checked | failures | seconds |", "|---|---:|---:|---:|"]
    if part1:
        rows.append(f"| sharded vs one device (random models, meshes over 8 devices, {', '.join(DISPATCHES)}) | "
                    f"{part1['examples']} | {len(part1['failures'])} | {part1['seconds']:.0f} |")
    if part2:
        by = ", ".join(f"{k} {v}" for k, v in sorted(part2["by_parser"].items()))
        rows.append(f"| fuzzed parser inputs ({by}) | {part2['inputs']} | {len(part2['failures'])} | "
                    f"{part2['seconds']:.0f} |")
    table = "\n".join(rows)
    print(table)
    failures = (part1 or {}).get("failures", []) + (part2 or {}).get("failures", [])
    for f in failures[:20]:
        print("FAIL", f)
    if not args.no_append:
        from results import append

        notes = [f"seed {args.seed}; {args.workers} worker(s); {DEVICES} fake CPU devices per worker"]
        notes += [f"failure: {f}" for f in failures[:10]]
        append("Soak: sharded against one device, fuzzed parsers", table, tuple(notes))
    return 1 if failures else 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
