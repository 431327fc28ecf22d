#!/usr/bin/env python
"""Zero-shot classification of media files with your own labels. Reads a MiCo model (--model_name_or_path) and
--inputs: a folder (one sub-folder per class gives the true labels) or an annotation file (JSON / JSON lines, media
columns named by --modalities, the true label in --label_column, e.g. attributes.color). Each item (a video with its
same-named sound clip goes through the fused head) is scored against every label written into a prompt template, as
the model was trained (cosine similarity / temperature, softmax over the labels). Writes one JSON line per item
(item, label, predicted, scores) to --output_file (default outputs/zero_shot.jsonl; an existing file is replaced only
with --overwrite) and prints a summary line (items, accuracy where the labels are known, chance).

With --attributes, --inputs is a split of the synthetic data (make_synthetic_dataset.py) and every --modalities entry
(video+audio: fused) is classified on every attribute of the data against its whole vocabulary: one JSON line and one
table row per modality and attribute, accuracy against chance.

    python examples/run_zero_shot_classification.py --model_name_or_path outputs/pretrain \\
        --labels red green blue --inputs outputs/synthetic/test.jsonl --modalities image \\
        --label_column attributes.color
    python examples/run_zero_shot_classification.py --model_name_or_path outputs/pretrain --attributes \\
        --inputs outputs/synthetic/test.jsonl --modalities image video audio depth video+audio
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from modeling_mico_cli import default_output, script_parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--model_name_or_path", required=True, help="MiCo directory or Hub repository")
    parser.add_argument("--inputs", required=True, help="a folder (one sub-folder per class) or an annotation file")
    parser.add_argument("--labels", nargs="+", default=None, help="candidate labels (default: the class folders)")
    parser.add_argument("--modalities", nargs="+", default=None, help="media columns / the modality of every file")
    parser.add_argument("--label_column", default=None, help="true-label column of an annotation file (a.b: nested)")
    parser.add_argument(
        "--template", default=None, help="prompt template with {} for the label (default per modality)"
    )
    parser.add_argument(
        "--attributes",
        action="store_true",
        help="--inputs is a synthetic data split: accuracy of each of --modalities on each attribute, against chance",
    )
    parser.add_argument(
        "--prompts_per_label", type=int, default=16, help="--attributes: captions averaged per label (no --template)"
    )
    parser.add_argument(
        "--output_file", default=default_output("zero_shot.jsonl"), help="JSON lines: item, label, predicted, scores"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_file")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    return parser.parse_args(argv)


def write_lines(output: Path, records: list[dict]) -> None:
    """Write `records` as JSON lines to `output` atomically."""
    from modeling_mico.output_utils import write_text_atomic

    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, "".join(json.dumps(record) + "\n" for record in records))


def attribute_table(args: argparse.Namespace, model: Any, processor: Any, output: Path) -> dict:
    """--attributes: accuracy per modality and attribute, written to --output_file and printed as a table."""
    from modeling_mico.zero_shot import attribute_accuracy

    rows = attribute_accuracy(
        model, processor, args.inputs, args.modalities, args.template, args.prompts_per_label, args.batch_size
    )
    write_lines(output, rows)
    print("| modality | attribute | accuracy | chance | items |\n| --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['modality']} | {row['attribute']} | {row['accuracy']:.3f} | {row['chance']:.3f} | {row['items']} |"
        )
    return {"rows": rows, "output_file": str(output)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from modeling_mico import MiCoModel
    from modeling_mico.captioning import resolve_device
    from modeling_mico.evaluation import load_processor
    from modeling_mico.zero_shot import accuracy, classify_items, load_labelled_items

    output = Path(args.output_file)
    if output.exists() and not args.overwrite:
        raise SystemExit(f"--output_file {output} exists; pass --overwrite to replace it")
    if args.attributes and (args.labels or args.label_column or not args.modalities):
        raise SystemExit("--attributes takes --modalities and no --labels / --label_column (they come from the data)")
    model = MiCoModel.from_pretrained(args.model_name_or_path).to(resolve_device(args.device)).eval()
    processor = load_processor(args.model_name_or_path, model.config)
    if args.attributes:
        return attribute_table(args, model, processor, output)
    items, truth = load_labelled_items(args.inputs, model.config, args.modalities, args.label_column)
    if not items:
        raise SystemExit(f"no media items in {args.inputs}")
    labels = args.labels or sorted({label for label in truth if label is not None})
    probabilities = classify_items(model, processor, items, labels, args.template, args.batch_size)
    records = []
    for item, label, row in zip(items, truth, probabilities):
        scores = dict(zip(labels, map(float, row)))
        records.append({"item": item, "label": label, "predicted": max(scores, key=scores.get), "scores": scores})
    write_lines(output, records)
    summary = {
        "items": len(items),
        "accuracy": accuracy(probabilities, labels, truth),
        "chance": 1 / len(labels),
        "output_file": str(output),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
