"""Pretraining data for MiCo: size presets, annotation datasets and a data collator that decodes media.

Annotations are JSON lines, JSON, CSV or parquet files read with 🤗 `datasets` (`streaming=True` for data sets too
large to index). A row has `caption` (a string) or `captions` (a list; training picks one at random) and any of the
media columns `image`, `video`, `audio`, `depth`, `normal` (paths; relative paths are resolved against the directory
of the annotation file) and `subtitle` (the subtitle text, or the path of a `.txt` file holding it). Rows may lack
modalities (missing, null or empty).

`MiCoDataCollator` decodes the media of a batch through [`MiCoProcessor`] (in the DataLoader workers) and returns
the inputs of [`MiCoForPreTraining`]. A modality is kept in a batch only when *every* row of the batch has it; it is
dropped from batches that mix rows with and without it (and a warning says so once per modality). Keep rows with the
same modalities together (e.g. one annotation file per modality set, trained one after the other, or a data set where
every row has every modality) so that no data is wasted.
"""

import multiprocessing
import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers.utils import logging

from .configuration_mico import MiCoConfig
from .feature_extraction_mico import MiCoFeatureExtractor
from .image_processing_mico import MiCoImageProcessor
from .processing_mico import MiCoProcessor


logger = logging.get_logger(__name__)

# Annotation column -> (MiCoProcessor argument, model input, knowledge modality)
MEDIA_COLUMNS = {
    "image": ("images", "pixel_values", "vision"),
    "video": ("videos", "pixel_values_videos", "vision"),
    "audio": ("audio", "input_features", "audio"),
    "depth": ("depth", "depth_values", "depth"),
    "normal": ("normals", "normal_values", "normal"),
}
SUBTITLE_COLUMN = "subtitle"
COLUMNS = (*MEDIA_COLUMNS, SUBTITLE_COLUMN)

ANNOTATION_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


# --------------------------------------------------------------------------------------------------------------------
# Size presets
# --------------------------------------------------------------------------------------------------------------------


# A from-scratch tiny model needs a wider initialisation than the release's 0.02: with it, the pooled class token
# barely depends on the input and the contrastive loss collapses every embedding onto one point (loss ln(batch)).
TINY_INITIALIZER_RANGE = 0.1


def _tiny() -> dict:
    return dict(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=16,
            initializer_range=TINY_INITIALIZER_RANGE,
        ),
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            initializer_range=TINY_INITIALIZER_RANGE,
        ),
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
        text_config={},
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


def config_for_size(name: str, **overrides: Any) -> MiCoConfig:
    """A fresh `MiCoConfig` of the preset `name` (`tiny`, `base`, `giant`); `overrides` replace top-level fields."""
    if name not in SIZE_PRESETS:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(SIZE_PRESETS)}")
    return MiCoConfig(**{**SIZE_PRESETS[name](), **overrides})


def processor_for_config(
    config: MiCoConfig, num_frames: int | None = None, num_slices: int | None = None, **settings: Any
) -> MiCoProcessor:
    """The default processor producing images, frames and audio slices of the model's `image_size` (the audio
    spectrogram slices are `image_size` frames x `image_size` mel bins, as the 224 x 224 slices of the release)."""
    size = config.vision_config.image_size
    extractor_settings = {"num_slices": num_slices} if num_slices else {}
    frame_settings = {"num_frames": num_frames} if num_frames else {}
    return MiCoProcessor(
        image_processor=MiCoImageProcessor(image_size=size),
        feature_extractor=MiCoFeatureExtractor(target_length=size, feature_size=size, **extractor_settings),
        max_length=config.max_caption_length,
        **frame_settings,
        **settings,
    )


def check_processor_matches(config: MiCoConfig, processor: MiCoProcessor) -> None:
    """Refuse a processor whose images or audio slices do not have the model's input size."""
    size = config.vision_config.image_size
    found = {
        "image_processor.image_size": processor.image_processor.image_size,
        "feature_extractor.target_length": processor.feature_extractor.target_length,
        "feature_extractor.feature_size": processor.feature_extractor.feature_size,
    }
    wrong = {name: value for name, value in found.items() if value != size}
    if wrong:
        raise ValueError(f"the model takes {size}x{size} inputs but the processor has {wrong}")


# --------------------------------------------------------------------------------------------------------------------
# Annotations
# --------------------------------------------------------------------------------------------------------------------


def _is_present(value: Any) -> bool:
    """Missing, null, NaN and empty values mean the row lacks that field."""
    return value is not None and value == value and value != "" and value != []


def _resolve_row(row: dict, root: str) -> dict:
    """Join relative media paths (and `.txt` subtitle paths) to `root`."""
    resolved = {}
    for column in COLUMNS:
        value = row.get(column)
        is_path = column in MEDIA_COLUMNS or (isinstance(value, str) and value.endswith(".txt"))
        if column in row and _is_present(value) and is_path:
            resolved[column] = os.path.join(root, value)
    return resolved


def load_annotation_dataset(
    data_files: str | os.PathLike | Sequence[str | os.PathLike], streaming: bool = False
):  # -> datasets.Dataset | datasets.IterableDataset
    """Read one or several annotation files (`.jsonl`, `.json`, `.csv`, `.parquet`) into one `datasets` data set
    whose media paths are absolute (each file's relative paths are resolved against its own directory)."""
    import datasets

    files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    if not files:
        raise ValueError("give at least one annotation file")
    parts = []
    for file in files:
        file = os.path.abspath(os.fspath(file))
        builder = ANNOTATION_BUILDERS.get(os.path.splitext(file)[1].lower())
        if builder is None:
            raise ValueError(f"{file}: annotation files must end in one of {sorted(ANNOTATION_BUILDERS)}")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"annotation file not found: {file}")
        dataset = datasets.load_dataset(builder, data_files=file, split="train", streaming=streaming)
        columns = dataset.column_names or []
        if "caption" not in columns and "captions" not in columns:
            raise ValueError(f"{file}: rows need a `caption` or `captions` column, found {columns}")
        parts.append(dataset.map(_resolve_row, fn_kwargs={"root": os.path.dirname(file)}))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# --------------------------------------------------------------------------------------------------------------------
# Collator
# --------------------------------------------------------------------------------------------------------------------


class BrokenMediaError(ValueError):
    """A media file of a row could not be read or decoded; the message names the file."""


class MiCoDataCollator:
    r"""
    Turn annotation rows into a batch for [`MiCoForPreTraining`], decoding media with `processor`.

    Args:
        processor ([`MiCoProcessor`]): decodes and normalises media and tokenizes captions.
        modalities (`Sequence[str]`, *optional*): annotation columns to load, among `image`, `video`, `audio`,
            `depth`, `normal`, `subtitle` (default: all but `image`, since images and videos both feed the vision
            modality and a batch takes one of them).
        training (`bool`, *optional*, defaults to `True`): random caption of `captions`, random frame / slice within
            each segment; at evaluation the first caption and the middle frames.
        skip_broken (`bool`, *optional*, defaults to `False`): skip (and count, see `num_skipped`) rows whose media
            cannot be read instead of failing with the file named.
        max_subtitle_length (`int`, *optional*, defaults to 70): subtitle tokens (`MiCoConfig.max_subtitle_length`).
    """

    def __init__(
        self,
        processor: MiCoProcessor,
        modalities: Sequence[str] | None = None,
        training: bool = True,
        skip_broken: bool = False,
        max_subtitle_length: int = 70,
    ):
        modalities = list(modalities) if modalities is not None else [c for c in COLUMNS if c != "image"]
        unknown = [m for m in modalities if m not in COLUMNS]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; choose among {list(COLUMNS)}")
        if "image" in modalities and "video" in modalities:
            raise ValueError("`image` and `video` both feed the vision modality: load one of them")
        self.processor = processor
        self.modalities = modalities
        self.training = training
        self.skip_broken = skip_broken
        self.max_subtitle_length = max_subtitle_length
        # shared with DataLoader worker processes, so that skips made there are counted here
        self._skipped = multiprocessing.get_context("spawn").Value("q", 0)
        self._warned: set[str] = set()

    @property
    def num_skipped(self) -> int:
        """Rows skipped so far because of a broken media file (with `skip_broken=True`), over all workers."""
        return self._skipped.value

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        columns = [c for c in self.modalities if all(_is_present(row.get(c)) for row in rows)]
        for column in self.modalities:
            if column not in columns and any(_is_present(row.get(column)) for row in rows):
                self._warn_once(column)
        captions, items = [], []
        for row in rows:
            try:
                items.append(self._decode_row(row, columns))
            except BrokenMediaError as err:
                if not self.skip_broken:
                    raise
                with self._skipped.get_lock():
                    self._skipped.value += 1
                logger.warning(f"skipping a row: {err}")
                continue
            captions.append(self._caption(row))
        if not items:
            raise BrokenMediaError(f"every row of this batch has a broken media file ({len(rows)} rows)")
        batch = {key: torch.cat([item[key] for item in items]) for key in items[0]}
        batch.update(self.processor(text=captions, return_tensors="pt"))
        return batch

    def _caption(self, row: dict) -> str:
        """`captions` (a random one in training, else the first) or `caption` (a list is treated as `captions`)."""
        captions = row.get("captions") if _is_present(row.get("captions")) else row.get("caption")
        if isinstance(captions, str):
            return captions
        if not _is_present(captions):
            raise ValueError(f"a row has no caption: {row}")
        index = int(torch.randint(len(captions), ())) if self.training else 0
        return captions[index]

    def _decode_row(self, row: dict, columns: list[str]) -> dict[str, torch.Tensor]:
        """The model inputs of one row's media, raising `BrokenMediaError` naming the file that fails."""
        inputs = {}
        for column in columns:
            path = row[column]
            try:
                if column == SUBTITLE_COLUMN:
                    inputs.update(self._subtitle(path))
                else:
                    argument = MEDIA_COLUMNS[column][0]
                    inputs.update(self.processor(**{argument: [path]}, training=self.training, return_tensors="pt"))
            except Exception as err:
                raise BrokenMediaError(f"cannot read the {column} of a row from {path!r}: {err}") from err
        return inputs

    def _subtitle(self, value: str) -> dict[str, torch.Tensor]:
        """Tokenized subtitle (`subtitle_input_ids`, `subtitle_attention_mask`) from its text or `.txt` file."""
        if value.endswith(".txt"):
            with open(value, encoding="utf-8") as file:
                value = file.read().strip()
        encoded = self.processor.tokenizer(
            [value],
            padding="max_length",
            truncation=True,
            max_length=self.max_subtitle_length,
            return_token_type_ids=False,
            return_tensors="pt",
        )
        return {"subtitle_input_ids": encoded["input_ids"], "subtitle_attention_mask": encoded["attention_mask"]}

    def _warn_once(self, column: str) -> None:
        if column not in self._warned:
            self._warned.add(column)
            logger.warning(f"`{column}` dropped from a batch where some rows lack it (it is kept in complete batches)")
