"""Pipeline parallelism: stages own their layers, activations move by collective-permute, results unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import single_device_reference  # noqa: E402
from flax import nnx

from moe_jax.costs.hlo import collective_axes, collectives
from moe_jax.errors import StrategyError
from moe_jax.model.pipeline import default_microbatches, schedule
from moe_jax.model.transformer import Transformer
from moe_jax.parallel.mesh import Strategy
from moe_jax.programs.placement import describe
from moe_jax.programs.sharded import ShardedModel

# (ep, tp, pp, dp), as the issue lists them
MESHES = [(1, 1, 2, 4), (2, 2, 2, 1), (1, 1, 8, 1), (4, 1, 2, 1), (1, 2, 4, 1)]
BATCH, PROMPT, TOTAL = 8, 9, 12


@pytest.fixture(scope="module")
def cfg8(tiny32):
    return tiny32.replace(num_layers=8)


@pytest.fixture(scope="module")
def reference(cfg8):
    return single_device_reference(cfg8, BATCH, TOTAL)


def _prefill_then_decode(sm, params, tokens):
    """Logits of positions PROMPT − 1 .. TOTAL − 1: the serving prefill's last position, then each decode step."""
    out = sm.prefill(params, sm.put_tokens(tokens[:, :PROMPT]), sm.init_cache(BATCH, TOTAL))
    logits, cache = [np.asarray(out.logits)], out.cache
    for pos in range(PROMPT, TOTAL):
        step = sm.decode(params, sm.put_tokens(tokens[:, pos:pos + 1]), jnp.int32(pos), cache)
        cache = step.cache
        logits.append(np.asarray(step.logits))
    return np.concatenate(logits, axis=1), cache


@pytest.mark.parametrize("ep,tp,pp,dp", MESHES)
def test_pipelined_prefill_and_decode_equal_single_device(cfg8, reference, ep, tp, pp, dp):
    state, tokens, ref = reference
    sm = ShardedModel(cfg8, Strategy(ep=ep, tp=tp, pp=pp, dp=dp))
    params = sm.shard_params(state)
    logits, cache = _prefill_then_decode(sm, params, tokens)
    np.testing.assert_allclose(logits, ref[:, PROMPT - 1:], atol=1e-5, rtol=1e-5)
    # each stage holds the KV cache of its own layers only
    assert cache["k"].addressable_shards[0].data.shape[0] == cfg8.num_layers // pp
    # full logits where asked: every prompt position, and the serving prefill's logits are their last slice
    full = ShardedModel(cfg8, sm.strategy, sm.mesh, full_logits=True)
    every = np.asarray(full.prefill(params, sm.put_tokens(tokens[:, :PROMPT]), sm.init_cache(BATCH, TOTAL)).logits)
    np.testing.assert_allclose(every, ref[:, :PROMPT], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits[:, :1], every[:, -1:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("prefill_m,decode_m", [(1, 1), (4, 2), (8, 8)])
def test_any_microbatch_count_gives_the_same_logits(cfg8, reference, prefill_m, decode_m):
    state, tokens, ref = reference
    sm = ShardedModel(cfg8, Strategy(tp=2, pp=2, dp=2), prefill_microbatches=prefill_m,
                      decode_microbatches=decode_m)
    logits, _ = _prefill_then_decode(sm, sm.shard_params(state), tokens)
    np.testing.assert_allclose(logits, ref[:, PROMPT - 1:], atol=1e-5, rtol=1e-5)


def test_microbatches_must_divide_the_batch(cfg8, reference):
    state, tokens, _ = reference
    sm = ShardedModel(cfg8, Strategy(pp=2, dp=4), prefill_microbatches=3)
    with pytest.raises(StrategyError, match="microbatches=3 does not divide batch 8; valid: 1, 2, 4, 8"):
        sm.forward(sm.shard_params(state), sm.put_tokens(tokens))


def _abstract_args(sm, batch, length):
    params = jax.tree.map(lambda s, a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          sm.param_shardings, sm.abstract_params)
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sm.token_sharding(batch, length))
    return params, tokens


@pytest.mark.parametrize("strategy", ["EP2-TP2-PP2", "PP2-DP4", "TP2-PP4"])
def test_compiled_pipeline_permutes_activations_and_never_gathers_weights(cfg8, strategy):
    s = Strategy.parse(strategy)
    sm = ShardedModel(cfg8, s)
    compiled = sm.forward.lower(*_abstract_args(sm, BATCH, PROMPT)).compile()
    found = collectives(compiled.as_text())
    permutes = [c for c in found if c.kind == "collective-permute"]
    assert permutes and all(collective_axes(c, s.mesh_shape) == ("pp",) for c in permutes)
    assert all("pipeline_handoff" in c.op_name for c in permutes)
    assert not [c for c in found if c.kind == "all-gather" and "pp" in collective_axes(c, s.mesh_shape)]

    # per-device parameter bytes from the compiled program = the stage's share (placement)
    tokens_bytes = BATCH * PROMPT * 4 // sm.layout.shards("batch", BATCH)
    weights = compiled.memory_analysis().argument_size_in_bytes - tokens_bytes
    expected = describe(cfg8, s).weight_bytes_per_device
    assert weights == pytest.approx(expected, rel=0.02)
    single_stage = describe(cfg8, Strategy(ep=s.ep, tp=s.tp, dp=s.dp * s.pp)).weight_bytes_per_device
    assert weights < single_stage                      # a stage really holds fewer layers


def test_invalid_pp_is_named(cfg8):
    with pytest.raises(StrategyError, match="pp=3 does not divide 8 layers; valid pp: 1, 2, 4, 8"):
        ShardedModel(cfg8, Strategy(pp=3))
    with pytest.raises(StrategyError, match="pp=16 is more stages than the 8 layers"):
        ShardedModel(cfg8, Strategy(pp=16))


def test_schedule_facts(cfg8):
    s = Strategy(tp=2, pp=4)
    pre = schedule(cfg8, s, batch=16, length=32, decode=False)
    assert pre.microbatches == 16 and pre.ticks == 19                # up to 4 per stage, divides 16
    assert pre.bubble_fraction == pytest.approx(3 / 19)
    assert pre.handoff_bytes_per_tick == 1 * 32 * cfg8.d_model * 4   # one sequence, f32
    assert pre.output_allreduce_bytes == 16 * 1 * cfg8.d_model * 4    # the serving prefill: last positions only
    full = schedule(cfg8, s, batch=16, length=32, decode=False, full_output=True)
    assert full.output_allreduce_bytes == 16 * 32 * cfg8.d_model * 4
    dec = schedule(cfg8, s, batch=16, length=1, decode=True)
    assert dec.microbatches == 4 and dec.bubble_fraction == pytest.approx(3 / 7)
    assert schedule(cfg8, Strategy(tp=2), batch=16, length=32, decode=False).bubble_fraction == 0
    # microbatches never split a dp x ep shard's sequences
    assert default_microbatches(batch=128, stages=2, batch_shards=64, decode=False) == 2


def test_bf16_pipeline_compiles_and_tracks_one_device(cfg8, reference):
    """bf16 takes a different collective path out of the pipeline (see pipeline._from_last_stage)."""
    state32, tokens, _ = reference
    cfg = cfg8.replace(dtype="bfloat16")
    state = jax.tree.map(lambda a: a.astype(jnp.bfloat16), state32)
    graphdef, _ = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    ref = np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)(state, tokens))[:, PROMPT - 1:]
    sm = ShardedModel(cfg, Strategy(ep=2, tp=2, pp=2))
    logits, cache = _prefill_then_decode(sm, sm.shard_params(state), tokens)
    assert cache["k"].dtype == jnp.bfloat16
    # bf16 rounding differs with the reduction order and flips near-ties among the tiny model's
    # flat logits; the pipelined program must be as close to the f32 truth as one bf16 device is.
    ref32 = reference[2][:, PROMPT - 1:]
    assert np.median(np.abs(logits - ref)) < 0.02
    single = np.mean(ref.argmax(-1) == ref32.argmax(-1))
    assert np.mean(logits.argmax(-1) == ref32.argmax(-1)) >= single - 0.05


def test_last_stage_hand_back_is_bit_exact_in_bf16():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from moe_jax.model.pipeline import _from_last_stage
    from moe_jax.parallel.mesh import build_mesh

    mesh = build_mesh(Strategy(pp=4, dp=2))
    x = jax.random.normal(jax.random.key(0), (4, 6, 8), jnp.float32).astype(jnp.bfloat16)

    def program(x):
        stage = jax.lax.axis_index("pp")
        mine = x * (stage + 1).astype(x.dtype)          # only stage 3's value should come back
        return _from_last_stage(mine, "pp", stage == 3)

    f = jax.shard_map(program, mesh=mesh, in_specs=P(), out_specs=P(), axis_names={"pp"}, check_vma=False)
    got = jax.jit(f)(jax.device_put(x, NamedSharding(mesh, P("dp"))))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(x * jnp.bfloat16(4)))


def test_without_stages_there_are_no_microbatches():
    """pp = 1 runs the layer scan once over the batch: the schedule (and the planner's estimate, which reads
    each tick's weights) must not count 4 prefill microbatches that the program does not have."""
    from moe_jax.config import get_model

    cfg = get_model("tiny")
    s = Strategy(ep=2, tp=2, dp=2)
    for decode in (False, True):
        sched = schedule(cfg, s, batch=16, length=8, decode=decode)
        assert (sched.microbatches, sched.ticks, sched.bubble_fraction) == (1, 1, 0)
