"""Proof that the sharded program computes what the single-device model computes.

The reference is the unsharded model on one device: one full forward over prompt and
generated tokens. The sharded model on the mesh runs prefill over the prompt, then
decodes the remaining tokens one at a time (teacher-forced, so both see the same
tokens). Logits are compared position by position: the serving prefill's (last prompt
position) and a prefill built with full logits (every prompt position).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_jax.config import ModelConfig
from moe_jax.parallel.mesh import Strategy

MAX_REFERENCE_BYTES = 4e9
"""Largest model `verify_sharding` builds as a single-device reference."""


def exact_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` in float32 with capacity factor E/k: the configuration whose programs can be compared exactly.

    Capacity E/k gives every expert room for all top-k picks of a whole token group, so capacity dispatch
    drops nothing however the tokens are grouped (a sharded program's groups differ from one device's);
    float32 keeps the comparison tight (bf16 differs by rounding order alone).
    """
    return cfg.replace(dtype="float32", capacity_factor=cfg.num_experts / cfg.top_k)


@dataclass(frozen=True)
class Verification:
    """Largest differences between the sharded program and the single-device reference."""

    strategy: str
    batch: int
    prompt_len: int
    gen_len: int
    forward_max_abs: float
    """Sharded full forward vs reference forward, max |Δlogit| over all positions."""
    prefill_max_abs: float
    """Sharded prefill vs reference forward on the prompt positions: the full-logits prefill on every
    one, the serving prefill on the last."""
    decode_max_abs: float
    """Sharded decode steps vs reference forward at the generated positions."""
    logit_scale: float
    """max |logit| of the reference, to read the differences against."""
    dropped: int
    """Token-expert assignments the sharded prefill dropped (capacity dispatch)."""
    tolerance: float

    @property
    def passed(self) -> bool:
        """All three differences are within the tolerance (relative to the logit scale)."""
        worst = max(self.forward_max_abs, self.prefill_max_abs, self.decode_max_abs)
        return worst <= self.tolerance * max(1.0, self.logit_scale)


def verify_sharding(cfg: ModelConfig, strategy: Strategy, *, batch: int = 8, prompt_len: int = 16,
                    gen_len: int = 4, seed: int = 0, tolerance: float = 1e-4, kernels=None) -> Verification:
    """Run `cfg` sharded by `strategy` on jax's devices and compare with one device.

    Use `exact_config(cfg)` for a tight comparison: f32 (bf16 differs by rounding order alone) and no drops.
    kernels: the sharded programs' forms (`moe_jax.model.execution.Kernels`); None for those of jax's devices.
    Another target's forms run here where they compile (e.g. a GPU's unrolled decode layers on CPU devices).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from moe_jax.errors import MoeJaxError
    from moe_jax.model.transformer import Transformer
    from moe_jax.parallel.mesh import validate
    from moe_jax.programs.sharded import ShardedModel

    validate(strategy, cfg, batch=batch, num_devices=jax.device_count() if strategy.num_devices > 1 else None)
    if cfg.params_total * cfg.dtype_bytes > MAX_REFERENCE_BYTES:
        raise MoeJaxError(f"verify runs the whole {cfg.name} ({cfg.params_total * cfg.dtype_bytes / 1e9:.1f} GB in "
                          f"{cfg.dtype}) on one CPU device as the reference; the limit is "
                          f"{MAX_REFERENCE_BYTES / 1e9:.0f} GB. Use a small model (e.g. tiny)")
    reference = Transformer(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(reference)
    total = prompt_len + gen_len
    tokens = jax.random.randint(jax.random.key(seed + 1), (batch, total), 0, cfg.vocab_size)
    ref_logits = np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)(state, tokens))

    sharded = ShardedModel(cfg, strategy, kernels=kernels)
    params = sharded.shard_params(state)
    forward = np.asarray(sharded.forward(params, sharded.put_tokens(tokens)).logits)
    prompt = sharded.put_tokens(tokens[:, :prompt_len])
    full = ShardedModel(cfg, strategy, sharded.mesh, full_logits=True, kernels=kernels)
    prefill_full = np.asarray(full.prefill(params, prompt, sharded.init_cache(batch, total)).logits)
    out = sharded.prefill(params, prompt, sharded.init_cache(batch, total))     # serving: last position
    prefill_err = max(float(np.max(np.abs(prefill_full - ref_logits[:, :prompt_len]))),
                      float(np.max(np.abs(np.asarray(out.logits) - ref_logits[:, prompt_len - 1:prompt_len]))))
    dropped = int(np.asarray(out.dropped).sum())
    cache, decode_err = out.cache, 0.0
    for pos in range(prompt_len, total):
        step = sharded.decode(params, sharded.put_tokens(tokens[:, pos:pos + 1]), jnp.int32(pos), cache)
        cache = step.cache
        decode_err = max(decode_err, float(np.max(np.abs(np.asarray(step.logits)[:, 0] - ref_logits[:, pos]))))
    return Verification(
        strategy=strategy.name, batch=batch, prompt_len=prompt_len, gen_len=gen_len,
        forward_max_abs=float(np.max(np.abs(forward - ref_logits))),
        prefill_max_abs=prefill_err,
        decode_max_abs=decode_err, logit_scale=float(np.max(np.abs(ref_logits))),
        dropped=dropped, tolerance=tolerance)
