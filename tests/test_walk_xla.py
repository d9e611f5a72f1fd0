"""The cost walk against XLA's own cost analysis, on loop-free programs, for the cpu, tpu and gpu compiles.

Without a loop, XLA's HloCostAnalysis is exact by its own definitions, so the walk
(`moe_jax.costs.walk.walk`, loop bodies counted once: ``walk().uncorrected``) must agree
with it. The programs: hand-written ones (a matmul, elementwise math, reductions, a KV-cache
update read by attention, an embedding lookup, sharded matmuls with an all-reduce, a
reduce-scatter and an all-gather) and the ``tiny`` preset with one layer (its layer
``scan`` has one iteration, which XLA removes: no loop left), prefill and decode, under
DP8, EP2-TP2-DP2 and TP8, and with dropless dispatch under EP2-TP2-DP2.

The reference, per backend:
- cpu: ``compiled.cost_analysis()`` (XLA:CPU runs the generic HloCostAnalysis), FLOPs and
  bytes. The walk's raw count: the cpu backend's normalisation to the model dtype
  (``cpu_native_dtype``) is a deliberate departure and stays out of the comparison.
- tpu: ``compiled.cost_analysis()`` for FLOPs. Its "bytes accessed" is the TPU's own
  performance model, not bytes per op: arrays padded to their (8, 128) tiles, operand
  windows re-read as the matmul tiles them, prefetches into VMEM not counted (a
  bf16[1024,1024] matmul: 14.7 MB, against 6.3 MB of operands and result), so bytes are
  compared with the generic HloCostAnalysis run over the TPU's optimized HLO.
- gpu: ``compiled.cost_analysis()`` is None on a deviceless compile (checked); the
  reference is the generic HloCostAnalysis run over the GPU's optimized HLO through
  jaxlib (``_jax.hlo_module_cost_analysis`` with the CPU client, on
  ``hlo.hlo_module_from_text``). It counts every custom call as -1 FLOPs and -1 bytes:
  a cuBLAS gemm (``xla_gpu_enable_triton_gemm=False``) gets its FLOPs from the operand
  shapes in the walk, checked against the same program with the gemm compiled as a dot.

Like for like (`like_xla`): where XLA counts bytes differently on purpose, the walk's
total is restated under XLA's rule for those ops only, each rule a line of the breakdown:
- fusion parameters: XLA reads a parameter whole unless its direct user slices it
  (``FusionParameterReadBytes``); it does not look through a bitcast or into a gather and
  counts a parameter again for each broadcast/reshape using it. The walk follows
  bitcasts, counts a gather's rows (an embedding lookup reads the rows, not the table) and
  a value updated in place as read only where it is read afterwards, each value once.
  Only those parameters are restated (where the walk reads less than the whole operand,
  or XLA counts it more than once); so this comparison cannot check the walk's
  refinements themselves, which have tests of their own below;
- async pairs: XLA counts an all-gather/all-reduce/collective-permute/copy ``*-start``
  with every array of its (operand, result, context) tuple, and every ``*-done`` again
  (its operand, a tuple's index table, and its result); the walk counts the transfer
  once, at the start (operands read, results written);
- tuples (8 bytes per element of the index table) and partition-id (4 bytes), which the
  walk leaves out; custom calls (-1 in XLA);
- a TPU custom fusion around a gather: XLA counts the gather alone (2 x rows + indices);
- a scatter at a fusion's root: XLA writes the whole output, the walk the updated rows;
- dynamic-slice / dynamic-update-slice index scalars: XLA counts the first one only;
- a ragged all-to-all (dropless): XLA counts every operand buffer (the rows, the output
  buffer written into, offsets, sizes) and the output; the walk the rows sent, once
  read and once written, under uniform routing.
The dropless program (EP2-TP2-DP2) keeps loops (sorting; on the cpu a loop over the local
experts): there XLA counts each loop body once, and so does the walk's raw count.
"""

import json
import subprocess
import sys
from collections import defaultdict

import jax
import pytest
from conftest import clean_env, require_compiler, run_tpu_script  # noqa: E402

from moe_jax.config import get_model
from moe_jax.costs import walk as cost
from moe_jax.costs.compile import Workload
from moe_jax.costs.hlo import Module, shape_bytes, tuple_parts
from moe_jax.costs.walk import _instr_flops, _sliced_elements, analyze_cost, walk
from moe_jax.parallel.mesh import Strategy

TOLERANCE = 0.05

# Shared by the in-process cpu run and the tpu/gpu subprocesses: compile_all(devices, backend, topology)
# returns (name, optimized HLO, cost_analysis() or None, mesh shape) per program.
PROGRAMS = r'''
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

STRATEGIES = ("DP8", "EP2-TP2-DP2", "TP8")


def _decode_attention(cache, new, q, pos):
    cache = jax.lax.dynamic_update_slice(cache, new, (0, pos, 0, 0))         # [B, T, K, Dh]
    scores = jnp.einsum("bkd,btkd->bkt", q, cache).astype(jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1).astype(cache.dtype)
    return jnp.einsum("bkt,btkd->bkd", probs, cache), cache


def _programs(devices, backend):
    one = Mesh(np.array(devices[:1]).reshape(1, 1), ("dp", "tp"))
    eight = Mesh(np.array(devices[:8]).reshape(2, 4), ("dp", "tp"))

    def arg(shape, dtype, mesh=one, spec=P()):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=NamedSharding(mesh, spec))

    def out(spec):
        return NamedSharding(eight, spec)

    mm = (jax.jit(lambda a, b: jnp.tanh(a @ b)), (arg((256, 512), "bfloat16"), arg((512, 384), "bfloat16")))
    found = [
        ("matmul", *mm, {}),
        ("elementwise", jax.jit(lambda x: jnp.where(x > 0, jnp.exp(x) * 2 + jnp.sin(x) / (1 + x * x), -x)),
         (arg((64, 1024), "float32"),), {}),
        ("reductions", jax.jit(lambda x: (x.sum(1), x.max(0), jnp.argmax(x, 1), jax.nn.logsumexp(x, 1),
                                          jnp.cumsum(x, 1))), (arg((128, 1000), "float32"),), {}),
        ("kv_decode", jax.jit(_decode_attention, donate_argnums=0),
         (arg((8, 64, 4, 32), "bfloat16"), arg((8, 1, 4, 32), "bfloat16"), arg((8, 4, 32), "bfloat16"),
          arg((), "int32")), {}),
        ("embedding", jax.jit(lambda t, i: t[i].astype(jnp.float32).sum(-1)),
         (arg((4096, 256), "bfloat16"), arg((8, 16), "int32")), {}),
        ("sharded_allreduce", jax.jit(lambda x, w: x @ w, out_shardings=out(P("dp", None))),
         (arg((64, 1024), "bfloat16", eight, P("dp", "tp")), arg((1024, 512), "bfloat16", eight, P("tp", None))),
         {}),
        ("sharded_reducescatter", jax.jit(lambda x, w: x @ w, out_shardings=out(P("dp", "tp"))),
         (arg((64, 1024), "bfloat16", eight, P("dp", "tp")), arg((1024, 512), "bfloat16", eight, P("tp", None))),
         {}),
        ("sharded_allgather", jax.jit(lambda x, w: jnp.tanh(x) @ w, out_shardings=out(P("dp", None))),
         (arg((64, 1024), "bfloat16", eight, P("dp", "tp")), arg((1024, 512), "bfloat16", eight, P(None, None))),
         {}),
    ]
    if backend == "gpu":     # the same matmul through cuBLAS: a custom call XLA's cost analysis cannot see into
        found.append(("matmul_cublas", *mm, {"xla_gpu_enable_triton_gemm": False}))
    return found


def _xla(compiled):
    raw = compiled.cost_analysis()
    raw = raw[0] if isinstance(raw, list) else raw
    return None if raw is None else {k: float(v) for k, v in raw.items()}


def compile_all(devices, backend, topology=None):
    from moe_jax.costs.compile import Workload, compile_program
    from moe_jax.config import get_model
    from moe_jax.parallel.mesh import Strategy

    found = []
    for name, fn, args, options in _programs(devices, backend):
        compiled = fn.lower(*args).compile(compiler_options=options or None)
        found.append((name, compiled.as_text(), _xla(compiled), {"dp": 2, "tp": 4}))
    cfg = get_model("tiny").replace(num_layers=1)      # one layer: the layer scan runs once and XLA removes it
    dropless = cfg.replace(dispatch="dropless")         # keeps loops (sorting, the cpu's loop over experts)
    for model, s in [(cfg, s) for s in STRATEGIES] + [(dropless, "EP2-TP2-DP2")]:
        program = compile_program(model, Strategy.parse(s), Workload(8, 16, 4), backend=backend, topology=topology)
        tag = "tiny-dropless" if model is dropless else "tiny"
        for phase, p in program.phases.items():
            found.append((f"{tag}-{s}-{phase}", p.hlo_text, _xla(p.compiled), program.compiled_strategy.mesh_shape))
    return found
'''

# The subprocess's main: the script sets OUT_DIR, BACKEND, TOPOLOGY and DEVICES() before this.
DUMP = PROGRAMS + r'''
import json, os
rows = []
for name, text, xla, mesh in compile_all(DEVICES(), BACKEND, TOPOLOGY):
    path = os.path.join(OUT_DIR, name + ".hlo")
    open(path, "w").write(text)
    rows.append({"name": name, "hlo": path, "xla": xla, "mesh": mesh})
print(json.dumps(rows))
'''


# --- XLA's conventions, restated over the walk's own parse ---------------------------------


NATIVE_ASYNC = {"all-gather-start", "all-reduce-start", "collective-permute-start", "copy-start"}
"""Async starts that are HLO opcodes of their own; other ``*-start`` ops print an ``async-start`` wrapper, which
XLA costs as the op it wraps (operands and result)."""


def _callee(module: Module, instr):
    return next((module.computations[c] for role, c in module.calls(instr) if role == "calls"), None)


def _xla_param_read(module: Module, comp, param) -> int:
    """XLA's ``HloCostAnalysis::FusionParameterReadBytes``: what a fused computation reads of a parameter."""
    full, size, seen = param.bytes, 0, False
    for u in comp.users(param.name):
        if u.opcode == "fusion":
            nested = _callee(module, u)
            for idx, name in enumerate(u.operands):
                if name != param.name:
                    continue
                inner = nested.parameter(idx)
                simple = not nested.root.operands or nested.root.operands[0] == inner.name
                nested_seen = False
                for fu in comp.users(u.name):
                    if simple and fu.opcode == "slice":
                        size += fu.bytes
                    elif simple and fu.opcode == "dynamic-slice":
                        if fu.operands[0] == u.name:
                            size += fu.bytes
                        elif not nested_seen:
                            nested_seen, size = True, size + u.bytes
                    elif simple and fu.opcode == "dynamic-update-slice":
                        if fu.operands[0] != u.name and not nested_seen:
                            nested_seen, size = True, size + u.bytes
                    elif not nested_seen:
                        nested_seen, size = True, size + _xla_param_read(module, nested, inner)
        elif u.opcode == "slice":
            size += u.bytes
        elif u.opcode == "dynamic-slice":
            if u.operands[0] == param.name:
                size += u.bytes
            elif not seen:
                seen, size = True, size + full
        elif u.opcode == "dynamic-update-slice":
            if u.operands[0] != param.name and not seen:
                seen, size = True, size + full
        elif u.opcode in ("broadcast", "reshape"):
            size += full
        elif not seen:
            seen, size = True, size + full
    return size


def _xla_fusion_bytes(module: Module, comp, instr) -> dict[str, int]:
    """Per rule, what XLA counts for a fusion minus what the walk counts, where XLA's rule differs on purpose.

    A parameter is restated only where the walk refines the read (it reads less than the whole operand) or XLA
    counts it more than once (broadcast/reshape users): a parameter the walk reads whole while XLA sees a slice
    stays a difference, as would any other.
    """
    fused = _callee(module, instr)
    gather = next((i for i in fused.instructions if i.opcode == "gather"), None)
    if "kind=kCustom" in instr.attrs and gather is not None:          # HandleFusion -> HandleGather
        indices = fused.by_name[gather.operands[1]].bytes
        walked = cost._operand_bytes(instr, comp, module) + cost._result_bytes(instr, comp, module)
        return {"custom gather fusion": 2 * gather.bytes + indices - walked}
    delta = defaultdict(int)
    for index, name in enumerate(instr.operands):
        src, param = comp.by_name.get(name), fused.parameter(index)
        if src is None or param is None:
            continue
        read = cost._read_bytes(fused, param.name, module)
        mine = src.bytes if read is None else min(src.bytes, read)
        xla = _xla_param_read(module, fused, param)
        if mine < src.bytes or xla > src.bytes:
            delta["fusion parameter reads"] += xla - mine
    root = fused.root
    for part in ([fused.by_name[n] for n in root.operands] if root.opcode == "tuple" else [root]):
        if part.opcode == "scatter":                                   # XLA writes a fused scatter's whole output
            delta["fused scatter output"] += part.bytes - min(part.bytes, cost._update_bytes(part, fused))
    return dict(delta)


def _sliced_flops(module: Module, name: str) -> int:
    """FLOPs of fused elementwise ops that the walk counts only where a slice reads them (`_sliced_elements`) and
    XLA counts on every element: what XLA adds to the walk's count of fused computation `name`."""
    comp, total = module.computations[name], 0
    for i in comp.instructions:
        read = _sliced_elements(i, comp)
        if read is not None:
            f = _instr_flops(i, comp)[0]
            total += f - f * read // i.elements
        if i.opcode == "fusion":
            total += sum(_sliced_flops(module, c) for role, c in module.calls(i) if role == "calls")
    return total


def like_xla(hlo_text: str, mesh: dict) -> dict:
    """The walk's FLOPs and bytes (each loop once) with the ops where XLA's definition differs counted XLA's way.

    Returns flops, bytes, the raw walk (raw_flops, raw_bytes), the FLOPs XLA counts on elements no slice reads
    (sliced_flops, `_sliced_flops`), per rule the bytes it changed (adjustments) and the ops it touched (touched).
    """
    module = Module.parse(hlo_text)
    w = walk(hlo_text, mesh)
    ops = {o.name: o for o in w.ops}
    runs, kind, _ = module.multipliers()
    adjust, touched, flops_adjust, sliced_flops = defaultdict(int), defaultdict(int), 0, 0
    for cname, comp in module.computations.items():
        if not runs.get(cname) or kind.get(cname) != "control":
            continue
        for instr in comp.instructions:
            op, mine = instr.opcode, ops.get(instr.name)
            walked = mine.bytes if mine else 0
            operands = [comp.by_name[n] for n in instr.operands if n in comp.by_name]
            if op == "custom-call":
                xla, rule = -1, "custom calls"
                flops_adjust += -1 - (mine.flops if mine else 0)
            elif op == "ragged-all-to-all":
                xla, rule = sum(o.bytes for o in operands) + instr.bytes, "ragged all-to-all"
            elif op in NATIVE_ASYNC:
                xla, rule = sum(o.bytes for o in operands) + shape_bytes(instr.shape), "async pairs"
            elif op.endswith("-done"):
                read = sum(8 * len(tuple_parts(o.shape)) if o.shape.startswith("(") else o.bytes for o in operands)
                xla, rule = read + instr.bytes, "async pairs"
            elif op == "tuple":
                xla, rule = 8 * len(instr.operands), "tuples, partition-id"
            elif op in ("partition-id", "replica-id"):
                xla, rule = 4, "tuples, partition-id"
            elif op == "fusion":
                sliced = sum(_sliced_flops(module, c) for role, c in module.calls(instr) if role == "calls")
                flops_adjust, sliced_flops = flops_adjust + sliced, sliced_flops + sliced
                for rule, delta in _xla_fusion_bytes(module, comp, instr).items():
                    adjust[rule] += delta
                    touched[rule] += bool(delta)
                    if rule == "custom gather fusion":
                        flops_adjust -= mine.flops if mine else 0
                continue
            elif op in ("dynamic-slice", "dynamic-update-slice"):
                first = 1 if op == "dynamic-slice" else 2
                xla, rule = walked - sum(o.bytes for o in operands[first + 1:]), "index scalars"
            else:
                continue
            if xla != walked:
                adjust[rule] += xla - walked
                touched[rule] += 1
    raw = w.uncorrected
    return {"flops": raw.flops + flops_adjust, "bytes": raw.hbm_bytes + sum(adjust.values()),
            "raw_flops": raw.flops, "raw_bytes": raw.hbm_bytes, "sliced_flops": sliced_flops,
            "adjustments": dict(adjust), "touched": dict(touched)}


def xla_reference(hlo_text: str) -> dict:
    """XLA's generic HloCostAnalysis over optimized HLO text from any backend (the CPU client runs it)."""
    from jax._src.lib import _jax, hlo

    module = hlo.hlo_module_from_text(hlo_text)
    return {k: float(v) for k, v in _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module).items()}


def _compare(name: str, text: str, mesh: dict, backend: dict | None = None) -> dict:
    """The walk against XLA for one program: like for like against the generic HloCostAnalysis (FLOPs and bytes),
    and the raw FLOPs against the backend's own cost_analysis() where it has one (`backend`; TPU's counts its
    grouped-matmul kernel, a custom call to the generic analysis). Prints the numbers (pytest -s)."""
    # dropless keeps loops: XLA counts each loop body once, and so does the walk's raw count it is compared with
    assert " while(" not in text or name.startswith("tiny-dropless"), f"{name}: not loop-free"
    ours, reference = like_xla(text, mesh), xla_reference(text)
    row = {"name": name, "walk_flops": ours["raw_flops"], "xla_flops": reference["flops"],
           "backend_flops": backend and backend["flops"], "walk_bytes": ours["raw_bytes"], "like_bytes": ours["bytes"],
           "xla_bytes": reference["bytes accessed"], "backend_bytes": backend and backend["bytes accessed"],
           "adjustments": ours["adjustments"]}
    print(json.dumps(row))
    assert ours["flops"] == pytest.approx(reference["flops"], rel=TOLERANCE), row
    assert ours["bytes"] == pytest.approx(reference["bytes accessed"], rel=TOLERANCE), row
    if backend is not None:
        assert ours["raw_flops"] + ours["sliced_flops"] == pytest.approx(backend["flops"], rel=TOLERANCE), row
    return row


# --- cpu -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_programs():
    namespace: dict = {}
    exec(PROGRAMS, namespace)
    return namespace["compile_all"](jax.devices("cpu"), "cpu")


def test_walk_equals_xla_on_cpu(cpu_programs):
    assert len(cpu_programs) == 8 + 8
    for name, text, xla, mesh in cpu_programs:
        row = _compare(name, text, mesh, xla)
        assert (row["xla_flops"], row["xla_bytes"]) == (xla["flops"], xla["bytes accessed"])   # XLA:CPU's is generic
        # nothing on the cpu backend needs restating beyond a few tuple/index bytes, and a fusion's operand that it
        # converts then slices or gathers (a lookup's table, a reduce-scatter's shard): XLA counts all of it
        # read, the fusion reads (and converts) only what the slice takes
        restated = row["adjustments"].get("fusion parameter reads", 0)
        assert row["walk_bytes"] + restated == pytest.approx(xla["bytes accessed"], rel=0.01), row


def test_phase_cost_keeps_the_raw_walk_beside_xla_on_cpu():
    """PhaseCost.walk_uncorrected (raw, each loop once) against PhaseCost.xla_cost, on the loop-free model."""
    cfg = get_model("tiny").replace(num_layers=1)
    report = analyze_cost(cfg, Strategy.parse("EP2-TP2-DP2"), Workload(8, 16, 4))
    for phase in report.phases.values():
        assert phase.walk_uncorrected.flops == pytest.approx(phase.xla_cost["flops"], rel=TOLERANCE)
        assert phase.walk_uncorrected.hbm_bytes == pytest.approx(phase.xla_cost["bytes accessed"], rel=TOLERANCE)
        assert phase.walk_uncorrected.transcendentals == phase.xla_cost["transcendentals"]
        assert phase.flops < phase.walk_uncorrected.flops        # no loop: only the cpu bf16 normalisation
        assert phase.raw_hbm_bytes == phase.walk_uncorrected.hbm_bytes


# --- tpu and gpu: compiled in a subprocess, compared here ------------------------------------


def _rows(lines: list[str]) -> list[dict]:
    return json.loads(lines[-1])


def test_walk_equals_xla_on_tpu(tmp_path):
    script = (f"OUT_DIR = {str(tmp_path)!r}\nBACKEND, TOPOLOGY = 'tpu', 'v5p:2x2x2'\n"
              "def DEVICES():\n    from jax.experimental import topologies\n"
              "    return topologies.get_topology_desc(platform='tpu', topology_name=TOPOLOGY).devices\n" + DUMP)
    rows = _rows(run_tpu_script(script))
    assert len(rows) == 8 + 8
    for row in rows:
        _compare(row["name"], open(row["hlo"]).read(), row["mesh"], row["xla"])


def test_walk_equals_xla_on_gpu(tmp_path):
    require_compiler("gpu")
    script = (f"OUT_DIR = {str(tmp_path)!r}\nBACKEND, TOPOLOGY = 'gpu', None\n"
              "def DEVICES():\n    import pathlib, moe_jax\n    from jax.experimental import topologies\n"
              "    spec = pathlib.Path(moe_jax.__file__).parent / 'hardware' / 'targets' / 'h200.txtpb'\n"
              "    return topologies.get_topology_desc(platform='cuda', target_config=spec.read_text(),"
              " topology='1x1x8').devices\n" + DUMP)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                          env=clean_env(JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["name"]: row for row in _rows(done.stdout.strip().splitlines())}
    assert len(rows) == 8 + 1 + 8
    for name, row in rows.items():
        assert row["xla"] is None, name                   # the trap: no cost analysis on a deviceless GPU compile
        _compare(name, open(row["hlo"]).read(), row["mesh"])
    # cuBLAS: XLA's analysis counts the custom call as -1; the walk counts 2·M·N·K from its operands
    cublas = open(rows["matmul_cublas"]["hlo"]).read()
    assert 'custom_call_target="__cublas$' in cublas
    ours = walk(cublas, {"dp": 2, "tp": 4})
    assert ours.matmul_flops == 2 * 256 * 512 * 384
    visible = xla_reference(open(rows["matmul"]["hlo"]).read())          # the same matmul as a (Triton) dot
    assert ours.flops == pytest.approx(visible["flops"], rel=TOLERANCE)
    gemm, = [o for o in ours.ops if o.opcode == "custom-call"]
    assert gemm.bytes == (256 * 512 + 512 * 384 + 256 * 384) * 2            # operands and result, not the workspace


# --- the walk's own rules where XLA's differ: hand-written HLO with a known answer ----------------

IN_PLACE_THEN_READ = """HloModule m

%fused (p0: bf16[1,8,20,4,16], p1: bf16[8,1,4,16], p2: s32[]) -> f32[8,20,16] {
  %p0 = bf16[1,8,20,4,16]{4,3,2,1,0} parameter(0)
  %cache = bf16[8,20,4,16]{3,2,1,0} bitcast(%p0)
  %p1 = bf16[8,1,4,16]{3,2,1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %zero = s32[] constant(0)
  %dus = bf16[8,20,4,16]{3,2,1,0} dynamic-update-slice(%cache, %p1, %zero, %p2, %zero, %zero)
  %one = s32[] constant(1)
  %ds = bf16[8,20,1,16]{3,2,1,0} dynamic-slice(%dus, %zero, %zero, %one, %zero), dynamic_slice_sizes={8,20,1,16}
  %head = bf16[8,20,16]{2,1,0} bitcast(%ds)
  ROOT %c = f32[8,20,16]{2,1,0} convert(%head)
}

ENTRY %e (cache: bf16[1,8,20,4,16], new: bf16[8,1,4,16], pos: s32[]) -> f32[8,20,16] {
  %cache = bf16[1,8,20,4,16]{4,3,2,1,0} parameter(0)
  %new = bf16[8,1,4,16]{3,2,1,0} parameter(1)
  %pos = s32[] parameter(2)
  ROOT %f = f32[8,20,16]{2,1,0} fusion(%cache, %new, %pos), kind=kLoop, calls=%fused
}
"""

IN_PLACE = """HloModule m

%fused (p0: bf16[1,8,20,4,16], p1: bf16[8,1,4,16], p2: s32[]) -> bf16[8,20,4,16] {
  %p0 = bf16[1,8,20,4,16]{4,3,2,1,0} parameter(0)
  %cache = bf16[8,20,4,16]{3,2,1,0} bitcast(%p0)
  %p1 = bf16[8,1,4,16]{3,2,1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %zero = s32[] constant(0)
  ROOT %dus = bf16[8,20,4,16]{3,2,1,0} dynamic-update-slice(%cache, %p1, %zero, %p2, %zero, %zero)
}

ENTRY %e (cache: bf16[1,8,20,4,16], new: bf16[8,1,4,16], pos: s32[]) -> bf16[8,20,4,16] {
  %cache = bf16[1,8,20,4,16]{4,3,2,1,0} parameter(0)
  %new = bf16[8,1,4,16]{3,2,1,0} parameter(1)
  %pos = s32[] parameter(2)
  ROOT %f = bf16[8,20,4,16]{3,2,1,0} fusion(%cache, %new, %pos), kind=kLoop, calls=%fused
}
"""

CACHE, HEAD, NEW = 8 * 20 * 4 * 16 * 2, 8 * 20 * 16 * 2, 8 * 4 * 16 * 2


def test_a_value_updated_in_place_and_read_afterwards_counts_the_read():
    """Decode attention on the GPU writes the new token into the KV cache and reads the cache in the same fusion.
    The walk counted no read of the cache at all (in place); it reads what the slice takes (one KV head here).
    XLA reads the whole cache (it does not look through the bitcast)."""
    assert walk(IN_PLACE_THEN_READ, {"x": 1}).hbm_bytes == HEAD + NEW + 4 + 8 * 20 * 16 * 4   # + pos, result
    assert walk(IN_PLACE, {"x": 1}).hbm_bytes == NEW + 4 + NEW         # in place: reads and writes the token
    ours = like_xla(IN_PLACE_THEN_READ, {"x": 1})
    assert ours["adjustments"] == {"fusion parameter reads": CACHE - HEAD}
    assert ours["bytes"] == xla_reference(IN_PLACE_THEN_READ)["bytes accessed"]
    assert like_xla(IN_PLACE, {"x": 1})["bytes"] == xla_reference(IN_PLACE)["bytes accessed"]


CUBLAS = """HloModule m

ENTRY %e (a: bf16[256,512], b: bf16[512,384]) -> bf16[256,384] {
  %a = bf16[256,512]{1,0} parameter(0)
  %b = bf16[512,384]{1,0} parameter(1)
  %gemm = (bf16[256,384]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", \
backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],\
"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  ROOT %r = bf16[256,384]{1,0} get-tuple-element(%gemm), index=0
}
"""


def test_a_cublas_gemm_counts_its_flops_and_not_its_workspace():
    w = walk(CUBLAS, {"x": 1})
    assert w.matmul_flops == w.flops == 2 * 256 * 512 * 384
    assert w.hbm_bytes == (256 * 512 + 512 * 384 + 256 * 384) * 2
    assert xla_reference(CUBLAS)["flops"] == -1                  # what XLA's own analysis makes of it


def test_tuple_parts_and_async_results():
    assert tuple_parts("((bf16[32,512]{0,1}), bf16[32,128]{0,1}, u32[]{:S(2)})") == \
        ["(bf16[32,512]{0,1})", "bf16[32,128]{0,1}", "u32[]{:S(2)}"]
    assert tuple_parts("f32[4,4]{1,0}") == ["f32[4,4]{1,0}"]
    assert cost._async_result_bytes("((bf16[32,512]{0,1}), bf16[32,128]{0,1})") == 32 * 128 * 2   # reduce-scatter
    assert cost._async_result_bytes("(f32[64]{0:S(1)}, f32[64]{0}, u32[]{:S(2)})") == 64 * 4        # copy-start


NEWER_XLA = """HloModule m

%fused_slice (p0: bf16[4,8,16], p1: s32[]) -> bf16[1,8,16] {
  %p0 = bf16[4,8,16]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = bf16[1,8,16]{2,1,0} dynamic-slice(%p0, %p1, %z, %z), dynamic_slice_sizes={1,8,16}
}

%async_computation.1 (q0: bf16[4,8,16], q1: s32[]) -> bf16[1,8,16] {
  %q0 = bf16[4,8,16]{2,1,0} parameter(0)
  %q1 = s32[] parameter(1)
  ROOT %loop_dynamic_slice_fusion.1 = bf16[1,8,16]{2,1,0} fusion(%q0, %q1), kind=kLoop, calls=%fused_slice
}

%fused_sum (r0: bf16[4,8,16], r1: s32[]) -> f32[8] {
  %r0 = bf16[4,8,16]{2,1,0} parameter(0)
  %r1 = s32[] parameter(1)
  %z2 = s32[] constant(0)
  %ds2 = bf16[1,8,16]{2,1,0} dynamic-slice(%r0, %r1, %z2, %z2), dynamic_slice_sizes={1,8,16}
  %b = bf16[8,16]{1,0} bitcast(%ds2)
  %c = f32[8,16]{1,0} convert(%b)
  %zero = f32[] constant(0)
  ROOT %s = f32[8]{0} reduce(%c, %zero), dimensions={1}, to_apply=%add
}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %a = f32[] add(%x, %y)
}

ENTRY %e (arg_tuple.1: (s32[], bf16[4,8,16])) -> (bf16[1,8,16], f32[8]) {
  %arg_tuple.1 = (s32[], bf16[4,8,16]{2,1,0}) parameter(0)
  %fusion-start.1 = ((bf16[4,8,16]{2,1,0}, s32[]), bf16[1,8,16]{2,1,0}, u32[]) async-start(%arg_tuple.1#1, \
%arg_tuple.1#0), calls=%async_computation.1
  %fusion-done.1 = bf16[1,8,16]{2,1,0} async-done(%fusion-start.1)
  %input_reduce_fusion = f32[8]{0} fusion(%arg_tuple.1#1, %arg_tuple.1#0), kind=kInput, calls=%fused_sum
  ROOT %t = (bf16[1,8,16]{2,1,0}, f32[8]{0}) tuple(%fusion-done.1, %input_reduce_fusion)
}
"""
"""A layer's slice as jax 0.11's XLA:GPU prints it: tuple elements as ``%t#k`` operands, and a dynamic-slice copy
run through an async-start that wraps its fusion."""


def test_newer_xla_tuple_element_operands_and_wrapped_async_copies():
    """`%arg_tuple.1#1` is element 1 of the tuple (its bytes were not counted at all: the in-place decode products'
    weight reads, 0.03 of 50 MB a layer); the async-start that runs a wrapped dynamic-slice fusion counts nothing
    itself (the fusion it wraps is walked: counting both read the whole stacked weight, 39 GB a layer)."""
    w = walk(NEWER_XLA, {"x": 1})
    by = {o.name: o for o in w.ops}
    layer = 8 * 16 * 2
    assert by["loop_dynamic_slice_fusion.1"].bytes == 2 * layer + 4          # reads the slice, writes it
    assert by["input_reduce_fusion"].bytes == layer + 4 + 8 * 4              # reads the slice, writes 8 f32
    assert "fusion-start.1" not in by
    assert w.hbm_bytes == 3 * layer + 8 + 8 * 4


def test_an_op_is_timed_as_what_it_fuses_not_what_it_is_named():
    """XLA names a fusion for a few of its ops: XLA:CPU's `copy_bitcast_fusion` converts a layer's bf16 weights and
    transposes them (timed at the copy's rate, it was 5x under); a fusion that converts a scalar is a copy."""
    hlo = """HloModule m, is_scheduled=true

%fused_a (p0: bf16[16,64,32]) -> f32[16,32,64] {
  %p0 = bf16[16,64,32]{2,1,0} parameter(0)
  %c = f32[16,64,32]{2,1,0} convert(%p0)
  %t = f32[16,32,64]{1,2,0} transpose(%c), dimensions={0,2,1}
  ROOT %k = f32[16,32,64]{2,1,0} copy(%t)
}

%fused_b (p0: bf16[4096]) -> f32[4096] {
  %p0 = bf16[4096]{0} parameter(0)
  ROOT %c = f32[4096]{0} convert(%p0)
}

%fused_c (p0: f32[4096], p1: s32[]) -> f32[4096] {
  %p0 = f32[4096]{0} parameter(0)
  %p1 = s32[] parameter(1)
  %s = f32[] convert(%p1)
  %b = f32[4096]{0} broadcast(%s), dimensions={}
  ROOT %a = f32[4096]{0} add(%p0, %b)
}

ENTRY %main (w: bf16[16,64,32], v: bf16[4096], x: f32[4096], i: s32[]) -> (f32[16,32,64], f32[4096], f32[4096]) {
  %w = bf16[16,64,32]{2,1,0} parameter(0)
  %v = bf16[4096]{0} parameter(1)
  %x = f32[4096]{0} parameter(2)
  %i = s32[] parameter(3)
  %copy_bitcast_fusion = f32[16,32,64]{2,1,0} fusion(%w), kind=kLoop, calls=%fused_a
  %add_fusion = f32[4096]{0} fusion(%v), kind=kLoop, calls=%fused_b
  %convert_add_fusion = f32[4096]{0} fusion(%x, %i), kind=kLoop, calls=%fused_c
  ROOT %r = (f32[16,32,64]{2,1,0}, f32[4096]{0}, f32[4096]{0}) tuple(%copy_bitcast_fusion, %add_fusion,
    %convert_add_fusion)
}
"""
    kinds = {o.name: o.kind for o in walk(hlo, {"dp": 1}).ops}
    assert kinds == {"copy_bitcast_fusion": "transpose", "add_fusion": "convert", "convert_add_fusion": "copy"}
