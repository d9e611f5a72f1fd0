"""Sharded == unsharded on 8 fake CPU devices, and the collectives the sharding implies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import single_device_reference  # noqa: E402
from flax import nnx

from moe_jax.config import get_model
from moe_jax.costs.hlo import collective_axes, collectives
from moe_jax.model.transformer import Transformer, cache_shape
from moe_jax.parallel.mesh import Strategy
from moe_jax.programs.sharded import ShardedModel

# (ep, tp, pp, dp), as the issue lists them
MESHES = [(8, 1, 1, 1), (1, 8, 1, 1), (2, 2, 1, 2), (4, 2, 1, 1), (1, 1, 1, 8), (2, 1, 1, 4)]
BATCH, PROMPT, TOTAL = 8, 10, 13


@pytest.fixture(scope="module")
def reference(tiny32):
    return single_device_reference(tiny32, BATCH, TOTAL)


@pytest.mark.parametrize("ep,tp,pp,dp", MESHES)
def test_sharded_prefill_and_decode_equal_single_device(tiny32, reference, ep, tp, pp, dp):
    state, tokens, ref = reference
    sm = ShardedModel(tiny32, Strategy(ep=ep, tp=tp, pp=pp, dp=dp))
    params = sm.shard_params(state)
    # parameters really are split: an expert weight's shard is 1/ep of the experts and 1/tp of F
    w = params["blocks"]["moe"]["w_gate_up_epfd"][...]
    shard = w.addressable_shards[0].data.shape
    assert shard == (tiny32.num_layers, tiny32.num_experts // ep, 2, tiny32.expert_ffn // tp, tiny32.d_model)

    out = sm.prefill(params, sm.put_tokens(tokens[:, :PROMPT]), sm.init_cache(BATCH, TOTAL))
    assert out.logits.shape == (BATCH, 1, tiny32.vocab_size)                  # the serving prefill: last position
    np.testing.assert_allclose(np.asarray(out.logits), ref[:, PROMPT - 1:PROMPT], atol=1e-5, rtol=1e-5)
    cache = out.cache
    for pos in range(PROMPT, TOTAL):
        step = sm.decode(params, sm.put_tokens(tokens[:, pos:pos + 1]), jnp.int32(pos), cache)
        cache = step.cache
        np.testing.assert_allclose(np.asarray(step.logits)[:, 0], ref[:, pos], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ep,tp,pp,dp", [(2, 2, 1, 2), (1, 8, 1, 1)])
def test_full_logits_prefill_equals_single_device_and_ends_with_the_serving_logits(tiny32, reference, ep, tp, pp,
                                                                                    dp):
    state, tokens, ref = reference
    sm = ShardedModel(tiny32, Strategy(ep=ep, tp=tp, pp=pp, dp=dp))
    full = ShardedModel(tiny32, sm.strategy, sm.mesh, full_logits=True)
    params, prompt = sm.shard_params(state), sm.put_tokens(tokens[:, :PROMPT])
    every = full.prefill(params, prompt, sm.init_cache(BATCH, TOTAL))
    last = sm.prefill(params, prompt, sm.init_cache(BATCH, TOTAL))
    assert every.logits.shape == (BATCH, PROMPT, tiny32.vocab_size)
    np.testing.assert_allclose(np.asarray(every.logits), ref[:, :PROMPT], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(last.logits), np.asarray(every.logits)[:, -1:], atol=1e-6, rtol=1e-6)
    assert last.logits.sharding.spec == every.logits.sharding.spec            # vocab split as before
    for k in ("k", "v"):
        np.testing.assert_array_equal(np.asarray(last.cache[k]), np.asarray(every.cache[k]))


def test_sharded_forward_with_small_decode_batch(tiny32, reference):
    """A batch that dp x ep cannot split (1 sequence on EP4-DP2) still runs and matches."""
    state, tokens, _ = reference
    single = Transformer(tiny32, rngs=nnx.Rngs(0))
    nnx.update(single, state)
    ref = np.asarray(single(tokens[:2]).logits)
    sm = ShardedModel(tiny32, Strategy(ep=4, dp=2))
    out = sm.forward(sm.shard_params(state), sm.put_tokens(tokens[:2]))
    np.testing.assert_allclose(np.asarray(out.logits), ref, atol=1e-5, rtol=1e-5)


def _compiled_collectives(cfg, strategy, phase):
    sm = ShardedModel(cfg, strategy)
    params = jax.tree.map(lambda s, a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          sm.param_shardings, sm.abstract_params)
    tokens = jax.ShapeDtypeStruct((BATCH, PROMPT if phase == "prefill" else 1), jnp.int32,
                                  sharding=sm.token_sharding(BATCH, PROMPT if phase == "prefill" else 1))
    shapes = cache_shape(cfg, BATCH, TOTAL, kv_copies=sm.layout.kv_copies)
    cache = {k: jax.ShapeDtypeStruct(shapes[k].shape, shapes[k].dtype, sharding=s)
             for k, s in sm.cache_shardings(BATCH, TOTAL).items()}
    if phase == "prefill":
        lowered = sm.prefill.lower(params, tokens, cache)
    else:
        lowered = sm.decode.lower(params, tokens, jax.ShapeDtypeStruct((), jnp.int32), cache)
    return collectives(lowered.compile().as_text())


@pytest.mark.parametrize("strategy", ["EP2-TP2-DP2", "EP2-TP2-PP2"])
def test_serving_prefill_compiles_without_the_full_logits(strategy):
    """The analysis compile's prefill returns [B, 1, V] logits: no [B, S, V] output or temporary."""
    from moe_jax.costs.compile import Workload, compile_program

    cfg = get_model("tiny").replace(vocab_size=32768)               # a large vocabulary: logits dominate
    s = Strategy.parse(strategy)
    B, S = 8, 64
    program = compile_program(cfg, s, Workload(B, S, 4), phases=("prefill",))
    serving = program.phases["prefill"].compiled
    sm = ShardedModel(cfg, s, full_logits=True)
    params = jax.tree.map(lambda sh, a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          sm.param_shardings, sm.abstract_params)
    cache = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sm.cache_shardings(B, S + 4)[k])
             for k, v in cache_shape(cfg, B, S + 4).items()}
    tokens = jax.ShapeDtypeStruct((B, S), jnp.int32, sharding=sm.token_sharding(B, S))
    full = sm.prefill.lower(params, tokens, cache).compile()

    Bl, Vl = B // sm.layout.shards("batch", B), cfg.vocab_size // sm.layout.shards("vocab", cfg.vocab_size)
    cache_bytes = program.phases["prefill"].input_bytes["kv_cache"]
    out = serving.memory_analysis().output_size_in_bytes
    assert 0 <= out - cache_bytes - Bl * 1 * Vl * 4 < 4096                  # logits [B, 1, V] + cache (+ counters)
    assert full.memory_analysis().output_size_in_bytes - out == Bl * (S - 1) * Vl * 4
    # the head's [B, S, V] result exists only in the full-logits program
    assert f"f32[{Bl},{S},{Vl}]" in full.as_text() and f"f32[{Bl},{S},{Vl}]" not in serving.as_text()
    def peak(compiled):
        m = compiled.memory_analysis()
        return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    assert peak(full) - peak(serving) > Bl * (S - 1) * Vl * 4 // 2


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("strategy", ["EP8", "EP2-TP2-DP2", "EP4-TP2"])
def test_ep_mesh_compiles_to_all_to_all_on_ep(tiny32, strategy, phase):
    s = Strategy.parse(strategy)
    found = _compiled_collectives(tiny32, s, phase)
    a2a = [c for c in found if c.kind == "all-to-all"]
    assert len(a2a) >= 2, [c.kind for c in found]                  # dispatch and combine
    for c in a2a:
        assert collective_axes(c, s.mesh_shape) == ("ep",)
        assert all(len(g) == s.ep for g in c.groups)
    scopes = " ".join(c.op_name for c in a2a)
    assert "dispatch" in scopes and "combine" in scopes
    # tensor parallelism reduces over tp only; nothing is gathered across all devices
    for c in found:
        if c.kind == "all-reduce":
            assert set(collective_axes(c, s.mesh_shape)) <= {"tp"}, c
        assert c.kind != "all-gather", c


def test_no_ep_means_no_all_to_all(tiny32):
    s = Strategy(tp=2, dp=4)
    found = _compiled_collectives(tiny32, s, "prefill")
    assert not [c for c in found if c.kind == "all-to-all"]
    assert {collective_axes(c, s.mesh_shape) for c in found} == {("tp",)}


def test_data_parallel_program_has_no_collectives(tiny32):
    assert _compiled_collectives(tiny32, Strategy(dp=8), "decode") == []


def test_init_params_are_created_in_their_shards(tiny32):
    sm = ShardedModel(tiny32, Strategy(ep=4, tp=2))
    params = sm.init_params(seed=0)
    for leaf, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(sm.param_shardings), strict=True):
        assert leaf.sharding == sharding
    # same values as the unsharded init (partitionable RNG; jit may round the scaling differently)
    single = nnx.state(Transformer(tiny32, rngs=nnx.Rngs(0)))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
