"""Annotation data sets and the pretraining data collator: path resolution, missing modalities, broken media."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from modeling_mico import MiCoConfig, MiCoProcessor
from modeling_mico.annotations import load_annotation_dataset
from modeling_mico.data import BrokenMediaError, MiCoDataCollator, default_columns


@pytest.fixture(scope="module")
def processor():
    return MiCoProcessor.from_config(MiCoConfig.from_preset("tiny"))


@pytest.fixture()
def annotations(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    for index in range(3):
        Image.fromarray(np.full((40, 48, 3), 60 * index, dtype=np.uint8)).save(media / f"img{index}.png")
        sf.write(media / f"snd{index}.wav", np.sin(np.arange(16000) * 0.01 * (index + 1)).astype(np.float32), 16000)
    (media / "broken.png").write_bytes(b"not a png")
    rows = [
        {"captions": ["a dark square", "something dark"], "image": "media/img0.png", "audio": "media/snd0.wav"},
        {"caption": "a grey square", "image": "media/img1.png", "audio": "media/snd1.wav", "subtitle": "hello"},
        {"caption": "a light square", "image": "media/img2.png"},
        {"caption": "a broken image", "image": "media/broken.png", "audio": "media/snd2.wav"},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_paths_are_resolved_against_the_annotation_file(annotations):
    dataset = load_annotation_dataset(annotations)
    assert dataset[0]["image"] == str(annotations.parent / "media" / "img0.png")
    assert dataset[2]["audio"] is None
    streamed = list(load_annotation_dataset(annotations, streaming=True))
    assert streamed[1]["audio"] == str(annotations.parent / "media" / "snd1.wav")


def test_collator_batches_complete_rows(annotations, processor):
    dataset = load_annotation_dataset(annotations)
    collator = MiCoDataCollator(processor, modalities=["image", "audio"])
    batch = collator([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert batch["input_features"].shape == (2, 3, 64, 64)
    assert batch["input_ids"].shape == (2, 40)
    first = processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert first in ("a dark square", "something dark")


def test_row_missing_a_modality_drops_it_from_the_batch(annotations, processor):
    dataset = load_annotation_dataset(annotations)
    collator = MiCoDataCollator(processor, modalities=["image", "audio", "subtitle"])
    batch = collator([dataset[1], dataset[2]])
    assert "input_features" not in batch and "subtitle_input_ids" not in batch
    assert batch["pixel_values"].shape[0] == 2
    batch = collator([dataset[1]])
    assert batch["subtitle_input_ids"].shape == (1, 70)


def test_broken_media_fails_naming_the_file(annotations, processor):
    dataset = load_annotation_dataset(annotations)
    collator = MiCoDataCollator(processor, modalities=["image"])
    with pytest.raises(BrokenMediaError, match="broken.png"):
        collator([dataset[0], dataset[3]])


def test_broken_media_skipped_and_counted(annotations, processor):
    dataset = load_annotation_dataset(annotations)
    collator = MiCoDataCollator(processor, modalities=["image"], skip_broken=True)
    batch = collator([dataset[0], dataset[3], dataset[2]])
    assert batch["pixel_values"].shape[0] == batch["input_ids"].shape[0] == 2
    assert collator.num_skipped == 1


def test_skip_count_is_shared_with_dataloader_workers(annotations, processor):
    dataset = load_annotation_dataset(annotations)
    collator = MiCoDataCollator(processor, modalities=["image"], skip_broken=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=collator)
    assert sum(batch["input_ids"].shape[0] for batch in loader) == 3
    assert collator.num_skipped == 1


def test_default_columns_take_one_modality_per_encoder():
    assert default_columns() == ["video", "audio", "depth", "normal", "subtitle"]
    assert default_columns(MiCoConfig()) == ["video", "audio", "depth", "subtitle"]


def test_collator_refuses_unknown_columns_and_two_columns_of_one_encoder():
    config = MiCoConfig()  # the release: no normal maps
    processor = object()  # the columns are checked before any media is decoded
    with pytest.raises(ValueError, match=r"unknown modalities \['normal'\]; choose among \['image', 'video', 'audio'"):
        MiCoDataCollator(processor, modalities=["video", "normal"], config=config)
    with pytest.raises(ValueError, match="`image` and `video` both feed the vision encoder: load one of them"):
        MiCoDataCollator(processor, modalities=["image", "video"], config=config)
