#!/usr/bin/env bash
# The main job on a fresh machine: install, generate the synthetic omni-modal data, pretrain a tiny MiCo on CPU,
# report text<->video/audio retrieval on the held-out split against chance, and caption a few held-out items.
#
#   bash scripts/main_job.sh [OUTPUT_DIR] [--overwrite]
#
# OUTPUT_DIR defaults to outputs/main_job; an existing non-empty one is refused unless --overwrite is given.
# MICO_SKIP_INSTALL=1 skips the install step; MICO_MAX_STEPS / MICO_NUM_SAMPLES change the size of the run.
set -euo pipefail
cd "$(dirname "$0")/.."

out="outputs/main_job"
overwrite=0
for argument in "$@"; do
  case "$argument" in
    --overwrite) overwrite=1 ;;
    -*) echo "unknown option $argument" >&2; exit 2 ;;
    *) out="$argument" ;;
  esac
done
if [ -d "$out" ] && [ -n "$(ls -A "$out")" ]; then
  if [ "$overwrite" -ne 1 ]; then
    echo "$out is not empty; pass --overwrite to replace it" >&2
    exit 1
  fi
  rm -rf "$out"
fi

[ "${MICO_SKIP_INSTALL:-0}" = "1" ] || bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

steps="${MICO_MAX_STEPS:-300}"
samples="${MICO_NUM_SAMPLES:-500}"

echo "== 1/4 synthetic omni-modal data ($samples samples)"
python examples/make_synthetic_dataset.py --output_dir "$out/data" --num_samples "$samples" --seed 0

echo "== 2/4 pretraining a tiny MiCo on CPU ($steps steps)"
python examples/run_pretrain.py --config_name tiny \
  --train_file "$out/data/train.jsonl" --output_dir "$out/model" \
  --modalities video audio \
  --do_train --max_steps "$steps" --per_device_train_batch_size 16 \
  --learning_rate 1e-3 --warmup_steps 20 --weight_decay 0.01 \
  --logging_steps 25 --save_strategy no --dataloader_num_workers 1 --report_to none --seed 0

echo "== 3/4 retrieval on the held-out split"
python examples/run_retrieval_eval.py --model_name_or_path "$out/model" \
  --test_file "$out/data/test.jsonl" --output_dir "$out/retrieval" --modalities video audio va

echo "== 4/4 captions of held-out videos"
mkdir -p "$out/caption_inputs"
python - "$out" <<'PY'
import json, pathlib, shutil, sys

out = pathlib.Path(sys.argv[1])
rows = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text().splitlines()][:4]
for row in rows:
    shutil.copy(out / "data" / row["video"], out / "caption_inputs" / pathlib.Path(row["video"]).name)
(out / "caption_references.json").write_text(json.dumps({pathlib.Path(r["video"]).name: r["caption"] for r in rows}, indent=2))
PY
python examples/run_captioning.py --model_name_or_path "$out/model" \
  --inputs "$out/caption_inputs" --output_file "$out/captions.jsonl" --num_beams 3 --max_new_tokens 20

python examples/summarize_main_job.py "$out"
