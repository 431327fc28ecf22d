"""Classification heads (image, video, audio, depth; fused video+audio), their loading, pipelines, the fine-tuning
helpers and examples/run_classification.py end to end on synthetic data."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForAudioClassification,
    AutoModelForImageClassification,
    AutoModelForVideoClassification,
    pipeline,
)

from modeling_mico import (
    MiCoConfig,
    MiCoForAudioClassification,
    MiCoForDepthClassification,
    MiCoForImageClassification,
    MiCoForPreTraining,
    MiCoForVideoClassification,
    MiCoModel,
    MiCoProcessor,
)
from modeling_mico.data import ROW_POSITION
from modeling_mico.finetuning import (
    MiCoClassificationCollator,
    classification_compute_metrics,
    label_names,
    layer_decay_parameter_groups,
    load_classification_rows,
    mix_batch,
)


ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT / "tests" / "fixtures" / "media"
PARITY = ROOT / "tests" / "fixtures" / "parity"


def tiny(**overrides) -> MiCoConfig:
    return MiCoConfig.from_preset("tiny", **{"num_labels": 3, **overrides})


INPUTS = {
    MiCoForImageClassification: {"pixel_values": (2, 3, 64, 64)},
    MiCoForVideoClassification: {"pixel_values_videos": (2, 4, 3, 64, 64)},
    MiCoForAudioClassification: {"input_features": (2, 3, 64, 64)},
    MiCoForDepthClassification: {"depth_values": (2, 1, 3, 64, 64)},
}


@pytest.mark.parametrize("head", list(INPUTS))
def test_head_logits_are_the_linear_head_of_pooled_class_tokens_and_loss_is_cross_entropy(head):
    torch.manual_seed(0)
    model = head(tiny()).eval()
    inputs = {key: torch.randn(shape) for key, shape in INPUTS[head].items()}
    labels = torch.tensor([0, 2])
    output = model(**inputs, labels=labels)
    (values,) = inputs.values()
    pooled = model.mico.pool_tokens(model.mico.encode_modality(head.modality, values))
    expected = model.classifier(model.fc_norm(pooled))
    torch.testing.assert_close(output.logits, expected)
    torch.testing.assert_close(output.loss, torch.nn.functional.cross_entropy(expected, labels))
    assert model.config.problem_type == "single_label_classification"


def test_multi_label_loss_is_binary_cross_entropy_and_fused_video_audio_concatenates():
    torch.manual_seed(0)
    config = tiny(classifier_modalities=["video", "audio"], problem_type="multi_label_classification")
    model = MiCoForVideoClassification(config).eval()
    video, audio = torch.randn(2, 4, 3, 64, 64), torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    output = model(pixel_values_videos=video, input_features=audio, labels=labels)
    pooled = [
        model.mico.pool_tokens(model.mico.encode_modality(n, v)) for n, v in (("video", video), ("audio", audio))
    ]
    expected = model.classifier(model.fc_norm(torch.cat(pooled, dim=-1)))
    torch.testing.assert_close(output.logits, expected)
    torch.testing.assert_close(output.loss, torch.nn.functional.binary_cross_entropy_with_logits(expected, labels))
    assert model.classifier.in_features == 2 * config.vision_config.hidden_size


def test_soft_targets_and_regression():
    torch.manual_seed(0)
    model = MiCoForImageClassification(tiny()).eval()
    pixels = torch.randn(2, 3, 64, 64)
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]])
    logits = model(pixel_values=pixels).logits
    model.config.problem_type = "single_label_classification"
    expected = -(soft * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(model(pixel_values=pixels, labels=soft).loss, expected)
    regression = MiCoForImageClassification(MiCoConfig.from_preset("tiny", num_labels=1)).eval()
    targets = torch.tensor([0.5, -1.0])
    output = regression(pixel_values=pixels, labels=targets)
    torch.testing.assert_close(output.loss, torch.nn.functional.mse_loss(output.logits.squeeze(-1), targets))
    assert regression.config.problem_type == "regression"


def test_wrong_inputs_and_modalities_are_refused_by_name():
    model = MiCoForImageClassification(tiny()).eval()
    with pytest.raises(
        ValueError, match=r"MiCoForImageClassification takes \['pixel_values'\].*got \['input_features'\]"
    ):
        model(input_features=torch.randn(1, 3, 64, 64))
    with pytest.raises(
        ValueError, match=r"got \[\] \(with Trainer, keep the input columns: remove_unused_columns=False\)"
    ):
        model(labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="classifies 'audio': classifier_modalities must include it"):
        MiCoForAudioClassification(tiny(classifier_modalities=["video"]))
    with pytest.raises(ValueError, match=r"one modality per encoder"):
        MiCoForVideoClassification(tiny(classifier_modalities=["video", "image"]))
    with pytest.raises(ValueError, match=r"\['thermal'\] are not modalities of this model"):
        MiCoForVideoClassification(tiny(classifier_modalities=["video", "thermal"]))


def assert_new_head(model) -> None:
    """The head of a model loaded from an encoder checkpoint is freshly initialised (unit norm, zero biases, small
    normal weights at `initializer_range`)."""
    assert torch.equal(model.fc_norm.weight, torch.ones_like(model.fc_norm.weight))
    assert torch.equal(model.classifier.bias, torch.zeros_like(model.classifier.bias))
    std = model.config.initializer_range
    assert 0.5 * std < model.classifier.weight.std().item() < 1.5 * std


def test_pretraining_checkpoint_loads_into_every_head_encoder_equal_head_new(tmp_path):
    torch.manual_seed(0)
    pretrained = MiCoForPreTraining(MiCoConfig.from_preset("tiny"))
    pretrained.save_pretrained(tmp_path / "pretrained")
    encoder = pretrained.mico.state_dict()
    for auto_class, head in [
        (AutoModelForImageClassification, MiCoForImageClassification),
        (AutoModelForVideoClassification, MiCoForVideoClassification),
        (AutoModelForAudioClassification, MiCoForAudioClassification),
        (None, MiCoForDepthClassification),
    ]:
        loader = auto_class or head
        model, info = loader.from_pretrained(tmp_path / "pretrained", num_labels=5, output_loading_info=True)
        assert type(model) is head and model.classifier.out_features == 5
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert_new_head(model)
        for key, value in model.mico.state_dict().items():
            assert torch.equal(value, encoder[key]), key
    # and back: a fine-tuned head's encoder loads into MiCoModel
    model.save_pretrained(tmp_path / "head")
    base = MiCoModel.from_pretrained(tmp_path / "head")
    assert torch.equal(
        base.vision_model.embeddings.position_embedding, encoder["vision_model.embeddings.position_embedding"]
    )


def test_original_checkpoint_loads_into_a_classification_head():
    reference = MiCoModel.from_pretrained(PARITY / "hub")
    model, info = AutoModelForVideoClassification.from_pretrained(
        PARITY / "hub", num_labels=4, output_loading_info=True
    )
    assert type(model) is MiCoForVideoClassification and model.classifier.out_features == 4
    assert not info["missing_keys"]
    assert_new_head(model)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.mico.state_dict()[key], value), key


def _labelled(model_class, tmp_path, **config):
    torch.manual_seed(0)
    model = model_class(
        tiny(id2label={0: "cat", 1: "dog", 2: "owl"}, label2id={"cat": 0, "dog": 1, "owl": 2}, **config)
    )
    model.eval().save_pretrained(tmp_path / "model")
    MiCoProcessor.from_config(model.config).save_pretrained(tmp_path / "model")
    return model


def _top(model, processor_output) -> str:
    with torch.no_grad():
        logits = model(**processor_output).logits
    return model.config.id2label[int(logits.argmax(-1))]


def test_image_classification_pipeline_returns_the_models_top_label(tmp_path):
    model = _labelled(MiCoForImageClassification, tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path / "model"))
    result = classifier(str(MEDIA / "test.jpeg"), top_k=3)
    processor = MiCoProcessor.from_pretrained(tmp_path / "model")
    expected = _top(model, {"pixel_values": processor(images=[str(MEDIA / "test.jpeg")])["pixel_values"]})
    assert result[0]["label"] == expected and len(result) == 3
    assert abs(sum(item["score"] for item in result) - 1) < 1e-5


def test_audio_classification_pipeline_returns_the_models_top_label(tmp_path):
    import soundfile

    model = _labelled(MiCoForAudioClassification, tmp_path)
    classifier = pipeline("audio-classification", model=str(tmp_path / "model"))
    waveform, rate = soundfile.read(MEDIA / "test.flac", dtype="float32")
    result = classifier({"raw": waveform, "sampling_rate": rate}, top_k=3)
    processor = MiCoProcessor.from_pretrained(tmp_path / "model")
    features = processor.feature_extractor({"array": waveform, "sampling_rate": rate})["input_features"]
    assert result[0]["label"] == _top(model, {"input_features": features})


def test_video_classification_pipeline_returns_the_models_top_label(tmp_path):
    model = _labelled(MiCoForVideoClassification, tmp_path)
    processor = MiCoProcessor.from_pretrained(tmp_path / "model")
    classifier = pipeline(
        "video-classification", model=str(tmp_path / "model"), video_processor=processor.video_processor
    )
    result = classifier(str(MEDIA / "test.mp4"), num_frames=4, top_k=3)
    videos = processor.video_processor(str(MEDIA / "test.mp4"), num_frames=4)["pixel_values_videos"]
    assert result[0]["label"] == _top(model, {"pixel_values_videos": videos})


# --------------------------------------------------------------------------------------------------------------------
# Fine-tuning helpers
# --------------------------------------------------------------------------------------------------------------------


def test_layer_decay_groups_scale_learning_rates_by_depth():
    model = MiCoForImageClassification(tiny())
    layers = model.config.vision_config.num_hidden_layers
    groups = layer_decay_parameter_groups(model, 1e-3, 0.5, 0.05, layers)
    by_id = {id(p): group for group in groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert by_id[id(named["classifier.weight"])]["lr"] == pytest.approx(1e-3)
    assert by_id[id(named["classifier.weight"])]["weight_decay"] == 0.05
    assert by_id[id(named["classifier.bias"])]["weight_decay"] == 0.0
    last = f"mico.vision_model.encoder.layers.{layers - 1}.mlp.fc1.weight"
    assert by_id[id(named[last])]["lr"] == pytest.approx(1e-3 * 0.5)
    embedding = "mico.vision_model.embeddings.position_embedding"
    assert by_id[id(named[embedding])]["lr"] == pytest.approx(1e-3 * 0.5 ** (layers + 1))
    assert by_id[id(named[embedding])]["weight_decay"] == 0.0
    assert sum(len(group["params"]) for group in groups) == len(named)
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\], got 1.5"):
        layer_decay_parameter_groups(model, 1e-3, 1.5, 0.0, layers)


def test_mixup_mixes_inputs_and_one_hot_targets_with_one_ratio():
    torch.manual_seed(0)
    batch = {"pixel_values": torch.randn(4, 3, 8, 8), "labels": torch.tensor([0, 1, 2, 1])}
    mixed = mix_batch(dict(batch), 3, mixup_alpha=0.4, cutmix_alpha=0.0)
    targets = torch.nn.functional.one_hot(batch["labels"], 3).float()
    lam = float(mixed["labels"][0, 0])  # row 0 is class 0 mixed with row 3 (class 1)
    torch.testing.assert_close(mixed["labels"], lam * targets + (1 - lam) * targets.flip(0))
    torch.testing.assert_close(
        mixed["pixel_values"], lam * batch["pixel_values"] + (1 - lam) * batch["pixel_values"].flip(0)
    )
    cut = mix_batch(dict(batch), 3, mixup_alpha=0.0, cutmix_alpha=1.0)
    kept = (cut["pixel_values"] == batch["pixel_values"]).float().mean().item()
    assert cut["labels"][0, 0].item() == pytest.approx(kept, abs=1e-6)


def test_seeded_collator_slices_and_mixing_depend_on_the_rows_and_epoch_only():
    """With a seed, each row's spectrogram slices and the batch's mixup/cutmix choice, ratio and box come from
    (seed, epoch, positions): the same batch whatever was collated before and whatever torch's global RNG did (what
    makes resuming exact), other draws in the next epoch; without a seed they follow the global RNG."""
    config = tiny(id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    processor = MiCoProcessor.from_config(config)
    rows = [{"audio": str(MEDIA / "test.flac"), "label": name, ROW_POSITION: str(i)} for i, name in enumerate("abc")]
    mixing = {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}
    collator = MiCoClassificationCollator(processor, config, ["audio"], **mixing, seed=5)
    first = collator(rows)
    torch.manual_seed(123)
    collator(rows[1:])  # another batch collated in between
    again = collator(rows)
    for key in ("input_features", "labels"):
        torch.testing.assert_close(again[key], first[key], rtol=0, atol=0)
    collator.set_epoch(1)
    later = collator(rows)
    assert not torch.equal(later["labels"], first["labels"])
    assert not torch.equal(later["input_features"], first["input_features"])
    unseeded = MiCoClassificationCollator(processor, config, ["audio"], **mixing)
    torch.manual_seed(0)
    draws = unseeded(rows)["labels"]
    torch.manual_seed(1)
    assert not torch.equal(unseeded(rows)["labels"], draws)
    with pytest.raises(ValueError, match=r"MiCoClassificationCollator\(seed=5\) needs rows stamped"):
        collator([{key: value for key, value in rows[0].items() if key != ROW_POSITION}])


def test_metrics_accuracy_and_map():
    from transformers import EvalPrediction

    single = classification_compute_metrics(False)(
        EvalPrediction(predictions=np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]]), label_ids=np.array([0, 1, 1]))
    )
    assert single == {"accuracy": pytest.approx(2 / 3)}
    # class 0: positives ranked 1st and 3rd -> AP (1 + 2/3) / 2; class 1: positive ranked 1st -> AP 1
    logits = np.array([[3.0, -1.0], [2.0, 1.0], [1.0, -2.0]])
    labels = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    multi = classification_compute_metrics(True)(EvalPrediction(predictions=logits, label_ids=labels))
    assert multi["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)


def test_classification_rows_from_folders_and_annotation_files(tmp_path):
    import shutil

    config = MiCoConfig.from_preset("tiny")
    for label in ("cat", "dog"):
        (tmp_path / "tree" / label).mkdir(parents=True)
        shutil.copy(MEDIA / "test.jpeg", tmp_path / "tree" / label / "a.jpeg")
    (tmp_path / "tree" / "dog" / "notes.txt").write_text("not an image")
    rows = load_classification_rows(tmp_path / "tree", config, ["image"])
    assert [row["label"] for row in rows] == ["cat", "dog"] and rows[0]["image"].endswith("cat/a.jpeg")
    annotation = tmp_path / "labels.jsonl"
    annotation.write_text(
        "\n".join(json.dumps({"image": f"tree/{c}/a.jpeg", "tags": {"kind": [c, "pet"]}}) for c in ("cat", "dog"))
    )
    rows = load_classification_rows(annotation, config, ["image"], label_column="tags.kind")
    assert label_names(rows) == (["cat", "dog", "pet"], True)
    with pytest.raises(ValueError, match=r"labels.jsonl row 0 has no label column 'label'"):
        load_classification_rows(annotation, config, ["image"])
    with pytest.raises(ValueError, match=r"row 0 has no 'audio' \(needed for the audio input\)"):
        load_classification_rows(annotation, config, ["image", "audio"], label_column="tags.kind")
    collator = MiCoClassificationCollator(
        MiCoProcessor.from_config(config),
        tiny(id2label={0: "cat", 1: "dog", 2: "pet"}, label2id={"cat": 0, "dog": 1, "pet": 2}),
        ["image"],
        training=False,
        multi_label=True,
    )
    batch = collator(rows)
    assert batch["pixel_values"].shape[0] == 2
    torch.testing.assert_close(batch["labels"], torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))


# --------------------------------------------------------------------------------------------------------------------
# examples/run_classification.py end to end
# --------------------------------------------------------------------------------------------------------------------


def synthetic_run(tmp_path: Path, script: str, num_samples: int, num_test: int):
    """Synthetic image data in `tmp_path/data`, a tiny (untrained) MiCo with its processor in `tmp_path/tiny`, and
    the example module `script` imported from examples/."""
    import importlib

    from modeling_mico.synthetic_data import make_synthetic_dataset

    sys.path.insert(0, str(ROOT / "examples"))
    data = tmp_path / "data"
    make_synthetic_dataset(
        data, num_samples=num_samples, num_test=num_test, seed=0, image_size=32, modalities=["image"]
    )
    torch.manual_seed(0)
    config = MiCoConfig.from_preset("tiny")
    MiCoForPreTraining(config).save_pretrained(tmp_path / "tiny")
    MiCoProcessor.from_config(config).save_pretrained(tmp_path / "tiny")
    return importlib.import_module(script)


def _trained(run_classification, tmp_path: Path, output: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The logged losses and final weights of 4 steps of run_classification with mixup and cutmix (checkpoints
    every 2 steps) in `output`, resuming from the checkpoint already there, if any."""
    from safetensors.torch import load_file

    run_classification.main([
        "--model_name_or_path", str(tmp_path / "tiny"), "--modality", "image",
        "--train_file", str(tmp_path / "data" / "train.jsonl"), "--label_column", "attributes.color",
        "--output_dir", str(output), "--do_train", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--mixup_alpha", "0.4",
        "--cutmix_alpha", "1.0", "--seed", "3", "--report_to", "none", "--disable_tqdm", "true",
    ])  # fmt: skip
    history = json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry], load_file(output / "model.safetensors")


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "global-rng"])
def test_run_classification_resumed_with_mixing_equals_the_uninterrupted_run(tmp_path, monkeypatch, seeded):
    """run_classification seeds its training collator (`--data_seed`, else `--seed`), so a run resumed from
    checkpoint-2 mixes batches 3-4 as the uninterrupted run did: the same losses and weights. With the collator's
    draws from torch's global RNG (the code before), the resumed run mixes otherwise and ends elsewhere."""
    import shutil

    import modeling_mico.finetuning

    run_classification = synthetic_run(tmp_path, "run_classification", num_samples=16, num_test=2)
    if not seeded:

        class GlobalRngCollator(MiCoClassificationCollator):
            def __init__(self, *args, seed=None, **kwargs):
                super().__init__(*args, **kwargs)

        monkeypatch.setattr(modeling_mico.finetuning, "MiCoClassificationCollator", GlobalRngCollator)
    losses, weights = _trained(run_classification, tmp_path, tmp_path / "whole")
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed_losses, resumed_weights = _trained(run_classification, tmp_path, tmp_path / "resumed")
    assert len(losses) == 4 and resumed_losses[:2] == losses[:2]  # steps 1-2: the checkpoint's history
    if seeded:
        assert resumed_losses == pytest.approx(losses, rel=1e-6)
        for name, value in weights.items():
            torch.testing.assert_close(resumed_weights[name], value, rtol=1e-6, atol=1e-7, msg=name)
    else:
        print(f"global-rng losses: uninterrupted {losses[2:]}, resumed {resumed_losses[2:]}")
        assert resumed_losses[2:] != pytest.approx(losses[2:], rel=1e-6)


@pytest.mark.slow
def test_run_classification_end_to_end_with_lora_layer_decay_and_mocked_push(tmp_path, monkeypatch):
    run_classification = synthetic_run(tmp_path, "run_classification", num_samples=24, num_test=8)
    pushed = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            pushed["repo"] = repo_id
            return type("Url", (), {"repo_id": repo_id, "__str__": lambda self: f"https://hf.co/{repo_id}"})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            pushed["files"] = sorted(p.name for p in Path(folder_path).iterdir())

    monkeypatch.setattr("modeling_mico.peft_utils.HfApi", FakeApi)
    # the folder-per-class form of the same data: train/<colour>/<file>
    output = tmp_path / "out"
    argv = [
        "--model_name_or_path", str(tmp_path / "tiny"), "--modality", "image",
        "--train_file", str(tmp_path / "data" / "train.jsonl"),
        "--validation_file", str(tmp_path / "data" / "test.jsonl"),
        "--label_column", "attributes.color", "--output_dir", str(output),
        "--do_train", "--do_eval", "--max_steps", "3", "--per_device_train_batch_size", "8",
        "--learning_rate", "1e-3", "--use_peft", "--layer_decay", "0.8", "--mixup_alpha", "0.2",
        "--report_to", "none", "--save_strategy", "no", "--push_to_hub", "--hub_model_id", "me/mico-colour",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    metrics = run_classification.main(argv)
    assert 0 <= metrics["eval_accuracy"] <= 1 and "pretrained_accuracy" in metrics
    model = AutoModelForImageClassification.from_pretrained(output)
    assert type(model) is MiCoForImageClassification and set(model.config.label2id) <= {
        "red", "green", "blue", "yellow", "purple", "orange"
    }  # fmt: skip
    assert (output / "adapter" / "adapter_config.json").is_file()
    card = (output / "README.md").read_text()
    assert "| eval_accuracy |" in card and "| pretrained_accuracy |" in card
    assert (
        pushed["repo"] == "me/mico-colour"
        and "model.safetensors" in pushed["files"]
        and "README.md" in pushed["files"]
    )
    with pytest.raises(
        FileExistsError,
        match="is not empty and holds no complete checkpoint to resume from; pass --overwrite_output_dir",
    ):
        run_classification.main(argv)
    help_text = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "run_classification.py"), "--help"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    assert "Fine-tune a MiCo encoder" in help_text
