#!/usr/bin/env bash
# Installs PyTorch (the CPU build unless asked otherwise), then this checkout with its extras, then builds the
# decoding kernels, one line per step.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash scripts/install.sh [--help]

Installs PyTorch, then this checkout in editable mode with the extras in EXTRAS (default `dev`: training, the
ecosystem integrations and the test tools), into the `python` on PATH (activate a virtual environment first to keep
it apart), then builds the decoding kernels on CPUs with AVX-512 (about 30 s once per machine; g++ is installed with
apt-get when no C++ compiler is found and the script runs as root); in the checkout it writes only the package's
.egg-info folder. Each step prints a line, pip's downloads and its summary. It takes about 2 minutes on 2 CPU cores
with the packages on a local mirror (measured 1 min 45 s into an empty virtual environment, 1 min 40 s with
everything already installed; several times longer while other jobs load the cores); on a new machine add the
download of about 1 GB (PyTorch's CPU build is 192 MB; the dev environment takes 2.0 GB on disk).

PyTorch (pip's plain `pip install torch` takes the multi-GB CUDA build on Linux, even on a machine without a GPU):
  1. a torch that satisfies TORCH_SPEC is already installed: it is kept;
  2. else a wheel for TORCH_SPEC that pip finds without an index (a find-links folder in pip's configuration, as on
     this project's machines): it is installed, offline;
  3. else from TORCH_INDEX: `cpu` (the default without an NVIDIA GPU) is PyTorch's CPU-only index
     https://download.pytorch.org/whl/cpu; `cuda` (the default when `nvidia-smi` is found) is PyPI, whose Linux
     builds bundle CUDA; any other value is used as the index URL (e.g. https://download.pytorch.org/whl/cu128).

Environment:
  TORCH_SPEC   the PyTorch requirement (default: torch==2.13.0, the version the tests ran with; any torch>=2.4 works)
  TORCH_INDEX  cpu | cuda | an index URL (default: cuda if nvidia-smi is on PATH, else cpu)
  EXTRAS       extras of mico-transformers, comma-separated: dev (default), train, ecosystem, or "" for inference only
EOF
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    "") ;;
    *) echo "install.sh: unknown argument '$1' (it takes none; see --help)" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ -z "${TORCH_INDEX:-}" ]; then
    if command -v nvidia-smi > /dev/null; then TORCH_INDEX=cuda; else TORCH_INDEX=cpu; fi
fi
EXTRAS="${EXTRAS-dev}"
TARGET="."
if [ -n "$EXTRAS" ]; then TARGET=".[$EXTRAS]"; fi

# pip's output without its "Requirement already satisfied" lines, which are counted instead.
pip_install() {
    PYTHONUNBUFFERED=1 python -m pip install --progress-bar on "$@" 2>&1 | awk '
        /^Requirement already satisfied/ { kept++; next }
        { print "    " $0; fflush() }
        END { if (kept) printf "    (%d requirements already satisfied)\n", kept }'
}

echo "[1/3] PyTorch: $TORCH_SPEC into $(python -c 'import sys; print(sys.prefix)')"
start=$SECONDS
# torch itself without an index (already installed, or a wheel in pip's find-links); its own dependencies (filelock,
# sympy, ...) are ordinary packages, taken from pip's usual indexes once that build is in place.
if python -m pip install --no-index --no-deps --quiet "$TORCH_SPEC" > /dev/null 2>&1; then
    echo "    torch from this machine (already installed, or a wheel pip finds without an index), then its dependencies"
    pip_install "$TORCH_SPEC"
else
    case "$TORCH_INDEX" in
        cpu) index=https://download.pytorch.org/whl/cpu ;;
        cuda) index=https://pypi.org/simple ;;
        *) index="$TORCH_INDEX" ;;
    esac
    echo "    from $index ($TORCH_INDEX build; set TORCH_INDEX to choose)"
    pip_install "$TORCH_SPEC" --index-url "$index"
fi
echo "    $(python -c 'import torch; print(f"torch {torch.__version__}")'), done in $((SECONDS - start)) s"

echo "[2/3] mico-transformers$([ -n "$EXTRAS" ] && echo "[$EXTRAS]") (editable, from $PWD) and its dependencies"
start=$SECONDS
pip_install -e "$TARGET"
echo "    done in $((SECONDS - start)) s"
echo "[3/3] the decoding kernels (AVX-512 CPUs; built once, cached in TORCH_EXTENSIONS_DIR)"
start=$SECONDS
if ! command -v c++ > /dev/null && command -v apt-get > /dev/null && [ "$(id -u)" = 0 ]; then
    echo "    no C++ compiler: installing g++ with apt-get"
    apt-get install -y --no-install-recommends g++ > /dev/null
fi
python -c 'from modeling_mico.decoding_kernels import decoding_kernels_available as ok; print("    " + ("built" if ok() else "not used here (no AVX-512, no compiler, or MICO_DECODING_KERNELS=0): decoding uses oneDNN"))'
echo "    done in $((SECONDS - start)) s"
python -c 'import modeling_mico, torch, transformers; print(f"Installed: torch {torch.__version__}, transformers {transformers.__version__}, modeling_mico from {modeling_mico.__path__[0]}")'
