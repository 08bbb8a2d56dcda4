#!/usr/bin/env bash
# Everything sparse_ad owes a CUDA machine, in one call: the CUDA voxelizer against the CPU
# path on the real device, the voxelizer benchmark (ours vs spconv PointToVoxel vs
# torch.unique, with a floor estimate), the training/inference benchmark (every inference
# engines), and a short real training run + held-out evaluation on a synthetic split (with
# every engine). Results land in $OUT (default runs/device); each step has its own time limit
# so one hang does not lose the rest.
#   OUT=runs/device bash tools/device_check.sh [steps...]   # steps: env cases vox model profile train
set -uo pipefail
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-/tmp/numba-cache} SPARSE_AD_NO_PROGRESS=1
export SPARSE_AD_CACHE=${SPARSE_AD_CACHE:-/tmp/sparse_ad_cache}
steps=${*:-env cases vox model profile train}

step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log, record the status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS-t0))s" | tee -a "$OUT/steps.txt"
  tail -n 25 "$OUT/$name.log"
}

for s in $steps; do case $s in
  env) step env 60 bash -c "nvidia-smi; $PY -c 'import torch, numba, numpy, spconv; \
from numba import cuda; print(torch.__version__, torch.version.cuda, numba.__version__, numpy.__version__, \
spconv.__version__, cuda.is_available(), torch.cuda.get_device_name()); \
import importlib.metadata as md; print({p: md.version(p) for p in (\"numba-cuda\", \"cuda-bindings\", \"cuda-core\") \
if any(d.metadata[\"Name\"] == p for d in md.distributions())})'" ;;
  cases) step cases 180 $PY -m pytest -q -p no:cacheprovider tests/cudasim_cases.py ;;
  vox) step vox 200 $PY tools/voxelize.py --device cuda --out "$OUT/voxelize.json" ;;
  model) step model 300 bash -c "$PY tools/bench_model.py --config configs/anovox_mono.yaml --device cuda \
--batch-size 8 --out $OUT/model_mono.json && $PY tools/bench_model.py --config configs/anovox_mono.yaml \
--device cuda --batch-size 8 --out $OUT/model_mono_1block.json model.blocks_per_level=1 && \
$PY tools/bench_model.py --config configs/demo.yaml --device cuda --batch-size 8 --out $OUT/model_demo.json" ;;
  profile) step profile 200 $PY tools/profile_gpu.py --out "$OUT/profile" ;;
  train) step train 400 bash -c "$PY tools/train.py --config configs/demo.yaml --run-dir $OUT/run \
train.device=cuda train.max_minutes=4 train.epochs=30 data.num_workers=6 train.cpu_threads=0 && \
$PY tools/evaluate.py --checkpoint $OUT/run/best.pt --out $OUT/eval && \
$PY tools/evaluate.py --checkpoint $OUT/run/best.pt --out $OUT/eval_gemm --engine gather_gemm && \
$PY tools/evaluate.py --checkpoint $OUT/run/best.pt --out $OUT/eval_graphs --engine gather_gemm_graphs" ;;
  *) echo "unknown step $s (env cases vox model profile train)"; exit 2 ;;
esac; done
