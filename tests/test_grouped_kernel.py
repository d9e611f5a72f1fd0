"""Dropless experts' grouped matmul kernel (`moe_jax.model.moe.grouped_kernel`): the tile layout, the kernel against
the plain per-expert product in Pallas' interpret mode, the model with it against the model without, and a
deviceless H200 compile."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import exact_config, h200_qwen3_prefill, prefill_logits
from flax import nnx

from moe_jax.config import get_model
from moe_jax.model.execution import Execution, Kernels
from moe_jax.model.moe import grouped_kernel as gk
from moe_jax.model.transformer import Transformer, init_cache
from moe_jax.parallel.mesh import Strategy

FUSED = dataclasses.replace(Kernels.for_platform("cpu"), fused_grouped_matmul=True, interpret_kernels=True)


def _plain(x, w, sizes):
    """Rows of expert e (sorted, sizes rows each) times w[e]ᵀ; rows past the sizes' sum zero."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out = np.zeros((x.shape[0], w.shape[1]))
    ends = np.cumsum(sizes)
    for e, (start, end) in enumerate(zip(ends - sizes, ends, strict=True)):
        out[start:end] = x[start:end] @ w[e].T
    return out


@pytest.mark.parametrize("sizes", [[10, 0, 20, 5], [0, 0, 37, 0], [1, 1, 1, 1], [0, 0, 0, 0], [64, 0, 0, 3]])
def test_tile_layout_starts_each_expert_on_a_tile(sizes):
    """Each expert's rows start on a tile boundary, keep their order, and fill their own tiles; padding rows
    and rows of no expert map nowhere; the static bound holds every layout."""
    rows, bm = 70, 16
    sizes_e = jnp.array(sizes, jnp.int32)
    dest, src, tiles = (np.asarray(a) for a in gk.tile_layout(sizes_e, rows, bm))
    P = gk.padded_rows(rows, len(sizes), bm)
    assert src.shape == (P,) and tiles.shape == (P // bm,)
    ends = np.cumsum(sizes)
    for e, (start, end) in enumerate(zip(ends - sizes, ends, strict=True)):
        if end > start:
            assert dest[start] % bm == 0
            assert (np.diff(dest[start:end]) == 1).all()
            assert (tiles[dest[start:end] // bm] == e).all()
    assert (dest[ends[-1]:] == P).all()
    real = dest[dest < P]
    assert (src[real] == np.arange(ends[-1])).all()
    assert (src[np.setdiff1d(np.arange(P), real)] == rows).all()
    assert (np.diff(tiles) >= 0).all() and set(tiles) <= set(range(len(sizes) + 1))


@pytest.mark.parametrize(("M", "E", "N", "K", "sizes"), [
    (37, 4, 48, 80, [10, 0, 20, 5]),       # K, N not powers of two; an empty expert; rows of no expert
    (300, 8, 128, 64, [40, 30, 20, 60, 50, 0, 70, 30]),
    (16, 2, 16, 16, [16, 0]),
])
def test_kernel_equals_the_plain_per_expert_product(M, E, N, K, sizes):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((E, N, K)), jnp.float32)
    sizes_e = jnp.array(sizes, jnp.int32)
    bm = gk.row_block(M, E)
    dest, src, tiles = gk.tile_layout(sizes_e, M, bm)
    y = gk.unpad_rows(gk.tiled_matmul(gk.pad_rows(x, src), w, tiles, bm=bm, interpret=True), dest)
    np.testing.assert_allclose(np.asarray(y), _plain(x, w, sizes), atol=1e-4, rtol=1e-4)


def test_kernel_converts_fp8_and_bf16_weights_as_it_reads_them():
    """Weights stored in FP8 (or bf16) are multiplied as the rows' dtype: the plain product of the converted
    weights, within bf16 rounding."""
    rng = np.random.default_rng(1)
    M, E, N, K, sizes = 64, 4, 32, 64, [16, 16, 0, 30]
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    bm = gk.row_block(M, E)
    dest, src, tiles = gk.tile_layout(jnp.array(sizes, jnp.int32), M, bm)
    for dtype in (jnp.float8_e4m3fn, jnp.bfloat16):
        w = jnp.asarray(rng.standard_normal((E, N, K)), dtype)
        y = gk.unpad_rows(gk.tiled_matmul(gk.pad_rows(x, src), w, tiles, bm=bm, interpret=True), dest)
        assert y.dtype == jnp.bfloat16
        ref = _plain(np.asarray(x, np.float32), np.asarray(w.astype(jnp.float32)), sizes)
        np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=0.1, rtol=0.02)


def test_kernel_reads_one_layer_of_stacked_weights():
    """Given stacked weights [L, E, N, K] and a layer, the kernel multiplies by that layer's experts, read in place:
    what it gives for the layer's slice."""
    rng = np.random.default_rng(2)
    M, L, E, N, K, sizes = 40, 3, 4, 32, 48, [12, 0, 20, 5]
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((L, E, N, K)), jnp.float32)
    bm = gk.row_block(M, E)
    dest, src, tiles = gk.tile_layout(jnp.array(sizes, jnp.int32), M, bm)
    xp = gk.pad_rows(x, src)
    for layer in range(L):
        got = gk.tiled_matmul(xp, w, tiles, bm=bm, interpret=True, layer=layer)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(gk.tiled_matmul(xp, w[layer], tiles, bm=bm,
                                                                                   interpret=True)))
        np.testing.assert_allclose(np.asarray(gk.unpad_rows(got, dest)), _plain(x, w[layer], sizes), atol=1e-4,
                                   rtol=1e-4)
    for bad in (dict(layer=L), dict(layer=-1), dict()):          # out of range, or stacked weights without a layer
        with pytest.raises(ValueError, match="not shapes the kernel takes"):
            gk.tiled_matmul(xp, w, tiles, bm=bm, interpret=True, **bad)
    with pytest.raises(ValueError, match="not shapes the kernel takes"):   # a layer of weights that are not stacked
        gk.tiled_matmul(xp, w[0], tiles, bm=bm, interpret=True, layer=0)


def _pallas_weight_ranks(jaxpr) -> list[int]:
    """The rank of the weights operand of every pallas_call in a jaxpr, those in nested jaxprs (jit, shard_map,
    scan) included."""
    ranks = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            ranks.append(eqn.invars[2].aval.ndim)
        for v in eqn.params.values():
            for j in (v if isinstance(v, (tuple, list)) else (v,)):
                inner = getattr(j, "jaxpr", j)
                if hasattr(inner, "eqns"):
                    ranks += _pallas_weight_ranks(inner)
    return ranks


@pytest.mark.parametrize("model", ["tiny", "gpt-oss-tiny"])
def test_unrolled_dropless_decode_reads_the_stacked_experts(model):
    """Layers unrolled (a GPU's decode step), the kernel takes each layer's experts as the stacked parameters and
    the layer's index (`moe_jax.model.provenance.layer_source`): every call's weights are rank 4, and greedy
    decoding gives the logits of the CPU's forms."""
    from test_decode_copies import _greedy

    cfg = exact_config(get_model(model)).replace(dispatch="dropless")
    unrolled = dataclasses.replace(FUSED, unrolled_layers=True)
    state = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)))
    prompt = jax.random.randint(jax.random.key(4), (4, 12), 0, cfg.vocab_size)
    graphdef = nnx.graphdef(Transformer(cfg, rngs=nnx.Rngs(0), execution=Execution(unrolled)))
    prefill = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).prefill(t, c))
    cache = prefill(state, prompt, init_cache(cfg, 4, 16)).cache
    jaxpr = jax.make_jaxpr(lambda s, t, c: nnx.merge(graphdef, s).decode(t, jnp.int32(12), c))(
        state, prompt[:, :1], cache)
    ranks = _pallas_weight_ranks(jaxpr.jaxpr)
    assert ranks and set(ranks) == {4}, ranks
    want = _greedy(cfg, state, Execution(Kernels.for_platform("cpu")), prompt, steps=3)
    np.testing.assert_allclose(_greedy(cfg, state, Execution(unrolled), prompt, steps=3), want, atol=1e-4,
                               rtol=1e-4)


def test_shapes_the_kernel_takes():
    assert gk.supported(1536, 2048) and gk.supported(2048, 768) and gk.supported(5760, 2880)
    assert not gk.supported(40, 64) and not gk.supported(64, 24)
    with pytest.raises(ValueError, match="not shapes the kernel takes"):
        gk.tiled_matmul(jnp.zeros((32, 24)), jnp.zeros((2, 16, 24)), jnp.zeros((2,), jnp.int32), bm=16)
    assert [gk.row_block(rows, 128) for rows in (16384, 131072, 1048576, 100)] == [16, 128, 128, 16]
    assert gk.padded_rows(131072, 128, 128) == 131072 + 128 * 127 and gk.padded_rows(37, 4, 16) == 112


def test_kernel_name_round_trips():
    assert gk.parse_kernel_name("jit(f)/" + gk.kernel_name(128, 64, 32) + "/x") == {"bm": 128, "bn": 64, "bk": 32}
    assert gk.parse_kernel_name("jit(f)/moe_jax_flash_prefill_bq128") is None


@pytest.mark.parametrize("model", ["tiny", "gpt-oss-tiny", "llama4-tiny"])
def test_dropless_prefill_with_the_kernel_equals_the_looped_experts(model):
    """The model with the GPU's grouped matmul kernel, run on CPU in interpret mode, prefills the logits of the
    CPU's loop over the experts: plain SwiGLU, gpt-oss (clamped activation, expert biases), Llama 4 (weights
    scaling the rows sent, a shared expert)."""
    cfg = exact_config(get_model(model)).replace(dispatch="dropless")
    state = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)))
    prompt = jax.random.randint(jax.random.key(3), (2, 32), 0, cfg.vocab_size)
    graphdef = nnx.graphdef(Transformer(cfg, rngs=nnx.Rngs(0), execution=Execution(FUSED)))
    jaxpr = str(jax.make_jaxpr(lambda s, t, c: nnx.merge(graphdef, s).prefill(t, c))(
        state, prompt, init_cache(cfg, 2, 34)))
    assert gk.NAME in jaxpr                                   # the kernel is what runs, not the fallback
    np.testing.assert_allclose(prefill_logits(cfg, state, FUSED, prompt),
                               prefill_logits(cfg, state, Kernels.for_platform("cpu"), prompt), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("name", "mesh", "unrolled"), [
    ("tiny", "EP2-TP2-DP2", False), ("gpt-oss-tiny", "EP4-TP2", False), ("tiny", "EP1-TP2-DP4", True)])
def test_dropless_with_the_kernel_sharded_equals_one_device(name, mesh, unrolled):
    """Inside the dropless shard_map: each shard's kernel multiplies the rows its experts received; with the layers
    unrolled, the stacked experts enter the shard_map whole along the layer axis and each shard's kernel reads its
    slice of the layer in place."""
    from moe_jax.runtime.verify import verify_sharding

    cfg = exact_config(get_model(name)).replace(dispatch="dropless")
    kernels = dataclasses.replace(FUSED, unrolled_layers=unrolled)
    v = verify_sharding(cfg, Strategy.parse(mesh), batch=8, prompt_len=16, gen_len=4, kernels=kernels)
    assert v.passed, v


def test_h200_dropless_prefill_calls_the_kernel_and_the_walk_counts_it():
    """qwen3-30b-a3b's dropless prefill on one H200, two layers: the experts are two kernel calls a layer (no
    ragged-dot, which XLA:GPU lowers as a dense product with every expert), the walk counts the kernel's FLOPs
    over its static bound, and those stay within 1.15x the experts' useful FLOPs."""
    cfg = get_model("qwen3-30b-a3b")
    B, S = 8, 2048
    phase = h200_qwen3_prefill("dropless", B, S)
    calls = [op for op in phase.ops if op.kernel == gk.NAME]
    assert len(calls) == 2 and all(op.count == 2 for op in calls), calls
    assert "ragged-dot" not in phase.hlo_text
    M, E, D, F = B * S * cfg.top_k, cfg.num_experts, cfg.d_model, cfg.expert_ffn
    P = gk.padded_rows(M, E, gk.row_block(M, E))
    assert sorted(op.matmul_flops for op in calls) == [gk.kernel_cost(P, D, F, E, 2)["flops"],
                                                       gk.kernel_cost(P, 2 * F, D, E, 2)["flops"]]
    useful = 2 * M * 3 * D * F
    assert sum(op.matmul_flops for op in calls) <= 1.15 * useful


def test_the_grouped_kernel_is_timed_at_its_own_efficiency():
    from moe_jax.costs.types import OpCost
    from moe_jax.hardware.presets import get_hardware
    from moe_jax.perf.timemodel import kernel_efficiency, op_seconds

    hw = dataclasses.replace(get_hardware("h200"), grouped_matmul_efficiency=0.3)
    flops = 10 ** 12
    kernel = OpCost("pallas_call.1", "custom-call", "moe", flops, flops, 0, 10 ** 6, 1, False, "bfloat16", gk.NAME)
    assert kernel_efficiency(hw, gk.NAME) == 0.3 and kernel_efficiency(hw) == hw.fused_attention_efficiency
    assert op_seconds(kernel, hw) == (pytest.approx(flops / (hw.peak_flops * 0.3)), "compute")
    plain = dataclasses.replace(hw, grouped_matmul_efficiency=0.0)
    assert op_seconds(kernel, plain)[0] == pytest.approx(flops / (hw.peak_flops * hw.flops_efficiency))
