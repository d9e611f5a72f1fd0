"""Blockwise causal prefill attention (`moe_jax.model.attention.causal_attend`) against the plain masked form.

The prefill once computed full [B, K, G, S, S] f32 scores (4.3 GB per layer for qwen3-30b-a3b at batch 8 x
2048 on an H200, half of them masked). These tests pin that the blockwise form gives the same numbers,
is causal, never builds an S x S array in the compiled program (cpu, gpu and tpu compiles), and does the
FLOPs of the lower triangle only, as the cost walk counts them.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_compiler, run_tpu_script
from flax import nnx

from moe_jax.config import get_model
from moe_jax.costs.compile import Workload
from moe_jax.model import layers
from moe_jax.model.attention import attend, causal_attend, causal_flops, query_block
from moe_jax.model.transformer import Transformer, init_cache
from moe_jax.parallel.mesh import Strategy

TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _qkv(B, S, H, K, Dh, dtype, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (B, S, H, Dh), jnp.float32).astype(dtype),
            jax.random.normal(kk, (B, S, K, Dh), jnp.float32).astype(dtype),
            jax.random.normal(kv, (B, S, K, Dh), jnp.float32).astype(dtype))


def _plain(q, k, v):
    S = q.shape[1]
    return attend(q, k, v, jnp.tril(jnp.ones((S, S), bool)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("H,K", [(8, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("S,q_block,key_chunk", [
    (1, None, 2048),            # one position
    (37, None, 2048),           # shorter than a block: one exact piece
    (300, None, 2048),          # 3 blocks, the last one short, each one exact piece
    (300, 32, 64),              # 10 blocks, prefixes longer than a chunk: the online softmax, scanned
    (200, 48, 80),              # a chunk that does not divide the block, nor the block the length
    (96, 32, 32),               # a single chunk before the diagonal (no scan), then 2
])
def test_blockwise_equals_plain(S, q_block, key_chunk, H, K, dtype):
    q, k, v = _qkv(2, S, H, K, 16, dtype, seed=S + H)
    got = jax.jit(functools.partial(causal_attend, q_block=q_block, key_chunk=key_chunk))(q, k, v)
    want = jax.jit(_plain)(q, k, v)
    assert got.shape == want.shape == q.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **TOL[dtype])


def test_value_width_and_scale():
    """v may be narrower than q and k (latent attention's expanded form) and the scale given."""
    q, k, _ = _qkv(1, 70, 4, 2, 24, jnp.float32)
    v = jax.random.normal(jax.random.key(5), (1, 70, 2, 8))
    got = causal_attend(q, k, v, q_block=16, key_chunk=32, scale=0.1)
    want = _plain(q * (0.1 * 24 ** 0.5), k, jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, 16))))[..., :8]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("q_block,key_chunk", [(None, 2048), (16, 32)])
def test_causal(q_block, key_chunk):
    """Changing the key and value at position j leaves every output before j as it was, and changes j's."""
    q, k, v = _qkv(2, 130, 8, 2, 16, jnp.float32)
    run = jax.jit(functools.partial(causal_attend, q_block=q_block, key_chunk=key_chunk))
    base = np.asarray(run(q, k, v))
    for j in (0, 17, 64, 129):
        out = np.asarray(run(q, k.at[:, j].add(3.0), v.at[:, j].add(3.0)))
        np.testing.assert_array_equal(out[:, :j], base[:, :j])
        assert np.abs(out[:, j] - base[:, j]).max() > 1e-3


def test_query_block_and_flops():
    assert [query_block(S) for S in (1, 128, 129, 2048, 2049, 32768)] == [1, 128, 128, 128, 256, 2048]
    # lower triangle by blocks, diagonal blocks whole: 4 blocks of 128 over 512 positions
    assert causal_flops(1, 512, 1, 1) == 4 * 128 * 128 * (1 + 2 + 3 + 4)
    assert causal_flops(1, 300, 1, 1, q_block=128) == 4 * (128 * 128 + 256 * 128 + 300 * 44)


_SHAPE = re.compile(r"\b(?:f32|bf16)\[([\d,]+)\]")


def square_trailing(hlo_text: str, S: int) -> list[str]:
    """f32/bf16 array shapes in `hlo_text` whose two trailing dimensions are both S."""
    found = []
    for m in _SHAPE.finditer(hlo_text):
        dims = [int(d) for d in m.group(1).split(",")]
        if len(dims) >= 2 and dims[-2:] == [S, S]:
            found.append(m.group(0))
    return found


def _attention_matmul_flops(phase) -> int:
    return sum(o.matmul_flops * o.count for o in phase.ops if o.scope == "attention")


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_prefill_program_has_no_square_scores_and_counts_causal_flops(backend):
    """The tiny model's prefill at S=512 compiled for `backend`: no [.., S, S] f32/bf16 array (the plain
    form's scores are one), and the walk's attention matmul FLOPs are
    the projections plus the blockwise causal scores (4 of 16 score blocks of 128 x 128 skipped)."""
    kw = {}
    if backend == "gpu":
        require_compiler("gpu")
        kw = {"gpu_target": "h200"}
    from moe_jax.costs.walk import analyze_cost

    cfg = get_model("tiny")
    B, S = 2, 512
    report = analyze_cost(cfg, Strategy.parse("EP1"), Workload(B, S, 8), backend=backend, phases=("prefill",), **kw)
    phase = report.phases["prefill"]
    assert square_trailing(phase.hlo_text, S) == []
    L, D, H, K, Dh = cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    projections = L * (2 * B * S * D * (H + 2 * K) * Dh + 2 * B * S * H * Dh * D)
    scores = L * causal_flops(B, S, H, Dh)
    assert scores == L * 4 * B * H * Dh * 128 * 128 * (1 + 2 + 3 + 4)
    assert _attention_matmul_flops(phase) == projections + scores

    # the detector finds the plain form's scores
    q, k, v = _qkv(B, S, H, K, Dh, jnp.bfloat16)
    plain = jax.jit(_plain).lower(q, k, v).compile().as_text()
    assert square_trailing(plain, S)


TPU_SCRIPT = """
import re
from moe_jax.config import get_model
from moe_jax.costs.compile import Workload, compile_program
from moe_jax.parallel.mesh import Strategy
p = compile_program(get_model("tiny"), Strategy.parse("EP1"), Workload(2, 512, 8), backend="tpu",
                    topology="v5p:2x2x1", phases=("prefill",))
text = p.phases["prefill"].hlo_text
print(sum(1 for m in re.finditer(r"\\b(?:f32|bf16)\\[([\\d,]+)\\]", text) if m.group(1).endswith("512,512")))
"""


def test_tpu_prefill_program_has_no_square_scores():
    assert run_tpu_script(TPU_SCRIPT)[-1] == "0"


def _prefill_and_greedy(cfg, state, prompt, steps):
    graphdef = nnx.graphdef(Transformer(cfg, rngs=nnx.Rngs(0)))
    prefill = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).prefill(t, c, full_logits=True))
    decode = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s).decode(t, p, c))
    out = prefill(state, prompt, init_cache(cfg, prompt.shape[0], prompt.shape[1] + steps))
    logits, cache = np.asarray(out.logits), out.cache
    token, tokens = jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32)[:, None], []
    for pos in range(prompt.shape[1], prompt.shape[1] + steps):
        tokens.append(np.asarray(token))
        step = decode(state, token, jnp.int32(pos), cache)
        token, cache = jnp.argmax(step.logits[:, -1], -1).astype(jnp.int32)[:, None], step.cache
    return logits, np.concatenate(tokens, axis=1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_prefill_and_greedy_decode_unchanged(tiny32, monkeypatch, dtype):
    """The tiny model's prefill logits (every position) and greedy tokens with the blockwise prefill (default
    blocks; small blocks, which take the online-softmax path) equal those with the plain masked form.
    In bf16 every token goes to every expert: a top-2 choice flips on a rounding-level difference."""
    cfg = tiny32 if dtype == "float32" else tiny32.replace(dtype=dtype, top_k=tiny32.num_experts)
    state = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)))
    prompt = jax.random.randint(jax.random.key(1), (2, 300), 0, cfg.vocab_size)
    results = {}
    for name, fn in [("plain", _plain), ("blockwise", causal_attend),
                     ("small blocks", functools.partial(causal_attend, q_block=32, key_chunk=64))]:
        monkeypatch.setattr(layers, "causal_attend", fn)
        results[name] = _prefill_and_greedy(cfg, state, prompt, steps=6)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == "float32" else dict(atol=0.1, rtol=0.05)
    for name in ("blockwise", "small blocks"):
        np.testing.assert_allclose(results[name][0], results["plain"][0], **tol)
        if dtype == "float32":
            np.testing.assert_array_equal(results[name][1], results["plain"][1])

