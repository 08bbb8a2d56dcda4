#!/usr/bin/env bash
# Everything sparse_ad owes a CUDA machine, in one call: the CUDA voxelizer against the CPU
# path on the real device, the voxelizer benchmark (ours vs spconv PointToVoxel vs
# torch.unique, with a floor estimate), the training/inference benchmark (every inference
# engines), and a short real training run + held-out evaluation on a synthetic split (with
# every engine). Results land in $OUT (default runs/device); each step has its own time limit
# so one hang does not lose the rest; the exit status is 1 when any step failed.
#   OUT=runs/device bash tools/device_check.sh [steps...]   # steps: env cases vox model profile train
# On a lent machine with limits (one command <= 10 min, at most 8 files back from $OUT):
#   WORK=/tmp/dc BUDGET=540 OUT=$OUT bash tools/device_check.sh env cases vox model
# writes under WORK and packs the small results (logs, JSON, tables; no checkpoints or
# TensorBoard files) into $OUT/results.tar.gz, with $OUT/steps.txt, after every step; BUDGET
# (seconds, all steps together) cuts each step's limit to what is left.
set -uo pipefail
OUT=${OUT:-runs/device}
WORK=${WORK:-$OUT}
BUDGET=${BUDGET:-0}
mkdir -p "$OUT" "$WORK"
failed=0
PY=${PYTHON:-python3}
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-/tmp/numba-cache} SPARSE_AD_NO_PROGRESS=1
export SPARSE_AD_CACHE=${SPARSE_AD_CACHE:-/tmp/sparse_ad_cache}
steps=${*:-env cases vox model profile train}

pack() {  # the small results of WORK into $OUT (nothing to do when they are the same folder)
  [ "$WORK" = "$OUT" ] && return
  tar -czf "$OUT/results.tar.gz" -C "$WORK" --exclude='*.pt' --exclude='tb' --exclude='events.out.*' . 2>/dev/null
  cp "$WORK/steps.txt" "$OUT/steps.txt" 2>/dev/null
}

step() {  # step NAME SECONDS CMD...: run with a limit, log to $WORK/NAME.log, record the status
  local name=$1 limit=$2; shift 2
  if [ "$BUDGET" -gt 0 ]; then
    local left=$((BUDGET - SECONDS - 15))   # 15 s for packing and the transfer
    if [ "$left" -lt 30 ]; then
      echo "$name skipped: BUDGET=$BUDGET s spent" | tee -a "$WORK/steps.txt"; failed=1; pack; return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  local t0=$SECONDS
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  [ "$rc" -ne 0 ] && failed=1
  echo "$name rc=$rc $((SECONDS-t0))s (limit ${limit}s)" | tee -a "$WORK/steps.txt"
  tail -n 25 "$WORK/$name.log"
  pack
}

for s in $steps; do case $s in
  env) step env 60 bash -c "nvidia-smi; $PY -c 'import torch, numba, numpy, spconv; \
from numba import cuda; print(torch.__version__, torch.version.cuda, numba.__version__, numpy.__version__, \
spconv.__version__, cuda.is_available(), torch.cuda.get_device_name()); \
import importlib.metadata as md; print({p: md.version(p) for p in (\"numba-cuda\", \"cuda-bindings\", \"cuda-core\") \
if any(d.metadata[\"Name\"] == p for d in md.distributions())})'" ;;
  cases) step cases 180 $PY -m pytest -q -p no:cacheprovider tests/cudasim_cases.py ;;
  vox) step vox 200 $PY tools/voxelize.py --device cuda --out "$WORK/voxelize.json" ;;
  model) step model 300 bash -c "$PY tools/bench_model.py --config configs/anovox_mono.yaml --device cuda \
--batch-size 8 --out $WORK/model_mono.json && $PY tools/bench_model.py --config configs/anovox_mono.yaml \
--device cuda --batch-size 8 --out $WORK/model_mono_1block.json model.blocks_per_level=1 && \
$PY tools/bench_model.py --config configs/demo.yaml --device cuda --batch-size 8 --out $WORK/model_demo.json" ;;
  profile) step profile 200 $PY tools/profile_gpu.py --out "$WORK/profile" ;;
  train) step train 400 bash -c "$PY tools/train.py --config configs/demo.yaml --run-dir $WORK/run \
train.device=cuda train.max_minutes=4 train.epochs=30 data.num_workers=6 train.cpu_threads=0 && \
$PY tools/evaluate.py --checkpoint $WORK/run/best.pt --out $WORK/eval && \
$PY tools/evaluate.py --checkpoint $WORK/run/best.pt --out $WORK/eval_spconv --engine spconv && \
$PY tools/evaluate.py --checkpoint $WORK/run/best.pt --out $WORK/eval_gemm --engine gather_gemm" ;;
  *) echo "unknown step $s (env cases vox model profile train)"; exit 2 ;;
esac; done
exit $failed
