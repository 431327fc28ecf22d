"""Run every MiCo benchmark in one process and report machine-independent ratios against their goals.

Writes one JSON file per benchmark and `summary.json` into `--output_dir` (default `benchmarks/results`), the chart
`summary.png` there (the ratios as bars against their goals) and the Markdown report `RESULTS.md` (default
`benchmarks/RESULTS.md`; `<output_dir>/RESULTS.md` when only `--output_dir` is given).

    python -m benchmarks [--quick | --smoke] [--only attention,conversion] [--output_dir DIR] [--markdown FILE]
                         [--original_repo DIR --original_python PY]

With `--original_repo` (a checkout of github.com/invictus717/MiCo) and `--original_python` (a Python environment with
its pins), the `original` benchmark times the original code beside the package (benchmarks/bench_original.py);
without them it is reported as skipped.

Goals (ratios measured in the same run, so they do not depend on the machine's speed):

* SDPA at least matches eager attention on CPU at ViT-g width (eager time / SDPA time >= 1);
* cached caption generation is at least 5x faster than recomputing the prefix (40 tokens, 3 beams);
* a greedy decoding step at batch 1 and at batch 4 is within 1.5x of its roofline bound (fraction >= 0.67; the
  bounds are measured at the start of the run), and a 3-beam step of one item costs no more than a greedy step of 3
  items;
* decoding the 4 sampled frames of tests/fixtures/media/test.mp4 is at least 3x faster than decoding all frames;
* media decoding takes at most 30 % of an end-to-end retrieval evaluation at the tiny size;
* the conversion's peak resident memory is at most 1.3x the checkpoint size;
* against the original code (when given): captions at least 10x faster (the slowest of greedy / 3 beams at batch 1 and
  4), video preprocessing at least 1.5x faster (the slower of 4 and 8 frames).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks import bench_attention, bench_conversion, bench_generation, bench_original, roofline  # noqa: E402
from benchmarks.common import Goal, machine_info, markdown_table, write_json  # noqa: E402


DEFAULT_OUTPUT_DIR = ROOT / "benchmarks" / "results"
DECODING_BOUND_FRACTION = 1 / 1.5  # a decoding step within 1.5x of max(FLOP bound, byte bound)
DEFAULT_MARKDOWN = ROOT / "benchmarks" / "RESULTS.md"
BENCHMARKS = (
    "attention",
    "generation",
    "precision",
    "processing",
    "retrieval",
    "conversion",
    "training",
    "original",
)  # report order
RUN_ORDER = (
    "attention",
    "processing",
    "retrieval",
    "conversion",
    "training",
    "original",
    "precision",
    "generation",
)  # slowest last
TITLES = {
    "attention": "Attention: eager vs SDPA (CPU, float32)",
    "generation": "Caption generation: recompute vs key/value cache",
    "precision": "bfloat16 and torch.compile of the towers (CPU)",
    "processing": "Processing",
    "retrieval": "Retrieval evaluation end to end",
    "conversion": "Conversion of a release-size checkpoint",
    "training": "Training throughput: DDP, DeepSpeed ZeRO-1/2/3, FSDP2 and the shard pipeline (CPU)",
    "original": "Side by side with the original MiCo code",
}


def run_benchmark(
    name: str, mode: str, full_generation: bool = False, bounds: dict | None = None, original: dict | None = None
) -> dict:
    """Run `benchmarks/bench_<name>.py`; a missing module (another engineer's, not written yet) gives `pending`.

    Generation runs its quick mode (batch 1, one recompute/cached pair) unless `full_generation`: recomputing the
    prefix is so slow on CPU that the full mode takes about an hour on two shared cores, and the ratio is large. It
    reports its decoding steps against `bounds` (the machine's roofline measured at the start of the run). The
    comparison with the original code needs `original` (`original_repo`, `original_python`), else it is skipped.
    """
    if name == "original" and not (original and original.get("original_repo") and original.get("original_python")):
        return {"skipped": "needs --original_repo and --original_python (see docs/performance.md)"}
    try:
        module = importlib.import_module(f"benchmarks.bench_{name}")
    except ModuleNotFoundError as error:
        if error.name != f"benchmarks.bench_{name}":
            raise
        return {"pending": f"benchmarks/bench_{name}.py is not present yet"}
    start = time.perf_counter()
    if name in ("attention", "retrieval", "conversion", "training"):
        results = module.run(quick=mode == "quick", smoke=mode == "smoke")
    elif name == "precision":
        results = module.run(quick=mode == "quick", smoke=mode == "smoke", machine=bounds)
    elif name == "original":
        results = module.run(**original, quick=mode == "quick", smoke=mode == "smoke", machine=bounds)
    elif name == "generation":
        results = module.run(quick=mode != "full" or not full_generation, machine=bounds)
    else:  # processing exposes run(quick) only; its quick mode is the smallest
        results = module.run(quick=mode != "full")
    results["benchmark_s"] = time.perf_counter() - start
    return results


def decoding_share(results: dict) -> float | None:
    """The media decoding stage's share of a retrieval evaluation (benchmarks/bench_retrieval.py)."""
    return next((stage["share"] for stage in results["stages"] if stage["stage"] == "decoding"), None)


def generation_speedup(results: dict) -> float | None:
    """Cached vs recompute speedup of 3-beam search (benchmarks/bench_generation.py), `None` when not measured."""
    return next((row["speedup"] for row in results["rows"] if row["num_beams"] == 3), None)


def step_bound_fraction(items: int) -> Callable[[dict], float | None]:
    """The fraction of its roofline bound reached by the package's greedy decoding step at batch `items`."""

    def extract(results: dict) -> float | None:
        rows = [row for row in results.get("steps", []) if (row["items"], row["num_beams"]) == (items, 1)]
        return rows[0]["roofline"]["fraction_of_bound"] if rows else None

    return extract


def beams_vs_rows(results: dict) -> float | None:
    """A 3-beam decoding step of one item over a greedy step of 3 items (`bench_generation.beams_vs_rows`)."""
    return bench_generation.beams_vs_rows(results.get("steps", []))


def _measured(results: dict, name: str, extract: Callable[[dict], float | None]) -> tuple[float | None, str]:
    """A goal's value and a note: why it is missing, else empty."""
    entry = results.get(name)
    if entry is None:
        return None, "not run (--only)"
    if "pending" in entry or "skipped" in entry:
        return None, entry.get("pending") or entry["skipped"]
    value = extract(entry)
    return value, "" if value is not None else "no matching measurement in the results"


def evaluate_goals(results: dict) -> list[Goal]:
    """The goals, measured from this run's results."""
    conversion_ratio = bench_conversion.default_run
    specs = [
        (
            "SDPA vs eager, ViT-g vision tower (eager s / SDPA s)",
            "attention",
            bench_attention.vision_g_speedup,
            1.0,
            True,
        ),
        ("cached vs recompute generation, 40 tokens, 3 beams", "generation", generation_speedup, 5.0, True),
        (
            "decoding step at batch 1 (greedy): fraction of its roofline bound",
            "generation",
            step_bound_fraction(1),
            DECODING_BOUND_FRACTION,
            True,
            "",
        ),
        (
            "decoding step at batch 4 (greedy): fraction of its roofline bound",
            "generation",
            step_bound_fraction(4),
            DECODING_BOUND_FRACTION,
            True,
            "",
        ),
        ("3-beam decoding step / greedy step of 3 items", "generation", beams_vs_rows, 1.0, False),
        ("sampled (4 frames) vs full decode of test.mp4", "processing", lambda r: r["decode"]["speedup"], 3.0, True),
        (
            "decoding share of an end-to-end retrieval evaluation (tiny model)",
            "retrieval",
            decoding_share,
            0.3,
            False,
            "",
        ),
        (
            "captions vs the original code (slowest case)",
            "original",
            partial(bench_original.minimum_speedup, prefix=("greedy", "3-beam")),
            10.0,
            True,
        ),
        (
            "video preprocessing vs the original code (slower of 4, 8 frames)",
            "original",
            partial(bench_original.minimum_speedup, prefix="video"),
            1.5,
            True,
        ),
        (
            "conversion peak RSS / checkpoint size",
            "conversion",
            lambda r: conversion_ratio(r)["peak_rss_ratio"] if conversion_ratio(r) else None,
            bench_conversion.RSS_GOAL,
            False,
        ),
    ]
    goals = []
    for title, name, extract, target, higher, *unit in specs:  # unit: "x" (a ratio) unless given
        value, note = _measured(results, name, extract)
        goals.append(Goal(title, value, target, higher_is_better=higher, note=note, unit=unit[0] if unit else "x"))
    return goals


def plot_summary(goals: list[Goal], path: Path) -> None:
    """One panel per goal: the measured ratio as a bar (green met, red missed, grey pending), the goal dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(goals), figsize=(3.2 * len(goals), 3.6))
    colours = {True: "tab:green", False: "tab:red", None: "lightgrey"}
    for axis, goal in zip(axes, goals):
        value = goal.value if goal.value is not None else 0.0
        axis.bar([0], [value], color=colours[goal.met], width=0.6)
        axis.axhline(goal.target, color="black", linestyle="--", linewidth=1)
        sign = ">=" if goal.higher_is_better else "<="
        axis.set_xlabel(f"dashed: goal {sign} {goal.target:g}{goal.unit}", fontsize=9)
        label = f"{goal.value:.2f}{goal.unit}" if goal.value is not None else "pending"
        axis.text(0, value, label, ha="center", va="bottom", fontsize=10, fontweight="bold")
        axis.set_xticks([])
        axis.set_xlim(-0.6, 0.6)
        axis.set_ylim(0, max(value, goal.target) * 1.3)
        axis.set_title(_wrap(goal.name, 30), fontsize=9)
    figure.suptitle("MiCo benchmark ratios against their goals (one run, same machine)", fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _wrap(text: str, width: int) -> str:
    """Break `text` into lines of at most about `width` characters, at spaces."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def _section(name: str, entry: dict) -> str:
    """The Markdown section of one benchmark (its own `to_markdown` when it has one)."""
    if "pending" in entry:
        body = f"Pending: {entry['pending']}."
    else:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        body = module.to_markdown(entry) if hasattr(module, "to_markdown") else f"```\n{entry}\n```"
        if "benchmark_s" in entry:
            body += f"\n\n(benchmark time {entry['benchmark_s']:.0f} s)"
    return f"## {TITLES[name]}\n\n{body}"


def _attention_note(entry: dict) -> str:
    """Plain-language reading of the attention investigation."""
    core = entry.get("core")
    if not core:
        return ""
    return (
        f"At {core['width']} width the attention core alone runs {core['core_speedup']:.2f}x faster with SDPA than "
        f"eager, but it is only {core['eager_core_share_of_forward']:.0%} of the eager forward pass (the qkv, proj and "
        f"MLP matrix products dominate at 257 tokens), so the whole-tower ratio is bounded by "
        f"{core['model_speedup_bound']:.2f}x. The fused-qkv split gives strided q/k/v views; SDPA on them is "
        f"{core['strided_vs_contiguous_speedup']:.2f}x as fast as SDPA preceded by `.contiguous()` copies "
        f"({core['sdpa_strided_ms']:.1f} ms vs {core['sdpa_contiguous_copy_ms']:.1f} ms, medians of the same "
        "alternated pairs), so forcing contiguity "
        f"{'would not help' if core['strided_vs_contiguous_speedup'] >= 1 else 'would help'}."
    )


# GPU results come from `benchmarks/bench_gpu.py` run on a lent GPU machine (benchmarks/gpu/run_on_device.sh); the
# CPU suite cannot re-measure them, so their last report is carried into RESULTS.md as it was measured.
GPU_NOTE = (
    "The GPU section below was measured separately with `bash benchmarks/gpu/run_on_device.sh` "
    "(`benchmarks/bench_gpu.py`) and is copied from `benchmarks/results/gpu_*.md`."
)


def roofline_section(results: dict, bounds: dict) -> str:
    """Every timed path as a fraction of its bound: the towers of the attention benchmark (SDPA) and the decoding
    steps of the generation benchmark."""
    rows = []
    attention = results.get("attention", {})
    if "rows" in attention:
        for row, cost in roofline.attention_rows_costs(attention):
            label = f"{row['tower']} forward, {row['layers']} layers, batch {row['batch']}"
            rows.append(roofline.roofline_row(label, row["sdpa_s"], cost, bounds))
    generation = results.get("generation", {})
    rows += [step["roofline"] for step in generation.get("steps", [])]
    rows += [step["roofline"] for step in generation.get("bf16", [])]
    if not rows:
        return ""
    return "\n".join(
        [
            "## Roofline",
            "",
            roofline.machine_line(bounds) + " A path's bound is max(FLOPs / GEMM rate, bytes read / bandwidth) "
            "(`benchmarks/roofline.py` counts them); its fraction of the bound is bound / measured time (1 = at the "
            "bound). Measured on the same shared cores as the timings. The host's memory bandwidth varies from "
            "minute to minute, so a decoding step's byte bound uses the bandwidth of a read of its bytes alternated "
            "with its timings (column *read GB/s*); the towers use the bandwidth measured at the start. A fraction "
            "above 1 means a probe ran slower than the path in its window (a busy moment of the shared host), not "
            "that the path beat the machine.",
            "",
            markdown_table(roofline.ROOFLINE_HEADER, roofline.roofline_table_rows(rows)),
        ]
    )


def to_markdown(results: dict, goals: list[Goal], machine: dict, mode: str, chart: str, bounds: dict) -> str:
    """The whole report."""
    goal_rows = [
        [
            goal.name,
            f"{goal.value:.2f}{goal.unit}" if goal.value is not None else "-",
            f"{'>=' if goal.higher_is_better else '<='} {goal.target:g}{goal.unit}",
            goal.status + (f" ({goal.note})" if goal.note else ""),
        ]
        for goal in goals
    ]
    lines = [
        "# MiCo benchmark results",
        "",
        f"Measured with `python -m benchmarks{'' if mode == 'full' else ' --' + mode}` on {machine['cpu']}, "
        f"{machine['logical_cores']} logical cores ({machine['torch_threads']} torch threads), "
        f"{machine['ram_gb']} GB RAM, Python {machine['python']}, torch {machine['torch']}, transformers "
        f"{machine['transformers']}, {machine['date']}. The cores were shared with other jobs (load average "
        f"{machine['load_average_1min']} at the start), so absolute timings are noisy; ratios come from alternated "
        "runs in one process (median of per-pair ratios).",
        "",
        "## Goals",
        "",
        markdown_table(["goal", "measured", "target", "status"], goal_rows, "lrrl"),
        "",
        f"![benchmark ratios against their goals]({chart})",
    ]
    section = roofline_section(results, bounds)
    if section:
        lines += ["", section]
    for name in BENCHMARKS:
        if name in results:
            lines += ["", _section(name, results[name])]
            if name == "attention" and "pending" not in results[name]:
                lines += ["", _attention_note(results[name])]
    for gpu_report in sorted(DEFAULT_OUTPUT_DIR.glob("gpu_*.md")):
        lines += ["", GPU_NOTE, "", gpu_report.read_text(encoding="utf-8").strip()]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer layers and repeats, a 10-block conversion")
    size.add_argument("--smoke", action="store_true", help="tiny shapes everywhere (seconds; for tests)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {BENCHMARKS}")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="JSON files and summary.png")
    parser.add_argument("--markdown", type=Path, default=None, help="the report (default: see above)")
    parser.add_argument("--full_generation", action="store_true", help="generation in its full mode (about 1 h)")
    parser.add_argument("--original_repo", type=Path, help="checkout of github.com/invictus717/MiCo (`original`)")
    parser.add_argument("--original_python", type=Path, help="Python of an environment with the original's pins")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; choose among {BENCHMARKS}")
    if (args.original_repo is None) != (args.original_python is None):
        parser.error("--original_repo and --original_python go together")
    if args.markdown is None:
        args.markdown = DEFAULT_MARKDOWN if args.output_dir == DEFAULT_OUTPUT_DIR else args.output_dir / "RESULTS.md"
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the selected benchmarks, write JSON, chart and Markdown; returns the summary."""
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    machine = machine_info()
    print("[benchmarks] roofline: GEMM rates and memory bandwidth ...", flush=True)
    bounds = roofline.measure_machine(quick=mode != "full")
    results = {}
    for name in (name for name in RUN_ORDER if name in args.only.split(",")):
        print(f"[benchmarks] {name} ({mode}) ...", flush=True)
        original = {"original_repo": args.original_repo, "original_python": args.original_python}
        results[name] = run_benchmark(name, mode, args.full_generation, bounds, original)
        write_json(args.output_dir / f"{name}.json", results[name])
    goals = evaluate_goals(results)
    summary = {"mode": mode, "machine": machine, "bounds": bounds, "goals": [goal.to_dict() for goal in goals]}
    write_json(args.output_dir / "summary.json", summary)
    chart = args.output_dir / "summary.png"
    plot_summary(goals, chart)
    relative_chart = os.path.relpath(chart, args.markdown.parent)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(to_markdown(results, goals, machine, mode, relative_chart, bounds), encoding="utf-8")
    print(markdown_table(["goal", "measured", "target", "status"], [_goal_row(goal) for goal in goals], "lrrl"))
    return summary


def _goal_row(goal: Goal) -> list[str]:
    value = f"{goal.value:.2f}" if goal.value is not None else "-"
    return [goal.name, value, f"{goal.target:g}", goal.status]


if __name__ == "__main__":
    main()
