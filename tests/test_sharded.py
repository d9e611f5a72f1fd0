"""Sharded == unsharded on 8 fake CPU devices, and the collectives the sharding implies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.hlo import collective_axes, collectives
from moe_jax.mesh import Strategy
from moe_jax.model.transformer import Transformer
from moe_jax.programs import ShardedModel

from conftest import single_device_reference  # noqa: E402

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
    w = params["blocks"]["moe"]["w_gate_edf"][...]
    shard = w.addressable_shards[0].data.shape
    assert shard == (tiny32.num_layers, tiny32.num_experts // ep, tiny32.d_model, tiny32.expert_ffn // tp)

    out = sm.prefill(params, sm.put_tokens(tokens[:, :PROMPT]), sm.init_cache(BATCH, TOTAL))
    np.testing.assert_allclose(np.asarray(out.logits), ref[:, :PROMPT], atol=1e-5, rtol=1e-5)
    cache = out.cache
    for pos in range(PROMPT, TOTAL):
        step = sm.decode(params, sm.put_tokens(tokens[:, pos:pos + 1]), jnp.int32(pos), cache)
        cache = step.cache
        np.testing.assert_allclose(np.asarray(step.logits)[:, 0], ref[:, pos], atol=1e-5, rtol=1e-5)


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
    cache = {k: jax.ShapeDtypeStruct((cfg.num_layers, BATCH, TOTAL, cfg.num_kv_heads, cfg.head_dim),
                                     jnp.dtype(cfg.dtype), sharding=s)
             for k, s in sm.cache_shardings(BATCH, TOTAL).items()}
    if phase == "prefill":
        lowered = sm.prefill.lower(params, tokens, cache)
    else:
        lowered = sm.decode.lower(params, tokens, jax.ShapeDtypeStruct((), jnp.int32), cache)
    return collectives(lowered.compile().as_text())


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
    for leaf, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(sm.param_shardings)):
        assert leaf.sharding == sharding
    # same values as the unsharded init (partitionable RNG; jit may round the scaling differently)
    single = nnx.state(Transformer(tiny32, rngs=nnx.Rngs(0)))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
