"""Pretraining data for MiCo: a data collator that decodes media, its columns derived from the modality registry.

Annotation files are read by `annotations.load_annotation_dataset` (JSON lines, JSON, CSV or parquet, through 🤗
`datasets`), and so are 🤗 `datasets` folders whose media columns are `Image` / `Audio` / `Video` features. A row has `caption` (a string) or `captions` (a list; training picks one at random), any of the media
columns of the model's modalities (`ModalitySpec.column`: `image`, `video`, `audio`, `depth`, `normal`, and declared
ones such as `thermal`) and `subtitle` (the subtitle text, or the path of a `.txt` file holding it).

`MiCoDataCollator` decodes the media of a batch through [`MiCoProcessor`] (in the DataLoader workers) and returns
the inputs of [`MiCoForPreTraining`]: each column goes to the processor argument and comes back as the model input
its modality declares (`column -> processor_argument -> input_name`). A modality is kept in a batch only when *every*
row of the batch has it; it is dropped from batches that mix rows with and without it (and a warning says so once per
modality). Keep rows with the same modalities together (e.g. one annotation file per modality set, trained one after
the other, or a data set where every row has every modality) so that no data is wasted.

Random choices in training (which caption of `captions`, which frame / spectrogram slice in each segment) are drawn,
with `MiCoDataCollator(seed=...)`, from a generator per row seeded with `(seed, epoch, the row's position)`: the
position is stamped on the rows by `index_rows` (the index of a map-style data set; the process, DataLoader worker
and place in that worker's stream for a streamed one). A run resumed from a checkpoint therefore draws what the
uninterrupted run drew, although it skips the trained batches without collating them and collates in another order
relative to the model's own random draws (torch's global RNG, which the `Trainer` saves per process).
"""

import hashlib
import multiprocessing
import os
from collections.abc import Sequence

import torch
from transformers.utils import logging

from .annotations import describe_media, is_present, modality_specs
from .configuration_mico import SUBTITLE, MiCoConfig, ModalitySpec
from .processing_mico import MiCoProcessor


logger = logging.get_logger(__name__)


def media_columns(config: MiCoConfig | None = None) -> dict[str, ModalitySpec]:
    """Annotation column -> the modality it feeds, for the modalities of `config` (default: the built-in ones)."""
    return {spec.column: spec for spec in modality_specs(config).values()}


def default_columns(config: MiCoConfig | None = None) -> list[str]:
    """The columns a collator loads by default: one media column per encoder (the last declared, so videos rather
    than images for the shared vision encoder) and `subtitle`."""
    by_encoder = {spec.encoder: column for column, spec in media_columns(config).items()}
    return [column for column in media_columns(config) if column in by_encoder.values()] + [SUBTITLE]


class BrokenMediaError(ValueError):
    """A media file of a row could not be read or decoded; the message names the file."""


# Column `index_rows` adds: the row's position, from which a seeded collator derives the row's random draws.
ROW_POSITION = "__position__"


class IndexedRows(torch.utils.data.Dataset):
    """A map-style data set whose rows also carry their index under `ROW_POSITION` (see `index_rows`)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], ROW_POSITION: str(index)}


def _stream_position(row: dict, index: int) -> dict:
    """`ROW_POSITION` of a streamed row: process, DataLoader worker and place in that worker's stream of the epoch."""
    worker = torch.utils.data.get_worker_info()
    return {ROW_POSITION: f"{os.environ.get('RANK', '0')}/{worker.id if worker else 0}/{index}"}


def index_rows(dataset):
    """`dataset` with each row's position stamped under `ROW_POSITION`, for `MiCoDataCollator(seed=...)`: the index of
    a map-style data set, or for a streamed 🤗 `datasets.IterableDataset` (annotations, shards) the process, worker
    and place in that worker's stream (the same on every run with the same seed, processes and workers)."""
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        return dataset.map(_stream_position, with_indices=True)
    return IndexedRows(dataset)


def row_seed(seed: int, epoch: int, position: str) -> int:
    """A 63-bit seed for one row's random draws from the run's seed, the epoch and the row's position."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class MiCoDataCollator:
    r"""
    Turn annotation rows into a batch for [`MiCoForPreTraining`], decoding media with `processor`.

    Args:
        processor ([`MiCoProcessor`]): decodes and normalises media and tokenizes captions.
        modalities (`Sequence[str]`, *optional*): annotation columns to load, among the media columns of the
            model's modalities (`media_columns(config)`) and `subtitle` (default: `default_columns(config)`, one
            media column per encoder, since images and videos both feed the vision encoder and a batch takes one of
            them).
        training (`bool`, *optional*, defaults to `True`): random caption of `captions`, random frame / slice within
            each segment; at evaluation the first caption and the middle frames.
        skip_broken (`bool`, *optional*, defaults to `False`): skip (and count, see `num_skipped`) rows whose media
            cannot be read instead of failing with the file named.
        max_subtitle_length (`int`, *optional*): subtitle tokens (default: `config.max_subtitle_length`, else 70).
        config ([`MiCoConfig`], *optional*): the model's configuration, whose modality registry maps the columns to
            processor arguments and model inputs (default: the built-in modalities).
        seed (`int`, *optional*): draw each row's random choices from a generator seeded with `(seed, epoch, row
            position)` (rows stamped by `index_rows`; the epoch set by `set_epoch`), so that they do not depend on the
            order batches are collated in and a resumed run repeats them; `None`: torch's global RNG (per worker).
            Subclasses draw their batch-level choices from `batch_generator(rows)`.
    """

    def __init__(
        self,
        processor: MiCoProcessor,
        modalities: Sequence[str] | None = None,
        training: bool = True,
        skip_broken: bool = False,
        max_subtitle_length: int | None = None,
        config: MiCoConfig | None = None,
        seed: int | None = None,
    ):
        self.media = media_columns(config)
        modalities = list(modalities) if modalities is not None else default_columns(config)
        unknown = [m for m in modalities if m not in self.media and m != SUBTITLE]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; choose among {[*self.media, SUBTITLE]}")
        fed: dict[str, str] = {}
        for column in modalities:
            encoder = self.media[column].encoder if column in self.media else column
            if encoder in fed:
                raise ValueError(f"`{fed[encoder]}` and `{column}` both feed the {encoder} encoder: load one of them")
            fed[encoder] = column
        if max_subtitle_length is None:
            max_subtitle_length = config.max_subtitle_length if config is not None else 70
        self.processor = processor
        self.modalities = modalities
        self.training = training
        self.skip_broken = skip_broken
        self.max_subtitle_length = max_subtitle_length
        self.seed = seed
        # shared with DataLoader worker processes, so that skips made there are counted here and the epoch set here
        # is read there
        self._skipped = multiprocessing.get_context("spawn").Value("q", 0)
        self._epoch = multiprocessing.get_context("spawn").Value("q", 0)
        self._warned: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        """The training epoch, part of each row's seed (`EvalCollatorTrainer` sets it as every epoch begins)."""
        self._epoch.value = epoch

    @property
    def num_skipped(self) -> int:
        """Rows skipped so far because of a broken media file (with `skip_broken=True`), over all workers."""
        return self._skipped.value

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        columns = [c for c in self.modalities if all(is_present(row.get(c)) for row in rows)]
        for column in self.modalities:
            if column not in columns and any(is_present(row.get(column)) for row in rows):
                self._warn_once(column)
        captions, items = [], []
        for row in rows:
            generator = self._row_generator(row)
            try:
                items.append(self._decode_row(row, columns, generator))
            except BrokenMediaError as err:
                if not self.skip_broken:
                    raise
                with self._skipped.get_lock():
                    self._skipped.value += 1
                logger.warning(f"skipping a row: {err}")
                continue
            captions.append(self._caption(row, generator))
        if not items:
            raise BrokenMediaError(f"every row of this batch has a broken media file ({len(rows)} rows)")
        batch = {key: torch.cat([item[key] for item in items]) for key in items[0]}
        batch.update(self.processor(text=captions, return_tensors="pt"))
        return batch

    def _row_generator(self, row: dict) -> torch.Generator | None:
        """The generator of a row's random draws in training with a `seed` (`None`: torch's global RNG)."""
        return self._seeded_generator([row], batch=False)

    def batch_generator(self, rows: Sequence[dict]) -> torch.Generator | None:
        """The generator of a batch's random draws (mixup/cutmix, caption masking) in training with a `seed`, seeded
        with `(seed, epoch, the rows' positions)`: the same whenever and wherever the batch is collated (`None`
        without a seed or at evaluation: torch's global RNG)."""
        return self._seeded_generator(rows, batch=True)

    def _seeded_generator(self, rows: Sequence[dict], batch: bool) -> torch.Generator | None:
        """A generator seeded with `(seed, epoch, the rows' positions)` (a batch's apart from its single row's)."""
        if self.seed is None or not self.training:
            return None
        if any(ROW_POSITION not in row for row in rows):
            raise ValueError(
                f"{type(self).__name__}(seed={self.seed}) needs rows stamped with their position (`{ROW_POSITION}`): "
                "wrap the training data set with `modeling_mico.data.index_rows`"
            )
        position = "+".join(row[ROW_POSITION] for row in rows)
        seed = row_seed(self.seed, self._epoch.value, f"batch:{position}" if batch else position)
        return torch.Generator().manual_seed(seed)

    def _caption(self, row: dict, generator: torch.Generator | None = None) -> str:
        """`captions` (a random one in training, else the first) or `caption` (a list is treated as `captions`)."""
        captions = row.get("captions") if is_present(row.get("captions")) else row.get("caption")
        if isinstance(captions, str):
            return captions
        if not is_present(captions):
            raise ValueError(f"a row has no caption: {row}")
        index = int(torch.randint(len(captions), (), generator=generator)) if self.training else 0
        return captions[index]

    def _decode_row(
        self, row: dict, columns: list[str], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """The model inputs of one row's media (paths, or 🤗 Datasets media values: `{"path", "bytes"}` dicts, PIL
        images, `{"array", "sampling_rate"}` dicts, torchcodec decoders), raising `BrokenMediaError` naming the file
        that fails; random frames / slices from `generator` (a seed drawn from it per column)."""
        inputs = {}
        for column in columns:
            value = row[column]
            try:
                if column == SUBTITLE:
                    inputs.update(self._subtitle(value))
                else:
                    spec = self.media[column]
                    seed = None if generator is None else int(torch.randint(2**62, (), generator=generator))
                    features = self.processor(
                        **{spec.processor_argument: [value]}, training=self.training, seed=seed, return_tensors="pt"
                    )
                    inputs[spec.input_name] = features[spec.input_name]
            except Exception as err:
                raise BrokenMediaError(
                    f"cannot read the {column} of a row from {describe_media(value)}: {err}"
                ) from err
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
