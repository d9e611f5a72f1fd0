"""moe-jax: find and prove the parallel strategy (ep, tp, pp, dp) for serving a Mixture-of-Experts model.

The public API. Modules that import jax are loaded on first use, so a program can still
set the fake CPU device count (`request_cpu_devices`) after importing moe_jax.
"""

from moe_jax.config import ModelConfig, get_model, preset_names
from moe_jax.errors import ConfigError, MoeJaxError, ShardingError, StrategyError
from moe_jax.parallel.devices import request_cpu_devices
from moe_jax.parallel.mesh import MESH_AXES, Strategy, build_mesh, validate
from moe_jax.parallel.rules import LOGICAL_AXIS_RULES, Layout, axis_rules

_LAZY = {
    "ShardedModel": "moe_jax.programs.sharded",
    "Transformer": "moe_jax.model.transformer",
    "init_cache": "moe_jax.model.transformer",
    "describe": "moe_jax.programs.placement",
    "verify_sharding": "moe_jax.runtime.verify",
    "collectives": "moe_jax.costs.hlo",
    "Workload": "moe_jax.costs.compile",
    "compile_program": "moe_jax.costs.compile",
    "analyze_cost": "moe_jax.costs.walk",
    "CostReport": "moe_jax.costs.types",
    "ClusterSpec": "moe_jax.runtime.distributed",
    "Cluster": "moe_jax.runtime.distributed",
}

__all__ = ["ModelConfig", "get_model", "preset_names", "request_cpu_devices", "MoeJaxError", "ConfigError",
           "StrategyError", "ShardingError", "MESH_AXES", "Strategy", "build_mesh", "validate",
           "LOGICAL_AXIS_RULES", "Layout", "axis_rules", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moe_jax' has no attribute {name!r}")
