"""Print the main job's results: retrieval on the held-out split against chance, and the generated captions. Reads
the files `bash scripts/main_job.sh` wrote into its output folder (`retrieval/retrieval_results.json`,
`captions.jsonl`, `caption_references.json`; default outputs/main_job); every number printed comes from them. Writes
nothing.

    python examples/summarize_main_job.py outputs/main_job
"""

import json
import sys
from pathlib import Path

from modeling_mico_cli import default_output, script_parser


def retrieval_table(results: dict) -> str:
    """Every direction of the results (text->target and back, contrastive, not re-ranked) against chance."""
    chance_r1 = 100 / results["num_items"]
    chance_r5 = min(100.0, 5 * chance_r1)
    lines = ["| direction | R@1 | R@5 | chance R@1 | chance R@5 |", "| --- | --- | --- | --- | --- |"]
    directions = [key.removesuffix("/R@1") for key in results if key.endswith("/R@1") and key.count("/") == 1]
    for direction in directions:
        if direction != "chance" and f"{direction}/R@5" in results:
            lines.append(
                f"| {direction} | {results[f'{direction}/R@1']:.1f} | {results[f'{direction}/R@5']:.1f} "
                f"| {chance_r1:.1f} | {chance_r5:.1f} |"
            )
    return "\n".join(lines)


def main(output_dir: str) -> int:
    out = Path(output_dir)
    results = json.loads((out / "retrieval" / "retrieval_results.json").read_text())
    print(f"\nRetrieval on the held-out split ({results['num_items']} items, {results['num_texts']} captions), %:")
    print(retrieval_table(results))
    references = json.loads((out / "caption_references.json").read_text())
    print("\nGenerated captions (reference in brackets):")
    for line in (out / "captions.jsonl").read_text().splitlines():
        row = json.loads(line)
        name = Path(row["path"]).name
        print(f"- {name}: {row['caption']!r}  [{references.get(name, '?')}]")
    return 0


if __name__ == "__main__":
    parser = script_parser(__doc__)
    parser.add_argument(
        "output_dir", nargs="?", default=default_output("main_job"), help="the main job's output folder"
    )
    sys.exit(main(parser.parse_args().output_dir))
