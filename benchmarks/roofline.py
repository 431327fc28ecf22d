"""The machine's bounds and the work of each measured path: a roofline for the benchmark suite.

`measure_machine` times this machine's fp32 and bf16 matrix products and its memory read bandwidth; the `*_cost`
functions count the floating-point operations and the bytes that one pass of a path must read (weights it uses,
cached keys/values, activations are not counted: they stay in cache at these sizes). A path's bound is
`max(flops / GEMM rate, bytes / read bandwidth)` and its *fraction of the bound* is bound / measured time (1 = at the
bound).

    python benchmarks/roofline.py    # prints the machine's bounds
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass
from functools import partial

import torch


@dataclass(frozen=True)
class Cost:
    """Floating-point operations and bytes read by one pass of a path."""

    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, factor: float) -> Cost:
        return Cost(self.flops * factor, self.bytes * factor)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_machine(quick: bool = False) -> dict[str, float]:
    """fp32 and bf16 `torch.mm` throughput (GFLOP/s, square products of side 1024 or 2048) and the memory read
    bandwidth (GB/s, summing a 256 MiB fp32 tensor, far larger than the caches); medians of repeated calls."""
    side, repeats = (1024, 3) if quick else (2048, 5)
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(side, side).to(dtype)
        b = torch.randn(side, side).to(dtype)
        rates[f"{name}_gflops"] = 2 * side**3 / _median_seconds(partial(torch.mm, a, b), repeats) / 1e9
    data = torch.ones(64 * 2**20 if not quick else 16 * 2**20)
    rates["read_gb_s"] = data.numel() * 4 / _median_seconds(data.sum, repeats) / 1e9
    rates["threads"] = torch.get_num_threads()
    return rates


def bound_seconds(cost: Cost, machine: dict[str, float], dtype: str = "fp32") -> float:
    """The roofline time of `cost`: the slower of its compute time at the GEMM rate and its read time."""
    return max(cost.flops / (machine[f"{dtype}_gflops"] * 1e9), cost.bytes / (machine["read_gb_s"] * 1e9))


def linear_cost(rows: int, inputs: int, outputs: int, value_bytes: int) -> Cost:
    """`rows` vectors through an `inputs x outputs` dense layer: its weight and bias are read once."""
    return Cost(2.0 * rows * inputs * outputs, (inputs + 1) * outputs * value_bytes)


def attention_cost(queries: int, keys: int, width: int, cached_bytes: float = 0.0) -> Cost:
    """Scores and weighted sum of `queries` over `keys` (all heads together), reading `cached_bytes` of cached keys
    and values."""
    return Cost(4.0 * queries * keys * width, cached_bytes)


def decoding_step_cost(
    hidden: int,
    intermediate: int,
    layers: int,
    vocab: int,
    context_length: int,
    items: int,
    rows: int,
    cached_tokens: int,
    value_bytes: int = 4,
) -> Cost:
    """One caption decoding step of the append-`[MASK]` scheme: `rows` text rows (beams of `items` items) each feed
    their last token and the `[MASK]` (2 positions) through every layer; the LM head reads the `[MASK]` only.

    Bytes: every weight the step uses (the context's key/value projections are not used: their output is cached),
    the context's cached keys/values once per item and the self-attention keys/values of every row."""
    tokens = 2 * rows
    per_layer = (
        linear_cost(tokens, hidden, hidden, value_bytes) * 4  # self-attention q, k, v, output
        + attention_cost(tokens, cached_tokens + 2, hidden, 2 * rows * cached_tokens * hidden * value_bytes)
        + linear_cost(tokens, hidden, hidden, value_bytes) * 2  # cross-attention q, output
        + attention_cost(tokens, context_length, hidden, 2 * items * context_length * hidden * value_bytes)
        + linear_cost(tokens, hidden, intermediate, value_bytes)
        + linear_cost(tokens, intermediate, hidden, value_bytes)
    )
    head = linear_cost(rows, hidden, hidden, value_bytes) + linear_cost(rows, hidden, vocab, value_bytes)
    embeddings = Cost(0.0, 2 * tokens * hidden * value_bytes)
    return per_layer * layers + head + embeddings


def caption_bound_seconds(machine: dict[str, float], steps: int, **shape) -> float:
    """The roofline time of decoding `steps` tokens of a caption batch of `shape` (the arguments of
    `decoding_step_cost` but `cached_tokens`): the context's key/value projections (once, at the first step) plus
    every step at its own bound (its self-attention cache grows by one token per step)."""
    value_bytes = shape.get("value_bytes", 4)
    projections = linear_cost(
        shape["items"] * shape["context_length"], shape["hidden"], 2 * shape["hidden"], value_bytes
    )
    steps_bound = sum(
        bound_seconds(decoding_step_cost(**shape, cached_tokens=step + 1), machine) for step in range(steps)
    )
    return bound_seconds(projections * shape["layers"], machine) + steps_bound


def encoder_cost(
    width: int, intermediate: int, layers: int, tokens: int, batch: int, context_length: int = 0, value_bytes: int = 4
) -> Cost:
    """A transformer encoder forward of `batch` sequences of `tokens` (ViT blocks, or BERT layers with a
    cross-attention over `context_length` context tokens when it is positive): weights read once per forward."""
    rows = batch * tokens
    per_layer = (
        linear_cost(rows, width, width, value_bytes) * 4
        + attention_cost(rows, tokens, width)
        + linear_cost(rows, width, intermediate, value_bytes)
        + linear_cost(rows, intermediate, width, value_bytes)
    )
    if context_length:
        per_layer = per_layer + (
            linear_cost(rows, width, width, value_bytes) * 2  # q, output
            + linear_cost(batch * context_length, width, width, value_bytes) * 2  # context k, v
            + attention_cost(rows, context_length, width)
        )
    return per_layer * layers


SHAPE = re.compile(r"(\d+)w/(\d+)h/(\d+)(?:mlp|ffn)")


def attention_rows_costs(attention_results: dict) -> list[tuple[dict, Cost]]:
    """The cost of one SDPA forward of every tower timed by `benchmarks/bench_attention.py`."""
    settings = attention_results["settings"]
    costs = []
    for row in attention_results["rows"]:
        match = SHAPE.match(row["shape"])
        if match is None:
            raise ValueError(f"unrecognised tower shape {row['shape']!r} in the attention results")
        width, _, intermediate = map(int, match.groups())
        context = settings["context_length"] if row["tower"].startswith("text") else 0
        tokens = settings["text_tokens"] if context else row["tokens"]  # the text row's tokens cell is a label
        cost = encoder_cost(width, intermediate, row["layers"], tokens, row["batch"], context)
        costs.append((row, cost))
    return costs


def roofline_row(path: str, seconds: float, cost: Cost, machine: dict[str, float], dtype: str = "fp32") -> dict:
    """One line of the roofline table."""
    compute_s = cost.flops / (machine[f"{dtype}_gflops"] * 1e9)
    read_s = cost.bytes / (machine["read_gb_s"] * 1e9)
    bound = max(compute_s, read_s)
    return {
        "path": path,
        "dtype": dtype,
        "measured_ms": seconds * 1e3,
        "gflop": cost.flops / 1e9,
        "gb_read": cost.bytes / 1e9,
        "flop_bound_ms": compute_s * 1e3,
        "byte_bound_ms": read_s * 1e3,
        "read_gb_s": machine["read_gb_s"],
        "bound_ms": bound * 1e3,
        "fraction_of_bound": bound / seconds,
    }


ROOFLINE_HEADER = [
    "path",
    "dtype",
    "measured ms",
    "GFLOP",
    "GB read",
    "FLOP bound ms",
    "read GB/s",
    "byte bound ms",
    "fraction of bound",
]


def roofline_table_rows(rows: list[dict]) -> list[list[str]]:
    """Markdown cells of `roofline_row` results."""
    return [
        [
            row["path"],
            row["dtype"],
            f"{row['measured_ms']:.1f}",
            f"{row['gflop']:.3f}",
            f"{row['gb_read']:.3f}",
            f"{row['flop_bound_ms']:.2f}",
            f"{row['read_gb_s']:.1f}",
            f"{row['byte_bound_ms']:.2f}",
            f"{row['fraction_of_bound']:.2f}",
        ]
        for row in rows
    ]


def machine_line(machine: dict[str, float]) -> str:
    """The measured bounds in one sentence."""
    return (
        f"Bounds measured at the start of this run ({machine['threads']} threads): fp32 `torch.mm` "
        f"{machine['fp32_gflops']:.0f} GFLOP/s, bf16 {machine['bf16_gflops']:.0f} GFLOP/s, memory read "
        f"{machine['read_gb_s']:.1f} GB/s."
    )


if __name__ == "__main__":
    print(machine_line(measure_machine()))
