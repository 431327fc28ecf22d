"""MiCo model configuration, size presets and the modality registry.

The *modality registry* declares every knowledge modality once: the model input that carries it, the processor
argument and annotation column that feed it, its file extensions, the letter that names it in pretraining tasks,
how many frames the processor samples and how its arrays are laid out. The processor, the data collator,
pretraining, retrieval evaluation, captioning and conversion all read it from here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# Modality registry
# --------------------------------------------------------------------------------------------------------------------

# How a modality's raw inputs become model arrays: RGB images `(B, 1, 3, H, W)`, single-channel maps min-max scaled
# and copied to 3 channels, clips of sampled frames `(B, T, 3, H, W)`, or log-mel spectrogram slices `(B, S, H, W)`.
LAYOUTS = ("image", "depth", "video", "spectrogram")

# Letter of the caption side of pretraining tasks, and of the subtitle (text) branch.
TEXT_LETTER = "t"
SUBTITLE = "subtitle"
SUBTITLE_LETTER = "s"


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
    r"""
    One knowledge modality as every part of the package sees it.

    Args:
        name (`str`): the user-facing name (`"image"`, `"video"`, `"audio"`, ...); names outputs such as
            `logits_per_text_<name>` and retrieval targets.
        encoder (`str`): the entry of `MiCoConfig.knowledge_modalities` whose bridge, frame and type embeddings and
            contrastive head encode it (`"vision"` for both images and videos).
        input_name (`str`): the model input carrying it (`pixel_values`, `input_features`, `<name>_values`).
        processor_argument (`str`): the `MiCoProcessor` keyword accepting it (`images`, `videos`, ...).
        column (`str`): the annotation / dataset column holding its files.
        extensions (`tuple[str]`): lower-case file extensions that route a file to this modality.
        letter (`str`): the letter naming its encoder in pretraining tasks (`"tv"`, `"tva"`, ...).
        num_frames (`int`): frames (or spectrogram slices) the processor samples per item by default.
        layout (`str`): one of `LAYOUTS`.
    """

    name: str
    encoder: str
    input_name: str
    processor_argument: str
    column: str
    extensions: tuple[str, ...]
    letter: str
    num_frames: int
    layout: str

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "extensions": list(self.extensions)}


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".m4a")

# The modalities of the release (and normal maps), in multimodal-context order.
BUILTIN_MODALITIES: dict[str, ModalitySpec] = {
    spec.name: spec
    for spec in (
        ModalitySpec("image", "vision", "pixel_values", "images", "image", IMAGE_EXTENSIONS, "v", 1, "image"),
        ModalitySpec("video", "vision", "pixel_values_videos", "videos", "video", VIDEO_EXTENSIONS, "v", 4, "video"),
        ModalitySpec("audio", "audio", "input_features", "audio", "audio", AUDIO_EXTENSIONS, "a", 3, "spectrogram"),
        ModalitySpec("depth", "depth", "depth_values", "depth", "depth", (".npy",), "d", 1, "depth"),
        ModalitySpec("normal", "normal", "normal_values", "normals", "normal", (), "n", 1, "image"),
    )
}

DEFAULT_NUM_FRAMES = {"image": 1, "depth": 1, "video": 4, "spectrogram": 3}


def _declared_spec(name: str, declaration: Mapping[str, Any], taken_letters: set[str]) -> ModalitySpec:
    """A modality declared in a configuration: every field not given is derived from its name and layout."""
    unknown = set(declaration) - {field.name for field in dataclasses.fields(ModalitySpec)} - {"name"}
    if unknown:
        raise ValueError(f"modalities[{name!r}] has unknown fields {sorted(unknown)}")
    base = BUILTIN_MODALITIES.get(name)
    layout = declaration.get("layout", base.layout if base else "image")
    if layout not in LAYOUTS:
        raise ValueError(f"modalities[{name!r}].layout must be one of {LAYOUTS}, got {layout!r}")
    letter = declaration.get("letter", base.letter if base else None)
    if letter is None:
        free = [c for c in name if c.isalpha() and c not in taken_letters]
        if not free:
            raise ValueError(f"modalities[{name!r}]: no free task letter in its name; declare one with `letter`")
        letter = free[0]
    defaults = {
        "encoder": base.encoder if base else name,
        "input_name": base.input_name if base else f"{name}_values",
        "processor_argument": base.processor_argument if base else name,
        "column": base.column if base else name,
        "extensions": base.extensions if base else (),
        "num_frames": base.num_frames if base else DEFAULT_NUM_FRAMES[layout],
    }
    fields = {**defaults, **declaration, "layout": layout, "letter": letter}
    fields["extensions"] = tuple(
        ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in fields["extensions"]
    )
    if not isinstance(fields["num_frames"], int) or fields["num_frames"] < 1:
        raise ValueError(f"modalities[{name!r}].num_frames must be a positive integer, got {fields['num_frames']!r}")
    return ModalitySpec(name=name, **fields)


def resolve_modalities(
    encoders: Iterable[str], declarations: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, ModalitySpec]:
    """The registry for a set of knowledge modalities (`MiCoConfig.knowledge_modalities`) and the declarations of
    modalities that are not built in (or override built-in fields), in multimodal-context order.

    A knowledge modality with neither a built-in entry nor a declaration becomes an image-like modality named after
    it (input `<name>_values`, processor argument and column `<name>`)."""
    encoders = list(encoders)
    declarations = dict(declarations or {})
    builtin_encoders = list(dict.fromkeys(spec.encoder for spec in BUILTIN_MODALITIES.values()))
    order = [e for e in builtin_encoders if e in encoders] + [e for e in encoders if e not in builtin_encoders]
    taken = {TEXT_LETTER, SUBTITLE_LETTER} | {
        spec.letter for spec in BUILTIN_MODALITIES.values() if spec.encoder in order
    }
    specs: dict[str, ModalitySpec] = {}
    for name, spec in BUILTIN_MODALITIES.items():
        if spec.encoder in encoders:
            specs[name] = _declared_spec(name, declarations.pop(name), taken) if name in declarations else spec
    for encoder in encoders:
        declared = [*(d.get("encoder", n) for n, d in declarations.items()), *(s.encoder for s in specs.values())]
        if encoder in builtin_encoders or encoder in declared:  # e.g. a built-in modality moved to its own encoder
            continue
        declarations[encoder] = {}
    for name, declaration in declarations.items():
        spec = _declared_spec(name, declaration, taken)
        if spec.encoder not in encoders:
            raise ValueError(
                f"modalities[{name!r}] is encoded by {spec.encoder!r}, which is not in knowledge_modalities {encoders}"
            )
        taken.add(spec.letter)
        specs[name] = spec
    _check_unique(specs)
    return {name: specs[name] for name in sorted(specs, key=lambda n: order.index(specs[n].encoder))}


def _check_unique(specs: Mapping[str, ModalitySpec]) -> None:
    """Input names, processor arguments and columns name one modality each; a letter names one encoder."""
    for field in ("input_name", "processor_argument", "column"):
        seen: dict[str, str] = {}
        for spec in specs.values():
            value = getattr(spec, field)
            if value in seen:
                raise ValueError(f"modalities {seen[value]!r} and {spec.name!r} share the {field} {value!r}")
            seen[value] = spec.name
    letters: dict[str, str] = {TEXT_LETTER: "text", SUBTITLE_LETTER: SUBTITLE}
    for spec in specs.values():
        if letters.setdefault(spec.letter, spec.encoder) != spec.encoder:
            raise ValueError(
                f"the task letter {spec.letter!r} of {spec.name!r} already names {letters[spec.letter]!r}"
            )


# --------------------------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------------------------

# Knowledge modality -> maximum number of frames (slices for audio) of its frame-embedding table.
DEFAULT_KNOWLEDGE_MODALITIES = {"vision": 8, "audio": 4, "depth": 4}

# Fused contrastive head -> the pooled features it concatenates, in order ("subtitle" is the text branch).
DEFAULT_FUSED_HEADS = {
    "va": ["vision", "audio"],
    "id": ["vision", "depth"],
    "vs": ["vision", "subtitle"],
    "vas": ["vision", "audio", "subtitle"],
}

# The pretraining losses; `<kind>_tasks` configures the tasks of each.
TASK_KINDS = ("contrastive", "matching", "caption")
DEFAULT_CONTRASTIVE_TASKS = ["tv", "ta", "td", "tva"]
DEFAULT_MATCHING_TASKS = ["tv", "ta", "tva"]
DEFAULT_CAPTION_TASKS = ["tv", "ta", "tva"]


def _check_positive(config: PreTrainedConfig, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{prefix}{name} must be an integer, got {value!r}")
        if value <= 0:
            raise ValueError(f"{prefix}{name} must be positive, got {value}")


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_heads(config: PreTrainedConfig, prefix: str) -> None:
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"{prefix}hidden_size ({config.hidden_size}) must be divisible by num_attention_heads "
            f"({config.num_attention_heads})"
        )


@strict
class MiCoVisionConfig(PreTrainedConfig):
    r"""
    Configuration of the EVA-CLIP vision transformer that MiCo shares across all knowledge modalities (images, video
    frames, audio spectrogram slices, depth and normal maps). The defaults describe the released EVA01-CLIP-g/14 tower.

    Args:
        hidden_size (`int`, *optional*, defaults to 1408):
            Width of the transformer.
        intermediate_size (`int`, *optional*, defaults to 6144):
            Width of the MLP (`int(1408 * 4.3637)`).
        num_hidden_layers (`int`, *optional*, defaults to 40):
            Number of pre-norm blocks.
        num_attention_heads (`int`, *optional*, defaults to 16):
            Attention heads per block.
        num_channels (`int`, *optional*, defaults to 3):
            Input channels.
        image_size (`int`, *optional*, defaults to 224):
            Input resolution; sets the position-embedding grid.
        patch_size (`int`, *optional*, defaults to 14):
            Side of the square patches.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            MLP activation (exact GELU).
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            LayerNorm epsilon.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on attention probabilities.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated-normal initialisation.

    Example:

    ```python
    >>> from modeling_mico import MiCoVisionConfig, MiCoVisionModel

    >>> config = MiCoVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    >>> model = MiCoVisionModel(config)
    ```"""

    model_type = "mico_vision_model"
    base_config_key = "vision_config"

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 40
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float | int = 0.0
    initializer_range: float = 0.02

    def validate_architecture(self):
        """Part of `@strict` validation: sizes are positive, heads divide the width, patches tile the image."""
        _check_positive(
            self,
            "vision_config.",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_channels",
            "image_size",
            "patch_size",
        )
        _check_heads(self, "vision_config.")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision_config.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )


@strict
class MiCoTextConfig(PreTrainedConfig):
    r"""
    Configuration of MiCo's text branch: a BERT encoder whose every layer carries a cross-attention block over the
    multimodal context. The defaults describe `bert-base-uncased` as used by the release.

    Args:
        vocab_size (`int`, *optional*, defaults to 30522):
            WordPiece vocabulary size.
        hidden_size (`int`, *optional*, defaults to 768):
            Width of the encoder.
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Number of layers.
        num_attention_heads (`int`, *optional*, defaults to 12):
            Attention heads of the self- and cross-attention blocks.
        intermediate_size (`int`, *optional*, defaults to 3072):
            Feed-forward width.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Feed-forward activation (exact GELU).
        hidden_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout on embeddings and sub-layer outputs.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout on attention probabilities.
        max_position_embeddings (`int`, *optional*, defaults to 512):
            Longest sequence.
        type_vocab_size (`int`, *optional*, defaults to 2):
            Token-type vocabulary.
        layer_norm_eps (`float`, *optional*, defaults to 1e-12):
            LayerNorm epsilon.
        encoder_hidden_size (`int`, *optional*):
            Width of the cross-attention keys and values; MiCo bridges every modality to the text width, so it
            defaults to `hidden_size`.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation.
        pad_token_id (`int`, *optional*, defaults to 0):
            `[PAD]` in the BERT vocabulary.
        bos_token_id (`int`, *optional*, defaults to 101):
            `[CLS]`, the first token of every caption.
        eos_token_id (`int`, *optional*, defaults to 102):
            `[SEP]`, which ends captions.
        mask_token_id (`int`, *optional*, defaults to 103):
            `[MASK]`, appended at every decoding step and used by the caption loss.
    """

    model_type = "mico_text_model"
    base_config_key = "text_config"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    encoder_hidden_size: int | None = None
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = 101
    eos_token_id: int | None = 102
    mask_token_id: int = 103

    def __post_init__(self, **kwargs):
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.hidden_size
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation: sizes are positive, heads divide the width, special ids are in the vocab."""
        _check_positive(
            self,
            "text_config.",
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "encoder_hidden_size",
        )
        _check_heads(self, "text_config.")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"text_config.{name} ({value}) must be a token id below vocab_size ({self.vocab_size})"
                )


@strict
class MiCoConfig(PreTrainedConfig):
    r"""
    Configuration of a full MiCo model. `MiCoConfig()` describes the released ViT-g/14 omni-modal model
    (`Yiyuan/MiCo-ViT-g-14-omnimodal-300k-b64K`).

    Args:
        vision_config (`dict` or [`MiCoVisionConfig`], *optional*):
            The shared knowledge-modality encoder.
        text_config (`dict` or [`MiCoTextConfig`], *optional*):
            The cross-attention BERT.
        projection_dim (`int`, *optional*, defaults to 512):
            Width of the contrastive embeddings.
        knowledge_modalities (`dict[str, int]`, *optional*):
            Every knowledge modality encoded by the vision tower and the size of its frame-embedding table
            (default `{"vision": 8, "audio": 4, "depth": 4}`). Adding an entry (`"normal": 2`, `"thermal": 1`)
            creates that modality's bridge, frame and type embeddings and contrastive head.
        modalities (`dict[str, dict]`, *optional*):
            Declarations of modalities that are not built in, or changes to built-in ones: any field of
            [`ModalitySpec`] (`layout`, `extensions`, `letter`, `num_frames`, `input_name`, ...). A knowledge
            modality without a declaration is image-like, with input `<name>_values`.
        fused_heads (`dict[str, list[str]]`, *optional*):
            Fused contrastive heads and the pooled features they concatenate, in order (`"subtitle"` is the text
            branch). `None` gives the release's `va`, `id`, `vs`, `vas`; `{}` gives none.
        temperature_init_value (`float`, *optional*, defaults to 0.07):
            Initial contrastive temperature, which *divides* the similarities.
        pool_video (`bool`, *optional*, defaults to `False`):
            Keep only the class token and the mean patch token of every frame in the multimodal context.
        max_caption_length (`int`, *optional*, defaults to 40):
            Caption length used by the processor and by decoding.
        max_subtitle_length (`int`, *optional*, defaults to 70):
            Subtitle length.
        contrastive_tasks (`list[str]`, *optional*):
            Contrastive pairs trained by [`MiCoForPreTraining`], as `t` followed by modality letters (`"tv"`,
            `"ta"`, `"td"`, `"tva"`, ...).
        matching_tasks (`list[str]`, *optional*):
            Contexts used by the matching loss.
        caption_tasks (`list[str]`, *optional*):
            Contexts used by the caption loss.
        itm_loss_weight (`float`, *optional*, defaults to 0.1):
            Weight of the matching loss.
        caption_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the caption loss (1 in the release).
        task_loss_weights (`dict[str, float]`, *optional*):
            Relative weights of tasks within their kind, keyed as [`MiCoForPreTraining`]'s `task_losses`
            (`"contrastive_td"`, `"matching_tva"`, `"caption_ta"`); unlisted tasks weigh 1. Each kind's loss is the
            weighted mean of its tasks' losses. Default: equal weights (the release). Useful when tasks compete for
            the shared towers, e.g. to give modalities that show fewer of the captions' words more weight.
        caption_mask_probability (`float`, *optional*, defaults to 0.6):
            Token masking rate of the caption loss.
        label_smoothing (`float`, *optional*, defaults to 0.1):
            Label smoothing of the contrastive loss.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the initialisation of the glue (heads, bridges, embeddings).

    Example:

    ```python
    >>> from modeling_mico import MiCoConfig

    >>> # the release's modalities plus an image-like "thermal" one, trained against text as task "th"
    >>> config = MiCoConfig(knowledge_modalities={"vision": 8, "audio": 4, "depth": 4, "thermal": 1},
    ...                     contrastive_tasks=["tv", "ta", "th"])
    >>> list(config.modality_specs)
    ['image', 'video', 'audio', 'depth', 'thermal']
    >>> config.modality_specs["thermal"].input_name, config.modality_specs["thermal"].letter
    ('thermal_values', 'h')
    ```"""

    model_type = "mico"
    sub_configs_defaults = {"vision_config": MiCoVisionConfig, "text_config": MiCoTextConfig}

    vision_config: dict | MiCoVisionConfig | None = None
    text_config: dict | MiCoTextConfig | None = None
    projection_dim: int = 512
    knowledge_modalities: dict[str, int] | None = None
    modalities: dict[str, dict] | None = None
    fused_heads: dict[str, list[str]] | None = None
    temperature_init_value: float = 0.07
    pool_video: bool = False
    max_caption_length: int = 40
    max_subtitle_length: int = 70
    contrastive_tasks: list[str] | None = None
    matching_tasks: list[str] | None = None
    caption_tasks: list[str] | None = None
    itm_loss_weight: float | int = 0.1
    caption_loss_weight: float | int = 1.0
    task_loss_weights: dict[str, float | int] | None = None
    caption_mask_probability: float = 0.6
    label_smoothing: float | int = 0.1
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.knowledge_modalities is None:
            self.knowledge_modalities = dict(DEFAULT_KNOWLEDGE_MODALITIES)
        if self.modalities is None:
            self.modalities = {}
        if self.task_loss_weights is None:
            self.task_loss_weights = {}
        # the release's heads and tasks, as far as this configuration has their modalities
        known = {*self.knowledge_modalities, SUBTITLE}
        if self.fused_heads is None:
            self.fused_heads = {
                name: list(parts) for name, parts in DEFAULT_FUSED_HEADS.items() if known >= set(parts)
            }
        letters = {spec.letter for spec in self.modality_specs.values()}
        for field, defaults in (
            ("contrastive_tasks", DEFAULT_CONTRASTIVE_TASKS),
            ("matching_tasks", DEFAULT_MATCHING_TASKS),
            ("caption_tasks", DEFAULT_CAPTION_TASKS),
        ):
            if getattr(self, field) is None:
                setattr(self, field, [task for task in defaults if letters >= set(task[1:])])
        super().__post_init__(**kwargs)

    # ---- the modality registry of this configuration ---------------------------------------------------------------

    @property
    def modality_specs(self) -> dict[str, ModalitySpec]:
        """Every modality this model takes, by name, in multimodal-context order."""
        return resolve_modalities(self.knowledge_modalities, self.modalities)

    @property
    def context_order(self) -> tuple[str, ...]:
        """Knowledge modalities (encoders) in the order their tokens are concatenated into a context."""
        return tuple(dict.fromkeys(spec.encoder for spec in self.modality_specs.values()))

    @property
    def task_letters(self) -> dict[str, str]:
        """Letter -> encoder (or `"subtitle"`) for the pretraining tasks of this configuration."""
        letters = {spec.letter: spec.encoder for spec in self.modality_specs.values()}
        return {**letters, SUBTITLE_LETTER: SUBTITLE}

    def spec_for_input(self, input_name: str) -> ModalitySpec:
        """The modality carried by a model input, refusing names this model does not take."""
        for spec in self.modality_specs.values():
            if spec.input_name == input_name:
                return spec
        known = ", ".join(spec.input_name for spec in self.modality_specs.values())
        raise ValueError(f"unknown input {input_name!r}; this model takes {known}")

    def parse_task(self, task: str) -> tuple[str, ...]:
        """`"tva"` -> `("vision", "audio")`; refuses unknown or repeated letters."""
        letters = self.task_letters
        parts = task[1:]
        if (
            task[:1] != TEXT_LETTER
            or not parts
            or len(set(parts)) != len(parts)
            or any(c not in letters for c in parts)
        ):
            raise ValueError(
                f"task {task!r} must be {TEXT_LETTER!r} followed by distinct modality letters of "
                f"{dict(sorted(letters.items()))}"
            )
        return tuple(letters[c] for c in parts)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MiCoConfig:
        """A fresh configuration of a size preset (`tiny`, `base`, `giant`); `overrides` replace top-level fields."""
        if name not in SIZE_PRESETS:
            raise ValueError(f"unknown model size {name!r}; choose one of {sorted(SIZE_PRESETS)}")
        return cls(**{**SIZE_PRESETS[name](), **overrides})

    # ---- validation -------------------------------------------------------------------------------------------------

    def validate_architecture(self):
        """Part of `@strict` validation: frame tables, modality declarations, fused heads, tasks and rates."""
        _check_positive(self, "", "projection_dim", "max_caption_length", "max_subtitle_length")
        for name, frames in self.knowledge_modalities.items():
            if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
                raise ValueError(f"knowledge_modalities[{name!r}] must be a positive frame count, got {frames!r}")
        for name, declaration in self.modalities.items():
            if not isinstance(declaration, dict):
                raise ValueError(f"modalities[{name!r}] must be a dict of ModalitySpec fields, got {declaration!r}")
        specs = self.modality_specs
        known = set(self.knowledge_modalities) | {SUBTITLE}
        for head, parts in self.fused_heads.items():
            unknown = [part for part in parts if part not in known]
            if unknown or len(parts) < 2:
                raise ValueError(
                    f"fused_heads[{head!r}] = {parts} must list at least two of {sorted(known)}; unknown: {unknown}"
                )
            if head in specs or head in known:
                raise ValueError(f"fused head {head!r} has the name of a modality")
        for kind in TASK_KINDS:
            for task in getattr(self, f"{kind}_tasks"):
                self.parse_task(task)
        tasks = [f"{kind}_{task}" for kind in TASK_KINDS for task in getattr(self, f"{kind}_tasks")]
        for name, weight in self.task_loss_weights.items():
            if name not in tasks:
                raise ValueError(
                    f"task_loss_weights names {name!r}, which is not a configured task; choose among {tasks}"
                )
            if not _is_positive_number(weight):
                raise ValueError(f"task_loss_weights[{name!r}] must be a positive number, got {weight!r}")
        if not _is_positive_number(self.caption_loss_weight):
            raise ValueError(f"caption_loss_weight must be a positive number, got {self.caption_loss_weight!r}")
        for name in ("caption_mask_probability", "label_smoothing"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        text_positions = self.text_config.max_position_embeddings
        if self.max_caption_length > text_positions:
            raise ValueError(
                f"max_caption_length ({self.max_caption_length}) exceeds text_config.max_position_embeddings "
                f"({text_positions})"
            )


# --------------------------------------------------------------------------------------------------------------------
# Size presets
# --------------------------------------------------------------------------------------------------------------------

# A from-scratch tiny model needs a wider initialisation than the release's 0.02: with it, the pooled class token
# barely depends on the input and the contrastive loss collapses every embedding onto one point (loss ln(batch)).
TINY_INITIALIZER_RANGE = 0.1


def _tiny() -> dict:
    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    return dict(
        vision_config=dict(**tower, image_size=64, patch_size=16, initializer_range=TINY_INITIALIZER_RANGE),
        text_config=dict(**tower, max_position_embeddings=128, initializer_range=TINY_INITIALIZER_RANGE),
        projection_dim=64,
        initializer_range=TINY_INITIALIZER_RANGE,
        knowledge_modalities={"vision": 8, "audio": 4, "depth": 1, "normal": 1},
        contrastive_tasks=["tv", "ta", "td", "tn", "tva"],
    )


def _base() -> dict:
    return dict(
        vision_config=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16
        ),
        projection_dim=512,
    )


SIZE_PRESETS = {
    # CPU-sized model for tests and smoke runs: 64 px images, 16 px patches, two 64-wide layers per tower
    "tiny": _tiny,
    # ViT-B/16 vision tower with the release's BERT-base text branch
    "base": _base,
    # the release: EVA01-CLIP-g/14 + BERT-base (`MiCoConfig()`)
    "giant": dict,
}


__all__ = ["MiCoConfig", "MiCoTextConfig", "MiCoVisionConfig", "ModalitySpec"]
