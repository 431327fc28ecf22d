"""bfloat16 and `torch.compile` for MiCo's towers on CPU: speed-up and agreement with float32, side by side.

Two towers with random weights, each run in five variants rotated in one process:

* the vision tower at ViT-g width (1408 wide, 16 heads, MLP 6144; a few blocks of the real per-block shape, 224 px,
  257 tokens per image);
* the text tower at BERT-base width reading a 2,056-token context through cross-attention (matching), over a
  40-token caption batch.

The sizes and repeats of each mode are `benchmarks/bench_attention.py`'s, so that both benchmarks time the same
shapes.

Variants: `fp32` (the default), `bf16` (`model.to(torch.bfloat16)`: weights and activations), `autocast`
(float32 weights, `torch.autocast("cpu", dtype=torch.bfloat16)`), `compile` (`torch.compile(tower, fullgraph=True)`,
float32) and `compile bf16`. For each: median seconds per forward, the speed-up over fp32 (median of per-round
ratios), the fraction of the roofline bound (`benchmarks/roofline.py`, bf16 bound for the bf16 variants), the compile
time (first call) and the agreement with fp32 (relative L2 distance of the last hidden state, and of the class token).

    python benchmarks/bench_precision.py [--quick | --smoke] [--output benchmarks/results/precision.json]
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_attention import MODES, Settings  # noqa: E402
from benchmarks.common import machine_info, markdown_table, run_cli  # noqa: E402
from benchmarks.roofline import ROOFLINE_HEADER, encoder_cost, measure_machine, roofline_row, roofline_table_rows  # noqa: E402
from modeling_mico.configuration_mico import MiCoTextConfig, MiCoVisionConfig  # noqa: E402
from modeling_mico.modeling_mico import MiCoTextModel, MiCoVisionModel  # noqa: E402


DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "precision.json"
VARIANTS = ("fp32", "bf16", "autocast", "compile", "compile bf16")
BF16_VARIANTS = ("bf16", "autocast", "compile bf16")
VIT_G = {"hidden_size": 1408, "num_attention_heads": 16, "intermediate_size": 6144}
BERT_BASE = {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072}
TINY = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}


def vision_tower(settings: Settings) -> tuple[torch.nn.Module, Callable[[torch.nn.Module, torch.dtype], object], dict]:
    """The vision tower, a function running it on fixed random images in a dtype, and its shape."""
    shape = TINY if settings.tiny else VIT_G
    config = MiCoVisionConfig(
        **shape, num_hidden_layers=settings.vision_layers, image_size=settings.image_size, patch_size=14
    )
    torch.manual_seed(0)
    model = MiCoVisionModel(config).eval()
    images = torch.randn(settings.vision_batch, 3, settings.image_size, settings.image_size)

    def forward(tower: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
        return tower(images.to(dtype)).last_hidden_state

    tokens = (settings.image_size // 14) ** 2 + 1
    cost = encoder_cost(
        shape["hidden_size"], shape["intermediate_size"], settings.vision_layers, tokens, settings.vision_batch
    )
    return (
        model,
        forward,
        {
            "tower": "vision",
            "shape": shape,
            "layers": settings.vision_layers,
            "cost": cost,
            "batch": settings.vision_batch,
            "tokens": tokens,
        },
    )


def text_tower(settings: Settings) -> tuple[torch.nn.Module, Callable[[torch.nn.Module, torch.dtype], object], dict]:
    """The text tower with cross-attention to a random context (matching), its runner and shape."""
    shape = TINY if settings.tiny else BERT_BASE
    config = MiCoTextConfig(
        **shape,
        num_hidden_layers=settings.text_layers,
        encoder_hidden_size=shape["hidden_size"],
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = MiCoTextModel(config).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (settings.text_batch, settings.text_tokens), generator=generator)
    mask = torch.ones_like(ids)
    context = torch.randn(settings.text_batch, settings.context_length, shape["hidden_size"], generator=generator)

    def forward(tower: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
        return tower(input_ids=ids, attention_mask=mask, encoder_hidden_states=context.to(dtype)).last_hidden_state

    cost = encoder_cost(
        shape["hidden_size"],
        shape["intermediate_size"],
        settings.text_layers,
        settings.text_tokens,
        settings.text_batch,
        settings.context_length,
    )
    return (
        model,
        forward,
        {
            "tower": "text + cross-attention",
            "shape": shape,
            "layers": settings.text_layers,
            "cost": cost,
            "batch": settings.text_batch,
            "tokens": settings.text_tokens,
        },
    )


def variant_runners(
    model: torch.nn.Module, forward: Callable, variants: tuple[str, ...]
) -> tuple[dict[str, Callable[[], torch.Tensor]], dict]:
    """One no-argument runner per variant in `variants`, and the compile time (seconds of the first call) of the
    compiled ones."""
    half = copy.deepcopy(model).to(torch.bfloat16)

    def autocast() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(model, torch.float32)

    builders = {
        "fp32": lambda: partial(forward, model, torch.float32),
        "bf16": lambda: partial(forward, half, torch.bfloat16),
        "autocast": lambda: autocast,
        "compile": lambda: partial(forward, torch.compile(model, fullgraph=True), torch.float32),
        "compile bf16": lambda: partial(forward, torch.compile(half, fullgraph=True), torch.bfloat16),
    }
    runners = {name: builders[name]() for name in variants}
    compile_s = {}
    for name in set(variants) & {"compile", "compile bf16"}:
        start = time.perf_counter()
        runners[name]()
        compile_s[name] = time.perf_counter() - start
    return runners, compile_s


def relative_l2(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((candidate.float() - reference).norm() / reference.norm())


def measure_tower(build: Callable, settings: Settings, machine: dict, variants: tuple[str, ...] = VARIANTS) -> dict:
    """Every variant of one tower: timing, speed-up over fp32, bound fraction, compile time and agreement."""
    if variants[0] != "fp32":
        raise ValueError(f"variants must start with the fp32 reference, got {variants}")
    model, forward, info = build(settings)
    runners, compile_s = variant_runners(model, forward, variants)
    with torch.no_grad():
        reference = runners["fp32"]()
        outputs = {name: runner() for name, runner in runners.items()}
        for runner in runners.values():  # warm-up round
            runner()
        rounds = []
        for _ in range(settings.repeats):
            times = {}
            for name, runner in runners.items():
                start = time.perf_counter()
                runner()
                times[name] = time.perf_counter() - start
            rounds.append(times)
    cost = info.pop("cost")
    label = f"{info['tower']} {info['shape']['hidden_size']}w x {info['layers']} layers, batch {info['batch']}"
    rows = []
    for name in variants:
        seconds = statistics.median(times[name] for times in rounds)
        dtype = "bf16" if name in BF16_VARIANTS else "fp32"
        rows.append(
            {
                "variant": name,
                "seconds": seconds,
                "items_per_s": info["batch"] / seconds,
                "speedup": statistics.median(times["fp32"] / times[name] for times in rounds),
                "compile_s": compile_s.get(name),
                "hidden_rel_l2": relative_l2(outputs[name], reference),
                "first_token_rel_l2": relative_l2(outputs[name][:, 0], reference[:, 0]),
                "roofline": roofline_row(f"{label}, {name}", seconds, cost, machine, dtype=dtype),
            }
        )
    return {**info, "label": label, "variants": rows}


def run(
    quick: bool = False, smoke: bool = False, machine: dict | None = None, variants: tuple[str, ...] = VARIANTS
) -> dict:
    """Both towers in `variants` (all by default, fp32 first); `machine` holds the roofline bounds (measured here
    when not given)."""
    mode = "smoke" if smoke else "quick" if quick else "full"
    settings = MODES[mode]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    bounds = machine or measure_machine(quick=mode != "full")
    towers = [measure_tower(build, settings, bounds, variants) for build in (vision_tower, text_tower)]
    return {
        "mode": mode,
        "settings": asdict(settings),
        "towers": towers,
        "bounds": bounds,
        "threads": torch.get_num_threads(),
        "machine": machine_info(),
    }


def to_markdown(results: dict) -> str:
    """One table per tower, then the roofline rows."""
    parts = []
    for tower in results["towers"]:
        rows = [
            [
                row["variant"],
                f"{row['seconds'] * 1e3:.1f}",
                f"{row['items_per_s']:.2f}",
                f"{row['speedup']:.2f}x",
                f"{row['roofline']['fraction_of_bound']:.2f}",
                "-" if row["compile_s"] is None else f"{row['compile_s']:.0f}",
                f"{row['hidden_rel_l2']:.1e}",
                f"{row['first_token_rel_l2']:.1e}",
            ]
            for row in tower["variants"]
        ]
        header = [
            "variant",
            "ms/forward",
            "items/s",
            "speed-up vs fp32",
            "fraction of bound",
            "compile s",
            "rel. L2 vs fp32 (all tokens)",
            "rel. L2 (first token)",
        ]
        parts += [f"{tower['label']} ({tower['tokens']} tokens per item):", markdown_table(header, rows)]
    roofline = [row["roofline"] for tower in results["towers"] for row in tower["variants"]]
    parts.append(markdown_table(ROOFLINE_HEADER, roofline_table_rows(roofline)))
    return "\n\n".join(parts)


if __name__ == "__main__":
    run_cli(
        __doc__,
        run,
        to_markdown,
        quick="fewer layers, a shorter context, 2 repeats",
        smoke="tiny shapes (seconds; for tests)",
        output=DEFAULT_OUTPUT,
    )
