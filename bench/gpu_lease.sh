#!/usr/bin/env bash
# One lease of a GPU machine that cannot install from a registry: the measuring half of
# bench/gpu_validate.py with that machine's own jax, its compiled HLO and kernel traces, packed into $OUT.
#
#   bash bench/gpu_lease.sh [DEADLINE_S]     # run from the repository root on the GPU machine
#
# Wheels the machine lacks travel in .whl/ (ignored by git; name it in the lease's carry): tomli-w always,
# flax 0.12.8 (the version moe-jax is tested with) only when the machine's own flax fails the smoke test:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl/base tomli-w==1.2.0
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl/flax flax==0.12.8
# Afterwards, on any machine, with $OUT's files in DIR:
#   tar xzf DIR/hlo.tar.gz -C DIR && tar xf DIR/traces.tar -C DIR     (the programs and kernel traces)
#   python bench/gpu_validate.py --predict-from DIR      (DIR holds measured.jsonl and the calibration TOML)
set -u
OUT=${OUT:-/tmp/gpu_lease_out}
DEADLINE=${1:-450}
W=/tmp/gpu_lease
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92   # mixtral's 93 GB of weights
PY=${PYTHON:-python3}
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_base .whl/base/*.whl
export PYTHONPATH=/tmp/site_base
{
  date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.total,power.limit --format=csv
  $PY -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|jax-cuda|flax|optax|chex|click|rich|safetensors|numpy|ml.dtypes|matplotlib) "
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

smoke() {   # the tiny model end to end on the GPU: prefill, decode, a profile
  timeout 120 $PY -c "
import jax, flax
from moe_jax.config import get_model
from moe_jax.costs.compile import Workload
from moe_jax.parallel.mesh import Strategy
from moe_jax.runtime.run import run
print('smoke: jax', jax.__version__, 'flax', flax.__version__, jax.devices())
r = run(get_model('tiny'), Strategy(), Workload(8, 64, 16), predict=False, max_steps=4, repeats=1)
print('smoke', r.measured)
"
}
t0=$(date +%s)
if ! smoke >> "$OUT/env.txt" 2>&1; then
  echo "smoke failed with the machine's flax; trying flax 0.12.8" | tee -a "$OUT/env.txt"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_flax .whl/flax/*.whl
  export PYTHONPATH=/tmp/site_flax:/tmp/site_base
  smoke >> "$OUT/env.txt" 2>&1 || echo "smoke failed with flax 0.12.8 too" | tee -a "$OUT/env.txt"
fi
tail -5 "$OUT/env.txt"
# the Pallas kernels (prefill's fused attention, dropless experts' grouped matmul): right against the plain forms,
# and their TFLOP/s (the presets take 0.4 of peak for each)
timeout 200 $PY bench/flash_kernel.py --no-append > "$OUT/flash_kernel.txt" 2>&1; tail -12 "$OUT/flash_kernel.txt"
LEFT=$(( DEADLINE - ($(date +%s) - t0) ))
export XLA_FLAGS="--xla_dump_to=$W/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*_(prefill|decode)"
timeout $(( LEFT + 60 )) $PY bench/gpu_validate.py --measure-to "$W" --deadline "$LEFT" > "$OUT/log.txt" 2>&1
echo "measure exit $?" >> "$OUT/log.txt"
grep -v '^{' "$OUT/log.txt" | tail -20
cp "$W"/measured.jsonl "$W"/*.toml "$OUT/" 2>/dev/null
(cd "$W" && find hlo -name '*after_optimizations.txt' | tar czf "$OUT/hlo.tar.gz" -T -) 2>/dev/null
(cd "$W" && find traces -name 'perfetto_trace.json.gz' | tar cf "$OUT/traces.tar" -T -) 2>/dev/null
ls -la "$OUT"
