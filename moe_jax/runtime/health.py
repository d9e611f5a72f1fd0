"""Numerical health: where NaN or Inf first appears in a forward pass."""

from __future__ import annotations

from moe_jax.errors import MoeJaxError


class NonFiniteError(MoeJaxError):
    """The model produced NaN or Inf (for example from a broken checkpoint)."""


def locate_nonfinite(graphdef, params, tokens) -> str | None:
    """Run the model one layer at a time on `tokens` [B, S]; name the first place values stop being finite.

    Returns None when every activation and the logits are finite, else one of
    "embedding", "layer N (attention)", "layer N (moe)", "output head".
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def finite(x) -> bool:
        return bool(jnp.all(jnp.isfinite(x)))

    model = nnx.merge(graphdef, params)
    x = jnp.take(model.embed_vd[...], tokens, axis=0)
    if not finite(x):
        return "embedding"
    blocks_graph, stacked = nnx.split(model.blocks)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)

    @jax.jit
    def layer(per_layer, x):
        block = nnx.merge(blocks_graph, per_layer)
        h, _ = block.attn(block.attn_norm(x), positions)
        x = x + h
        y, _ = block.moe(block.moe_norm(x))
        return x, x + y

    for index in range(model.cfg.num_layers):
        after_attention, x = layer(jax.tree.map(lambda a, i=index: a[i], stacked), x)
        if not finite(after_attention):
            return f"layer {index} (attention)"
        if not finite(x):
            return f"layer {index} (moe)"
    head = model.embed_vd[...].T if model.cfg.tie_embeddings else model.head_dv[...]
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
