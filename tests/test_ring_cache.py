"""Sliding-window and chunked layers keep a ring of R positions (`moe_jax.model.kv_cache`), not the whole context:
the shapes, the bytes every report counts, and decode through many wraps of the ring against a full forward."""

import math

import jax
import pytest

from moe_jax.config import get_model
from moe_jax.model.transformer import cache_shape
from moe_jax.parallel.mesh import Strategy
from moe_jax.programs.placement import describe
from moe_jax.runtime.verify import exact_config, verify_sharding


def _bytes(shapes: dict) -> int:
    return sum(math.prod(s.shape) * s.dtype.itemsize for s in shapes.values())


def test_sliding_layers_keep_a_ring_of_the_window():
    cfg = get_model("gpt-oss-tiny")                       # window 8; layers sliding, full, sliding, full
    shapes = cache_shape(cfg, batch=3, max_len=40)
    K, Dh = cfg.num_kv_heads, cfg.head_dim
    assert shapes["k"].shape == (2, 3, K, 40, Dh) and shapes["v"].shape == (2, 3, K, Dh, 40)
    assert shapes["local_k"].shape == (2, 3, K, 8, Dh) and shapes["local_v"].shape == (2, 3, K, Dh, 8)
    assert _bytes(shapes) == 3 * cfg.kv_bytes(40) < 3 * 40 * cfg.kv_bytes_per_token
    short = cache_shape(cfg, batch=3, max_len=5)          # a context shorter than the window: the ring is all of it
    assert short["local_k"].shape[-2] == 5 and _bytes(short) == 3 * 5 * cfg.kv_bytes_per_token


def test_chunked_layers_keep_a_ring_of_the_chunk():
    cfg = get_model("llama4-tiny")                        # chunks of 8 on 3 of 4 layers; the 4th full
    shapes = cache_shape(cfg, batch=2, max_len=64)
    assert shapes["local_k"].shape[0] == 3 and shapes["local_k"].shape[-2] == 8
    assert shapes["k"].shape[0] == 1 and shapes["k"].shape[-2] == 64
    assert _bytes(shapes) == 2 * cfg.kv_bytes(64)


def test_every_layer_sliding_has_only_rings():
    cfg = get_model("gpt-oss-tiny").replace(layer_types=("sliding_attention",) * 4)
    shapes = cache_shape(cfg, batch=1, max_len=100)
    assert set(shapes) == {"local_k", "local_v"} and shapes["local_k"].shape[0] == 4


def test_a_pipeline_whose_stages_differ_keeps_the_full_length():
    """PP2 over (sliding, full, full, sliding): the stages' patterns differ, so windows are scanned data and every
    layer keeps all T positions (and the bytes counted say so)."""
    cfg = get_model("gpt-oss-tiny").replace(layer_types=("sliding_attention", "full_attention", "full_attention",
                                                          "sliding_attention"))
    assert cfg.local_cache_len(64, stages=2) == 0 and cfg.local_cache_len(64, stages=1) == 8
    assert set(cache_shape(cfg, 2, 64, stages=2)) == {"k", "v"}
    assert cfg.kv_bytes(64, stages=2) == 64 * cfg.kv_bytes_per_token
    uniform = get_model("gpt-oss-tiny")                   # (sliding, full) on each stage: rings
    assert uniform.local_cache_len(64, stages=2) == 8


def test_mla_has_no_ring():
    cfg = get_model("deepseek-v3-tiny")
    assert cfg.local_cache_len(64) == 0 and "local_k" not in cache_shape(cfg, 1, 64)


def test_placement_counts_the_rings():
    """gpt-oss-120b at 128k positions: its 18 sliding layers hold 128 positions each, so the cache a device holds
    is the 18 full layers' (about half of a full-length cache)."""
    cfg = get_model("gpt-oss-120b")
    p = describe(cfg, Strategy.parse("TP8"), batch=8, cache_len=131072)
    per_layer_token = cfg.kv_bytes_per_token // cfg.num_layers
    full_only = 8 * per_layer_token * (18 * 131072 + 18 * 128) // 8          # heads split over tp = 8
    assert p.kv_cache_bytes_per_device == full_only
    assert p.kv_cache_bytes_per_device < 0.51 * 8 * 131072 * cfg.kv_bytes_per_token / 8


def test_placement_table_explains_both_kinds_of_array():
    from rich.console import Console

    from moe_jax.reporting.tables import print_placement

    out = Console(record=True, width=400)
    print_placement(out, describe(get_model("gpt-oss-120b"), Strategy.parse("TP8"), batch=8, cache_len=4096), 4000, 96)
    text = out.export_text()
    assert "2 x 18 x 8 x 1 x 4096 x 64 x 2 B [Lf, B, K, T, Dh] (full layers)" in text
    assert "2 x 18 x 8 x 1 x 128 x 64 x 2 B [Ll, B, K, R, Dh]" in text


@pytest.mark.parametrize("name,mesh,prompt,gen", [
    ("gpt-oss-tiny", "EP2-TP2-PP2", 13, 12),              # the prompt past the window, decode wrapping it 1.5 times
    ("gpt-oss-tiny", "DP8", 3, 14),                       # the ring filling during decode, then wrapping
    ("llama4-tiny", "EP2-TP4", 5, 14),                    # decode crossing two chunk boundaries (8 and 16)
    ("llama4-maverick-tiny", "EP4-DP2", 9, 10),           # interleaved dense sub-layers with their own rings
])
def test_decode_through_the_ring_equals_the_full_forward(name, mesh, prompt, gen):
    assert len(jax.devices()) == 8
    cfg = exact_config(get_model(name))
    v = verify_sharding(cfg, Strategy.parse(mesh), batch=8, prompt_len=prompt, gen_len=gen)
    assert v.passed, v
