#!/usr/bin/env bash
# llmbuild on a lent NVIDIA GPU (issue 6), in stages that each fit one `device run` call (10 minutes):
#
#   bench/gpu_check.sh kernels      Triton kernel tests natively (no interpreter), retargeted graphs on the GPU
#   bench/gpu_check.sh engines      tiny cuda engines against transformers, CUDA graphs on/off, fp8 formats
#   bench/gpu_check.sh build bf16   Llama-3-8B-shaped random checkpoint (once), then its bf16 cuda engine
#   bench/gpu_check.sh build fp8    the same checkpoint with fp8 weights and fp8 KV cache
#   bench/gpu_check.sh bench        decode tok/s at batch 1 (against the HBM ceiling) and batch 64, CUDA graphs
#                                   on vs off, fp8 vs bf16 (engines built by the two build stages); the targets'
#                                   summary by bench/gpu_summary.py
#
# Before the first call, here: bench/gpu_wheels.sh (the packages the GPU image lacks, into .whl/). Then one
# device call per stage, e.g. run(command="bench/gpu_check.sh kernels", carry=[".whl"]); calls back to back keep
# the machine warm, and with it the checkpoint, engines and build cache of the earlier stages.
# Logs and results go to $OUT (what the device tool brings back) or else bench/results/gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: bench/gpu_check.sh kernels | engines | build bf16 | build fp8 | bench}
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 LLMBUILD_CACHE_DIR=$PWD/build/cache
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-')
ckpt=checkpoints/llama3-8b-random
llmbuild() { python3 -m llmbuild.cli "$@"; }

run_stage() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  case $stage in
    kernels)
      TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/plugins/triton tests/builder/test_retarget.py
      ;;
    engines)
      TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_cuda_engine.py
      ;;
    build)
      format=${2:?build needs bf16 or fp8}
      if [ ! -f $ckpt/model.safetensors ]; then
        time python3 bench/make_random_checkpoint.py --shape llama3-8b --out $ckpt --device cuda
      fi
      time llmbuild compile bench/recipes/llama3-8b-cuda-"$format".yaml -o engines/llama3-8b-cuda-"$format" --json \
        | tee "$out/build-llama3-8b-$format-$gpu.json"
      ;;
    bench)
      for format in bf16 fp8; do
        for graphs in cuda-graphs no-cuda-graphs; do
          llmbuild bench offline engines/llama3-8b-cuda-$format --batch 1 --batch 64 --repeats 3 --threads 8 \
            --"$graphs" --out "$out/llama3-8b-$format-$graphs-$gpu"
        done
      done
      python3 bench/gpu_summary.py "$out"
      ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
}

run_stage "$@" 2>&1 | tee "$out/gpu-check-$stage${2:+-$2}-$gpu.log"
