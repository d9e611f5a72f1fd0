"""What each device holds under a strategy: parameter shards, KV cache shard, and the work split.

Everything here follows from the model's parameter shapes, their logical axes and the
rules table: the same specs the sharded program is compiled with. No devices are
needed, so a 1024-device layout is described on a laptop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moe_jax.config import ModelConfig
from moe_jax.model.transformer import CACHE_AXES, cache_array_axes, cache_shape
from moe_jax.parallel.mesh import Strategy, kv_copies, kv_replicated, validate
from moe_jax.parallel.rules import Layout


@dataclass(frozen=True)
class ParamShard:
    """One parameter array and the shard of it each device holds."""

    path: str
    """Parameter path in the model, e.g. ``blocks/moe/w_gate_up_epfd``."""
    shape: tuple[int, ...]
    """Global shape."""
    axes: tuple[str, ...]
    """Logical axis names."""
    spec: tuple
    """Mesh axes per dimension (None: not split)."""
    local_shape: tuple[int, ...]
    """Shape of the shard one device holds."""
    bytes_per_device: int
    """Bytes of that shard."""


def local_shape(shape, spec, axis_sizes: dict[str, int]) -> tuple[int, ...]:
    """Shard shape of an array of `shape` split by PartitionSpec entries `spec`."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        out.append(dim // math.prod(axis_sizes[a] for a in axes))
    return tuple(out)


def param_shards(cfg: ModelConfig, strategy: Strategy) -> list[ParamShard]:
    """Every parameter of `cfg` with the shard each device holds under `strategy`."""
    import numpy as np

    from moe_jax.model.execution import SHAPES_ONLY
    from moe_jax.parallel.rules import map_params
    from moe_jax.programs.sharded import abstract_model

    layout = Layout.for_strategy(cfg, strategy)
    _, state = abstract_model(cfg, SHAPES_ONLY)
    rows = []

    def collect(path, var):
        axes = tuple(var.get_metadata()["axes"])
        spec = tuple(layout.spec(axes, var.shape, what=f"parameter {path}", strict=True))
        local = local_shape(var.shape, spec, layout.axis_sizes)
        rows.append(ParamShard(path, tuple(var.shape), axes, spec, local,
                               math.prod(local) * np.dtype(var.dtype).itemsize))

    map_params(state, collect)
    return rows


@dataclass(frozen=True)
class Placement:
    """The split of model and workload over one strategy's devices."""

    cfg: ModelConfig
    strategy: Strategy
    params: list[ParamShard]
    batch: int | None
    cache_len: int | None
    prompt_len: int | None = None

    @property
    def weight_bytes_per_device(self) -> int:
        """Parameter bytes one device holds (replicated arrays counted in full)."""
        return sum(p.bytes_per_device for p in self.params)

    @property
    def weight_bytes_total(self) -> int:
        """Bytes of the whole model, held once."""
        return self.cfg.weight_bytes

    @property
    def sequences_per_replica(self) -> int | None:
        """Sequences each data-parallel replica serves (batch / dp)."""
        return None if self.batch is None else self.batch // self.strategy.dp

    @property
    def batch_split(self) -> int:
        """How many ways the batch is split outside the MoE block (dp, times ep when the batch allows)."""
        return 1 if self.batch is None else Layout.for_strategy(self.cfg, self.strategy).shards("batch", self.batch)

    @property
    def sequences_per_device(self) -> int | None:
        """Sequences one device's attention works on (batch / batch_split)."""
        return None if self.batch is None else self.batch // self.batch_split

    @property
    def kv_cache_shape_per_device(self) -> tuple[int, ...] | None:
        """[L, B, K, T, Dh] of the KV cache shard one device holds (the keys; the values are [L, B, K, Dh, T],
        `moe_jax.model.transformer.cache_shape`): of the cache's K·r heads
        (r = `kv_copies`, tp / K when tp exceeds K), split over tp, the K / tp heads (or the one head) its
        query heads read. With ring arrays (sliding or chunked layers, `cache_shape`), the full layers' (the rings'
        when every layer has one); `kv_cache_bytes_per_device` counts them all."""
        if self.batch is None or self.cache_len is None:
            return None
        cfg = self.cfg
        layout = Layout.for_strategy(cfg, self.strategy)
        shapes = cache_shape(cfg, self.batch, self.cache_len, kv_copies=layout.kv_copies, stages=self.strategy.pp)
        shape = (shapes["k"] if "k" in shapes else shapes["local_k"]).shape       # every layer a ring layer
        return local_shape(shape, layout.spec(CACHE_AXES, shape, strict=False), layout.axis_sizes)

    @property
    def kv_cache_bytes_per_device(self) -> int | None:
        """KV cache bytes one device holds: every array of `cache_shape` (k and v; MLA's latent and RoPE key,
        which differ in width; the dense first layers' arrays), each as its sharding splits it."""
        if self.batch is None or self.cache_len is None:
            return None
        cfg = self.cfg
        layout = Layout.for_strategy(cfg, self.strategy)
        total = 0
        for name, array in cache_shape(cfg, self.batch, self.cache_len, kv_copies=layout.kv_copies,
                                       stages=self.strategy.pp).items():
            axes = cache_array_axes(name)
            local = local_shape(array.shape, layout.spec(axes, array.shape, strict=False), layout.axis_sizes)
            total += math.prod(local) * array.dtype.itemsize
        return total

    def facts(self) -> dict:
        """The exact shard, in words a person checks: layers, experts, expert slice, heads, vocabulary."""
        cfg, s = self.cfg, self.strategy
        copies = kv_copies(cfg, s)
        K_local = cfg.num_kv_heads * copies // s.tp              # 1 when tp exceeds K: each rank's own head
        vocab_split = Layout.for_strategy(cfg, s).shards("vocab", cfg.vocab_size)
        facts = {
            # the stage's share of the layer stack (pp splits it: MoE layers and any dense ones interleaved) and every
            # dense first layer (each stage holds them)
            "layers_per_stage": cfg.stack_layers // s.pp + cfg.first_dense_layers,
            "experts_per_device_per_layer": cfg.num_experts // s.ep,
            "expert_ffn_columns_per_device": cfg.expert_ffn // s.tp,
            "expert_fraction_per_device": f"{cfg.num_experts // s.ep}/{cfg.num_experts} experts x "
                                          f"{cfg.expert_ffn // s.tp}/{cfg.expert_ffn} FFN columns",
            "query_heads_per_device": cfg.num_heads // s.tp,
            "kv_heads_per_device": K_local,
            # True when tp exceeds K: each KV head (cache and projection) is held by kv_head_copies tp ranks,
            # those whose query heads read it; a rank never holds the other heads' cache. The K/V weights
            # [K, Dh, D] themselves are whole on every rank (see `moe_jax.model.layers.repeat_kv_heads`).
            "kv_heads_replicated_over_tp": kv_replicated(cfg, s),
            "kv_head_copies": copies,
            "vocab_rows_per_device": cfg.vocab_size // vocab_split,
            "vocab_split": vocab_split,
            "weight_bytes_per_device": self.weight_bytes_per_device,
            "weight_bytes_total": self.weight_bytes_total,
        }
        if self.batch is not None:
            facts.update(batch=self.batch, sequences_per_replica=self.sequences_per_replica,
                         batch_split=self.batch_split, sequences_per_device=self.sequences_per_device)
        if self.batch is not None and self.prompt_len is not None and s.pp > 1:
            from moe_jax.model.pipeline import schedule

            facts.update(pipeline_prefill=schedule(cfg, s, self.batch, self.prompt_len, decode=False).to_dict(),
                         pipeline_decode=schedule(cfg, s, self.batch, 1, decode=True).to_dict())
        if self.kv_cache_bytes_per_device is not None:
            facts.update(cache_len=self.cache_len, kv_cache_shape_per_device=list(self.kv_cache_shape_per_device),
                         kv_cache_bytes_per_device=self.kv_cache_bytes_per_device,
                         kv_bytes_per_sequence=cfg.kv_bytes(self.cache_len, s.pp),
                         ring_len=cfg.local_cache_len(self.cache_len, s.pp))
        return facts

    def to_dict(self) -> dict:
        """JSON-ready description."""
        from moe_jax.parallel.mesh import strategy_dict

        return {
            "model": self.cfg.name,
            "strategy": strategy_dict(self.strategy),
            "params_total": self.cfg.params_total,
            "params_active": self.cfg.params_active,
            "facts": self.facts(),
            "params": [{"path": p.path, "shape": list(p.shape), "axes": list(p.axes),
                        "spec": [list(e) if isinstance(e, tuple) else e for e in p.spec],
                        "local_shape": list(p.local_shape), "bytes_per_device": p.bytes_per_device}
                       for p in self.params],
        }


def describe(cfg: ModelConfig, strategy: Strategy, *, batch: int | None = None,
             cache_len: int | None = None, prompt_len: int | None = None) -> Placement:
    """Validate `strategy` for `cfg` (and `batch`) and describe what each device holds.

    cache_len: KV cache positions (prompt + generated); prompt_len: for the pipeline schedule.
    """
    validate(strategy, cfg, batch=batch)
    return Placement(cfg, strategy, param_shards(cfg, strategy), batch, cache_len, prompt_len)
