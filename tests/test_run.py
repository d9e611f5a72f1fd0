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
