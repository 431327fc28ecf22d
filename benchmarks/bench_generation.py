"""Caption generation speed: the original scheme (recompute the whole prefix every step) vs the key/value cache.

A BERT-base-size text decoder (12 layers, 768 wide, random weights) cross-attends to a context of 4 frames x 257
tokens from a small vision tower; every caption has exactly 40 new tokens (`[SEP]` is suppressed). Greedy and 3-beam
search are timed alternately (recompute, cached, recompute, ...) in one process; prints a Markdown table and writes
JSON.

    python benchmarks/bench_generation.py [--quick] [--output benchmarks/results/generation.json]
"""

from __future__ import annotations

import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import machine_info, markdown_table, paired_times, run_cli  # noqa: E402
from modeling_mico import MiCoConfig, MiCoForConditionalGeneration  # noqa: E402


DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "generation.json"
NEW_TOKENS = 40
NUM_FRAMES = 4


def build_model() -> MiCoForConditionalGeneration:
    """BERT-base text decoder with cross-attention, a 1-layer 224 px vision tower (257 tokens per frame)."""
    torch.manual_seed(0)
    config = MiCoConfig(
        vision_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128),
        text_config=dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        knowledge_modalities={"vision": NUM_FRAMES, "audio": 3, "depth": 2},
    )
    return MiCoForConditionalGeneration(config).eval()


def run(quick: bool = False) -> dict:
    """Time recompute vs cached decoding; returns `{"rows": [...], "settings": {...}, "machine": {...}}`."""
    batch_size, repeats = (1, 1) if quick else (2, 3)
    model = build_model()
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
    return {
        "rows": rows,
        "settings": {
            "text": "BERT-base size (12 layers, 768 wide, 30522 tokens), random weights, float32",
            "context_tokens": NUM_FRAMES * 257,
            "new_tokens": NEW_TOKENS,
            "threads": torch.get_num_threads(),
        },
        "machine": machine_info(),
    }


def to_markdown(results: dict) -> str:
    """Results as a Markdown table."""
    rows = [
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
    return markdown_table(header, rows)


def main() -> None:
    """Command-line entry point."""
    run_cli(__doc__, run, to_markdown, quick="one caption, one timed repeat", output=DEFAULT_OUTPUT)


if __name__ == "__main__":
    main()
