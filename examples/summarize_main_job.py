"""Print the main job's results: retrieval on the held-out split against chance, zero-shot accuracy, the generated
captions, and where every output was written. Reads the files `bash scripts/main_job.sh` wrote into its output
folder (`retrieval/retrieval_results.json`, `zero_shot/*.jsonl`, `captions*.jsonl`, `caption_references.json`;
default outputs/main_job); every number printed comes from them. Writes nothing.

    python examples/summarize_main_job.py outputs/main_job
"""

import json
import sys
from pathlib import Path

from modeling_mico_cli import default_output, script_parser


# Retrieval target (as in the result keys) -> how the table names it.
TARGET_NAMES = {
    "i": "image",
    "v": "video",
    "a": "audio",
    "d": "depth",
    "n": "normal",
    "va": "video+audio (fused head)",
}


def direction_name(direction: str) -> str:
    """`t2va` -> `text → video+audio (fused head)`, `v2t` -> `video → text`; declared targets keep their name."""
    source, target = direction.split("2", 1)
    if source == "t":
        return f"text → {TARGET_NAMES.get(target, target)}"
    return f"{TARGET_NAMES.get(source, source).removesuffix(' (fused head)')} → text"


def retrieval_table(results: dict) -> str:
    """Every direction of the results (text->target and back, contrastive, not re-ranked) against chance."""
    chance_r1 = 100 / results["num_items"]
    chance_r5 = min(100.0, 5 * chance_r1)
    lines = [
        "| direction | R@1 | R@5 | R@10 | chance R@1 | chance R@5 | R@1 / chance |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    directions = [key.removesuffix("/R@1") for key in results if key.endswith("/R@1") and key.count("/") == 1]
    for direction in directions:
        if direction != "chance" and f"{direction}/R@5" in results:
            r1, r5, r10 = (results[f"{direction}/R@{k}"] for k in (1, 5, 10))
            lines.append(
                f"| {direction_name(direction)} | {r1:.1f} | {r5:.1f} | {r10:.1f} | {chance_r1:.1f} | {chance_r5:.1f} "
                f"| {r1 / chance_r1:.1f}x |"
            )
    return "\n".join(lines)


def zero_shot_table(folder: Path) -> str:
    """Accuracy of every `zero_shot/<modality>_<attribute>.jsonl` against chance (1 / number of labels)."""
    lines = ["| modality | attribute | items | accuracy | chance |", "| --- | --- | --- | --- | --- |"]
    for path in sorted(folder.glob("*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        modality, attribute = path.stem.split("_", 1)
        accuracy = sum(record["predicted"] == record["label"] for record in records) / len(records)
        lines.append(
            f"| {modality} | {attribute} | {len(records)} | {100 * accuracy:.1f} | {100 / len(records[0]['scores']):.1f} |"
        )
    return "\n".join(lines)


def main(output_dir: str) -> int:
    out = Path(output_dir)
    results = json.loads((out / "retrieval" / "retrieval_results.json").read_text())
    print(f"\nRetrieval on the held-out split ({results['num_items']} items, {results['num_texts']} captions), %:")
    print(retrieval_table(results))
    print("\nZero-shot classification of the held-out items (one prompt per label), %:")
    print(zero_shot_table(out / "zero_shot"))
    references = json.loads((out / "caption_references.json").read_text())
    print("\nGenerated captions (reference in brackets):")
    for path in sorted(out.glob("captions*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            print(
                f"- {row['modality']} {Path(row['path']).name}: {row['caption']!r}  [{references.get(row['path'], '?')}]"
            )
    heatmaps = sorted(path.name for path in (out / "retrieval").glob("similarity_*.png"))
    print(f"\nWritten under {out}/:")
    for what, where in (
        ("synthetic data (train.jsonl, test.jsonl, media)", "data/"),
        ("model configuration", "config.json"),
        ("trained model and processor", "model/"),
        ("retrieval results", "retrieval/retrieval_results.json"),
        (f"similarity heat-maps ({', '.join(heatmaps)})", "retrieval/"),
        ("zero-shot predictions", "zero_shot/"),
        ("captions", ", ".join(path.name for path in sorted(out.glob("captions*.jsonl")))),
        ("captioned inputs and their references", "caption_inputs*/, caption_references.json"),
    ):
        print(f"- {what}: {where}")
    return 0


if __name__ == "__main__":
    parser = script_parser(__doc__)
    parser.add_argument(
        "output_dir", nargs="?", default=default_output("main_job"), help="the main job's output folder"
    )
    sys.exit(main(parser.parse_args().output_dir))
