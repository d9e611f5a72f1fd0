"""The model against plain references: decode vs full forward, capacity dispatch vs all experts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.config import get_model
from moe_jax.model.execution import Kernels
from moe_jax.model.moe import capacity_masks, capacity_moe, dense_moe, group_size, route
from moe_jax.model.transformer import Transformer, init_cache


class Jitted:
    """The model's three entry points, jitted once (eager calls would retrace the layer scan)."""

    def __init__(self, model):
        graphdef, state = nnx.split(model)
        self.state = state
        self._fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
        self._prefill = jax.jit(lambda s, t, c, full: nnx.merge(graphdef, s).prefill(t, c, full_logits=full),
                                static_argnums=3)
        self._decode = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s).decode(t, p, c))

    def __call__(self, tokens):
        return self._fwd(self.state, tokens)

    def prefill(self, tokens, cache, full_logits=False):
        return self._prefill(self.state, tokens, cache, full_logits)

    def decode(self, tokens, pos, cache):
        return self._decode(self.state, tokens, jnp.int32(pos), cache)


def _tokens(cfg, batch, length, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, cfg.vocab_size)


VARIANTS = {
    "tiny": {},
    "full_qk_norm_no_renorm": dict(qk_norm="full", router_norm_topk=False),
    "layernorm_clip": dict(norm="layer", qk_norm="none", clip_qkv=0.5),
    "shared_tied": dict(num_shared_experts=1, tie_embeddings=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decode_after_prefill_equals_full_forward(tiny32, variant):
    cfg = tiny32.replace(**VARIANTS[variant])
    model = Jitted(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = _tokens(cfg, 3, 14)
    full = model(tokens).logits
    prompt = 9
    every = model.prefill(tokens[:, :prompt], init_cache(cfg, 3, 16), full_logits=True)
    np.testing.assert_allclose(every.logits, full[:, :prompt], atol=2e-5, rtol=1e-5)
    out = model.prefill(tokens[:, :prompt], init_cache(cfg, 3, 16))        # serving: the last position only
    assert out.logits.shape == (3, 1, cfg.vocab_size)
    np.testing.assert_allclose(out.logits, full[:, prompt - 1:prompt], atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(out.cache["k"], every.cache["k"])
    cache = out.cache
    for pos in range(prompt, 14):
        step = model.decode(tokens[:, pos:pos + 1], pos, cache)
        cache = step.cache
        np.testing.assert_allclose(step.logits[:, 0], full[:, pos], atol=2e-5, rtol=1e-5)
    # the cache holds exactly the written positions; the rest is untouched (keys [L, B, K, T, Dh], values [.., Dh, T])
    assert np.all(np.asarray(cache["k"])[:, :, :, 14:] == 0)
    assert np.any(np.asarray(cache["k"])[:, :, :, :14] != 0)
    assert np.all(np.asarray(cache["v"])[..., 14:] == 0)
    assert np.any(np.asarray(cache["v"])[..., :14] != 0)


def test_bf16_decode_tracks_forward(tiny32):
    cfg = tiny32.replace(dtype="bfloat16")
    model = Jitted(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = _tokens(cfg, 2, 10)
    full = model(tokens)
    assert full.logits.dtype == jnp.float32
    out = model.prefill(tokens[:, :8], init_cache(cfg, 2, 10))
    assert out.cache["k"].dtype == jnp.bfloat16
    step = model.decode(tokens[:, 8:9], 8, out.cache)
    np.testing.assert_allclose(step.logits[:, 0], full.logits[:, 8], atol=0.1)


def test_capacity_with_ample_room_equals_dense_reference(tiny32):
    tokens = _tokens(tiny32, 4, 12)
    capacity = Jitted(Transformer(tiny32, rngs=nnx.Rngs(3)))
    dense = Jitted(Transformer(tiny32.replace(dispatch="dense"), rngs=nnx.Rngs(3)))
    out = capacity(tokens)
    assert int(out.dropped.sum()) == 0
    np.testing.assert_allclose(out.logits, dense(tokens).logits, atol=2e-5, rtol=1e-5)


def _independent_drop_count(x_gsd, router_de, cfg, C):
    """Count overflow without the cumsum: per group and expert, tokens routed there beyond C."""
    x = np.asarray(x_gsd, np.float64)
    logits = x @ np.asarray(router_de, np.float64)
    chosen = np.argsort(-logits, axis=-1, kind="stable")[..., :cfg.top_k]     # softmax keeps the order
    dropped = 0
    for g in range(x.shape[0]):
        counts = np.bincount(chosen[g].ravel(), minlength=cfg.num_experts)
        dropped += int(np.maximum(counts - C, 0).sum())
    return dropped


@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0])
def test_small_capacity_drops_the_independently_counted_number(tiny32, factor):
    cfg = tiny32.replace(capacity_factor=factor, moe_group_size=16)
    moe = Transformer(cfg, rngs=nnx.Rngs(5)).blocks  # stacked; take layer 0's weights
    w = {k: v[0] for k, v in nnx.to_pure_dict(nnx.state(moe))["moe"].items()}
    x = jax.random.normal(jax.random.key(7), (4, 16, cfg.d_model))
    y, dropped = jax.jit(capacity_moe, static_argnums=4)(x, w["router_de"], w["w_gate_up_epfd"], w["w_down_edf"], cfg)
    Sg = group_size(64, 1, cfg.moe_group_size)
    C = cfg.capacity(Sg)
    expected = _independent_drop_count(x.reshape(-1, Sg, cfg.d_model), w["router_de"], cfg, C)
    assert expected > 0
    assert int(dropped.sum()) == expected
    dense, _ = dense_moe(x, w["router_de"], w["w_gate_up_epfd"], w["w_down_edf"], cfg)
    assert not np.allclose(y, dense, atol=1e-4)       # dropping changed some outputs


def test_first_choices_win_slots_before_second_choices():
    # one group, 3 tokens, k=2, 2 experts, capacity 2. Token choices: (e0, e1), (e0, e1), (e1, e0).
    experts = jnp.array([[[0, 1], [0, 1], [1, 0]]])
    weights = jnp.full((1, 3, 2), 0.5)
    dispatch, combine, dropped = capacity_masks(weights, experts, 2, 2)
    # expert 0 slots: token0 (1st choice), token1 (1st choice); token2's 2nd choice is dropped.
    # expert 1 slots: token2 (1st choice), then token0 (2nd choice); token1's 2nd choice is dropped.
    assert int(dropped.sum()) == 2
    d = np.asarray(dispatch[0])                       # [S, E, C]
    assert d[0, 0, 0] == 1 and d[1, 0, 1] == 1 and d[2, 0].sum() == 0
    assert d[2, 1, 0] == 1 and d[0, 1, 1] == 1 and d[1, 1].sum() == 0
    np.testing.assert_allclose(np.asarray(combine[0]).sum(), 0.5 * 4)


def test_router_normalisation():
    x = jax.random.normal(jax.random.key(0), (5, 8))
    w = jax.random.normal(jax.random.key(1), (8, 6))
    weights, experts = route(x, w, 3, norm_topk=True)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    raw, experts2 = route(x, w, 3, norm_topk=False)
    probs = jax.nn.softmax(x @ w, axis=-1)
    ref_w, ref_e = jax.lax.top_k(probs, 3)
    np.testing.assert_array_equal(experts2, ref_e)
    np.testing.assert_allclose(raw, ref_w, rtol=1e-6)


@pytest.mark.parametrize("model", ["tiny", "gpt-oss-tiny", "deepseek-v3-tiny", "llama4-maverick-tiny"])
def test_native_top_k_routes_as_the_argmax_rounds(model):
    """`jax.lax.top_k` (the GPU's router, `Kernels.native_top_k`) chooses the experts and weights the argmax rounds
    choose, ties included (lowest index first), for every scoring: softmax, top-k softmax, grouped sigmoid with its
    bias, sigmoid of the input rows."""
    from moe_jax.model.moe.route import _top_k

    cfg = get_model(model)
    D, E = 16, cfg.num_experts
    x = jax.random.normal(jax.random.key(0), (3, 7, D))
    w = jax.random.normal(jax.random.key(1), (D, E))
    router = (w, jax.random.normal(jax.random.key(2), (E,))) if cfg.router_score == "sigmoid" or cfg.router_bias \
        else w
    want, got = (route(x, router, cfg.top_k, cfg.router_norm_topk, cfg, native_top_k=n) for n in (False, True))
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    tied = jnp.array([[0.5, 0.1, 0.5, 0.5, 0.2], [0.0, 0.0, 0.0, 0.0, 0.0]])
    for k in (1, 3, 5):
        np.testing.assert_array_equal(_top_k(tied, k, native=True)[1], _top_k(tied, k)[1])


def test_group_size_is_bounded_and_tiles_shards():
    assert group_size(8 * 2048, 8, 256) == 256
    assert group_size(64, 8, 256) == 8
    assert group_size(6 * 10, 2, 16) == 15
    # dispatch tensors stay linear in tokens: [G, Sg, E, C] with Sg bounded
    cfg = get_model("seed-30b")
    T = 64 * 2048
    Sg = group_size(T, 64, cfg.moe_group_size)
    elements = (T // Sg) * Sg * cfg.num_experts * cfg.capacity(Sg)
    assert elements == T * cfg.num_experts * cfg.capacity(Sg)
    assert Sg <= cfg.moe_group_size


@pytest.mark.parametrize(("factor", "model"),
                         [(0.5, "tiny"), (1.0, "tiny"), (0.5, "llama4-tiny"), (0.5, "gpt-oss-tiny")])
def test_gathered_capacity_dispatch_equals_the_one_hot_einsums(factor, model):
    """Capacity dispatch gathers each slot's row and each assignment's output (`capacity_moe`): GShard's one-hot
    dispatch and combine einsums over `capacity_masks` give the same result, drops included; Llama 4 scales the
    rows sent, gpt-oss adds expert biases."""
    from moe_jax.model.moe import swiglu_experts
    from moe_jax.model.moe.route import weights_input

    cfg = get_model(model).replace(dtype="float32", capacity_factor=factor, moe_group_size=16)
    moe = nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(5)).blocks))["moe"]
    w = {k: v[0] for k, v in moe.items()}
    biases = (w["b_gate_up_epf"], w["b_down_ed"]) if cfg.expert_bias else None
    router = (w["router_de"], w["router_bias_e"]) if "router_bias_e" in w else w["router_de"]
    x = jax.random.normal(jax.random.key(7), (4, 16, cfg.d_model))
    y, dropped = jax.jit(lambda x: capacity_moe(x, router, w["w_gate_up_epfd"], w["w_down_edf"], cfg,
                                                biases=biases))(x)
    x_gsd = x.reshape(4, 16, cfg.d_model)
    weights, experts = route(x_gsd, router, cfg.top_k, cfg.router_norm_topk, cfg)
    dispatch, combine, dropped_ref = capacity_masks(weights, experts, cfg.num_experts, cfg.capacity(16))
    if weights_input(cfg):
        dispatch, combine = combine, dispatch
    xe = jnp.einsum("gsd,gsec->egcd", x_gsd, dispatch)
    ye = swiglu_experts(xe, w["w_gate_up_epfd"], w["w_down_edf"], Kernels.for_platform("cpu"), cfg, biases)
    want = jnp.einsum("egcd,gsec->gsd", ye, combine).reshape(x.shape)
    assert int(dropped.sum()) == int(dropped_ref.sum()) and (factor == 1.0 or int(dropped.sum()) > 0)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=1e-5, rtol=1e-5)
