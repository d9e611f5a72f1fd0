"""Checks before anything is built: sizes XLA can index, and memory the run's devices actually have.

Both turn what would be an abort inside XLA or an out-of-memory traceback (or a host taken
down) into a clear error that names the numbers: exit status 2 for sizes no program can
have, 3 for a run that does not fit the memory at hand.
"""

from __future__ import annotations

import os

from moe_jax.config import ModelConfig
from moe_jax.errors import MoeJaxError
from moe_jax.names import Backend
from moe_jax.parallel.mesh import Strategy

MAX_ELEMENTS = 1 << 60
"""Largest array (elements) a program may hold: XLA computes extents and byte sizes in int64."""


class DoesNotFitHere(MoeJaxError):
    """A run would not fit in the memory of the devices or host it runs on."""

    exit_status = 3


def check_extents(cfg: ModelConfig, batch: int, prompt_len: int, cache_len: int, kv_copies: int = 1) -> None:
    """Refuse workloads whose global arrays XLA cannot index (logits, attention scores, KV cache).

    kv_copies: copies of each KV head the global cache array holds (`moe_jax.parallel.mesh.kv_copies`:
    tp / K when tp exceeds the K KV heads, so each tp rank holds one)."""
    cache = ("KV cache latent [L, B, 1, T, R]", cfg.num_layers * batch * cache_len
             * max(cfg.kv_lora_rank, cfg.qk_rope_head_dim)) if cfg.attention == "mla" else \
        ("KV cache [L, B, K, T, Dh]", cfg.num_layers * batch * cache_len * cfg.num_kv_heads * kv_copies * cfg.head_dim)
    arrays = {
        "prefill logits [B, S, V]": batch * prompt_len * cfg.vocab_size,   # every position (run --save-logits)
        # pairs, not an array: the blockwise prefill (`moe_jax.model.attention.causal_attend`) builds no S x S
        # scores; kept as a conservative bound (sizes past it crashed XLA with full attention; not retried since)
        "attention (query, key) pairs B x H x S x S": batch * cfg.num_heads * prompt_len * prompt_len,
        cache[0]: cache[1],
        "routing one-hots [B, S, E, k]": batch * prompt_len * cfg.num_experts * cfg.top_k,
    }
    name, n = max(arrays.items(), key=lambda kv: kv[1])
    if n > MAX_ELEMENTS:
        raise MoeJaxError(f"batch {batch:,} x prompt {prompt_len:,} (cache {cache_len:,}) makes the {name} "
                          f"{n:.3e} elements, more than the {MAX_ELEMENTS:.3e} XLA can index; lower the batch or "
                          "the lengths")


def host_memory_available() -> int | None:
    """Bytes the host can still give (MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_memory(device) -> int | None:
    """Bytes one accelerator can allocate (jax's memory_stats bytes_limit), None when it does not say."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # CPU devices and some plugins raise instead of returning None
        return None
    return stats.get("bytes_limit")


def check_run_memory(cfg: ModelConfig, strategy: Strategy, batch: int, cache_len: int, *, platform: str,
                     devices=None, headroom: float = 0.9) -> dict:
    """Before allocating: weights + KV cache each device will hold against the memory it has.

    On the cpu platform the emulated devices share the host, so their sum is compared with
    the host's available memory; on an accelerator each device's share with its limit. The
    compiled program's activations come on top (the estimate here is a lower bound, so a
    refusal is certain). Raises DoesNotFitHere (exit 3) with the numbers; returns them."""
    from moe_jax.programs.placement import describe

    p = describe(cfg, strategy, batch=batch, cache_len=cache_len)
    per_device = p.weight_bytes_per_device + (p.kv_cache_bytes_per_device or 0)
    if platform == Backend.CPU:
        need, have, where = per_device * strategy.num_devices, host_memory_available(), "this host's available memory"
    else:
        limits = [m for m in (device_memory(d) for d in (devices or [])) if m]
        need, have, where = per_device, (min(limits) if limits else None), f"one {platform} device's memory"
    numbers = {"need_bytes": need, "available_bytes": have, "where": where}
    if have is not None and need > headroom * have:
        raise DoesNotFitHere(
            f"{cfg.name} {strategy.name} would hold {need / 1e9:,.2f} GB of weights and KV cache "
            f"({per_device / 1e9:,.2f} GB per device x {strategy.num_devices if platform == 'cpu' else 1}) before "
            f"activations, more than {headroom:.0%} of {where} ({have / 1e9:,.2f} GB); use a smaller model, batch or "
            "context, or more devices")
    return numbers


__all__ = ["check_extents", "check_run_memory", "DoesNotFitHere", "MAX_ELEMENTS"]
