"""Expected routing statistics for dropless dispatch (and capacity decode on its gathered path), under a
stated assumption: uniform routing.

Dropless work depends on where tokens go, which only a real batch knows. Until one is
measured, the planner and the floor assume each token picks k distinct experts uniformly
at random, and every figure that depends on it says so.
"""

from __future__ import annotations

import math

from moe_jax.config import ModelConfig
from moe_jax.costs.types import WeightsRead
from moe_jax.model.moe import group_size
from moe_jax.model.moe.gathered import capacity_gathers
from moe_jax.names import DTYPES, Dispatch
from moe_jax.parallel.mesh import Strategy

UNIFORM = "uniform routing: each token picks k distinct experts uniformly at random"


def touched_fraction(cfg: ModelConfig, tokens: int) -> float:
    """Expected fraction of experts that receive at least one of `tokens` tokens: 1 − (1 − k/E)^tokens."""
    return 1.0 - (1.0 - cfg.top_k / cfg.num_experts) ** max(tokens, 0)


def routed_expert_bytes(cfg: ModelConfig, strategy: Strategy) -> int:
    """Bytes of routed-expert weights one device holds: L_moe/pp MoE layers × E/ep experts × (one expert's
    parameters) / tp, at the bytes of the dtype the weights are stored in (FP8: 1). The ``first_dense_layers``
    dense layers hold no routed experts (pp splits the MoE layers only: `moe_jax.model.dense_layers`)."""
    return (cfg.moe_layers // strategy.pp) * (cfg.num_experts // strategy.ep) * \
        (cfg.expert_params // strategy.tp) * DTYPES[cfg.param_dtype].bytes


def shard_imbalance(cfg: ModelConfig, strategy: Strategy, tokens: int) -> float:
    """Expected rows on the busiest of the ep expert shards over the mean (≥ 1), for `tokens` routed tokens.

    Each of the tokens · k assignments lands on a given shard with probability 1/ep; the
    busiest of ep shards is about mean + σ·√(2 ln ep) (normal approximation of the binomial).
    """
    ep = strategy.ep
    n = tokens * cfg.top_k
    if ep <= 1 or n <= 0:
        return 1.0
    mean = n / ep
    sigma = math.sqrt(n * (1 / ep) * (1 - 1 / ep))
    return min(float(ep), 1.0 + sigma * math.sqrt(2 * math.log(ep)) / mean)


def decode_floor_weights(cfg: ModelConfig, strategy: Strategy, weights: int, batch: int,
                         batch_shards: int | None = None) -> WeightsRead:
    """Weight bytes a decode step must read per device, with the arithmetic.

    Dropless reads only experts the step's tokens route to: each device's experts see the decode tokens of
    its data-parallel replica (batch / dp), so the expected fraction is `touched_fraction` of them. So does
    capacity dispatch where it takes the gathered path (`moe_jax.model.moe.gathered.capacity_gathers`: no
    assignment can be dropped, experts not split over ep, fewer assignments than experts); otherwise it reads
    every local expert. batch_shards: how many ways the layout splits the batch (the capacity groups'
    shards; None: dp · ep where that divides the batch, else 1).
    """
    if cfg.dispatch == Dispatch.CAPACITY:
        if batch_shards is None:
            batch_shards = strategy.dp * strategy.ep if batch % (strategy.dp * strategy.ep) == 0 else 1
        per_shard = max(batch // batch_shards, 1)
        if not capacity_gathers(cfg, per_shard, group_size(batch, batch_shards, cfg.moe_group_size), strategy.ep):
            return WeightsRead(weights, "every local weight (capacity dispatch touches every local expert)")
    elif cfg.dispatch != Dispatch.DROPLESS:
        return WeightsRead(weights, "every local weight (capacity dispatch touches every local expert)")
    tokens = max(batch // strategy.dp, 1)
    experts = routed_expert_bytes(cfg, strategy)
    frac = touched_fraction(cfg, tokens)
    read = weights - experts + int(experts * frac)
    return WeightsRead(read, f"{weights - experts:,} B non-expert + {frac:.1%} of {experts:,} B local expert weights "
                             f"(1 - (1 - k/E)^T, k={cfg.top_k}, E={cfg.num_experts}, T={tokens} tokens per replica; "
                             f"{UNIFORM})", touched_fraction=frac, tokens=tokens)
