"""WebDataset-style tar shards for MiCo pretraining: writing them from an annotation file, streaming them back.

A shard is a plain tar file; one sample is the members sharing a key (the name up to the first dot):
`<key>.json` (the row's text fields: `caption` / `captions`, `subtitle`, `id`) and `<key>.<column>.<ext>` per media
column (`image`, `video`, `audio`, `depth`, `normal` and declared modalities, from `config.modality_specs`) holding
the file's encoded bytes unchanged. The layout is the one the `webdataset` library and the 🤗 `datasets` webdataset
builder read (that builder would encode audio members with torchcodec, hence the small reader below).

Reading (`load_shards`) gives a streaming 🤗 `datasets.IterableDataset` with one shard per generator input, so that
the Trainer (accelerate) splits the shards over processes and the DataLoader splits them over workers, and
`shuffle(seed, buffer_size)` shuffles the shard order and a buffer of samples, the same way on every run with the same
seed and epoch: a run resumed from a checkpoint sees exactly the batches an uninterrupted run would (the Trainer
skips the batches already trained). `ShardCollator` decodes the media in the DataLoader workers through the ordinary
`MiCoDataCollator` (each member is written to a worker-local temporary file named `<shard>/<key>.<column>.<ext>`, so
that decoding errors name the shard and member, and `skip_broken` skips and counts them).
"""

import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .annotations import is_present
from .configuration_mico import SUBTITLE, MiCoConfig
from .data import ROW_POSITION, MiCoDataCollator, media_columns


TEXT_FIELDS = ("id", "caption", "captions", SUBTITLE)


def expand_shards(pattern: str | os.PathLike | Iterable[str]) -> list[str]:
    """Shard paths from a brace pattern `dir/shard-{000000..000099}.tar` (as webdataset writes them), a comma-free
    list, or one path; every file must exist."""
    if not isinstance(pattern, str | os.PathLike):
        paths = [str(path) for path in pattern]
    else:
        pattern = str(pattern)
        match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
        if match:
            first, last = match.groups()
            width = len(first)
            paths = [
                pattern[: match.start()] + str(index).zfill(width) + pattern[match.end() :]
                for index in range(int(first), int(last) + 1)
            ]
        else:
            paths = [pattern]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"--train_shards: {len(missing)} shard(s) missing, e.g. {missing[0]}")
    if not paths:
        raise ValueError("--train_shards names no shard")
    return paths


def _sample_key(row: dict, index: int) -> str:
    """A tar-member key for a row: its `id` with dots and slashes replaced (the key ends at the first dot)."""
    key = str(row.get("id", f"sample{index:09d}"))
    return re.sub(r"[./\\]", "_", key)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    rows: Iterable[dict],
    output_dir: str | os.PathLike,
    samples_per_shard: int = 1000,
    base_dir: str | os.PathLike | None = None,
    config: MiCoConfig | None = None,
    prefix: str = "shard",
) -> list[str]:
    """Pack annotation rows (dicts, e.g. an annotation file's rows or a 🤗 `datasets.Dataset`) and their media files
    into tar shards `output_dir/<prefix>-000000.tar`, ... of `samples_per_shard` samples each.

    Media columns are those of `config`'s modalities (default: the built-in ones); a relative media path is taken
    from `base_dir` (the annotation file's directory). A subtitle given as a `.txt` file is stored as its text.
    `output_dir` must not hold shards already. Each shard is written under a temporary name and renamed when
    complete. Returns the shard paths.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if any(output_dir.glob(f"{prefix}-*.tar")):
        raise FileExistsError(f"{output_dir} already holds {prefix}-*.tar shards")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    columns = media_columns(config)
    paths: list[str] = []
    tar, partial = None, None

    def close() -> None:
        tar.close()
        final = partial.with_suffix("")
        partial.rename(final)
        paths.append(str(final))

    for index, row in enumerate(tqdm(rows, desc="Writing shards", unit="sample")):
        if index % samples_per_shard == 0:
            if tar is not None:
                close()
            partial = output_dir / f"{prefix}-{len(paths):06d}.tar.partial"
            tar = tarfile.open(partial, "w")
        key = _sample_key(row, index)
        text = {field: row[field] for field in TEXT_FIELDS if is_present(row.get(field))}
        if isinstance(text.get(SUBTITLE), str) and text[SUBTITLE].endswith(".txt"):
            text[SUBTITLE] = (base / text[SUBTITLE]).read_text(encoding="utf-8").strip()
        if "caption" not in text and "captions" not in text:
            raise ValueError(f"row {index} ({key}) has no caption or captions")
        _add_member(tar, f"{key}.json", json.dumps(text).encode())
        for column in columns:
            if is_present(row.get(column)):
                path = base / row[column]
                if not path.is_file():
                    raise FileNotFoundError(f"row {index} ({key}): the {column} file {path} does not exist")
                extension = path.suffix.lstrip(".") or "bin"
                _add_member(tar, f"{key}.{column}.{extension}", path.read_bytes())
    if tar is not None:
        close()
    return paths


def iterate_shard(path: str) -> Iterator[dict]:
    """The samples of one shard: `{"__key__", "__url__", "json": dict, "<column>.<ext>": bytes, ...}`, members grouped
    by key in file order. A truncated or unreadable tar raises `tarfile.ReadError` naming the shard."""
    sample: dict = {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, suffix = member.name.partition(".")
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                sample.setdefault("__key__", key)
                sample["__url__"] = path
                data = tar.extractfile(member).read()
                sample[suffix] = json.loads(data) if suffix == "json" else data
    except (tarfile.TarError, json.JSONDecodeError, EOFError) as err:
        raise tarfile.ReadError(f"shard {path} is corrupt near sample {sample.get('__key__')!r}: {err}") from err
    if sample:
        yield sample


def _generate(shards: list[str]) -> Iterator[dict]:
    """`datasets` generator: the samples of the shards it is given, media kept as `{member suffix: bytes}`."""
    for path in shards:
        for sample in iterate_shard(path):
            media = {suffix: data for suffix, data in sample.items() if suffix not in ("__key__", "__url__", "json")}
            yield {"key": sample["__key__"], "shard": path, "text": json.dumps(sample.get("json", {})), "media": media}


def load_shards(
    pattern: str | os.PathLike | Iterable[str], shuffle_buffer: int = 0, seed: int = 42
) -> "datasets.IterableDataset":  # noqa: F821
    """A streaming 🤗 `datasets.IterableDataset` over the shards (see the module docstring for splitting and
    resuming); `shuffle_buffer > 0` shuffles the shard order and a buffer of that many samples with `seed`."""
    import datasets

    shards = expand_shards(pattern)
    dataset = datasets.IterableDataset.from_generator(_generate, gen_kwargs={"shards": shards})
    if shuffle_buffer > 0:
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)
    return dataset


class ShardCollator:
    """Decode streamed shard samples in the DataLoader worker with a `MiCoDataCollator`: the media bytes go to
    temporary files named after the shard and member (removed after the batch), the text fields to the row."""

    def __init__(self, collator: MiCoDataCollator):
        self.collator = collator
        self._directory: tempfile.TemporaryDirectory | None = None

    @property
    def num_skipped(self) -> int:
        """Samples skipped for broken media (`skip_broken=True`), over all workers."""
        return self.collator.num_skipped

    @property
    def seed(self) -> int | None:
        """The wrapped collator's seed of per-row random draws (see `MiCoDataCollator`)."""
        return self.collator.seed

    def set_epoch(self, epoch: int) -> None:
        self.collator.set_epoch(epoch)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        if self._directory is None:  # created in the worker that uses it
            self._directory = tempfile.TemporaryDirectory(prefix="mico-shards-")
        written: list[Path] = []
        rows = []
        try:
            for sample in samples:
                row = json.loads(sample["text"])
                if ROW_POSITION in sample:
                    row[ROW_POSITION] = sample[ROW_POSITION]
                folder = Path(self._directory.name) / Path(sample["shard"]).name
                folder.mkdir(exist_ok=True)
                for suffix, data in sample["media"].items():
                    if data is None:
                        continue
                    path = folder / f"{sample['key']}.{suffix}"
                    path.write_bytes(data)
                    written.append(path)
                    row[suffix.partition(".")[0]] = str(path)
                rows.append(row)
            return self.collator(rows)
        finally:
            for path in written:
                path.unlink(missing_ok=True)
