#!/usr/bin/env bash
# llmbuild on a lent NVIDIA GPU (issue 26), in stages that each fit one `device run` call (10 minutes):
#
#   bench/gpu_check.sh preflight           versions, the GPU, llmbuild's imports and op library (a fresh machine)
#   bench/gpu_check.sh probe               which AOTInductor packaging loads on this GPU (bench/gpu_probe_aoti.py; the
#                                          first H200 run crashed loading every compiled cuda engine)
#   bench/gpu_check.sh kernels             Triton kernel tests natively (no interpreter), retargeted graphs on the GPU
#   bench/gpu_check.sh engines             tiny cuda engines against transformers, CUDA graphs on/off, fp8 formats
#   bench/gpu_check.sh build SHAPE FORMAT  a SHAPE-shaped random checkpoint (once), then its cuda engine;
#                                          SHAPE llama3-1b (builds in a minute) or llama3-8b, FORMAT bf16 or fp8
#   bench/gpu_check.sh bench SHAPE         decode tok/s at batch 1 (against the HBM ceiling) and batch 64, CUDA graphs
#                                          on vs off, fp8 vs bf16 (the engines of the two build stages); the targets'
#                                          summary by bench/gpu_summary.py; GPU_BACKEND=eager measures the exported
#                                          programs instead (where a compiled package does not load)
#   bench/gpu_check.sh session SECONDS     a call on a fresh machine, inside SECONDS: preflight, then the engine and
#                                          kernel tests beside the llama3-1b builds, then its bench
#
# Before the first call, here: bench/gpu_wheels.sh (the packages the GPU image lacks, into .whl/). Then e.g.
# run(command="bench/gpu_check.sh session 420", carry=[".whl"], timeout_s=480); calls back to back keep the
# machine warm, and with it the checkpoints, engines and build cache of the earlier stages.
# Logs and results go to $OUT (what the device tool brings back: at most 8 files) or else bench/results/gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: bench/gpu_check.sh preflight | probe | kernels | engines | build SHAPE FORMAT | bench SHAPE | session SECONDS}
out=${OUT:-bench/results/gpu}
mkdir -p "$out" bench/results/gpu/runs
export PYTHONUNBUFFERED=1 LLMBUILD_CACHE_DIR=$PWD/build/cache TRITON_INTERPRET=0
if [ -d .whl ] && [ ! -f /tmp/site/.llmbuild-wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  touch /tmp/site/.llmbuild-wheels
fi
export PYTHONPATH=/tmp/site:$PWD
gpu=$( (nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo no-GPU) | head -1 | tr -c 'A-Za-z0-9\n' '-')
llmbuild() { python3 -m llmbuild.cli "$@"; }
# -v: a line per test as it ends, so that a stage cut off by its time still says what passed
pytest_gpu() { python3 -m pytest -v -p no:cacheprovider -p no:logging -o addopts= -ra --timeout 240 "$@"; }

run_stage() {
  case $1 in
    preflight)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
      nproc
      python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
      time python3 -c 'import llmbuild.cli, llmbuild.serve.app; from llmbuild.plugins import load_plugins; load_plugins(); print("llmbuild imports and op library: ok")'
      ;;
    probe)
      python3 bench/gpu_probe_aoti.py --gdb
      ;;
    kernels)
      pytest_gpu -n 6 tests/plugins/triton tests/builder/test_retarget.py
      ;;
    engines)
      pytest_gpu -n 4 tests/runtime/test_cuda_engine.py
      ;;
    build)
      local shape=${2:?build needs a shape} format=${3:?build needs bf16 or fp8} ckpt=checkpoints/$2-random
      if [ ! -f $ckpt/model.safetensors ]; then
        time python3 bench/make_random_checkpoint.py --shape "$shape" --out $ckpt --device cuda
      fi
      time llmbuild --debug compile bench/recipes/"$shape"-cuda-"$format".yaml -o engines/"$shape"-cuda-"$format" --json \
        >bench/results/gpu/runs/build-"$shape"-"$format"-"$gpu".json
      cat bench/results/gpu/runs/build-"$shape"-"$format"-"$gpu".json
      ;;
    bench)
      local shape=${2:?bench needs a shape}
      for format in bf16 fp8; do
        for graphs in cuda-graphs no-cuda-graphs; do
          [ -d engines/"$shape"-cuda-$format ] || continue
          llmbuild --debug bench offline engines/"$shape"-cuda-$format --batch 1 --batch 64 --repeats 3 --threads 8 \
            --"$graphs" ${GPU_BACKEND:+--backend $GPU_BACKEND} --out bench/results/gpu/runs/"$shape"-$format-"$graphs"-"$gpu"
        done
      done
      python3 bench/gpu_summary.py bench/results/gpu/runs --shape "$shape"
      ;;
    session)
      # Each part is cut off in time so that every one gets its turn and the logs come back inside the call.
      local budget=${2:?session needs SECONDS} start=$SECONDS
      left() { local s=$((budget - (SECONDS - start) - $1)); echo $((s > 1 ? s : 1)); }
      timeout 120 "$0" preflight || true
      (timeout "$(left 130)" "$0" engines || true; timeout "$(left 130)" "$0" kernels || true) &
      (timeout "$(left 130)" "$0" build llama3-1b bf16 && timeout "$(left 130)" "$0" build llama3-1b fp8) || true
      wait || true
      timeout "$(left 15)" "$0" bench llama3-1b || true
      tar -czf "$out/results.tgz" bench/results/gpu/runs
      ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
}

if [ "$stage" = session ]; then
  run_stage "$@"  # each part writes its own log
else
  run_stage "$@" 2>&1 | tee "$out/$stage${2:+-$2}${3:+-$3}.log"
fi
