#!/usr/bin/env bash
# Installs the package, then runs the whole test suite (slow end-to-end tests included) offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -m "slow or not slow" -q --durations=15 tests "$@"
