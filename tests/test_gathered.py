"""Gathered experts (`moe_jax.model.moe.gathered`): at decode each assignment is multiplied by its own expert's
weights only. Equal to the grouped path and to the dense reference (FP8, biases, clamped activation, Llama 4's
input-weighted routing), unsharded and on meshes; taken only where it is exact and cheaper; and on the GPU
compile a batch-1 decode step reads only the routed experts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_compiler, single_device_reference
from flax import nnx

import moe_jax.model.moe.dropless as dropless_module
import moe_jax.model.moe.gathered as gathered_module
from moe_jax.config import get_model
from moe_jax.model.execution import Kernels
from moe_jax.model.moe import capacity_moe, dense_moe, dropless_moe
from moe_jax.model.moe.dropless import grouped_swiglu
from moe_jax.model.moe.gathered import capacity_gathers, gathered_swiglu, gathers
from moe_jax.model.transformer import Transformer
from moe_jax.parallel.mesh import Strategy
from moe_jax.programs.sharded import ShardedModel

DISPATCH = {"capacity": capacity_moe, "dropless": dropless_moe}
CPU = Kernels.for_platform("cpu")
IN_PLACE = Kernels(ragged_all_to_all=False, grouped_matmul=False, in_place_weight_einsum=True,
                   narrow_manual_all_reduce=False)
"""XLA:CPU's kernels but the GPU's in-place products (a reduction on any backend): the fused-gather form."""


@pytest.fixture
def gathered_calls(monkeypatch):
    """Counts the traces of `gathered_swiglu` (from either module that calls it): proof the path was taken."""
    calls = []

    def spy(*args, **kw):
        calls.append(args[0].shape)
        return gathered_swiglu(*args, **kw)

    monkeypatch.setattr(gathered_module, "gathered_swiglu", spy)
    monkeypatch.setattr(dropless_module, "gathered_swiglu", spy)
    return calls


def _variants(tiny32):
    """The tiny f32 model as plain SwiGLU, gpt-oss's (expert biases, clamped activation, router bias) and
    Llama 4's (input-weighted sigmoid routing)."""
    return {"swiglu": tiny32,
            "gpt_oss": tiny32.replace(expert_bias=True, expert_activation="swiglu_clamped", swiglu_limit=0.3,
                                      router_score="topk_softmax", router_bias=True),
            "llama4": tiny32.replace(router_score="sigmoid_input", router_norm_topk=False)}


def _block(cfg, seed=0):
    """(router, gate/up, down, biases or None) of the first MoE layer, biases made non-zero."""
    moe = Transformer(cfg, rngs=nnx.Rngs(seed)).blocks.moe
    router = moe.router_de[...][0]
    if cfg.router_bias:
        router = (router, moe.router_bias_e[...][0])
    biases = None
    if cfg.expert_bias:
        keys = jax.random.split(jax.random.key(seed + 7), 2)
        biases = (jax.random.normal(keys[0], moe.b_gate_up_epf[...][0].shape) * 0.3,
                  jax.random.normal(keys[1], moe.b_down_ed[...][0].shape) * 0.3)
    return router, moe.w_gate_up_epfd[...][0], moe.w_down_edf[...][0], biases


def test_the_choice_is_exact_and_cheaper_only():
    """Taken at fewer assignments than local experts (a third where the gathered copy is written); for capacity
    only where nothing can drop and ep = 1."""
    qwen = get_model("qwen3-30b-a3b")                                 # E = 128, k = 8, capacity factor 1.25
    assert gathers(8, 128) and not gathers(128, 128)
    assert gathers(42, 128, in_place=False) and not gathers(43, 128, in_place=False)
    assert capacity_gathers(qwen, 1, 1, ep=1)                          # C = Sg = 1: no drop possible
    assert not capacity_gathers(qwen, 2, 2, ep=1)                      # C = 1 < Sg = 2: may drop
    assert not capacity_gathers(qwen, 1, 1, ep=2)                      # experts split: the all-to-all stays
    assert not capacity_gathers(qwen.replace(capacity_factor=16.0), 16, 16, ep=1)   # 128 assignments: no saving


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("variant", ["swiglu", "gpt_oss"])
def test_gathered_rows_equal_the_grouped_matmul(tiny32, variant, fp8, in_place):
    """Rows sorted by expert, as the grouped path takes them: the same [M, D] out, FP8 weights (their FP8 values
    multiplied, each row scaled by its expert's scales) and biases included, as a reduction or a matmul."""
    from moe_jax.model.quant import Fp8Weight

    cfg = _variants(tiny32)[variant]
    _, w_gate_up, w_down, biases = _block(cfg)
    ids = jnp.array([0, 0, 2, 5, 5, 5, 7], jnp.int32)
    sizes = jnp.bincount(ids, length=cfg.num_experts).astype(jnp.int32)
    x = jax.random.normal(jax.random.key(3), (ids.shape[0], cfg.d_model))
    kernels = CPU
    if fp8:   # matrices 2^0 .. 2^7 apart: a scale applied to the wrong rows is far off
        spread = 2.0 ** jnp.arange(cfg.num_experts)
        weights = [Fp8Weight(w * spread.reshape(-1, *(1,) * (w.ndim - 1)), tuple("abcd"[:w.ndim]), "float32")
                   for w in (w_gate_up, w_down)]

        def run(f, *a):   # each reads the FP8 weights whole inside the traced function (`fp8_source`)
            return jax.jit(lambda x: f(x, *a[:-1], weights[0][...], weights[1][...], *a[-1]))(x)

        got = run(functools.partial(gathered_swiglu, in_place=in_place), ids, (cfg, biases))
        want = run(lambda x, s, g, d, *r: grouped_swiglu(x, s, g, d, kernels, *r), sizes, (cfg, biases))
        plain = jax.jit(lambda x: grouped_swiglu(x, sizes, weights[0][...] + 0, weights[1][...] + 0, kernels, cfg,
                                                 biases))(x)                      # the dequantized weights
        np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())
    else:
        got = jax.jit(lambda x: gathered_swiglu(x, ids, w_gate_up, w_down, cfg, biases, in_place=in_place))(x)
        want = jax.jit(lambda x: grouped_swiglu(x, sizes, w_gate_up, w_down, kernels, cfg, biases))(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("kernels", [CPU, IN_PLACE], ids=["matmul", "in_place"])
@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
@pytest.mark.parametrize("variant", ["swiglu", "gpt_oss", "llama4"])
def test_decode_block_equals_dense_and_the_grouped_path(tiny32, variant, dispatch, kernels, gathered_calls):
    """Decode takes the gathered path (a token per sequence: 2 assignments < 8 experts; in place also 3
    sequences, 6 assignments) and equals the dense reference, and the same tokens inside a prefill-sized batch
    (grouped path, nothing dropped at this capacity factor)."""
    cfg = _variants(tiny32)[variant].replace(dispatch=dispatch)
    router, w_gate_up, w_down, biases = _block(cfg)
    extra = {} if biases is None else {"biases": biases}
    f = functools.partial(DISPATCH[dispatch], kernels=kernels, **extra)
    many = jax.random.normal(jax.random.key(4), (8, 4, cfg.d_model))
    y_many, dropped_many = jax.jit(lambda x: f(x, router, w_gate_up, w_down, cfg))(many)
    assert not gathered_calls and int(dropped_many.sum()) == 0
    for batch in (1, 3) if kernels.in_place_weight_einsum else (1,):
        x = many[:batch, :1]
        y, dropped = jax.jit(lambda x: f(x, router, w_gate_up, w_down, cfg))(x)
        assert gathered_calls, "the gathered path was not taken"
        gathered_calls.clear()
        ref, _ = dense_moe(x, router, w_gate_up, w_down, cfg, **extra)
        np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(y, y_many[:batch, :1], atol=1e-5, rtol=1e-5)
        assert int(dropped.sum()) == 0
        if dispatch == "capacity":
            assert dropped.shape == (1,)                               # one count per token group, as before


def test_capacity_keeps_counting_drops_where_it_could_drop(tiny32, gathered_calls):
    """Two tokens per group and one slot per expert: capacity dispatch keeps its slots, drops and counts them."""
    cfg = tiny32.replace(capacity_factor=1.0, moe_group_size=2)         # C = ceil(2·2/8) = 1 < Sg = 2
    router, w_gate_up, w_down, _ = _block(cfg)
    router = jnp.zeros_like(router)                                   # ties: every token on experts 0 and 1
    x = jax.random.normal(jax.random.key(5), (2, 1, cfg.d_model))
    _, dropped = jax.jit(lambda x: capacity_moe(x, router, w_gate_up, w_down, cfg))(x)
    assert not gathered_calls
    assert int(dropped.sum()) == 2


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 4), (4, 1, 2), (1, 2, 4), (2, 2, 2)])
def test_sharded_decode_equals_the_dense_reference(tiny32, dispatch, tp, pp, dp, gathered_calls):
    """Prefill (grouped path) then decode steps (gathered: a token per shard, 2 assignments for 8 experts) on a
    mesh, pipeline stages included, equal the dense single-device model."""
    state, tokens, ref = single_device_reference(tiny32.replace(dispatch="dense"), dp, 9)
    cfg = tiny32.replace(dispatch=dispatch)
    sm = ShardedModel(cfg, Strategy(tp=tp, pp=pp, dp=dp))
    params = sm.shard_params(state)
    out = sm.prefill(params, sm.put_tokens(tokens[:, :7]), sm.init_cache(dp, 9))
    assert not gathered_calls
    cache = out.cache
    for pos in (7, 8):
        step = sm.decode(params, sm.put_tokens(tokens[:, pos:pos + 1]), jnp.int32(pos), cache)
        cache = step.cache
        np.testing.assert_allclose(np.asarray(step.logits)[:, 0], ref[:, pos], atol=1e-5, rtol=1e-5)
        assert int(np.asarray(step.dropped).sum()) == 0
    assert gathered_calls


def test_sharded_fp8_and_biases_decode_equal_single_device(tiny32, gathered_calls):
    """FP8 expert weights with gpt-oss's biases, capacity dispatch split over tp and dp: the gathered decode equals
    the unsharded model's (tp = 2 × dp = 4)."""
    cfg = _variants(tiny32)["gpt_oss"].replace(weight_dtype="float8_e4m3fn")
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(6), (4, 6), 0, cfg.vocab_size)
    ref = np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)(state, tokens))
    sm = ShardedModel(cfg, Strategy(tp=2, dp=4))
    params = sm.shard_params(state)
    out = sm.prefill(params, sm.put_tokens(tokens[:, :5]), sm.init_cache(4, 6))
    step = sm.decode(params, sm.put_tokens(tokens[:, 5:6]), jnp.int32(5), out.cache)
    np.testing.assert_allclose(np.asarray(step.logits)[:, 0], ref[:, 5], atol=2e-4, rtol=1e-4)
    assert gathered_calls


def test_dropless_with_experts_split_gathers_the_received_rows(tiny32, gathered_calls):
    """ep = 2 (× tp = 4) with a bounded receive buffer of 2 rows (< 4 local experts): the received rows are
    multiplied by their own experts (in place). Each token routed to one expert per shard, so nothing is
    dropped: equal to dense."""
    from test_dropless import _block_under_mesh

    cfg = tiny32.replace(dispatch="dropless", dropless_buffer=1.0)
    router, w_gate_up, w_down, _ = _block(cfg)
    D = cfg.d_model
    router = np.zeros((D, cfg.num_experts), np.float32)
    router[0, [0, 4]], router[1, [1, 5]] = (10.0, 9.0), (10.0, 9.0)   # token 0: experts 0, 4; token 1: 1, 5
    x = jnp.zeros((2, 1, D)).at[0, 0, 0].set(1.0).at[1, 0, 1].set(1.0)
    x = x + 0.01 * jax.random.normal(jax.random.key(7), x.shape)
    block = functools.partial(dropless_moe, kernels=IN_PLACE)
    y, dropped = _block_under_mesh(cfg, Strategy(ep=2, tp=4), block, x, jnp.asarray(router), w_gate_up, w_down)
    ref, _ = dense_moe(x, jnp.asarray(router), w_gate_up, w_down, cfg)
    assert gathered_calls and gathered_calls[0][0] == 2                # the 2-row receive buffer
    assert int(dropped.sum()) == 0
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_gpu_batch_one_decode_reads_only_the_routed_experts(dispatch):
    """qwen3-30b-a3b (2 layers) on one H200, batch 1: the decode step's experts read under 10% of the local
    expert weights (8 of 128 routed: 6.25%; before: every expert, and dropless's ragged dot 25x of that), with
    no gathered weight copy written (the gather fuses into its reduction: no temporary of one expert's size)."""
    require_compiler("gpu")
    from moe_jax.costs.compile import Workload
    from moe_jax.costs.hlo import largest_results
    from moe_jax.costs.routing import routed_expert_bytes
    from moe_jax.costs.walk import analyze_cost

    cfg = get_model("qwen3-30b-a3b").replace(num_layers=2, dispatch=dispatch)
    strategy = Strategy.parse("EP1")
    report = analyze_cost(cfg, strategy, Workload(1, 256, 16), backend="gpu", gpu_target="h200", phases=("decode",))
    decode = report.phases["decode"]
    experts = routed_expert_bytes(cfg, strategy)
    assert decode.bytes_by_scope["experts"] < 0.10 * experts, decode.bytes_by_scope
    one_expert_gate_up = 2 * cfg.expert_ffn * cfg.d_model * 2
    assert largest_results(decode.hlo_text, 1)[0][0] < one_expert_gate_up
    assert report.analytic.decode_weights_read.touched_fraction == pytest.approx(8 / 128)
