"""Disaggregated serving (`plan --disaggregated`): a prefill pool and a decode pool, each with its own strategy.

1. **Replica sizes**: the divisors n of the device count N (below N with a device budget, so that both pools
   fit) at which a replica serves a whole number of sequences, ``b = B · n / N`` (B: the plan's batch; every
   replica runs at the aggregated plan's sequences per device, so the two deployments are compared at the same
   load per device). Every valid strategy of each size is estimated (`moe_jax.planner.search.estimate`) at b.
2. **Each phase ranked on its own figure**, among strategies whose estimate fits the device memory, those meeting
   the phase's SLO first: prefill by prompts per second per device (b / TTFT / n; the TTFT SLO), decode by decode
   tokens/s per device (b / TPOT / n; the TPOT SLO). The best `top` of each phase (one per ep, tp, pp: more dp
   only copies a smaller replica), and the one whose pools, sized with the other phase's leader, serve the most
   (`best_sizing`: a replica too large to fill the budget loses to a smaller one), are compiled (the planner's
   compile path and cache, `moe_jax.planner.workers.compile_all`) and re-ranked on their compiled figures.
3. **Requests/s per replica** (from the compiled figures): a prefill replica runs b prompts per prefill call,
   ``r_P = b / TTFT``; a decode replica holds b sequences, each for G decode steps, ``r_D = b / (G × TPOT)``.
4. **Pools** (`size_pools`): x prefill replicas of P devices and y decode replicas of D devices. With a device
   budget N: x, y ≥ 1 with xP + yD ≤ N chosen to maximise the served rate ``min(x r_P, y r_D)`` (fewest devices
   among equals). With a request rate R: ``x = ⌈R / r_P⌉``, ``y = ⌈R / r_D⌉``. Every pair of compiled
   finalists is sized; the pair serving the most requests/s (with a rate: needing the fewest devices) wins,
   pairs meeting the SLOs (TTFT with the KV transfer) first.
5. **KV transfer** (`kv_transfer`): a request's cache, ``prompt tokens × kv_bytes_per_token`` bytes (a sliding or
   chunked layer's ring only: `ModelConfig.kv_bytes`), moves from
   the prefill replica's shards to the decode replica's. The shards of one sequence's cache on a strategy are
   its cache bytes (`ModelConfig.kv_bytes` at cache_len) over what one device holds of one sequence (the compiled
   placement's; tp and pp split it, KV heads copied over tp count once); each device sends (receives) its shard
   at once over its own link, so the larger of a sending and a receiving device's share crosses one link, a
   point-to-point send/recv on the tier (`moe_jax.perf.collectives.collective_seconds`, collective-permute:
   the tier's call overhead + latency + bytes / (bandwidth × efficiency), or a calibrated fit). The tier: the
   node link when the whole deployment (xP + yD devices, pools placed one after the other) sits in one node of
   the hardware's ``devices_per_node``, otherwise the network link (the pools on different nodes). The time is
   added to the prefill's TTFT.
6. **Comparison** with the best aggregated deployment on the same devices: of the plan's compiled strategies
   (one mesh doing both phases, over N devices unless the plan's objective chose fewer), the one serving the
   most requests/s per device, ``r_A = B / (TTFT + G × TPOT)`` per mesh (its static batch: prefill then G
   decode steps), those meeting the SLOs first. With a budget the two are compared on requests/s served by N
   devices (as many copies of the aggregated mesh as N holds); with a rate, on the devices each needs to serve
   it (aggregated: ⌈R / r_A⌉ copies of its mesh). Tokens/s per device: served requests/s × G over the
   devices used.

Not modelled: queueing, continuous batching's mixing of phases in the aggregated deployment, overlap of the
transfer with the prefill's compute (layer by layer), and the links' load from many transfers at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from moe_jax.costs.compile import Workload
from moe_jax.errors import MoeJaxError
from moe_jax.hardware.presets import Hardware
from moe_jax.parallel.mesh import Strategy, divisors
from moe_jax.planner.result import PlanResult
from moe_jax.planner.spec import SearchSpec
from moe_jax.planner.workers import Progress, compile_all

PHASES = ("prefill", "decode")


def check_rate(rate: float | None) -> float | None:
    """`rate` (requests/s) if it is None or a positive finite number; a `MoeJaxError` naming it otherwise."""
    if rate is None:
        return None
    if not (isinstance(rate, int | float) and 0 < rate < float("inf")):
        raise MoeJaxError(f"--rate {rate!r} must be a positive number of requests per second, e.g. 10 or 0.5")
    return float(rate)


@dataclass
class PhaseCandidate:
    """One strategy considered for one phase's pool: its estimate (which shortlists it) and compiled figures."""

    phase: str
    strategy: str
    devices: int
    batch: int
    gen_len: int
    estimate: dict
    """``fits``, ``ttft_s``, ``tpot_s``, ``memory_bytes`` of the analytic estimate."""
    slo_ttft: float | None = None
    slo_tpot: float | None = None
    compiled: dict | None = None
    """The same figures from the compiled programs, once compiled."""
    analysis: dict | None = field(default=None, repr=False)
    """The compiled analyze JSON (not in this object's JSON: the shards come from its placement)."""

    @property
    def figures(self) -> dict:
        """The compiled figures when there are some, else the estimate."""
        return self.compiled or self.estimate

    def requests_per_s(self, figures: dict | None = None) -> float:
        """Requests/s one replica serves in its phase: B / TTFT (prefill), B / (G × TPOT) (decode)."""
        f = figures or self.figures
        seconds = f["ttft_s"] if self.phase == "prefill" else self.gen_len * f["tpot_s"]
        return self.batch / seconds if seconds and 0 < seconds < float("inf") else 0.0

    def per_device(self, figures: dict | None = None) -> float:
        """The ranking figure: prompts/s per device (prefill), decode tokens/s per device (decode)."""
        f = figures or self.figures
        rate = self.requests_per_s(f)
        return (rate if self.phase == "prefill" else rate * self.gen_len) / self.devices

    def meets_slo(self, figures: dict | None = None) -> bool:
        """This phase's SLO (prefill: TTFT before the transfer; decode: TPOT) is met."""
        f = figures or self.figures
        if self.phase == "prefill":
            return self.slo_ttft is None or f["ttft_s"] <= self.slo_ttft
        return self.slo_tpot is None or f["tpot_s"] <= self.slo_tpot

    def rank_key(self, figures: dict | None = None) -> tuple:
        """Fitting first, then meeting the SLO, then the most per device, then the fewest devices."""
        f = figures or self.figures
        return (not f["fits"], not self.meets_slo(f), -self.per_device(f), self.devices, self.strategy)

    def record_compiled(self, analysis: dict) -> None:
        """Take the compiled program's figures (analyze JSON)."""
        total = analysis["memory"]["total"]
        self.analysis = analysis
        self.compiled = {"fits": bool(analysis["fits"]) and total is not None,
                         "ttft_s": analysis["ttft_s"] or float("inf"), "tpot_s": analysis["tpot_s"] or float("inf"),
                         "memory_bytes": total or 0}

    def to_dict(self) -> dict:
        """JSON-ready: strategy, devices, estimate and compiled figures, requests/s per replica and the ranking
        figure (from the compiled figures when compiled)."""
        out = {"phase": self.phase, "strategy": self.strategy, "devices": self.devices, "batch": self.batch,
               "estimate": self.estimate, "compiled": self.compiled,
               "requests_per_s": self.requests_per_s(), "meets_slo": self.meets_slo()}
        out["prompts_per_s_per_device" if self.phase == "prefill" else "tokens_per_s_per_device"] = self.per_device()
        return out


@dataclass(frozen=True)
class Pools:
    """How many replicas of each phase, what each pool serves, and what the deployment serves."""

    prefill_replicas: int
    prefill_replica_devices: int
    decode_replicas: int
    decode_replica_devices: int
    prefill_rate: float
    """Requests/s the prefill pool serves: prefill_replicas × its replica's rate."""
    decode_rate: float
    """Requests/s the decode pool serves."""
    budget: int | None = None
    """The device budget sized for (None: sized for `rate`)."""
    rate: float | None = None
    """The request rate sized for (None: sized for the budget)."""

    @property
    def prefill_devices(self) -> int:
        return self.prefill_replicas * self.prefill_replica_devices

    @property
    def decode_devices(self) -> int:
        return self.decode_replicas * self.decode_replica_devices

    @property
    def devices(self) -> int:
        """Devices the two pools use."""
        return self.prefill_devices + self.decode_devices

    @property
    def served_rate(self) -> float:
        """Requests/s the deployment serves: the slower pool's."""
        return min(self.prefill_rate, self.decode_rate)

    @property
    def limited_by(self) -> str:
        """The pool that sets the served rate."""
        return "prefill" if self.prefill_rate < self.decode_rate else "decode"

    def to_dict(self) -> dict:
        """JSON-ready, with the derived device counts and served rate."""
        return {**asdict(self), "prefill_devices": self.prefill_devices, "decode_devices": self.decode_devices,
                "devices": self.devices, "served_rate": self.served_rate, "limited_by": self.limited_by,
                "idle_devices": None if self.budget is None else self.budget - self.devices}


def size_pools(prefill_rate: float, prefill_devices: int, decode_rate: float, decode_devices: int, *,
               budget: int | None = None, rate: float | None = None) -> Pools | None:
    """Size the pools from one replica's requests/s and devices per phase, for a device `budget` (x, y ≥ 1,
    xP + yD ≤ budget, the most requests/s served, then the fewest devices) or a request `rate`
    (x = ⌈rate / r_P⌉, y = ⌈rate / r_D⌉). None when the budget holds no replica of each, or a rate is 0."""
    if (budget is None) == (rate is None):
        raise ValueError("size_pools needs a budget or a rate, not both")
    P, D = prefill_devices, decode_devices
    if rate is not None:
        if prefill_rate <= 0 or decode_rate <= 0:
            return None
        x, y = math.ceil(rate / prefill_rate - 1e-12), math.ceil(rate / decode_rate - 1e-12)
        return Pools(x, P, y, D, x * prefill_rate, y * decode_rate, rate=rate)
    best = None
    for x in range(1, (budget - D) // P + 1):
        y = (budget - x * P) // D
        pools = Pools(x, P, y, D, x * prefill_rate, y * decode_rate, budget=budget)
        if best is None or (pools.served_rate, -pools.devices) > (best.served_rate, -best.devices):
            best = pools
    return best


@dataclass(frozen=True)
class KvTransfer:
    """Moving one request's KV cache from its prefill replica to its decode replica."""

    prompt_len: int
    kv_bytes_per_token: int
    bytes_per_request: int
    """prompt_len × kv_bytes_per_token, less the positions before a sliding or chunked layer's ring."""
    prefill_shards: float
    """Devices of the prefill replica one sequence's cache is split over (distinct parts)."""
    decode_shards: float
    """Devices of the decode replica one sequence's cache is split over."""
    bytes_per_link: float
    """The most one link carries: bytes_per_request / the smaller shard count."""
    tier: str
    """``node`` or ``network``."""
    link: str
    """The link's name (NVLink4, InfiniBand NDR ...)."""
    bandwidth: float
    """Bytes/s one device sends on the tier (line rate)."""
    efficiency: float
    latency_s: float
    call_overhead_s: float
    seconds: float
    """Time to move one request's cache: what the TTFT gains."""
    batch_seconds: float
    """Time if the whole prefill batch's caches leave at once (each prefill device sends all its sequences'
    shards): the last request's wait, not added to the TTFT."""
    algorithm: str
    why: str
    """Why this tier."""

    def to_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)


def cache_shards(analysis: dict) -> float:
    """Devices one sequence's KV cache is split over on a compiled strategy (analyze JSON): the cache of one
    sequence (`ModelConfig.kv_bytes`: cache_len × kv_bytes_per_token, a sliding or chunked layer's ring only) over
    what one device holds of it."""
    p = analysis["placement"]
    per_sequence = p["kv_cache_bytes_per_device"] / p["sequences_per_device"]
    return p["kv_bytes_per_sequence"] / per_sequence


def kv_transfer(hw: Hardware, prompt_len: int, kv_bytes_per_token: int, prefill_shards: float,
                decode_shards: float, *, devices: int, sequences_per_prefill_device: int = 1,
                nbytes: int | None = None) -> KvTransfer:
    """Time moving one request's KV cache between the pools (see the module docstring, item 5): `devices` is
    the deployment's (both pools, placed one after the other); the node tier when they fit one node.
    nbytes: the request's cache, by default prompt_len × kv_bytes_per_token (`ModelConfig.kv_bytes` where
    sliding or chunked layers send only their rings)."""
    from moe_jax.perf.collectives import Span, collective_seconds

    nbytes = prompt_len * kv_bytes_per_token if nbytes is None else nbytes
    per_link = nbytes / min(prefill_shards, decode_shards)
    if devices <= hw.devices_per_node:
        tier, link, span = "node", hw.node_link, Span(2, 1, 2)
        why = f"both pools ({devices} devices) fit in one node of {hw.devices_per_node}"
    else:
        tier, link, span = "network", hw.network_link, Span(2, 2, 1)
        why = (f"the pools ({devices} devices) span more than one node of {hw.devices_per_node}: placed on "
               "different nodes, each transfer crosses the network")
    seconds, algorithm = collective_seconds("collective-permute", per_link, span, hw)
    batch_seconds = collective_seconds("collective-permute", per_link * sequences_per_prefill_device, span, hw)[0]
    return KvTransfer(prompt_len, kv_bytes_per_token, nbytes, prefill_shards, decode_shards, per_link, tier,
                      link.name, link.bandwidth, link.efficiency, link.latency_s, link.call_overhead_s, seconds,
                      batch_seconds, algorithm, why)


@dataclass
class Deployment:
    """One disaggregated deployment: the pair, the pools, the transfer, and the figures a user sees."""

    prefill: PhaseCandidate
    decode: PhaseCandidate
    pools: Pools
    kv: KvTransfer
    slo_ttft: float | None = None
    slo_tpot: float | None = None

    @property
    def ttft_s(self) -> float:
        """The prefill's compiled TTFT plus the KV transfer."""
        return self.prefill.figures["ttft_s"] + self.kv.seconds

    @property
    def tpot_s(self) -> float:
        return self.decode.figures["tpot_s"]

    @property
    def meets_slo(self) -> bool:
        return ((self.slo_ttft is None or self.ttft_s <= self.slo_ttft)
                and (self.slo_tpot is None or self.tpot_s <= self.slo_tpot))

    def figures(self, gen_len: int) -> dict:
        """Requests/s, TTFT, TPOT, tokens/s per device, devices: as the comparison shows them."""
        served = self.pools.served_rate if self.pools.rate is None else self.pools.rate
        return {"requests_per_s": served, "ttft_s": self.ttft_s, "tpot_s": self.tpot_s,
                "tokens_per_s_per_device": served * gen_len / self.pools.devices, "devices": self.pools.devices,
                "meets_slo": self.meets_slo}


def aggregated_rate(analysis: dict) -> float:
    """Requests/s one aggregated mesh serves: B / (TTFT + G × TPOT)."""
    w = analysis["workload"]
    seconds = (analysis["ttft_s"] or 0) + w["gen_len"] * (analysis["tpot_s"] or 0)
    return w["batch"] / seconds if seconds > 0 else 0.0


def best_aggregated(result: PlanResult) -> dict | None:
    """Of the plan's compiled strategies that fit, the one serving the most requests/s per device (those meeting
    the SLOs first); its analyze JSON, or None."""
    spec = result.spec
    fitting = [e["analysis"] for e in result.compiled.values() if e["analysis"]["fits"] and e["analysis"]["ttft_s"]]
    return min(fitting, key=lambda a: (not spec.meets_slo(a["ttft_s"], a["tpot_s"]),
                                       -aggregated_rate(a) / a["strategy"]["devices"], a["strategy"]["name"]),
               default=None)


def aggregated_figures(analysis: dict, rate: float | None, budget: int) -> dict:
    """The aggregated deployment's figures: as many copies of its mesh as the `budget` holds (one, for a plan
    over the budget's devices), or ⌈R / r_A⌉ copies with a `rate`."""
    n, G = analysis["strategy"]["devices"], analysis["workload"]["gen_len"]
    r = aggregated_rate(analysis)
    copies = max(1, budget // n) if rate is None else math.ceil(rate / r - 1e-12)
    served = r * copies if rate is None else rate
    return {"strategy": analysis["strategy"]["name"], "requests_per_s": served, "requests_per_s_per_mesh": r,
            "copies": copies, "ttft_s": analysis["ttft_s"], "tpot_s": analysis["tpot_s"],
            "tokens_per_s_per_device": served * G / (copies * n), "devices": copies * n}


def compare(disagg: dict, agg: dict | None, *, rate: float | None, budget: int) -> dict:
    """Which deployment wins and by how much: with a budget, on requests/s served by the same devices; with a
    rate, on the devices each needs (then tokens/s per device)."""
    if agg is None:
        return {"disaggregated": disagg, "aggregated": None, "winner": "disaggregated", "ratio": None,
                "statement": "no aggregated strategy on these devices fits, so only the disaggregated deployment "
                             "serves"}
    ttft = f"TTFT {disagg['ttft_s'] * 1e3:,.4g} ms vs {agg['ttft_s'] * 1e3:,.4g} ms"
    tpot = f"TPOT {disagg['tpot_s'] * 1e3:,.4g} ms vs {agg['tpot_s'] * 1e3:,.4g} ms"
    if rate is None:
        d, a = disagg["requests_per_s"], agg["requests_per_s"]
        what = f"{d:,.4g} vs {a:,.4g} requests/s on {budget:,} devices"
    else:
        d, a = 1 / disagg["devices"], 1 / agg["devices"]           # fewer devices wins: compare their inverse
        if disagg["devices"] == agg["devices"]:
            d, a = disagg["tokens_per_s_per_device"], agg["tokens_per_s_per_device"]
        what = (f"{disagg['devices']:,} vs {agg['devices']:,} devices for {rate:g} requests/s "
                f"({disagg['tokens_per_s_per_device']:,.4g} vs {agg['tokens_per_s_per_device']:,.4g} tokens/s per "
                "device)")
    if math.isclose(d, a, rel_tol=1e-9):
        winner, ratio = "tie", 1.0
        statement = f"disaggregated and aggregated ({agg['strategy']}) tie: {what}; {ttft}, {tpot}"
    else:
        winner = "disaggregated" if d > a else "aggregated"
        ratio = max(d, a) / min(d, a) if min(d, a) > 0 else float("inf")
        loser = "aggregated " + agg["strategy"] if winner == "disaggregated" else "disaggregated"
        gain = (f"{ratio:.3g}x the requests/s" if rate is None else
                f"{1 - 1 / ratio:.1%} fewer devices" if disagg["devices"] != agg["devices"] else
                f"{ratio:.3g}x the tokens/s per device")
        than = "of" if rate is None or disagg["devices"] == agg["devices"] else "than"
        statement = f"{winner} wins: {gain} {than} the {loser} deployment ({what}); {ttft}, {tpot}"
    if rate is not None and agg["copies"] == 1 and agg["requests_per_s_per_mesh"] > rate:
        statement += (f" (one aggregated mesh of {agg['devices']:,} devices serves "
                      f"{agg['requests_per_s_per_mesh']:,.4g} requests/s, more than {rate:g}: plan with fewer "
                      "--devices for a smaller aggregated mesh)")
    return {"disaggregated": disagg, "aggregated": agg, "winner": winner, "ratio": ratio, "statement": statement}


@dataclass
class Disaggregated:
    """What `plan --disaggregated` found."""

    devices: int
    rate: float | None
    workload: dict
    slo_ttft: float | None
    slo_tpot: float | None
    chosen: Deployment | None
    candidates: dict[str, list[PhaseCandidate]]
    """Phase → its shortlisted (compiled) candidates, best first."""
    estimated: dict[str, int]
    """Phase → how many strategies were estimated (and fit)."""
    replica_sizes: list[int]
    comparison: dict | None = None
    message: str = ""

    def to_dict(self) -> dict:
        """The plan JSON's ``disaggregated`` object."""
        c = self.chosen
        return {
            "mode": "budget" if self.rate is None else "rate", "devices": self.devices, "rate": self.rate,
            "workload": self.workload, "slo_ttft_s": self.slo_ttft, "slo_tpot_s": self.slo_tpot,
            "replica_sizes": self.replica_sizes, "estimated": self.estimated,
            "prefill": c.prefill.to_dict() if c else None, "decode": c.decode.to_dict() if c else None,
            "pools": c.pools.to_dict() if c else None, "kv_transfer": c.kv.to_dict() if c else None,
            "ttft_s": c.ttft_s if c else None, "tpot_s": c.tpot_s if c else None,
            "meets_slo": c.meets_slo if c else None,
            "candidates": {ph: [p.to_dict() for p in ps] for ph, ps in self.candidates.items()},
            "comparison": self.comparison, "message": self.message,
        }


def replica_batch(spec: SearchSpec, n: int) -> int | None:
    """Sequences a replica of `n` devices serves: the plan's batch per device times n (``B · n / N``), so both
    pools run at the aggregated plan's load per device; None when that is not a whole number."""
    b, rest = divmod(spec.workload.batch * n, spec.devices)
    return b if b >= 1 and not rest else None


def replica_sizes(spec: SearchSpec, *, budget: bool) -> list[int]:
    """Replica sizes tried: the divisors n of the device count (below it with a budget: both pools must fit)
    whose replicas serve a whole number of sequences (`replica_batch`)."""
    return [n for n in divisors(spec.devices) if (n < spec.devices or not budget) and replica_batch(spec, n)]


def replica_workload(spec: SearchSpec, n: int) -> Workload:
    """The workload of one replica of `n` devices: `replica_batch` sequences, the plan's prompt and generation."""
    w = spec.workload
    return Workload(replica_batch(spec, n), w.prompt_len, w.gen_len)


def estimate_phases(spec: SearchSpec, sizes: Sequence[int], *, progress: Progress | None = None
                    ) -> dict[str, list[PhaseCandidate]]:
    """Every valid strategy of every size estimated once; per phase, those that fit, ranked (best first)."""
    from moe_jax.planner.search import enumerate_strategies, estimate

    cache = {}
    ranked: dict[str, list[PhaseCandidate]] = {ph: [] for ph in PHASES}
    for i, n in enumerate(sizes, 1):
        w = replica_workload(spec, n)
        for s in enumerate_strategies(spec.cfg, n, w.batch):
            e = estimate(spec.cfg, s, spec.hw, w, cache)
            if not e.fits:
                continue
            figures = {"fits": True, "ttft_s": e.ttft_s, "tpot_s": e.tpot_s, "memory_bytes": e.memory_total}
            for ph in PHASES:
                ranked[ph].append(PhaseCandidate(ph, s.name, n, w.batch, w.gen_len, figures, spec.slo_ttft,
                                                 spec.slo_tpot))
        if progress:
            progress("disaggregated estimate", f"replicas of {n} devices ({w.batch} sequences)", i, len(sizes))
    for ph in PHASES:
        ranked[ph].sort(key=PhaseCandidate.rank_key)
    return ranked


def smallest_fitting(spec: SearchSpec) -> tuple[int, str] | None:
    """The smallest replica size (`replica_sizes`, the device count included) with a strategy whose estimate
    fits, and that strategy."""
    from moe_jax.planner.search import enumerate_strategies, estimate

    for n in replica_sizes(spec, budget=False):
        w = replica_workload(spec, n)
        for s in enumerate_strategies(spec.cfg, n, w.batch):
            if estimate(spec.cfg, s, spec.hw, w).fits:
                return n, s.name
    return None


def too_small(spec: SearchSpec) -> MoeJaxError:
    """The error for a budget with no room for one prefill and one decode replica that fit."""
    B, N = spec.workload.batch, spec.devices
    sizes = replica_sizes(spec, budget=True)
    tried = (f"replica sizes tried (divisors of {N} below it, each serving {B} x n / {N} sequences): "
             f"{', '.join(map(str, sizes))}" if sizes else
             f"no replica size below {N} serves a whole number of sequences ({B} x n / {N}, n a divisor of {N})")
    found = smallest_fitting(spec)
    if found is None:
        return MoeJaxError(f"--devices {N} is too small for disaggregated serving: no strategy of {spec.cfg.name} "
                           f"fits {spec.hw.memory_bytes / 1e9:.3g} GB per device on any replica size; {tried}")
    n, name = found
    return MoeJaxError(f"--devices {N} is too small for one prefill and one decode replica: the smallest replica of "
                       f"{spec.cfg.name} that fits is {n} devices ({name}), so the two pools need at least "
                       f"{2 * n}; {tried}")


def deployment(spec: SearchSpec, p: PhaseCandidate, d: PhaseCandidate, *, rate: float | None) -> Deployment | None:
    """The pair `p` (prefill) and `d` (decode) with its pools sized and its transfer timed; None when no pools."""
    pools = size_pools(p.requests_per_s(), p.devices, d.requests_per_s(), d.devices,
                       budget=None if rate is not None else spec.devices, rate=rate)
    if pools is None:
        return None
    kv = kv_transfer(spec.hw, spec.workload.prompt_len, p.analysis["model"]["kv_bytes_per_token"],
                     cache_shards(p.analysis), cache_shards(d.analysis), devices=pools.devices,
                     sequences_per_prefill_device=p.analysis["placement"]["sequences_per_device"],
                     # a ring layer sends its last R positions (all of them where a pool keeps full length)
                     nbytes=max(spec.cfg.kv_bytes(spec.workload.prompt_len, x.analysis["strategy"]["pp"])
                                for x in (p, d)))
    return Deployment(p, d, pools, kv, spec.slo_ttft, spec.slo_tpot)


def pick(deployments: Sequence[Deployment], *, rate: float | None) -> Deployment | None:
    """Meeting the SLOs first; with a budget the most requests/s, with a rate the fewest devices; then the
    shortest TTFT."""
    def key(x: Deployment) -> tuple:
        lead = -x.pools.served_rate if rate is None else x.pools.devices
        return (not x.meets_slo, lead, x.ttft_s, x.prefill.strategy, x.decode.strategy)
    return min(deployments, key=key, default=None)


def distinct(ranked: Sequence[PhaseCandidate], k: int) -> list[PhaseCandidate]:
    """The first `k` of `ranked` with distinct (ep, tp, pp): a replica that only adds dp is copies of a smaller
    one (the same figures per device, coarser pools), so the first of each model split stands for it."""
    seen, out = set(), []
    for c in ranked:
        s = Strategy.parse(c.strategy)
        if (s.ep, s.tp, s.pp) not in seen:
            seen.add((s.ep, s.tp, s.pp))
            out.append(c)
            if len(out) == k:
                break
    return out


def best_sizing(spec: SearchSpec, ranked: Sequence[PhaseCandidate], other: PhaseCandidate, *,
                rate: float | None) -> PhaseCandidate | None:
    """Of one phase's `ranked` candidates (those that meet its SLO, or all when none does), the one whose pools,
    sized on the estimates with the other phase's leader `other`, serve the most requests/s within the budget
    (with a rate: need the fewest devices): replicas too large to fill the budget well lose to smaller ones
    that are slightly less efficient per device."""
    pool = [c for c in ranked if c.meets_slo()] or list(ranked)
    best, best_key = None, None
    for c in pool:
        p, d = (c, other) if c.phase == "prefill" else (other, c)
        pools = size_pools(p.requests_per_s(), p.devices, d.requests_per_s(), d.devices,
                           budget=None if rate is not None else spec.devices, rate=rate)
        if pools is None:
            continue
        key = (-pools.served_rate, pools.devices) if rate is None else (pools.devices, -pools.served_rate)
        if best_key is None or key < best_key:
            best, best_key = c, key
    return best


def compile_candidates(spec: SearchSpec, candidates: Sequence[PhaseCandidate], known: dict[tuple[str, int], dict],
                       *, progress: Progress | None = None) -> None:
    """Compile `candidates` through the planner's compile path and cache, one `compile_all` per replica batch
    (`known`: (strategy, batch) → payload already compiled), and record their compiled figures."""
    payloads = dict(known)
    todo = {(c.strategy, c.batch) for c in candidates} - set(payloads)
    for batch in sorted({b for _, b in todo}):
        names = sorted(name for name, b in todo if b == batch)
        bspec = replace(spec, workload=Workload(batch, spec.workload.prompt_len, spec.workload.gen_len),
                        baseline=None)
        report = (lambda kind, text, done, total, b=batch: progress(
            f"disaggregated {kind}", f"batch {b}: {text}", done, total)) if progress else None
        got, _ = compile_all(bspec, names, progress=report)
        payloads.update({(name, batch): payload for name, payload in got.items()})
    for c in candidates:
        c.record_compiled(payloads[(c.strategy, c.batch)]["analysis"])


def plan_disaggregated(spec: SearchSpec, aggregated: PlanResult | None = None, *, rate: float | None = None,
                       top: int | None = None, progress: Progress | None = None) -> Disaggregated:
    """Choose a prefill and a decode strategy, size their pools for `rate` requests/s (None: for the device
    budget `spec.devices`), time the KV transfer, and compare with `aggregated`'s best (see the module
    docstring). `top`: candidates compiled per phase (default `spec.top`)."""
    rate = check_rate(rate)
    top = top or spec.top
    sizes = replica_sizes(spec, budget=rate is None)
    if not sizes:
        raise too_small(spec)
    ranked = estimate_phases(spec, sizes, progress=progress)
    if not ranked["prefill"]:
        raise too_small(spec)
    shortlist = {ph: distinct(ranked[ph], top) for ph in PHASES}
    for ph, other in (("prefill", "decode"), ("decode", "prefill")):
        fit = best_sizing(spec, ranked[ph], ranked[other][0], rate=rate)
        if fit is not None and fit not in shortlist[ph]:
            shortlist[ph].append(fit)
    known = {(name, e["analysis"]["workload"]["batch"]): e for name, e in
             (aggregated.compiled if aggregated else {}).items()}
    compile_candidates(spec, shortlist["prefill"] + shortlist["decode"], known, progress=progress)
    for ph in PHASES:
        shortlist[ph].sort(key=PhaseCandidate.rank_key)
    pairs = [deployment(spec, p, d, rate=rate) for p in shortlist["prefill"] if p.compiled["fits"]
             for d in shortlist["decode"] if d.compiled["fits"]]
    chosen = pick([x for x in pairs if x is not None], rate=rate)
    result = Disaggregated(spec.devices, rate, spec.workload.to_dict(), spec.slo_ttft, spec.slo_tpot, chosen,
                           shortlist, {ph: len(v) for ph, v in ranked.items()}, sizes)
    if chosen is None:
        result.message = ("no compiled prefill and decode pair fits within the budget (the estimates fit; the "
                          "compiled programs do not)")
        return result
    if not chosen.meets_slo:
        result.message = (f"no compiled pair meets the SLOs; the closest: TTFT {chosen.ttft_s * 1e3:.4g} ms "
                          f"(with the KV transfer), TPOT {chosen.tpot_s * 1e3:.4g} ms")
    elif rate is not None and chosen.pools.devices > spec.devices:
        result.message = (f"serving {rate:g} requests/s needs {chosen.pools.devices:,} devices, more than the "
                          f"{spec.devices:,} given")
    agg = best_aggregated(aggregated) if aggregated is not None else None
    result.comparison = compare(chosen.figures(spec.workload.gen_len),
                                aggregated_figures(agg, rate, spec.devices) if agg else None, rate=rate,
                                budget=spec.devices)
    return result


__all__ = ["check_rate", "PhaseCandidate", "Pools", "size_pools", "KvTransfer", "cache_shards", "kv_transfer",
           "Deployment", "aggregated_rate", "best_aggregated", "aggregated_figures", "compare", "Disaggregated",
           "replica_batch", "replica_sizes", "estimate_phases", "distinct", "best_sizing", "too_small",
           "plan_disaggregated"]
