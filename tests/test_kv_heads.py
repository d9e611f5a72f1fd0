"""tp above the KV heads: each device keeps, and projects, only the KV head its query heads read.

With K KV heads and tp = r·K, the cache and the k/v activations hold K·r heads (head e a copy of
head e // r) split over tp, so a device holds one head: 1/K of the cache, never the whole of it.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_compiler, run_tpu_script, single_device_reference
from flax import nnx

from moe_jax.config import get_model
from moe_jax.costs.compile import Workload
from moe_jax.errors import ShardingError
from moe_jax.model.transformer import Transformer, init_cache
from moe_jax.parallel.mesh import Strategy, kv_copies, kv_replicated
from moe_jax.parallel.rules import Layout, axis_rules
from moe_jax.programs.placement import describe
from moe_jax.programs.sharded import ShardedModel

BATCH, PROMPT, TOTAL = 8, 10, 13
B, S, G = 8, 64, 4                                       # the compiled programs' workload


def _perturbed(state, seed: int = 7):
    """`state` with every norm scale random: a per-head K norm repeated to the wrong head would show."""
    key = jax.random.key(seed)

    def leaf(path, x):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        if "norm" in name and "scale" in name:
            return x + 0.5 * jax.random.normal(jax.random.fold_in(key, zlib.crc32(name.encode())), x.shape, x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(leaf, state)


def _unsharded_prefill(cfg, state, prompt):
    graphdef = nnx.graphdef(Transformer(cfg, rngs=nnx.Rngs(0)))
    run = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).prefill(t, c))
    return run(state, prompt, init_cache(cfg, BATCH, TOTAL))


def _greedy(cfg, state, prompt, steps: int):
    """Greedy tokens of the unsharded model: prefill, then `steps` - 1 decode steps."""
    graphdef = nnx.graphdef(Transformer(cfg, rngs=nnx.Rngs(0)))
    prefill = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).prefill(t, c))
    decode = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s).decode(t, p, c))
    out = prefill(state, prompt, init_cache(cfg, prompt.shape[0], prompt.shape[1] + steps))
    token, cache, tokens = jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32)[:, None], out.cache, []
    for pos in range(prompt.shape[1], prompt.shape[1] + steps):
        tokens.append(np.asarray(token))
        if pos == prompt.shape[1] + steps - 1:
            break
        step = decode(state, token, jnp.int32(pos), cache)
        token, cache = jnp.argmax(step.logits[:, -1], -1).astype(jnp.int32)[:, None], step.cache
    return np.concatenate(tokens, axis=1)


@pytest.mark.parametrize("variant,strategy", [
    ("tiny", "EP1-TP8-PP1-DP1"),                         # K=4, H=8: r=2, one query head and one KV head each
    ("full_norm_clip", "EP1-TP8-PP1-DP1"),               # a per-head K norm [K, Dh] repeated like the weights
    ("two_kv_heads", "EP1-TP4-PP2-DP1"),                 # K=2, tp=4 (r=2) inside pipeline stages
])
def test_tp_above_kv_heads_equals_single_device(tiny32, variant, strategy):
    cfg = {"tiny": tiny32, "full_norm_clip": tiny32.replace(qk_norm="full", clip_qkv=2.0),
           "two_kv_heads": tiny32.replace(num_kv_heads=2)}[variant]
    s = Strategy.parse(strategy)
    r = s.tp // cfg.num_kv_heads
    assert kv_copies(cfg, s) == r > 1 and kv_replicated(cfg, s)
    state, tokens, ref = single_device_reference(cfg, BATCH, TOTAL)
    if variant == "full_norm_clip":
        state = _perturbed(state)
        graphdef = nnx.graphdef(Transformer(cfg, rngs=nnx.Rngs(0)))
        ref = np.asarray(jax.jit(lambda st, t: nnx.merge(graphdef, st)(t).logits)(state, tokens))
    sm = ShardedModel(cfg, s)
    params = sm.shard_params(state)
    prompt = tokens[:, :PROMPT]

    out = sm.prefill(params, sm.put_tokens(prompt), sm.init_cache(BATCH, TOTAL))
    np.testing.assert_allclose(np.asarray(out.logits), ref[:, PROMPT - 1:PROMPT], atol=1e-5, rtol=1e-5)
    # the cache holds K·r heads, one per tp rank; head e is the reference's head e // r
    L, Dh = cfg.num_layers, cfg.head_dim
    want = _unsharded_prefill(cfg, state, prompt).cache
    for name in ("k", "v"):
        c = out.cache[name]                    # keys [L, B, K·r, T, Dh], values [L, B, K·r, Dh, T]
        assert c.shape == (L, BATCH, cfg.num_kv_heads * r, *((TOTAL, Dh) if name == "k" else (Dh, TOTAL)))
        assert {sh.data.shape[2] for sh in c.addressable_shards} == {1}
        np.testing.assert_allclose(np.asarray(c), np.repeat(np.asarray(want[name]), r, axis=2), atol=1e-5, rtol=1e-5)

    cache = out.cache
    for pos in range(PROMPT, TOTAL):
        step = sm.decode(params, sm.put_tokens(tokens[:, pos:pos + 1]), jnp.int32(pos), cache)
        cache = step.cache
        np.testing.assert_allclose(np.asarray(step.logits)[:, 0], ref[:, pos], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(sm.generate(params, prompt, 3), _greedy(cfg, state, jnp.asarray(prompt), 3))


def test_a_cache_with_the_wrong_heads_is_refused(tiny32):
    s = Strategy(tp=8)
    sm = ShardedModel(tiny32, s)
    state, tokens, _ = single_device_reference(tiny32, BATCH, PROMPT)
    whole = jax.device_put(init_cache(tiny32, BATCH, TOTAL))                    # K heads: the unsharded layout
    with pytest.raises(ShardingError, match=r"KV cache has 4 heads; this layout stores 8 \(4 KV heads x 2 copies\)"):
        sm.prefill(sm.shard_params(state), sm.put_tokens(tokens), whole)


def test_rules_and_layout_for_tp_above_kv_heads():
    qwen = get_model("qwen3-30b-a3b")                                              # 4 KV heads
    rules = axis_rules(qwen, Strategy(tp=8))
    assert rules["kv_heads"] == () and rules["cache_heads"] == ("tp",)             # weights whole, cache split
    assert Layout.for_strategy(qwen, Strategy(tp=8)).kv_copies == 2
    assert Layout.for_strategy(qwen, Strategy(tp=4)).kv_copies == 1
    assert Layout.for_strategy(qwen, Strategy(tp=2, ep=4)).kv_copies == 1
    assert kv_copies(qwen, Strategy(tp=8)) == 2 and kv_copies(get_model("qwen3-235b-a22b"), Strategy(tp=16)) == 4


def test_placement_one_kv_head_per_device():
    qwen = get_model("qwen3-30b-a3b")
    p = describe(qwen, Strategy(tp=8), batch=64, cache_len=2048 + 256)
    f = p.to_dict()["facts"]
    assert f["kv_heads_per_device"] == 1 and f["kv_head_copies"] == 2 and f["kv_heads_replicated_over_tp"]
    assert f["kv_cache_shape_per_device"] == [48, 64, 1, 2304, 128]
    whole = 2 * 48 * 64 * 2304 * 4 * 128 * 2                                       # k and v, bf16, 14.5 GB
    assert f["kv_cache_bytes_per_device"] * 4 == whole
    # tp dividing K: as before, K / tp heads and no copies
    g = describe(qwen, Strategy(tp=2, ep=4), batch=64, cache_len=2304).facts()
    assert g["kv_heads_per_device"] == 2 and g["kv_head_copies"] == 1 and not g["kv_heads_replicated_over_tp"]


def test_decode_floor_leaves_out_the_kv_weights_a_rank_does_not_project():
    from moe_jax.costs.analytic import analytic_report, kv_weights_unread

    qwen = get_model("qwen3-30b-a3b")
    s = Strategy(tp=8)
    unread = kv_weights_unread(qwen, s)
    assert unread == 48 * 3 * 2 * 128 * 2048 * 2 + 48 * 3 * 128 * 2 * (qwen.qk_norm == "full")
    assert kv_weights_unread(qwen, Strategy(tp=4)) == 0
    w = describe(qwen, s).weight_bytes_per_device
    read = analytic_report(qwen, s, Workload(64, 2048, 256), w, phases=("decode",)).decode_weights_read
    assert read.bytes == w - unread and "K/V projection weights" in read.detail


def _check_one_kv_head(cfg, phases: dict, exact_arguments: bool = True, reductions: tuple = ()):
    """phases: name -> (kv_cache, arguments, weights, tokens, attention matmul FLOPs) per device, tp=8.
    reductions: phases whose figure is all the attention's FLOPs (a GPU decode multiplies its few rows as
    products and sums, `moe_jax.model.layers.in_place_rows`, not matmuls): bounded by what projecting all
    K KV heads would take instead."""
    L, D, Dh, K, b = cfg.num_layers, cfg.d_model, cfg.head_dim, cfg.num_kv_heads, cfg.dtype_bytes
    whole = 2 * L * B * (S + G) * K * Dh * b
    for phase, (kv, arguments, weights, tokens, attention) in phases.items():
        assert kv * K == whole, phase
        if exact_arguments:                                  # what the compiled program really takes
            assert abs(arguments - weights - kv - tokens) <= 64, phase
        tok, T = (B * S, S) if phase == "prefill" else (B, S + G)
        Hl, Kl = cfg.num_heads // 8, 1
        projections = L * (2 * tok * D * (Hl + 2 * Kl) * Dh + 2 * tok * Hl * Dh * D)
        scores = L * 4 * B * Hl * (tok // B) * T * Dh
        if phase in reductions:                              # elementwise FLOPs too: below all K heads' projections
            every_head = L * (2 * tok * D * (Hl + 2 * K) * Dh + 2 * tok * Hl * Dh * D)
            assert projections <= attention < every_head + scores, (phase, attention, projections, every_head)
            continue
        assert projections <= attention <= 1.05 * (projections + scores), (phase, attention, projections, scores)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_compiled_programs_hold_and_project_one_kv_head_per_device(tiny32, backend):
    """Compiled for tp=8 over K=4 KV heads: the KV cache argument of each device is 1/K of the whole
    cache, and the attention's matmuls are those of one query head and one KV head per device (the
    projections, plus the scores where the backend counts them), not of all K heads."""
    from moe_jax.costs.walk import analyze_cost

    kw = {}
    if backend == "gpu":
        require_compiler("gpu")
        kw = {"gpu_target": "h200"}
    report = analyze_cost(tiny32, Strategy(tp=8), Workload(B, S, G), backend=backend, **kw)
    reductions = ("decode",) if backend == "gpu" else ()
    _check_one_kv_head(tiny32, {
        name: (p.memory.kv_cache, p.memory.arguments, p.memory.weights, p.memory.tokens,
               sum((o.flops if name in reductions else o.matmul_flops) * o.count for o in p.ops
                   if o.scope == "attention"))
        for name, p in report.phases.items()}, reductions=reductions)


TPU_SCRIPT = f"""
import json
from moe_jax.config import get_model
from moe_jax.costs.compile import Workload
from moe_jax.costs.walk import analyze_cost
from moe_jax.parallel.mesh import Strategy
from moe_jax.runtime.verify import exact_config
r = analyze_cost(exact_config(get_model("tiny")), Strategy(tp=8), Workload({B}, {S}, {G}), backend="tpu",
                 topology="v5p:2x2x2")
print(json.dumps({{n: (p.memory.kv_cache, p.memory.arguments, p.memory.weights, p.memory.tokens,
                      sum(o.matmul_flops * o.count for o in p.ops if o.scope == "attention"))
                  for n, p in r.phases.items()}}))
"""


def test_tpu_program_holds_and_projects_one_kv_head_per_device(tiny32):
    """The same on the TPU compile (v5p, 8 chips); its argument sizes include the TPU's tile padding, so only
    the cache shard and the FLOPs are compared."""
    import json

    _check_one_kv_head(tiny32, json.loads(run_tpu_script(TPU_SCRIPT)[-1]), exact_arguments=False)


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_checkpoint_with_tp_above_kv_heads_matches_transformers(family, tmp_path):
    """A transformers checkpoint (4 KV heads) loaded for tp=8: the stored [K, Dh, D] weights (and OLMoE's per-head
    K norm [K·Dh]) serve the repeated heads; logits and greedy tokens are transformers'."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from moe_jax.checkpoints.weights import load_params
    from moe_jax.config.hf import from_hf
    from moe_jax.runtime.verify import exact_config

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                  num_experts_per_tok=2, rms_norm_eps=1e-6, max_position_embeddings=128, num_experts=8)
    torch.manual_seed(0)
    model = (transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**common, intermediate_size=32))
             if family == "olmoe" else transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
                 **common, head_dim=16, moe_intermediate_size=32, intermediate_size=64))).float().eval()
    with torch.no_grad():                                # norms at 1.0 would hide a K norm repeated wrongly
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    tokens = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(tokens).logits.numpy()
        generated = model.generate(tokens[:, :6], max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[:, 6:].numpy()
    cfg = exact_config(from_hf(tmp_path))
    assert cfg.num_kv_heads == 4 and cfg.qk_norm == {"olmoe": "full", "qwen3_moe": "head"}[family]
    sm = ShardedModel(cfg, Strategy(tp=8))
    assert sm.layout.kv_copies == 2
    params = load_params(tmp_path, cfg, sm.param_shardings, sm.abstract_params)
    ours = np.asarray(sm.forward(params, sm.put_tokens(jnp.asarray(tokens.numpy()))).logits)
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-4
    np.testing.assert_array_equal(sm.generate(params, jnp.asarray(tokens[:, :6].numpy()), 6), generated)
