"""Property-based checks over random models and meshes, and fuzzing of every parser of user files.

Example counts are CI-sized and the seeds fixed (derandomize), so a failure reproduces.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import single_device_reference  # noqa: E402
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_jax.config import get_model
from moe_jax.costs.compile import Workload
from moe_jax.errors import MoeJaxError
from moe_jax.hardware.presets import get_hardware, hardware_names
from moe_jax.parallel.mesh import Strategy, build_mesh
from moe_jax.planner.search import enumerate_strategies, estimate
from moe_jax.runtime.verify import exact_config

SLOW = settings(max_examples=6, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None)
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def model_and_mesh(draw, devices=(2, 4, 8)):
    H = draw(st.sampled_from([4, 8]))
    cfg = get_model("tiny").replace(
        num_layers=draw(st.sampled_from([2, 4])), d_model=draw(st.sampled_from([32, 64])), num_heads=H,
        num_kv_heads=draw(st.sampled_from([k for k in (1, 2, 4, 8) if H % k == 0])),
        head_dim=draw(st.sampled_from([8, 16])), expert_ffn=draw(st.sampled_from([16, 32])),
        num_experts=draw(st.sampled_from([2, 4, 8])), vocab_size=128,
        qk_norm=draw(st.sampled_from(["none", "head", "full"])), moe_group_size=draw(st.sampled_from([4, 16])),
        router_norm_topk=draw(st.booleans()), num_shared_experts=draw(st.sampled_from([0, 1])), dtype="float32")
    cfg = cfg.replace(top_k=draw(st.integers(1, min(2, cfg.num_experts))))
    cfg = exact_config(cfg)                         # no drops: comparable with one device
    n = draw(st.sampled_from(devices))
    strategy = draw(st.sampled_from(enumerate_strategies(cfg, n, 8)))
    return cfg, strategy


@SLOW
@given(model_and_mesh())
def test_property_sharded_prefill_and_decode_equal_one_device(case):
    from moe_jax.programs.sharded import ShardedModel

    cfg, strategy = case
    state, tokens, ref = single_device_reference(cfg, 8, 7)
    sm = ShardedModel(cfg, strategy, build_mesh(strategy, jax.devices()[:strategy.num_devices]))
    params = sm.shard_params(state)
    out = sm.prefill(params, sm.put_tokens(tokens[:, :6]), sm.init_cache(8, 7))
    np.testing.assert_allclose(np.asarray(out.logits), ref[:, 5:6], atol=2e-5, rtol=2e-5)   # the last position
    step = sm.decode(params, sm.put_tokens(tokens[:, 6:7]), jnp.int32(6), out.cache)
    np.testing.assert_allclose(np.asarray(step.logits)[:, 0], ref[:, 6], atol=2e-5, rtol=2e-5)


@settings(max_examples=4, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(model_and_mesh(devices=(8,)))
def test_property_cost_report_adds_up_and_matches_placement(case):
    from moe_jax.costs.walk import analyze_cost
    from moe_jax.programs.placement import describe

    cfg, strategy = case
    report = analyze_cost(cfg, strategy, Workload(8, 8, 4))
    placement = describe(cfg, strategy, batch=8, cache_len=12)
    for phase in report.phases.values():
        m = phase.memory
        assert m.arguments == m.weights + m.kv_cache + m.tokens
        assert m.peak == m.arguments + m.outputs + m.temporaries - m.aliased
        assert m.weights == placement.weight_bytes_per_device
        assert m.kv_cache == placement.kv_cache_bytes_per_device
        assert phase.flops >= phase.matmul_flops > 0


@FAST
@given(model_and_mesh(devices=(1, 2, 4, 8, 16, 64)), st.sampled_from(hardware_names()),
       st.integers(1, 64), st.integers(1, 512), st.integers(2, 64))
def test_property_every_prediction_is_at_or_above_its_floor(case, hw_name, batch_mult, prompt, gen):
    from moe_jax.costs.analytic import analytic_flops, estimate_phase
    from moe_jax.costs.types import AnalyticReport, CostReport
    from moe_jax.perf.timemodel import predict
    from moe_jax.programs.placement import describe

    cfg, strategy = case
    cfg = cfg.replace(dtype="bfloat16")
    hw = get_hardware(hw_name)
    work = Workload(8 * batch_mult, prompt, gen)
    p = describe(cfg, strategy, batch=work.batch, cache_len=work.cache_len)
    phases = {ph: estimate_phase(cfg, strategy, work, ph, p.weight_bytes_per_device, p.kv_cache_bytes_per_device)
              for ph in ("prefill", "decode")}
    report = CostReport(cfg.name, strategy.name, strategy.name, work.to_dict(), "analytic", "estimate",
                        strategy.num_devices, phases, [],
                        AnalyticReport({ph: analytic_flops(cfg, work, ph) for ph in phases}))
    pred = predict(report, hw, work.batch, work.gen_len)
    floor = (p.weight_bytes_per_device + p.kv_cache_bytes_per_device) / hw.hbm_bandwidth
    assert pred.tpot_s >= floor * (1 - 1e-12) and pred.tpot_s >= pred.decode.floor_s
    assert pred.ttft_s >= pred.prefill.floor_s > 0
    assert 0 < pred.mbu <= 1 + 1e-9 and 0 < pred.mfu <= 1 + 1e-9
    assert math.isclose(pred.throughput_tok_s, work.batch / pred.tpot_s)
    assert estimate(cfg, strategy, hw, work).tpot_s == pytest.approx(pred.tpot_s)


# --- fuzzing the parsers of user files ----------------------------------------------------

VALID = {
    "strategy": b"[strategy]\ndescription = 'x'\nep = 8\ntp = 2\npp = 1\ndp = 4\n",
    "hardware": (b"name = 'g'\nmemory_bytes = 80e9\npeak_flops = 1e15\nhbm_bandwidth = 3e12\ndevices_per_node = 8\n"
                 b"[node_link]\nbandwidth = 4e11\nlatency_s = 1e-6\n[network_link]\nbandwidth = 5e10\n"
                 b"latency_s = 5e-6\n"),
    "hf": json.dumps({"model_type": "mixtral", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 8,
                      "num_key_value_heads": 4, "vocab_size": 256, "num_experts_per_tok": 2, "num_local_experts": 8,
                      "intermediate_size": 32, "rope_theta": 1e4}).encode(),
    "prompt": json.dumps({"prompt": [[1, 2, 3], [4, 5, 6]]}).encode(),
}


def _parse(kind, path):
    from moe_jax.config.hf import from_hf
    from moe_jax.runtime.run import read_prompt_file

    return {"strategy": lambda: Strategy.load(path), "hardware": lambda: get_hardware(path),
            "hf": lambda: from_hf(path), "prompt": lambda: read_prompt_file(path)}[kind]()


@st.composite
def mutated(draw, kind):
    data = bytearray(VALID[kind])
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "delete":
            del data[i]
        elif op == "insert":
            data[i:i] = draw(st.sampled_from([b"-", b"0", b"\"", b"[", b"]", b"=", b"1e999", b"\xff", b"null", b"\n"]))
        else:
            data = data[:i]
    return bytes(data)


@pytest.mark.parametrize("kind", sorted(VALID))
def test_fuzz_valid_files_parse(tmp_path, kind):
    path = tmp_path / ("f.toml" if kind in ("strategy", "hardware") else "config.json")
    path.write_bytes(VALID[kind])
    assert _parse(kind, str(path)) is not None


@pytest.mark.parametrize("kind", sorted(VALID))
@FUZZ
@given(data=st.data())
def test_fuzz_parsers_raise_only_clear_errors(tmp_path, kind, data):
    content = data.draw(st.one_of(mutated(kind), st.binary(max_size=200)))
    path = tmp_path / ("f.toml" if kind in ("strategy", "hardware") else "config.json")
    path.write_bytes(content)
    try:
        _parse(kind, str(path))
    except MoeJaxError as e:
        assert str(e)                                       # a message, never an empty error
    assert path.read_bytes() == content                    # the user's file is never touched


@FUZZ
@given(st.text(max_size=40))
def test_fuzz_strategy_names(text):
    try:
        Strategy.parse(text)
    except MoeJaxError:
        pass


@pytest.mark.parametrize("field,value", [("num_attention_heads", 0), ("hidden_size", "x"), ("num_hidden_layers", -1),
                                         ("rope_theta", None), ("rope_theta", "abc"), ("rope_parameters", 5),
                                         ("num_attention_heads", 2.5), ("vocab_size", [1]), ("num_local_experts", {})])
def test_hostile_hf_config_values_are_clear_errors(tmp_path, field, value):
    """Found by fuzzing: a zero head count divided by zero, a non-object rope_parameters crashed."""
    from moe_jax.config.hf import from_hf

    config = json.loads(VALID["hf"])
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoeJaxError) as e:
        from_hf(tmp_path)
    assert str(e.value)


@pytest.mark.parametrize("preset,field,value,message", [
    ("llama4-tiny", "num_hidden_layers", 10**9, "num_hidden_layers=1000000000 exceeds moe-jax's limit of 65536"),
    ("llama4-tiny", "num_hidden_layers", 10**28, "exceeds moe-jax's limit of 65536"),
    ("gpt-oss-tiny", "num_hidden_layers", 10**9, "exceeds moe-jax's limit of 65536"),
    ("glm-4.5-tiny", "partial_rotary_factor", 1e308, "wrong type or value"),
    ("deepseek-v3-tiny", "kv_lora_rank", 2**40, "kv_lora_rank=1099511627776 exceeds moe-jax's limit of 16777216"),
    ("deepseek-v3-tiny", "hidden_size", 2**40, "d_model=1099511627776 exceeds"),
])
def test_huge_family_config_values_are_refused_at_once(tmp_path, preset, field, value, message):
    """Found by the soak's field-level fuzz: a 10^9-layer Llama 4 config built per-layer lists until memory ran
    out, a 10^28-layer one and an overflowing rotary factor raised OverflowError. Sizes now have a limit."""
    from moe_jax.config import get_model
    from moe_jax.config.hf import from_hf, to_hf_dict

    config = to_hf_dict(get_model(preset))
    if field == "partial_rotary_factor":
        config["rope_parameters"][field] = value
    else:
        config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoeJaxError, match=message.replace("(", r"\(")):
        from_hf(tmp_path)


@pytest.mark.parametrize("argv,message", [
    (["plan", "--devices", str(10**12)], "must be between 1 and 1,048,576"),
    (["describe", "--strategy", "EP" + "9" * 14], "at most 16,777,216 are supported"),
    (["analyze", "--model", "tiny", "--mesh", "EP8", "--batch", str(10**12)], "exceeds the supported 1,048,576"),
    (["analyze", "--model", "tiny", "--mesh", "EP8", "--gen-len", "many"], "'many' is not a valid integer"),
    (["describe", "--strategy", "EP" + "1" * 400], "at most 16,777,216"),
])
def test_absurd_sizes_are_refused_quickly(capsys, argv, message):
    """Found: divisors() of 10^12 looped 10^12 times; absurd sizes now stop at a named limit."""
    from moe_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_derived_outputs_never_overwrite_a_users_file(tmp_path, capsys):
    from moe_jax.cli import main

    mine = tmp_path / "report.memory.png"
    mine.write_bytes(b"my own picture")
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--model", "tiny", "--mesh", "EP8", "--markdown", str(tmp_path / "report.md")])
    assert e.value.code == 2 and "was not written by moe-jax" in capsys.readouterr().err
    assert mine.read_bytes() == b"my own picture" and not (tmp_path / "report.md").exists()
    mine.unlink()
    with pytest.raises(SystemExit) as e:                     # moe-jax's own outputs may be rewritten
        for _ in range(2):
            try:
                main(["analyze", "--model", "tiny", "--mesh", "EP8", "--batch", "8", "--prompt-len", "8",
                      "--gen-len", "4", "--markdown", str(tmp_path / "report.md")])
            except SystemExit as done:
                assert done.code == 0
        raise SystemExit(0)
    assert e.value.code == 0 and (tmp_path / "report.md").read_text().startswith("<!-- written by moe-jax -->")
    assert list(tmp_path.glob(".*tmp")) == []                # no temporary file left behind


@pytest.mark.parametrize("argv,message", [
    (["analyze", "--json", "{d}/r.md", "--markdown", "{d}/r.md"], "--markdown and --json both write"),
    (["analyze", "--json", "{d}/r.memory.png", "--markdown", "{d}/r.md"], "the memory chart and --json both write"),
    (["plan", "--devices", "8", "--json", "{d}/p.pareto.png", "--markdown", "{d}/p.md"],
     "the derived .pareto.png and --json both write"),
])
def test_two_outputs_on_one_file_are_refused_before_the_work(tmp_path, capsys, argv, message):
    from moe_jax.cli import main

    argv = [a.format(d=tmp_path) for a in argv] + ["--model", "tiny"] + (["--mesh", "EP8"] if argv[0] == "analyze"
                                                                         else ["--hardware", "h100"])
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []                    # nothing written


def test_a_linked_chart_path_is_refused_not_followed(tmp_path, capsys):
    from moe_jax.cli import main

    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "precious.png"
    target.write_bytes(b"keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.memory.png").symlink_to(target)
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--model", "tiny", "--mesh", "EP8", "--markdown", str(out / "report.md")])
    assert e.value.code == 2 and "not a regular file" in capsys.readouterr().err
    assert target.read_bytes() == b"keep me" and not (out / "report.md").exists()


@pytest.mark.parametrize("index", ['{"weight_map": ["a", "b"]}', '{"weight_map": {"x": 3}}', '{"nope": {}}', '[1'])
def test_malformed_checkpoint_index_is_a_clear_error(tmp_path, index):
    from moe_jax.checkpoints.weights import Checkpoint

    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(MoeJaxError, match="is not a valid safetensors index"):
        Checkpoint(tmp_path)
