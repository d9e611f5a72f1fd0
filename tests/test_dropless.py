"""Dropless dispatch against the dense reference: unsharded, sharded with ep > 1, adversarial routings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.mesh import Strategy
from moe_jax.model.moe import _sort_assignments, dense_moe, dropless_moe, route
from moe_jax.model.transformer import Transformer
from moe_jax.programs import ShardedModel

from conftest import single_device_reference  # noqa: E402

# (ep, tp, pp, dp): every one with ep > 1 but the last two, pp crossing the MoE block in two
MESHES = [(8, 1, 1, 1), (2, 2, 1, 2), (4, 2, 1, 1), (2, 1, 2, 2), (2, 2, 2, 1), (1, 8, 1, 1), (1, 1, 1, 8)]
BATCH, PROMPT, TOTAL = 8, 10, 13


@pytest.fixture(scope="module")
def dropless32(tiny32):
    return tiny32.replace(dispatch="dropless")


@pytest.fixture(scope="module")
def reference(tiny32):
    """The dense (all experts on all tokens) model: nothing dropped, the ground truth."""
    return single_device_reference(tiny32.replace(dispatch="dense"), BATCH, TOTAL)


def _moe_weights(cfg, seed=0):
    moe = Transformer(cfg, rngs=nnx.Rngs(seed)).blocks.moe
    return {k: getattr(moe, k)[...][0] for k in ("router_de", "w_gate_edf", "w_up_edf", "w_down_efd")}


def test_sort_assignments_orders_by_expert_and_counts_rows():
    experts = jnp.array([[2, 0], [1, 2], [4, 0]], jnp.int32)     # 4 = padding for E = 4
    order, sorted_ids, sizes = _sort_assignments(experts, 4)
    np.testing.assert_array_equal(sorted_ids, [0, 0, 1, 2, 2, 4])
    np.testing.assert_array_equal(np.asarray(experts).reshape(-1)[np.asarray(order)], sorted_ids)
    np.testing.assert_array_equal(sizes, [2, 1, 2, 0])            # padding counted nowhere


def test_unsharded_dropless_equals_dense(dropless32):
    w = _moe_weights(dropless32)
    x = jax.random.normal(jax.random.key(1), (4, 12, dropless32.d_model))
    y, dropped = jax.jit(lambda x: dropless_moe(x, *w.values(), dropless32))(x)
    ref, _ = dense_moe(x, *w.values(), dropless32)
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
    assert int(dropped.sum()) == 0


@pytest.mark.parametrize("ep,tp,pp,dp", MESHES)
def test_sharded_dropless_prefill_and_decode_equal_dense_reference(dropless32, reference, ep, tp, pp, dp):
    state, tokens, ref = reference
    sm = ShardedModel(dropless32, Strategy(ep=ep, tp=tp, pp=pp, dp=dp))
    params = sm.shard_params(state)
    out = sm.prefill(params, sm.put_tokens(tokens[:, :PROMPT]), sm.init_cache(BATCH, TOTAL))
    np.testing.assert_allclose(np.asarray(out.logits), ref[:, :PROMPT], atol=1e-5, rtol=1e-5)
    assert int(np.asarray(out.dropped).sum()) == 0
    cache = out.cache
    for pos in range(PROMPT, TOTAL):
        step = sm.decode(params, sm.put_tokens(tokens[:, pos:pos + 1]), jnp.int32(pos), cache)
        cache = step.cache
        np.testing.assert_allclose(np.asarray(step.logits)[:, 0], ref[:, pos], atol=1e-5, rtol=1e-5)


def _all_tie(state):
    """A zero router: every score ties, so every token picks experts 0 .. k-1 (lowest index wins)."""
    state = jax.tree.map(lambda x: x, state)
    router = state["blocks"]["moe"]["router_de"]
    router.value = jnp.zeros_like(router[...])
    return state


@pytest.mark.parametrize("ep,tp,pp,dp", [(8, 1, 1, 1), (4, 2, 1, 1), (2, 1, 2, 2)])
def test_every_token_on_the_same_experts(dropless32, ep, tp, pp, dp):
    """All tokens choose experts 0 and 1: one or two shards receive every row, the others none."""
    graphdef, state = nnx.split(Transformer(dropless32, rngs=nnx.Rngs(0)))
    state = _all_tie(state)
    tokens = jax.random.randint(jax.random.key(1), (BATCH, PROMPT), 0, dropless32.vocab_size)
    ref_graph, _ = nnx.split(Transformer(dropless32.replace(dispatch="dense"), rngs=nnx.Rngs(0)))
    ref = np.asarray(jax.jit(lambda s, t: nnx.merge(ref_graph, s)(t).logits)(state, tokens))
    sm = ShardedModel(dropless32, Strategy(ep=ep, tp=tp, pp=pp, dp=dp))
    out = sm.forward(sm.shard_params(state), sm.put_tokens(tokens))
    np.testing.assert_allclose(np.asarray(out.logits), ref, atol=1e-5, rtol=1e-5)


def _block_under_mesh(cfg, strategy, fn, *args):
    from moe_jax.sharding import Layout, use_layout

    sm = ShardedModel(cfg, strategy)
    layout = Layout.for_strategy(cfg, strategy, sm.mesh)

    def run(*a):
        with use_layout(layout):
            return fn(*a, cfg)

    return jax.jit(run)(*args)


@pytest.mark.parametrize("hot", [(5,), (6, 7), (0, 3)])
@pytest.mark.parametrize("ep,tp,dp", [(8, 1, 1), (4, 2, 1), (2, 1, 4), (2, 2, 2)])
def test_block_with_chosen_hot_experts_equals_dense(dropless32, ep, tp, dp, hot):
    """The MoE block alone, every token routed to the `hot` experts (and no token to the rest)."""
    w = _moe_weights(dropless32)
    router = np.zeros_like(np.asarray(w["router_de"]))
    for i, e in enumerate(hot):
        router[0, e] = 10.0 - i                           # x[..., 0] > 0 for every token below
    w["router_de"] = jnp.asarray(router)
    x = jax.random.normal(jax.random.key(2), (8, 6, dropless32.d_model)).at[..., 0].set(3.0)
    _, experts = route(x, w["router_de"], dropless32.top_k, True)
    assert set(np.unique(np.asarray(experts)[..., :len(hot)])) == set(hot)
    strategy = Strategy(ep=ep, tp=tp, dp=dp)
    y, dropped = _block_under_mesh(dropless32, strategy, dropless_moe, x, *w.values())
    ref, _ = dense_moe(x, *w.values(), dropless32)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5, rtol=1e-5)
    assert int(dropped.sum()) == 0


def test_capacity_drops_where_dropless_does_not(tiny32, dropless32):
    """With every token on one expert, capacity dispatch drops and differs from the reference; dropless does not."""
    _, tokens, _ = single_device_reference(tiny32, 2, 12)
    graphdef, state = nnx.split(Transformer(tiny32.replace(capacity_factor=1.0), rngs=nnx.Rngs(0)))
    state = _all_tie(state)
    runs = {}
    for dispatch in ("capacity", "dropless", "dense"):
        g, _ = nnx.split(Transformer(tiny32.replace(capacity_factor=1.0, dispatch=dispatch), rngs=nnx.Rngs(0)))
        out = jax.jit(lambda s, t, g=g: nnx.merge(g, s)(t))(state, tokens)
        runs[dispatch] = (np.asarray(out.logits), int(np.asarray(out.dropped).sum()))
    assert runs["capacity"][1] > 0 and runs["dropless"][1] == 0
    assert not np.allclose(runs["capacity"][0], runs["dense"][0], atol=1e-3)
    np.testing.assert_allclose(runs["dropless"][0], runs["dense"][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ep,tp", [(4, 2), (2, 1)])
def test_capacity_and_dropless_agree_when_capacity_is_ample(tiny32, dropless32, reference, ep, tp):
    state, tokens, _ = reference
    outs = []
    for cfg in (tiny32, dropless32):
        sm = ShardedModel(cfg, Strategy(ep=ep, tp=tp, dp=8 // (ep * tp)))
        outs.append(np.asarray(sm.forward(sm.shard_params(state), sm.put_tokens(tokens)).logits))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_greedy_tokens_equal_across_meshes(dropless32):
    cfg = dropless32
    state, tokens, _ = single_device_reference(cfg, BATCH, PROMPT)
    generated = []
    for strategy in (Strategy(ep=1, dp=8), Strategy(ep=4, tp=2), Strategy(ep=2, pp=2, dp=2)):
        sm = ShardedModel(cfg, strategy)
        generated.append(sm.generate(sm.shard_params(state), tokens, 4))
    for g in generated[1:]:
        np.testing.assert_array_equal(g, generated[0])
