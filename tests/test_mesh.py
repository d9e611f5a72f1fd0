from pathlib import Path

import jax
import pytest

from moe_jax.config import get_model
from moe_jax.errors import ShardingError, StrategyError
from moe_jax.parallel.mesh import MESH_AXES, Strategy, build_mesh, divisors, validate
from moe_jax.parallel.rules import LOGICAL_AXIS_RULES, Layout, axis_rules

MESHES = Path(__file__).resolve().parent.parent / "meshes"


@pytest.mark.parametrize("text", ["EP64-TP8-PP2-DP1", "ep64-tp8-pp2-dp1", "tp8_pp2_ep64", "DP1 PP2 TP8 EP64",
                                  "Tp8,Ep64,pP2"])
def test_parse_any_order_and_case(text):
    assert Strategy.parse(text) == Strategy(ep=64, tp=8, pp=2, dp=1)


def test_name_and_mesh_order():
    s = Strategy.parse("EP64-TP8-PP2-DP1")
    assert s.name == "EP64-TP8-PP2-DP1" and s.num_devices == 1024
    assert tuple(s.mesh_shape) == MESH_AXES == ("dp", "pp", "ep", "tp")


@pytest.mark.parametrize("text,message", [
    ("", "empty strategy"),
    ("EP64-XX8", "cannot parse 'xx8'"),
    ("EP64-TP", "cannot parse 'tp'"),
    ("EP4-EP8", "axis ep given twice"),
    ("EP0-TP8", "ep0 in strategy 'EP0-TP8': sizes must be >= 1"),
])
def test_parse_errors(text, message):
    with pytest.raises(StrategyError, match=message):
        Strategy.parse(text)


def test_shipped_strategy_files_load():
    files = sorted(MESHES.glob("*.toml"))
    assert any(f.name == "ep64-tp8-pp2-dp1.toml" for f in files)
    for f in files:
        s = Strategy.load(f)
        assert f.stem == s.name.lower()


@pytest.mark.parametrize("text,message", [
    ("[strategy]\nep = 4\nexpert = 2\n", "unknown key 'expert'; valid keys: ep, tp, pp, dp"),
    ("[strategy]\nep = 4\ndescripton = 'x'\n", "unknown key 'descripton'.*did you mean 'description'"),
    ("[strategy]\nep = -4\n", "ep=-4 must be a positive integer"),
    ("[strategy]\nep = \"four\"\n", "ep='four' must be a positive integer"),
    ("[strategy\nep = 4\n", "not valid TOML"),
    ("ep = 4\n[strategy]\ntp = 2\n", "unknown top-level key 'ep'"),
])
def test_toml_errors(tmp_path, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(StrategyError, match=message):
        Strategy.load(f)
    assert f.read_text() == text  # the user's file is untouched


def test_missing_toml_is_named():
    with pytest.raises(StrategyError, match="cannot read strategy file 'nope/missing.toml'"):
        Strategy.load("nope/missing.toml")


SEED = get_model("seed-30b")


@pytest.mark.parametrize("strategy,message", [
    ("EP3-TP8", "ep=3 does not divide 64 experts; valid ep: 1, 2, 4, 8, 16, 32, 64"),
    ("EP64-TP3", "tp=3 does not divide 32 query heads and vocabulary 32000; valid tp: 1, 2, 4, 8, 16"),
    ("EP64-TP64", "tp=64 does not divide 32 query heads; valid tp: 1, 2, 4, 8, 16"),
    ("EP64-PP3", "pp=3 does not divide 16 layers; valid pp: 1, 2, 4, 8, 16"),
    ("EP64-PP32", "pp=32 is more stages than the 16 layers; valid pp: 1, 2, 4, 8, 16"),
])
def test_validation_names_value_and_valid_choices(strategy, message):
    with pytest.raises(StrategyError, match=message):
        validate(Strategy.parse(strategy), SEED)


def test_validation_batch_and_devices_and_all_problems_at_once():
    with pytest.raises(StrategyError) as e:
        validate(Strategy.parse("EP3-DP3"), SEED, batch=128, num_devices=8)
    text = str(e.value)
    assert "ep=3 does not divide 64 experts" in text
    assert "dp=3 does not divide batch 128; valid dp: 1, 2, 4, 8, 16, 32, 64, 128" in text
    assert "uses ep·tp·pp·dp = 9 devices, but 8 were given" in text


def test_kv_replication_rule():
    qwen = get_model("qwen3-30b-a3b")                # 4 KV heads
    validate(Strategy(tp=8), qwen)                   # tp=8 > K=4: allowed, KV replicated
    assert axis_rules(qwen, Strategy(tp=8))["kv_heads"] == ()
    assert axis_rules(qwen, Strategy(tp=4))["kv_heads"] == ("tp",)
    tiny = get_model("tiny").replace(num_kv_heads=4, num_heads=12, expert_ffn=48, vocab_size=240)
    with pytest.raises(StrategyError, match=r"tp=6 does not divide 4 KV heads \(neither divides the other\)"):
        validate(Strategy(tp=6), tiny)


def test_divisors():
    assert divisors(12) == [1, 2, 3, 4, 6, 12]


def test_build_mesh_axes_and_device_count():
    mesh = build_mesh(Strategy(ep=2, tp=2, dp=2))
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"dp": 2, "pp": 1, "ep": 2, "tp": 2}
    # tp innermost: tp neighbours are consecutive devices
    assert [d.id for d in mesh.devices[0, 0, 0, :]] == [0, 1]
    with pytest.raises(StrategyError, match="EP4-TP4-PP1-DP1 needs 16 devices, but 8 are available"):
        build_mesh(Strategy(ep=4, tp=4))
    assert jax.device_count() == 8


def test_rules_table_maps_only_to_mesh_axes():
    for name, axes in LOGICAL_AXIS_RULES.items():
        assert set(axes) <= set(MESH_AXES), name


def test_unmapped_logical_name_is_an_error_naming_the_parameter():
    import jax.numpy as jnp
    from flax import nnx

    class Bad(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((4, 4)), axes=("embed", "hiddden"))

    layout = Layout.for_strategy(get_model("tiny"), Strategy(tp=2))
    with pytest.raises(ShardingError, match="parameter w: logical axis 'hiddden' has no sharding rule"):
        layout.param_specs(nnx.state(Bad()))


def test_parameter_that_cannot_be_split_is_an_error():
    layout = Layout.for_strategy(get_model("tiny"), Strategy(tp=8))
    with pytest.raises(ShardingError, match=r"parameter x: dimension 0 \(heads\) of size 4 cannot be split 8 ways"):
        layout.spec(("heads",), (4,), what="parameter x")


def test_activation_batch_falls_back_when_it_does_not_divide():
    layout = Layout.for_strategy(get_model("tiny"), Strategy(ep=4, dp=2))
    assert layout.shards("batch", 16) == 8          # dp x ep
    assert layout.shards("batch", 2) == 2           # only dp divides
    assert layout.shards("batch", 1) == 1
