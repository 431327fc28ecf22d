"""Shared fixtures: tiny MiCo configurations built from code (nothing is downloaded)."""

import os

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_config_kwargs(**overrides) -> dict:
    """Keyword arguments of a tiny `MiCoConfig` (56 px images, two layers per tower, 64 wide)."""
    kwargs = dict(
        vision_config=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=56,
            patch_size=14,
        ),
        text_config=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=1000,
            max_position_embeddings=64,
        ),
        projection_dim=32,
        knowledge_modalities={"vision": 4, "audio": 3, "depth": 2},
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def tiny_config():
    from modeling_mico import MiCoConfig

    return MiCoConfig(**tiny_config_kwargs())
