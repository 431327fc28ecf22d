"""Throughput of MiCo's preprocessing on the example media (CPU).

Measures clips per second for images (test.jpeg), videos (test.mp4, 4 and 8 sampled frames; the files of a batch are
decoded in parallel, one thread each) and audio (test.flac, 3 slices), each as batched processor calls, and the time
to decode the 4 sampled frames of the mp4 against decoding all of its frames. Prints a Markdown table and writes JSON.
The same cases against the original code's processors are in benchmarks/bench_original.py.

    python benchmarks/bench_processing.py [--quick] [--output benchmarks/results/processing.json]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import decord  # noqa: E402

from benchmarks.common import run_cli  # noqa: E402
from modeling_mico.processing_mico import MiCoProcessor  # noqa: E402
from modeling_mico.video_processing_mico import sample_segments  # noqa: E402


MEDIA = ROOT / "tests" / "fixtures" / "media"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "processing.json"


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best wall-clock seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def decode_sampled(path: str, num_frames: int = 4) -> None:
    """Decode only the evaluation frames (one per segment), as the processor does."""
    reader = decord.VideoReader(path, num_threads=1)
    reader.get_batch(sample_segments(range(len(reader)), num_frames)).asnumpy()


def decode_all(path: str) -> None:
    """Decode every frame of the video."""
    reader = decord.VideoReader(path, num_threads=1)
    reader.get_batch(list(range(len(reader)))).asnumpy()


def run(quick: bool = False) -> dict:
    """Run the benchmark; returns `{"rows": [...], "decode": {...}, "settings": {...}}`."""
    repeats, batch = (2, 2) if quick else (5, 8)
    processor = MiCoProcessor()
    image, video, audio = str(MEDIA / "test.jpeg"), str(MEDIA / "test.mp4"), str(MEDIA / "test.flac")
    cases = {
        "image (test.jpeg, 224 px)": lambda: processor(images=[image] * batch),
        "video (test.mp4, 4 frames)": lambda: processor(videos=[video] * batch),
        "video (test.mp4, 8 frames)": lambda: processor(videos=[video] * batch, num_frames=8),
        "audio (test.flac, 3 slices)": lambda: processor(audio=[audio] * batch),
    }
    rows = []
    for name, fn in cases.items():
        seconds = best_time(fn, repeats)
        rows.append({"input": name, "batch": batch, "seconds_per_batch": seconds, "clips_per_s": batch / seconds})
    sampled = best_time(lambda: decode_sampled(video), repeats)
    full = best_time(lambda: decode_all(video), max(1, repeats // 2))
    return {
        "rows": rows,
        "decode": {"sampled_4_frames_s": sampled, "all_frames_s": full, "speedup": full / sampled},
        "settings": {"quick": quick, "repeats": repeats, "batch": batch, "torch_threads": _threads()},
    }


def _threads() -> int:
    """Intra-op threads torch uses (affects the resize and FFT timings)."""
    import torch

    return torch.get_num_threads()


def to_markdown(results: dict) -> str:
    """Results as a Markdown table."""
    lines = ["| input | batch | s / batch | clips / s |", "| --- | ---: | ---: | ---: |"]
    for row in results["rows"]:
        lines.append(
            f"| {row['input']} | {row['batch']} | {row['seconds_per_batch']:.3f} | {row['clips_per_s']:.1f} |"
        )
    decode = results["decode"]
    lines += [
        "",
        "| mp4 decoding (decord) | seconds |",
        "| --- | ---: |",
        f"| 4 sampled frames | {decode['sampled_4_frames_s']:.3f} |",
        f"| all frames | {decode['all_frames_s']:.3f} |",
        f"| ratio (all / sampled) | {decode['speedup']:.1f}x |",
    ]
    return "\n".join(lines)


def main() -> None:
    """Command-line entry point."""
    run_cli(__doc__, run, to_markdown, quick="fewer repeats and a smaller batch", output=DEFAULT_OUTPUT)


if __name__ == "__main__":
    main()
