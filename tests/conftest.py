"""Test set-up: 8 fake CPU devices, requested before anything imports jax."""

import os
import re

os.environ["XLA_FLAGS"] = (re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                  os.environ.get("XLA_FLAGS", "")) +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import pytest  # noqa: E402

from moe_jax.config import get_model  # noqa: E402
from moe_jax.runtime.verify import exact_config  # noqa: E402

assert jax.device_count() == 8, "tests need 8 fake CPU devices; XLA_FLAGS was set too late"


def clean_env(**extra):
    """This process's environment without the test-only device settings (for subprocesses that set their own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(extra)
    return env


def require_compiler(kind: str) -> None:
    """Skip when the deviceless `kind` compiler (tpu or gpu) is not installed; in CI (CI set) fail instead:
    `make test` installs both, so a missing one there is a broken install, not an optional feature."""
    from moe_jax.costs.backends import gpu_compiler_installed, tpu_compiler_installed

    if (tpu_compiler_installed if kind == "tpu" else gpu_compiler_installed)():
        return
    package = {"tpu": "libtpu (pip install 'moe-jax[tpu]')",
               "gpu": "jax's CUDA plugin (pip install 'moe-jax[gpu]')"}[kind]
    if os.environ.get("CI"):
        pytest.fail(f"{package} is missing in CI: `make test` installs it")
    pytest.skip(f"{package} is not installed")


def run_tpu_script(script: str) -> list[str]:
    """Run `script` in a fresh Python that compiles for deviceless TPUs; its stdout lines (see require_compiler)."""
    import subprocess
    import sys

    require_compiler("tpu")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                          env=clean_env(TPU_SKIP_MDS_QUERY="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()


def single_device_reference(cfg, batch: int, length: int, seed: int = 0):
    """(parameter state, tokens [B, T], full-forward logits) of `cfg` on one device: the reference."""
    import numpy as np
    from flax import nnx

    from moe_jax.model.transformer import Transformer

    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))
    tokens = jax.random.randint(jax.random.key(seed + 1), (batch, length), 0, cfg.vocab_size)
    logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)(state, tokens)
    return state, tokens, np.asarray(logits)


@pytest.fixture(scope="session")
def tiny32():
    """The tiny preset in f32 with capacity for every token (capacity dispatch drops nothing)."""
    return exact_config(get_model("tiny"))


# --- parity with transformers: the pieces every family's test file uses -------------------------------------


def rel_error(a, ref) -> float:
    """Largest absolute difference of `a` from `ref`, relative to the largest |ref|."""
    import numpy as np

    return float(np.max(np.abs(np.asarray(a) - ref)) / np.max(np.abs(ref)))


def hf_reference(model, directory, length: int, prompt: int, gen: int):
    """Save transformers' `model` to `directory` and return its reference on 4 random sequences of `length`
    tokens: (tokens [4, length], logits, `gen` greedy tokens after the first `prompt` positions), as numpy."""
    import torch

    model.save_pretrained(directory)
    tokens = torch.randint(0, model.config.vocab_size, (4, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens).logits.numpy()
        generated = model.generate(tokens[:, :prompt], max_new_tokens=gen, min_new_tokens=gen, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[:, prompt:].numpy()
    return tokens.numpy(), logits, generated


def load_sharded(directory, cfg, strategy, **changes):
    """(ShardedModel, parameters) of the checkpoint in `directory` under `strategy`, `cfg` with `changes`."""
    from moe_jax.checkpoints.weights import load_params
    from moe_jax.programs.sharded import ShardedModel

    cfg = cfg.replace(**changes) if changes else cfg
    sm = ShardedModel(cfg, strategy)
    return sm, load_params(directory, cfg, sm.param_shardings, sm.abstract_params)


def unsharded_logits(directory, cfg, tokens):
    """The unsharded reference: DP8 with a batch of 4 splits nothing (every device runs the whole model)."""
    import jax.numpy as jnp
    import numpy as np

    from moe_jax.parallel.mesh import Strategy

    sm, params = load_sharded(directory, cfg, Strategy(dp=8))
    return np.asarray(sm.forward(params, sm.put_tokens(jnp.asarray(tokens))).logits)


def assert_estimate_matches_compiled(cfg, strategy, work, report):
    """The planner's estimate (no compile) against a compiled `report` of the same case: matmul FLOPs per device
    within 1% in both phases, and the placement's weights and KV cache per device exactly. Returns the placement."""
    import pytest

    from moe_jax.costs.analytic import estimate_phase
    from moe_jax.programs.placement import describe

    p = describe(cfg, strategy, batch=work.batch, cache_len=work.cache_len)
    for phase in ("prefill", "decode"):
        c = report.phases[phase]
        e = estimate_phase(cfg, strategy, work, phase, p.weight_bytes_per_device, p.kv_cache_bytes_per_device)
        assert e.matmul_flops == pytest.approx(c.matmul_flops, rel=0.01), phase
        assert c.memory.weights == p.weight_bytes_per_device and c.memory.kv_cache == p.kv_cache_bytes_per_device
    return p


def prefill_logits(cfg, state, kernels, prompt):
    """Logits of the model of `cfg` built for `kernels` (`Kernels`), with parameters `state`, prefilling `prompt`."""
    import numpy as np
    from flax import nnx

    from moe_jax.model.execution import Execution
    from moe_jax.model.transformer import Transformer, init_cache

    graphdef = nnx.graphdef(Transformer(cfg, rngs=nnx.Rngs(0), execution=Execution(kernels)))
    run = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).prefill(t, c))
    out = run(state, prompt, init_cache(cfg, prompt.shape[0], prompt.shape[1] + 2))
    return np.asarray(out.logits)


def h200_qwen3_prefill(dispatch: str, batch: int = 8, prompt_len: int = 2048):
    """The prefill of qwen3-30b-a3b cut to two layers, compiled deviceless for one H200 and walked (a `PhaseCost`)."""
    require_compiler("gpu")
    from moe_jax.costs.compile import Workload
    from moe_jax.costs.walk import analyze_cost
    from moe_jax.parallel.mesh import Strategy

    cfg = get_model("qwen3-30b-a3b").replace(num_layers=2, dispatch=dispatch)
    report = analyze_cost(cfg, Strategy.parse("EP1"), Workload(batch, prompt_len, 128), backend="gpu",
                          gpu_target="h200", phases=("prefill",))
    return report.phases["prefill"]
