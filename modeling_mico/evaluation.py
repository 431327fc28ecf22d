"""Zero-shot cross-modal retrieval evaluation of MiCo, as the original MiCo/VAST evaluation runs it.

Every caption and every item is encoded once (batched): the caption through the text branch, each item through the
shared ViT, from whose tokens come both the pooled contrastive features and, for matching re-ranking, the multimodal
context. Retrieval targets are single modalities (``video``, ``audio``, ``image``, ``depth``, ``normal``) or fused
combinations through the model's fused heads (``va`` = video + audio, ``id`` = image + depth). The similarity of a
caption and an item is the cosine of their contrastive embeddings; optionally each query's top-k candidates are
re-ranked by the matching head over the item's multimodal context (the original's ``itm_rerank_num``).

Result keys follow `retrieval.retrieval_metrics`: ``t2v/R@1`` ... ``v2t/MeanR`` from the contrastive similarity, and
with re-ranking the same keys under ``itm/`` (``itm/t2v/R@1``); plus ``num_items``, ``num_texts`` and the chance level
``chance/R@1`` = 100 / num_items.

The module also provides what `Trainer` needs to report retrieval during fine-tuning: `MiCoRetrievalTrainer` returns
the batch's text and item embeddings as predictions and `retrieval_compute_metrics(targets)` turns them into metrics.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoProcessor, EvalPrediction, Trainer
from transformers.utils import logging

from .annotations import flatten_captions
from .configuration_mico import MiCoConfig
from .data import MEDIA_COLUMNS, processor_for_config
from .processing_mico import MiCoProcessor
from .retrieval import rerank_top_k as rerank
from .retrieval import retrieval_metrics


logger = logging.get_logger(__name__)

# Retrieval target -> the annotation columns it needs (one: its contrastive head; several: the fused head combining
# their modalities).
RETRIEVAL_TARGETS: dict[str, tuple[str, ...]] = {
    "video": ("video",),
    "audio": ("audio",),
    "image": ("image",),
    "depth": ("depth",),
    "normal": ("normal",),
    "va": ("video", "audio"),
    "id": ("image", "depth"),
}

# Retrieval target -> name of its text->item direction (the item->text direction is the reverse, e.g. "v2t").
TARGET_PREFIXES = {
    "video": "t2v",
    "audio": "t2a",
    "image": "t2i",
    "depth": "t2d",
    "normal": "t2n",
    "va": "t2va",
    "id": "t2id",
}

# Key namespace of the matching-head re-ranked results.
RERANK_NAMESPACE = "itm"


# --------------------------------------------------------------------------------------------------------------------
# Set-up helpers
# --------------------------------------------------------------------------------------------------------------------


def resolve_device_and_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`auto` picks CUDA when present, and bfloat16 on a GPU that supports it (float32 otherwise)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return device, torch.bfloat16 if bf16 else torch.float32
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return device, getattr(torch, dtype)


def load_processor(model_name_or_path: str, config: MiCoConfig, num_frames: int | None = None) -> MiCoProcessor:
    """The processor saved with the model, or (when the model has none) the default one at the model's input size."""
    try:
        processor = AutoProcessor.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as err:
        logger.warning(
            f"no processor found with {model_name_or_path} ({type(err).__name__}); using the default MiCoProcessor at "
            f"the model's image size {config.vision_config.image_size}"
        )
        processor = processor_for_config(config)
    if num_frames:
        processor.num_frames = num_frames
    return processor


def target_columns(targets: Sequence[str]) -> list[str]:
    """The annotation columns needed by `targets`, each once, in first-use order."""
    unknown = [target for target in targets if target not in RETRIEVAL_TARGETS]
    if unknown:
        raise ValueError(f"unknown retrieval targets {unknown}; choose among {list(RETRIEVAL_TARGETS)}")
    return list(dict.fromkeys(column for target in targets for column in RETRIEVAL_TARGETS[target]))


def column_modality(column: str, config: MiCoConfig) -> str:
    """The knowledge modality that encodes an annotation column, refusing one the model was not configured with."""
    modality = MEDIA_COLUMNS[column][2]
    if modality not in config.knowledge_modalities:
        raise ValueError(
            f"the model has no {modality!r} modality for the {column!r} column; "
            f"its knowledge modalities are {list(config.knowledge_modalities)}"
        )
    return modality


def fused_head_name(config: MiCoConfig, modalities: Sequence[str]) -> str:
    """The fused head combining exactly `modalities` (`config.fused_heads`)."""
    for name, parts in config.fused_heads.items():
        if set(parts) == set(modalities):
            return name
    raise ValueError(f"no fused head combines {sorted(modalities)}; configured: {dict(config.fused_heads)}")


def item_embeddings(model: torch.nn.Module, pooled: dict[str, torch.Tensor], target: str) -> torch.Tensor:
    """L2-normalised contrastive embeddings of a target from the pooled (pre-head) features of its columns."""
    config = model.config
    columns = RETRIEVAL_TARGETS[target]
    if len(columns) == 1:
        features = model.contrastive_heads[column_modality(columns[0], config)](pooled[columns[0]])
    else:
        by_modality = {column_modality(column, config): pooled[column] for column in columns}
        head = fused_head_name(config, list(by_modality))
        features = model.fused_heads[head](torch.cat([by_modality[part] for part in config.fused_heads[head]], dim=-1))
    return F.normalize(features.float(), dim=-1)


def _context_rank(modality: str, config: MiCoConfig) -> int:
    """Position of a modality in the multimodal context (vision, audio, depth, then configured extras)."""
    return config.context_order.index(modality)


def _to_model(values: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    values = values.to(device)
    return values.to(dtype) if values.is_floating_point() else values


# --------------------------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class EncodedTexts:
    """Normalised contrastive text embeddings `(N, P)` (float32, CPU) and the tokens, kept for re-ranking."""

    embeds: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class EncodedItems:
    """Per column: pooled ViT features `(N, C)` and, when asked for, the multimodal context `(N, L, D)` (CPU)."""

    pooled: dict[str, torch.Tensor] = field(default_factory=dict)
    contexts: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module, processor: MiCoProcessor, texts: Sequence[str], batch_size: int = 16, progress: bool = True
) -> EncodedTexts:
    """Tokenize and embed every caption once, in batches."""
    device = model.device
    embeds, ids, masks = [], [], []
    for start in tqdm(range(0, len(texts), batch_size), desc="Encoding texts", disable=not progress):
        tokens = processor(text=list(texts[start : start + batch_size]), return_tensors="pt")
        features = model.get_text_features(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        embeds.append(F.normalize(features.float(), dim=-1).cpu())
        ids.append(tokens["input_ids"])
        masks.append(tokens["attention_mask"])
    return EncodedTexts(torch.cat(embeds), torch.cat(ids), torch.cat(masks))


@torch.no_grad()
def encode_items(
    model: torch.nn.Module,
    processor: MiCoProcessor,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    batch_size: int = 16,
    keep_context: bool = False,
    progress: bool = True,
) -> EncodedItems:
    """Decode and encode every item's media once per column: the ViT runs once and feeds both the pooled features
    and (with `keep_context`, for matching re-ranking) the bridged multimodal context, cached on the CPU."""
    device, dtype = model.device, model.dtype
    encoded = EncodedItems()
    for column in columns:
        modality = column_modality(column, model.config)
        argument, input_name, _ = MEDIA_COLUMNS[column]
        pooled, contexts = [], []
        for start in tqdm(range(0, len(rows), batch_size), desc=f"Encoding {column}", disable=not progress):
            paths = [row[column] for row in rows[start : start + batch_size]]
            values = processor(**{argument: paths}, return_tensors="pt")[input_name]
            tokens = model.encode_knowledge(modality, _to_model(values, device, dtype))
            pooled.append(model.pool_knowledge(tokens).cpu())
            if keep_context:
                contexts.append(model.context_from_tokens(modality, tokens).cpu())
        encoded.pooled[column] = torch.cat(pooled)
        if keep_context:
            encoded.contexts[column] = torch.cat(contexts)
    return encoded


def matching_score_fn(
    model: torch.nn.Module, texts: EncodedTexts, contexts: Sequence[torch.Tensor], items_first: bool = False
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`(text_indices, item_indices) -> matching probabilities` (`(item_indices, text_indices)` with `items_first`)
    over cached tokens and contexts; the contexts of several modalities are concatenated along the sequence, in
    context order."""
    device, dtype = model.device, model.dtype

    @torch.no_grad()
    def score(query_indices: torch.Tensor, candidate_indices: torch.Tensor) -> torch.Tensor:
        text_indices, item_indices = (
            (candidate_indices, query_indices) if items_first else (query_indices, candidate_indices)
        )
        context = torch.cat([part[item_indices] for part in contexts], dim=1)
        return (
            model.get_matching_scores(
                texts.input_ids[text_indices].to(device),
                texts.attention_mask[text_indices].to(device),
                context=_to_model(context, device, dtype),
            )
            .float()
            .cpu()
        )

    return score


# --------------------------------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class RetrievalScores:
    """Scores of a retrieval evaluation.

    similarity: per target, the contrastive `(num_texts, num_items)` cosine similarities.
    reranked_t2x, reranked_x2t: per target, with matching re-ranking, the text->item `(num_texts, num_items)` and the
        item->text `(num_items, num_texts)` scores whose top-k entries were re-ordered by the matching head.
    """

    text_to_item: list[int]
    similarity: dict[str, torch.Tensor] = field(default_factory=dict)
    reranked_t2x: dict[str, torch.Tensor] = field(default_factory=dict)
    reranked_x2t: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return max(self.text_to_item) + 1

    def first_caption_rows(self) -> list[int]:
        """Row of each item's first caption: the square item x item view used for heat-maps."""
        first: dict[int, int] = {}
        for text, item in enumerate(self.text_to_item):
            first.setdefault(item, text)
        return [first[item] for item in range(self.num_items)]


def check_rows(
    rows: Sequence[dict[str, Any]], targets: Sequence[str], skip_missing: bool = False, source: str | None = None
) -> list[str]:
    """The targets every row can be evaluated on. A row lacking a needed column raises an error naming it (and
    `source`); with `skip_missing` the target is dropped instead, with a logged count."""
    kept = []
    for target in targets:
        missing = [
            (index, column)
            for index, row in enumerate(rows)
            for column in RETRIEVAL_TARGETS[target]
            if not row.get(column)
        ]
        if not missing:
            kept.append(target)
            continue
        index, column = missing[0]
        if not skip_missing:
            where = f"{source}: " if source else ""
            raise ValueError(
                f"{where}row {index} (id {rows[index].get('id')!r}) has no {column!r}, needed for the {target!r} "
                f"retrieval; {len({i for i, _ in missing})} of {len(rows)} rows lack it (skip the target with "
                "skip_missing / --skip_missing)"
            )
        logger.warning(
            f"skipping the {target!r} retrieval: {len({i for i, _ in missing})} of {len(rows)} rows lack "
            f"{sorted({c for _, c in missing})}"
        )
    return kept


def score_retrieval(
    model: torch.nn.Module,
    processor: MiCoProcessor,
    rows: Sequence[dict[str, Any]],
    targets: Sequence[str],
    batch_size: int = 16,
    rerank_top_k: int | None = None,
    skip_missing: bool = False,
    source: str | None = None,
    progress: bool = True,
) -> RetrievalScores:
    """Encode every caption and item once and score every requested target (see the module docstring).

    Args:
        model: a `MiCoModel` (or a head class sharing its methods), in eval mode, on its device and dtype.
        processor: decodes the media and tokenizes the captions.
        rows: annotation rows (`annotations.load_annotations`): `captions` / `caption` and media paths.
        targets: names of `RETRIEVAL_TARGETS`.
        batch_size: items, captions, or (text, item) pairs per forward pass.
        rerank_top_k: re-rank each query's top-k candidates with the matching head (`None`: no re-ranking).
        skip_missing: drop a target some rows cannot provide instead of raising.
        source: the annotation file, named in errors.
        progress: show tqdm progress bars.
    """
    targets = check_rows(rows, targets, skip_missing, source)
    if not targets:
        raise ValueError("no retrieval target left to evaluate")
    texts, text_to_item = flatten_captions(rows)
    columns = target_columns(targets)
    scores = RetrievalScores(text_to_item)
    encoded_texts = encode_texts(model, processor, texts, batch_size, progress)
    encoded = encode_items(
        model, processor, rows, columns, batch_size, keep_context=bool(rerank_top_k), progress=progress
    )
    for target in targets:
        with torch.no_grad():
            embeds = item_embeddings(
                model, {column: encoded.pooled[column].to(model.device) for column in columns}, target
            )
        similarity = encoded_texts.embeds @ embeds.cpu().t()
        scores.similarity[target] = similarity
        if rerank_top_k:
            ordered = sorted(
                RETRIEVAL_TARGETS[target], key=lambda c: _context_rank(column_modality(c, model.config), model.config)
            )
            contexts = [encoded.contexts[column] for column in ordered]
            logger.info(f"re-ranking the top {rerank_top_k} candidates of every {target} query with the matching head")
            scores.reranked_t2x[target] = rerank(
                similarity, rerank_top_k, matching_score_fn(model, encoded_texts, contexts), batch_size
            )
            scores.reranked_x2t[target] = rerank(
                similarity.t(), rerank_top_k, matching_score_fn(model, encoded_texts, contexts, True), batch_size
            )
    return scores


def retrieval_results(scores: RetrievalScores, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Metrics of every scored target (`retrieval_metrics`), the re-ranked ones under `itm/`, and the counts."""
    results: dict[str, float] = {}
    for target, similarity in scores.similarity.items():
        prefix = TARGET_PREFIXES[target]
        results.update(retrieval_metrics(similarity, scores.text_to_item, prefix=prefix, ks=ks))
        if target in scores.reranked_t2x:
            forward = retrieval_metrics(scores.reranked_t2x[target], scores.text_to_item, prefix=prefix, ks=ks)
            backward = retrieval_metrics(scores.reranked_x2t[target].t(), scores.text_to_item, prefix=prefix, ks=ks)
            results.update({f"{RERANK_NAMESPACE}/{k}": v for k, v in forward.items() if k.startswith(f"{prefix}/")})
            results.update(
                {f"{RERANK_NAMESPACE}/{k}": v for k, v in backward.items() if not k.startswith(f"{prefix}/")}
            )
    results["num_items"] = scores.num_items
    results["num_texts"] = len(scores.text_to_item)
    results["chance/R@1"] = 100.0 / scores.num_items
    return results


def evaluate_retrieval(
    model: torch.nn.Module,
    processor: MiCoProcessor,
    rows: Sequence[dict[str, Any]],
    targets: Sequence[str],
    batch_size: int = 16,
    rerank_top_k: int | None = None,
    skip_missing: bool = False,
    source: str | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Text<->item retrieval metrics of `model` on `rows` (see `score_retrieval` for the arguments)."""
    scores = score_retrieval(model, processor, rows, targets, batch_size, rerank_top_k, skip_missing, source, progress)
    return retrieval_results(scores)


# --------------------------------------------------------------------------------------------------------------------
# Trainer integration
# --------------------------------------------------------------------------------------------------------------------


def batch_retrieval_embeddings(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], targets: Sequence[str]
) -> tuple[torch.Tensor, ...]:
    """`(text_embeds, *target_embeds)` of one collated batch (`MiCoDataCollator` output); a target whose inputs the
    batch lacks gets NaN rows, which `retrieval_compute_metrics` leaves out."""
    text = F.normalize(model.get_text_features(inputs["input_ids"], inputs.get("attention_mask")).float(), dim=-1)
    pooled = {}
    for column in target_columns(targets):
        input_name = MEDIA_COLUMNS[column][1]
        if inputs.get(input_name) is not None:
            tokens = model.encode_knowledge(column_modality(column, model.config), inputs[input_name])
            pooled[column] = model.pool_knowledge(tokens)
    embeds = []
    for target in targets:
        if all(column in pooled for column in RETRIEVAL_TARGETS[target]):
            embeds.append(item_embeddings(model, pooled, target))
        else:
            embeds.append(torch.full_like(text, float("nan")))
    return (text, *embeds)


def retrieval_compute_metrics(
    targets: Sequence[str], ks: Sequence[int] = (1, 5, 10)
) -> Callable[[EvalPrediction], dict[str, float]]:
    """A `Trainer(compute_metrics=...)` function for `MiCoRetrievalTrainer` predictions `(text, *targets)`: text i
    describes item i; items without embeddings (NaN, absent from their batch) are left out with their text."""
    targets = list(targets)

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        text, *items = eval_pred.predictions
        results: dict[str, float] = {}
        for target, item in zip(targets, items, strict=True):
            valid = ~np.isnan(item).any(axis=1)
            if valid.sum() < 2:
                continue
            similarity = torch.from_numpy(text[valid] @ item[valid].T)
            results.update(
                retrieval_metrics(similarity, np.arange(int(valid.sum())), prefix=TARGET_PREFIXES[target], ks=ks)
            )
        return results

    return compute_metrics


class EvalCollatorTrainer(Trainer):
    """A `Trainer` that collates evaluation batches with their own collator (first caption, middle frames)."""

    def __init__(self, *args, eval_data_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator

    def get_eval_dataloader(self, eval_dataset=None):
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator or self.data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator


class MiCoRetrievalTrainer(EvalCollatorTrainer):
    """A `Trainer` whose evaluation returns text and item embeddings as predictions (for
    `retrieval_compute_metrics`) beside the pretraining loss, and collates evaluation batches with their own collator
    (first caption, middle frames).

    Args:
        retrieval_targets: targets whose embeddings evaluation returns (`RETRIEVAL_TARGETS` names).
        eval_data_collator: collator of evaluation batches (default: `data_collator`).
    """

    def __init__(self, *args, retrieval_targets: Sequence[str] = ("video",), **kwargs):
        super().__init__(*args, **kwargs)
        target_columns(retrieval_targets)  # validates the names
        self.retrieval_targets = list(retrieval_targets)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs).detach()
            if prediction_loss_only:
                return loss, None, None
            embeds = batch_retrieval_embeddings(self.accelerator.unwrap_model(model), inputs, self.retrieval_targets)
        # compute_metrics runs only when labels exist; text i of the evaluation set describes item i
        labels = torch.zeros(inputs["input_ids"].shape[0], dtype=torch.long, device=loss.device)
        return loss, embeds, labels


def write_results(results: dict[str, float], path: str | os.PathLike) -> None:
    """Write results as indented JSON."""
    with open(path, "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2)
        file.write("\n")


__all__ = [
    "MiCoRetrievalTrainer",
    "RETRIEVAL_TARGETS",
    "RetrievalScores",
    "TARGET_PREFIXES",
    "encode_items",
    "encode_texts",
    "evaluate_retrieval",
    "load_processor",
    "retrieval_compute_metrics",
    "retrieval_results",
    "score_retrieval",
]
