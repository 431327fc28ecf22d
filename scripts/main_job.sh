#!/usr/bin/env bash
# The main job: synthetic omni-modal data -> pretrain a tiny MiCo on CPU -> held-out retrieval for every modality,
# zero-shot classification and captions -> a summary of every number and of where each output was written.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'EOF'
usage: bash scripts/main_job.sh [OUTPUT_DIR] [--overwrite] [--help]

The main job, one command of a few minutes on 2 CPU cores: install the package (scripts/install.sh), write the
synthetic omni-modal data set (coloured shapes moving towards an edge while a sound plays: images, videos with their
sound track, audio clips, depth and normal maps, each with a caption; 100 held-out items), pretrain a tiny MiCo from
scratch on images, videos, audio, depth and normal maps against their captions, then on the held-out split: text<->item
retrieval for every modality and for video+audio through the fused head (R@1/5/10 against chance, similarity
heat-maps), zero-shot classification of one attribute per modality, and captions of a few items (videos with their
sound, images). It ends with a summary of every number and of where each output was written (default OUTPUT_DIR:
outputs/main_job; a non-empty one is refused unless --overwrite). The run is deterministic for its seed.

Environment: MICO_SKIP_INSTALL=1 skips the install step; MICO_MAX_STEPS (default 1200) and MICO_NUM_SAMPLES
(default 2000, 100 of them held out) change the size of the run; MICO_SEED (default 0) the random draw.
EOF
}

out="outputs/main_job"
overwrite=0
for argument in "$@"; do
  case "$argument" in
    -h|--help) usage; exit 0 ;;
    --overwrite) overwrite=1 ;;
    -*) echo "unknown option $argument (see --help)" >&2; exit 2 ;;
    *) out="$argument" ;;
  esac
done
if [ -e "$out" ] && [ ! -d "$out" ]; then
  echo "$out exists and is not a directory" >&2
  exit 1
fi
if [ -d "$out" ] && [ -n "$(ls -A "$out")" ]; then
  if [ "$overwrite" -ne 1 ]; then
    echo "$out is not empty; pass --overwrite to replace it" >&2
    exit 1
  fi
  rm -rf "$out"
fi

[ "${MICO_SKIP_INSTALL:-0}" = "1" ] || bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One intra-op thread per process (the training process and its one data-loading worker use the two cores): the tiny
# model gains nothing from more, and on a shared machine two spinning threads per process made training ~5x slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

steps="${MICO_MAX_STEPS:-1200}"
samples="${MICO_NUM_SAMPLES:-2000}"
seed="${MICO_SEED:-0}"
start=$SECONDS
mkdir -p "$out"

echo "== 1/6 synthetic omni-modal data ($samples samples)"
# 100 held-out items (fewer for a small MICO_NUM_SAMPLES): chance R@1 is 1 %
test_items=$((samples / 5 < 100 ? samples / 5 : 100))
python examples/make_synthetic_dataset.py --output_dir "$out/data" --num_samples "$samples" --num_test "$test_items" \
  --seed "$seed"

echo "== 2/6 pretraining a tiny MiCo on CPU ($steps steps): image, video, audio, depth, normal against text"
# The tiny preset, with images on their own bridge and contrastive head (the ViT is shared by every modality), so
# that one batch trains images and videos together. The modalities compete for the shared towers: audio, depth and
# normal maps, which show only some of the captions' words, weigh twice in the contrastive loss (with equal weights
# their losses stayed near ln(16) and their retrieval near chance), and the caption loss (videos with their sound and
# images, the contexts captioned below) weighs 0.2, so that it does not drown the contrastive one.
python - "$out/config.json" <<'PY'
import sys

from modeling_mico import MiCoConfig

MiCoConfig.from_preset(
    "tiny",
    knowledge_modalities={"vision": 4, "audio": 4, "depth": 1, "normal": 1, "image": 1},
    modalities={"image": {"encoder": "image", "letter": "i"}},
    fused_heads={"va": ["vision", "audio"]},
    contrastive_tasks=["ti", "tv", "ta", "td", "tn", "tva"],
    matching_tasks=["tva"],
    caption_tasks=["tva", "ti"],
    task_loss_weights={"contrastive_ta": 2, "contrastive_td": 2, "contrastive_tn": 2},
    caption_loss_weight=0.2,
).to_json_file(sys.argv[1])
PY
python examples/run_pretrain.py --config_name "$out/config.json" \
  --train_file "$out/data/train.jsonl" --output_dir "$out/model" \
  --modalities image video audio depth normal \
  --do_train --max_steps "$steps" --per_device_train_batch_size 16 \
  --learning_rate 1e-3 --warmup_steps 20 --weight_decay 0.01 \
  --logging_steps 50 --save_strategy no --dataloader_num_workers 1 --report_to none --seed "$seed"

echo "== 3/6 retrieval on the held-out split: every modality and video+audio"
python examples/run_retrieval_eval.py --model_name_or_path "$out/model" \
  --test_file "$out/data/test.jsonl" --output_dir "$out/retrieval" \
  --modalities image video audio depth normal va

echo "== 4/6 zero-shot classification of held-out items"
mkdir -p "$out/zero_shot"
# one process for the five tasks (examples/run_zero_shot_classification.py's main per task): Python, torch and the
# package are imported once instead of five times
python - "$out" <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, "examples")
from run_zero_shot_classification import main

out = Path(sys.argv[1])
TASKS = (  # output name, modality, attribute, prompt template, labels
    ("image_color", "image", "color", "a {} shape", "red green blue yellow purple orange"),
    ("video_motion", "video", "motion", "a shape moving {}", "left right up down"),
    ("audio_timbre", "audio", "timbre", "a sound that is a {}", "tone buzz chord"),
    ("depth_size", "depth", "size", "a {} shape", "small medium large"),
    ("normal_shape", "normal", "shape", "a {}", "circle square triangle cross"),
)
for name, modality, attribute, template, labels in TASKS:
    main(
        ["--model_name_or_path", str(out / "model"), "--inputs", str(out / "data" / "test.jsonl")]
        + ["--modalities", modality, "--label_column", f"attributes.{attribute}", "--template", template]
        + ["--labels", *labels.split(), "--output_file", str(out / "zero_shot" / f"{name}.jsonl")]
    )
PY

echo "== 5/6 captions of held-out items: videos with their sound, images"
python - "$out" <<'PY'
import json
import shutil
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text().splitlines()]
references = {}
for modality, folder, indices in (
    ("video", "caption_inputs", (0, 1, 2)),
    ("image", "caption_inputs", (3, 4)),
):
    (out / folder).mkdir(exist_ok=True)
    for row in (rows[index % len(rows)] for index in indices):  # small test splits are reused
        target = out / folder / Path(row[modality]).name
        shutil.copy(out / "data" / row[modality], target)
        references[str(target)] = row["caption"]
(out / "caption_references.json").write_text(json.dumps(references, indent=2) + "\n")
PY
python examples/run_captioning.py --model_name_or_path "$out/model" --inputs "$out/caption_inputs" \
  --sound_tracks --output_file "$out/captions.jsonl" --num_beams 3 --max_new_tokens 20

echo "== 6/6 summary"
python examples/summarize_main_job.py "$out"
echo "Main job finished in $(((SECONDS - start) / 60)) min $(((SECONDS - start) % 60)) s on $(getconf _NPROCESSORS_ONLN) CPU cores (install not counted)."
