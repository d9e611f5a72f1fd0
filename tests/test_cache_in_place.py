"""The KV cache is updated in place: a decode step writes its one new position into the donated cache, reads
each layer's keys and values where they lie, and builds no second cache.

Before: the layer scan took the cache as its scanned input and returned the updated slices as its output, so
XLA allocated a new [L, ...] cache every step (for Qwen3-30B-A3B under TP8 at batch 64, two 1.81 GB
temporaries, each the size of a device's keys or values), and the cache, stored [L, B, T, K, Dh], was
transposed whole into the layout the attention's matmuls read ahead of every step and back after it.
These tests compile the tiny model for deviceless H200s, with a batch and cache large enough that any
cache-sized buffer stands out, and read the optimized programs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_compiler

from moe_jax.config import get_model
from moe_jax.costs.compile import Workload
from moe_jax.costs.hlo import Module
from moe_jax.model.kv_cache import LayerCache, array_shape, axes, orders
from moe_jax.parallel.mesh import Strategy

_NOT_BUFFERS = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "while", "call", "conditional",
                "opt-barrier", "after-all", "partition-id", "replica-id", "add-dependency"}


def _updates_in_place(instr, module: Module) -> bool:
    """A dynamic-update-slice, or a fusion whose results are all dynamic-update-slices: XLA writes the update
    into its operand's buffer (the donated or loop-carried cache) instead of allocating a result."""
    if instr.opcode == "dynamic-update-slice":
        return True
    if instr.opcode != "fusion":
        return False
    comp = next(module.computations[c] for role, c in module.calls(instr) if role == "calls")
    roots = [comp.by_name[n] for n in comp.root.operands] if comp.root.opcode == "tuple" else [comp.root]
    return all(r.opcode == "dynamic-update-slice" for r in roots)


def cache_sized_buffers(hlo_text: str, array_bytes: int, *, entry_only: bool = False) -> list[str]:
    """Buffers of at least half of one cache array (the keys or the values) that the program allocates at the
    top level (entry, loop bodies; with `entry_only`, outside the loops), in-place updates of the cache
    excepted: a copy, a transpose, or a new stack of the cache."""
    module = Module.parse(hlo_text)
    _, kind, _ = module.multipliers()
    found = []
    for name, comp in module.computations.items():
        if kind.get(name) != "control" or (entry_only and name != module.entry):
            continue
        for instr in comp.instructions:
            if instr.opcode in _NOT_BUFFERS or instr.bytes < array_bytes // 2 or _updates_in_place(instr, module):
                continue
            found.append(f"{instr.opcode} {instr.name} {instr.shape} ({instr.op_name or 'no op_name'})")
    return found


def _tiny_report(mesh: str, layers: int = 8):
    from moe_jax.costs.walk import analyze_cost

    require_compiler("gpu")
    cfg = get_model("tiny").replace(num_layers=layers)
    # 64 sequences of 2048 positions: each cache array is 8 x 64 x 4 x 2048 x 16 x 2 B = 134 MB (÷ tp when
    # tp splits the heads), far above any activation of a one-token step
    return analyze_cost(cfg, Strategy.parse(mesh), Workload(64, 1024, 1024), backend="gpu", gpu_target="h200")


@pytest.mark.parametrize("mesh", ["EP1", "EP1-TP8", "EP1-PP2"])
def test_gpu_decode_updates_the_cache_in_place(mesh):
    """Decode on H200s, unsharded, with tp above the KV heads, and pipelined: the donated cache is the output's
    buffer, no buffer the size of a cache array is allocated (no new stack, no copy, no transpose of the cache),
    and the temporaries together are under one cache array (a layer's slice, 1/L of it, is what attention reads)."""
    report = _tiny_report(mesh)
    decode = report.phases["decode"]
    m = decode.memory
    array_bytes = m.kv_cache // 2
    assert m.aliased >= m.kv_cache
    assert cache_sized_buffers(decode.hlo_text, array_bytes) == []
    assert m.temporaries < array_bytes, (m.temporaries, array_bytes)
    prefill = report.phases["prefill"]
    assert prefill.memory.aliased >= prefill.memory.kv_cache       # prefill writes the donated cache too


def test_gpu_prefill_writes_the_cache_in_place():
    """The prompt's keys and values go straight into the donated cache: no copy or transpose of it ahead of the
    layer loop or after it (inside the loop, a prompt's activations are as large as the cache)."""
    prefill = _tiny_report("EP1").phases["prefill"]
    assert cache_sized_buffers(prefill.hlo_text, prefill.memory.kv_cache // 2, entry_only=True) == []


def test_cache_sized_buffers_sees_a_new_stack():
    """The check above flags a scan's output stack and a transpose of the cache, and passes an in-place update."""
    text = """HloModule m

%fused_dus (p0: bf16[4,8,16], p1: bf16[1,8,16], p2: s32[]) -> bf16[4,8,16] {
  %p0 = bf16[4,8,16]{2,1,0} parameter(0)
  %p1 = bf16[1,8,16]{2,1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %dus = bf16[4,8,16]{2,1,0} dynamic-update-slice(%p0, %p1, %p2, %z, %z)
}

ENTRY %main (c: bf16[4,8,16], u: bf16[1,8,16], i: s32[]) -> (bf16[4,8,16], bf16[4,16,8], bf16[4,8,16]) {
  %c = bf16[4,8,16]{2,1,0} parameter(0)
  %u = bf16[1,8,16]{2,1,0} parameter(1)
  %i = s32[] parameter(2)
  %in_place = bf16[4,8,16]{2,1,0} fusion(%c, %u, %i), kind=kLoop, calls=%fused_dus
  %t = bf16[4,16,8]{2,1,0} transpose(%c), dimensions={0,2,1}
  %zero = bf16[] constant(0)
  %stack = bf16[4,8,16]{2,1,0} broadcast(%zero), dimensions={}
  ROOT %out = (bf16[4,8,16]{2,1,0}, bf16[4,16,8]{2,1,0}, bf16[4,8,16]{2,1,0}) tuple(%in_place, %t, %stack)
}
"""
    found = cache_sized_buffers(text, 4 * 8 * 16 * 2)
    assert [f.split()[:2] for f in found] == [["transpose", "t"], ["broadcast", "stack"]]


@pytest.mark.parametrize("attention", ["gqa", "mla"])
@pytest.mark.parametrize("microbatch", [None, 1])
def test_layer_cache_writes_only_its_positions_and_reads_them_back(attention, microbatch):
    """`LayerCache.write` stores [B, S, K, Dh] keys and values at (layer, positions) of the stacked arrays in their
    orders, leaves everything else as it was (and everything, under keep=False), and `read` gives them back
    as [B, T, K, Dh]."""
    L, B, K, T, Dh, S, start, layer = 3, 4, 2, 9, 5, 3, 4, 1
    M = 1 if microbatch is None else 2
    k, v = (jax.random.normal(jax.random.key(i), (B // M, S, K, Dh)) for i in (1, 2))
    arrays = {}
    for name in ("k", "v"):
        shape = array_shape(name, L, B, K, T, Dh, attention=attention)
        assert axes(attention, name)[:3] == ("layers", "batch", "cache_heads")
        full = jax.random.normal(jax.random.key(3), shape)
        arrays[name] = full if microbatch is None else full.reshape(L, B // M, M, *shape[2:])
    view = LayerCache(arrays["k"], arrays["v"], jnp.int32(layer),
                      None if microbatch is None else jnp.int32(microbatch), None, attention)
    written = view.write(k, v, jnp.int32(start))
    kept = view._replace(keep=jnp.bool_(False)).write(k, v, jnp.int32(start))
    for name, new in (("k", k), ("v", v)):
        got = np.asarray(written.read(name))                              # [B/M, T, K, Dh]
        np.testing.assert_array_equal(got[:, start:start + S], new)
        before = np.asarray(view.read(name))
        np.testing.assert_array_equal(np.delete(got, np.s_[start:start + S], axis=1),
                                      np.delete(before, np.s_[start:start + S], axis=1))
        np.testing.assert_array_equal(np.asarray(kept.read(name)), before)
        np.testing.assert_array_equal(np.asarray(kept[0 if name == "k" else 1]), np.asarray(arrays[name]))
        other = np.asarray(getattr(written, name))
        mask = np.ones(other.shape[0], bool)
        mask[layer] = False
        np.testing.assert_array_equal(other[mask], np.asarray(arrays[name])[mask])    # other layers untouched
    assert orders(attention)["k"] != orders(attention)["v"] or attention == "mla"
