"""🤗 `datasets` folders as training and evaluation data: `save_to_disk` output and folders `load_dataset` reads, with
`Image` / `Audio` / `Video` columns, give the same batches and retrieval results as the annotation file."""

import importlib.util
import json
import shutil
from pathlib import Path

import av
import datasets
import numpy as np
import pytest
import soundfile
import torch

from modeling_mico import MiCoConfig, MiCoModel, MiCoProcessor
from modeling_mico.annotations import load_annotation_dataset, load_annotations
from modeling_mico.data import BrokenMediaError, MiCoDataCollator
from modeling_mico.synthetic_data import make_synthetic_dataset


REPO = Path(__file__).resolve().parents[1]
MP4 = REPO / "tests" / "fixtures" / "media" / "test.mp4"
FEATURES = {"image": datasets.Image, "video": datasets.Video, "audio": datasets.Audio, "depth": None}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root / "data", num_samples=10, num_test=6, image_size=64, num_video_frames=4)
    return root


@pytest.fixture(scope="module")
def saved(synthetic) -> Path:
    """The synthetic annotation files as a saved DatasetDict whose media columns are datasets features."""
    splits = {}
    for split in ("train", "test"):
        rows = load_annotations(synthetic / "data" / f"{split}.jsonl")
        columns = {key: [row[key] for row in rows] for key in ("id", "caption", "captions", *FEATURES)}
        dataset = datasets.Dataset.from_dict(columns)
        for column, feature in FEATURES.items():
            if feature is not None:  # depth maps stay path strings (.npy)
                dataset = dataset.cast_column(column, feature())
        splits[split] = dataset
    folder = synthetic / "saved"
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def processor() -> MiCoProcessor:
    return MiCoProcessor.from_config(MiCoConfig.from_preset("tiny"))


def test_saved_dataset_batches_equal_the_annotation_files(synthetic, saved, processor):
    from_file = load_annotation_dataset(synthetic / "data" / "train.jsonl")
    from_folder = load_annotation_dataset(saved, split="train")
    assert isinstance(from_folder.features["video"], datasets.Video) and not from_folder.features["video"].decode
    collator = MiCoDataCollator(processor, modalities=["video", "audio", "depth"], training=False)
    expected, got = collator([from_file[0], from_file[1]]), collator([from_folder[0], from_folder[1]])
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    images = MiCoDataCollator(processor, modalities=["image"], training=False)
    torch.testing.assert_close(
        images([from_folder[2]])["pixel_values"], images([from_file[2]])["pixel_values"], rtol=0, atol=0
    )
    streamed = next(iter(load_annotation_dataset(saved, split="train", streaming=True)))
    torch.testing.assert_close(collator([streamed])["input_features"], collator([from_file[0]])["input_features"])


def test_video_folder_read_by_load_dataset(tmp_path, processor):
    """A folder `load_dataset` reads (videofolder + metadata.jsonl). An audiofolder cannot be built here: datasets 5
    encodes every `Audio` value with torchcodec, whose PyPI wheel needs a CUDA build of torch."""
    for name in ("a.mp4", "b.mp4"):
        shutil.copy(MP4, tmp_path / name)
    rows = [{"file_name": name, "caption": f"video {name}"} for name in ("a.mp4", "b.mp4")]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = load_annotation_dataset(tmp_path)
    assert isinstance(dataset.features["video"], datasets.Video)
    collator = MiCoDataCollator(processor, modalities=["video"], training=False)
    expected = processor(videos=[str(MP4)] * 2)["pixel_values_videos"]
    torch.testing.assert_close(collator([dataset[0], dataset[1]])["pixel_values_videos"], expected, rtol=0, atol=0)


def test_one_mp4_feeds_video_and_audio_of_a_training_row(tmp_path, processor):
    rate = 16000
    pcm = (np.sin(np.arange(rate * 2) * 0.05) * 12000).astype(np.int16)
    soundfile.write(tmp_path / "tone.wav", pcm, rate, subtype="PCM_16")
    with av.open(str(tmp_path / "clip.mp4"), "w") as container:
        video, audio = container.add_stream("mpeg4", rate=10), container.add_stream("alac", rate=rate)
        video.width, video.height, video.pix_fmt, audio.layout = 32, 32, "yuv420p", "mono"
        for index in range(8):
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), 30 * index, np.uint8))))
        container.mux(video.encode())
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16p", layout="mono")
        frame.sample_rate = rate
        container.mux(audio.encode(frame))
        container.mux(audio.encode())
    row = {"caption": "a tone", "video": "clip.mp4", "audio": "clip.mp4"}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n")
    dataset = load_annotation_dataset(tmp_path / "train.jsonl")
    batch = MiCoDataCollator(processor, modalities=["video", "audio"], training=False)([dataset[0]])
    expected = processor(audio=str(tmp_path / "tone.wav"))["input_features"]
    torch.testing.assert_close(batch["input_features"], expected, rtol=0, atol=0)
    assert batch["pixel_values_videos"].shape == (1, 4, 3, 64, 64)


def test_broken_media_in_a_dataset_row_is_named(tmp_path, saved, processor):
    dataset = datasets.Dataset.from_dict({"caption": ["x"], "audio": [str(tmp_path / "gone.wav")]})
    dataset = dataset.cast_column("audio", datasets.Audio(decode=False))
    collator = MiCoDataCollator(processor, modalities=["audio"], training=False)
    with pytest.raises(BrokenMediaError, match=r"cannot read the audio of a row from '.*gone.wav': audio\[0\] file"):
        collator([dataset[0]])


def test_dataset_folder_errors_name_the_folder_and_choices(tmp_path, saved):
    with pytest.raises(ValueError, match=r"saved: holds the splits \['train', 'test'\]; choose one \(split=\)"):
        load_annotation_dataset(saved)
    with pytest.raises(ValueError, match=r"saved: has no split 'validation'; it holds \['train', 'test'\]"):
        load_annotations(saved, split="validation")
    no_caption = tmp_path / "no_caption"
    datasets.Dataset.from_dict({"image": ["a.png"]}).save_to_disk(str(no_caption))
    with pytest.raises(ValueError, match=r"no_caption: rows need a `caption` or `captions` column, found \['image'\]"):
        load_annotation_dataset(no_caption)
    with_column = tmp_path / "with_split_column"
    datasets.Dataset.from_dict({"caption": ["a", "b"], "split": ["train", "test"]}).save_to_disk(str(with_column))
    assert load_annotation_dataset(with_column, split="test")["caption"] == ["b"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: not a data set that datasets can load"):
        load_annotation_dataset(tmp_path / "empty")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_retrieval_cli_on_a_saved_dataset_equals_the_annotation_file(synthetic, saved):
    torch.manual_seed(0)
    MiCoModel(MiCoConfig.from_preset("tiny")).save_pretrained(synthetic / "model")
    evaluate = load_example("run_retrieval_eval").main
    common = ["--model_name_or_path", str(synthetic / "model"), "--modalities", "image", "va", "depth"]
    from_file = evaluate(
        [*common, "--test_file", str(synthetic / "data" / "test.jsonl"), "--output_dir", str(synthetic / "a")]
    )
    from_folder = evaluate(
        [*common, "--test_file", str(saved), "--split", "test", "--output_dir", str(synthetic / "b")]
    )
    assert from_folder == pytest.approx(from_file, abs=1e-6) and from_folder["num_items"] == 6
    shutil.rmtree(synthetic / "a"), shutil.rmtree(synthetic / "b")


@pytest.mark.slow
def test_run_pretrain_on_a_saved_dataset(synthetic, saved, monkeypatch):
    """The command of docs/processing.md: train and evaluate on two splits of a saved dataset."""
    from transformers import AutoModel

    output = synthetic / "run"
    argv = [
        "run_pretrain.py", "--config_name", "tiny", "--train_file", str(saved), "--train_split", "train",
        "--validation_file", str(saved), "--validation_split", "test", "--output_dir", str(output),
        "--modalities", "image", "audio", "--max_steps", "1", "--per_device_train_batch_size", "2", "--do_train",
        "--do_eval", "--per_device_eval_batch_size", "6", "--report_to", "none", "--use_cpu",
    ]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    load_example("run_pretrain").main()
    assert type(AutoModel.from_pretrained(output)).__name__ == "MiCoModel"
    metrics = json.loads((output / "eval_results.json").read_text())
    assert np.isfinite(metrics["eval_loss"]) and metrics["epoch"] > 0
