"""Transformers pipelines for MiCo: zero-shot classification and embeddings of every modality of the registry.

Transformers' own `zero-shot-image-classification`, `feature-extraction` and `image-feature-extraction` pipelines take
MiCo checkpoints as they are (`MiCoModel`'s output has `logits_per_image` and the embeddings first). This module adds
what Transformers lacks, as custom pipelines that every saved checkpoint ships (`custom_pipelines` in config.json):

- `zero-shot-video-classification`, `zero-shot-depth-classification`, `zero-shot-multimodal-classification` (any
  configured modality, or several at once through a fused head: a video with its sound scores with the `va` head),
  and `zero-shot-audio-classification` (files decoded with soundfile, arrays at any sampling rate resampled — the
  stock pipeline needs ffmpeg and takes arrays at the model's rate only);
- `multimodal-feature-extraction`: the normalised contrastive embedding of text or of any modality (or fused ones);
- `video-to-text`, `audio-to-text`, `multimodal-to-text`: MiCo's captions (or answers to a `question`) of videos (with
  or without their sound), audio clips or any configured modality — the tokens of
  `MiCoForConditionalGeneration.generate`. Images caption through Transformers' own `image-text-to-text` pipeline
  with `text=""`; its `any-to-any` pipeline cannot take MiCo where torchvision does not import (it requires
  torchvision for any model that takes images or videos).

Zero-shot scores are the model's training objective: cosine similarity divided by the learned temperature, softmax over the
labels. The module imports only Transformers and torch, so that a saved checkpoint runs it as remote code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForImageTextToText, GenerationConfig, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY


# Prompt template per modality (`{}` is the label); any other modality gets "a {modality} of {}.".
DEFAULT_TEMPLATES = {
    "image": "a photo of {}.",
    "video": "a video of {}.",
    "audio": "the sound of {}.",
    "depth": "a depth map of {}.",
    "normal": "a surface normal map of {}.",
}

# Zero-shot task -> the modality it classifies (None: given per call with `modality=` or by dict keys).
ZERO_SHOT_TASKS = {
    "zero-shot-audio-classification": "audio",
    "zero-shot-video-classification": "video",
    "zero-shot-depth-classification": "depth",
    "zero-shot-multimodal-classification": None,
}
FEATURE_EXTRACTION_TASK = "multimodal-feature-extraction"
# Captioning task -> the modality it captions (None: given per call with `modality=` or by dict keys).
CAPTIONING_TASKS = {"video-to-text": "video", "audio-to-text": "audio", "multimodal-to-text": None}


def default_template(modalities: tuple[str, ...]) -> str:
    """The prompt template of the first modality (the vision one for a video with its sound)."""
    return DEFAULT_TEMPLATES.get(modalities[0], f"a {modalities[0]} of {{}}.")


class MiCoPipelineMixin:
    """Shared input handling: which modalities an input holds, and their model inputs through the processor."""

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def media_of(self, item: Any, modality: str | None) -> dict[str, Any]:
        """`{modality: value}` of one input: a dict keyed by modality names (`{"video": ..., "audio": ...}`) or a
        single value of `modality` (the task's, or the `modality=` argument)."""
        specs = self.processor.modality_specs
        if isinstance(item, Mapping) and not {"array", "sampling_rate"} <= set(item):
            unknown = [name for name in item if name not in specs]
            if unknown or not item:
                raise ValueError(
                    f"input dict keys must be modalities of this processor {list(specs)}, got {list(item)}"
                )
            return dict(item)
        modality = modality or {**ZERO_SHOT_TASKS, **CAPTIONING_TASKS}.get(self.task)
        if modality is None:
            raise ValueError(
                f"say which modality the input is: modality=... (one of {list(specs)}) or a dict keyed by modality"
            )
        if modality not in specs:
            raise ValueError(f"modality must be one of {list(specs)}, got {modality!r}")
        return {modality: item}

    def media_inputs(
        self, media: Mapping[str, Any], sampling_rate: int | None, text: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Model inputs of a one-item batch of every modality in `media` (and of `text`, when given)."""
        specs = self.processor.modality_specs
        arguments = {specs[name].processor_argument: [value] for name, value in media.items()}
        return dict(self.processor(text=text, **arguments, sampling_rate=sampling_rate, return_tensors="pt"))

    def embed_media(self, inputs: Mapping[str, torch.Tensor], modalities: tuple[str, ...]) -> torch.Tensor:
        """Normalised embedding `(1, P)` of one modality, or of several through their fused head."""
        model = self.model
        inputs = {key: value.to(self.device, model.dtype) for key, value in inputs.items()}
        if len(modalities) == 1:
            name = modalities[0]
            return F.normalize(
                model.get_modality_features(name, inputs[model.config.modality_specs[name].input_name]).pooler_output,
                dim=-1,
            )
        return F.normalize(model.get_fused_features(**inputs).pooler_output, dim=-1)

    def embed_text(self, text: list[str]) -> torch.Tensor:
        """Normalised text embeddings `(len(text), P)`."""
        encoded = self.processor(text=text, return_tensors="pt")
        ids, mask = encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)
        return F.normalize(self.model.get_text_features(ids, mask).pooler_output, dim=-1)


class MiCoZeroShotClassificationPipeline(MiCoPipelineMixin, Pipeline):
    """Zero-shot classification of any MiCo modality against `candidate_labels`.

    Each label is written into a prompt (`hypothesis_template`, default per modality: "a video of {}.") and scored as
    the model was trained: cosine similarity of the normalised embeddings divided by the temperature, softmax over the
    labels. An input is a value of the task's modality (a path, array, PIL image, frames...), or of `modality=` for
    `zero-shot-multimodal-classification`, or a dict `{"video": path, "audio": path}` classified through the fused
    head of exactly those modalities (`va`).
    """

    def _sanitize_parameters(
        self,
        candidate_labels: list[str] | None = None,
        hypothesis_template: str | None = None,
        modality: str | None = None,
        sampling_rate: int | None = None,
        **kwargs: Any,
    ) -> tuple[dict, dict, dict]:
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(kwargs)}")
        preprocess = {"modality": modality, "sampling_rate": sampling_rate, "hypothesis_template": hypothesis_template}
        if candidate_labels is not None:
            preprocess["candidate_labels"] = candidate_labels
        return preprocess, {}, {}

    def __call__(self, inputs: Any, candidate_labels: list[str] | None = None, **kwargs: Any) -> Any:
        """Classify one input (or a list of inputs) among `candidate_labels`; returns `[{"score", "label"}, ...]`
        best first (a list of those for a list of inputs)."""
        if not candidate_labels or isinstance(candidate_labels, str):
            raise ValueError(f"candidate_labels must be a non-empty list of strings, got {candidate_labels!r}")
        return super().__call__(inputs, candidate_labels=list(candidate_labels), **kwargs)

    def preprocess(
        self,
        item: Any,
        candidate_labels: list[str],
        hypothesis_template: str | None = None,
        modality: str | None = None,
        sampling_rate: int | None = None,
    ) -> dict[str, Any]:
        media = self.media_of(item, modality)
        modalities = tuple(media)
        template = hypothesis_template or default_template(modalities)
        if "{}" not in template:
            raise ValueError(f"hypothesis_template must contain '{{}}' for the label, got {template!r}")
        prompts = [template.format(label) for label in candidate_labels]
        return {
            "labels": candidate_labels,
            "prompts": prompts,
            "modalities": modalities,
            "media": self.media_inputs(media, sampling_rate),
        }

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        media = self.embed_media(model_inputs["media"], model_inputs["modalities"])
        text = self.embed_text(model_inputs["prompts"])
        logits = media @ text.t() / self.model.temperature
        return {"labels": model_inputs["labels"], "logits": logits[0]}

    def postprocess(self, model_outputs: dict[str, Any]) -> list[dict[str, Any]]:
        scores = model_outputs["logits"].float().softmax(dim=-1).tolist()
        ranked = sorted(zip(scores, model_outputs["labels"]), key=lambda pair: -pair[0])
        return [{"score": score, "label": label} for score, label in ranked]


class MiCoFeatureExtractionPipeline(MiCoPipelineMixin, Pipeline):
    """The normalised contrastive embedding `(projection_dim,)` of a text (a string) or of any modality: a value with
    `modality=`, or a dict keyed by modality names (several give the fused head's embedding). Returns a list of floats,
    or a tensor with `return_tensors=True`."""

    def _sanitize_parameters(
        self, modality: str | None = None, sampling_rate: int | None = None, return_tensors: bool = False, **kwargs
    ) -> tuple[dict, dict, dict]:
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(kwargs)}")
        return {"modality": modality, "sampling_rate": sampling_rate}, {}, {"return_tensors": return_tensors}

    def preprocess(self, item: Any, modality: str | None = None, sampling_rate: int | None = None) -> dict[str, Any]:
        if isinstance(item, str) and modality is None:
            return {"text": [item]}
        media = self.media_of(item, modality)
        return {"modalities": tuple(media), "media": self.media_inputs(media, sampling_rate)}

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        if "text" in model_inputs:
            return {"embedding": self.embed_text(model_inputs["text"])[0]}
        return {"embedding": self.embed_media(model_inputs["media"], model_inputs["modalities"])[0]}

    def postprocess(self, model_outputs: dict[str, torch.Tensor], return_tensors: bool = False) -> Any:
        embedding = model_outputs["embedding"]
        return embedding if return_tensors else embedding.tolist()


class MiCoCaptioningPipeline(MiCoPipelineMixin, Pipeline):
    """Captions of a video, an audio clip or any configured modality (`modality=` for `multimodal-to-text`), or of a
    dict of modalities captioned together (`{"video": path, "audio": path}`: a video with its sound), by
    [`MiCoForConditionalGeneration.generate`]: the same tokens as the model's own captioning
    (`modeling_mico.captioning.caption_files`) with the same generation settings — the model's generation config (the
    release's 3 beams) unless the call sets others (`max_new_tokens=`, `num_beams=`, `generate_kwargs={...}`).
    `question=` is read as MiCo's question-answering prefix. Returns `[{"generated_text": caption}]` (one per returned
    sequence), or `[{"generated_token_ids": ids}]` with `return_tensors=True` (prefix, `[CLS]` and the tokens)."""

    _pipeline_calls_generate = True
    # Generation parameters a call may pass directly (as at construction, where the base class sets them aside).
    GENERATION_KEYS = frozenset(key for key in vars(GenerationConfig()) if not key.startswith("_"))

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not self.model.can_generate():
            raise ValueError(
                f"{self.task or type(self).__name__} needs a captioning model (MiCoForConditionalGeneration, "
                f"AutoModelForImageTextToText), got {type(self.model).__name__}"
            )

    def _sanitize_parameters(
        self,
        modality: str | None = None,
        sampling_rate: int | None = None,
        question: str | None = None,
        generate_kwargs: dict[str, Any] | None = None,
        return_tensors: bool = False,
        **kwargs: Any,
    ) -> tuple[dict, dict, dict]:
        unknown = sorted(set(kwargs) - self.GENERATION_KEYS)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {unknown}")
        if question is not None and (not isinstance(question, str) or not question):
            raise ValueError(f"question must be a non-empty string, got {question!r}")
        preprocess = {"modality": modality, "sampling_rate": sampling_rate, "question": question}
        forward = {"generate_kwargs": {**(generate_kwargs or {}), **kwargs}}
        return preprocess, forward, {"return_tensors": return_tensors}

    def preprocess(
        self, item: Any, modality: str | None = None, sampling_rate: int | None = None, question: str | None = None
    ) -> dict[str, Any]:
        inputs = self.media_inputs(self.media_of(item, modality), sampling_rate, text=question)
        return {"inputs": inputs, "prefix_length": inputs["input_ids"].shape[1] if question is not None else 0}

    def _forward(self, model_inputs: dict[str, Any], generate_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        dtype = self.model.dtype
        inputs = {
            key: value.to(self.device, dtype) if value.is_floating_point() else value.to(self.device)
            for key, value in model_inputs["inputs"].items()
        }
        generate_kwargs = self._prepare_generate_kwargs(dict(generate_kwargs or {}), return_dict_in_generate=False)
        return {
            "ids": self.model.generate(**inputs, **generate_kwargs),
            "prefix_length": model_inputs["prefix_length"],
        }

    def postprocess(self, model_outputs: dict[str, Any], return_tensors: bool = False) -> list[dict[str, Any]]:
        if return_tensors:
            return [{"generated_token_ids": ids} for ids in model_outputs["ids"]]
        answers = model_outputs["ids"][:, model_outputs["prefix_length"] :]
        return [{"generated_text": text.strip()} for text in self.processor.batch_decode(answers)]


def custom_pipelines() -> dict[str, dict[str, Any]]:
    """The `custom_pipelines` entry of a MiCo config.json: task -> this module's class, loaded with `AutoModel` (the
    captioning tasks with `AutoModelForImageTextToText`, i.e. `MiCoForConditionalGeneration`)."""
    module = __name__.rpartition(".")[2]
    entries = {
        task: {"impl": f"{module}.{MiCoZeroShotClassificationPipeline.__name__}", "pt": ["AutoModel"]}
        for task in ZERO_SHOT_TASKS
    }
    entries[FEATURE_EXTRACTION_TASK] = {
        "impl": f"{module}.{MiCoFeatureExtractionPipeline.__name__}",
        "pt": ["AutoModel"],
    }
    for task in CAPTIONING_TASKS:
        entries[task] = {
            "impl": f"{module}.{MiCoCaptioningPipeline.__name__}",
            "pt": ["AutoModelForImageTextToText"],
        }
    for entry in entries.values():
        entry["type"] = "multimodal"
    return entries


def register_pipelines() -> None:
    """Register the tasks Transformers lacks, so that `pipeline(task, model=<MiCo model object>, processor=...)` works
    after `import modeling_mico` (the zero-shot audio task keeps Transformers' own pipeline for other models)."""
    for task in ZERO_SHOT_TASKS:
        if task != "zero-shot-audio-classification":
            PIPELINE_REGISTRY.register_pipeline(task, MiCoZeroShotClassificationPipeline, AutoModel, type="multimodal")
    PIPELINE_REGISTRY.register_pipeline(
        FEATURE_EXTRACTION_TASK, MiCoFeatureExtractionPipeline, AutoModel, type="multimodal"
    )
    for task in CAPTIONING_TASKS:
        PIPELINE_REGISTRY.register_pipeline(
            task, MiCoCaptioningPipeline, AutoModelForImageTextToText, type="multimodal"
        )


__all__ = [
    "CAPTIONING_TASKS",
    "DEFAULT_TEMPLATES",
    "MiCoCaptioningPipeline",
    "MiCoFeatureExtractionPipeline",
    "MiCoZeroShotClassificationPipeline",
    "custom_pipelines",
    "register_pipelines",
]
