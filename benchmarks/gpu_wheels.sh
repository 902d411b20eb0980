#!/usr/bin/env bash
# Fetch, here, the wheels that benchmarks/gpu.sh installs on an offline GPU machine whose
# Python (3.12, x86-64 Linux) has PyTorch but not the tested diffusers and transformers:
#   benchmarks/gpu_wheels.sh .whl        # then, there: WHEELS=.whl benchmarks/gpu.sh eager
# The versions are the ones pyproject.toml names as tested; their own needs (huggingface_hub,
# tokenizers, safetensors, ...) are expected on the machine: check with `pip show` there.
set -euo pipefail
dest=${1:?usage: benchmarks/gpu_wheels.sh DIR}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" diffusers==0.42.1 transformers==5.24.0
ls -l "$dest"
