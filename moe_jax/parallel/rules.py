"""Logical axis names → mesh axes: the one rules table, and the layout that applies it.

Model code never names a mesh axis. Parameters carry logical axis names in their
``axes`` metadata; activations are pinned with `constrain(x, names)`. Both go through
`LOGICAL_AXIS_RULES`. A name with no rule is an error naming the parameter or
activation, never a silent replication.

Parameters and activations differ where the MoE needs them to: attention weights are
split on ``tp`` and replicated over ``ep`` while the batch is split over ``dp × ep``;
expert weights live on ``ep``; token groups enter the MoE block split over ``dp × ep``
(``group``) and leave dispatch split over ``dp`` only (``expert_group``), with the
experts on ``ep``: that change of layout is the all-to-all.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from dataclasses import dataclass, field
from types import MappingProxyType

from moe_jax.config import ModelConfig
from moe_jax.errors import ShardingError, nearest
from moe_jax.parallel.mesh import MESH_AXES, Strategy, kv_copies, kv_replicated

LOGICAL_AXIS_RULES = MappingProxyType({
    # parameters and activations
    "layers": ("pp",),          # L: stacked layers, one slice per pipeline stage
    "dense_layers": (),         # leading dense layers (DeepSeek-V3), run ahead of the pipeline: never split
    "embed": (),                # D: replicated
    "vocab": ("pp", "tp"),      # V: embedding and head split over every stage too (see axis_rules)
    "heads": ("tp",),           # H
    "kv_heads": ("tp",),        # K of the K/V weights (replicated instead when tp does not divide K: see axis_rules)
    "cache_heads": ("tp",),     # K·r: KV heads as the cache and k/v hold them, r = kv_copies (see axis_rules)
    "head_dim": (),             # Dh
    "mlp": ("tp",),             # F: expert (and shared expert) FFN width
    "expert": ("ep",),          # E
    "expert_all": (),           # E where every device needs all experts: router weights, tokens before dispatch
    "gate_up": (),              # the (gate, up) pair of SwiGLU input projections stored as one parameter
    # activations only
    "batch": ("dp", "ep"),      # B: ep acts as extra data parallelism outside the MoE block
    "length": (),               # S
    "cache_length": (),         # T
    "group": ("dp", "ep"),      # G: token groups entering the MoE block
    "group_tokens": (),         # Sg
    "expert_group": ("dp",),    # G after dispatch, when E owns ep
    "capacity": (),             # C
})
"""The rules table: logical axis name → mesh axes (in mesh order), () for replicated."""


def axis_rules(cfg: ModelConfig, strategy: Strategy) -> dict[str, tuple[str, ...]]:
    """`LOGICAL_AXIS_RULES` adjusted for one model and strategy.

    Two adjustments, both stated rules rather than silent fallbacks:
    - when tp exceeds the KV heads (K < tp, tp % K == 0), the K/V projection weights
      [K, Dh, D] (and a per-head K norm) are replicated over tp, while the KV cache and the
      k/v activations are laid out with K·r heads (``cache_heads``, r = tp / K copies of
      each, `Layout.kv_copies`) split over tp: each rank holds, and projects, only the one
      head its query heads read (`moe_jax.parallel.mesh.validate` admits only such tp values);
    - the vocabulary (embedding and output head) is split over pp × tp, so no stage
      keeps an idle copy and the head's FLOPs are shared by every stage; when pp × tp
      does not divide V it is split over tp only (replicated over the stages).
    """
    rules = dict(LOGICAL_AXIS_RULES)
    if kv_replicated(cfg, strategy):
        rules["kv_heads"] = ()
    if cfg.vocab_size % (strategy.pp * strategy.tp):
        rules["vocab"] = ("tp",)
    return rules


@dataclass(frozen=True)
class Layout:
    """Axis sizes (and, when executing, the Mesh) plus the rules that map logical names onto them."""

    axis_sizes: dict[str, int]
    """Mesh axis name → size, in mesh order."""
    rules: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(LOGICAL_AXIS_RULES))
    """Logical axis name → mesh axes."""
    mesh: object = None
    """The `jax.sharding.Mesh` when arrays are really placed; None to only compute specs."""
    kv_copies: int = 1
    """r: copies of each KV head along ``cache_heads`` (tp / K when tp exceeds the K KV heads, else 1);
    the cache holds K·r heads, head e a copy of head e // r (`moe_jax.parallel.mesh.kv_copies`)."""

    @property
    def stage_axes(self) -> tuple[str, ...]:
        """Mesh axes the stacked layers are split over (pipeline stages), those of size > 1."""
        return tuple(a for a in self.rules.get("layers", ()) if self.axis_sizes.get(a, 1) > 1)

    @property
    def stages(self) -> int:
        """Number of pipeline stages."""
        return self.size(self.stage_axes)

    def split_axes(self, name: str) -> tuple[str, ...]:
        """The mesh axes (those of size > 1) the rules split logical axis `name` over."""
        return tuple(a for a in self.rules.get(name, ()) if self.axis_sizes.get(a, 1) > 1)

    def without_axes(self, axes) -> Layout:
        """This layout with `axes` removed from every rule: for code inside shard_map, manual over `axes`."""
        rules = {name: tuple(a for a in mapped if a not in axes) for name, mapped in self.rules.items()}
        return dataclasses.replace(self, rules=rules)

    @classmethod
    def for_strategy(cls, cfg: ModelConfig, strategy: Strategy, mesh=None) -> Layout:
        """The layout of `cfg` under `strategy`, on `mesh` if given."""
        return cls(dict(strategy.mesh_shape), axis_rules(cfg, strategy), mesh, kv_copies(cfg, strategy))

    def _axes_for(self, name, what: str) -> tuple[str, ...]:
        if name is None:
            return ()
        try:
            return self.rules[name]
        except KeyError:
            raise ShardingError(f"{what}: logical axis {name!r} has no sharding rule"
                                f"{nearest(name, self.rules)}; known: {', '.join(self.rules)}") from None

    def spec(self, names, shape=None, *, what: str = "array", strict: bool = True):
        """PartitionSpec for an array with logical axis `names` and global `shape`.

        strict (parameters): a mesh split that does not divide the dimension is an error.
        not strict (activations): mesh axes are dropped from the right until the split
        divides the dimension (a decode batch of 1 cannot be split over ep; it is then
        replicated there), so small batches still run.
        """
        from jax.sharding import PartitionSpec

        if shape is not None and len(names) != len(shape):
            raise ShardingError(f"{what}: {len(names)} axis names {tuple(names)} for a rank-{len(shape)} array")
        entries = []
        for i, name in enumerate(names):
            axes = tuple(a for a in self._axes_for(name, what) if self.axis_sizes.get(a, 1) > 1)
            if shape is not None:
                if strict and shape[i] % self.size(axes):
                    raise ShardingError(f"{what}: dimension {i} ({name}) of size {shape[i]} cannot be split "
                                        f"{self.size(axes)} ways over mesh axes {axes}")
                while axes and shape[i] % self.size(axes):
                    axes = axes[:-1]
            entries.append(axes[0] if len(axes) == 1 else (axes or None))
        return PartitionSpec(*entries)

    def size(self, axes) -> int:
        """Number of shards over the given mesh axes."""
        return math.prod(self.axis_sizes.get(a, 1) for a in axes)

    def shards(self, name: str, dim: int) -> int:
        """How many ways an activation dimension of size `dim` named `name` is split."""
        spec = self.spec((name,), (dim,), strict=False)[0]
        return self.size((spec,) if isinstance(spec, str) else (spec or ()))

    def sharding(self, names, shape=None, *, what: str = "array", strict: bool = True):
        """NamedSharding on this layout's mesh."""
        from jax.sharding import NamedSharding

        if self.mesh is None:
            raise ShardingError("this layout has no mesh: it computes specs only")
        return NamedSharding(self.mesh, self.spec(names, shape, what=what, strict=strict))

    def param_specs(self, state):
        """PartitionSpec tree for an NNX parameter state (from each Variable's ``axes`` metadata)."""
        return map_params(state, lambda path, var: self.spec(
            _axes_of(path, var), var.shape, what=f"parameter {path}", strict=True))

    def param_shardings(self, state):
        """NamedSharding tree for an NNX parameter state."""
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), self.param_specs(state),
                            is_leaf=lambda x: isinstance(x, PartitionSpec))


def _axes_of(path: str, var) -> tuple:
    axes = var.get_metadata().get("axes")
    if axes is None:
        raise ShardingError(f"parameter {path} has no logical axis names (axes metadata)")
    return tuple(axes)


def _path_str(path) -> str:
    parts = []
    for p in path:
        key = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
        parts.append(str(key))
    return "/".join(parts)


def map_params(state, fn):
    """Apply fn(path, variable) to every nnx.Variable of `state`, keeping the tree structure."""
    import jax
    from flax import nnx

    def leaf(path, var):
        if not isinstance(var, nnx.Variable):
            raise ShardingError(f"parameter {_path_str(path)} is not an nnx.Variable")
        return fn(_path_str(path), var)

    return jax.tree_util.tree_map_with_path(leaf, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# --- the layout in force while a sharded program is traced ---------------------------

_CURRENT: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("moe_jax_layout", default=None)


@contextlib.contextmanager
def use_layout(layout: Layout | None):
    """Make `layout` the one `constrain` applies while tracing (None: unsharded, constraints off).

    The layout says how arrays are split, never what the model computes: whether it pipelines and which
    kernels it uses are fixed when it is built (`moe_jax.model.execution`).
    """
    token = _CURRENT.set(layout)
    try:
        yield layout
    finally:
        _CURRENT.reset(token)


def current_layout() -> Layout | None:
    """The layout set by `use_layout`, or None outside one."""
    return _CURRENT.get()


def constrain(x, names, what: str = "activation"):
    """Pin activation `x` to the layout of logical axes `names` (a no-op without a layout or mesh)."""
    layout = _CURRENT.get()
    if layout is None or layout.mesh is None:
        if layout is not None:
            layout.spec(names, x.shape, what=what, strict=False)  # still check every name has a rule
        return x
    import jax
    from jax.sharding import NamedSharding

    spec = layout.spec(names, x.shape, what=what, strict=False)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh_in_force(layout), spec))


def mesh_in_force(layout: Layout):
    """The mesh a sharding or a nested `jax.shard_map` must name while tracing under `layout`: inside shard_map
    (manual over pipeline stages, say) the abstract mesh in force there, whose manual axes the layout's rules have
    already dropped; elsewhere the layout's own mesh."""
    import jax

    abstract = jax.sharding.get_abstract_mesh()
    return abstract if not abstract.empty and abstract.manual_axes else layout.mesh


def activation_shards(name: str, dim: int) -> int:
    """How many ways the current layout splits an activation dimension `name` of size `dim` (1 without one)."""
    layout = _CURRENT.get()
    return 1 if layout is None else layout.shards(name, dim)


def batch_shards(batch: int) -> int:
    """How many ways the current layout splits a batch of `batch` sequences (1 without a layout)."""
    return activation_shards("batch", batch)


def kv_copies_in_force() -> int:
    """`Layout.kv_copies` of the current layout: copies of each KV head the cache holds (1 without a layout)."""
    layout = _CURRENT.get()
    return 1 if layout is None else layout.kv_copies


__all__ = ["LOGICAL_AXIS_RULES", "Layout", "axis_rules", "use_layout", "current_layout", "constrain", "mesh_in_force",
           "activation_shards", "batch_shards", "kv_copies_in_force", "MESH_AXES"]
