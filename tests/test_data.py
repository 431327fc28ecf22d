"""Annotation data sets and the pretraining data collator: path resolution, missing modalities, broken media."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from modeling_mico import MiCoConfig, MiCoProcessor
from modeling_mico.annotations import load_annotation_dataset
from modeling_mico.data import ROW_POSITION, BrokenMediaError, MiCoDataCollator, default_columns, index_rows


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


def _rows_with_many_captions(annotations) -> list[dict]:
    dataset = index_rows(load_annotation_dataset(annotations))
    return [dict(dataset[i], captions=[f"caption {i} number {k}" for k in range(16)]) for i in range(3)]


def _per_row(batch: dict) -> list[tuple[torch.Tensor, ...]]:
    return list(zip(batch["input_ids"], batch["input_features"], strict=True))


def test_seeded_draws_depend_on_the_row_position_and_epoch_only(annotations, processor):
    """With a seed, a row's caption and spectrogram slices come from (seed, epoch, position): the same in another
    batch, order, process or DataLoader worker whatever torch's global RNG did (what makes resuming exact), and new
    in the next epoch."""
    rows = _rows_with_many_captions(annotations)[:2]
    collator = MiCoDataCollator(processor, modalities=["audio"], seed=3)
    first = _per_row(collator(rows))
    torch.manual_seed(123)
    again = _per_row(collator(rows[::-1]))[::-1]
    for (ids, features), (ids_again, features_again) in zip(first, again):
        torch.testing.assert_close(ids_again, ids, rtol=0, atol=0)
        torch.testing.assert_close(features_again, features, rtol=0, atol=0)
    collator.set_epoch(1)  # read by DataLoader workers too
    loader = torch.utils.data.DataLoader(rows, batch_size=2, num_workers=1, collate_fn=collator)
    next_epoch = _per_row(next(iter(loader)))
    assert all(not torch.equal(ids, later) for (ids, _), (later, _) in zip(first, next_epoch))
    collator.set_epoch(0)
    torch.testing.assert_close(_per_row(collator(rows))[0][0], first[0][0], rtol=0, atol=0)
    unstamped = {key: value for key, value in rows[0].items() if key != ROW_POSITION}
    message = r"needs rows stamped with their position \(`__position__`\): wrap .* `modeling_mico.data.index_rows`"
    with pytest.raises(ValueError, match=message):
        collator([unstamped])


def test_index_rows_stamps_streamed_rows_with_process_worker_and_place(annotations, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    streamed = index_rows(load_annotation_dataset(annotations, streaming=True))
    assert [row[ROW_POSITION] for row in streamed] == ["1/0/0", "1/0/1", "1/0/2", "1/0/3"]
    assert [row[ROW_POSITION] for row in index_rows(load_annotation_dataset(annotations))] == ["0", "1", "2", "3"]


def test_the_trainer_stamps_rows_and_sets_the_epoch_of_a_seeded_collator(tmp_path, annotations, processor):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from modeling_mico import MiCoForPreTraining
    from modeling_mico.trainer_mico import CollatorEpochCallback, EvalCollatorTrainer

    collator = MiCoDataCollator(processor, modalities=["audio"], seed=3)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=False)
    model = MiCoForPreTraining(MiCoConfig.from_preset("tiny"))
    trainer = EvalCollatorTrainer(
        model=model, args=args, train_dataset=load_annotation_dataset(annotations), data_collator=collator
    )
    assert trainer.train_dataset[2][ROW_POSITION] == "2"
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, CollatorEpochCallback))
    for resumed_at, expected in ((0.0, [0, 1]), (0.75, [0, 1]), (2.0, [2, 3])):  # state.epoch: epoch + steps/epoch
        state, control = TrainerState(epoch=resumed_at), TrainerControl()
        callback.on_train_begin(args, state, control)
        for epoch in expected:
            callback.on_epoch_begin(args, state, control)
            assert collator._epoch.value == epoch
            callback.on_epoch_end(args, state, control)
    unseeded = EvalCollatorTrainer(model=model, args=args, train_dataset=load_annotation_dataset(annotations))
    assert ROW_POSITION not in unseeded.train_dataset[0]


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
