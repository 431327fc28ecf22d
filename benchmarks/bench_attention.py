"""Eager vs SDPA attention in MiCo's two towers (CPU, float32, random weights).

* Vision tower at ViT-B, ViT-L and ViT-g widths (224 px, patch 14, so 257 tokens): images/s and peak tensor memory
  of a forward pass with a few blocks of the real per-block shape (the eager/SDPA ratio does not depend on depth).
* Text tower (BERT-base width) over a padded 40-token caption batch with cross-attention to a 2,056-token context
  (8 frames x 257 tokens), as in matching.
* Investigation at ViT-g width: the attention core alone (eager softmax(QK^T)V vs `scaled_dot_product_attention` on
  the strided q/k/v views that the fused `qkv` split produces, and on contiguous copies of them) and the share of the
  forward pass that the attention core takes, which bounds the model-level ratio.

    python benchmarks/bench_attention.py [--quick | --smoke]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from benchmarks.common import markdown_table, paired_times, peak_tensor_memory, run_cli  # noqa: E402
from modeling_mico.configuration_mico import MiCoTextConfig, MiCoVisionConfig  # noqa: E402
from modeling_mico.modeling_mico import MiCoTextModel, MiCoVisionModel  # noqa: E402
from modeling_mico.modeling_mico_text import eager_attention_forward  # noqa: E402


# Per-block shapes of the EVA/ViT towers (patch 14 everywhere, so every width sees 257 tokens at 224 px).
VISION_WIDTHS = {
    "ViT-B": {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},
    "ViT-L": {"hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096},
    "ViT-g": {"hidden_size": 1408, "num_attention_heads": 16, "intermediate_size": 6144},
}
TINY_WIDTHS = {"tiny": {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}}
CONTEXT_FRAMES, TOKENS_PER_FRAME = 8, 257


@dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark mode."""

    vision_layers: int
    vision_batch: int
    image_size: int
    text_layers: int
    text_batch: int
    text_tokens: int
    context_length: int
    repeats: int
    core_repeats: int
    tiny: bool = False


MODES = {
    "full": Settings(2, 4, 224, 4, 8, 40, CONTEXT_FRAMES * TOKENS_PER_FRAME, 7, 15),
    "quick": Settings(1, 4, 224, 2, 8, 40, CONTEXT_FRAMES * TOKENS_PER_FRAME, 3, 5),
    "smoke": Settings(1, 1, 56, 1, 2, 8, 2 * 17, 1, 1, tiny=True),
}


def _alternate(model: torch.nn.Module, inputs: dict, repeats: int) -> dict:
    """Paired eager/SDPA timings of `model(**inputs)`; the speedup is eager time / SDPA time."""

    def forward_with(implementation: str):
        def forward() -> None:
            model.set_attn_implementation(implementation)
            with torch.inference_mode():
                model(**inputs)

        return forward

    timing = paired_times(forward_with("eager"), forward_with("sdpa"), repeats)
    memory = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        with torch.inference_mode():
            memory[implementation] = peak_tensor_memory(lambda: model(**inputs))
    return {
        "eager_s": timing["baseline_s"],
        "sdpa_s": timing["candidate_s"],
        "speedup": timing["speedup"],
        "repeats": repeats,
        "eager_peak_mb": memory["eager"] / 2**20,
        "sdpa_peak_mb": memory["sdpa"] / 2**20,
    }


def vision_config(shape: dict, settings: Settings) -> MiCoVisionConfig:
    """A vision tower with the given per-block shape and `settings.vision_layers` blocks."""
    return MiCoVisionConfig(
        **shape, num_hidden_layers=settings.vision_layers, image_size=settings.image_size, patch_size=14
    )


def bench_vision(name: str, shape: dict, settings: Settings) -> dict:
    """Eager vs SDPA forward of the vision tower at one width."""
    torch.manual_seed(0)
    model = MiCoVisionModel._from_config(vision_config(shape, settings), attn_implementation="eager").eval()
    pixels = torch.randn(settings.vision_batch, 3, settings.image_size, settings.image_size)
    row = _alternate(model, {"pixel_values": pixels}, settings.repeats)
    row.update(
        tower=f"vision {name}",
        shape=f"{shape['hidden_size']}w/{shape['num_attention_heads']}h/{shape['intermediate_size']}mlp",
        layers=settings.vision_layers,
        batch=settings.vision_batch,
        tokens=(settings.image_size // 14) ** 2 + 1,
        eager_items_per_s=settings.vision_batch / row["eager_s"],
        sdpa_items_per_s=settings.vision_batch / row["sdpa_s"],
    )
    return row


def bench_text(settings: Settings) -> dict:
    """Eager vs SDPA forward of the BERT text tower with cross-attention over the multimodal context."""
    torch.manual_seed(0)
    overrides = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "encoder_hidden_size": 64}
    config = MiCoTextConfig(num_hidden_layers=settings.text_layers, **(overrides if settings.tiny else {}))
    model = MiCoTextModel._from_config(config, attn_implementation="eager").eval()
    batch, tokens = settings.text_batch, settings.text_tokens
    lengths = torch.linspace(tokens // 3, tokens, batch).long()  # padded captions, as from the processor
    inputs = {
        "input_ids": torch.randint(1000, config.vocab_size, (batch, tokens)),
        "attention_mask": (torch.arange(tokens)[None] < lengths[:, None]).long(),
        "encoder_hidden_states": torch.randn(batch, settings.context_length, config.encoder_hidden_size),
    }
    row = _alternate(model, inputs, settings.repeats)
    row.update(
        tower="text + cross-attention",
        shape=f"{config.hidden_size}w/{config.num_attention_heads}h/{config.intermediate_size}ffn",
        layers=settings.text_layers,
        batch=batch,
        tokens=f"{tokens} (context {settings.context_length})",
        eager_items_per_s=batch / row["eager_s"],
        sdpa_items_per_s=batch / row["sdpa_s"],
    )
    return row


def _strided_qkv(shape: dict, settings: Settings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as MiCoVisionAttention produces them: strided views of one fused (batch, seq, 3, heads, dim) tensor."""
    heads = shape["num_attention_heads"]
    tokens = (settings.image_size // 14) ** 2 + 1
    qkv = torch.randn(settings.vision_batch, tokens, 3, heads, shape["hidden_size"] // heads)
    return qkv.permute(2, 0, 3, 1, 4)


def bench_attention_core(shape: dict, settings: Settings, model_eager_s: float) -> dict:
    """The attention core alone at one width, and its share of the whole forward pass."""
    module = torch.nn.Module()
    module.is_causal = False
    query, key, value = _strided_qkv(shape, settings)
    scaling = query.shape[-1] ** -0.5

    def eager() -> None:
        eager_attention_forward(module, query, key, value, None, scaling=scaling)

    def sdpa() -> None:
        sdpa_attention_forward(module, query, key, value, None, scaling=scaling)

    def sdpa_contiguous() -> None:
        sdpa_attention_forward(module, query.contiguous(), key.contiguous(), value.contiguous(), None, scaling=scaling)

    with torch.inference_mode():
        versus_eager = paired_times(eager, sdpa, settings.core_repeats)
        versus_contiguous = paired_times(sdpa_contiguous, sdpa, settings.core_repeats)
    share = settings.vision_layers * versus_eager["baseline_s"] / model_eager_s
    return {
        "q_shape": list(query.shape),
        "q_is_contiguous": query.is_contiguous(),
        "eager_core_ms": versus_eager["baseline_s"] * 1e3,
        "sdpa_core_ms": versus_eager["candidate_s"] * 1e3,
        "core_speedup": versus_eager["speedup"],
        "sdpa_contiguous_copy_ms": versus_contiguous["baseline_s"] * 1e3,
        "sdpa_strided_ms": versus_contiguous["candidate_s"] * 1e3,
        "strided_vs_contiguous_speedup": versus_contiguous["speedup"],
        "eager_core_share_of_forward": share,
        "model_speedup_bound": 1 / (1 - share + share / versus_eager["speedup"]),
    }


def run(quick: bool = False, smoke: bool = False) -> dict:
    """Run every case; returns `{"rows": [...], "core": {...}, "settings": {...}}`."""
    mode = "smoke" if smoke else "quick" if quick else "full"
    settings = MODES[mode]
    widths = TINY_WIDTHS if settings.tiny else VISION_WIDTHS
    rows = [bench_vision(name, shape, settings) for name, shape in widths.items()]
    rows.append(bench_text(settings))
    largest = list(widths)[-1]
    core = bench_attention_core(widths[largest], settings, rows[len(widths) - 1]["eager_s"])
    core["width"] = largest
    return {
        "rows": rows,
        "core": core,
        "settings": {"mode": mode, **settings.__dict__, "torch_threads": torch.get_num_threads()},
    }


def vision_g_speedup(results: dict) -> float | None:
    """The eager/SDPA ratio at ViT-g width (the goal's measurement), `None` when that width was not run."""
    return next((row["speedup"] for row in results["rows"] if row["tower"] == "vision ViT-g"), None)


def to_markdown(results: dict) -> str:
    """Results as Markdown tables."""
    rows = [
        [
            row["tower"],
            row["shape"],
            row["layers"],
            row["batch"],
            row["tokens"],
            f"{row['eager_items_per_s']:.2f}",
            f"{row['sdpa_items_per_s']:.2f}",
            f"{row['speedup']:.2f}x",
            f"{row['eager_peak_mb']:.0f}",
            f"{row['sdpa_peak_mb']:.0f}",
        ]
        for row in results["rows"]
    ]
    header = ["tower", "shape", "layers", "batch", "tokens", "eager items/s", "SDPA items/s", "SDPA speedup"]
    header += ["eager peak MiB", "SDPA peak MiB"]
    core = results["core"]
    core_rows = [
        ["q/k/v shape (batch, heads, tokens, dim)", "x".join(map(str, core["q_shape"]))],
        ["q/k/v contiguous", str(core["q_is_contiguous"])],
        ["eager core (QK^T, softmax, PV) ms", f"{core['eager_core_ms']:.1f}"],
        ["SDPA core ms (strided q/k/v)", f"{core['sdpa_core_ms']:.1f}"],
        ["SDPA core speedup", f"{core['core_speedup']:.2f}x"],
        ["SDPA with .contiguous() copies first ms", f"{core['sdpa_contiguous_copy_ms']:.1f}"],
        ["SDPA on the strided views, same pairs ms", f"{core['sdpa_strided_ms']:.1f}"],
        ["strided vs contiguous-copy speedup", f"{core['strided_vs_contiguous_speedup']:.2f}x"],
        ["eager core share of the forward pass", f"{core['eager_core_share_of_forward']:.1%}"],
        ["model-level speedup bound (Amdahl)", f"{core['model_speedup_bound']:.2f}x"],
    ]
    settings = results["settings"]
    note = (
        f"Random weights, float32, {settings['torch_threads']} torch threads, median of {settings['repeats']} "
        "alternated eager/SDPA pairs. Every vision width uses patch 14 at 224 px (257 tokens; ViT-B normally uses "
        f"patch 16) and {settings['vision_layers']} blocks of the real shape (of 12/24/40); the text tower runs "
        f"{settings['text_layers']} of its 12 layers on padded captions. Peak memory: tensor memory allocated "
        "during the forward pass (torch profiler), weights excluded."
    )
    return "\n\n".join(
        [
            note,
            markdown_table(header, rows, "lllrrrrrrr"),
            f"Attention core alone at {core['width']} width:",
            markdown_table(["measurement", "value"], core_rows),
        ]
    )


def main() -> None:
    """Command-line entry point: prints the tables and the JSON."""
    run_cli(
        __doc__,
        run,
        to_markdown,
        quick="one block per tower, fewer repeats",
        smoke="tiny shapes, one repeat (seconds)",
    )


if __name__ == "__main__":
    main()
