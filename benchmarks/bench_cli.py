"""How fast every script of examples/ and conversion/ answers `--help`, against importing the package.

Each script of the checkout `--root` (default: this one; another one, e.g. `git worktree add /tmp/before <rev>`,
gives the numbers before a change) runs with `--help` in a fresh interpreter; so do `python -c "import modeling_mico"` (what every `--help`
cost before the scripts parsed their arguments first) and `python -c "import torch"`. The commands run round-robin,
`repeats` rounds (so that all of them meet the same load), and each reports its median wall time. Goal: every
`--help` under 2 s.

    python -m benchmarks.bench_cli [--quick] [--root CHECKOUT] [--output_dir benchmarks/results]

Writes `cli.json` to --output_dir and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 2.0
BASELINES = {"import modeling_mico": "import modeling_mico", "import torch": "import torch"}


def scripts(root: Path) -> list[str]:
    """The scripts of the checkout `root`, relative to it."""
    paths = [path for pattern in ("examples/*.py", "conversion/*.py") for path in root.glob(pattern)]
    return sorted(str(path.relative_to(root)) for path in paths)


def _seconds(command: list[str], root: Path) -> tuple[float, str]:
    """Wall seconds of `command` (run from the checkout `root` with it on the path) and its output."""
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, cwd=root, env=env, check=False)
    return time.perf_counter() - start, completed.stdout


def run(quick: bool = False, root: Path = ROOT) -> dict:
    """Median `--help` seconds of every script of `root` and of the baseline imports, `repeats` round-robin rounds
    (a script whose `--help` fails is timed too: it is what a user waits for)."""
    repeats = 3 if quick else 7
    names = scripts(root)
    commands = {script: [sys.executable, script, "--help"] for script in names}
    commands.update({name: [sys.executable, "-c", code] for name, code in BASELINES.items()})
    times: dict[str, list[float]] = {name: [] for name in commands}
    lines: dict[str, int] = {}
    for _ in range(repeats):
        for name, command in commands.items():
            seconds, output = _seconds(command, root)
            times[name].append(seconds)
            lines[name] = len(output.splitlines())
    medians = {name: statistics.median(values) for name, values in times.items()}
    rows = [{"script": script, "help_s": medians[script], "help_lines": lines[script]} for script in names]
    slowest = max(row["help_s"] for row in rows)
    return {
        "root": str(root),
        "rows": rows,
        "baselines_s": {name: medians[name] for name in BASELINES},
        "slowest_help_s": slowest,
        "goal_s": GOAL_S,
        "goal_met": slowest < GOAL_S,
        "repeats": repeats,
        "load_average": os.getloadavg()[0],
    }


def to_markdown(results: dict) -> str:
    """The results as a Markdown table and a line on the goal."""
    table = ["| script | --help s | lines |", "| --- | ---: | ---: |"]
    table += [f"| {row['script']} | {row['help_s']:.2f} | {row['help_lines']} |" for row in results["rows"]]
    table += [f'| `python -c "{name}"` | {seconds:.2f} | |' for name, seconds in results["baselines_s"].items()]
    verdict = "met" if results["goal_met"] else "missed"
    return (
        "\n".join(table)
        + f"\n\nSlowest --help {results['slowest_help_s']:.2f} s (goal < {results['goal_s']:.0f} s: {verdict}); medians"
        f" of {results['repeats']} round-robin rounds, load average {results['load_average']:.2f} at the end."
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose scripts are timed")
    parser.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"), help="where cli.json goes")
    args = parser.parse_args(argv)
    results = run(quick=args.quick, root=args.root.resolve())
    from benchmarks.common import machine_info, write_json

    name = "cli.json" if args.root.resolve() == ROOT else "cli_other_checkout.json"
    write_json(Path(args.output_dir) / name, {"machine": machine_info(), **results})
    print(to_markdown(results))
    return results


if __name__ == "__main__":
    main()
