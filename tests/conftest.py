"""Shared fixtures: tiny MiCo configurations built from code (nothing is downloaded)."""

import os

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_config_kwargs(
    width: int = 64,
    layers: int = 2,
    heads: int = 4,
    vision: dict | None = None,
    text: dict | None = None,
    **overrides,
) -> dict:
    """Keyword arguments of a tiny `MiCoConfig`, the suite's one factory: both towers `width` wide (MLP 2 x width),
    `layers` deep with `heads` heads, 56 px images in 14 px patches, a 1000-word vocabulary, projections of
    width / 2; `vision` / `text` override fields of one tower, `overrides` top-level fields."""
    tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads)
    kwargs = dict(
        vision_config={**tower, "image_size": 56, "patch_size": 14, **(vision or {})},
        text_config={**tower, "vocab_size": 1000, "max_position_embeddings": 64, **(text or {})},
        projection_dim=width // 2,
        knowledge_modalities={"vision": 4, "audio": 3, "depth": 2},
    )
    kwargs.update(overrides)
    return kwargs


# A `thermal` modality (image-like, letter `h`) declared only through the configuration, with its tasks.
THERMAL = dict(
    knowledge_modalities={"vision": 8, "audio": 4, "thermal": 1},
    contrastive_tasks=["tv", "ta", "th"],
    matching_tasks=["tv", "th"],
    caption_tasks=["tv", "th"],
)


def thermal_config(**overrides):
    """The `tiny` preset with the `thermal` modality and its tasks (`THERMAL`), and `overrides`."""
    from modeling_mico import MiCoConfig

    return MiCoConfig.from_preset("tiny", **{**THERMAL, **overrides})


@pytest.fixture
def tiny_config():
    from modeling_mico import MiCoConfig

    return MiCoConfig(**tiny_config_kwargs())
