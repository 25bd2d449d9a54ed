#!/usr/bin/env bash
# The sampling measurements that need a GPU (H100 / H200), one command, about 5 minutes:
# JAX sampler decode at the Qwen2.5-1.5B shape vs the HBM bound, filtered token selection
# vs a full sort at batch 64 x 151,936, and the sync write / read rates on this host's disk.
# Usage: bash benchmarks/gpu_sampling.sh [HBM_GBPS] [SYNC_DIR]   (H200: 4800; H100 SXM: 3350)
set -euo pipefail
cd "$(dirname "$0")/.."
HBM=${1:-4800}
SYNC_DIR=${2:-$(mktemp -d)}
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
python benchmarks/sampler.py --preset=qwen2.5-1.5b --hbm_gbps="$HBM"
python benchmarks/sampler.py --filter_bench --batch=64 --vocab=151936 --repeats=20
python benchmarks/sync.py --gb=4 --hidden=2048 --dir="$SYNC_DIR"
