"""The named scopes the model's programs carry, one constant each.

The model opens them with ``jax.named_scope``; XLA keeps them in every op's ``op_name``
metadata, and the cost walk (`moe_jax.costs.walk`) reads them back to attribute FLOPs,
bytes and collectives to a model phase. Both sides import these constants, so a renamed
scope cannot silently drop out of the walk.
"""

from __future__ import annotations

ATTENTION = "attention"
MOE = "moe"
ROUTE = "route"
DISPATCH = "dispatch"
EXPERTS = "experts"
COMBINE = "combine"
SHARED_EXPERTS = "shared_experts"
EMBED = "embed"
HEAD = "head"
STAGE = "stage"
PIPELINE_HANDOFF = "pipeline_handoff"
PIPELINE_OUTPUT = "pipeline_output"
GROUPED_MATMUL = "grouped_matmul"
"""Inside it: a grouped (ragged) matmul, or on XLA:CPU its loop of dense matmuls."""
RAGGED_AS_DENSE = "ragged_as_dense"
"""Inside it: the dense-block stand-in for a ragged all-to-all (backends without one)."""

MODEL_PHASE: dict[str, str] = {
    ATTENTION: "attention", ROUTE: "router", DISPATCH: "dispatch", EXPERTS: "experts", COMBINE: "combine",
    SHARED_EXPERTS: "shared_experts", EMBED: "embed", HEAD: "head", PIPELINE_HANDOFF: "pipeline",
    PIPELINE_OUTPUT: "pipeline", MOE: "moe",
}
"""The model phase each scope's work is reported under (the innermost scope wins)."""


def within(op_name: str, scope: str) -> bool:
    """Whether an op's ``op_name`` path runs through `scope` (not merely ends in a name containing it)."""
    return f"/{scope}/" in op_name
