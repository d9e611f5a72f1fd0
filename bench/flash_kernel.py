"""moe-jax's Pallas kernels on the devices jax sees, right and how fast: prefill's fused attention
(`moe_jax/model/flash.py`) and dropless experts' grouped matmul (`moe_jax/model/moe/grouped_kernel.py`).

For each case (the attention shapes of qwen3-30b-a3b, gpt-oss-120b and mixtral-8x7b prefill at prompt 2048) the
kernel's output is compared with the plain masked softmax (`moe_jax.model.attention.attend`) on a few batch
rows, then the kernel is timed at the full batch: the median of `--reps` calls, each ended with
`block_until_ready`. Its FLOPs are the ones the cost walk counts (`flash.kernel_cost`), so
achieved TFLOP/s / the hardware's bf16 peak is the `fused_attention_efficiency` the NVIDIA presets take (0.4, a
published kernel's figure) until this measures it. The grouped matmul runs the expert shapes of qwen3-30b-a3b,
gpt-oss-120b and mixtral-8x7b over batch x prompt tokens routed uniformly at random, against the plain per-expert
product (error on a 1024-token problem) and timed the same way: its TFLOP/s / peak is the presets'
`grouped_matmul_efficiency` (0.4, assumed). Appends the tables to bench/RESULTS.md.

    python bench/flash_kernel.py                 # on a GPU (the lease: bench/gpu_lease.sh)
    python bench/flash_kernel.py --dry-run       # CPU: small shapes in Pallas' interpret mode, correctness only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = (("qwen3-30b-a3b", 32, 4, 128, 0, False), ("gpt-oss-120b full", 64, 8, 64, 0, True),
         ("gpt-oss-120b sliding", 64, 8, 64, 128, True), ("mixtral-8x7b", 32, 8, 128, 0, False))
"""(name, query heads H, KV heads K, head_dim, window, sinks)."""


def _plain(q, k, v, window, sinks):
    import jax.numpy as jnp

    from moe_jax.model.attention import attend, window_mask

    rows = jnp.arange(q.shape[1])
    return attend(q, k, v, window_mask(rows[:, None], rows[None, :], window), sinks=sinks)


def measure(name, H, K, D, window, sinks, batch, S, reps, interpret):
    """One case: the largest error against the plain form (2 rows, f32 reference) and the median seconds."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moe_jax.model import flash
    from moe_jax.model.kv_cache import KEYS, VALUES

    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, S, H, D), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, S, K, D), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, S, K, D), jnp.bfloat16)
    sink = jax.random.normal(keys[3], (H,)) if sinks else None
    kc, vc = jnp.transpose(k, KEYS), jnp.transpose(v, VALUES)
    call = jax.jit(lambda q, k, v: flash.flash_attend(q, k, v, window=window, sinks=sink, interpret=interpret))
    got = np.asarray(call(q, kc, vc)[:2], np.float32)
    want = np.asarray(_plain(*(a[:2].astype(jnp.float32) for a in (q, k, v)), window, sink))
    error = float(np.max(np.abs(got - want)))
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(call(q, kc, vc))
        seconds.append(time.perf_counter() - start)
    cost = flash.kernel_cost(batch, S, H, K, D, D, 2, *flash.blocks_for(S), window)
    return error, statistics.median(seconds), cost["flops"]


GROUPED = (("qwen3-30b-a3b gate/up", 128, 8, 1536, 2048), ("qwen3-30b-a3b down", 128, 8, 2048, 768),
           ("gpt-oss-120b gate/up", 128, 4, 5760, 2880), ("mixtral-8x7b gate/up", 8, 2, 28672, 4096))
"""(name, experts E, top-k, output width N, contracted width K): weights [E, N, K] as the experts store them."""


def measure_grouped(E, top_k, N, K, tokens, reps, interpret):
    """One grouped case: the largest error against the plain per-expert product (f32, 1024 tokens), the median
    seconds over `tokens` tokens, and the FLOPs the walk counts for that call."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moe_jax.model.moe import grouped_kernel as gk
    from moe_jax.model.moe.dropless import grouped_matmul

    def problem(T, key):
        k1, k2, k3 = jax.random.split(key, 3)
        experts = jax.random.randint(k1, (T * top_k,), 0, E)
        sizes = jnp.bincount(experts, length=E).astype(jnp.int32)
        x = jax.random.normal(k2, (T * top_k, K), jnp.bfloat16)
        w = (jax.random.normal(k3, (E, N, K), jnp.float32) * K ** -0.5).astype(jnp.bfloat16)
        return x, w, sizes

    def call(x, w, sizes):
        bm = gk.row_block(x.shape[0], E)
        dest, src, tiles = gk.tile_layout(sizes, x.shape[0], bm)
        return gk.unpad_rows(gk.tiled_matmul(gk.pad_rows(x, src), w, tiles, bm=bm, interpret=interpret), dest)

    small = problem(min(tokens, 1024), jax.random.key(1))
    got = np.asarray(jax.jit(call)(*small), np.float32)
    x, w, sizes = (a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in small)
    want = np.asarray(grouped_matmul(x, w, sizes, native=False, k_minor=True))
    error = float(np.max(np.abs(got - want)))
    x, w, sizes = problem(tokens, jax.random.key(2))
    tiled = jax.jit(lambda x, w, sizes: gk.tiled_matmul(x, w, sizes, bm=gk.row_block(x.shape[0], E),
                                                        interpret=interpret))
    bm = gk.row_block(x.shape[0], E)
    dest, src, tiles = jax.jit(gk.tile_layout, static_argnums=(1, 2))(sizes, x.shape[0], bm)
    xp = gk.pad_rows(x, src)
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(tiled(xp, w, tiles))
        seconds.append(time.perf_counter() - start)
    return error, statistics.median(seconds), gk.kernel_cost(xp.shape[0], N, K, E, 2)["flops"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--dry-run", action="store_true", help="CPU, interpret mode, small shapes: correctness only")
    parser.add_argument("--no-append", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    import jax

    from moe_jax.hardware.presets import get_hardware
    from moe_jax.runtime.calibrate import preset_for_device

    device = jax.devices()[0]
    interpret = args.dry_run or device.platform != "gpu"
    batch, S, reps = (1, 256, 1) if interpret else (args.batch, args.prompt_len, args.reps)
    preset = preset_for_device(getattr(device, "device_kind", "")) if not interpret else None
    peak = get_hardware(preset).peak_flops if preset else None
    rows = ["| case | B x S | H / K x Dh | window | sinks | max error vs plain | median ms | TFLOP/s | of bf16 peak |",
            "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for name, H, K, D, window, sinks in CASES:
        if interpret:
            H, K, D = H // 8, max(K // 8, 1), 32
        error, seconds, flops = measure(name, H, K, D, window, sinks, batch, S, reps, interpret)
        rate = flops / seconds / 1e12
        share = f"{rate * 1e12 / peak:.2f}" if peak else "-"
        rows.append(f"| {name} | {batch} x {S} | {H} / {K} x {D} | {window} | {'yes' if sinks else 'no'} | "
                    f"{error:.2e} | {seconds * 1e3:.3f} | {rate:.1f} | {share} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    grouped = ["| case | tokens x top-k | E x N x K | max error vs plain | median ms | TFLOP/s | of bf16 peak |",
               "|---|---|---|---:|---:|---:|---:|"]
    for name, E, top_k, N, K in GROUPED:
        tokens = 64 if interpret else batch * S
        if interpret:
            E, N, K = min(E, 8), min(N, 64), min(K, 64)
        error, seconds, flops = measure_grouped(E, top_k, N, K, tokens, reps, interpret)
        rate = flops / seconds / 1e12
        share = f"{rate * 1e12 / peak:.2f}" if peak else "-"
        grouped.append(f"| {name} | {tokens} x {top_k} | {E} x {N} x {K} | {error:.2e} | {seconds * 1e3:.3f} | "
                       f"{rate:.1f} | {share} |")
        print(grouped[-1], flush=True)
    if not args.no_append:
        from results import append

        where = f"{getattr(device, 'device_kind', device.platform)}" + (" (interpret mode)" if interpret else "")
        append("Fused prefill attention kernel", table,
               (f"{where}; bf16 q, k, v; error against the f32 plain masked softmax on 2 batch rows",
                "TFLOP/s: flash.kernel_cost's FLOPs (the walk's) / median time; the NVIDIA presets take 0.4 of peak"))
        append("Dropless grouped matmul kernel", "\n".join(grouped),
               (f"{where}; bf16 rows and weights, uniform random routing; error against the f32 per-expert "
                "product on 1024 tokens",
                "TFLOP/s: grouped_kernel.kernel_cost's FLOPs over the padded rows (the walk's) / median time of the "
                "kernel alone; the NVIDIA presets take 0.4 of peak"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
