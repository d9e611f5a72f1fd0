"""The MoE layer: router, E routed SwiGLU experts behind the configured dispatch, optional shared experts.

The expert weights are stored with their contracted dimensions minor, as Hugging Face stores
them: gate and up together ``w_gate_up_epfd`` [E, 2, F, D] (p: the pair), down ``w_down_edf``
[E, D, F]. Decode at one token per expert on a GPU reads each as a row reduction in place
(`moe_jax.model.layers.weight_einsum`); stored [E, D, F], the GPU compile copied the whole
stacked gate and up parameters into [E, F, D] every step (39 GB for Qwen3-30B-A3B). One
gate-and-up parameter is one matmul: multiplied separately, XLA:GPU merges the two matmuls
and relays out both weights to concatenate them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.model import scopes
from moe_jax.model.execution import Kernels
from moe_jax.model.layers import in_place_rows, param, weight, weight_einsum
from moe_jax.model.moe.capacity import capacity_moe
from moe_jax.model.moe.dense import dense_moe
from moe_jax.model.moe.dropless import dropless_moe
from moe_jax.names import Dispatch
from moe_jax.parallel.rules import batch_shards, constrain

ROUTED_EXPERTS = {Dispatch.CAPACITY: capacity_moe, Dispatch.DROPLESS: dropless_moe, Dispatch.DENSE: dense_moe}
"""Each dispatch's routed-expert function: (x, router, gate_up, down, cfg, kernels) → (y, dropped)."""


class MoE(nnx.Module):
    """Router, E routed SwiGLU experts (sharded on ep, width on tp), optional shared experts.

    The dispatch (``cfg.dispatch``) and the target's `Kernels` are fixed when it is built.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, kernels: Kernels):
        D, E, F, dt = cfg.d_model, cfg.num_experts, cfg.expert_ffn, cfg.dtype
        self.cfg = cfg
        self.kernels = kernels
        self.routed_experts = ROUTED_EXPERTS[Dispatch(cfg.dispatch)]
        self.router_de = param(rngs, (D, E), ("embed", "expert_all"), dt, fan_in=D)
        if cfg.router_score == "sigmoid":   # DeepSeek-V3's score-correction bias (added for the choice only)
            self.router_bias_e = nnx.Param(jnp.zeros((E,), dt), axes=("expert_all",))
        elif cfg.router_bias:               # gpt-oss: a bias on the router logits
            self.router_bias_e = param(rngs, (E,), ("expert_all",), dt, fan_in=D)
        self.w_gate_up_epfd = weight(rngs, (E, 2, F, D), ("expert", "gate_up", "mlp", "embed"), cfg, fan_in=D)
        self.w_down_edf = weight(rngs, (E, D, F), ("expert", "embed", "mlp"), cfg, fan_in=F)
        if cfg.expert_bias:                 # gpt-oss: biases on each expert's gate/up and down projections
            self.b_gate_up_epf = param(rngs, (E, 2, F), ("expert", "gate_up", "mlp"), dt, fan_in=D)
            self.b_down_ed = param(rngs, (E, D), ("expert", "embed"), dt, fan_in=F)
        if cfg.num_shared_experts:
            Fs = cfg.num_shared_experts * F
            self.shared_gate_up_pfd = weight(rngs, (2, Fs, D), ("gate_up", "mlp", "embed"), cfg, fan_in=D)
            self.shared_down_df = weight(rngs, (D, Fs), ("embed", "mlp"), cfg, fan_in=Fs)

    def __call__(self, x_bsd):
        """x [B, S, D] → (y [B, S, D], dropped token-expert assignments per token group [G])."""
        router = self.router_de[...]
        if self.cfg.router_score == "sigmoid" or self.cfg.router_bias:
            router = (router, self.router_bias_e[...])
        extra = {"biases": (self.b_gate_up_epf[...], self.b_down_ed[...])} if self.cfg.expert_bias else {}
        y, dropped = self.routed_experts(x_bsd, router, self.w_gate_up_epfd[...], self.w_down_edf[...],
                                         self.cfg, self.kernels, **extra)
        if self.cfg.num_shared_experts:
            with jax.named_scope(scopes.SHARED_EXPERTS):
                B, S, _ = x_bsd.shape
                in_place = in_place_rows(B // batch_shards(B) * S, self.kernels)   # few rows: decode
                gate_up = weight_einsum("bsd,pfd->bspf", x_bsd, self.shared_gate_up_pfd[...], in_place=in_place)
                h = constrain(jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1], ("batch", "length", "mlp"))
                y = y + weight_einsum("bsf,df->bsd", h, self.shared_down_df[...], in_place=in_place)
        return constrain(y, ("batch", "length", "embed")), dropped
