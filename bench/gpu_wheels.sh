#!/usr/bin/env bash
# Fetch (here, where PyPI is reachable) the wheels llmbuild needs on the lent GPU machine beyond its
# image (which has torch, triton, transformers, safetensors, click, rich, pyyaml, pytest; no pydantic),
# into .whl/ (git-ignored), for `device run` to carry: bench/gpu_check.sh installs them from there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
ls .whl
