"""A GPU decode step's two forms of a small product: a gemm, or a product and a reduction read in place.

XLA:GPU's gemm kernels do not read an operand inside the layer scan's stacked parameters or carried cache:
each layer's slice is copied out first. The other form multiplies a few rows per weight matrix as a product
and an f32 sum that reads the weight where it is stored (`moe_jax.model.layers.in_place_rows`), and attention
can read the cache as stored (`moe_jax.model.attention.attend_stored`). Which is faster was measured on one
H200 (bench/RESULTS.md, "Decode kernels"): in place for up to `Kernels.max_in_place_rows` rows per weight
matrix, gemms for attention. These tests pin the in-place forms to the reference on CPU, and which form the
compiled GPU program takes.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import exact_config, require_compiler
from flax import nnx

from moe_jax.config import get_model
from moe_jax.costs.compile import Workload
from moe_jax.costs.hlo import Module
from moe_jax.model.attention import attend, attend_stored, attend_with_new, window_mask
from moe_jax.model.execution import Execution, Kernels
from moe_jax.model.layers import _reduction_order, in_place_rows, weight_einsum
from moe_jax.model.transformer import Transformer, init_cache
from moe_jax.parallel.mesh import Strategy

TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(("H", "K", "window", "sinks"), [(4, 4, 0, False), (8, 2, 0, True), (8, 1, 5, False),
                                                         (6, 3, -4, True)])
def test_attend_stored_equals_attend(H, K, window, sinks, dtype):
    """Keys [B, K, T, Dh] and values [B, K, Dh, T] as the cache stores them give `attend`'s output: GQA groups,
    sliding (W > 0) and chunked (W < 0) masks, sinks, one query row or two."""
    B, T, Dh = 3, 13, 16
    kq, kk, kv, ks = jax.random.split(jax.random.key(0), 4)
    for S, pos in ((1, 9), (2, 11)):
        q = jax.random.normal(kq, (B, S, H, Dh), jnp.float32).astype(dtype)
        k = jax.random.normal(kk, (B, T, K, Dh), jnp.float32).astype(dtype)
        v = jax.random.normal(kv, (B, T, K, Dh), jnp.float32).astype(dtype)
        s = jax.random.normal(ks, (H,), jnp.float32).astype(dtype) if sinks else None
        mask = window_mask((pos - S + 1 + jnp.arange(S))[:, None], jnp.arange(T)[None, :], window)
        want = attend(q, k, v, mask, sinks=s)
        got = attend_stored(q, jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 3, 1)), mask, sinks=s)
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(("H", "K", "window", "sinks"), [(4, 4, 0, False), (8, 2, 0, True), (8, 1, 5, False),
                                                         (6, 3, -4, True)])
def test_attend_with_new_equals_attend_over_the_written_cache(H, K, window, sinks, dtype):
    """The cache as it was plus the query's own key and value beside it (a deferred write) give `attend`'s output
    over the cache with them written at the query's position: GQA groups, sliding and chunked masks, sinks."""
    B, T, Dh, pos = 3, 13, 16, 9
    kq, kk, kv, kn, ks = jax.random.split(jax.random.key(4), 5)
    q = jax.random.normal(kq, (B, 1, H, Dh), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, T, K, Dh), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, T, K, Dh), jnp.float32).astype(dtype)
    k_new, v_new = (jax.random.normal(key, (B, 1, K, Dh), jnp.float32).astype(dtype) for key in jax.random.split(kn))
    s = jax.random.normal(ks, (H,), jnp.float32).astype(dtype) if sinks else None
    mask = window_mask(jnp.array([[pos]]), jnp.arange(T)[None, :], window)
    want = attend(q, k.at[:, pos].set(k_new[:, 0]), v.at[:, pos].set(v_new[:, 0]), mask, sinks=s)
    got = attend_with_new(q, k, v, mask & (jnp.arange(T) < pos)[None, :], k_new, v_new, sinks=s)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **TOL[dtype])


@pytest.mark.parametrize(("spec", "x_shape", "w_shape"), [
    ("bsd,hkd->bshk", (5, 1, 8), (3, 4, 8)), ("egcd,epfd->egcpf", (4, 2, 3, 8), (4, 2, 6, 8)),
    ("egcf,edf->egcd", (4, 1, 5, 6), (4, 8, 6)), ("bshk,dhk->bsd", (3, 2, 3, 4), (8, 3, 4))])
def test_weight_einsum_in_place_with_several_rows_equals_the_einsum(spec, x_shape, w_shape):
    """Several rows per weight matrix (decode at batch > 1, or an expert's capacity slots) in place: the einsum's
    result, the rows ordered just before the contracted dimensions (each weight row re-read while cached)."""
    kx, kw = jax.random.split(jax.random.key(1))
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    np.testing.assert_allclose(weight_einsum(spec, x, w, in_place=True), jnp.einsum(spec, x, w),
                               atol=1e-5, rtol=1e-5)


def test_reduction_order_puts_rows_before_the_contracted_dimensions():
    assert _reduction_order("egcpf", "epfd") == "epfgcd"
    assert _reduction_order("egcd", "edf") == "edgcf"
    assert _reduction_order("bsd", "dhk") == "dbshk"
    assert _reduction_order("bshk", "hkd") == "hkbsd"
    assert _reduction_order("bsd", "hdk") == "bshdk"         # contracted dimensions not trailing: rows first


def test_in_place_rows_only_on_a_gpu_and_for_few_rows():
    gpu, cpu = Kernels.for_platform("gpu"), Kernels.for_platform("cpu")
    assert not gpu.in_place_decode_attention and not cpu.in_place_decode_attention   # measured slower
    limit = gpu.max_in_place_rows
    assert in_place_rows(1, gpu) and in_place_rows(limit, gpu) and not in_place_rows(limit + 1, gpu)
    assert not in_place_rows(1, cpu)


def _greedy(cfg, state, execution, prompt, steps):
    graphdef = nnx.graphdef(Transformer(cfg, rngs=nnx.Rngs(0), execution=execution))
    prefill = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).prefill(t, c))
    decode = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s).decode(t, p, c))
    out = prefill(state, prompt, init_cache(cfg, prompt.shape[0], prompt.shape[1] + steps))
    token, cache, logits = jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32)[:, None], out.cache, []
    for pos in range(prompt.shape[1], prompt.shape[1] + steps):
        step = decode(state, token, jnp.int32(pos), cache)
        logits.append(np.asarray(step.logits[:, -1]))
        token, cache = jnp.argmax(step.logits[:, -1], -1).astype(jnp.int32)[:, None], step.cache
    return np.stack(logits)


@pytest.mark.parametrize("model", ["tiny", "gpt-oss-tiny", "deepseek-v3-tiny", "llama4-maverick-tiny"])
def test_decode_with_the_gpu_forms_equals_the_reference(model):
    """The model built with the GPU's decode forms (stored-order attention, few-row products in place), run on
    CPU at batch 4, decodes the same logits as the reference forms: tiny (GQA), gpt-oss-tiny (sinks, sliding
    windows, biases), deepseek-v3-tiny (MLA's projections, shared experts, a dense first layer),
    llama4-maverick-tiny (dense layers between the MoE ones, chunked attention)."""
    cfg = exact_config(get_model(model))
    state = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)))
    prompt = jax.random.randint(jax.random.key(2), (4, 20), 0, cfg.vocab_size)
    reference = Kernels.for_platform("cpu")
    gpu_forms = dataclasses.replace(reference, in_place_weight_einsum=True, in_place_decode_attention=True)
    want = _greedy(cfg, state, Execution(reference), prompt, steps=4)
    got = _greedy(cfg, state, Execution(gpu_forms), prompt, steps=4)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def _expert_products(hlo_text: str) -> tuple[int, int]:
    """(gemms, in-place reductions) among the compiled fusions that multiply by the experts' weights."""
    module = Module.parse(hlo_text)
    gemms = reductions = 0
    for comp in module.computations.values():
        for i in comp.instructions:
            if i.opcode not in ("fusion", "custom-call") or "moe/experts" not in i.op_name:
                continue
            if "gemm" in i.name or "__cublas" in i.attrs or "dot_general" in i.op_name:
                gemms += 1
            elif "reduce" in i.name:
                reductions += 1
    return gemms, reductions


@pytest.mark.parametrize(("model", "batch", "in_place"), [("qwen3-30b-a3b", 64, False), ("mixtral-8x7b", 8, True)])
def test_gpu_decode_multiplies_the_experts_in_place_only_for_few_rows(model, batch, in_place):
    """Capacity dispatch on one H200, two layers: mixtral-8x7b at batch 8 has 3 slots per expert and multiplies
    them in place (no gemm of the experts, measured 54 against 70 ms a step); qwen3-30b-a3b at batch 64 has 5
    and takes gemms (74 against 59 ms)."""
    require_compiler("gpu")
    from moe_jax.costs.walk import analyze_cost

    cfg = get_model(model).replace(num_layers=2, dispatch="capacity")
    report = analyze_cost(cfg, Strategy.parse("EP1"), Workload(batch, 2048, 128), backend="gpu", gpu_target="h200",
                          phases=("decode",))
    gemms, reductions = _expert_products(report.phases["decode"].hlo_text)
    assert (reductions > 0 and gemms == 0) if in_place else (gemms > 0 and reductions == 0), (gemms, reductions)


@pytest.mark.parametrize("model", ["tiny", "gpt-oss-tiny", "deepseek-v3-tiny", "llama4-maverick-tiny", "glm-4.5-tiny"])
def test_unrolled_layers_equal_the_scan(model):
    """The GPU's decode program runs its layers unrolled (`Kernels.unrolled_layers`), each at a cache
    entry fixed when the program is built: on CPU it decodes the scan's logits, for full and ring (sliding,
    chunked) layers, MLA's latent cache after a dense first layer, Maverick's blocks of two layers, and GLM-4.5's
    GQA dense first layers (their own stack, its writes deferred apart from the MoE layers')."""
    cfg = exact_config(get_model(model))
    state = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)))
    prompt = jax.random.randint(jax.random.key(3), (2, 11), 0, cfg.vocab_size)
    scan = Kernels.for_platform("cpu")
    unrolled = dataclasses.replace(scan, unrolled_layers=True)
    want = _greedy(cfg, state, Execution(scan), prompt, steps=6)
    got = _greedy(cfg, state, Execution(unrolled), prompt, steps=6)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("name", "mesh"), [("gpt-oss-tiny", "EP2-TP2-DP2"), ("llama4-maverick-tiny", "EP4-DP2"),
                                            ("tiny", "TP8"), ("deepseek-v3-tiny", "EP2-TP4")])
def test_unrolled_layers_sharded_equal_one_device(name, mesh):
    """Unrolled, the cache written after the last layer, sharded: teacher-forced decode equals the unsharded full
    forward (rings, Maverick's blocks, `tp` above the KV heads so the cache holds copies of each head, MLA)."""
    from moe_jax.runtime.verify import verify_sharding

    assert len(jax.devices()) == 8
    unrolled = dataclasses.replace(Kernels.for_platform("cpu"), unrolled_layers=True)
    cfg = exact_config(get_model(name))
    v = verify_sharding(cfg, Strategy.parse(mesh), batch=8, prompt_len=9, gen_len=6, kernels=unrolled)
    assert v.passed, v


def _weight_slice_copies(hlo_text: str) -> list[str]:
    """Fusions, in any computation (a layer loop's body included), that copy one layer's slice out of a stacked
    weight parameter ([L, ...] in the entry): their result is [1, ...] or [...] of that parameter's trailing
    dimensions. Named "weight <- fusion"."""
    from moe_jax.costs.hlo import arrays

    module = Module.parse(hlo_text)
    entry = module.computations[module.entry]
    layer_shapes = {}
    for i in entry.instructions:
        if i.opcode == "parameter" and "blocks" in i.name:
            (_, dims), = arrays(i.shape)
            layer_shapes[tuple(dims[1:])] = layer_shapes[(1, *dims[1:])] = i.name
    copies = []
    for comp in module.computations.values():
        for i in comp.instructions:
            if i.opcode == "fusion" and "slice" in i.name and "update" not in i.name:
                shapes = arrays(i.shape)
                if len(shapes) == 1 and tuple(shapes[0][1]) in layer_shapes:
                    copies.append(f"{layer_shapes[tuple(shapes[0][1])]} <- {i.name}")
    return copies


def test_gpu_decode_reads_the_experts_weights_where_they_are_stored():
    """qwen3-30b-a3b on one H200 at batch 64 (capacity, 5 slots per expert: gemms), three layers: unrolled, no
    expert weight is copied out of its stacked array before its gemm (scanned, every layer's slices were:
    decode moved 3.06x the bytes it needs at 48 layers, bench/RESULTS.md)."""
    require_compiler("gpu")
    from moe_jax.costs.walk import analyze_cost

    cfg = get_model("qwen3-30b-a3b").replace(num_layers=3, dispatch="capacity")
    report = analyze_cost(cfg, Strategy.parse("EP1"), Workload(64, 2048, 128), backend="gpu", gpu_target="h200",
                          phases=("decode",))
    copies = _weight_slice_copies(report.phases["decode"].hlo_text)
    assert not [c for c in copies if "w_gate_up" in c or "w_down" in c], copies


def test_which_programs_run_their_layers_unrolled():
    """On a GPU: a decode step with more rows per device than the in-place products take, and a prefill of at most
    `max_unrolled_prefill_rows` rows (the weight copies it saves cost the same at any batch; the unrolled program's
    temporaries grow with it). Never on CPU."""
    from moe_jax.model.stack import unrolled

    gpu, cpu = Kernels.for_platform("gpu"), Kernels.for_platform("cpu")
    rows = gpu.max_unrolled_prefill_rows

    def x(B, S):
        return jnp.zeros((B, S, 4))

    assert unrolled(gpu, x(64, 1)) and not unrolled(gpu, x(1, 1)) and not unrolled(cpu, x(64, 1))
    assert unrolled(gpu, x(1, 2048), prefill=True) and unrolled(gpu, x(rows // 2048, 2048), prefill=True)
    assert not unrolled(gpu, x(64, 2048), prefill=True) and not unrolled(cpu, x(1, 2048), prefill=True)
