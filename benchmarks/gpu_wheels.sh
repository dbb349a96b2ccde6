#!/usr/bin/env bash
# Wheels that benchmarks/gpu_train_phi3.py needs on a lent GPU machine and its image lacks (or has in
# another version): the device image is Python 3.12 with torch, accelerate, safetensors, tokenizers,
# rich, typer, yaml, matplotlib and pyarrow, and nothing can be fetched there. About 58 MiB, under
# the device tool's 64 MiB for what travels. Then, with the device tool:
#
#   run(command="python3 -m pip install -q --no-index --no-deps .whl/*.whl && PYTHONPATH=src \
#        timeout 540 python3 benchmarks/gpu_train_phi3.py --out $OUT/gpu_train_phi3.json", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
pip="${PIP:-.venv/bin/pip}"
rm -rf .whl && mkdir -p .whl
"$pip" download -q --no-deps -d .whl --python-version 3.12 --only-binary=:all: \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  bitsandbytes==0.50.2 trl==1.16.0 transformers==5.24.0 peft==0.21.2 datasets==5.2.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  dill==0.4.1 multiprocess==0.70.19
du -sh .whl
