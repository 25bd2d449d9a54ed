#!/usr/bin/env bash
# The GPU check, one command (installs nothing; about 5-8 minutes on one H200):
#   1. JAX sampler decode at the Qwen2.5-1.5B shape (bf16, batch 64, 512 new tokens) vs the
#      HBM bound                                  (benchmarks/sampler.py --preset=qwen2.5-1.5b)
#   2. update-step MFU at the Qwen2.5-1.5B shape, sequence 2,048, random weights from
#      configs/models/qwen2.5_1.5b                (benchmarks/train_step.py --gpu)
#   3. the tiled log-prob kernel's forward+backward vs four matmuls at the 1.5B head
#                                                 (benchmarks/loss_kernels.py)
#   4. sync checkpoint write / engine-side read bandwidth (benchmarks/sync.py)
# then prints one table with the targets of issue 21. Every stage has its own time limit; a
# stage that fails or times out is reported as such and the script exits non-zero.
#
#   bash benchmarks/gpu_check.sh [--hbm_gbps 4800] [--peak_tflops 989] [--sync_dir DIR]
#   bash benchmarks/gpu_check.sh --cpu-smoke      # the same path at toy sizes on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
HBM=4800 PEAK=989 SYNC_DIR="" SMOKE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --hbm_gbps) HBM=$2; shift ;;
    --peak_tflops) PEAK=$2; shift ;;
    --sync_dir) SYNC_DIR=$2; shift ;;
    *) echo "error: unknown argument $1 (expected --cpu-smoke, --hbm_gbps N, --peak_tflops N, --sync_dir DIR)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python}
OUT=$(mktemp -d)
[ -n "$SYNC_DIR" ] || SYNC_DIR="$OUT/sync"
mkdir -p "$SYNC_DIR"
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=cpu
  SAMPLER=(--roofline --layers=2 --hidden=128 --vocab=1024 --batch=4 --new_tokens=16 --prompt_len=16 --repeats=2 --hbm_gbps="$HBM")
  TRAIN=(--steps 2 --peak_tflops "$PEAK")
  KERNEL=(--n 1024 --d 128 --v 4096 --chunk 256 --repeats 2)
  SYNC=(--gb=0.02 --hidden=256 --vocab=4096 --repeats=2)
  LIMIT=900
else
  if ! $PY -c "import jax,sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
    echo "error: no GPU visible to JAX (jax.default_backend() != 'gpu'); use --cpu-smoke on a CPU machine" >&2
    exit 2
  fi
  SAMPLER=(--preset=qwen2.5-1.5b --hbm_gbps="$HBM")
  TRAIN=(--gpu --model configs/models/qwen2.5_1.5b --seq 2048 --steps 3 --peak_tflops "$PEAK")
  KERNEL=(--n 16384 --d 1536 --v 151936 --dtype bfloat16 --chunk 4096 --repeats 5)
  SYNC=(--gb=3 --hidden=1536 --vocab=151936)
  LIMIT=150
fi
FAILED=()
stage() {  # name, time limit, command... (stdout to $OUT/name.log)
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" >&2
  local t0=$SECONDS
  local rc=0
  timeout "$limit" "$@" > "$OUT/$name.log" 2> "$OUT/$name.err" || rc=$?
  if [ "$rc" != 0 ]; then
    FAILED+=("$name")
    [ "$rc" = 124 ] && echo "   $name: timed out after $limit s" >&2
    tail -n 20 "$OUT/$name.err" >&2
  fi
  echo "   $name took $((SECONDS - t0)) s" >&2
}
stage sampler "$LIMIT" $PY benchmarks/sampler.py "${SAMPLER[@]}"
stage update $((LIMIT + 60)) $PY benchmarks/train_step.py "${TRAIN[@]}" --json "$OUT/update.json"
stage logprobs "$LIMIT" $PY benchmarks/loss_kernels.py "${KERNEL[@]}" --json "$OUT/logprobs.json"
stage sync "$LIMIT" $PY benchmarks/sync.py "${SYNC[@]}" --dir="$SYNC_DIR"
$PY - "$OUT" "$SMOKE" <<'PYEOF'
import json, os, sys
out, smoke = sys.argv[1], sys.argv[2] == "1"
def last_json(name):
    try:
        lines = [l for l in open(os.path.join(out, name + ".log")) if l.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except OSError:
        return None
def load(name):
    try:
        return json.load(open(os.path.join(out, name + ".json")))
    except (OSError, ValueError):
        return None
rows = []
s = last_json("sampler")
rows.append(("sampler decode, Qwen2.5-1.5B shape, batch 64" if not smoke else "sampler decode (toy)",
             f"{s['decode_tok_per_s']:,.0f} tok/s; {s['fraction_of_hbm_bound']:.1%} of the HBM bound" if s else "FAILED",
             ">= 50% of the HBM bound", bool(s) and s["fraction_of_hbm_bound"] >= 0.5))
u = load("update")
rows.append(("update step MFU, 1.5B shape, seq 2,048" if not smoke else "update step MFU (toy)",
             f"{u['step_s']:.3f} s/step, {u['tokens_per_s']:,.0f} tok/s, MFU {u['mfu']:.1%}" if u else "FAILED",
             ">= 45% MFU", bool(u) and u["mfu"] >= 0.45))
k = load("logprobs")
if k:
    r = k["chunked_fwd_bwd_s"] / k["four_matmuls_s"]
rows.append(("log-prob kernel fwd+bwd / four matmuls",
             f"{k['chunked_fwd_bwd_s'] * 1e3:.1f} ms / {k['four_matmuls_s'] * 1e3:.1f} ms = {r:.3f}" if k else "FAILED",
             "<= 1.15", bool(k) and r <= 1.15))
y = last_json("sync")
rows.append(("sync checkpoint write / engine-side read",
             f"{y['checkpoint_gb']:.2f} GB: write {y['write_gbps']:.2f} GB/s, read {y['read_gbps']:.2f} GB/s" if y else "FAILED",
             "(recorded)", None if y else False))
print("| check | measured | target | met |")
print("|---|---|---|---|")
for name, got, target, ok in rows:
    print(f"| {name} | {got} | {target} | {'-' if ok is None else ('yes' if ok else 'no')} |")
if smoke:
    print("(--cpu-smoke: toy sizes on the CPU; targets do not apply)")
PYEOF
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "error: stages failed: ${FAILED[*]} (logs in $OUT)" >&2
  exit 1
fi
rm -rf "$OUT"
