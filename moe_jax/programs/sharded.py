"""The sharded model: parameters placed on a (dp, pp, ep, tp) mesh and the jitted phase programs.

`ShardedModel` holds what every later stage needs: the graph definition, the
parameter shardings, the shardings of tokens and KV cache for a workload, and three
jitted programs (forward, prefill, decode) whose inputs carry their shardings. The
cost analyzer lowers the same programs from ShapeDtypeStructs; `run` executes them.

The prefill is the serving program: it returns the last position's logits [B, 1, V]
(the next token's), so the output head runs once per sequence and no [B, S, V] array
exists. A model built with ``full_logits=True`` returns every position's instead (for
comparing with a reference, or ``run --save-logits``).

What the programs do is fixed here, once: the target's kernels (from the platform of the
mesh's devices, or given), and whether the layer stack pipelines (pp > 1) with how many
microbatches. The model is built with that `moe_jax.model.execution.Execution`; the layout
it is traced under only says how arrays are split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.model.execution import Execution, Kernels, Pipeline
from moe_jax.model.transformer import Transformer, cache_array_axes, cache_shape
from moe_jax.parallel.mesh import Strategy, build_mesh, validate
from moe_jax.parallel.rules import Layout, use_layout


@functools.lru_cache(maxsize=16)
def abstract_model(cfg: ModelConfig, execution: Execution | None = None):
    """(graphdef, abstract parameter state) of `cfg`'s Transformer built for `execution` (default: unpipelined,
    jax's default backend); nothing is allocated. The parameters do not depend on `execution`.

    Cached per config and execution (the planner describes many strategies of one model); treat the
    result as read-only.
    """
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), execution=execution)))


class ShardedModel:
    """`cfg` split by `strategy` over `mesh` (default: a mesh over jax's devices)."""

    def __init__(self, cfg: ModelConfig, strategy: Strategy, mesh=None, *,
                 prefill_microbatches: int | None = None, decode_microbatches: int | None = None,
                 full_logits: bool = False, kernels: Kernels | None = None):
        """prefill/decode_microbatches: pipeline microbatches (pp > 1) per call; None for the defaults
        of `moe_jax.model.pipeline` (derived from the batch and pp).
        full_logits: `prefill` returns [B, S, V] logits, every prompt position; by default [B, 1, V],
        the last position only (the serving program).
        kernels: what the compile target offers; None for those of the platform of `mesh`'s devices."""
        validate(strategy, cfg)
        self.cfg = cfg
        self.full_logits = full_logits
        self.strategy = strategy
        self.mesh = mesh if mesh is not None else build_mesh(strategy)
        self.layout = Layout.for_strategy(cfg, strategy, self.mesh)
        self.prefill_microbatches = prefill_microbatches
        self.decode_microbatches = decode_microbatches
        self.kernels = kernels or Kernels.of_mesh(self.mesh)
        stages = self.layout.stages
        self.execution = Execution(self.kernels, Pipeline(stages, prefill_microbatches, decode_microbatches)
                                   if stages > 1 else None)
        self.graphdef, self.abstract_params = abstract_model(cfg, self.execution)
        self.param_shardings = self.layout.param_shardings(self.abstract_params)
        self.forward = jax.jit(self._forward)
        # the cache is donated to both: each writes its new positions into it in place (`moe_jax.model.kv_cache`)
        options = self.kernels.compiler_options()
        self.prefill = jax.jit(self._prefill, donate_argnums=(2,), compiler_options=options)
        self.decode = jax.jit(self._decode, donate_argnums=(3,), compiler_options=options)

    # --- placement ----------------------------------------------------------------

    def init_params(self, seed: int = 0):
        """Random parameters created directly in their shards (no device holds the whole model)."""
        def make():
            return nnx.split(Transformer(self.cfg, rngs=nnx.Rngs(seed), execution=self.execution))[1]

        return jax.jit(make, out_shardings=self.param_shardings)()

    def shard_params(self, params):
        """Place an existing parameter state (e.g. from an unsharded model) on the mesh."""
        return jax.device_put(params, self.param_shardings)

    def token_sharding(self, batch: int, length: int):
        """Sharding of a [B, S] token array."""
        return self.layout.sharding(("batch", "length"), (batch, length), what="tokens", strict=False)

    def cache_shardings(self, batch: int, max_len: int) -> dict:
        """Shardings of the KV cache arrays for `batch` sequences of `max_len` positions."""
        shapes = self.cache_shape(batch, max_len)
        return {name: self.layout.sharding(cache_array_axes(name), shape.shape, what="KV cache", strict=False)
                for name, shape in shapes.items()}

    def cache_shape(self, batch: int, max_len: int) -> dict:
        """The KV cache arrays (`moe_jax.model.transformer.cache_shape`) this model's programs take: its layout's
        KV head copies, and ring arrays only where its pipeline stages share one window pattern."""
        return cache_shape(self.cfg, batch, max_len, kv_copies=self.layout.kv_copies, stages=self.layout.stages)

    def init_cache(self, batch: int, max_len: int) -> dict:
        """An empty KV cache, created in its shards."""
        shapes = self.cache_shape(batch, max_len)
        make = jax.jit(lambda: {n: jnp.zeros(s.shape, s.dtype) for n, s in shapes.items()},
                       out_shardings=self.cache_shardings(batch, max_len))
        return make()

    def put_tokens(self, tokens):
        """Place a [B, S] token array on the mesh.

        A host (numpy) array is cut into the shards this process holds, so it works when
        the mesh spans processes (each process must pass the same array); a jax array is
        resharded.
        """
        sharding = self.token_sharding(*tokens.shape)
        if isinstance(tokens, jax.Array):
            return jax.device_put(tokens, sharding)
        import numpy as np

        host = np.asarray(tokens)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    # --- programs (the model built for `execution`, traced under this model's layout) --------

    def _model(self, params):
        return nnx.merge(self.graphdef, params)

    def _forward(self, params, tokens):
        with use_layout(self.layout):
            return self._model(params)(tokens)

    def _prefill(self, params, tokens, cache):
        with use_layout(self.layout):
            return self._model(params).prefill(tokens, cache, full_logits=self.full_logits)

    def _decode(self, params, tokens, pos, cache):
        with use_layout(self.layout):
            return self._model(params).decode(tokens, pos, cache)

    def generate(self, params, prompt, steps: int):
        """Greedy decoding: prefill `prompt` [B, S], then `steps` tokens. Returns int32 [B, steps]."""
        import numpy as np

        B, S = prompt.shape
        out = self.prefill(params, self.put_tokens(prompt), self.init_cache(B, S + steps))
        cache, tokens = out.cache, []
        token = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
        for pos in range(S, S + steps):
            tokens.append(np.asarray(token))
            if pos == S + steps - 1:
                break
            step = self.decode(params, self.put_tokens(token), jnp.int32(pos), cache)
            cache = step.cache
            token = jnp.argmax(step.logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
        return np.concatenate(tokens, axis=1)

    def pipeline_schedule(self, batch: int, length: int, *, decode: bool):
        """Microbatches, bubble and stage hand-off bytes of one prefill (or decode) call."""
        from moe_jax.model.pipeline import schedule

        microbatches = self.decode_microbatches if decode else self.prefill_microbatches
        return schedule(self.cfg, self.strategy, batch, length, decode=decode, microbatches=microbatches,
                        full_output=self.full_logits and not decode)
