#!/usr/bin/env bash
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  cat <<'EOF'
usage: bash scripts/install.sh

Installs the package in editable mode with everything the tests and examples need (`pip install -e ".[dev]"`) into
the current Python environment. PyTorch is installed first, pinned to the CPU wheel (TORCH_SPEC overrides it): an
open range would pull a multi-GB CUDA build. Reads pyproject.toml; writes nothing in the checkout but the package's
.egg-info folder.
EOF
  exit 0
fi
cd "$(dirname "$0")/.."
python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install --quiet -e ".[dev]"
