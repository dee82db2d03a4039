#!/usr/bin/env bash
# Fetch (here, where PyPI is reachable) the wheels llmbuild needs on the lent GPU machine beyond its image,
# into .whl/ (git-ignored), for `device run` to carry: bench/gpu_check.sh installs them from there.
# The image (python 3.12, torch 2.11, triton 3.6) has transformers, safetensors, tokenizers, click, rich, pyyaml,
# jinja2, prometheus-client, httpx, anyio, h11, peft, pytest(-xdist, -timeout); it lacks pydantic, fastapi /
# starlette / uvicorn (the server), llguidance (structured output) and cryptography (signing).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 \
  -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 llguidance==1.9.1 cryptography==50.0.2 cffi==2.1.1 \
  pycparser==3.12 opentelemetry-api==1.45.2 typing-extensions==4.16.0
ls .whl
