"""Cross-modal retrieval metrics for MiCo, as the MiCo/VAST evaluation computes them.

The similarity matrix is always ``(num_texts, num_items)``: one row per caption, one column per item (video, image,
audio clip, ...). Several captions may describe the same item (``text_to_item`` maps each caption to its item), which is
the usual case for MSR-VTT (20 captions per video), COCO (5 per image) or Clotho (5 per clip).

Ranks are 1-based. Ties are broken *pessimistically*: a competitor whose score equals the score of the correct answer
counts as ranked ahead of it, so a constant similarity matrix scores chance level, not 100%.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from .import_utils import require


ArrayLike = torch.Tensor | np.ndarray

# Column order of `format_results_table` after the recalls.
_RANK_COLUMNS = ("MedR", "MeanR")


def _as_similarity(similarity: ArrayLike | Sequence[Sequence[float]], name: str = "similarity") -> torch.Tensor:
    """Return `similarity` as a non-empty 2-D float64 CPU tensor without NaN (float64 keeps every input exact)."""
    matrix = torch.as_tensor(similarity).detach().cpu()
    if matrix.dim() != 2:
        raise ValueError(f"`{name}` must be 2-D (num_texts, num_items), got shape {tuple(matrix.shape)}.")
    if matrix.numel() == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(matrix.shape)}).")
    matrix = matrix.to(torch.float64)
    if torch.isnan(matrix).any():
        raise ValueError(f"`{name}` contains NaN values.")
    return matrix


def _as_text_to_item(text_to_item: Sequence[int] | ArrayLike, num_texts: int, num_items: int) -> torch.Tensor:
    """Validate `text_to_item` against the similarity shape and return it as a 1-D int64 tensor."""
    mapping = torch.as_tensor(text_to_item).detach().cpu()
    if mapping.is_floating_point() or mapping.is_complex() or mapping.dtype == torch.bool:
        raise ValueError(f"`text_to_item` must hold integer item indices, got dtype {mapping.dtype}.")
    if mapping.dim() != 1 or mapping.numel() != num_texts:
        raise ValueError(
            f"`text_to_item` must have one entry per similarity row ({num_texts}), got shape {tuple(mapping.shape)}."
        )
    mapping = mapping.long()
    out_of_range = (mapping < 0) | (mapping >= num_items)
    if out_of_range.any():
        text = int(out_of_range.nonzero()[0])
        raise ValueError(
            f"`text_to_item[{text}]` = {int(mapping[text])} is out of range for {num_items} items (similarity columns)."
        )
    captions_per_item = torch.bincount(mapping, minlength=num_items)
    if (captions_per_item == 0).any():
        missing = (captions_per_item == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"`text_to_item` gives no caption to {int((captions_per_item == 0).sum())} item(s) (e.g. {missing}); "
            "every similarity column needs at least one text."
        )
    return mapping


def _reverse_prefix(prefix: str) -> str:
    """``"t2v"`` -> ``"v2t"``: the name of the item->text direction."""
    parts = prefix.split("2")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"`prefix` must look like 'A2B' (e.g. 't2v'), got {prefix!r}.")
    return f"{parts[1]}2{parts[0]}"


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    """Validate the recall cut-offs."""
    ks = tuple(ks)
    if not ks:
        raise ValueError("`ks` must contain at least one cut-off.")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"`ks` must hold integers >= 1, got {k!r}.")
    return tuple(int(k) for k in ks)


def _summarise(ranks: torch.Tensor, prefix: str, ks: tuple[int, ...]) -> dict[str, float]:
    """Recall@k (percent), median and mean of 1-based ranks."""
    ranks = ranks.to(torch.float64)
    results = {f"{prefix}/R@{k}": float((ranks <= k).double().mean() * 100) for k in ks}
    results[f"{prefix}/MedR"] = float(torch.quantile(ranks, 0.5))  # numpy-style median (mean of the middle two)
    results[f"{prefix}/MeanR"] = float(ranks.mean())
    return results


def retrieval_ranks(
    similarity: ArrayLike, text_to_item: Sequence[int] | ArrayLike
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based ranks of the correct answer, per text query and per item query (pessimistic ties).

    Text->item: ``1 +`` the number of wrong items scoring ``>=`` the true item.
    Item->text: the rank of the first correct caption, i.e. ``1 +`` the number of captions of *other* items scoring
    ``>=`` the item's best caption (other captions of the same item are never competitors, as in VAST's
    "best rank over the item's captions").

    Returns:
        `(text_ranks, item_ranks)`: int64 tensors of shapes `(num_texts,)` and `(num_items,)`.
    """
    sim = _as_similarity(similarity)
    num_texts, num_items = sim.shape
    mapping = _as_text_to_item(text_to_item, num_texts, num_items)
    own = torch.zeros_like(sim, dtype=torch.bool)
    own[torch.arange(num_texts), mapping] = True
    true_scores = sim[torch.arange(num_texts), mapping]

    text_ranks = 1 + ((sim >= true_scores[:, None]) & ~own).sum(dim=1)
    best_caption = torch.full((num_items,), -torch.inf, dtype=sim.dtype)
    best_caption = best_caption.scatter_reduce(0, mapping, true_scores, reduce="amax")
    item_ranks = 1 + ((sim >= best_caption[None, :]) & ~own).sum(dim=0)
    return text_ranks, item_ranks


def retrieval_metrics(
    similarity: ArrayLike,
    text_to_item: Sequence[int] | ArrayLike,
    prefix: str = "t2v",
    ks: Iterable[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k, median and mean rank in both directions of a text/item similarity matrix.

    Args:
        similarity: `(num_texts, num_items)` scores, higher is more similar (torch or numpy).
        text_to_item: item index of each text; several texts may share an item, every item needs one text.
        prefix: name of the text->item direction, ``"A2B"``; the item->text direction is ``"B2A"``
            (``"t2v"`` gives ``"v2t"``, ``"t2a"`` gives ``"a2t"``).
        ks: recall cut-offs.

    Returns:
        ``{"t2v/R@1": ..., "t2v/R@5": ..., "t2v/R@10": ..., "t2v/MedR": ..., "t2v/MeanR": ..., "v2t/R@1": ...}``:
        recalls in percent (0-100), ranks 1-based. An item query is a hit at k when *any* of its captions is in the
        top k. Ties are pessimistic: a competitor with the same score as the correct answer counts as ranked ahead,
        so a constant matrix does not score 100%.
    """
    reverse = _reverse_prefix(prefix)
    ks = _check_ks(ks)
    text_ranks, item_ranks = retrieval_ranks(similarity, text_to_item)
    return {**_summarise(text_ranks, prefix, ks), **_summarise(item_ranks, reverse, ks)}


def rerank_top_k(
    similarity: ArrayLike,
    k: int,
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int | None = None,
) -> torch.Tensor:
    """Re-rank the top-k candidates of every row with a second-stage scorer (e.g. the matching head).

    The first stage picks each row's `k` highest candidates (ties: lower column first). `score_fn(query_indices,
    candidate_indices)` scores them in batches of equal-length 1-D index tensors and returns one score per pair. The
    result keeps every non-top-k entry unchanged and gives the top-k entries the values ``base + k, ..., base + 1`` in
    descending order of the new score (ties keep the first-stage order), where ``base`` is the largest finite
    similarity, so they stay strictly above the rest. This mirrors MiCo's ``itm_rerank_num`` (50) without discarding
    the order of the other candidates.

    Args:
        similarity: `(num_queries, num_candidates)` first-stage scores.
        k: number of candidates to re-rank per row (clipped to the number of columns).
        score_fn: batched scorer, ``(query_indices, candidate_indices) -> scores``.
        batch_size: pairs per `score_fn` call; all pairs at once when `None`.

    Returns:
        A float64 `(num_queries, num_candidates)` tensor.
    """
    sim = _as_similarity(similarity)
    if torch.isposinf(sim).any():
        raise ValueError("`similarity` contains +inf; re-ranking needs finite top scores.")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"`k` must be an integer >= 1, got {k!r}.")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1 or None, got {batch_size!r}.")
    num_queries, num_candidates = sim.shape
    k = min(int(k), num_candidates)

    top = sim.sort(dim=1, descending=True, stable=True).indices[:, :k]
    queries = torch.arange(num_queries).repeat_interleave(k)
    scores = _score_pairs(score_fn, queries, top.flatten(), batch_size).view(num_queries, k)

    new_order = scores.sort(dim=1, descending=True, stable=True).indices
    finite = sim[torch.isfinite(sim)]
    base = finite.max() if finite.numel() else torch.zeros((), dtype=sim.dtype)
    values = base + torch.arange(k, 0, -1, dtype=sim.dtype)
    reranked = sim.clone()
    reranked.scatter_(1, top.gather(1, new_order), values.expand(num_queries, k).contiguous())
    return reranked


def _score_pairs(
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    queries: torch.Tensor,
    candidates: torch.Tensor,
    batch_size: int | None,
) -> torch.Tensor:
    """Call `score_fn` on `(queries, candidates)` in chunks and check it returns one finite score per pair."""
    step = batch_size or queries.numel()
    chunks = []
    for start in range(0, queries.numel(), step):
        query_chunk, candidate_chunk = queries[start : start + step], candidates[start : start + step]
        scores = torch.as_tensor(score_fn(query_chunk, candidate_chunk)).detach().cpu().to(torch.float64)
        if scores.shape != query_chunk.shape:
            raise ValueError(
                f"`score_fn` must return a 1-D tensor of {query_chunk.numel()} scores, got shape {tuple(scores.shape)}."
            )
        if torch.isnan(scores).any():
            raise ValueError("`score_fn` returned NaN scores.")
        chunks.append(scores)
    return torch.cat(chunks)


def plot_similarity_heatmap(
    similarity: ArrayLike,
    path: str | Path,
    max_items: int = 16,
    title: str = "Text-item similarity",
) -> Path:
    """Write a PNG heat-map of the first `max_items` texts x items, a quick visual check of the diagonal.

    Uses matplotlib's Agg canvas directly, so it neither needs a display nor changes the global pyplot backend.
    """
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "plot_similarity_heatmap").FigureCanvasAgg
    Figure = require("matplotlib.figure", "plot_similarity_heatmap").Figure

    if max_items < 1:
        raise ValueError(f"`max_items` must be >= 1, got {max_items!r}.")
    sim = _as_similarity(similarity)[:max_items, :max_items].numpy()
    figure = Figure(figsize=(1.5 + 0.4 * sim.shape[1], 1.0 + 0.4 * sim.shape[0]), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(sim, cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=axes)
    axes.set(title=title, xlabel="item", ylabel="text")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _format_cell(value: float | None, column: str) -> str:
    """One table cell: MedR with one decimal, other metrics with two, ``-`` when missing."""
    if value is None:
        return "-"
    return f"{value:.1f}" if column == "MedR" else f"{value:.2f}"


def format_results_table(results: dict[str, float]) -> str:
    """Markdown table of `retrieval_metrics` output: one row per direction, columns R@k..., MedR, MeanR.

    Keys are ``"<direction>/<metric>"`` (a longer prefix such as ``"msrvtt/t2v/R@1"`` is kept in the direction);
    a metric missing for a direction is shown as ``-``.
    """
    table: dict[str, dict[str, float]] = {}
    for key, value in results.items():
        direction, sep, metric = key.rpartition("/")
        if sep:
            table.setdefault(direction, {})[metric] = value
    if not table:
        raise ValueError("`results` has no '<direction>/<metric>' keys, e.g. 't2v/R@1'.")
    metrics = {metric for row in table.values() for metric in row}
    recalls = sorted((m for m in metrics if m.startswith("R@") and m[2:].isdigit()), key=lambda m: int(m[2:]))
    columns = [*recalls, *_RANK_COLUMNS]
    lines = ["| Direction | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for direction, row in table.items():
        cells = [_format_cell(row.get(column), column) for column in columns]
        lines.append(f"| {direction} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
