"""Zero-shot classification of media files with your own labels, and its accuracy where the labels are known.

Inputs are an annotation file (JSON / JSON lines rows with one media path column per modality, relative to the
file, and a label column, possibly nested: `attributes.color`) or a folder: with one sub-folder per class, each
sub-folder's name is the label of the files under it; otherwise the files are unlabelled. Scores are those of the
`zero-shot-*-classification` pipelines of `pipelines_mico` (cosine similarity / temperature, softmax over the
labels, one prompt template per modality), computed in batches. `examples/run_zero_shot_classification.py` is the
command line around [`classify_items`] and [`load_labelled_items`], and (`--attributes`) around
[`attribute_accuracy`]: the accuracy per modality and attribute on the synthetic data's held-out split, against chance.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .annotations import _read_json_or_lines
from .captioning import collect_media_files
from .pipelines_mico import default_template
from .search import embed_items, embed_texts, media_items


def nested_value(row: Mapping[str, Any], column: str, where: str) -> Any:
    """`row[column]`, where `a.b` reads `row["a"]["b"]`; a missing key is an error naming `where`."""
    value: Any = row
    for key in column.split("."):
        if not isinstance(value, Mapping) or key not in value:
            raise KeyError(f"{where}: no column {column!r}")
        value = value[key]
    return value


def load_labelled_items(
    inputs: str | os.PathLike,
    config: Any,
    modalities: Sequence[str] | None = None,
    label_column: str | None = None,
) -> tuple[list[dict[str, str]], list[str | None]]:
    """Media items (`{modality: path}`) and their labels (`None` when unknown) from an annotation file or a folder.

    Args:
        inputs: an annotation file (`.json` / `.jsonl`) or a folder (one sub-folder per class, or plain files).
        config: the model's configuration (its modalities and their file extensions).
        modalities: media columns of an annotation file to classify together (several go through the fused head);
            for a folder, the modality of every file (default: by extension, a video with a same-named sound clip
            as one item).
        label_column: the label column of an annotation file (`attributes.color` reads a nested value).
    """
    path = Path(inputs)
    specs = config.modality_specs
    for name in modalities or ():
        if name not in specs:
            raise ValueError(f"unknown modality {name!r}; this model takes {list(specs)}")
    if path.is_file():
        if not modalities:
            raise ValueError(f"{path}: say which media columns to classify (modalities, e.g. ['video'])")
        rows = _read_json_or_lines(path)
        if not isinstance(rows, list) or not all(isinstance(row, Mapping) for row in rows):
            raise ValueError(f"{path}: expected a list of rows (JSON objects)")
        items = [
            {name: str(path.parent / nested_value(row, name, f"{path}, row {number}")) for name in modalities}
            for number, row in enumerate(rows, start=1)
        ]
        labels = [
            str(nested_value(row, label_column, f"{path}, row {number}")) if label_column else None
            for number, row in enumerate(rows, start=1)
        ]
        return items, labels
    if not path.is_dir():
        raise FileNotFoundError(f"inputs {path} is neither an annotation file nor a folder")
    modality = modalities[0] if modalities and len(modalities) == 1 else None
    classes = sorted(child for child in path.iterdir() if child.is_dir())
    if not classes:
        files = collect_media_files([path], config, modality)
        return media_items(files, config, modality=modality), [None] * len(files)
    items, labels = [], []
    for folder in classes:
        found = media_items(collect_media_files([folder], config, modality), config, modality=modality)
        items += found
        labels += [folder.name] * len(found)
    return items, labels


@torch.no_grad()
def classify_items(
    model: Any,
    processor: Any,
    items: list[Mapping[str, Any]],
    labels: Sequence[str],
    template: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> np.ndarray:
    """Probabilities `(len(items), len(labels))` of each label for each item: softmax over the labels of the cosine
    similarities divided by the model's temperature, each label written into `template` (default: the template of
    the items' first modality, as the pipelines)."""
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be at least two distinct strings, got {list(labels)}")
    template = template or default_template(tuple(sorted(items[0], key=lambda name: name != "video")))
    if "{}" not in template:
        raise ValueError(f"template must contain '{{}}' for the label, got {template!r}")
    media, _ = embed_items(model, processor, list(items), batch_size, progress)
    text = embed_texts(model, processor, [template.format(label) for label in labels])
    logits = torch.from_numpy(media @ text.T) / model.temperature.detach().float().cpu()
    return logits.softmax(dim=-1).numpy()


def accuracy(probabilities: np.ndarray, labels: Sequence[str], truth: Sequence[str | None]) -> float | None:
    """Share of items whose best label is their true one (`None` when no item has a known label); a true label
    outside `labels` is an error."""
    known = [(row, label) for row, label in zip(probabilities, truth) if label is not None]
    if not known:
        return None
    unknown = sorted({label for _, label in known} - set(labels))
    if unknown:
        raise ValueError(f"true labels {unknown} are not among the candidate labels {list(labels)}")
    return float(np.mean([labels[int(np.argmax(row))] == label for row, label in known]))


DATASET_INFO = "dataset_info.json"  # written beside the annotation files by `make_synthetic_dataset`


def attribute_prompts(info: Mapping[str, Any], attribute: str, value: str, count: int, seed: int = 0) -> list[str]:
    """`count` captions of the dataset's grammar (`info["caption_templates"]`) naming `value` for `attribute`, the
    other attributes drawn at random (fixed `seed`): the prompt ensemble of one candidate label."""
    rng = np.random.default_rng(
        [seed, sorted(info["attributes"]).index(attribute), info["attributes"][attribute].index(value)]
    )
    templates, vocabularies = info["caption_templates"], info["attributes"]
    prompts = []
    for _ in range(count):
        filling = {name: values[rng.integers(len(values))] for name, values in vocabularies.items()}
        prompts.append(templates[rng.integers(len(templates))].format(**{**filling, attribute: value}))
    return prompts


@torch.no_grad()
def attribute_accuracy(
    model: Any,
    processor: Any,
    annotation_file: str | os.PathLike,
    modalities: Sequence[str],
    template: str | None = None,
    prompts_per_label: int = 16,
    batch_size: int = 16,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Zero-shot accuracy of every modality on every attribute of a synthetic dataset's split (rows with an
    `attributes` dict; `dataset_info.json` beside the file gives each attribute's vocabulary and the caption grammar).

    For each attribute the candidate labels are its whole vocabulary, and the best-scoring one (cosine similarity of
    the normalised embeddings) is the prediction. A label's text embedding is the normalised mean of the embeddings of
    `prompts_per_label` captions of the dataset's grammar naming it, the other attributes drawn at random (prompt
    ensembling: the model has seen only full captions), or of `template` with the label (`"a {} shape"`) when given.
    An attribute a modality does not express should score at chance: a control.

    Args:
        modalities: modalities to classify, each separately; `"video+audio"` classifies a row's video and audio
            together through their fused head.

    Returns:
        One row per (modality, attribute): `modality`, `attribute`, `accuracy`, `chance` (1 / vocabulary size),
        `items`.
    """
    path = Path(annotation_file)
    info_file = path.parent / DATASET_INFO
    if not info_file.is_file():
        raise FileNotFoundError(f"{info_file} not found: attribute accuracy needs a synthetic dataset's split")
    info = json.loads(info_file.read_text(encoding="utf-8"))
    if template is not None and "{}" not in template:
        raise ValueError(f"template must contain '{{}}' for the label, got {template!r}")
    rows = _read_json_or_lines(path)
    results = []
    for entry in modalities:
        items, _ = load_labelled_items(path, model.config, entry.split("+"))
        media, _ = embed_items(model, processor, items, batch_size, progress)
        for attribute, values in info["attributes"].items():
            truth = [nested_value(row, f"attributes.{attribute}", f"{path}, row {n}") for n, row in enumerate(rows, 1)]
            if template is not None:
                labels = embed_texts(model, processor, [template.format(value) for value in values])
            else:
                ensembles = [attribute_prompts(info, attribute, value, prompts_per_label) for value in values]
                texts = embed_texts(model, processor, [prompt for prompts in ensembles for prompt in prompts])
                labels = texts.reshape(len(values), prompts_per_label, -1).mean(axis=1)
                labels /= np.linalg.norm(labels, axis=-1, keepdims=True)
            predicted = [values[int(index)] for index in np.argmax(media @ labels.T, axis=-1)]
            results.append(
                {
                    "modality": entry,
                    "attribute": attribute,
                    "accuracy": float(np.mean([a == b for a, b in zip(predicted, truth)])),
                    "chance": 1 / len(values),
                    "items": len(items),
                }
            )
    return results


__all__ = ["accuracy", "attribute_accuracy", "classify_items", "load_labelled_items"]
