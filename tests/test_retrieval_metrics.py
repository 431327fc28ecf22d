"""Tests of the retrieval metrics, the top-k re-ranker, the heat-map, the results table and the `evaluate` module."""

import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_mico.retrieval import (
    format_results_table,
    plot_similarity_heatmap,
    rerank_top_k,
    retrieval_metrics,
    retrieval_ranks,
)


REPO_ROOT = Path(__file__).resolve().parents[1]


def brute_force_ranks(similarity: np.ndarray, text_to_item: list[int]) -> tuple[list[int], list[int]]:
    """Loop reference: pessimistic ranks (ties ahead); item queries take their best caption, own captions excluded."""
    num_texts, num_items = similarity.shape
    text_ranks = []
    for text in range(num_texts):
        true = similarity[text, text_to_item[text]]
        ahead = sum(similarity[text, item] >= true for item in range(num_items) if item != text_to_item[text])
        text_ranks.append(1 + ahead)
    item_ranks = []
    for item in range(num_items):
        best = math.inf
        for caption in (t for t in range(num_texts) if text_to_item[t] == item):
            score = similarity[caption, item]
            ahead = sum(similarity[t, item] >= score for t in range(num_texts) if text_to_item[t] != item)
            best = min(best, 1 + ahead)
        item_ranks.append(best)
    return text_ranks, item_ranks


def brute_force_metrics(similarity: np.ndarray, text_to_item: list[int], ks=(1, 5, 10)) -> dict[str, float]:
    text_ranks, item_ranks = brute_force_ranks(similarity, text_to_item)
    results = {}
    for prefix, ranks in (("t2v", text_ranks), ("v2t", item_ranks)):
        for k in ks:
            results[f"{prefix}/R@{k}"] = 100.0 * sum(rank <= k for rank in ranks) / len(ranks)
        results[f"{prefix}/MedR"] = float(statistics.median(ranks))
        results[f"{prefix}/MeanR"] = sum(ranks) / len(ranks)
    return results


def random_case(seed: int, num_items: int, max_captions: int, levels: int | None):
    """A random similarity matrix with 1..max_captions captions per item; `levels` quantises it to force ties."""
    generator = np.random.default_rng(seed)
    counts = generator.integers(1, max_captions + 1, size=num_items)
    text_to_item = [int(i) for i in generator.permutation(np.repeat(np.arange(num_items), counts))]
    similarity = generator.standard_normal((len(text_to_item), num_items))
    if levels is not None:
        similarity = np.round(similarity * levels) / levels
    return similarity, text_to_item


@pytest.mark.parametrize("levels", [None, 1, 3])
@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force(seed: int, levels: int | None):
    similarity, text_to_item = random_case(seed, num_items=13, max_captions=4, levels=levels)
    expected = brute_force_metrics(similarity, text_to_item, ks=(1, 2, 5, 10))
    got = retrieval_metrics(torch.from_numpy(similarity).float(), text_to_item, ks=(1, 2, 5, 10))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key


def test_numpy_and_torch_agree():
    similarity, text_to_item = random_case(7, num_items=9, max_captions=3, levels=2)
    assert retrieval_metrics(similarity, text_to_item) == retrieval_metrics(torch.tensor(similarity), text_to_item)


def test_hand_example_several_captions():
    # Items 0 and 1; texts 0, 1 describe item 0, text 2 describes item 1.
    similarity = [[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]]
    text_ranks, item_ranks = retrieval_ranks(np.array(similarity), [0, 0, 1])
    assert text_ranks.tolist() == [1, 2, 1]
    # Item 0: its best caption (0.9) beats text 2 (0.3) -> 1. Item 1: caption 2 (0.7) is behind text 1 (0.8) -> 2.
    assert item_ranks.tolist() == [1, 2]
    results = retrieval_metrics(np.array(similarity), [0, 0, 1], ks=(1,))
    assert results == {
        "t2v/R@1": pytest.approx(200 / 3),
        "t2v/MedR": 1.0,
        "t2v/MeanR": pytest.approx(4 / 3),
        "v2t/R@1": 50.0,
        "v2t/MedR": 1.5,
        "v2t/MeanR": 1.5,
    }


def test_identity_is_perfect_and_constant_is_pessimistic():
    perfect = retrieval_metrics(torch.eye(20), list(range(20)))
    assert perfect["t2v/R@1"] == perfect["v2t/R@1"] == 100.0
    assert perfect["t2v/MedR"] == perfect["v2t/MeanR"] == 1.0
    constant = retrieval_metrics(torch.zeros(20, 20), list(range(20)))
    assert constant["t2v/R@1"] == constant["v2t/R@10"] == 0.0
    assert constant["t2v/MedR"] == constant["v2t/MeanR"] == 20.0


def test_prefix_names_both_directions():
    results = retrieval_metrics(torch.eye(3), [0, 1, 2], prefix="t2a", ks=(1,))
    assert set(results) == {"t2a/R@1", "t2a/MedR", "t2a/MeanR", "a2t/R@1", "a2t/MedR", "a2t/MeanR"}


@pytest.mark.parametrize(
    ("similarity", "text_to_item", "kwargs", "match"),
    [
        (torch.zeros(3), [0, 1, 2], {}, "`similarity` must be 2-D"),
        (torch.zeros(0, 3), [], {}, "`similarity` is empty"),
        (torch.full((2, 2), math.nan), [0, 1], {}, "`similarity` contains NaN"),
        (torch.zeros(3, 2), [0, 1], {}, r"`text_to_item` must have one entry per similarity row \(3\)"),
        (torch.zeros(2, 2), [0, 2], {}, r"`text_to_item\[1\]` = 2 is out of range for 2 items"),
        (torch.zeros(2, 2), [0, -1], {}, r"`text_to_item\[1\]` = -1 is out of range"),
        (torch.zeros(2, 3), [0, 1], {}, "`text_to_item` gives no caption to 1 item"),
        (torch.zeros(2, 2), [0.0, 1.0], {}, "`text_to_item` must hold integer"),
        (torch.eye(2), [0, 1], {"ks": (0,)}, "`ks` must hold integers >= 1"),
        (torch.eye(2), [0, 1], {"ks": ()}, "`ks` must contain"),
        (torch.eye(2), [0, 1], {"prefix": "tv"}, "`prefix` must look like 'A2B'"),
    ],
)
def test_validation_errors(similarity, text_to_item, kwargs, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(similarity, text_to_item, **kwargs)


def test_rerank_only_reorders_within_top_k():
    generator = torch.Generator().manual_seed(0)
    similarity = torch.randn(6, 30, generator=generator)
    new_scores = torch.randn(6, 30, generator=generator)
    calls = []

    def score_fn(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        assert queries.shape == candidates.shape and queries.dim() == 1
        calls.append(len(queries))
        return new_scores[queries, candidates]

    k = 7
    reranked = rerank_top_k(similarity, k, score_fn, batch_size=10)
    assert calls == [10, 10, 10, 10, 2]
    before = similarity.argsort(dim=1, descending=True)
    after = reranked.argsort(dim=1, descending=True)
    for row in range(6):
        top_before, top_after = before[row, :k], after[row, :k]
        assert set(top_before.tolist()) == set(top_after.tolist())
        expected_top = top_before[new_scores[row, top_before].argsort(descending=True)]
        assert top_after.tolist() == expected_top.tolist()
        assert after[row, k:].tolist() == before[row, k:].tolist()
        assert reranked[row, top_after].min() > reranked[row, after[row, k:]].max()
        assert torch.equal(reranked[row, after[row, k:]], similarity[row, after[row, k:]].double())


def test_rerank_with_k_above_columns_and_masked_entries():
    similarity = torch.tensor([[0.1, -math.inf, 0.5], [0.3, 0.2, 0.1]])
    reranked = rerank_top_k(similarity, 10, lambda q, c: c.double())  # prefers the highest column index
    assert reranked.argsort(dim=1, descending=True).tolist() == [[2, 1, 0], [2, 1, 0]]


@pytest.mark.parametrize(
    ("k", "score_fn", "match"),
    [
        (0, lambda q, c: q.double(), "`k` must be an integer >= 1"),
        (2, lambda q, c: q[:1].double(), "`score_fn` must return a 1-D tensor of 6 scores"),
        (2, lambda q, c: torch.full(q.shape, math.nan), "`score_fn` returned NaN"),
    ],
)
def test_rerank_errors(k, score_fn, match):
    with pytest.raises(ValueError, match=match):
        rerank_top_k(torch.rand(3, 4), k, score_fn)


def test_heatmap_png_is_written(tmp_path: Path):
    path = plot_similarity_heatmap(torch.rand(40, 30), tmp_path / "plots" / "sim.png", max_items=8, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_table():
    table = format_results_table(retrieval_metrics(torch.eye(4), [0, 1, 2, 3]))
    lines = table.splitlines()
    assert lines[0] == "| Direction | R@1 | R@5 | R@10 | MedR | MeanR |"
    assert lines[2] == "| t2v | 100.00 | 100.00 | 100.00 | 1.0 | 1.00 |"
    assert lines[3].startswith("| v2t | 100.00")
    assert format_results_table({"t2a/R@1": 50.0}).splitlines()[2] == "| t2a | 50.00 | - | - |"
    with pytest.raises(ValueError, match="`results` has no"):
        format_results_table({"loss": 1.0})


def test_evaluate_module_loads_offline_and_agrees():
    code = (
        "import json, sys, evaluate, numpy as np\n"
        "from modeling_mico.retrieval import retrieval_metrics\n"
        "metric = evaluate.load('metrics/mico_retrieval')\n"
        "rng = np.random.default_rng(0)\n"
        "sim = np.round(rng.standard_normal((12, 5)), 1)\n"
        "t2i = [i % 5 for i in range(12)]\n"
        "got = metric.compute(similarity=sim, text_to_item=t2i, prefix='t2v')\n"
        "assert got == retrieval_metrics(sim, t2i), (got, retrieval_metrics(sim, t2i))\n"
        "metric.add_batch(similarity=sim[:6], text_to_item=t2i[:6])\n"
        "metric.add_batch(similarity=sim[6:], text_to_item=t2i[6:])\n"
        "assert metric.compute(ks=(1,)) == retrieval_metrics(sim, t2i, ks=(1,))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
