"""`MiCoProcessor`: one call that turns text and every modality of the registry into MiCo inputs.

It wraps a BERT WordPiece tokenizer (lower-cased `bert-base-uncased`, bundled in `assets/`), a
`MiCoImageProcessor` (images and image-like maps, depth-like maps), a `MiCoVideoProcessor` (frame sampling) and a
`MiCoFeatureExtractor` (audio spectrogram slices), reproducing the preprocessing the released model was trained
with. Which modalities it takes, under which keyword, and what it produces comes from the modality registry
(`configuration_mico.ModalitySpec`): every built-in modality plus the ones declared in its `modalities` setting,
dispatched by `layout`. Every setting (frames, mel bins, slices, slice length, image size, training-mode sampling
and its seed) can be overridden per call and is saved by `save_pretrained`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoProcessor, AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging

from .configuration_mico import BUILTIN_MODALITIES, ModalitySpec, resolve_modalities
from .feature_extraction_mico import MiCoFeatureExtractor, is_single_clip
from .image_processing_mico import MiCoImageProcessor, check_positive, first_set, is_single_image
from .video_processing_mico import MiCoVideoProcessor, is_single_video, make_generator


if TYPE_CHECKING:
    from .configuration_mico import MiCoConfig


logger = logging.get_logger(__name__)

DEFAULT_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bert-base-uncased")

# Keywords of `MiCoProcessor.__call__` that are not modalities: no modality may take one as its argument.
CALL_SETTINGS = (
    "text",
    "sampling_rate",
    "num_frames",
    "num_mel_bins",
    "num_slices",
    "target_length",
    "image_size",
    "training",
    "seed",
    "max_length",
    "padding",
    "truncation",
    "return_tensors",
)


def load_default_tokenizer() -> PreTrainedTokenizerBase:
    """The lower-cased BERT WordPiece tokenizer (fast) bundled with the package; no download."""
    return AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR)


def processor_modalities(declarations: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, ModalitySpec]:
    """The modalities a processor takes: the declared ones (in `MiCoConfig.modalities` format, resolved by
    `resolve_modalities`) plus every built-in modality that does not share an input name or processor argument
    with a declared one, built-in modalities first."""
    if not isinstance(declarations or {}, Mapping) or not all(
        isinstance(fields, Mapping) for fields in (declarations or {}).values()
    ):
        raise ValueError(f"modalities must map modality names to dicts of ModalitySpec fields, got {declarations!r}")
    declarations = {name: dict(fields) for name, fields in (declarations or {}).items()}
    encoders = [
        fields.get("encoder", BUILTIN_MODALITIES[name].encoder if name in BUILTIN_MODALITIES else name)
        for name, fields in declarations.items()
    ]
    declared = resolve_modalities(dict.fromkeys(encoders), declarations)
    taken = {
        (field, getattr(spec, field)) for spec in declared.values() for field in ("input_name", "processor_argument")
    }
    specs = {
        name: declared.get(name, spec)
        for name, spec in BUILTIN_MODALITIES.items()
        if name in declared
        or not {("input_name", spec.input_name), ("processor_argument", spec.processor_argument)} & taken
    }
    specs.update((name, spec) for name, spec in declared.items() if name not in specs)
    reserved = [spec.processor_argument for spec in specs.values() if spec.processor_argument in CALL_SETTINGS]
    if reserved:
        raise ValueError(
            f"processor arguments {reserved} are settings of MiCoProcessor; declare another `processor_argument`"
        )
    return specs


def batch_size(name: str, inputs: Any, layout: str | None = None) -> int:
    """Number of items of one input (`text` or a modality of `layout`), by the single-vs-batch rules the
    sub-processors use."""
    if name == "text":
        single = isinstance(inputs, str)
    elif layout == "video":
        single = is_single_video(inputs)
    elif layout == "spectrogram":
        single = is_single_clip(inputs)
    else:
        single = is_single_image(inputs)
    if single:
        return 1
    if not isinstance(inputs, (list, tuple)) or len(inputs) == 0:
        raise ValueError(f"{name} must be one input or a non-empty list of inputs, got {type(inputs).__name__}")
    return len(inputs)


def check_batch_sizes(inputs: Mapping[str, Any], layouts: Mapping[str, str]) -> None:
    """All given media (keyed by processor argument) must hold the same number of items; `text` may hold another
    number (the candidate labels of zero-shot classification, as `CLIPProcessor` allows) but must be well formed.
    `layouts` maps each modality argument to its layout."""
    sizes = {name: batch_size(name, value, layouts.get(name)) for name, value in inputs.items() if value is not None}
    media = {name: size for name, size in sizes.items() if name != "text"}
    if len(set(media.values())) > 1:
        raise ValueError(f"all media inputs must have the same batch size, got {media}")


def is_empty_prompt(text: str | list[str]) -> bool:
    """Whether `text` is an empty prompt: `""`, or a list of nothing but `""`."""
    return text == "" or (isinstance(text, (list, tuple)) and len(text) > 0 and all(item == "" for item in text))


def empty_prompt(text: str | list[str]) -> dict[str, torch.Tensor]:
    """Zero-length `input_ids` / `attention_mask` `(batch, 0)` for an empty prompt given with media: no text prefix,
    so `MiCoForConditionalGeneration.generate` gives MiCo's own caption (as without `input_ids`). Transformers'
    `image-text-to-text` pipeline always passes a text; `text=""` asks for the plain caption."""
    ids = torch.zeros((1 if isinstance(text, str) else len(text), 0), dtype=torch.long)
    return {"input_ids": ids, "attention_mask": ids.clone()}


class MiCoProcessor(ProcessorMixin):
    r"""
    Processor of MiCo. `MiCoProcessor()` builds the release processor (bundled tokenizer, 224 px images,
    4 frames, 64 mel bins, 3 slices of 224 frames, evaluation sampling); `MiCoProcessor.from_config(config)` the one
    matching a model configuration.

    `processor(text=..., images=..., videos=..., audio=..., depth=..., normals=..., <declared>=...)` returns a
    `BatchFeature` with `input_ids`, `attention_mask` (padded to `max_length` 40, truncated) and, for each modality
    given, its model input (`ModalitySpec.input_name`), laid out by the modality's `layout`:

    * `"image"`: RGB images -> `(B, 1, 3, H, W)`; `pixel_values` (images) is `(B, 3, H, W)` as in every Transformers
      vision model. Normal maps (`normals` -> `normal_values`) and declared modalities (`thermal` ->
      `thermal_values`) are image-like by default.
    * `"depth"`: single-channel maps min-max scaled to [0, 1] and copied to 3 channels -> `(B, 1, 3, H, W)`
      (`depth_values`).
    * `"video"`: `num_frames` frames sampled per clip -> `(B, T, 3, H, W)` (`pixel_values_videos`).
    * `"spectrogram"`: `num_slices` log-mel slices per clip -> `(B, S, target_length, 224)` (`input_features`).

    Media may be paths, arrays, PIL images or what 🤗 `datasets` gives (`{"path", "bytes"}` and `{"array",
    "sampling_rate"}` dicts, torchcodec decoders); `audio=` also takes a video file (its sound track). Media given
    together must have the same batch size; `text` may hold another number of items (candidate labels). Settings of 0
    or less are refused by name; texts longer than `max_length` are truncated with a warning (refused with
    `truncation=False`). With media, an empty `text=""` is an empty prompt: zero-length `input_ids`, so that
    `generate` gives MiCo's own caption (Transformers' `image-text-to-text` pipeline always passes a text). See
    `docs/processing.md`.

    Args:
        image_processor ([`MiCoImageProcessor`], *optional*): image-, depth- and video-frame transform.
        feature_extractor ([`MiCoFeatureExtractor`], *optional*): audio.
        tokenizer ([`PreTrainedTokenizerBase`], *optional*): defaults to the bundled `bert-base-uncased`.
        num_frames (`int`, *optional*): frames sampled per video; `None` takes each video-like modality's
            `num_frames` (4 for `video`).
        training (`bool`, *optional*, defaults to `False`): random frame / slice within each segment.
        seed (`int`, *optional*): seed of the per-call generator used in training mode (`None`: torch's RNG).
        max_length (`int`, *optional*, defaults to 40): caption length (`MiCoConfig.max_caption_length`).
        modalities (`dict[str, dict]`, *optional*): modalities taken besides the built-in ones (or changes to
            built-in ones), in the format of `MiCoConfig.modalities`: any field of [`ModalitySpec`].

    Example:

    ```python
    >>> import numpy as np
    >>> from modeling_mico import MiCoConfig, MiCoProcessor

    >>> config = MiCoConfig(knowledge_modalities={"vision": 8, "audio": 4, "thermal": 1})
    >>> processor = MiCoProcessor.from_config(config)
    >>> processor(thermal=np.zeros((32, 32), dtype=np.uint8))["thermal_values"].shape
    torch.Size([1, 1, 3, 224, 224])

    ```
    """

    def __init__(
        self,
        image_processor: MiCoImageProcessor | None = None,
        feature_extractor: MiCoFeatureExtractor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        num_frames: int | None = None,
        training: bool = False,
        seed: int | None = None,
        max_length: int = 40,
        modalities: dict[str, dict] | None = None,
    ):
        super().__init__(
            image_processor if image_processor is not None else MiCoImageProcessor(),
            feature_extractor if feature_extractor is not None else MiCoFeatureExtractor(),
            tokenizer if tokenizer is not None else load_default_tokenizer(),
        )
        self.num_frames = check_positive("num_frames", num_frames)
        self.training = bool(training)
        self.seed = seed
        self.max_length = check_positive("max_length", max_length)
        processor_modalities(modalities)  # refuse bad declarations now, not at the first call
        self.modalities = {name: dict(fields) for name, fields in (modalities or {}).items()}

    @classmethod
    def from_default(cls, **settings: Any) -> MiCoProcessor:
        """The release processor with the bundled tokenizer; `settings` override `num_frames`, `training`, ..."""
        return cls(**settings)

    @classmethod
    def from_config(
        cls, config: MiCoConfig, num_frames: int | None = None, num_slices: int | None = None, **settings: Any
    ) -> MiCoProcessor:
        """The default processor for a model configuration: images, frames and maps at the model's `image_size`,
        audio slices of `image_size` frames x `image_size` mel bins (the release's 224 x 224), captions of
        `config.max_caption_length` tokens, and every modality of `config.modality_specs` (declared ones and
        knowledge modalities that are not built in, such as an image-like `thermal`).

        `num_frames` / `num_slices` fix the frames of every video and the slices of every clip (default: each
        modality's `num_frames`); `settings` are further `MiCoProcessor` arguments (`training`, `seed`, ...).
        """
        size = config.vision_config.image_size
        declared = {
            name: {key: value for key, value in spec.to_dict().items() if key != "name"}
            for name, spec in config.modality_specs.items()
            if spec != BUILTIN_MODALITIES.get(name)
        }
        return cls(
            image_processor=MiCoImageProcessor(image_size=size),
            feature_extractor=MiCoFeatureExtractor(target_length=size, feature_size=size, num_slices=num_slices),
            max_length=config.max_caption_length,
            num_frames=num_frames,
            modalities={**declared, **settings.pop("modalities", {})},
            **settings,
        )

    def check_matches(self, config: MiCoConfig) -> None:
        """Refuse this processor for a model it would feed wrongly: images or audio slices not of the model's input
        size, or a modality of the model that it does not produce (or produces under another name or layout)."""
        size = config.vision_config.image_size
        found = {
            "image_processor.image_size": self.image_processor.image_size,
            "feature_extractor.target_length": self.feature_extractor.target_length,
            "feature_extractor.feature_size": self.feature_extractor.feature_size,
        }
        wrong = {name: value for name, value in found.items() if value != size}
        if wrong:
            raise ValueError(f"the model takes {size}x{size} inputs but the processor has {wrong}")
        ours = self.modality_specs
        for name, spec in config.modality_specs.items():
            mine = ours.get(name)
            if mine is None:
                raise ValueError(
                    f"the model takes the modality {name!r} ({spec.input_name}) but the processor does not; build the "
                    "processor with MiCoProcessor.from_config(config) or declare it in `modalities`"
                )
            differences = {
                field: (getattr(mine, field), getattr(spec, field))
                for field in ("input_name", "processor_argument", "layout")
                if getattr(mine, field) != getattr(spec, field)
            }
            if differences:
                raise ValueError(
                    f"the processor's modality {name!r} differs from the model's (processor, model): {differences}"
                )

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
    def modality_specs(self) -> dict[str, ModalitySpec]:
        """Every modality this processor takes, by name: the built-in ones and those declared in `modalities`."""
        return processor_modalities(self.modalities)

    @property
    def video_processor(self) -> MiCoVideoProcessor:
        """Frame sampler sharing this processor's image transform and settings."""
        video = self.modality_specs.get("video", BUILTIN_MODALITIES["video"])
        num_frames = first_set(self.num_frames, video.num_frames)
        return MiCoVideoProcessor(num_frames, self.training, self.image_processor)

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
        **modality_inputs: Any,
    ) -> BatchFeature:
        """Preprocess text and every given modality; `modality_inputs` are the arguments of declared modalities
        (`thermal=...`). Per-call settings override the saved ones for this call only."""
        specs = {spec.processor_argument: spec for spec in self.modality_specs.values()}
        named = {"images": images, "videos": videos, "audio": audio, "depth": depth, "normals": normals}
        unknown = [key for key in modality_inputs if key not in specs]
        unknown += [key for key, value in named.items() if value is not None and key not in specs]
        if unknown:
            raise TypeError(
                f"MiCoProcessor got unexpected arguments {unknown}; it takes text and the modalities "
                f"{list(specs)} (declare others in `modalities`)"
            )
        given = {**named, **modality_inputs}
        media = {argument: given[argument] for argument in specs if given.get(argument) is not None}
        if text is None and not media:
            raise ValueError(f"give at least one of {', '.join(['text', *specs])}")
        check_batch_sizes({"text": text, **media}, {argument: spec.layout for argument, spec in specs.items()})
        settings = {"sampling_rate": sampling_rate, "num_frames": num_frames, "num_mel_bins": num_mel_bins}
        settings.update(num_slices=num_slices, target_length=target_length, image_size=image_size)
        for name, value in settings.items():  # refused even when no input of this call uses them
            check_positive(name, value)
        training = self.training if training is None else bool(training)
        generator = make_generator(first_set(seed, self.seed))
        data: dict[str, Any] = {}
        if text is not None and media and is_empty_prompt(text):
            data.update(empty_prompt(text))
        elif text is not None:
            max_length = first_set(check_positive("max_length", max_length), self.max_length)
            data.update(self._tokenize(text, max_length, padding, truncation))
        for argument, value in media.items():
            spec = specs[argument]
            if spec.layout == "image":
                pixels = self.image_processor.image_pixels(value, image_size, what=argument)
                # `pixel_values` keeps Transformers' (B, 3, H, W); other image-like maps carry one frame
                data[spec.input_name] = pixels if spec.input_name == "pixel_values" else pixels[:, None]
            elif spec.layout == "depth":
                data[spec.input_name] = self.image_processor.depth_pixels(value, image_size, what=argument)[:, None]
            elif spec.layout == "video":
                frames = first_set(num_frames, self.num_frames, spec.num_frames)
                sampler = MiCoVideoProcessor(frames, training, self.image_processor)
                data[spec.input_name] = sampler.sample(value, frames, training, generator, image_size, argument)[0]
            else:  # "spectrogram"
                data[spec.input_name] = self.feature_extractor.slices(
                    value,
                    sampling_rate=sampling_rate,
                    num_mel_bins=num_mel_bins,
                    num_slices=first_set(num_slices, self.feature_extractor.num_slices, spec.num_frames),
                    target_length=target_length,
                    training=training,
                    generator=generator,
                    what=argument,
                )
        return BatchFeature(data, tensor_type=return_tensors)

    def _tokenize(self, text: str | list[str], max_length: int, padding: bool | str, truncation: bool) -> dict:
        """Tokenize captions to `input_ids` / `attention_mask` (no token type ids, as the model uses none).

        A text longer than `max_length` tokens is truncated with a warning naming it (`truncation=True`, the
        default) or refused (`truncation=False`): a longer row would not fit the padded batch nor the model's
        positions."""
        if not isinstance(text, str) and not all(isinstance(t, str) for t in text):
            raise ValueError("text must be a string or a list of strings")
        texts = [text] if isinstance(text, str) else list(text)
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        long = {f"text[{index}]": length for index, length in enumerate(lengths) if length > max_length}
        if long and not truncation:
            raise ValueError(
                f"{long} tokens exceed max_length={max_length}; shorten them, raise max_length or pass truncation=True"
            )
        if long:
            logger.warning(f"truncated to max_length={max_length} tokens: {long} (tokens before truncation)")
        encoded = self.tokenizer(
            text,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_token_type_ids=False,
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
        """Every input name this processor can produce: the text inputs, then each modality's input."""
        return ["input_ids", "attention_mask", *(spec.input_name for spec in self.modality_specs.values())]


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
