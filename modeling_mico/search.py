"""Search over your own media: embed a folder once, then answer text and media queries, any modality to any.

[`build_index`] embeds every media file of the model's modalities (images, videos, audio clips, depth `.npy` maps,
declared modalities by their extensions) in batches with a progress bar, into MiCo's normalised contrastive space. A
video with a sound clip of the same name beside it (`clip.mp4` + `clip.wav`) is one item embedded with the fused `va`
head, as MiCo retrieves best; with `sound_tracks=True` every video's own sound track is used (needs a processor that
decodes audio from video files). The index is a 🤗 `datasets` dataset (`path`, `modality`, `size`, `mtime_ns`,
`embedding`) with a FAISS inner-product index over `embedding`, written atomically; building again into the same index
re-embeds only new or changed files. [`search`] ranks the indexed items for a text, a media file or a
`{"video": ..., "audio": ...}` query by cosine similarity. `examples/run_search.py` is the command line around them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.utils import logging

from .captioning import collect_media_files, media_modality


logger = logging.get_logger(__name__)

INFO_FILE = "search_index.json"
DATASET_DIR = "dataset"
FAISS_FILE = "embedding.faiss"
COLUMN = "embedding"


def require_faiss() -> Any:
    """The `faiss` module (faiss-cpu), with install advice when missing."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError("search needs FAISS: pip install faiss-cpu (a dependency of mico-transformers)") from error
    return faiss


def media_items(
    files: Iterable[Path], config: Any, sound_tracks: bool = False, modality: str | None = None
) -> list[dict[str, str]]:
    """Items to embed, `{modality: absolute path}` each: one per file, except that a video and an audio clip of the same stem
    in the same folder make one `{"video", "audio"}` item (and with `sound_tracks`, every video brings its own
    sound)."""
    files = [Path(path).resolve() for path in files]
    modalities = {path: media_modality(path, config, modality) for path in files}
    audio_of = {path.with_suffix(""): path for path, name in modalities.items() if name == "audio"}
    items, paired = [], set()
    for path, name in modalities.items():
        if name == "video" and "audio" in config.modality_specs:
            sound = audio_of.get(path.with_suffix(""), path if sound_tracks else None)
            if sound is not None:
                items.append({"video": str(path), "audio": str(sound)})
                paired.add(sound)
                continue
        items.append({name: str(path)})
    return [item for item in items if not (len(item) == 1 and Path(next(iter(item.values()))) in paired)]


def item_key(item: Mapping[str, str]) -> str:
    """The `path` column of an item: its file, or `video + audio` files joined by ` + `."""
    return " + ".join(item[name] for name in sorted(item, key=lambda name: name != "video"))


def _processed(processor: Any, specs: Mapping[str, Any], items: list[Mapping[str, Any]], skip_broken: bool) -> tuple:
    """`(indices of the items that decoded, their model inputs)`. A file that cannot be decoded raises
    `BrokenMediaError` naming it, or with `skip_broken` is left out with a warning."""
    from .data import BrokenMediaError

    def process(batch: list[Mapping[str, Any]]) -> dict:
        names = sorted(batch[0])
        return processor(**{specs[name].processor_argument: [item[name] for item in batch] for name in names})

    try:
        return list(range(len(items))), process(items)
    except ImportError:
        raise
    except Exception:  # find which file it is: decode the items one by one
        kept = []
        for index, item in enumerate(items):
            try:
                process([item])
            except ImportError:
                raise
            except Exception as error:
                if not skip_broken:
                    raise BrokenMediaError(
                        f"cannot decode {item_key(item)}: {error} (--skip_broken skips such files)"
                    ) from error
                logger.warning(f"skipping {item_key(item)}: cannot decode it: {error}")
                continue
            kept.append(index)
        return kept, (process([items[i] for i in kept]) if kept else None)


@torch.no_grad()
def embed_items(
    model: Any,
    processor: Any,
    items: list[Mapping[str, Any]],
    batch_size: int = 8,
    progress: bool = True,
    skip_broken: bool = False,
) -> tuple[np.ndarray, list[int]]:
    """Normalised embeddings `(number embedded, projection_dim)` float32 of media items (`{modality: value}`, several
    modalities through their fused head), batched by the modalities they hold, and the indices of the items they
    belong to (all of them, unless `skip_broken` left undecodable ones out)."""
    specs = model.config.modality_specs
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(tuple(sorted(item)), []).append(index)
    embedded: dict[int, np.ndarray] = {}
    with tqdm(total=len(items), desc="embedding", unit="item", disable=not progress) as bar:
        for names, indices in groups.items():
            for start in range(0, len(indices), batch_size):
                batch = indices[start : start + batch_size]
                kept, features = _processed(processor, specs, [items[i] for i in batch], skip_broken)
                bar.update(len(batch))
                if features is None:
                    continue
                inputs = {key: value.to(model.device, model.dtype) for key, value in features.items()}
                if len(names) == 1:
                    output = model.get_modality_features(names[0], inputs[specs[names[0]].input_name])
                else:
                    output = model.get_fused_features(**inputs)
                vectors = F.normalize(output.pooler_output.float(), dim=-1).cpu().numpy()
                embedded.update({batch[k]: vector for k, vector in zip(kept, vectors)})
    order = sorted(embedded)
    dimension = model.config.projection_dim
    vectors = np.stack([embedded[i] for i in order]) if order else np.zeros((0, dimension), np.float32)
    return vectors, order


@torch.no_grad()
def embed_texts(model: Any, processor: Any, texts: list[str]) -> np.ndarray:
    """Normalised text embeddings `(len(texts), projection_dim)` float32."""
    encoded = processor(text=texts, return_tensors="pt")
    output = model.get_text_features(encoded["input_ids"].to(model.device), encoded["attention_mask"].to(model.device))
    return F.normalize(output.pooler_output.float(), dim=-1).cpu().numpy()


def file_state(item: Mapping[str, str]) -> tuple[int, int]:
    """`(size, mtime_ns)` summed over an item's files: what tells a changed file on a second run."""
    stats = [os.stat(path) for path in item.values()]
    return sum(stat.st_size for stat in stats), sum(stat.st_mtime_ns for stat in stats)


def is_index(directory: Path) -> bool:
    return (directory / INFO_FILE).is_file()


def load_index(directory: str | os.PathLike) -> Any:
    """The indexed dataset of `directory` with its FAISS index attached to the `embedding` column."""
    from datasets import load_from_disk

    directory = Path(directory)
    if not is_index(directory):
        raise FileNotFoundError(f"{directory} is not a search index ({INFO_FILE} missing); build one with build_index")
    dataset = load_from_disk(str(directory / DATASET_DIR))
    dataset.load_faiss_index(COLUMN, str(directory / FAISS_FILE))
    return dataset


def build_index(
    model: Any,
    processor: Any,
    inputs: Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    batch_size: int = 8,
    sound_tracks: bool = False,
    modality: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    skip_broken: bool = False,
) -> dict[str, int]:
    """Embed the media files of `inputs` (files and folders, recursively) into the search index `output_dir`.

        `output_dir` must be new, empty, or an index built before (then only new or changed files are embedded and
        files gone are dropped); anything else needs `overwrite=True`. The new index is written beside it and swapped in,
        so an interrupted run leaves the old one intact. An undecodable file stops the run naming it before anything is
    written, or with `skip_broken` is left out (and tried again on the next run). Returns `{"items", "embedded", "kept",
    "skipped"}` counts.
    """
    from datasets import Dataset

    faiss = require_faiss()
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"output_dir {output_dir} is a file")
    previous = {}
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if is_index(output_dir) and not overwrite:
            info = json.loads((output_dir / INFO_FILE).read_text())
            if info["projection_dim"] != model.config.projection_dim:
                raise ValueError(
                    f"{output_dir} holds {info['projection_dim']}-d embeddings of {info['model']}, this model gives "
                    f"{model.config.projection_dim}-d ones; use a new output_dir or overwrite=True"
                )
            old = load_index(output_dir)
            old.drop_index(COLUMN)
            previous = {row["path"]: row for row in old}
        elif not overwrite:
            raise FileExistsError(f"output_dir {output_dir} is not empty; pass overwrite=True to replace it")
    files = collect_media_files(inputs, model.config, modality)
    if not files:
        raise ValueError(
            f"no media files of the model's modalities ({', '.join(model.config.modality_specs)}) in {inputs}"
        )
    items = media_items(files, model.config, sound_tracks, modality)
    rows, pending = [], []
    for item in items:
        key, (size, mtime_ns) = item_key(item), file_state(item)
        old = previous.get(key)
        if old is not None and (old["size"], old["mtime_ns"]) == (size, mtime_ns):
            rows.append(old)
        else:
            pending.append(
                (item, {"path": key, "modality": "+".join(sorted(item)), "size": size, "mtime_ns": mtime_ns})
            )
    embeddings, embedded = embed_items(
        model, processor, [item for item, _ in pending], batch_size, progress, skip_broken
    )
    rows += [{**pending[index][1], COLUMN: embedding.tolist()} for index, embedding in zip(embedded, embeddings)]
    rows.sort(key=lambda row: row["path"])
    dataset = Dataset.from_list(rows)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        dataset.save_to_disk(str(staging / DATASET_DIR))
        dataset.add_faiss_index(COLUMN, metric_type=faiss.METRIC_INNER_PRODUCT)
        dataset.save_faiss_index(COLUMN, str(staging / FAISS_FILE))
        info = {
            "model": str(model.config.name_or_path),
            "projection_dim": model.config.projection_dim,
            "items": len(rows),
        }
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if output_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old.", dir=output_dir.parent))
            os.replace(output_dir, retired / output_dir.name)
            os.replace(staging, output_dir)
            shutil.rmtree(retired)
        else:
            os.replace(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    skipped = len(pending) - len(embedded)
    return {"items": len(rows), "embedded": len(embedded), "kept": len(rows) - len(embedded), "skipped": skipped}


def query_embedding(model: Any, processor: Any, query: str | os.PathLike | Mapping[str, Any]) -> np.ndarray:
    """The normalised embedding `(projection_dim,)` of a query: `{"text": ...}`, a `{modality: value}` dict, an
    existing media file (its modality by extension), or any other string as text."""
    if isinstance(query, Mapping) and set(query) == {"text"}:
        return embed_texts(model, processor, [str(query["text"])])[0]
    if isinstance(query, Mapping):
        return embed_items(model, processor, [dict(query)], progress=False)[0][0]
    path = Path(query)
    if path.is_file():
        name = media_modality(path, model.config)
        if name is None:
            raise ValueError(f"query {path}: unknown media extension; pass a {{modality: path}} dict")
        return embed_items(model, processor, [{name: str(path)}], progress=False)[0][0]
    if isinstance(query, os.PathLike):
        raise FileNotFoundError(f"query {query} does not exist")
    return embed_texts(model, processor, [str(query)])[0]


def search(
    index: Any, model: Any, processor: Any, query: str | os.PathLike | Mapping[str, Any], k: int = 5
) -> list[dict[str, Any]]:
    """The `k` indexed items most similar to `query` (see `query_embedding`), best first: `{"path", "modality",
    "score"}` with the cosine similarity as score. `index` is a directory or a dataset from [`load_index`]."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    dataset = load_index(index) if isinstance(index, (str, os.PathLike)) else index
    scores, found = dataset.get_nearest_examples(
        COLUMN, query_embedding(model, processor, query), k=min(k, len(dataset))
    )
    return [
        {"path": path, "modality": name, "score": float(score)}
        for path, name, score in zip(found["path"], found["modality"], scores)
    ]


__all__ = ["build_index", "embed_items", "embed_texts", "load_index", "media_items", "query_embedding", "search"]
