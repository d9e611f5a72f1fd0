"""The dense reference dispatch: every expert on every token, gated by the router (for tests)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.model.execution import Kernels
from moe_jax.model.layers import F32
from moe_jax.model.moe.activation import glu
from moe_jax.model.moe.route import route, weights_input


def dense_moe(x_bsd, router_de, w_gate_up_epfd, w_down_edf, cfg: ModelConfig, kernels: Kernels | None = None, *,
              biases=None):
    """Reference: every expert on every token, gated by the router's top-k weights (nothing dropped).

    No drops, E times the FLOPs. kernels: unused (plain einsums); taken so every dispatch has one signature.
    biases: None, or the experts' (gate/up [E, 2, F], down [E, D]) biases (``cfg.expert_bias``).
    """
    weights, experts = route(x_bsd, router_de, cfg.top_k, cfg.router_norm_topk, cfg)
    gates = jnp.sum(jax.nn.one_hot(experts, cfg.num_experts, dtype=F32) * weights[..., None], axis=-2)
    if weights_input(cfg):   # Llama 4: each expert's input scaled by its weight (0: not chosen), outputs summed
        x_bsed = x_bsd[:, :, None] * gates.astype(x_bsd.dtype)[..., None]
        gate = jnp.einsum("bsed,efd->bsef", x_bsed, w_gate_up_epfd[:, 0])
        up = jnp.einsum("bsed,efd->bsef", x_bsed, w_gate_up_epfd[:, 1])
        gates = jnp.ones_like(gates)
    else:
        gate = jnp.einsum("bsd,efd->bsef", x_bsd, w_gate_up_epfd[:, 0])
        up = jnp.einsum("bsd,efd->bsef", x_bsd, w_gate_up_epfd[:, 1])
    if biases is not None:
        gate, up = gate + biases[0][:, 0], up + biases[0][:, 1]
    out = jnp.einsum("bsef,edf->bsed", glu(gate, up, cfg), w_down_edf)
    if biases is not None:
        out = out + biases[1]
    y = jnp.einsum("bsed,bse->bsd", out.astype(F32), gates).astype(x_bsd.dtype)
    return y, jnp.zeros((1,), jnp.int32)
