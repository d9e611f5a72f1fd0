"""Parallel strategies (ep, tp, pp, dp): parsing, validation against a model, and the device mesh.

Mesh axes are always ordered ``dp, pp, ep, tp`` from outermost to innermost, so the
innermost (``tp``) lands on neighbouring devices and stays inside a node.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from moe_jax.config import ModelConfig
from moe_jax.errors import StrategyError, nearest
from moe_jax.names import MESH_AXES, Backend

"""Mesh axis names, outermost first."""

MAX_STRATEGY_DEVICES = 1 << 24
"""Largest device count a strategy may name (16M: beyond any cluster, small enough to stay exact)."""

_TOKEN = re.compile(r"^(ep|tp|pp|dp)(\d+)$")


def divisors(n: int) -> list[int]:
    """All positive divisors of n, ascending (O(√n), so absurd sizes do not hang)."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


@dataclass(frozen=True)
class Strategy:
    """How many ways each parallelism splits the work; the product is the device count."""

    ep: int = 1
    """Expert parallelism: experts split over this many devices; tokens move by all-to-all."""
    tp: int = 1
    """Tensor parallelism: heads, expert FFN width and vocabulary split over this many devices."""
    pp: int = 1
    """Pipeline parallelism: layers split into this many stages."""
    dp: int = 1
    """Data parallelism: independent replicas, each serving its share of the batch."""

    def __post_init__(self):
        for axis in ("ep", "tp", "pp", "dp"):
            value = getattr(self, axis)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StrategyError(f"{axis}={value!r} must be a positive integer")
        if self.num_devices > MAX_STRATEGY_DEVICES:
            raise StrategyError(f"{self.name} uses {self.num_devices:,} devices; at most "
                                f"{MAX_STRATEGY_DEVICES:,} are supported")

    @property
    def num_devices(self) -> int:
        """ep · tp · pp · dp."""
        return self.ep * self.tp * self.pp * self.dp

    @property
    def name(self) -> str:
        """Canonical name, e.g. ``EP64-TP8-PP2-DP1``."""
        return f"EP{self.ep}-TP{self.tp}-PP{self.pp}-DP{self.dp}"

    @property
    def mesh_shape(self) -> dict[str, int]:
        """Axis sizes in mesh order (dp, pp, ep, tp)."""
        return {axis: getattr(self, axis) for axis in MESH_AXES}

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str) -> Strategy:
        """Parse ``EP64-TP8-PP2-DP1`` (any order, any case, ``-``/``_``/``,``/space separated).

        Axes left out are 1. Each axis may appear once.
        """
        if not isinstance(text, str) or not text.strip():
            raise StrategyError("empty strategy; expected something like EP64-TP8-PP2-DP1")
        sizes: dict[str, int] = {}
        for token in re.split(r"[-_,\s]+", text.strip().lower()):
            if not token:
                continue
            m = _TOKEN.match(token)
            if not m:
                raise StrategyError(f"cannot parse {token!r} in strategy {text!r}; expected tokens like "
                                    "EP64, TP8, PP2, DP1 (axis ep/tp/pp/dp followed by a positive integer)")
            axis, size = m.group(1), int(m.group(2))
            if axis in sizes:
                raise StrategyError(f"axis {axis} given twice in strategy {text!r}")
            if size < 1:
                raise StrategyError(f"{axis}{size} in strategy {text!r}: sizes must be >= 1")
            sizes[axis] = size
        return cls(**sizes)

    @classmethod
    def from_toml(cls, path: str | Path) -> Strategy:
        """Read a strategy file: a ``[strategy]`` table (or top-level keys) with ep, tp, pp, dp."""
        from moe_jax.files import read_toml

        path = Path(path)
        data = read_toml(path, "strategy file", StrategyError)
        known = {"ep", "tp", "pp", "dp", "name", "description"}
        if "strategy" in data:
            extra = [k for k in data if k != "strategy"]
            if extra:
                raise StrategyError(f"strategy file {str(path)!r}: unknown top-level key {extra[0]!r}; "
                                    "put ep, tp, pp, dp (and name, description) in the [strategy] table")
        table = data.get("strategy", data)
        if not isinstance(table, dict):
            raise StrategyError(f"strategy file {str(path)!r}: [strategy] must be a table")
        for key in table:
            if key not in known:
                raise StrategyError(f"strategy file {str(path)!r}: unknown key {key!r}"
                                    f"{nearest(key, known)}; valid keys: ep, tp, pp, dp, name, description")
        sizes = {}
        for axis in ("ep", "tp", "pp", "dp"):
            value = table.get(axis, 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StrategyError(f"strategy file {str(path)!r}: {axis}={value!r} must be a positive integer")
            sizes[axis] = value
        return cls(**sizes)

    @classmethod
    def load(cls, spec: str | Path | Strategy) -> Strategy:
        """A Strategy from a name like ``EP8-TP2`` or a path to a TOML strategy file."""
        if isinstance(spec, Strategy):
            return spec
        text = str(spec)
        try:
            is_file = Path(text).is_file()
        except (OSError, ValueError):                        # e.g. a name too long for the file system
            is_file = False
        if text.endswith(".toml") or is_file:
            return cls.from_toml(text)
        return cls.parse(text)


def _valid_tp(cfg: ModelConfig) -> list[int]:
    """tp values that split heads, expert width and vocabulary, with K divisible by tp or tp by K."""
    return [t for t in divisors(cfg.num_heads)
            if cfg.expert_ffn % t == 0 and cfg.vocab_size % t == 0
            and (cfg.num_kv_heads % t == 0 or t % cfg.num_kv_heads == 0)]


def kv_replicated(cfg: ModelConfig, strategy: Strategy) -> bool:
    """True when tp exceeds the KV heads (K < tp, so tp does not divide K): each KV head is then read by the
    query heads of tp / K tp ranks and held by each of them (`kv_copies` of it), one head per rank.
    The K/V projection weights stay whole (replicated over tp); the cache is not."""
    return cfg.num_kv_heads % strategy.tp != 0


def kv_copies(cfg: ModelConfig, strategy: Strategy) -> int:
    """r: how many tp ranks hold each KV head. 1 when tp divides K (each rank holds K / tp heads of its own);
    tp / K when tp exceeds K: the cache and the k/v activations are laid out with K·r heads, head e a copy
    of head e // r, split over tp, so each rank holds exactly the one head its H / tp query heads read."""
    return strategy.tp // cfg.num_kv_heads if kv_replicated(cfg, strategy) else 1


def validate(strategy: Strategy, cfg: ModelConfig, *, batch: int | None = None,
             num_devices: int | None = None) -> None:
    """Check that `strategy` can split `cfg` (and `batch` sequences over `num_devices`).

    Every failing constraint is reported, each naming the bad value and the valid choices.

    Rules: ep divides E; tp divides H, F and V, and either tp divides K or K divides tp
    (then each KV head is held by the tp / K ranks that read it: `kv_copies`); pp divides L
    (at most L stages); dp divides the batch; ep·tp·pp·dp equals the device count.
    """
    problems = []
    E, H, K, L = cfg.num_experts, cfg.num_heads, cfg.num_kv_heads, cfg.moe_layers   # pp splits the MoE layers
    if E % strategy.ep:
        problems.append(f"ep={strategy.ep} does not divide {E} experts; valid ep: "
                        f"{', '.join(map(str, divisors(E)))}")
    if strategy.tp not in _valid_tp(cfg):
        why = []
        if H % strategy.tp:
            why.append(f"{H} query heads")
        if cfg.expert_ffn % strategy.tp:
            why.append(f"expert FFN width {cfg.expert_ffn}")
        if cfg.vocab_size % strategy.tp:
            why.append(f"vocabulary {cfg.vocab_size}")
        if not why:
            why.append(f"{K} KV heads (neither divides the other)")
        problems.append(f"tp={strategy.tp} does not divide {' and '.join(why)}; valid tp: "
                        f"{', '.join(map(str, _valid_tp(cfg)))}")
    # with moe_interleave I > 1 the stages split groups of I layers (I - 1 dense, then MoE), one per MoE layer
    unit = "layers" if cfg.moe_interleave == 1 else f"groups of {cfg.moe_interleave} layers (dense then MoE)"
    if strategy.pp > L:
        problems.append(f"pp={strategy.pp} is more stages than the {L} {unit}; valid pp: "
                        f"{', '.join(map(str, divisors(L)))}")
    elif L % strategy.pp:
        problems.append(f"pp={strategy.pp} does not divide {L} {unit}; valid pp: "
                        f"{', '.join(map(str, divisors(L)))}")
    if batch is not None:
        if batch < 1:
            problems.append(f"batch={batch} must be at least 1")
        elif batch % strategy.dp:
            problems.append(f"dp={strategy.dp} does not divide batch {batch}; valid dp: "
                            f"{', '.join(map(str, divisors(batch)))}")
    if num_devices is not None and strategy.num_devices != num_devices:
        problems.append(f"{strategy.name} uses ep·tp·pp·dp = {strategy.num_devices} devices, "
                        f"but {num_devices} were given")
    if problems:
        raise StrategyError(f"strategy {strategy.name} does not fit model {cfg.name!r}:\n  - "
                            + "\n  - ".join(problems))


def build_mesh(strategy: Strategy, devices=None, *, physical: bool = False):
    """A `jax.sharding.Mesh` with axes (dp, pp, ep, tp) over `devices` (default: all of jax's devices).

    With ``physical``, jax's device-mesh helper orders the devices by the machine's topology
    (TPU torus coordinates, GPU hosts), innermost axis on the closest devices, so ``tp``
    neighbours are physical neighbours; where it cannot (a part of a TPU slice), and without
    it, devices are laid out in the order given, so ``tp`` neighbours are consecutive devices.
    Axis types are Auto (the GSPMD partitioner places what the rules do not pin).
    """
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh

    devices = list(jax.devices() if devices is None else devices)
    if len(devices) != strategy.num_devices:
        hint = ""
        if jax.default_backend() == Backend.CPU:
            hint = (f"; for fake CPU devices set XLA_FLAGS=--xla_force_host_platform_device_count="
                    f"{strategy.num_devices} before jax starts")
        raise StrategyError(f"{strategy.name} needs {strategy.num_devices} devices, "
                            f"but {len(devices)} are available{hint}")
    shape = tuple(strategy.mesh_shape.values())
    grid = np.array(devices, dtype=object).reshape(shape)
    if physical:
        from jax.experimental import mesh_utils

        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError, KeyError):
            pass                          # no physical layout known for these devices: the order given
    return Mesh(grid, MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def strategy_dict(strategy: Strategy) -> dict:
    """JSON-ready form of a strategy."""
    return {"name": strategy.name, **dataclasses.asdict(strategy), "devices": strategy.num_devices}
