"""The dense reference dispatch: every expert on every token, gated by the router (for tests)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.model.execution import Kernels
from moe_jax.model.layers import F32
from moe_jax.model.moe.route import route


def dense_moe(x_bsd, router_de, w_gate_up_epfd, w_down_edf, cfg: ModelConfig, kernels: Kernels | None = None):
    """Reference: every expert on every token, gated by the router's top-k weights (nothing dropped).

    No drops, E times the FLOPs. kernels: unused (plain einsums); taken so every dispatch has one signature.
    """
    weights, experts = route(x_bsd, router_de, cfg.top_k, cfg.router_norm_topk, cfg)
    gates = jnp.sum(jax.nn.one_hot(experts, cfg.num_experts, dtype=F32) * weights[..., None], axis=-2)
    gate = jnp.einsum("bsd,efd->bsef", x_bsd, w_gate_up_epfd[:, 0])
    up = jnp.einsum("bsd,efd->bsef", x_bsd, w_gate_up_epfd[:, 1])
    out = jnp.einsum("bsef,edf->bsed", jax.nn.silu(gate) * up, w_down_edf)
    y = jnp.einsum("bsed,bse->bsd", out.astype(F32), gates).astype(x_bsd.dtype)
    return y, jnp.zeros((1,), jnp.int32)
