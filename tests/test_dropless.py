"""Dropless dispatch against the dense reference: unsharded, sharded with ep > 1, adversarial routings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_tpu_script, single_device_reference  # noqa: E402
from flax import nnx

from moe_jax.model.moe import dense_moe, dropless_moe, route, sort_assignments
from moe_jax.model.transformer import Transformer
from moe_jax.parallel.mesh import Strategy
from moe_jax.programs.sharded import ShardedModel

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
    return {k: getattr(moe, k)[...][0] for k in ("router_de", "w_gate_up_epfd", "w_down_edf")}


def test_sort_assignments_orders_by_expert_and_counts_rows():
    experts = jnp.array([[2, 0], [1, 2], [4, 0]], jnp.int32)     # 4 = padding for E = 4
    order, sorted_ids, sizes = sort_assignments(experts, 4)
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
    np.testing.assert_allclose(np.asarray(out.logits), ref[:, PROMPT - 1:PROMPT], atol=1e-5, rtol=1e-5)  # last
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
    from moe_jax.parallel.rules import Layout, use_layout

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


# --- the cost analyzer, estimate and planner -------------------------------------------------

def _analyze(cfg, spec, workload, **kw):
    from moe_jax.costs.walk import analyze_cost

    return analyze_cost(cfg, Strategy.parse(spec), workload, **kw)


def test_cpu_compile_counts_grouped_matmuls_and_ragged_exchange(tiny32):
    """XLA:CPU's dense lowering of ragged_dot is corrected: compiled matmul FLOPs track the model's."""
    from moe_jax.costs.compile import Workload

    cfg = tiny32.replace(dispatch="dropless", dtype="bfloat16")
    workload = Workload(8, 64, 4)
    report = _analyze(cfg, "EP4-TP2-PP1-DP1", workload)
    for name, phase in report.phases.items():
        ratio = report.analytic.phases[name].compiled_over_analytic
        assert 0.9 < ratio < 1.15, (name, ratio)            # capacity's padding and one-hot einsums are gone
        ragged = [c for c in phase.collectives if c.kind == "ragged-all-to-all"]
        assert {c.phase for c in ragged} == {"dispatch", "combine"} and all(c.axes == ["ep"] for c in ragged)
        # expected = k / (ep · min(k, E/ep)) of the worst-case block
        for c in ragged:
            assert c.bytes_per_call == int(c.worst_bytes_per_call * 2 / (4 * 2))
    assert any("dropless on the cpu backend" in n for n in report.notes)
    assert report.analytic.dropless.row_fraction == 0.25
    capacity = _analyze(tiny32.replace(dtype="bfloat16"), "EP4-TP2-PP1-DP1", workload)
    assert report.phases["prefill"].matmul_flops < capacity.phases["prefill"].matmul_flops
    # one expert per shard (ep = E): the loop has one iteration, its rows still count once
    one = _analyze(cfg, "EP8-TP1-PP1-DP1", workload)
    assert 0.9 < one.analytic.prefill.compiled_over_analytic < 1.15
    experts = one.phases["prefill"].bytes_by_scope["experts"]
    assert experts < 1.5 * _analyze(cfg, "EP1-TP1-PP1-DP8", workload).phases["prefill"].bytes_by_scope["experts"]


def test_decode_floor_counts_only_touched_experts(tiny32):
    from moe_jax.costs.compile import Workload
    from moe_jax.costs.routing import routed_expert_bytes, touched_fraction
    from moe_jax.hardware.presets import get_hardware
    from moe_jax.perf.timemodel import predict

    cfg = tiny32.replace(dispatch="dropless")
    strategy = Strategy.parse("EP2-TP1-PP1-DP4")
    report = _analyze(cfg, strategy.name, Workload(4, 16, 4))
    read = report.analytic.decode_weights_read
    weights = report.phases["decode"].memory.weights
    experts = routed_expert_bytes(cfg, strategy)
    frac = touched_fraction(cfg, 1)                          # 4 sequences over dp=4: one token per replica
    assert frac == pytest.approx(cfg.top_k / cfg.num_experts)
    assert read.bytes == weights - experts + int(experts * frac)
    p = predict(report, get_hardware("h200"), 4, 4)
    assert p.decode.floor_s == pytest.approx((read.bytes + report.phases["decode"].memory.kv_cache)
                                             / get_hardware("h200").hbm_bandwidth)
    assert p.tpot_s >= p.decode.floor_s


def test_estimate_for_dropless_has_no_capacity_overhead_and_ragged_collectives():
    from moe_jax.config import get_model
    from moe_jax.costs.analytic import estimate_phase
    from moe_jax.costs.compile import Workload
    from moe_jax.programs.placement import describe

    cfg = get_model("qwen3-30b-a3b")
    s = Strategy.parse("EP8-TP1-PP1-DP1")
    p = describe(cfg, s)
    costs = {}
    for d in ("capacity", "dropless"):
        c = cfg.replace(dispatch=d)
        costs[d] = estimate_phase(c, s, Workload(64, 2048, 128), "prefill", p.weight_bytes_per_device, 0)
    assert costs["dropless"].matmul_flops < costs["capacity"].matmul_flops
    ragged = [c for c in costs["dropless"].collectives if c.kind == "ragged-all-to-all"]
    assert len(ragged) == 2 and all(c.worst_bytes_per_call > c.bytes_per_call for c in ragged)
    assert not [c for c in costs["capacity"].collectives if c.kind == "ragged-all-to-all"]


def test_shard_imbalance_under_uniform_routing():
    from moe_jax.config import get_model
    from moe_jax.costs.routing import shard_imbalance

    cfg = get_model("qwen3-30b-a3b")
    assert shard_imbalance(cfg, Strategy(ep=1), 64) == 1.0
    few, many = shard_imbalance(cfg, Strategy(ep=8), 1), shard_imbalance(cfg, Strategy(ep=8), 4096)
    assert 1.0 < many < 1.1 < few <= 8.0


def test_plan_compares_dispatch_methods_on_the_best_strategy(tmp_path, capsys):
    from moe_jax.cli import main

    md = tmp_path / "plan.md"
    try:
        main(["plan", "--model", "tiny", "--devices", "8", "--batch", "8", "--prompt-len", "32", "--gen-len", "4",
              "--hardware", "h200", "--dispatch", "both", "--top", "1", "--workers", "1", "--cache", "",
              "--json", str(tmp_path / "plan.json"), "--markdown", str(md)])
    except SystemExit as e:
        assert e.code == 0
    import json

    data = json.loads((tmp_path / "plan.json").read_text())
    comparison = data["dispatch_comparison"]
    assert comparison["strategy"] == data["best"]["strategy"]["name"]
    assert set(comparison["methods"]) == {"capacity", "dropless"}
    assert all(m["fits"] and m["tpot_s"] > 0 for m in comparison["methods"].values())
    assert "## Dispatch methods on" in md.read_text()


def test_unknown_dispatch_is_a_clear_error(capsys):
    from moe_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["analyze", "--model", "tiny", "--dispatch", "megablocks"])
    assert e.value.code == 2
    assert "'megablocks' is not one of 'capacity', 'dropless'" in capsys.readouterr().err


TPU_SCRIPT = """
import json
from moe_jax.costs.compile import Workload
from moe_jax.config import get_model
from moe_jax.costs.walk import analyze_cost
from moe_jax.parallel.mesh import Strategy
r = analyze_cost(get_model("tiny").replace(dispatch="dropless"), Strategy.parse("EP4-TP2-PP1-DP1"),
                 Workload(8, 64, 4), backend="tpu", topology="v5p:2x2x2")
print(json.dumps({n: {"hlo": "ragged-all-to-all(" in p.hlo_text,
                      "ragged": [[c.kind, c.axes, c.bytes_per_call, c.worst_bytes_per_call] for c in p.collectives
                                 if c.kind == "ragged-all-to-all"],
                      "ratio": r.analytic.phases[n].compiled_over_analytic} for n, p in r.phases.items()}))
# pipeline stages only: nothing to split inside a stage, still the native grouped matmul
pp = analyze_cost(get_model("tiny").replace(dispatch="dropless"), Strategy.parse("PP4"), Workload(4, 32, 4),
                  backend="tpu", topology="v5e:2x2")
print(json.dumps({"pp_native": "ragged-dot" in pp.phases["prefill"].hlo_text}))   # (small decodes lower otherwise)
"""


def test_tpu_program_contains_the_ragged_all_to_all():
    import json

    lines = run_tpu_script(TPU_SCRIPT)
    data, pp = json.loads(lines[-2]), json.loads(lines[-1])
    assert pp["pp_native"]
    for phase in data.values():
        assert phase["hlo"] and len(phase["ragged"]) == 2
        for _kind, axes, expected, worst in phase["ragged"]:
            assert axes == ["ep"] and worst > expected > 0
        assert 0.9 < phase["ratio"] < 1.15                  # the TPU grouped-matmul custom call is counted


def test_dense_ragged_all_to_all_has_the_native_semantics():
    """`ragged_all_to_all_dense` (the CPU stand-in) against the documented semantics, computed in numpy."""
    from jax.sharding import PartitionSpec as P

    from moe_jax.model.moe import ragged_all_to_all_dense
    from moe_jax.parallel.mesh import build_mesh

    ep, chunks, rows, out_rows, D = 8, 2, 40, 64, 3
    rng = np.random.default_rng(0)
    operand = rng.normal(size=(ep, rows, D)).astype(np.float32)
    sizes = rng.integers(0, 3, size=(ep, ep * chunks))                 # [src, chunk]; chunk i goes to i // chunks
    in_off = np.zeros_like(sizes)
    out_off = np.zeros_like(sizes)
    expected = np.full((ep, out_rows, D), -1.0, np.float32)
    fill = np.zeros(ep, int)
    for s in range(ep):
        in_off[s] = np.concatenate([[0], np.cumsum(sizes[s])[:-1]]) + s % 2          # a gap at the front
    for i in range(ep * chunks):                                       # receivers lay chunks out by source
        for s in range(ep):
            dst = i // chunks
            out_off[s, i] = fill[dst] + 1                                # gaps between chunks
            fill[dst] += sizes[s, i] + 1
            n = sizes[s, i]
            expected[dst, out_off[s, i]:out_off[s, i] + n] = operand[s, in_off[s, i]:in_off[s, i] + n]
    recv = np.stack([np.concatenate([sizes[s, d * chunks:(d + 1) * chunks] for s in range(ep)]) for d in range(ep)])
    mesh = build_mesh(Strategy(ep=8))

    def body(x, o, a, b, c, d):
        return ragged_all_to_all_dense(x[0], o[0], a[0], b[0], c[0], d[0], axis_name="ep",
                                       block_rows=2 * chunks)[None]      # at most 2 rows per chunk

    got = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 6, out_specs=P("ep")))(
        operand, np.full((ep, out_rows, D), -1.0, np.float32),
        *(a.astype(np.int32) for a in (in_off, sizes, out_off, recv)))
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_grouped_matmul_loop_equals_ragged_dot():
    """The CPU loop over experts and jax.lax.ragged_dot agree, rows past the groups included (zero)."""
    from moe_jax.model.moe import grouped_matmul

    x = jax.random.normal(jax.random.key(0), (20, 6))
    w = jax.random.normal(jax.random.key(1), (4, 6, 5))
    sizes = jnp.array([3, 0, 9, 5], jnp.int32)                        # 17 rows in groups, 3 past them
    loop = grouped_matmul(x, w, sizes, native=False)
    ragged = grouped_matmul(x, w, sizes, native=True)
    np.testing.assert_allclose(loop[:17], ragged[:17], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(loop[3:12], x[3:12] @ w[2], atol=1e-5, rtol=1e-5)
    assert not np.any(np.asarray(loop[17:]))


def test_bounded_buffer_drops_exactly_the_rows_past_it(dropless32):
    """dropless_buffer=2: every token on experts 0 and 1 (both on shard 0 of EP4) overflows shard 0's buffer.

    4 shards x 12 tokens x k=2 = 96 rows for shard 0; R = ceil(2 x 12 x 2) = 48 rows: expert 0's 48
    rows fit, expert 1's 48 are dropped, so the output is the dense reference without expert 1.
    """
    from moe_jax.model.moe import receive_rows

    cfg = dropless32.replace(dropless_buffer=2.0)
    assert receive_rows(cfg, 12, 4) == (48, 24)
    w = _moe_weights(cfg)
    w["router_de"] = jnp.zeros_like(w["router_de"])
    x = jax.random.normal(jax.random.key(3), (8, 6, cfg.d_model))
    y, dropped = _block_under_mesh(cfg, Strategy(ep=4, tp=2), dropless_moe, x, *w.values())
    assert int(np.asarray(dropped).sum()) == 48
    without_1 = dict(w, **{k: w[k].at[1].set(0) for k in ("w_gate_up_epfd", "w_down_edf")})
    ref, _ = dense_moe(x, *without_1.values(), cfg)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5, rtol=1e-5)
    # an ample bound drops nothing and equals the strict buffer
    y2, dropped2 = _block_under_mesh(dropless32.replace(dropless_buffer=8.0), Strategy(ep=4, tp=2), dropless_moe,
                                     x, *w.values())
    full, _ = dense_moe(x, *w.values(), cfg)
    assert int(np.asarray(dropped2).sum()) == 0
    np.testing.assert_allclose(np.asarray(y2), np.asarray(full), atol=1e-5, rtol=1e-5)


def test_bounded_buffer_is_validated(dropless32):
    from moe_jax.errors import ConfigError

    for bad in (0, 0.5, -1.0, float("inf"), "2"):
        with pytest.raises(ConfigError, match="dropless_buffer"):
            dropless32.replace(dropless_buffer=bad)


def test_bounded_buffer_in_the_cost_walk_and_cli(capsys, tiny32):
    """--dropless-buffer reaches the program: a smaller buffer, the same expected bytes."""
    import json

    from moe_jax.cli import main

    sizes = {}
    for extra in ([], ["--dropless-buffer", "2"]):
        try:
            main(["analyze", "--model", "tiny", "--mesh", "EP4-TP2", "--batch", "8", "--prompt-len", "32",
                  "--gen-len", "4", "--hardware", "h200", "--backend", "cpu", "--dispatch", "dropless", "--json", "-",
                  *extra])
        except SystemExit as e:
            assert e.code == 0
        data = json.loads(capsys.readouterr().out)
        ragged = [c for c in data["phases"]["prefill"]["collectives"] if c["kind"] == "ragged-all-to-all"]
        sizes[bool(extra)] = (sum(c["bytes"] for c in ragged), data["memory"]["total"],
                              data["analytic"]["dropless"]["row_fraction"])
        assert data["analytic"]["dropless"]["buffer"] == (2.0 if extra else None)
    assert sizes[True][0] == pytest.approx(sizes[False][0], rel=0.01)   # the same rows move
    assert sizes[True][1] < sizes[False][1]                              # in a smaller buffer
    assert (sizes[False][2], sizes[True][2]) == (0.25, 0.5)              # tiny: worst case 4x, bound 2x
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--model", "tiny", "--dropless-buffer", "2"])
    assert e.value.code == 2 and "add --dispatch dropless" in capsys.readouterr().err


@pytest.mark.parametrize("ep,tp,pp,dp", [(4, 2, 1, 1), (2, 1, 1, 4), (1, 1, 8, 1)])
def test_tokens_that_do_not_split_evenly_are_padded_and_ignored(dropless32, ep, tp, pp, dp):
    """15 tokens over 4 or 8 token shards: padding rows route nowhere and change nothing (pp only: no split)."""
    cfg = dropless32.replace(num_layers=8)
    w = _moe_weights(cfg)
    x = jax.random.normal(jax.random.key(4), (3, 5, cfg.d_model))
    y, dropped = _block_under_mesh(cfg, Strategy(ep=ep, tp=tp, pp=pp, dp=dp), dropless_moe, x, *w.values())
    ref, _ = dense_moe(x, *w.values(), cfg)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5, rtol=1e-5)
    assert int(np.asarray(dropped).sum()) == 0
