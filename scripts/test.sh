#!/usr/bin/env bash
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  cat <<'EOF'
usage: bash scripts/test.sh [PYTEST OPTIONS]

Installs the package (scripts/install.sh), then runs the whole test suite offline with pytest, slow end-to-end tests
included, and prints the 15 slowest tests. Options are passed to pytest (e.g. `-x`, `-k retrieval`,
`tests/test_processing.py`). Tests write only into pytest's temporary folders.
EOF
  exit 0
fi
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -m "slow or not slow" -q --durations=15 tests "$@"
