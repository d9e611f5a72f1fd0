"""Numerical health: where NaN or Inf first appears in a forward pass."""

from __future__ import annotations

from moe_jax.errors import MoeJaxError


class NonFiniteError(MoeJaxError):
    """The model produced NaN or Inf (for example from a broken checkpoint)."""


def locate_nonfinite(graphdef, params, tokens) -> str | None:
    """Run the model one layer at a time on `tokens` [B, S]; name the first place values stop being finite.

    Layers are numbered as the model's: the ``first_dense_layers`` dense layers (`moe_jax.model.dense_layers`)
    first, then the MoE layers (with ``moe_interleave``, the dense layers between them in place), each with its
    own attention window (`ModelConfig.layer_windows`).
    Returns None when every activation and the logits are finite, else one of
    "embedding", "layer N (attention)", "layer N (moe)", "layer N (dense ffn)", "output head".
    """
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    def finite(x) -> bool:
        return bool(jnp.all(jnp.isfinite(x)))

    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    x = jnp.take(model.embed_vd[...], tokens, axis=0)
    if not finite(x):
        return "embedding"
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)

    def stack(blocks, ffn: str, windows: tuple[int, ...]):
        """(per-layer parameters, the jitted layer, window) for each layer of one stacked block group."""
        graph, stacked = nnx.split(blocks)

        @functools.partial(jax.jit, static_argnums=2)           # the window: a Python int, as the model has it
        def layer(per_layer, x, window):
            block = nnx.merge(graph, per_layer)
            extra = {"window": window} if window else {}
            h, _ = block.attn(block.attn_norm(x), positions, **extra)
            x = x + h
            if ffn == "moe":
                y, _ = block.moe(block.moe_norm(x))
            else:
                y = block.ffn(block.ffn_norm(x))
            return x, x + y

        return [(jax.tree.map(lambda a, i=i: a[i], stacked), layer, w) for i, w in enumerate(windows)]

    layers = []
    if cfg.first_dense_layers:
        layers += [(*one, "dense ffn") for one in stack(model.dense_blocks, "dense", (0,) * cfg.first_dense_layers)]
    if cfg.moe_interleave == 1:
        layers += [(*one, "moe") for one in stack(model.blocks, "moe", cfg.layer_windows)]
    else:   # groups of I layers (`moe_jax.model.stack.Block`): its I − 1 dense layers, then its MoE layer
        step, windows = cfg.moe_interleave, cfg.layer_windows
        graph, nested = nnx.split(model.blocks.dense)                      # [groups, I − 1, ...]: one layer axis
        flat = nnx.merge(graph, jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), nested))
        dense = stack(flat, "dense", tuple(w for i, w in enumerate(windows) if i % step != step - 1))
        moe = stack(model.blocks, "moe", windows[step - 1::step])
        for g, one in enumerate(moe):
            layers += [(*d, "dense ffn") for d in dense[g * (step - 1):(g + 1) * (step - 1)]] + [(*one, "moe")]
    for index, (per_layer, layer, window, part) in enumerate(layers):
        after_attention, x = layer(per_layer, x, window)
        if not finite(after_attention):
            return f"layer {index} (attention)"
        if not finite(x):
            return f"layer {index} ({part})"
    head = model.embed_vd[...].T if cfg.tie_embeddings else model.head_dv[...]
    if not finite(model.final_norm(x) @ head):
        return "output head"
    return None


def check_logits(logits, graphdef, params, tokens, what: str) -> None:
    """Raise NonFiniteError naming the first layer at fault when `logits` hold NaN or Inf."""
    import jax.numpy as jnp

    if bool(jnp.all(jnp.isfinite(logits))):
        return
    where = locate_nonfinite(graphdef, params, tokens) or "not reproduced layer by layer"
    raise NonFiniteError(f"{what}: logits contain NaN or Inf; first non-finite values in {where}")
