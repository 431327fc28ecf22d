"""A modality declared only in the configuration (`thermal`, image-like) reaches every consumer of the registry
without code: the collator's columns, the retrieval targets, the annotation media keys and captioning's file routing.
(The end-to-end run, processor -> pretraining step -> retrieval evaluation -> caption, is in the integration tests.)"""

import json
from pathlib import Path

import pytest
import torch
from conftest import thermal_config
from transformers import EvalPrediction

from modeling_mico import MiCoConfig
from modeling_mico.annotations import load_annotations, media_keys
from modeling_mico.captioning import caption_files, collect_media_files, media_modality
from modeling_mico.data import MiCoDataCollator, default_columns, media_columns
from modeling_mico.evaluation import resolve_targets, retrieval_targets, target_prefix
from modeling_mico.trainer_mico import retrieval_compute_metrics


class RecordingProcessor:
    """Stands in for `MiCoProcessor`: records the media arguments, returns a tensor under the model input name of the
    argument (and a key the collator must not pick up), tokenizes captions into fixed ids."""

    def __init__(self, config: MiCoConfig):
        self.inputs = {spec.processor_argument: spec.input_name for spec in config.modality_specs.values()}
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, text=None, return_tensors=None, training=None, seed=None, **media):
        if text is not None:
            return {
                "input_ids": torch.ones(len(text), 5, dtype=torch.long),
                "attention_mask": torch.ones(len(text), 5),
            }
        ((argument, paths),) = media.items()
        self.calls.append((argument, list(paths)))
        return {self.inputs[argument]: torch.zeros(len(paths), 1, 3, 8, 8), "unrelated": torch.zeros(1)}

    def batch_decode(self, ids, skip_special_tokens=True):
        return [f" caption {int(row[0])} " for row in ids]


def test_collator_maps_the_thermal_column_to_its_argument_and_input():
    config = thermal_config()
    assert media_columns(config)["thermal"].input_name == "thermal_values"
    assert default_columns(config) == ["video", "audio", "thermal", "subtitle"]
    processor = RecordingProcessor(config)
    collator = MiCoDataCollator(processor, ["image", "thermal"], config=config)
    rows = [{"caption": f"hot thing {i}", "image": f"/d/{i}.png", "thermal": f"/d/{i}.tir"} for i in range(2)]
    batch = collator(rows)
    assert sorted(batch) == ["attention_mask", "input_ids", "pixel_values", "thermal_values"]
    assert batch["thermal_values"].shape == (2, 1, 3, 8, 8)
    assert processor.calls == [
        ("images", ["/d/0.png"]),
        ("thermal", ["/d/0.tir"]),
        ("images", ["/d/1.png"]),
        ("thermal", ["/d/1.tir"]),
    ]
    with pytest.raises(
        ValueError,
        match=r"unknown modalities \['depth'\]; choose among \['image', 'video', 'audio', 'thermal', 'subtitle'\]",
    ):
        MiCoDataCollator(processor, ["depth"], config=config)


def test_retrieval_targets_and_keys_of_a_declared_modality():
    config = thermal_config(fused_heads={"va": ["vision", "audio"], "vh": ["vision", "thermal"]})
    targets = retrieval_targets(config)
    assert targets == {
        "image": ("image",),
        "video": ("video",),
        "audio": ("audio",),
        "thermal": ("thermal",),
        "ia": ("image", "audio"),
        "va": ("video", "audio"),
        "i+thermal": ("image", "thermal"),
        "v+thermal": ("video", "thermal"),
    }
    assert [target_prefix(t) for t in targets] == [
        "t2i",
        "t2v",
        "t2a",
        "t2thermal",
        "t2ia",
        "t2va",
        "t2i+thermal",
        "t2v+thermal",
    ]
    # the release's fused heads: va and id keep their names; none for a configuration without depth
    assert "id" in retrieval_targets(MiCoConfig()) and "id" not in retrieval_targets(thermal_config())
    with pytest.raises(ValueError, match=r"unknown retrieval targets \['depth'\]; this model's targets are \['image'"):
        resolve_targets(config, ["thermal", "depth"])
    # the Trainer metric names the thermal directions from the target alone
    text = torch.eye(3).numpy()
    metrics = retrieval_compute_metrics(["thermal"])(EvalPrediction(predictions=(text, text.copy()), label_ids=None))
    assert metrics["t2thermal/R@1"] == 100 and metrics["thermal2t/R@1"] == 100


def test_annotations_resolve_the_thermal_column(tmp_path: Path):
    config = thermal_config()
    assert media_keys(config) == ("image", "video", "audio", "thermal")
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"caption": "a warm hand", "thermal": "ir/0.png"}) + "\n")
    assert load_annotations(path, config=config)[0]["thermal"] == str(tmp_path.resolve() / "ir" / "0.png")
    # without the configuration the column is an unknown field: kept as it is, and no clue to the format
    assert load_annotations(path, format="mico")[0]["thermal"] == "ir/0.png"
    with pytest.raises(ValueError, match="rows.jsonl: cannot detect the annotation format"):
        load_annotations(path)


def test_captioning_routes_files_by_declared_extension(tmp_path: Path):
    config = thermal_config(modalities={"thermal": {"extensions": [".tir"]}})
    assert media_modality("a.TIR", config) == "thermal" and media_modality("a.png", config) == "image"
    assert media_modality("a.png", config, modality="thermal") == "thermal"
    assert media_modality("a.npy", config) is None  # no depth in this model
    with pytest.raises(
        ValueError, match=r"unknown modality 'depth'; this model takes \['image', 'video', 'audio', 'thermal'\]"
    ):
        media_modality("a.png", config, modality="depth")
    shared = thermal_config(modalities={"thermal": {"extensions": [".png"]}})
    with pytest.raises(
        ValueError, match=r"a\.png: the extension '\.png' is declared by \['image', 'thermal'\]; say which"
    ):
        media_modality("a.png", shared)

    for name in ("b.tir", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    files = collect_media_files([tmp_path], config)
    assert [file.name for file in files] == ["a.png", "b.tir"]

    class Captioner:
        def __init__(self):
            self.config, self.device, self.dtype, self.inputs = config, torch.device("cpu"), torch.float32, []

        def generate(self, **inputs):
            ((name, values),) = inputs.items()
            self.inputs.append(name)
            return torch.arange(len(values))[:, None]

    model, processor = Captioner(), RecordingProcessor(config)
    records = caption_files(model, processor, files, progress=False)
    assert [(r["modality"], r["caption"]) for r in records] == [("image", "caption 0"), ("thermal", "caption 0")]
    assert model.inputs == ["pixel_values", "thermal_values"]
    assert processor.calls == [("images", [str(files[0])]), ("thermal", [str(files[1])])]
