"""`MiCoProcessor`: one call that turns text, images, videos, audio, depth and normal maps into MiCo inputs.

It wraps a BERT WordPiece tokenizer (lower-cased `bert-base-uncased`, bundled in `assets/`), a
`MiCoImageProcessor` (images, depth, normals), a `MiCoVideoProcessor` (frame sampling) and a
`MiCoFeatureExtractor` (audio spectrogram slices), reproducing the preprocessing the released model
was trained with. Every setting (frames, mel bins, slices, slice length, image size, training-mode
sampling and its seed) can be overridden per call and is saved by `save_pretrained`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoProcessor, AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .feature_extraction_mico import MiCoFeatureExtractor
from .image_processing_mico import MiCoImageProcessor, is_single_image
from .video_processing_mico import MiCoVideoProcessor, is_single_video, make_generator


DEFAULT_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bert-base-uncased")


def load_default_tokenizer() -> PreTrainedTokenizerBase:
    """The lower-cased BERT WordPiece tokenizer (fast) bundled with the package; no download."""
    return AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR)


def batch_size(name: str, inputs: Any) -> int:
    """Number of items of one modality's input, by the same single-vs-batch rules the sub-processors use."""
    if name == "text":
        single = isinstance(inputs, str)
    elif name == "videos":
        single = is_single_video(inputs)
    elif name == "audio":
        single = isinstance(inputs, (str, os.PathLike, dict, np.ndarray, torch.Tensor))
    else:
        single = is_single_image(inputs)
    if single:
        return 1
    if not isinstance(inputs, (list, tuple)) or len(inputs) == 0:
        raise ValueError(f"{name} must be one input or a non-empty list of inputs, got {type(inputs).__name__}")
    return len(inputs)


def check_batch_sizes(inputs: dict[str, Any]) -> None:
    """All given modalities must hold the same number of items (a single text is not broadcast)."""
    sizes = {name: batch_size(name, value) for name, value in inputs.items() if value is not None}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"all inputs must have the same batch size, got {sizes}")


class MiCoProcessor(ProcessorMixin):
    r"""
    Processor of MiCo. `MiCoProcessor()` builds the release processor (bundled tokenizer, 224 px images,
    4 frames, 64 mel bins, 3 slices of 224 frames, evaluation sampling).

    `processor(text=..., images=..., videos=..., audio=..., depth=..., normals=...)` returns a `BatchFeature`
    with `input_ids`, `attention_mask` (padded to `max_length` 40, truncated), `pixel_values` (B, 3, H, W),
    `pixel_values_videos` (B, T, 3, H, W), `input_features` (B, num_slices, target_length, 224),
    `depth_values` (B, 1, 3, H, W) and `normal_values` (B, 1, 3, H, W) for the modalities given. When several
    modalities are given they must have the same batch size.

    Args:
        image_processor ([`MiCoImageProcessor`], *optional*): images, depth and normal maps (and video frames).
        feature_extractor ([`MiCoFeatureExtractor`], *optional*): audio.
        tokenizer ([`PreTrainedTokenizerBase`], *optional*): defaults to the bundled `bert-base-uncased`.
        num_frames (`int`, *optional*, defaults to 4): frames sampled per video.
        training (`bool`, *optional*, defaults to `False`): random frame / slice within each segment.
        seed (`int`, *optional*): seed of the per-call generator used in training mode (`None`: torch's RNG).
        max_length (`int`, *optional*, defaults to 40): caption length (`MiCoConfig.max_caption_length`).
    """

    def __init__(
        self,
        image_processor: MiCoImageProcessor | None = None,
        feature_extractor: MiCoFeatureExtractor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        num_frames: int = 4,
        training: bool = False,
        seed: int | None = None,
        max_length: int = 40,
    ):
        super().__init__(
            image_processor if image_processor is not None else MiCoImageProcessor(),
            feature_extractor if feature_extractor is not None else MiCoFeatureExtractor(),
            tokenizer if tokenizer is not None else load_default_tokenizer(),
        )
        self.num_frames = int(num_frames)
        self.training = bool(training)
        self.seed = seed
        self.max_length = int(max_length)

    @classmethod
    def from_default(cls, **settings: Any) -> MiCoProcessor:
        """The release processor with the bundled tokenizer; `settings` override `num_frames`, `training`, ..."""
        return cls(**settings)

    @classmethod
    def _get_arguments_from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, processor_dict: dict | None = None, **kwargs: Any
    ) -> list:
        """Rebuild the sub-processors from `processor_config.json` with MiCo's classes (no Auto-class lookup, so
        `MiCoProcessor.from_pretrained` works before registration) and the tokenizer from the folder."""
        processor_dict = processor_dict or {}
        return [
            MiCoImageProcessor.from_dict(processor_dict.get("image_processor", {})),
            MiCoFeatureExtractor.from_dict(dict(processor_dict.get("feature_extractor", {}))),
            cls._load_tokenizer_from_pretrained("tokenizer", pretrained_model_name_or_path, **kwargs),
        ]

    @property
    def video_processor(self) -> MiCoVideoProcessor:
        """Frame sampler sharing this processor's image transform and settings."""
        return MiCoVideoProcessor(self.num_frames, self.training, self.image_processor)

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        videos: Any = None,
        audio: Any = None,
        depth: Any = None,
        normals: Any = None,
        *,
        sampling_rate: int | None = None,
        num_frames: int | None = None,
        num_mel_bins: int | None = None,
        num_slices: int | None = None,
        target_length: int | None = None,
        image_size: int | None = None,
        training: bool | None = None,
        seed: int | None = None,
        max_length: int | None = None,
        padding: bool | str = "max_length",
        truncation: bool = True,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Preprocess every given modality; per-call settings override the saved ones for this call only."""
        inputs = {"text": text, "images": images, "videos": videos, "audio": audio, "depth": depth, "normals": normals}
        if all(value is None for value in inputs.values()):
            raise ValueError("give at least one of text, images, videos, audio, depth or normals")
        check_batch_sizes(inputs)
        training = self.training if training is None else bool(training)
        generator = make_generator(self.seed if seed is None else seed)
        data: dict[str, Any] = {}
        if text is not None:
            data.update(self._tokenize(text, max_length or self.max_length, padding, truncation))
        if images is not None:
            data.update(self.image_processor.preprocess(images, image_size=image_size))
        if videos is not None:
            video_processor = MiCoVideoProcessor(num_frames or self.num_frames, training, self.image_processor)
            data.update(video_processor(videos, generator=generator, image_size=image_size))
        if audio is not None:
            data.update(
                self.feature_extractor(
                    audio, sampling_rate=sampling_rate, num_mel_bins=num_mel_bins, num_slices=num_slices,
                    target_length=target_length, training=training, generator=generator,
                )
            )
        if depth is not None:
            data.update(self.image_processor.preprocess_depth(depth, image_size=image_size))
        if normals is not None:
            data.update(self.image_processor.preprocess_normals(normals, image_size=image_size))
        return BatchFeature(data, tensor_type=return_tensors)

    def _tokenize(self, text: str | list[str], max_length: int, padding: bool | str, truncation: bool) -> dict:
        """Tokenize captions to `input_ids` / `attention_mask` (no token type ids, as the model uses none)."""
        if not isinstance(text, str) and not all(isinstance(t, str) for t in text):
            raise ValueError("text must be a string or a list of strings")
        encoded = self.tokenizer(
            text, padding=padding, truncation=truncation, max_length=max_length, return_token_type_ids=False,
            return_tensors="pt",
        )
        return dict(encoded)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True, **kwargs: Any) -> list[str]:
        """Decode generated caption ids to strings, dropping `[CLS]`, `[SEP]` and `[PAD]` by default."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, token_ids: Any, skip_special_tokens: bool = True, **kwargs: Any) -> str:
        """Decode one caption's ids to a string, dropping special tokens by default."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        """Every input name this processor can produce."""
        return [
            "input_ids", "attention_mask", "pixel_values", "pixel_values_videos", "input_features", "depth_values",
            "normal_values",
        ]


def register_processing_auto_classes() -> None:
    """Register the processor classes with the Auto classes (under `MiCoConfig`) and for remote-code saving.

    After this, `AutoProcessor` / `AutoImageProcessor` / `AutoFeatureExtractor` resolve MiCo's classes, and
    `save_pretrained` writes an `auto_map` plus the module files so the folder loads with `trust_remote_code`.
    """
    from .configuration_mico import MiCoConfig

    AutoProcessor.register(MiCoConfig, MiCoProcessor, exist_ok=True)
    AutoImageProcessor.register(MiCoConfig, image_processor_classes={"pil": MiCoImageProcessor}, exist_ok=True)
    AutoFeatureExtractor.register(MiCoConfig, MiCoFeatureExtractor, exist_ok=True)
    MiCoProcessor.register_for_auto_class("AutoProcessor")
    MiCoImageProcessor.register_for_auto_class("AutoImageProcessor")
    MiCoFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")


__all__ = ["MiCoProcessor", "register_processing_auto_classes"]
