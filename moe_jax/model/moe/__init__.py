"""The MoE block, one module per stage: route (router, top-k), capacity (GShard slots), dropless (sort and
grouped matmul), gathered (each assignment's own expert weights read, at decode's small batches), exchange (the
ragged all-to-all and its dense stand-in), dense (the reference), activation (the experts' gated activation every
dispatch applies) and layer (the `MoE` module that holds the weights and picks the dispatch when it is built)."""

from moe_jax.model.moe.activation import glu
from moe_jax.model.moe.capacity import capacity_masks, capacity_moe, group_size, swiglu_experts
from moe_jax.model.moe.dense import dense_moe
from moe_jax.model.moe.dropless import dropless_moe, grouped_matmul, sort_assignments
from moe_jax.model.moe.exchange import ragged_all_to_all_dense, receive_rows
from moe_jax.model.moe.layer import ROUTED_EXPERTS, MoE
from moe_jax.model.moe.route import route

__all__ = ["MoE", "ROUTED_EXPERTS", "route", "group_size", "capacity_masks", "swiglu_experts", "capacity_moe",
           "dropless_moe", "grouped_matmul", "sort_assignments", "receive_rows", "ragged_all_to_all_dense",
           "dense_moe", "glu"]
