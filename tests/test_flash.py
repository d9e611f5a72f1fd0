"""Prefill's fused attention kernel (`moe_jax.model.flash`): the Pallas kernel, run in interpret mode on CPU, against
the plain masked softmax; the model with it against the model without; its cost as the walk reads it from a
deviceless H200 compile."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import exact_config, h200_qwen3_prefill, prefill_logits
from flax import nnx

from moe_jax.config import get_model
from moe_jax.model import flash
from moe_jax.model.attention import attend, window_mask
from moe_jax.model.execution import Kernels
from moe_jax.model.kv_cache import KEYS, VALUES
from moe_jax.model.transformer import Transformer
from moe_jax.parallel.mesh import Strategy


def _inputs(B, S, H, K, Dh, Dv, dtype, seed=0):
    q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key, shape in
               zip(jax.random.split(jax.random.key(seed), 3), ((B, S, H, Dh), (B, S, K, Dh), (B, S, K, Dv)),
                   strict=True))
    return q, k, v


def _plain(q, k, v, window=0, sinks=None):
    rows = jnp.arange(q.shape[1])
    return attend(q, k, v, window_mask(rows[:, None], rows[None, :], window), sinks=sinks)


@pytest.mark.parametrize(("S", "H", "K", "Dh", "Dv"), [(256, 4, 2, 32, 32), (384, 2, 1, 16, 32), (32, 4, 4, 16, 16)])
@pytest.mark.parametrize("window", [0, 100, -64])
@pytest.mark.parametrize("sinks", [False, True])
def test_kernel_equals_the_plain_masked_softmax(S, H, K, Dh, Dv, window, sinks):
    """Interpret mode, f32: full, sliding (100, so blocks before the window are skipped and the edge falls inside a
    key block) and chunked (−64) attention, with and without sinks; grouped heads, value width apart from key width,
    a prompt of three query blocks and one shorter than a block."""
    q, k, v = _inputs(2, S, H, K, Dh, Dv, jnp.float32)
    sink = jax.random.normal(jax.random.key(5), (H,)) if sinks else None
    got = flash.flash_attend(q, jnp.transpose(k, KEYS), jnp.transpose(v, VALUES), window=window, sinks=sink,
                             interpret=True)
    np.testing.assert_allclose(got, _plain(q, k, v, window, sink), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("window", [0, 100, -64])
def test_kernel_reads_a_traced_window(window):
    """A layer stack scanning its windows as data passes the window traced: the kernel finds the blocks to skip
    at run time and gives what the built-in window gives."""
    q, k, v = _inputs(1, 256, 4, 2, 32, 32, jnp.float32, seed=1)
    sink = jax.random.normal(jax.random.key(6), (4,))
    run = jax.jit(lambda q, k, v, w: flash.flash_attend(q, k, v, window=w, sinks=sink, interpret=True))
    got = run(q, jnp.transpose(k, KEYS), jnp.transpose(v, VALUES), jnp.int32(window))
    np.testing.assert_allclose(got, _plain(q, k, v, window, sink), atol=2e-6, rtol=2e-6)


def test_kernel_in_bf16_is_within_rounding_of_f32():
    q, k, v = _inputs(2, 256, 4, 2, 64, 64, jnp.bfloat16, seed=2)
    got = flash.flash_attend(q, jnp.transpose(k, KEYS), jnp.transpose(v, VALUES), interpret=True)
    want = _plain(*(a.astype(jnp.float32) for a in (q, k, v)))
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2, rtol=3e-2)


def test_shapes_the_kernel_takes():
    assert flash.blocks_for(2048) == (flash.Q_BLOCK, flash.K_BLOCK) and flash.blocks_for(64) == (64, 64)
    assert flash.blocks_for(2000) is None and flash.blocks_for(24) is None and flash.blocks_for(8) is None
    assert flash.supported(2048, 128, 128) and flash.supported(32, 64, 64)
    assert not flash.supported(2048, 192, 128)                   # MLA's query heads: the blockwise form
    with pytest.raises(ValueError, match="not shapes the kernel takes"):
        flash.flash_attend(*(jnp.zeros(s) for s in ((1, 24, 2, 16), (1, 2, 24, 16), (1, 2, 16, 24))))


def test_kernel_name_round_trips():
    for window in (0, 128, -8192):
        name = flash.kernel_name(128, 64, window, True)
        assert flash.parse_kernel_name(f'metadata={{op_name="jit(f)/{name}/pallas_call"}}') == \
            {"bq": 128, "bk": 64, "window": window, "sinks": True}
    assert flash.parse_kernel_name(flash.kernel_name(64, 64, jnp.int32(3), False))["window"] is None
    assert flash.parse_kernel_name("fusion.3 = bf16[2] fusion()") is None


def test_cost_counts_the_key_blocks_each_query_block_visits():
    """Brute force over (query, key) tiles: a tile is computed when its key block starts at or before the query
    block's last row and ends after its window's first key."""
    B, S, H, K, D, bq, bk = 2, 512, 4, 2, 32, 128, 64
    for window in (0, 100, -128):
        tiles = 0
        for qs in range(0, S, bq):
            first = 0 if not window else max(0, (qs - window + 1) if window > 0 else qs - qs % -window)
            tiles += sum(1 for ks in range(0, S, bk) if ks <= qs + bq - 1 and ks + bk > first)
        cost = flash.kernel_cost(B, S, H, K, D, D, 2, bq, bk, window)
        assert cost["flops"] == 2 * B * H * tiles * bq * bk * 2 * D, window
        assert cost["transcendentals"] == B * H * tiles * bq * bk
        assert cost["bytes"] == 2 * (B * S * H * 2 * D + B * S * K * 2 * D)
    assert flash.kernel_cost(B, S, H, K, D, D, 2, bq, bk, None) == flash.kernel_cost(B, S, H, K, D, D, 2, bq, bk, 0)


@pytest.mark.parametrize("model", ["tiny", "gpt-oss-tiny", "llama4-tiny", "glm-4.5-tiny"])
def test_model_prefill_with_the_kernel_equals_the_blockwise_form(model):
    """The model built with the GPU's fused prefill attention, run on CPU in interpret mode, prefills the
    blockwise form's logits: GQA, gpt-oss (sinks, sliding windows scanned as data), Llama 4 (chunked and NoPE
    layers), GLM-4.5 (partial RoPE, dense first layers)."""
    cfg = exact_config(get_model(model))
    state = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)))
    prompt = jax.random.randint(jax.random.key(3), (2, 32), 0, cfg.vocab_size)
    blockwise = Kernels.for_platform("cpu")
    fused = dataclasses.replace(blockwise, fused_prefill_attention=True, interpret_kernels=True)
    np.testing.assert_allclose(prefill_logits(cfg, state, fused, prompt),
                               prefill_logits(cfg, state, blockwise, prompt), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("name", "mesh"), [("gpt-oss-tiny", "EP2-TP2-DP2"), ("tiny", "TP8"), ("tiny", "DP4-PP2")])
def test_fused_prefill_sharded_equals_one_device(name, mesh):
    """In `jax.shard_map` over the batch and head axes: each device's kernel sees its own rows and heads (`tp`
    above the KV heads: the cache's copies of each head; under pipeline stages, inside the stage's shard_map)."""
    from moe_jax.runtime.verify import verify_sharding

    fused = dataclasses.replace(Kernels.for_platform("cpu"), fused_prefill_attention=True, interpret_kernels=True)
    v = verify_sharding(exact_config(get_model(name)), Strategy.parse(mesh), batch=8, prompt_len=16, gen_len=4,
                        kernels=fused)
    assert v.passed, v


def test_h200_prefill_calls_the_kernel_and_the_walk_counts_it():
    """qwen3-30b-a3b's prefill on one H200, two layers: attention is the kernel (no f32 scores in HBM), the cache
    keeps its stored layout (no transposed copy of it), and the walk counts the kernel's FLOPs."""
    from moe_jax.costs.hlo import largest_results

    cfg = get_model("qwen3-30b-a3b").replace(num_layers=2)
    B, S = 8, 2048
    phase = h200_qwen3_prefill("capacity", B, S)
    kernels = [op for op in phase.ops if op.kernel]
    assert len(kernels) == 1 and kernels[0].count == 2, kernels
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    assert kernels[0].matmul_flops == flash.kernel_cost(B, S, H, K, D, D, 2, *flash.blocks_for(S), 0)["flops"]
    cache = B * (S + 128) * K * D * 2 * cfg.num_layers
    assert not [r for r in largest_results(phase.hlo_text, 20) if r[0] == cache and "transpose" in r[1] + r[2]]


def test_the_kernel_is_timed_at_its_own_efficiency():
    """A kernel op runs at `fused_attention_efficiency` of the matmul peak on an NVIDIA preset, at the large-matmul
    efficiency where a hardware gives none; the same FLOPs in an XLA op run at the large-matmul efficiency."""
    from moe_jax.costs.types import OpCost
    from moe_jax.hardware.presets import get_hardware
    from moe_jax.perf.timemodel import op_seconds

    hw = get_hardware("h200")
    flops = 10 ** 12
    kernel = OpCost("pallas_call.0", "custom-call", "attention", flops, flops, 0, 10 ** 6, 1, False, "bfloat16",
                    flash.NAME)
    gemm = dataclasses.replace(kernel, name="gemm_fusion_dot.1", opcode="fusion", kernel="")
    assert hw.fused_attention_efficiency == 0.4
    assert op_seconds(kernel, hw) == (pytest.approx(flops / (hw.peak_flops * 0.4)), "compute")
    assert op_seconds(gemm, hw)[0] == pytest.approx(flops / (hw.peak_flops * hw.flops_efficiency))
    plain = dataclasses.replace(hw, fused_attention_efficiency=0.0)
    assert op_seconds(kernel, plain)[0] == pytest.approx(flops / (hw.peak_flops * hw.flops_efficiency))


def test_the_kernel_bench_runs_on_cpu():
    """bench/flash_kernel.py --dry-run: the GPU lease's kernel check, in interpret mode, prints its tables (the
    attention kernel's and the grouped matmul's), each case within bf16 rounding of the plain form."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import clean_env

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "bench/flash_kernel.py", "--dry-run", "--no-append"], cwd=root,
                          capture_output=True, text=True, timeout=600, env=clean_env(JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith(("| qwen3", "| gpt-oss", "| mix"))]
    attention = [r for r in rows if "/" in r[3]]                   # H / K x Dh
    grouped = [r for r in rows if r[3].count("x") == 2]            # E x N x K
    assert len(attention) >= 4 and all(float(r[6]) < 2e-2 for r in attention), done.stdout
    assert len(grouped) == 4 and all(float(r[4]) < 5e-2 for r in grouped), done.stdout
