"""Transformers pipelines on MiCo checkpoints: each pipeline's scores are the model's own temperature-scaled softmax,
the stock pipelines take MiCo after `import modeling_mico`, and the shipped custom pipelines run as remote code in a
fresh interpreter without the package."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
from test_loading import BLOCK_PACKAGE, run_python
from transformers import pipeline

from modeling_mico import MiCoConfig, MiCoForZeroShotClassification, MiCoModel, MiCoProcessor
from modeling_mico.ecosystem import ECOSYSTEM_MODULES
from modeling_mico.pipelines_mico import DEFAULT_TEMPLATES, MiCoZeroShotClassificationPipeline


MEDIA = Path(__file__).resolve().parent / "fixtures" / "media"
IMAGE, AUDIO, VIDEO = str(MEDIA / "test.jpeg"), str(MEDIA / "test.flac"), str(MEDIA / "test.mp4")
LABELS = ["a dog", "a cat", "a car"]


def save_tiny(directory: Path) -> Path:
    """A tiny MiCo model and its processor saved in one directory (the ecosystem files come with the save)."""
    torch.manual_seed(0)
    config = MiCoConfig.from_preset("tiny")
    MiCoModel(config).eval().save_pretrained(directory)
    MiCoProcessor.from_config(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("pipelines") / "tiny")


@pytest.fixture(scope="module")
def model(saved) -> MiCoModel:
    return MiCoModel.from_pretrained(saved).eval()


@pytest.fixture(scope="module")
def processor(saved) -> MiCoProcessor:
    return MiCoProcessor.from_pretrained(saved)


def model_probabilities(model, processor, prompts: list[str], **media) -> torch.Tensor:
    """Softmax over the labels of the model's own `logits_per_<modality>` for one input."""
    ((argument, value),) = media.items()
    inputs = {**processor(text=prompts), **processor(**{argument: [value]})}
    with torch.no_grad():
        output = model(**inputs)
    name = {"images": "image", "videos": "video"}.get(argument, argument)
    return output[f"logits_per_{name}"][0].softmax(dim=-1)


def scores_by_label(result: list[dict]) -> torch.Tensor:
    ranked = {entry["label"]: entry["score"] for entry in result}
    assert [entry["score"] for entry in result] == sorted(ranked.values(), reverse=True)
    return torch.tensor([ranked[label] for label in LABELS])


def test_checkpoint_ships_the_pipelines(saved):
    config = json.loads((saved / "config.json").read_text())
    assert set(config["custom_pipelines"]) == {
        "zero-shot-audio-classification",
        "zero-shot-video-classification",
        "zero-shot-depth-classification",
        "zero-shot-multimodal-classification",
        "multimodal-feature-extraction",
        "video-to-text",
        "audio-to-text",
        "multimodal-to-text",
    }
    assert config["auto_map"]["AutoModelForZeroShotImageClassification"] == (
        "modeling_mico.MiCoForZeroShotClassification"
    )
    assert all((saved / name).is_file() for name in ECOSYSTEM_MODULES)


def test_stock_zero_shot_image_pipeline_scores_are_the_model_softmax(saved, model, processor):
    classifier = pipeline("zero-shot-image-classification", model=str(saved))
    assert type(classifier.model) is MiCoForZeroShotClassification
    result = classifier(IMAGE, candidate_labels=LABELS, hypothesis_template="a photo of {}.")
    expected = model_probabilities(model, processor, [f"a photo of {label}." for label in LABELS], images=IMAGE)
    torch.testing.assert_close(scores_by_label(result), expected, atol=1e-5, rtol=0)


def test_stock_feature_extraction_pipelines_give_the_normalised_embeddings(saved, model, processor):
    text = torch.tensor(pipeline("feature-extraction", model=str(saved))("a dog"))[0]
    image = torch.tensor(pipeline("image-feature-extraction", model=str(saved))(IMAGE))[0]
    with torch.no_grad():
        output = model(**processor(text=["a dog"]), **processor(images=[IMAGE]))
    torch.testing.assert_close(text, output.text_embeds[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(image, output.image_embeds[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("task", "argument", "value"),
    [
        ("zero-shot-audio-classification", "audio", AUDIO),
        ("zero-shot-video-classification", "videos", VIDEO),
        ("zero-shot-depth-classification", "depth", IMAGE),
    ],
)
def test_custom_zero_shot_pipelines_scores_are_the_model_softmax(saved, model, processor, task, argument, value):
    classifier = pipeline(task, model=str(saved), trust_remote_code=True)
    modality = task.split("-")[2]
    prompts = [DEFAULT_TEMPLATES[modality].format(label) for label in LABELS]
    expected = model_probabilities(model, processor, prompts, **{argument: value})
    torch.testing.assert_close(
        scores_by_label(classifier(value, candidate_labels=LABELS)), expected, atol=1e-5, rtol=0
    )
    custom = classifier(value, candidate_labels=LABELS, hypothesis_template="{}")
    expected = model_probabilities(model, processor, LABELS, **{argument: value})
    torch.testing.assert_close(scores_by_label(custom), expected, atol=1e-5, rtol=0)


def test_audio_arrays_at_any_rate_are_resampled(saved, model, processor):
    waveform, rate = soundfile.read(AUDIO, dtype="float32", always_2d=True)
    waveform = waveform[:, 0]
    low = np.interp(np.arange(0, len(waveform), rate / 8000), np.arange(len(waveform)), waveform).astype(np.float32)
    classifier = pipeline("zero-shot-audio-classification", model=str(saved), trust_remote_code=True)
    by_path = scores_by_label(classifier(AUDIO, candidate_labels=LABELS))
    by_dict = scores_by_label(classifier({"array": waveform, "sampling_rate": rate}, candidate_labels=LABELS))
    by_array = scores_by_label(classifier(waveform, candidate_labels=LABELS, sampling_rate=rate))
    torch.testing.assert_close(by_dict, by_path, atol=1e-6, rtol=0)
    torch.testing.assert_close(by_array, by_path, atol=1e-6, rtol=0)
    prompts = [DEFAULT_TEMPLATES["audio"].format(label) for label in LABELS]
    inputs = {**processor(text=prompts), **processor(audio=[low], sampling_rate=8000)}
    with torch.no_grad():
        expected = model(**inputs).logits_per_audio[0].softmax(dim=-1)
    at_8k = scores_by_label(classifier(low, candidate_labels=LABELS, sampling_rate=8000))
    torch.testing.assert_close(at_8k, expected, atol=1e-5, rtol=0)


def test_video_with_its_sound_is_classified_through_the_fused_head(saved, model, processor):
    classifier = pipeline("zero-shot-multimodal-classification", model=str(saved), trust_remote_code=True)
    result = classifier({"video": VIDEO, "audio": AUDIO}, candidate_labels=LABELS)
    prompts = [DEFAULT_TEMPLATES["video"].format(label) for label in LABELS]
    text = processor(text=prompts)
    with torch.no_grad():
        fused = model.get_fused_features(**processor(videos=[VIDEO], audio=[AUDIO])).pooler_output
        texts = model.get_text_features(text["input_ids"], text["attention_mask"]).pooler_output
    logits = F.normalize(fused, dim=-1) @ F.normalize(texts, dim=-1).t() / model.temperature
    torch.testing.assert_close(scores_by_label(result), logits[0].softmax(dim=-1), atol=1e-5, rtol=0)
    single = classifier(VIDEO, candidate_labels=LABELS, modality="video")
    expected = model_probabilities(model, processor, prompts, videos=VIDEO)
    torch.testing.assert_close(scores_by_label(single), expected, atol=1e-5, rtol=0)


def test_multimodal_feature_extraction_gives_each_normalised_embedding(saved, model, processor):
    extractor = pipeline("multimodal-feature-extraction", model=str(saved), trust_remote_code=True)
    with torch.no_grad():
        output = model(**processor(text=["a dog"]), **processor(audio=[AUDIO]))
        depth = model(**processor(depth=[IMAGE])).depth_embeds[0]
    torch.testing.assert_close(torch.tensor(extractor("a dog")), output.text_embeds[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        extractor(AUDIO, modality="audio", return_tensors=True), output.audio_embeds[0], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(torch.tensor(extractor({"depth": IMAGE})), depth, atol=1e-5, rtol=0)


def test_pipelines_work_on_a_model_object_after_import(model, processor):
    """After `import modeling_mico`, the registered tasks take an in-memory model and processor."""
    classifier = pipeline("zero-shot-video-classification", model=MiCoModel(model.config).eval(), processor=processor)
    assert isinstance(classifier, MiCoZeroShotClassificationPipeline)
    assert len(classifier(VIDEO, candidate_labels=LABELS)) == len(LABELS)


def test_bad_pipeline_arguments_are_refused_by_name(saved):
    classifier = pipeline("zero-shot-multimodal-classification", model=str(saved), trust_remote_code=True)
    with pytest.raises(ValueError, match="candidate_labels must be a non-empty list of strings"):
        classifier(IMAGE, candidate_labels="a dog")
    with pytest.raises(ValueError, match=r"say which modality the input is: modality=\.\.\."):
        classifier(IMAGE, candidate_labels=LABELS)
    with pytest.raises(ValueError, match="modality must be one of .* got 'smell'"):
        classifier(IMAGE, candidate_labels=LABELS, modality="smell")
    with pytest.raises(ValueError, match=r"hypothesis_template must contain '\{\}'"):
        classifier(IMAGE, candidate_labels=LABELS, modality="image", hypothesis_template="a photo")
    with pytest.raises(ValueError, match=r"input dict keys must be modalities of this processor .* got \['smell'\]"):
        classifier({"smell": IMAGE}, candidate_labels=LABELS)


@pytest.mark.slow
def test_remote_code_pipelines_run_without_the_package(saved, model, processor, tmp_path):
    prompts = {name: [DEFAULT_TEMPLATES[name].format(label) for label in LABELS] for name in ("audio", "video")}
    expected = {
        "image": model_probabilities(model, processor, [f"a photo of {label}." for label in LABELS], images=IMAGE),
        "audio": model_probabilities(model, processor, prompts["audio"], audio=AUDIO),
        "video": model_probabilities(model, processor, prompts["video"], videos=VIDEO),
    }
    script = f"""
        import json
        from transformers import pipeline
        directory, labels = {str(saved)!r}, {LABELS!r}
        calls = {{
            "image": ("zero-shot-image-classification", {IMAGE!r}, {{"hypothesis_template": "a photo of {{}}."}}),
            "audio": ("zero-shot-audio-classification", {AUDIO!r}, {{}}),
            "video": ("zero-shot-video-classification", {VIDEO!r}, {{}}),
        }}
        scores = {{}}
        for name, (task, value, options) in calls.items():
            classifier = pipeline(task, model=directory, trust_remote_code=True)
            assert type(classifier.model).__module__.startswith("transformers_modules"), type(classifier.model)
            ranked = {{entry["label"]: entry["score"] for entry in classifier(value, candidate_labels=labels, **options)}}
            scores[name] = [ranked[label] for label in labels]
        print(json.dumps(scores))
    """
    result = run_python(BLOCK_PACKAGE, script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    for name, probabilities in expected.items():
        torch.testing.assert_close(torch.tensor(scores[name]), probabilities, atol=1e-5, rtol=0)
