"""Annotation readers: common captioning / retrieval formats into MiCo's own rows, and annotation files into a
🤗 `datasets` data set for training.

Every loader of `load_annotations` returns a list of rows (one per item)::

    {"id": str, "captions": [str, ...], "caption": captions[0], <media column>: path, ...}

plus any extra fields the source carries (``subtitle``, ``split``, ``start_time``, ...). The media columns are those of
the modality registry (`ModalitySpec.column`): ``image``, ``video``, ``audio``, ``depth``, ``normal`` and any modality
declared in the model's configuration (pass ``config=`` to read, say, a ``thermal`` column as a path). Media paths are
joined to ``media_root`` or, when it is not given, to the annotation file's directory (absolute paths are kept as they
are). `flatten_captions` turns the rows into the `(texts, text_to_item)` pair that `retrieval.retrieval_metrics`
expects.

Supported formats (``format=`` name, see `load_annotations`):

- ``"mico"``: MiCo JSON lines (``.jsonl``) or a JSON list of rows with ``caption`` (str or list) or ``captions``
  (list) and media fields; this is also the flat BLIP/VAST list ``[{"image": path, "caption": [...]}, ...]``.
- ``"msrvtt"``: a JSON list of ``{"video_id" | "clip_name": ..., "caption": str | list}`` (entries of the same video
  are grouped) or the official ``{"videos": [...], "sentences": [{"video_id", "caption"}]}``; media
  ``<root>/<video_id>.mp4``.
- ``"karpathy"`` (alias ``"coco"``): ``{"images": [{"filepath", "filename", "sentences": [{"raw"}], "split"}]}``;
  media ``<root>/<filepath>/<filename>``.
- ``"audiocaps"``: CSV ``audiocap_id,youtube_id,start_time,caption``, grouped by ``youtube_id``; media
  ``<root>/<youtube_id>.wav``.
- ``"clotho"``: CSV ``file_name,caption_1..caption_5``; media ``<root>/<file_name>``.

`load_annotation_dataset` reads MiCo annotation files (JSON lines, JSON, CSV or parquet) with 🤗 `datasets`
(``streaming=True`` for data sets too large to index), or opens a data set folder (`open_media_dataset`:
``save_to_disk`` output or a folder ``load_dataset`` reads, with ``Image`` / ``Audio`` / ``Video`` columns), for
`data.MiCoDataCollator`: rows have ``caption`` (a string)
or ``captions`` (a list; training picks one at random), any of the media columns and ``subtitle`` (the subtitle text,
or the path of a ``.txt`` file holding it). Rows may lack modalities (missing, null or empty).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .configuration_mico import BUILTIN_MODALITIES, SUBTITLE, MiCoConfig, ModalitySpec


FORMATS = ("mico", "msrvtt", "karpathy", "coco", "audiocaps", "clotho")
# Annotation file extension -> the 🤗 `datasets` builder that reads it (`load_annotation_dataset`).
ANNOTATION_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

Row = dict[str, Any]


def modality_specs(config: MiCoConfig | None = None) -> dict[str, ModalitySpec]:
    """The modality registry of `config` (name -> `ModalitySpec`, in context order), or every built-in modality
    when no configuration is given."""
    return dict(config.modality_specs if config is not None else BUILTIN_MODALITIES)


def media_keys(config: MiCoConfig | None = None) -> tuple[str, ...]:
    """The annotation columns holding media paths: `ModalitySpec.column` of every modality of `config` (default:
    the built-in modalities)."""
    return tuple(spec.column for spec in modality_specs(config).values())


def is_present(value: Any) -> bool:
    """Missing, null, NaN and empty values (string, list, dict) mean the row lacks that field; any other value (a
    path, a 🤗 Datasets media value, a PIL image, an array) is present."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return not isinstance(value, (str, list, tuple, dict)) or len(value) > 0


def describe_media(value: Any) -> str:
    """A media value as errors name it: its path (a 🤗 Datasets `{"path", "bytes"}` dict's path), else its type."""
    if isinstance(value, (str, os.PathLike)):
        return repr(os.fspath(value))
    if isinstance(value, dict) and value.get("path"):
        return repr(value["path"])
    return f"a value of type {type(value).__name__}" + (" (bytes)" if isinstance(value, dict) else "")


class _Source:
    """The annotation file being read, to name it (and the offending row) in errors and to resolve media paths."""

    def __init__(self, path: Path, media_root: str | os.PathLike | None):
        self.path = path
        self.root = os.fspath(media_root) if media_root is not None else str(path.resolve().parent)

    def error(self, message: str, row: int | str | None = None) -> ValueError:
        """A ValueError naming the file and, when given, the row (an index, or a label such as ``"line 3"``)."""
        if row is None:
            return ValueError(f"{self.path}: {message}")
        where = f"row {row}" if isinstance(row, int) else row
        return ValueError(f"{self.path}, {where}: {message}")

    def media(self, relative: str | os.PathLike) -> str:
        """Join `relative` to the media root (an absolute path is returned unchanged)."""
        return os.path.join(self.root, os.fspath(relative))


def _captions(value: Any, source: _Source, row: int | str) -> list[str]:
    """Normalise a caption field (str or list of str) to a non-empty list of stripped, non-empty strings."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values:
        raise source.error(f"expected a caption string or a non-empty list of captions, got {value!r}", row)
    captions = []
    for caption in values:
        if not isinstance(caption, str) or not caption.strip():
            raise source.error(f"captions must be non-empty strings, got {caption!r}", row)
        captions.append(caption.strip())
    return captions


def _make_row(item_id: Any, captions: list[str], **fields: Any) -> Row:
    """Assemble a row in the package format."""
    return {"id": str(item_id), "captions": captions, "caption": captions[0], **fields}


def _group_captions(records: Iterable[tuple[str, Any, int | str]], source: _Source) -> dict[str, list[str]]:
    """``(item_id, caption value, row)`` records -> ``{item_id: captions}`` in first-appearance order."""
    grouped: dict[str, list[str]] = {}
    for item_id, value, row in records:
        grouped.setdefault(str(item_id), []).extend(_captions(value, source, row))
    return grouped


def _filter_split(rows: list[Row], split: str | None, source: _Source) -> list[Row]:
    """Keep the rows of `split`; an error when `split` is given but the file carries no split information."""
    if split is None:
        return rows
    if not any("split" in row for row in rows):
        raise source.error(f"split={split!r} was requested but the file has no 'split' field")
    kept = [row for row in rows if row.get("split") == split]
    if not kept:
        found = sorted({str(row.get("split")) for row in rows})
        raise source.error(f"no row has split={split!r}; the file's splits are {found}")
    return kept


# ----------------------------------------------------------------------------------------------------- JSON formats


def nested_value(row: Mapping[str, Any], path: str, where: str, what: str = "column") -> Any:
    """`row[path]`, where a dotted path reads nested objects (`attributes.shape` is `row["attributes"]["shape"]`); a
    missing key is a `ValueError` naming `where`, the `what` and the row's keys."""
    value: Any = row
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            raise ValueError(f"{where} has no {what} {path!r} (keys: {sorted(row)})")
        value = value[key]
    return value


def _read_json_or_lines(path: Path) -> Any:
    """Parse `path` as JSON, or as JSON lines (one object per line) when it is ``.jsonl`` or not a single document."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":
                raise ValueError(f"{path}: not valid JSON ({error})") from error
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error})") from error
    return records


def _parse_mico(data: Any, source: _Source, keys: Sequence[str]) -> list[Row]:
    """MiCo rows / the flat BLIP-VAST list: captions plus media paths (`keys`) relative to the media root."""
    if not isinstance(data, list):
        raise source.error("expected a list of rows (or JSON lines)")
    rows = []
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise source.error(f"expected an object, got {type(record).__name__}", index)
        if "captions" not in record and "caption" not in record:
            raise source.error("missing 'caption' / 'captions'", index)
        captions = _captions(record.get("captions", record.get("caption")), source, index)
        extra = {key: value for key, value in record.items() if key not in ("id", "caption", "captions")}
        for key in keys:
            if not is_present(record.get(key)):
                extra.pop(key, None)  # null / empty: the row lacks this modality
            elif not isinstance(record[key], str):
                raise source.error(f"{key!r} must be a media path (a string), got {record[key]!r}", index)
            else:
                extra[key] = source.media(record[key])
        rows.append(_make_row(record.get("id", index), captions, **extra))
    return rows


def _parse_msrvtt(data: Any, source: _Source, video_extension: str) -> list[Row]:
    """MSR-VTT: the flat retrieval list or the official videos/sentences file; media ``<root>/<video_id><ext>``."""
    if isinstance(data, dict):
        return _parse_msrvtt_official(data, source, video_extension)
    if not isinstance(data, list):
        raise source.error("expected a list of {'video_id', 'caption'} or the official {'videos', 'sentences'}")

    def records() -> Iterable[tuple[str, Any, int]]:
        for index, record in enumerate(data):
            if not isinstance(record, dict):
                raise source.error(f"expected an object, got {type(record).__name__}", index)
            video_id = record.get("video_id", record.get("clip_name"))
            if video_id is None:
                raise source.error("missing 'video_id' / 'clip_name'", index)
            if "caption" not in record:
                raise source.error("missing 'caption'", index)
            yield video_id, record["caption"], index

    grouped = _group_captions(records(), source)
    return [
        _make_row(video_id, captions, video=source.media(video_id + video_extension))
        for video_id, captions in grouped.items()
    ]


def _parse_msrvtt_official(data: dict, source: _Source, video_extension: str) -> list[Row]:
    """The official ``{"videos": [{"video_id", "split"}], "sentences": [{"video_id", "caption"}]}`` file."""
    if "videos" not in data or "sentences" not in data:
        raise source.error("an MSR-VTT object needs 'videos' and 'sentences'")
    for index, sentence in enumerate(data["sentences"]):
        if "video_id" not in sentence or "caption" not in sentence:
            raise source.error("sentence needs 'video_id' and 'caption'", f"sentences[{index}]")
    grouped = _group_captions(
        ((s["video_id"], s["caption"], f"sentences[{i}]") for i, s in enumerate(data["sentences"])), source
    )
    rows = []
    for index, video in enumerate(data["videos"]):
        if "video_id" not in video:
            raise source.error("missing 'video_id'", f"videos[{index}]")
        video_id = str(video["video_id"])
        if video_id not in grouped:
            raise source.error(f"video {video_id!r} has no sentence (caption)", f"videos[{index}]")
        split = {"split": video["split"]} if "split" in video else {}
        rows.append(_make_row(video_id, grouped[video_id], video=source.media(video_id + video_extension), **split))
    return rows


def _parse_karpathy(data: Any, source: _Source) -> list[Row]:
    """Karpathy COCO / Flickr30k split file; media ``<root>/<filepath>/<filename>``."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise source.error("expected {'images': [...]} (Karpathy split format)")
    rows = []
    for index, image in enumerate(data["images"]):
        if "filename" not in image:
            raise source.error("missing 'filename'", f"images[{index}]")
        sentences = image.get("sentences") or []
        raw = [sentence.get("raw", " ".join(sentence.get("tokens", []))) for sentence in sentences]
        if not raw:
            raise source.error("missing 'sentences' (captions)", f"images[{index}]")
        captions = _captions(raw, source, f"images[{index}]")
        item_id = image.get("cocoid", image.get("imgid", image["filename"]))
        media = source.media(os.path.join(image.get("filepath", ""), image["filename"]))
        split = {"split": image["split"]} if "split" in image else {}
        rows.append(_make_row(item_id, captions, image=media, **split))
    return rows


# ------------------------------------------------------------------------------------------------------ CSV formats


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV file."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _parse_audiocaps(records: list[dict[str, str]], source: _Source, audio_extension: str) -> list[Row]:
    """AudioCaps: one caption per line, grouped by ``youtube_id``; media ``<root>/<youtube_id><ext>``."""
    start_times: dict[str, float] = {}

    def captions() -> Iterable[tuple[str, Any, str]]:
        for number, record in enumerate(records, start=2):  # line 1 is the header
            line = f"line {number}"
            youtube_id = (record.get("youtube_id") or "").strip()
            if not youtube_id:
                raise source.error("missing 'youtube_id'", line)
            if record.get("start_time"):
                try:
                    start_times.setdefault(youtube_id, float(record["start_time"]))
                except ValueError:
                    raise source.error(f"'start_time' is not a number: {record['start_time']!r}", line) from None
            yield youtube_id, record.get("caption") or "", line

    grouped = _group_captions(captions(), source)
    return [
        _make_row(
            youtube_id,
            caps,
            audio=source.media(youtube_id + audio_extension),
            **({"start_time": start_times[youtube_id]} if youtube_id in start_times else {}),
        )
        for youtube_id, caps in grouped.items()
    ]


def _parse_clotho(records: list[dict[str, str]], header: Sequence[str], source: _Source) -> list[Row]:
    """Clotho: ``file_name`` plus ``caption_1..caption_N`` per line; media ``<root>/<file_name>``."""
    caption_columns = sorted((c for c in header if c.startswith("caption_")), key=lambda c: int(c.split("_")[1]))
    rows = []
    for number, record in enumerate(records, start=2):
        line = f"line {number}"
        file_name = (record.get("file_name") or "").strip()
        if not file_name:
            raise source.error("missing 'file_name'", line)
        captions = _captions([record.get(c) or "" for c in caption_columns], source, line)
        rows.append(_make_row(file_name, captions, audio=source.media(file_name)))
    return rows


# ------------------------------------------------------------------------------------------------- detection / API


def _detect_json(data: Any, source: _Source, keys: Sequence[str]) -> str:
    """Name the JSON format from its structure (`keys`: the media columns)."""
    if isinstance(data, dict):
        if "images" in data:
            return "karpathy"
        if "videos" in data and "sentences" in data:
            return "msrvtt"
    elif isinstance(data, list) and data and isinstance(data[0], dict):
        if any(key in data[0] for key in keys):
            return "mico"
        if "video_id" in data[0] or "clip_name" in data[0]:
            return "msrvtt"
    raise source.error(f"cannot detect the annotation format; pass format= one of {FORMATS}")


def _detect_csv(header: Sequence[str], source: _Source) -> str:
    """Name the CSV format from its header."""
    if "youtube_id" in header and "caption" in header:
        return "audiocaps"
    if "file_name" in header and any(column.startswith("caption_") for column in header):
        return "clotho"
    raise source.error(f"unknown CSV header {list(header)}; expected AudioCaps or Clotho columns")


def load_annotations(
    path: str | os.PathLike,
    format: str = "auto",
    media_root: str | os.PathLike | None = None,
    split: str | None = None,
    video_extension: str = ".mp4",
    audio_extension: str = ".wav",
    config: MiCoConfig | None = None,
) -> list[Row]:
    """Load an annotation file, or a 🤗 `datasets` folder (`open_media_dataset`), into MiCo rows (see the module
    docstring for the formats).

    Args:
        path: the annotation file (``.json``, ``.jsonl`` or ``.csv``) or a data set folder, whose media values
            (`{"path", "bytes"}` dicts or paths) go to the processor as they are.
        format: ``"auto"`` (from the extension and content) or one of `FORMATS`.
        media_root: directory the media paths are relative to; defaults to the annotation file's directory.
        split: keep only rows of this split (Karpathy ``split``, MSR-VTT official ``split``, or a ``split`` field of
            MiCo rows); an error for a file without split information. For a data set folder: its split.
        video_extension: extension appended to MSR-VTT video ids.
        audio_extension: extension appended to AudioCaps YouTube ids.
        config: the model's configuration, whose modalities name the media columns of MiCo rows (`media_keys`);
            default: the built-in modalities.
    """
    path = Path(path)
    if path.is_dir():
        return dataset_rows(open_media_dataset(path, split, config=config), path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the annotation file is empty")
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"{path}: unknown annotation format {format!r}; expected 'auto' or one of {FORMATS}")
    source = _Source(path, media_root)
    if path.suffix.lower() == ".csv":
        header, records = _read_csv(path)
        format = _detect_csv(header, source) if format == "auto" else format
        parsers: dict[str, Callable[[], list[Row]]] = {
            "audiocaps": lambda: _parse_audiocaps(records, source, audio_extension),
            "clotho": lambda: _parse_clotho(records, header, source),
        }
    else:
        data = _read_json_or_lines(path)
        if not data:
            raise source.error("the annotation file holds no rows")
        keys = media_keys(config)
        format = _detect_json(data, source, keys) if format == "auto" else format
        parsers = {
            "mico": lambda: _parse_mico(data, source, keys),
            "msrvtt": lambda: _parse_msrvtt(data, source, video_extension),
            "karpathy": lambda: _parse_karpathy(data, source),
            "coco": lambda: _parse_karpathy(data, source),
        }
    if format not in parsers:
        raise source.error(f"format {format!r} does not apply to a {path.suffix or 'extension-less'} file")
    rows = parsers[format]()
    if not rows:
        raise source.error("the annotation file holds no rows")
    return _filter_split(rows, split, source)


def flatten_captions(rows: Sequence[Row]) -> tuple[list[str], list[int]]:
    """All captions in row order and the row index of each: the `(texts, text_to_item)` of `retrieval_metrics`."""
    texts: list[str] = []
    text_to_item: list[int] = []
    for index, row in enumerate(rows):
        captions = row.get("captions") or ([row["caption"]] if row.get("caption") else [])
        if not captions:
            raise ValueError(f"row {index} (id {row.get('id')!r}) has no caption")
        texts.extend(captions)
        text_to_item.extend([index] * len(captions))
    return texts, text_to_item


# ------------------------------------------------------------------------------------------ training data sets


def check_columns(dataset, columns: Sequence[str] | None, source: str | os.PathLike) -> None:
    """Refuse requested annotation `columns` (e.g. `--modalities`) that no row of `dataset` has: training would
    silently go without them. A streamed data set is checked by its column names only."""
    names = dataset.column_names
    for column in columns or ():
        if names is not None and column not in names:
            raise ValueError(f"{source}: no row has the requested column {column!r} (columns: {sorted(names)})")
        if hasattr(dataset, "__len__") and not any(is_present(value) for value in dataset[column]):
            raise ValueError(f"{source}: no row has a value in the requested column {column!r}")


def _resolve_row(row: dict, root: str, columns: Sequence[str]) -> dict:
    """Join relative media paths (string values of the media `columns`, and `.txt` subtitle paths) to `root`; media
    values of 🤗 Datasets features (`{"path", "bytes"}` dicts) are kept as they are."""
    resolved = {}
    for column in (*columns, SUBTITLE):
        value = row.get(column)
        is_path = isinstance(value, str) and (column != SUBTITLE or value.endswith(".txt"))
        if is_present(value) and is_path:
            resolved[column] = os.path.join(root, value)
    return resolved


def check_caption_column(found: Sequence[str], where: str) -> None:
    """Training and evaluation rows need their text: refuse a data set without `caption` / `captions`."""
    if "caption" not in found and "captions" not in found:
        raise ValueError(f"{where}: rows need a `caption` or `captions` column, found {list(found)}")


def open_media_dataset(
    path: str | os.PathLike, split: str | None = None, streaming: bool = False, config: MiCoConfig | None = None
):  # -> datasets.Dataset | datasets.IterableDataset
    """A 🤗 `datasets` data set from a folder: the output of `save_to_disk` (`load_from_disk`) or any folder that
    `datasets.load_dataset(folder)` reads (image/audio/video folders with a metadata file, parquet/JSON lines/CSV
    files). Columns named like the model's media columns (`image`, `video`, `audio`, ...) may be `Image` / `Audio` /
    `Video` features or paths (relative ones are joined to the folder).

    Media features are left undecoded (`{"path", "bytes"}`): the processor decodes them in the DataLoader workers
    with the same pipeline as files, so the tensors equal those of the file paths and torchcodec is not needed.

    Args:
        path: the data set folder.
        split: the split to use when the folder holds several (`DatasetDict`); for one data set, rows whose `split`
            column equals it.
        streaming: return an `IterableDataset`.
        config: the model's configuration, whose modalities name the media columns; default: the built-in ones.
    """
    import datasets

    folder = os.path.abspath(os.fspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"data set folder not found: {folder}")
    saved = any(os.path.isfile(os.path.join(folder, name)) for name in ("dataset_dict.json", "state.json"))
    try:
        data = datasets.load_from_disk(folder) if saved else datasets.load_dataset(folder, streaming=streaming)
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        raise ValueError(f"{folder}: not a data set that datasets can load ({err})") from err
    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split is None and len(data) > 1:
            raise ValueError(f"{folder}: holds the splits {list(data)}; choose one (split=)")
        if split is not None and split not in data:
            raise ValueError(f"{folder}: has no split {split!r}; it holds {list(data)}")
        data = data[split if split is not None else next(iter(data))]
    elif split is not None:
        if "split" not in data.column_names:
            raise ValueError(
                f"{folder}: split={split!r} was requested but the data set has no splits nor 'split' column"
            )
        data = data.filter(lambda row: row["split"] == split)
    if saved and streaming:
        data = data.to_iterable_dataset()
    media = (datasets.Image, datasets.Audio, datasets.Video)
    for column, feature in (data.features or {}).items():
        if isinstance(feature, media) and feature.decode:
            data = data.cast_column(column, dataclasses.replace(feature, decode=False))
    check_caption_column(data.column_names or [], folder)
    return data.map(_resolve_row, fn_kwargs={"root": folder, "columns": media_keys(config)})


def dataset_rows(dataset, where: str | os.PathLike) -> list[Row]:
    """The rows of a 🤗 `datasets` data set (`open_media_dataset`) in the package format of `load_annotations`:
    `id` (the `id` column, else the index), `captions`, `caption` and the media columns' values as they are;
    `where` names the data set in errors."""
    source = _Source(Path(where), None)
    rows = []
    for index, record in enumerate(dataset):
        if not is_present(record.get("captions")) and not is_present(record.get("caption")):
            raise source.error("missing 'caption' / 'captions'", index)
        captions = _captions(record.get("captions") or record.get("caption"), source, index)
        extra = {key: value for key, value in record.items() if key not in ("id", "caption", "captions")}
        rows.append(_make_row(record.get("id", index), captions, **extra))
    return rows


def load_annotation_dataset(
    data_files: str | os.PathLike | Sequence[str | os.PathLike],
    streaming: bool = False,
    config: MiCoConfig | None = None,
    split: str | None = None,
):  # -> datasets.Dataset | datasets.IterableDataset
    """Read one or several annotation files (`.jsonl`, `.json`, `.csv`, `.parquet`) into one `datasets` data set
    whose media paths are absolute (each file's relative paths are resolved against its own directory), or open a
    data set folder (`open_media_dataset`: `save_to_disk` output or a folder `load_dataset` reads, with `Image` /
    `Audio` / `Video` columns).

    Args:
        data_files: the annotation file(s), or one data set folder.
        streaming: return an `IterableDataset` that reads the files lazily.
        config: the model's configuration, whose modalities name the media columns (`media_keys`); default: the
            built-in modalities.
        split: the split of a data set folder (see `open_media_dataset`).
    """
    import datasets

    files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    if not files:
        raise ValueError("give at least one annotation file")
    if len(files) == 1 and os.path.isdir(files[0]):
        return open_media_dataset(files[0], split, streaming, config)
    columns = media_keys(config)
    parts = []
    for file in files:
        file = os.path.abspath(os.fspath(file))
        builder = ANNOTATION_BUILDERS.get(os.path.splitext(file)[1].lower())
        if builder is None:
            raise ValueError(f"{file}: annotation files must end in one of {sorted(ANNOTATION_BUILDERS)}")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"annotation file not found: {file}")
        if os.path.getsize(file) == 0:
            raise ValueError(f"{file}: the annotation file is empty")
        dataset = datasets.load_dataset(builder, data_files=file, split="train", streaming=streaming)
        if not streaming and len(dataset) == 0:
            raise ValueError(f"{file}: the annotation file holds no rows")
        check_caption_column(dataset.column_names or [], file)
        parts.append(dataset.map(_resolve_row, fn_kwargs={"root": os.path.dirname(file), "columns": columns}))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
