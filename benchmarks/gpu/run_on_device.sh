#!/usr/bin/env bash
# Run benchmarks/bench_gpu.py once on a lent GPU machine (see DEVELOPERS.md and benchmarks/bench_gpu.py).
#
# Expects the carried wheels installed first and PYTHONPATH set, e.g. from the repository root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu/run_on_device.sh
# Writes into $OUT: gpu_bench.json, gpu_bench.md (both rewritten after every measurement), env.txt and log.txt.
# BENCH_BUDGET (seconds, default 300) is the script's own budget; BENCH_TIMEOUT (default 360) kills it regardless.
# Extra arguments go to bench_gpu.py (e.g. --sections vit,decode).
set -u -o pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
script="$here/bench_gpu.py"  # a copy beside this file, else the one in benchmarks/
[ -f "$script" ] || script="$here/../bench_gpu.py"
OUT="${OUT:-/tmp/gpu_bench_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="${PYTHONPATH:-$PWD}"

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host: $(hostname)  script: $script"
  echo "PYTHONPATH=$PYTHONPATH"
  nvidia-smi 2>&1 | head -20
  python3 - <<'PY'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "huggingface_hub", "tokenizers", "safetensors", "regex", "numpy", "triton",
             "decord", "soundfile", "flash_attn", "flash_attn_interface"):
    try:
        module = importlib.import_module(name)
        print(f"{name:22s} {getattr(module, '__version__', '?'):24s} {getattr(module, '__file__', '')}")
    except Exception as error:
        print(f"{name:22s} NOT IMPORTABLE: {type(error).__name__}: {str(error)[:120]}")
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout -k 15 "${BENCH_TIMEOUT:-360}" python3 "$script" --out "$OUT" --budget "${BENCH_BUDGET:-300}" "$@" 2>&1 \
  | tee "$OUT/log.txt"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  echo "bench_gpu.py exited with $rc (124/137: killed by the timeout); the results written so far:"
  cat "$OUT/gpu_bench.md" 2>/dev/null || echo "(no gpu_bench.md)"
fi
exit "$rc"
