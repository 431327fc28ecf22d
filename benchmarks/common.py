"""Shared helpers of the benchmarks: paired timing, peak memory, goals and a description of the machine.

Timings on a shared machine are noisy, so the benchmarks report ratios measured in one process: two variants are run
alternately (A, B, A, B, ...) after a warm-up and the ratio is the median of the per-pair ratios, which cancels most
of the slow drift caused by other processes.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch


def time_once(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn) for _ in range(repeats))


def paired_times(
    baseline: Callable[[], object], candidate: Callable[[], object], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Time two variants alternately; return both medians and `speedup` = median of baseline/candidate per pair.

    A speedup above 1 means the candidate is faster. Alternating the calls exposes both variants to the same load.
    """
    for _ in range(warmup):
        baseline()
        candidate()
    pairs = [(time_once(baseline), time_once(candidate)) for _ in range(repeats)]
    return {
        "baseline_s": statistics.median(base for base, _ in pairs),
        "candidate_s": statistics.median(cand for _, cand in pairs),
        "speedup": statistics.median(base / cand for base, cand in pairs),
        "repeats": repeats,
    }


def peak_tensor_memory(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensor memory allocated while `fn` runs, from the profiler's allocation events.

    The profiler records every allocation and free of torch's CPU allocator, so the running sum of the events in time
    order gives the live tensor memory; unlike the process RSS it does not depend on what the C allocator kept cached
    from earlier calls. Model weights allocated before the call are not included.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda event: event.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def _cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What the numbers were measured on: CPU, cores, RAM, load, library versions and the date."""
    import transformers

    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


@dataclass
class Goal:
    """A target for a machine-independent ratio: `value` must be >= `target` (or <= when `higher_is_better` is
    False). `value` is `None` when the measurement is pending or was skipped."""

    name: str
    value: float | None
    target: float
    higher_is_better: bool = True
    unit: str = "x"
    note: str = ""

    @property
    def met(self) -> bool | None:
        """True/False once measured, `None` while pending."""
        if self.value is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    @property
    def status(self) -> str:
        return {True: "met", False: "missed", None: "pending"}[self.met]

    def to_dict(self) -> dict:
        return {**asdict(self), "met": self.met, "status": self.status}


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def markdown_table(header: list[str], rows: list[list[object]], align: str | None = None) -> str:
    """A Markdown table; `align` holds one character per column, `l` or `r` (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if side == "l" else "---:" for side in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def run_cli(
    doc: str,
    run: Callable[..., dict],
    to_markdown: Callable[[dict], str],
    quick: str,
    smoke: str | None = None,
    output: Path | None = None,
) -> None:
    """Command-line entry point shared by the benchmarks: `--quick` (and `--smoke` when `smoke` describes it), then
    the table, and the JSON results printed or, with an `output` default, written to `--output`."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick)
    if smoke:
        parser.add_argument("--smoke", action="store_true", help=smoke)
    if output:
        parser.add_argument("--output", default=str(output), help="where to write the JSON results")
    args = parser.parse_args()
    results = run(quick=args.quick, **({"smoke": args.smoke} if smoke else {}))
    print(to_markdown(results))
    if output:
        write_json(Path(args.output), results)
    else:
        print(json.dumps(results, indent=2))
