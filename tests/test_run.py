"""`moe-jax run`: the sharded model generates what one device generates; the timer reads true."""

import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.cli import main
from moe_jax.config import get_model
from moe_jax.costs.compile import Workload
from moe_jax.parallel.mesh import Strategy
from moe_jax.runtime.run import run, time_call
from moe_jax.runtime.verify import exact_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny():
    return exact_config(get_model("tiny"))


@pytest.fixture(scope="module")
def single(tiny):
    return run(tiny, Strategy(), Workload(8, 12, 6), seed=3, repeats=1)


@pytest.mark.parametrize("mesh", ["EP2-TP2-DP2", "EP4-PP2", "TP2-PP2-DP2", "EP8"])
def test_sharded_run_generates_the_single_device_tokens(tiny, single, mesh):
    result = run(tiny, Strategy.parse(mesh), Workload(8, 12, 6), seed=3, repeats=1)
    assert result.tokens == single.tokens
    assert np.asarray(result.tokens).shape == (8, 6)
    assert result.ttft.median > 0 and result.tpot.median > 0 and "functional check" in result.notes[0]


def test_timer_reads_a_known_duration_within_10_percent():
    def slow(x):
        jax.experimental.io_callback(lambda: time.sleep(0.05), None, ordered=True)
        return x + 1

    f = jax.jit(slow)
    timing = time_call(f, jnp.ones(4), repeats=5)
    assert timing.median == pytest.approx(0.05, rel=0.10)
    assert timing.spread[0] <= timing.median <= timing.spread[1]


def test_run_cli_json_with_prediction(tmp_path, capsys):
    out = tmp_path / "run.json"
    main(["run", "--model", "tiny", "--mesh", "EP2-TP2-DP2", "--batch", "4", "--prompt-len", "8", "--gen-len", "4",
          "--hardware", "h100", "--repeats", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    assert set(data["measured"]) == {"ttft_s", "tpot_s", "throughput_tok_s"}
    assert data["predicted"]["hardware"] == "h100" and data["predicted"]["tpot_s"] > 0
    assert set(data["error"]) == {"ttft_s", "tpot_s", "throughput_tok_s"}
    assert len(data["tokens"]) == 4 and len(data["tokens"][0]) == 4
    assert "TPOT: measured" in capsys.readouterr().out


def test_save_logits_writes_every_prompt_position(tmp_path, capsys):
    """The timed prefill returns the last position's logits; --save-logits still writes [B, S, V]."""
    from flax import nnx

    from moe_jax.model.transformer import Transformer

    logits_file, json_file = tmp_path / "logits.npy", tmp_path / "run.json"
    main(["run", "--model", "tiny", "--mesh", "EP2-TP2-PP2", "--batch", "4", "--prompt-len", "8", "--gen-len", "3",
          "--dtype", "f32", "--dispatch", "dropless", "--repeats", "1", "--seed", "5", "--json", str(json_file),
          "--save-logits", str(logits_file)])
    logits, tokens = np.load(logits_file), json.loads(json_file.read_text())["tokens"]
    cfg = get_model("tiny").replace(dtype="float32")
    assert logits.shape == (4, 8, cfg.vocab_size) and logits.dtype == np.float32
    # the same random weights and prompt on one device (run's seeds; every expert, nothing dropped): every
    # position matches
    graphdef, state = nnx.split(Transformer(cfg.replace(dispatch="dense"), rngs=nnx.Rngs(5)))
    prompt = jax.random.randint(jax.random.key(6), (4, 8), 0, cfg.vocab_size)
    ref = np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)(state, prompt))
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-4)
    # greedy generation picked its first token from the last position
    assert [row[0] for row in tokens] == logits[:, -1].argmax(-1).tolist()


def test_prompt_file(tmp_path, capsys):
    good = tmp_path / "p.json"
    good.write_text(json.dumps({"prompt": [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]}))
    main(["run", "--mesh", "EP2-TP2", "--prompt-file", str(good), "--gen-len", "3", "--repeats", "1", "--json", "-"])
    data = json.loads(capsys.readouterr().out)
    assert data["workload"]["batch"] == 2 and data["workload"]["prompt_len"] == 6


@pytest.mark.parametrize("content,message", [
    ("{\"prompt\": [[1, 2], [3]]}", "rows have lengths [1, 2]"),
    ("{\"prompt\": [[1, \"a\"]]}", "expected {\"prompt\""),
    ("not json", "is not valid JSON"),
    ("{\"prompt\": [[1, 99999]]}", "prompt token 99999 is outside the vocabulary [0, 256)"),
])
def test_bad_prompt_files(tmp_path, capsys, content, message):
    f = tmp_path / "p.json"
    f.write_text(content)
    with pytest.raises(SystemExit) as e:
        main(["run", "--mesh", "EP2", "--prompt-file", str(f)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_gpu_validate_dry_run(tmp_path):
    """The GPU validation script's code path, on CPU with the tiny model (CI exercises it)."""
    out = tmp_path / "RESULTS-gpu.md"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_validate.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert "| tiny |" in text and "predicted" in text and "dry run" in text
    assert "## Capacity against dropless dispatch (measured)" in text and "| tiny | dropless | 8 |" in text
    # traced kernels joined to the dumped program's ops, per category, for both phases
    assert "## Which term is off" in text and "| tiny | 8 | decode | matmul |" in text
    assert "| tiny | 8 | prefill |" in text


def test_nan_in_a_checkpoint_is_reported_with_its_layer(tmp_path, capsys):
    from flax import nnx

    from moe_jax.checkpoints.weights import save_params
    from moe_jax.model.transformer import Transformer
    from moe_jax.runtime.health import locate_nonfinite

    cfg = get_model("tiny").replace(family="mixtral", qk_norm="none", dtype="float32")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((2, 4), jnp.int32)
    assert locate_nonfinite(graphdef, state, tokens) is None
    w = state["blocks"]["moe"]["w_gate_up_epfd"]
    w.set_value(w.get_value().at[2].set(jnp.nan))              # every expert of layer 2
    assert locate_nonfinite(graphdef, state, tokens) == "layer 2 (moe)"
    save_params(state, cfg, tmp_path / "broken")
    with pytest.raises(SystemExit) as e:
        main(["run", "--weights", str(tmp_path / "broken"), "--mesh", "EP2-TP2", "--batch", "2", "--prompt-len", "4",
              "--gen-len", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "first non-finite values in layer 2 (moe)" in err


def test_too_few_generated_tokens_to_time_decode(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--mesh", "EP2", "--batch", "2", "--prompt-len", "4", "--gen-len", "2"])
    assert e.value.code == 2 and "at least 3 generated tokens" in capsys.readouterr().err


def _constant_stream_checkpoint(tmp_path):
    """A tiny model whose residual stream stays each token's embedding (attention and experts add zero), so each
    layer's routing is a function of the token id alone; layer 0's router is zero (every token ties on every
    expert and takes experts 0 and 1), the others random. Returns (cfg, state, checkpoint directory)."""
    from flax import nnx

    from moe_jax.checkpoints.weights import save_params
    from moe_jax.model.transformer import Transformer

    cfg = get_model("tiny").replace(family="mixtral", qk_norm="none", dtype="float32")
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(4)))
    for group, name in (("attn", "wo_dhk"), ("moe", "w_down_edf")):
        w = state["blocks"][group][name]
        w.set_value(jnp.zeros_like(w.get_value()))
    router = state["blocks"]["moe"]["router_de"]
    router.set_value(router.get_value().at[0].set(0.0))
    return cfg, state, save_params(state, cfg, tmp_path / "constant")


def _hand_drops(cfg, state, tokens, group: int) -> list[int]:
    """Per layer, the assignments capacity dispatch drops for token ids [B, S] cut into groups of `group`
    consecutive tokens: each token picks the top k of embed[t] @ router (the RMS norm, a positive factor with
    unit scales, keeps the order; ties go to the lowest expert), each expert keeps C = cfg.capacity(group)."""
    embed = np.asarray(state["embed_vd"].get_value(), np.float64)
    routers = np.asarray(state["blocks"]["moe"]["router_de"].get_value(), np.float64)
    ids = np.asarray(tokens).reshape(-1, group)                             # [G, Sg]
    C = cfg.capacity(group)
    counts = []
    for router in routers:
        chosen = np.argsort(-(embed @ router), axis=-1, kind="stable")[:, :cfg.top_k]   # [V, k] per token id
        per_group = [np.bincount(chosen[g].ravel(), minlength=cfg.num_experts) for g in ids]
        counts.append(int(sum(np.maximum(c - C, 0).sum() for c in per_group)))
    return counts


def test_dropped_per_layer_matches_a_hand_computed_routing(tmp_path):
    cfg, state, weights = _constant_stream_checkpoint(tmp_path)
    B, S, G = 4, 8, 4
    rng = np.random.default_rng(0)
    prompt = rng.choice([3, 77, 150], size=(B, S)).tolist()                  # three ids: experts overflow
    runs = {mesh: run(cfg, Strategy.parse(mesh), Workload(B, S, G), weights=weights, prompt=prompt, repeats=1)
            for mesh in ("EP1", "EP2-TP2-DP2", "EP2-PP2")}
    single = runs["EP1"]
    decoded = np.asarray(single.tokens)[:, :G - 1]                            # the decode steps' input tokens
    # one device: prefill groups of 16 tokens (two rows), each decode step one group of the 4 sequences
    prefill = _hand_drops(cfg, state, prompt, 16)
    decode = [sum(col) for col in zip(*(_hand_drops(cfg, state, decoded[:, j], B) for j in range(G - 1)),
                                      strict=True)]
    d = single.dropped
    assert d["per_layer"] == {"prefill": prefill, "decode": decode}
    # layer 0: every token on experts 0 and 1, so each of the 2 prefill groups drops 2 × (16 − 5)
    assert prefill[0] == 2 * 2 * (16 - cfg.capacity(16))
    assert len(set(prefill)) > 1                                               # the layers differ: a real check
    assert d["prefill"] == sum(prefill) and d["decode"] == sum(decode) and d["total"] == d["prefill"] + d["decode"]
    totals = [p + q for p, q in zip(prefill, decode, strict=True)]
    assert d["worst_layer"] == totals.index(max(totals))
    assert f"most in layer {d['worst_layer']}: {max(totals):,} of its {B * (S + G - 1) * 2:,}" in " ".join(
        single.notes)
    # over dp × ep = 4 batch shards a prefill group is one row (8 tokens) and a decode group one token (drops
    # nothing); the pipeline's microbatches are whole rows, its stages' layers laid end to end in order
    rows = _hand_drops(cfg, state, prompt, 8)
    for mesh in ("EP2-TP2-DP2", "EP2-PP2"):
        assert runs[mesh].tokens == single.tokens
        assert runs[mesh].dropped["per_layer"] == {"prefill": rows, "decode": [0] * cfg.num_layers}, mesh


def test_dense_leading_layers_report_no_drops():
    cfg = get_model("deepseek-v3-tiny").replace(dtype="float32", capacity_factor=0.5)
    result = run(cfg, Strategy.parse("EP2-PP2"), Workload(4, 8, 3), seed=1, repeats=1)
    d = result.dropped
    assert len(d["per_layer"]["prefill"]) == len(d["per_layer"]["decode"]) == cfg.num_layers
    assert d["per_layer"]["prefill"][0] == d["per_layer"]["decode"][0] == 0      # the dense first layer
    assert sum(d["per_layer"]["prefill"]) == d["prefill"] > 0 and sum(d["per_layer"]["decode"]) == d["decode"]
    assert d["assignments"] == 4 * (8 + 2) * cfg.top_k * cfg.moe_layers


def test_timed_prefills_hold_one_kv_cache_at_a_time(monkeypatch):
    """Each timed prefill allocates a fresh cache; the last prefill's result (and its cache) goes first. Holding
    the warm-up's while timing ran mixtral-8x7b at batch 64 out of an H200's memory, which the plan fit."""
    import gc

    from moe_jax.config import get_model
    from moe_jax.costs.compile import Workload
    from moe_jax.parallel.mesh import Strategy
    from moe_jax.programs.sharded import ShardedModel
    from moe_jax.runtime.run import run

    live, allocate = [], ShardedModel.init_cache

    def counting(self, batch, max_len):
        cache = allocate(self, batch, max_len)
        first = jax.tree.leaves(cache)[0]
        gc.collect()
        live.append(sum(1 for a in jax.live_arrays() if a.shape == first.shape and a.dtype == first.dtype))
        return cache

    monkeypatch.setattr(ShardedModel, "init_cache", counting)
    run(get_model("tiny"), Strategy(), Workload(2, 16, 8), repeats=3, max_steps=3, predict=False)
    assert len(live) == 4 and max(live) == 1, live          # the warm-up and three timed prefills
