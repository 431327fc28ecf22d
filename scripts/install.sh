#!/usr/bin/env bash
# Installs the package and everything the tests and examples need.
# PyTorch is pinned to the CPU wheel first (TORCH_SPEC overrides it): an open range would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install --quiet -e ".[dev]"
