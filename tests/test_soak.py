"""A small fixed-seed slice of the soak (bench/soak.py): sharded against one device, fuzzed parsers."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import soak  # noqa: E402


def test_soak_slice_sharded():
    result = soak.sharded(examples=3, seed=7)
    assert result["examples"] == 3 and result["failures"] == [], result["failures"]


def test_soak_slice_fuzz():
    result = soak.fuzz(inputs=700, seed=7)
    assert result["inputs"] == 700 and len(result["by_parser"]) == 7
    assert result["failures"] == [], result["failures"][:5]


def test_soak_draws_only_valid_meshes():
    import random

    from moe_jax.parallel.mesh import validate

    rng = random.Random(1)
    families = set()
    for _ in range(100):
        drawn = soak.random_example(rng)
        if drawn is not None:
            cfg, strategy, batch, *_ = drawn
            validate(strategy, cfg, batch=batch)
            assert cfg.capacity_factor == cfg.num_experts / cfg.top_k and cfg.dtype == "float32"
            families.add(cfg.name)
    assert families == set(soak.FAMILIES)            # every family's features are soaked, not only the base


def test_soak_fuzz_seeds_every_family_config():
    from moe_jax.config.hf import from_hf_dict

    configs = soak.hf_configs()
    assert {c["model_type"] for c in configs} == {"qwen3_moe", "deepseek_v3", "glm4_moe", "gpt_oss", "llama4_text"}
    for c in configs:                                # the seeds are valid: mutations start from a working config
        from_hf_dict(c)
