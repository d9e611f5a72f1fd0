"""What each device holds: the seed scenario stated exactly (docs/seed-errors.md #2, #6, #8)."""

import pytest

from moe_jax.config import get_model
from moe_jax.errors import StrategyError
from moe_jax.parallel.mesh import Strategy
from moe_jax.programs.placement import describe

SEED = get_model("seed-30b")


@pytest.fixture(scope="module")
def seed_placement():
    return describe(SEED, Strategy.parse("EP64-TP8-PP2-DP1"), batch=128, cache_len=2048 + 256, prompt_len=2048)


def test_seed_shard_is_a_slice_of_one_expert_not_one_expert(seed_placement):
    f = seed_placement.facts()
    assert f["experts_per_device_per_layer"] == 1
    assert f["expert_ffn_columns_per_device"] == 288            # 2304 / tp8: 1/8 of one expert
    assert f["layers_per_stage"] == 8
    assert f["query_heads_per_device"] == 4 and f["kv_heads_per_device"] == 1
    assert f["vocab_rows_per_device"] == 2000                   # 32000 / (pp2 x tp8)
    w = {p.path: p for p in seed_placement.params}["blocks/moe/w_gate_up_epfd"]
    assert w.local_shape == (8, 1, 2, 288, 4096)               # [L, E, gate/up, F, D]: contracted D minor


def test_seed_sequences_per_replica_and_device(seed_placement):
    f = seed_placement.facts()
    assert f["sequences_per_replica"] == 128                    # DP1: the whole batch
    assert f["sequences_per_device"] == 2                       # attention splits the batch over ep=64


def test_seed_weights_per_device_exceed_the_naive_division(seed_placement):
    naive = SEED.params_total * 2 / 1024                        # the seed's "0.07 GB"
    per_device = seed_placement.weight_bytes_per_device
    assert per_device > 3 * naive                               # replicated attention/router/embeddings
    # recompute independently: attention + norms + router replicated over ep, split by tp, per stage
    L = 8
    attn = L * (4096 * 32 * 128 * 2 + 4096 * 8 * 128 * 2) // 8 * 2
    router_norms = L * (4096 * 64 + 2 * 4096) * 2
    experts = L * 3 * 4096 * 288 * 2
    embed_head = 2 * 32000 * 4096 // 16 * 2 + 4096 * 2                # vocab split over pp x tp
    assert per_device == attn + router_norms + experts + embed_head


def test_seed_kv_cache_per_device(seed_placement):
    # [L/pp, B/(dp*ep), K/tp, T, Dh] for k (v: [.., Dh, T]), bf16
    assert seed_placement.kv_cache_shape_per_device == (8, 2, 1, 2304, 128)
    assert seed_placement.kv_cache_bytes_per_device == 2 * 8 * 2 * 2304 * 128 * 2


def test_single_device_holds_the_whole_model():
    p = describe(get_model("tiny"), Strategy(), batch=4, cache_len=8)
    assert p.weight_bytes_per_device == p.weight_bytes_total


def test_replicated_kv_heads_are_stated():
    p = describe(get_model("qwen3-30b-a3b"), Strategy(ep=16, tp=8), batch=64, cache_len=1024)
    f = p.facts()
    # tp=8 > 4 KV heads: each head is held by the 2 tp ranks that read it, one head per rank (not all 4)
    assert f["kv_heads_replicated_over_tp"] and f["kv_heads_per_device"] == 1 and f["kv_head_copies"] == 2


def test_describe_validates(seed_placement):
    with pytest.raises(StrategyError, match="dp=3 does not divide batch 128"):
        describe(SEED, Strategy(ep=64, tp=8, dp=3), batch=128)


def test_seed_pipeline_schedule(seed_placement):
    pre = seed_placement.facts()["pipeline_prefill"]
    # 2 sequences per dp x ep shard: at most 2 microbatches keep them local
    assert pre["microbatches"] == 2 and pre["ticks"] == 3
    assert pre["bubble_fraction"] == pytest.approx(1 / 3)
    assert pre["handoff_bytes_per_tick"] == 1 * 2048 * 4096 * 2     # one sequence's activations, bf16


def test_kv_cache_bytes_count_every_cache_array():
    """MLA's two arrays differ in width (the latent and the RoPE key) and DeepSeek's dense first layers
    have their own: the bytes are the cache's, not two of the keys' array."""
    for name in ("deepseek-v3-tiny", "qwen3-30b-a3b"):
        cfg = get_model(name)
        whole = describe(cfg, Strategy(), batch=4, cache_len=96).kv_cache_bytes_per_device
        assert whole == 4 * 96 * cfg.kv_bytes_per_token, name
