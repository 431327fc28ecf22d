"""Zero-shot cross-modal retrieval evaluation of MiCo, as the original MiCo/VAST evaluation runs it.

Every caption and every item is encoded once (batched): the caption through the text branch, each item through the
shared ViT, from whose tokens come both the pooled contrastive features and, for matching re-ranking, the multimodal
context. The similarity of a caption and an item is the cosine of their contrastive embeddings (the model's
`project`); optionally each query's top-k candidates are re-ranked by the matching head over the item's multimodal
context (the original's ``itm_rerank_num``).

Retrieval targets come from the model's configuration (`retrieval_targets`): every modality of its registry
(``image``, ``video``, ``audio``, ``depth``, ``normal``, declared ones such as ``thermal``), and every combination of
modalities that a fused head of ``config.fused_heads`` projects (one modality per encoder of the head; heads that
take the subtitle are not media targets): ``va`` = video + audio, ``id`` = image + depth, and also ``ia`` = image +
audio, ``vd`` = video + depth.

Result keys follow `retrieval.retrieval_metrics` with the prefix `target_prefix(target)`: ``t2`` followed by the
target's key, where a built-in modality is keyed by the first letter of its name (``t2v``, ``t2a``, ``t2i``, ``t2d``,
``t2n``), a declared one by its full name (``t2thermal``), and a fused target by its name, which joins the keys of its
modalities (``t2va``, ``t2id``; with a ``+`` when a key is longer than one letter: ``t2v+thermal``). The item->text
direction is the reverse (``v2t``, ``thermal2t``). With re-ranking, the same keys come under ``itm/``
(``itm/t2v/R@1``); plus ``num_items``, ``num_texts`` and the chance level ``chance/R@1`` = 100 / num_items.

`batch_retrieval_embeddings` gives the text and target embeddings of one collated batch, which
`trainer_mico.MiCoRetrievalTrainer` returns as predictions during fine-tuning.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoProcessor
from transformers.utils import logging

from .annotations import flatten_captions
from .captioning import decode_media, media_name, resolve_device, resolve_dtype
from .configuration_mico import BUILTIN_MODALITIES, SUBTITLE, MiCoConfig
from .data import BrokenMediaError
from .processing_mico import MiCoProcessor
from .retrieval import rerank_top_k as rerank
from .retrieval import retrieval_metrics


logger = logging.get_logger(__name__)

# Key namespace of the matching-head re-ranked results.
RERANK_NAMESPACE = "itm"


# --------------------------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------------------------


def _modality_key(name: str) -> str:
    """A built-in modality is keyed by the first letter of its name (``v``, ``i``, ``a``, ``d``, ``n``), a declared
    one by its name (``thermal``): the one-letter key of a declared modality could read as ``t``ext."""
    return name[0] if name in BUILTIN_MODALITIES else name


def _fused_target_name(modalities: Sequence[str]) -> str:
    keys = [_modality_key(name) for name in modalities]
    return "".join(keys) if all(len(key) == 1 for key in keys) else "+".join(keys)


def target_prefix(target: str) -> str:
    """Name of a target's text->item direction: ``t2`` + its key (``video`` -> ``t2v``, ``va`` -> ``t2va``,
    ``thermal`` -> ``t2thermal``); the item->text direction is its reverse (``v2t``)."""
    return f"t2{_modality_key(target) if target in BUILTIN_MODALITIES else target}"


def retrieval_targets(config: MiCoConfig) -> dict[str, tuple[str, ...]]:
    """Retrieval target -> the modalities (registry names) it embeds, in context order: every modality of `config`
    (its contrastive head), then every combination of modalities, one per encoder, that a fused head projects."""
    specs = config.modality_specs
    targets = {name: (name,) for name in specs}
    order = list(specs)
    for parts in config.fused_heads.values():
        if SUBTITLE in parts:
            continue
        choices = [[name for name, spec in specs.items() if spec.encoder == part] for part in parts]
        for combination in itertools.product(*choices):
            combination = tuple(sorted(combination, key=order.index))
            targets.setdefault(_fused_target_name(combination), combination)
    return targets


def resolve_targets(config: MiCoConfig, targets: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The modalities of each of `targets`, refusing names that are not targets of this model."""
    known = retrieval_targets(config)
    unknown = [target for target in targets if target not in known]
    if unknown:
        raise ValueError(f"unknown retrieval targets {unknown}; this model's targets are {list(known)}")
    return {target: known[target] for target in targets}


def target_modalities(config: MiCoConfig, targets: Sequence[str]) -> list[str]:
    """The modalities needed by `targets`, each once, in first-use order."""
    return list(dict.fromkeys(name for names in resolve_targets(config, targets).values() for name in names))


def targets_for_columns(config: MiCoConfig, columns: Sequence[str]) -> list[str]:
    """Every retrieval target whose media columns are all in `columns` (e.g. the columns a collator loads)."""
    specs = config.modality_specs
    return [
        target
        for target, names in retrieval_targets(config).items()
        if all(specs[name].column in columns for name in names)
    ]


# --------------------------------------------------------------------------------------------------------------------
# Set-up helpers
# --------------------------------------------------------------------------------------------------------------------


def resolve_device_and_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`auto` picks CUDA when present, and bfloat16 on a GPU that supports it (float32 otherwise)."""
    device = resolve_device(device)
    return device, resolve_dtype(dtype, device)


def load_processor(model_name_or_path: str, config: MiCoConfig, num_frames: int | None = None) -> MiCoProcessor:
    """The processor saved with the model, or (when the model has none) `MiCoProcessor.from_config(config)`."""
    try:
        processor = AutoProcessor.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as err:
        logger.warning(
            f"no processor found with {model_name_or_path} ({type(err).__name__}); using the default MiCoProcessor at "
            f"the model's image size {config.vision_config.image_size}"
        )
        processor = MiCoProcessor.from_config(config)
    if num_frames:
        processor.num_frames = num_frames
    return processor


def mico_base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The `MiCoModel` that holds the projection API: `model` itself, the base model a head class composes
    (`model.mico`), or the one inside a PEFT wrapper (whose adapters stay in place)."""
    if hasattr(model, "get_base_model"):  # a peft.PeftModel
        model = model.get_base_model()
    return model.base_model


def item_embeddings(
    model: torch.nn.Module, pooled: Mapping[str, torch.Tensor], modalities: Sequence[str]
) -> torch.Tensor:
    """L2-normalised contrastive embeddings of a target from the pooled (pre-head) features of its `modalities`
    (registry names): the modality's own head for one, the fused head combining their encoders for several."""
    specs = model.config.modality_specs
    features = model.project({specs[name].encoder: pooled[name] for name in modalities})
    return F.normalize(features.float(), dim=-1)


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
    """Per modality: pooled ViT features `(N, C)` and, when asked for, the multimodal context `(N, L, D)` (CPU)."""

    pooled: dict[str, torch.Tensor] = field(default_factory=dict)
    contexts: dict[str, torch.Tensor] = field(default_factory=dict)
    broken: set[int] = field(default_factory=set)  # rows with a file that could not be decoded (`skip_broken`)

    def without(self, rows: Sequence[int]) -> EncodedItems:
        """The items of `rows` only."""
        index = torch.tensor(rows, dtype=torch.long)
        return EncodedItems(
            {name: value[index] for name, value in self.pooled.items()},
            {name: value[index] for name, value in self.contexts.items()},
        )


@dataclass
class RetrievalEncoder:
    """Encodes the captions and the items of a retrieval evaluation: `model` (a `MiCoModel`, on its device and
    dtype) and `processor`, `batch_size` captions or items per forward pass, tqdm progress bars unless `progress` is
    off; with `skip_broken`, items with an undecodable media file are listed instead of raising."""

    model: torch.nn.Module
    processor: MiCoProcessor
    batch_size: int = 16
    progress: bool = True
    skip_broken: bool = False

    def batches(self, total: int, what: str) -> Iterable[int]:
        """Start indices of the batches over `total` entries, with a progress bar `Encoding <what>`."""
        return tqdm(range(0, total, self.batch_size), desc=f"Encoding {what}", disable=not self.progress)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> EncodedTexts:
        """Tokenize and embed every caption once, in batches."""
        device = self.model.device
        embeds, ids, masks = [], [], []
        for start in self.batches(len(texts), "texts"):
            tokens = self.processor(text=list(texts[start : start + self.batch_size]), return_tensors="pt")
            features = self.model.get_text_features(
                tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
            ).pooler_output
            embeds.append(F.normalize(features.float(), dim=-1).cpu())
            ids.append(tokens["input_ids"])
            masks.append(tokens["attention_mask"])
        return EncodedTexts(torch.cat(embeds), torch.cat(ids), torch.cat(masks))

    @torch.no_grad()
    def items(
        self, rows: Sequence[dict[str, Any]], modalities: Sequence[str], keep_context: bool = False
    ) -> EncodedItems:
        """Decode and encode every item's media once per modality (registry name; the row's `ModalitySpec.column`):
        the ViT runs once and feeds both the pooled features and (with `keep_context`, for matching re-ranking) the
        bridged multimodal context, cached on the CPU. An undecodable file raises `BrokenMediaError` naming it; with
        `skip_broken` its row is listed in `broken` instead (its features are zeros)."""
        model = self.model
        device, dtype = model.device, model.dtype
        specs = model.config.modality_specs
        encoded = EncodedItems()
        for name in modalities:
            spec = specs[name]
            pooled, contexts = [], []
            for start in self.batches(len(rows), name):
                chunk = rows[start : start + self.batch_size]
                media = [row[spec.column] for row in chunk]
                kept, values = decode_media(self.processor, spec, media, self.skip_broken)
                encoded.broken.update(start + i for i in range(len(chunk)) if i not in kept)
                if values is None:
                    continue
                indices = torch.tensor([start + i for i in kept])
                tokens = model.encode_modality(name, _to_model(values, device, dtype))
                pooled.append((indices, model.pool_tokens(tokens).cpu()))
                if keep_context:
                    contexts.append((indices, model.context_from_tokens(spec.encoder, tokens).cpu()))
            if not pooled:
                raise BrokenMediaError(f"none of the {len(rows)} {name} files could be decoded")
            encoded.pooled[name] = _scatter(pooled, len(rows))
            if keep_context:
                encoded.contexts[name] = _scatter(contexts, len(rows))
        return encoded


def _scatter(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], total: int) -> torch.Tensor:
    """`total` rows holding each part's rows at its indices (zeros elsewhere: rows of undecodable files)."""
    first = parts[0][1]
    rows = first.new_zeros(total, *first.shape[1:])
    for indices, values in parts:
        rows[indices] = values
    return rows


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
    config: MiCoConfig,
    rows: Sequence[dict[str, Any]],
    targets: Sequence[str],
    skip_missing: bool = False,
    source: str | None = None,
) -> list[str]:
    """The targets every row can be evaluated on. A row lacking a needed column raises an error naming it (and
    `source`); with `skip_missing` the target is dropped instead, with a logged count."""
    specs = config.modality_specs
    kept = []
    for target, modalities in resolve_targets(config, targets).items():
        columns = [specs[name].column for name in modalities]
        missing = [(index, column) for index, row in enumerate(rows) for column in columns if not row.get(column)]
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


def check_distinct_items(
    config: MiCoConfig, rows: Sequence[dict[str, Any]], modalities: Sequence[str], source: str | None = None
) -> None:
    """Refuse two rows with the same media file: retrieval needs one item per file (merge their captions into one
    row's `captions` instead), else the other copy's match is scored as a miss."""
    for name in modalities:
        column = config.modality_specs[name].column
        first: dict[str, int] = {}
        for index, row in enumerate(rows):
            name = media_name(row[column], "")
            if not name:
                continue  # decoded media (arrays, images) have no file to share
            path = os.path.normpath(name)
            if path in first:
                where = f"{source}: " if source else ""
                raise ValueError(
                    f"{where}rows {first[path]} and {index} share the {column} file {name}; retrieval needs one item "
                    "per file: put all its captions in one row's `captions`"
                )
            first[path] = index


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
    skip_broken: bool = False,
) -> RetrievalScores:
    """Encode every caption and item once and score every requested target (see the module docstring).

    Args:
        model: a `MiCoModel` (or a head class composing one, or a PEFT wrapper), in eval mode, on its device and
            dtype.
        processor: decodes the media and tokenizes the captions.
        rows: annotation rows (`annotations.load_annotations`): `captions` / `caption` and media paths.
        targets: names of `retrieval_targets(model.config)`.
        batch_size: items, captions, or (text, item) pairs per forward pass.
        rerank_top_k: re-rank each query's top-k candidates with the matching head (`None`: no re-ranking).
        skip_missing: drop a target some rows cannot provide instead of raising.
        source: the annotation file, named in errors.
        progress: show tqdm progress bars.
        skip_broken: leave out (with a warning) the items with a media file that cannot be decoded, and their
            captions; otherwise such a file raises `BrokenMediaError` naming it.
    """
    model = mico_base_model(model)
    config = model.config
    targets = check_rows(config, rows, targets, skip_missing, source)
    if not targets:
        raise ValueError("no retrieval target left to evaluate")
    check_distinct_items(config, rows, target_modalities(config, targets), source)
    encoder = RetrievalEncoder(model, processor, batch_size, progress, skip_broken)
    encoded = encoder.items(rows, target_modalities(config, targets), keep_context=bool(rerank_top_k))
    if encoded.broken:
        logger.warning(f"left out {len(encoded.broken)} of {len(rows)} items with an undecodable file")
        kept = [index for index in range(len(rows)) if index not in encoded.broken]
        rows, encoded = [rows[index] for index in kept], encoded.without(kept)
    texts, text_to_item = flatten_captions(rows)
    scores = RetrievalScores(text_to_item)
    encoded_texts = encoder.texts(texts)
    specs = config.modality_specs
    for target, parts in resolve_targets(config, targets).items():
        with torch.no_grad():
            embeds = item_embeddings(model, {name: encoded.pooled[name].to(model.device) for name in parts}, parts)
        similarity = encoded_texts.embeds @ embeds.cpu().t()
        scores.similarity[target] = similarity
        if rerank_top_k:
            ordered = sorted(parts, key=lambda name: config.context_order.index(specs[name].encoder))
            contexts = [encoded.contexts[name] for name in ordered]
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
        prefix = target_prefix(target)
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
    model: torch.nn.Module, processor: MiCoProcessor, rows: Sequence[dict[str, Any]], targets: Sequence[str], **options
) -> dict[str, float]:
    """Text<->item retrieval metrics of `model` on `rows` for `targets`: `retrieval_results` of `score_retrieval`,
    whose keyword `options` it takes (`batch_size`, `rerank_top_k`, `skip_missing`, `source`, `progress`,
    `skip_broken`)."""
    return retrieval_results(score_retrieval(model, processor, rows, targets, **options))


# --------------------------------------------------------------------------------------------------------------------
# Batches of a Trainer
# --------------------------------------------------------------------------------------------------------------------


def batch_retrieval_embeddings(
    model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], targets: Sequence[str]
) -> tuple[torch.Tensor, ...]:
    """`(text_embeds, *target_embeds)` of one collated batch (`MiCoDataCollator` output, keyed by model input
    names); a target whose inputs the batch lacks gets NaN rows, which `retrieval_compute_metrics` leaves out."""
    model = mico_base_model(model)
    specs = model.config.modality_specs
    targets = resolve_targets(model.config, targets)
    text = model.get_text_features(inputs["input_ids"], inputs.get("attention_mask")).pooler_output
    text = F.normalize(text.float(), dim=-1)
    pooled = {}
    for name in target_modalities(model.config, list(targets)):
        values = inputs.get(specs[name].input_name)
        if values is not None:
            pooled[name] = model.pool_tokens(model.encode_modality(name, values))
    return (
        text,
        *(
            item_embeddings(model, pooled, parts)
            if all(name in pooled for name in parts)
            else torch.full_like(text, float("nan"))
            for parts in targets.values()
        ),
    )


def write_results(results: dict[str, float], path: str | os.PathLike) -> None:
    """Write results as indented JSON."""
    with open(path, "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2)
        file.write("\n")


__all__ = [
    "RetrievalEncoder",
    "RetrievalScores",
    "batch_retrieval_embeddings",
    "check_distinct_items",
    "evaluate_retrieval",
    "load_processor",
    "resolve_targets",
    "retrieval_results",
    "retrieval_targets",
    "score_retrieval",
    "target_prefix",
]
