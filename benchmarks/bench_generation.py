"""Caption generation speed: the key/value cache against the original scheme (recompute the whole prefix every
step), and the decoding step against the machine's roofline in several decoding variants.

A BERT-base-size text decoder (12 layers, 768 wide, vocab 30,522, random weights, float32) cross-attends to a context
of 4 frames x 257 tokens. Measurements, each rotating its variants in one process:

* whole captions of exactly 40 new tokens (`[SEP]` suppressed), recompute vs cached, greedy and 3 beams;
* the time of one decoding step (median step of a caption, the first step, which projects the context, excluded) at
  batch 1, 3 and 4, greedy and 3 beams, in the variants of `DECODING_VARIANTS`: *generic* (Transformers' path: the
  context copied per beam, the whole `DynamicCache`, context keys/values included, reordered between beams),
  *shared context* (one context per item), *unpacked* (also a preallocated self-attention cache and fused
  projections), *oneDNN* (also weights prepacked for oneDNN at 4+ rows), *layer kernels* (every product by weights
  packed for the few-row kernel, cross-attention by the few-query kernel, layer by layer in Python) and *package*
  (the default: the same kernels, every step after the first through all layers in one C++ call), with the step's
  FLOP and byte bounds (`benchmarks/roofline.py`);
* the same step in bfloat16 (weights and activations) with its agreement with float32, and bfloat16 against float32
  on the parity fixture (features and caption tokens).

    python benchmarks/bench_generation.py [--quick] [--output benchmarks/results/generation.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers.generation import GenerationMixin, StoppingCriteria, StoppingCriteriaList  # noqa: E402

import modeling_mico.modeling_mico  # noqa: E402
from benchmarks.common import machine_info, markdown_table, paired_times, write_json  # noqa: E402
from benchmarks.roofline import (  # noqa: E402
    ROOFLINE_HEADER,
    decoding_step_cost,
    machine_line,
    measure_machine,
    roofline_row,
    roofline_table_rows,
)
from modeling_mico import MiCoConfig, MiCoForConditionalGeneration, decoding_kernels, modeling_mico_text  # noqa: E402
from modeling_mico.modeling_mico_text import fused_projections  # noqa: E402


DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "generation.json"
NEW_TOKENS = 40
STEP_TOKENS = 16
NUM_FRAMES = 4
STEP_CASES = ((1, 1), (3, 1), (1, 3), (4, 1), (4, 3))  # (items, beams)
BF16_CASES = ((1, 1), (4, 1), (1, 3))


def build_model() -> MiCoForConditionalGeneration:
    """BERT-base text decoder with cross-attention, a 1-layer 224 px vision tower (257 tokens per frame)."""
    torch.manual_seed(0)
    config = MiCoConfig(
        vision_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128),
        text_config=dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        knowledge_modalities={"vision": NUM_FRAMES, "audio": 3, "depth": 2},
    )
    return MiCoForConditionalGeneration(config).eval()


DECODING_VARIANTS = {
    # name: (one context per item, preallocated self-attention cache, fused projections, packed weights, kernels,
    # fused decoding step)
    "generic": (False, False, False, False, False, False),
    "shared context": (True, False, False, False, False, False),
    "unpacked": (True, True, True, False, False, False),
    "oneDNN": (True, True, True, True, False, False),
    "layer kernels": (True, True, True, True, True, False),
    "package": (True, True, True, True, True, True),
}
BIT_IDENTICAL_VARIANTS = ("generic", "shared context", "unpacked")


@contextlib.contextmanager
def decoding_variant(name: str) -> Iterator[None]:
    """Decode as the variant `name` of `DECODING_VARIANTS` (the package's default is `"package"`):

    * without one context per item, Transformers' generic path: the context copied for every beam / returned
      sequence and the whole cache, the context's keys/values included, reordered between beams;
    * without the preallocated cache, Transformers' `DynamicCache` (grown by concatenation every step);
    * without fused projections, one matrix product each for query, key and value;
    * without packed weights, `F.linear` for every product (the package multiplies by weights packed for the few-row
      kernel, or without it, at 4 rows or more, for oneDNN: results differ in the last bits, `fused_projections`);
    * without the kernel, `MICO_DECODING_KERNELS=0` (`modeling_mico.decoding_kernels`);
    * without the fused step, every step through the layer modules (`MiCoTextModel.fused_decoding_step` unset)."""
    share_context, preallocate, fuse, prepack, kernel, fused_step = DECODING_VARIANTS[name]

    def reorder_everything(cache, beam_idx):
        cache.reorder_cache(beam_idx)
        return cache

    cls = MiCoForConditionalGeneration
    overrides = {}
    if not share_context:
        overrides["_expand_inputs_for_generation"] = GenerationMixin._expand_inputs_for_generation
        overrides["_reorder_cache"] = staticmethod(reorder_everything)
    if not preallocate:
        overrides["_prepare_cache_for_generation"] = GenerationMixin._prepare_cache_for_generation
    saved = {attribute: cls.__dict__.get(attribute) for attribute in overrides}
    saved_fusion = modeling_mico.modeling_mico.fused_projections
    saved_step = modeling_mico_text._fused_decoding_step
    if not fused_step:
        modeling_mico_text._fused_decoding_step = lambda model: None
    saved_switch = os.environ.get(decoding_kernels.SWITCH)
    if not kernel:
        os.environ[decoding_kernels.SWITCH] = "0"
    for attribute, value in overrides.items():
        setattr(cls, attribute, value)
    if not fuse:
        modeling_mico.modeling_mico.fused_projections = lambda *modules, prepack=False, keep=False: (
            contextlib.nullcontext()
        )
    elif not prepack:
        modeling_mico.modeling_mico.fused_projections = lambda *modules, prepack=False, keep=False: fused_projections(
            *modules, keep=keep
        )
    try:
        yield
    finally:
        for attribute, value in saved.items():
            if value is None:
                delattr(cls, attribute)
            else:
                setattr(cls, attribute, value)
        modeling_mico.modeling_mico.fused_projections = saved_fusion
        modeling_mico_text._fused_decoding_step = saved_step
        if saved_switch is None:
            os.environ.pop(decoding_kernels.SWITCH, None)
        else:
            os.environ[decoding_kernels.SWITCH] = saved_switch


def generic_decoding() -> contextlib.AbstractContextManager:
    """Transformers' generic decoding path (see `decoding_variant`), the reference of the package's tokens."""
    return decoding_variant("generic")


class StepClock(StoppingCriteria):
    """Records the time at the end of every decoding step; never stops decoding."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def step_s(self) -> float:
        """Median seconds of a step after the first."""
        return statistics.median(later - earlier for earlier, later in zip(self.times[1:], self.times[2:]))


def step_seconds(model, context: torch.Tensor, num_beams: int, variant: str = "package") -> float:
    """Median decoding step of a `STEP_TOKENS`-token caption of every item of `context`, decoded as `variant`. The
    captions have no end token (`eos_token_id=None`) so that every step decodes every row, without the logits
    processor of `min_new_tokens` (a scan of the vocabulary per step, which default captioning does not run)."""
    clock = StepClock()
    with decoding_variant(variant):
        model.generate(
            context=context,
            num_beams=num_beams,
            max_new_tokens=STEP_TOKENS,
            eos_token_id=None,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
    return clock.step_s()


def rotate(timers: dict[str, Callable[[], float]], repeats: int, reference: str) -> dict[str, dict[str, float]]:
    """Run the `timers` in turn `repeats` times (after one untimed round); per timer the median seconds and the median
    over rounds of `reference`'s time divided by the timer's (its speed-up over `reference`)."""
    for timer in timers.values():
        timer()
    rounds = [{name: timer() for name, timer in timers.items()} for _ in range(repeats)]
    return {
        name: {
            "seconds": statistics.median(times[name] for times in rounds),
            "speedup": statistics.median(times[reference] / times[name] for times in rounds),
        }
        for name in timers
    }


def step_case(model, items: int, beams: int, value_bytes: int = 4) -> tuple[torch.Tensor, object, str]:
    """A random context of `items` items, the cost of one of its decoding steps and the step's label."""
    text = model.config.text_config
    context = torch.randn(items, NUM_FRAMES * 257, text.hidden_size, generator=torch.Generator().manual_seed(items))
    cost = decoding_step_cost(
        text.hidden_size,
        text.intermediate_size,
        text.num_hidden_layers,
        text.vocab_size,
        context.shape[1],
        items=items,
        rows=items * beams,
        cached_tokens=STEP_TOKENS // 2,
        value_bytes=value_bytes,
    )
    return context, cost, f"decoding step, batch {items}, " + ("greedy" if beams == 1 else f"{beams} beams")


def read_seconds(buffer: torch.Tensor) -> float:
    """Seconds to read `buffer` once (a sum)."""
    start = time.perf_counter()
    buffer.sum()
    return time.perf_counter() - start


def side_by_side_bandwidth(machine: dict, timers: dict[str, Callable[[], float]], step_bytes: float) -> dict:
    """`machine` with its memory read bandwidth measured again beside the timers: the host's bandwidth varies from
    minute to minute (26 to 67 GB/s measured on the same shared cloud VM), so the read of a buffer of the step's size
    joins the rotation of `timers` (added to them as `"read probe"`) and its median gives the step's byte bound."""
    buffer = torch.ones(int(step_bytes) // 4)
    timers["read probe"] = partial(read_seconds, buffer)
    return {**machine, "read_probe_bytes": buffer.numel() * 4}


def bound_machine(machine: dict, timings: dict) -> dict:
    """`machine` with the read bandwidth of the side-by-side probe (`side_by_side_bandwidth`)."""
    return {**machine, "read_gb_s": machine["read_probe_bytes"] / timings["read probe"]["seconds"] / 1e9}


def step_rows(model, machine: dict, repeats: int) -> list[dict]:
    """ms per step of every (items, beams) case in every decoding variant (rotated), with the package's roofline."""
    rows = []
    for items, beams in STEP_CASES:
        context, cost, label = step_case(model, items, beams)
        timers = {variant: partial(step_seconds, model, context, beams, variant) for variant in DECODING_VARIANTS}
        probed = side_by_side_bandwidth(machine, timers, cost.bytes)
        timings = rotate(timers, repeats, reference="generic")
        package = timings["package"]["seconds"]
        logits = {}
        for variant in ("package", "unpacked"):
            with decoding_variant(variant):
                logits[variant] = model.generate(
                    context=context,
                    num_beams=beams,
                    max_new_tokens=STEP_TOKENS,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
        reference, packed = logits["unpacked"], logits["package"]
        rows.append(
            {
                "items": items,
                "num_beams": beams,
                **{f"{variant}_ms": timing["seconds"] * 1e3 for variant, timing in timings.items()},
                "speedup": timings["package"]["speedup"],
                "speedup_over_shared_context": timings["shared context"]["seconds"] / package,
                "prepacked_speedup": timings["unpacked"]["seconds"] / package,
                "kernel_speedup": timings["oneDNN"]["seconds"] / package,
                "fused_step_speedup": timings["layer kernels"]["seconds"] / package,
                "prepacked_same_tokens": torch.equal(reference.sequences, packed.sequences),
                "prepacked_max_logit_difference": max(
                    float((a - b).abs().max()) for a, b in zip(reference.logits, packed.logits)
                ),
                "roofline": roofline_row(label, package, cost, bound_machine(probed, timings)),
            }
        )
    return rows


def beams_vs_rows(steps: list[dict]) -> float | None:
    """A 3-beam step of one item over a greedy step of 3 items (package), `None` without both cases."""
    times = {(row["items"], row["num_beams"]): row["package_ms"] for row in steps}
    if (1, 3) not in times or (3, 1) not in times:
        return None
    return times[(1, 3)] / times[(3, 1)]


def bf16_rows(model, machine: dict, repeats: int) -> list[dict]:
    """fp32 vs bf16 ms per step (weights and activations in bf16), the bf16 roofline and token agreement."""
    half = copy.deepcopy(model).to(torch.bfloat16)
    rows = []
    for items, beams in BF16_CASES:
        context, cost, label = step_case(model, items, beams, value_bytes=2)
        timers = {
            "fp32": partial(step_seconds, model, context, beams),
            "bf16": partial(step_seconds, half, context, beams),
        }
        probed = side_by_side_bandwidth(machine, timers, cost.bytes)
        timings = rotate(timers, repeats, reference="fp32")
        fp32, bf16 = timings["fp32"]["seconds"], timings["bf16"]["seconds"]
        speedup = timings["bf16"]["speedup"]
        settings = dict(num_beams=beams, max_new_tokens=STEP_TOKENS)
        tokens = model.generate(context=context, **settings), half.generate(context=context, **settings)
        rows.append(
            {
                "items": items,
                "num_beams": beams,
                "fp32_ms": fp32 * 1e3,
                "bf16_ms": bf16 * 1e3,
                "speedup": speedup,
                "same_tokens": float((tokens[0] == tokens[1]).float().mean()),
                "roofline": roofline_row(label, bf16, cost, bound_machine(probed, timings), dtype="bf16"),
            }
        )
    return rows


PARITY = ROOT / "tests" / "fixtures" / "parity"
PARITY_INPUTS = {"video": "pixel_values_videos", "audio": "input_features"}


def bf16_agreement() -> dict:
    """bf16 against fp32 on the parity fixture (the converted release-layout checkpoint and its inputs): relative
    L2 distance of the video and audio features (`pooler_output` and the multimodal context) and the share of caption
    tokens, greedy and 3 beams, equal to fp32's (each precision decoding from its own context)."""
    import numpy as np

    reference = np.load(PARITY / "reference_outputs.npz")
    inputs = {
        "video": torch.from_numpy(reference["in_pixel_values_video"]),
        "audio": torch.from_numpy(reference["in_input_features_audio"]),
    }
    full = MiCoForConditionalGeneration.from_pretrained(PARITY / "hub").eval()
    half = copy.deepcopy(full).to(torch.bfloat16)
    result = {}
    with torch.no_grad():
        for name, values in inputs.items():
            features = [
                model.mico.get_modality_features(name, values.to(model.dtype)).pooler_output for model in (full, half)
            ]
            contexts = [
                model.mico.get_multimodal_context(**{PARITY_INPUTS[name]: values.to(model.dtype)})
                for model in (full, half)
            ]
            result[f"{name}_features_rel_l2"] = float((features[1].float() - features[0]).norm() / features[0].norm())
            result[f"{name}_context_rel_l2"] = float((contexts[1].float() - contexts[0]).norm() / contexts[0].norm())
            for beams in (1, 3):
                ids = [
                    model.generate(context=context, num_beams=beams, max_new_tokens=40)
                    for model, context in zip((full, half), contexts)
                ]
                result[f"{name}_beam{beams}_tokens_equal"] = int((ids[0] == ids[1]).sum())
                result[f"{name}_beam{beams}_tokens"] = ids[0].numel()
    return result


def caption_rows(model, quick: bool) -> list[dict]:
    """Whole captions: recompute the prefix every step (the original scheme) vs the key/value cache."""
    batch_size, repeats = (1, 1) if quick else (2, 3)
    videos = torch.randn(batch_size, NUM_FRAMES, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rows = []
    for num_beams in (1, 3):
        settings = dict(num_beams=num_beams, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)

        def generate(use_cache: bool, settings: dict = settings) -> torch.Tensor:
            ids = model.generate(pixel_values_videos=videos, use_cache=use_cache, **settings)
            if ids.shape[1] != 1 + NEW_TOKENS:
                raise RuntimeError(f"expected {NEW_TOKENS} new tokens, got {ids.shape[1] - 1}")
            return ids

        for use_cache in (False, True):  # warm-up on short captions
            model.generate(pixel_values_videos=videos, use_cache=use_cache, num_beams=num_beams, max_new_tokens=2)
        same_tokens = torch.equal(generate(False), generate(True))
        timing = paired_times(lambda: generate(False), lambda: generate(True), repeats=repeats, warmup=0)
        rows.append(
            {
                "num_beams": num_beams,
                "batch_size": batch_size,
                "recompute_s_per_caption": timing["baseline_s"] / batch_size,
                "cached_s_per_caption": timing["candidate_s"] / batch_size,
                "recompute_captions_per_s": batch_size / timing["baseline_s"],
                "cached_captions_per_s": batch_size / timing["candidate_s"],
                "speedup": timing["speedup"],
                "same_tokens": same_tokens,
                "repeats": repeats,
            }
        )
    return rows


def run(quick: bool = False, machine: dict | None = None) -> dict:
    """All measurements; `machine` holds the bounds of `roofline.measure_machine` (measured here when not given).
    Returns `{"rows", "steps", "bf16", "bounds", "settings", "machine"}`."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    bounds = machine or measure_machine(quick)
    model = build_model()
    repeats = 1 if quick else 3
    return {
        "steps": step_rows(model, bounds, repeats),
        "bf16": bf16_rows(model, bounds, repeats),
        "bf16_agreement": bf16_agreement(),
        "rows": caption_rows(model, quick),
        "bounds": bounds,
        "settings": {
            "text": "BERT-base size (12 layers, 768 wide, 30522 tokens), random weights, float32",
            "context_tokens": NUM_FRAMES * 257,
            "new_tokens": NEW_TOKENS,
            "step_tokens": STEP_TOKENS,
            "threads": torch.get_num_threads(),
        },
        "machine": machine_info(),
    }


def case_cells(row: dict, *milliseconds: float) -> list:
    """The batch and decoding cells of a step row, then `milliseconds` formatted."""
    decoding = "greedy" if row["num_beams"] == 1 else f"{row['num_beams']} beams"
    return [row["items"], decoding, *(f"{value:.1f}" for value in milliseconds)]


def agreement_line(agreement: dict) -> str:
    """bf16 against fp32 on the parity fixture, in one sentence."""
    parts = []
    for name in PARITY_INPUTS:
        tokens = ", ".join(
            f"{agreement[f'{name}_beam{beams}_tokens_equal']}/{agreement[f'{name}_beam{beams}_tokens']} caption tokens "
            f"equal ({'greedy' if beams == 1 else f'{beams} beams'})"
            for beams in (1, 3)
        )
        parts.append(
            f"{name}: features {agreement[f'{name}_features_rel_l2']:.1e} and context "
            f"{agreement[f'{name}_context_rel_l2']:.1e} relative L2 from fp32, {tokens}"
        )
    return "bfloat16 vs float32 on the parity fixture (release-layout checkpoint): " + "; ".join(parts) + "."


def to_markdown(results: dict) -> str:
    """Results as Markdown tables."""
    captions = [
        [
            "greedy" if row["num_beams"] == 1 else f"{row['num_beams']} beams",
            f"{row['recompute_s_per_caption']:.2f}",
            f"{row['cached_s_per_caption']:.2f}",
            f"{row['recompute_captions_per_s']:.3f}",
            f"{row['cached_captions_per_s']:.3f}",
            f"{row['speedup']:.1f}x",
            "yes" if row["same_tokens"] else "NO",
        ]
        for row in results["rows"]
    ]
    header = [
        "decoding",
        "recompute s/caption",
        "cached s/caption",
        "recompute captions/s",
        "cached captions/s",
        "speedup",
        "same tokens",
    ]
    parts = [markdown_table(header, captions)]
    if "steps" in results:
        steps = [
            case_cells(row, *(row[f"{variant}_ms"] for variant in DECODING_VARIANTS), row["roofline"]["bound_ms"])
            + [
                f"{row['speedup']:.2f}x",
                f"{row['speedup_over_shared_context']:.2f}x",
                f"{row['roofline']['fraction_of_bound']:.2f}",
                f"{row['prepacked_speedup']:.2f}x",
                f"{row['kernel_speedup']:.2f}x",
                f"{row['fused_step_speedup']:.2f}x",
                f"{'yes' if row['prepacked_same_tokens'] else 'NO'}, {row['prepacked_max_logit_difference']:.1e}",
            ]
            for row in results["steps"]
        ]
        ratio = beams_vs_rows(results["steps"])
        bf16 = [
            case_cells(row, row["fp32_ms"], row["bf16_ms"])
            + [f"{row['speedup']:.2f}x", f"{row['roofline']['fraction_of_bound']:.2f}", f"{row['same_tokens']:.0%}"]
            for row in results["bf16"]
        ]
        parts += [
            f"Decoding step ({results['settings']['step_tokens']}-token captions, median step; variants rotated in "
            "one process: *generic* = Transformers' path (context and its cross-attention keys/values copied per "
            "beam and reordered with the whole `DynamicCache`), *shared context* = one context per item, *unpacked* = "
            "also a preallocated self-attention cache and fused q/k/v and context k/v projections (bit-identical to "
            "generic with one caption; with beams, where SDPA's CPU kernel gives a query row the same bits whatever "
            "the rows beside it), *oneDNN* = also, when a step multiplies 4 rows or more (2+ captions or beams, with "
            "the [MASK] probe), every product by a weight prepacked for oneDNN (the default without the decoding "
            "kernels), *layer kernels* = every product of every step by a weight packed for the few-row kernel and "
            "cross-attention by the few-query kernel (`modeling_mico.decoding_kernels`; results differ in the last "
            "bits), layer by layer in Python, *package* = the default: the same kernels, and every step after the "
            "first through all layers in one C++ call (the fused decoding step; its self-attention is a kernel "
            "too). "
            + machine_line(results["bounds"])
            + (f" A 3-beam step of one item costs {ratio:.2f}x a greedy step of 3 items." if ratio else ""),
            markdown_table(
                [
                    "batch",
                    "decoding",
                    *(f"{variant} ms/step" for variant in DECODING_VARIANTS),
                    "bound ms",
                    "package vs generic",
                    "package vs shared context",
                    "package fraction of bound",
                    "package vs unpacked",
                    "package vs oneDNN",
                    "package vs layer kernels",
                    "package vs unpacked: same tokens, max logit difference",
                ],
                steps,
            ),
            "bfloat16 decoding step (`model.to(torch.bfloat16)`), alternated with float32; bound from the bf16 GEMM "
            "rate and 2-byte weights; tokens: share of equal generated ids on the same random context.",
            markdown_table(
                [
                    "batch",
                    "decoding",
                    "fp32 ms/step",
                    "bf16 ms/step",
                    "speed-up",
                    "bf16 fraction of bound",
                    "tokens = fp32",
                ],
                bf16,
            ),
            markdown_table(ROOFLINE_HEADER, roofline_table_rows([row["roofline"] for row in results["steps"]])),
            agreement_line(results["bf16_agreement"]),
        ]
    return "\n\n".join(parts)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one caption, one timed repeat")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="where to write the JSON results")
    args = parser.parse_args()
    results = run(quick=args.quick)
    print(to_markdown(results))
    write_json(Path(args.output), results)


if __name__ == "__main__":
    main()
