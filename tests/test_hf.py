"""Real checkpoints: tiny random transformers models, saved, loaded sharded, logit for logit."""

import json

import chex
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_jax.checkpoints.weights import load_params, save_params  # noqa: E402
from moe_jax.cli import main  # noqa: E402
from moe_jax.config import get_model  # noqa: E402
from moe_jax.config.hf import from_hf  # noqa: E402
from moe_jax.errors import ConfigError, MoeJaxError  # noqa: E402
from moe_jax.parallel.mesh import Strategy  # noqa: E402
from moe_jax.programs.sharded import ShardedModel  # noqa: E402
from moe_jax.runtime.verify import exact_config  # noqa: E402

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
              num_experts_per_tok=2, rms_norm_eps=1e-6, max_position_embeddings=128)
FAMILIES = {
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **COMMON, head_dim=16, num_experts=8, moe_intermediate_size=32, intermediate_size=64, norm_topk_prob=True)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **COMMON, num_local_experts=8, intermediate_size=32)),
    "olmoe": lambda: transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        **COMMON, num_experts=8, intermediate_size=32, norm_topk_prob=False)),
}
MESHES = ["EP2-TP2-DP2", "EP2-TP2-PP2", "EP4-PP2"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    model = FAMILIES[request.param]().float().eval()
    with torch.no_grad():                           # norms at 1.0 would hide a misplaced norm weight
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)
    tokens = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens).logits.numpy()
        generated = model.generate(tokens[:, :6], max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[:, 6:].numpy()
    cfg = from_hf(d)
    # capacity for every token: capacity dispatch then equals transformers' dropless experts
    cfg = exact_config(cfg)                          # the checkpoints are f32 already
    return request.param, d, cfg, tokens.numpy(), logits, generated


def test_config_import(checkpoint):
    family, d, cfg, *_ = checkpoint
    assert cfg.family == family and cfg.num_layers == 4 and cfg.num_experts == 8 and cfg.dtype == "float32"
    assert cfg.qk_norm == {"qwen3_moe": "head", "mixtral": "none", "olmoe": "full"}[family]
    assert cfg.router_norm_topk == (family != "olmoe")
    assert get_model(str(d)).family == family                    # --model takes a checkpoint directory


@pytest.mark.parametrize("mesh", MESHES)
def test_logits_match_transformers(checkpoint, mesh):
    _, d, cfg, tokens, ref, _ = checkpoint
    sm = ShardedModel(cfg, Strategy.parse(mesh))
    params = load_params(d, cfg, sm.param_shardings, sm.abstract_params)
    w = params["blocks"]["moe"]["w_gate_up_epfd"][...]
    assert w.sharding == sm.param_shardings["blocks"]["moe"]["w_gate_up_epfd"]
    ours = np.asarray(sm.forward(params, sm.put_tokens(jnp.asarray(tokens))).logits)
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-4


def test_greedy_generation_matches_transformers(checkpoint):
    _, d, cfg, tokens, _, generated = checkpoint
    sm = ShardedModel(cfg, Strategy.parse("EP2-TP2-PP2"))
    params = load_params(d, cfg, sm.param_shardings, sm.abstract_params)
    ours = sm.generate(params, jnp.asarray(tokens[:, :6]), 16)
    np.testing.assert_array_equal(ours, generated)


def test_round_trip(checkpoint, tmp_path):
    _, d, cfg, *_ = checkpoint
    sm = ShardedModel(cfg, Strategy.parse("EP2-TP2-DP2"))
    first = load_params(d, cfg, sm.param_shardings, sm.abstract_params)
    save_params(first, cfg, tmp_path / "again")
    assert from_hf(tmp_path / "again").replace(name=cfg.name, capacity_factor=cfg.capacity_factor) == cfg
    second = load_params(tmp_path / "again", cfg, sm.param_shardings, sm.abstract_params)
    chex.assert_trees_all_equal(first, second, strict=True)


def test_bf16_round_trip_is_bit_identical(checkpoint, tmp_path):
    """Released checkpoints are bf16: a bf16 model is saved as BF16 tensors (no up-cast), loads back bit for bit,
    and transformers reads the same bits."""
    from safetensors import safe_open

    _, d, cfg, *_ = checkpoint
    cfg = cfg.replace(dtype="bfloat16")
    sm = ShardedModel(cfg, Strategy.parse("EP2-TP2-PP2"))
    first = load_params(d, cfg, sm.param_shardings, sm.abstract_params)        # the f32 file, rounded to bf16
    chex.assert_trees_all_equal_dtypes(first, sm.abstract_params)
    save_params(first, cfg, tmp_path / "bf16")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="numpy") as f:
        stored = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    assert stored and set(stored.values()) == {"BF16"}, stored
    assert from_hf(tmp_path / "bf16").dtype == "bfloat16"
    second = load_params(tmp_path / "bf16", cfg, sm.param_shardings, sm.abstract_params)
    chex.assert_trees_all_equal_dtypes(first, second)
    chex.assert_trees_all_equal(first, second, strict=True)                   # bf16 == bf16: every bit
    # transformers fuses the experts in memory (its names differ from the file's), so it writes back what it read
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.save_pretrained(tmp_path / "theirs")
    assert from_hf(tmp_path / "theirs").replace(name=cfg.name, capacity_factor=cfg.capacity_factor) == cfg
    chex.assert_trees_all_equal(second, load_params(tmp_path / "theirs", cfg, sm.param_shardings, sm.abstract_params),
                                strict=True)


def _copy_with(src, dst, edit):
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_checkpoint_errors(checkpoint, tmp_path):
    _, d, cfg, *_ = checkpoint
    sm = ShardedModel(cfg, Strategy(dp=8))

    def load(path):
        return load_params(path, cfg, sm.param_shardings, sm.abstract_params)

    missing = _copy_with(d, tmp_path / "missing", lambda t: t.pop("model.layers.2.self_attn.q_proj.weight"))
    with pytest.raises(MoeJaxError, match="missing 1 tensor.*model.layers.2.self_attn.q_proj.weight"):
        load(missing)
    bad = _copy_with(d, tmp_path / "shape", lambda t: t.__setitem__("model.norm.weight", np.ones(63, np.float32)))
    with pytest.raises(MoeJaxError, match=r"tensor 'model.norm.weight' has shape \(63,\), expected \(64,\)"):
        load(bad)
    ints = _copy_with(d, tmp_path / "ints", lambda t: t.__setitem__("model.norm.weight", np.ones(64, np.int32)))
    with pytest.raises(MoeJaxError, match="tensor 'model.norm.weight' is stored as I32.*must be floating point"):
        load(ints)
    extra = _copy_with(d, tmp_path / "extra", lambda t: t.__setitem__("model.bias", np.ones(3, np.float32)))
    with pytest.raises(MoeJaxError, match="does not use, first 'model.bias'"):
        load(extra)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    blob = (d / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    (truncated / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(MoeJaxError, match="cannot read .*model.safetensors"):
        load(truncated)
    with pytest.raises(MoeJaxError, match="no model.safetensors"):
        load(tmp_path)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "jamba"}, "model_type 'jamba' is not supported; supported: qwen3_moe, mixtral, olmoe, "
                              "deepseek_v3"),
    ({"model_type": "mixtral", "sliding_window": 4096}, "sliding_window=4096 is not supported"),
    ({"model_type": "qwen3_moe", "use_sliding_window": True}, "use_sliding_window=True is not supported"),
    ({"model_type": "qwen3_moe", "mlp_only_layers": [0]}, "mlp_only_layers=[0] is not supported"),
    ({"model_type": "olmoe", "rope_scaling": {"rope_type": "yarn", "factor": 4}}, "rope type 'yarn'"),
    ({"model_type": "mixtral", "hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
])
def test_unsupported_config_fields_are_named(tmp_path, change, message):
    base = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "vocab_size": 256,
            "num_experts_per_tok": 2, "num_experts": 8, "num_local_experts": 8, "intermediate_size": 32,
            "moe_intermediate_size": 32, "rope_theta": 1e4}
    (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        from_hf(tmp_path)


def test_cli_takes_a_checkpoint_directory(checkpoint, capsys):
    _, d, *_ = checkpoint
    main(["describe", "--model", str(d), "--strategy", "EP2-TP2-PP2", "--batch", "4", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["strategy"]["devices"] == 8 and data["facts"]["layers_per_stage"] == 2
    with pytest.raises(SystemExit) as e:
        main(["describe", "--model", str(d / "nope.json")])
    assert e.value.code == 2 and "cannot read" in capsys.readouterr().err


def test_prefill_logits_match_transformers(checkpoint):
    """The serving prefill's last-position logits and a full-logits prefill, against transformers."""
    _, d, cfg, tokens, ref, _ = checkpoint
    sm = ShardedModel(cfg, Strategy.parse("EP2-TP2-PP2"))
    full = ShardedModel(cfg, sm.strategy, sm.mesh, full_logits=True)
    params = load_params(d, cfg, sm.param_shardings, sm.abstract_params)
    prompt, B, S = sm.put_tokens(jnp.asarray(tokens)), *tokens.shape
    last = np.asarray(sm.prefill(params, prompt, sm.init_cache(B, S + 4)).logits)
    every = np.asarray(full.prefill(params, prompt, sm.init_cache(B, S + 4)).logits)
    assert last.shape == (B, 1, cfg.vocab_size) and every.shape == (B, S, cfg.vocab_size)
    assert np.max(np.abs(every - ref)) / np.max(np.abs(ref)) < 1e-4
    assert np.max(np.abs(last - ref[:, -1:])) / np.max(np.abs(ref)) < 1e-4


def test_run_on_a_checkpoint_generates_transformers_tokens_by_default(checkpoint, tmp_path, capsys):
    """As a new user would: `moe-jax run --model DIR --weights DIR` with no dispatch flag runs the checkpoint the
    way its reference does (dropless: nothing dropped) and generates transformers' greedy tokens; capacity
    dispatch at a small factor drops assignments, and the run says how many."""
    _, d, _, tokens, _, generated = checkpoint
    prompt = tmp_path / "prompt.json"
    prompt.write_text(json.dumps({"prompt": tokens[:, :6].tolist()}))
    common = ["run", "--model", str(d), "--weights", str(d), "--prompt-file", str(prompt), "--gen-len", "16",
              "--mesh", "EP2-TP2-DP2", "--repeats", "1", "--json", "-"]
    main(common)
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == generated.tolist()
    assert out["dropped"]["total"] == 0 and out["dropped"]["assignments"] == 4 * (6 + 15) * 2 * 4
    main(common + ["--dispatch", "capacity", "--capacity-factor", "0.5"])
    out = json.loads(capsys.readouterr().out)
    dropped = out["dropped"]
    assert dropped["total"] > 0 and dropped["total"] == dropped["prefill"] + dropped["decode"]
    assert any("dropped" in n and "token-expert assignments" in n for n in out["notes"])
    with pytest.raises(SystemExit) as e:
        main(common + ["--capacity-factor", "2"])                   # dropless: the factor does not apply
    assert e.value.code == 2 and "applies to capacity dispatch" in capsys.readouterr().err
