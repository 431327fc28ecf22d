"""Captioning metrics of the COCO caption evaluation (coco-caption / `pycocoevalcap`), offline and without Java.

Computes BLEU-1..4, ROUGE-L and CIDEr-D exactly as `pycocoevalcap`'s `Bleu` (corpus level, "closest" reference
length), `Rouge` (LCS F-measure with beta 1.2, best precision and recall over the references) and `Cider` (which is
CIDEr-D: tf-idf n-gram vectors with document frequencies from the evaluated references, clipped candidate counts, a
Gaussian length penalty with sigma 6, times 10), against several references per item. Scores are on coco-caption's
scale (BLEU/ROUGE-L in [0, 1], CIDEr-D around 1 for good captions; papers print them x100).

Why not `pycocoevalcap` itself: its wheel is 100 MB of Java jars and its tokenizer (like METEOR and SPICE) runs
Java; `aac-metrics` downloads Java and models; `evaluate.load("bleu")` fetches scripts from the Hub. METEOR and
SPICE are therefore not computed. `tokenize` approximates the PTB tokenizer coco-caption runs first: lower case,
punctuation dropped, contractions kept as one word.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence


Ngrams = Counter  # n-gram tuple -> count

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and numbers, punctuation removed (coco-caption's PTB tokenization, approximately)."""
    if not isinstance(text, str):
        raise TypeError(f"captions must be strings, got {type(text).__name__}: {text!r}")
    return _WORD.findall(text.lower())


def ngram_counts(words: Sequence[str], n: int) -> Ngrams:
    """Counts of every k-gram of `words` for k = 1..n."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check(candidates: Sequence, references: Sequence[Sequence]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists: give one list per item")
    if not candidates:
        raise ValueError("no captions to score")
    empty = [i for i, refs in enumerate(references) if len(refs) == 0]
    if empty:
        raise ValueError(f"items {empty[:5]} have no reference caption")


def bleu(
    candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]], n: int = 4
) -> list[float]:
    """Corpus BLEU-1..n of tokenized candidates (coco-caption's `BleuScorer`, option "closest": the brevity penalty
    uses, per candidate, the reference length closest to its length, the shorter on ties)."""
    _check(candidates, references)
    guess, correct = [0] * n, [0] * n
    test_length = reference_length = 0
    for candidate, refs in zip(candidates, references):
        counts = ngram_counts(candidate, n)
        max_ref: Counter = Counter()
        for ref in refs:
            max_ref |= ngram_counts(ref, n)
        test_length += len(candidate)
        reference_length += min((abs(len(ref) - len(candidate)), len(ref)) for ref in refs)[1]
        for k in range(n):
            guess[k] += max(len(candidate) - k, 0)
        for ngram, count in counts.items():
            correct[len(ngram) - 1] += min(count, max_ref[ngram])
    tiny, small = 1e-15, 1e-9
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_length + tiny) / (reference_length + small)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [score * penalty for score in scores]


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(
    candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]], beta: float = 1.2
) -> float:
    """Mean ROUGE-L (coco-caption's `Rouge`): per candidate, the F-measure of the best LCS precision and the best LCS
    recall over its references."""
    _check(candidates, references)
    total = 0.0
    for candidate, refs in zip(candidates, references):
        lcs = [_lcs(ref, candidate) for ref in refs]
        precision = max((length / len(candidate) if candidate else 0.0) for length in lcs)
        recall = max(length / len(ref) for length, ref in zip(lcs, refs) if ref) if any(refs) else 0.0
        if precision and recall:
            total += (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    return total / len(candidates)


def cider_d(
    candidates: Sequence[Sequence[str]],
    references: Sequence[Sequence[Sequence[str]]],
    n: int = 4,
    sigma: float = 6.0,
) -> float:
    """Corpus CIDEr-D (coco-caption's `Cider`): document frequencies over the items' reference sets, tf-idf vectors
    per n-gram order, the candidate's weights clipped by the reference's, a Gaussian penalty on the difference of
    lengths (counted as bigrams, as coco-caption does), averaged over orders and references, times 10."""
    _check(candidates, references)
    reference_counts = [[ngram_counts(ref, n) for ref in refs] for refs in references]
    document_frequency: Counter = Counter()
    for counts in reference_counts:
        document_frequency.update(set().union(*counts))
    log_items = math.log(float(len(references)))

    def vectorize(counts: Ngrams) -> tuple[list[dict], list[float], int]:
        vectors: list[dict] = [{} for _ in range(n)]
        norms = [0.0] * n
        length = 0
        for ngram, frequency in counts.items():
            order = len(ngram) - 1
            weight = frequency * (log_items - math.log(max(1.0, document_frequency[ngram])))
            vectors[order][ngram] = weight
            norms[order] += weight**2
            if order == 1:
                length += frequency
        return vectors, [math.sqrt(norm) for norm in norms], length

    def similarity(candidate, reference) -> list[float]:
        (cand_vec, cand_norm, cand_len), (ref_vec, ref_norm, ref_len) = candidate, reference
        penalty = math.exp(-((cand_len - ref_len) ** 2) / (2 * sigma**2))
        values = []
        for order in range(n):
            value = sum(
                min(w, ref_vec[order].get(g, 0.0)) * ref_vec[order].get(g, 0.0) for g, w in cand_vec[order].items()
            )
            if cand_norm[order] and ref_norm[order]:
                value /= cand_norm[order] * ref_norm[order]
            values.append(value * penalty)
        return values

    total = 0.0
    for candidate, counts in zip(candidates, reference_counts):
        vector = vectorize(ngram_counts(candidate, n))
        per_order = [sum(orders) for orders in zip(*(similarity(vector, vectorize(ref)) for ref in counts))]
        total += sum(per_order) / n / len(counts) * 10.0
    return total / len(candidates)


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> dict[str, float]:
    """`BLEU-1`..`BLEU-4`, `ROUGE-L` and `CIDEr` (CIDEr-D) of predicted captions against one or several reference
    captions per item (a string or a list of strings each), after `tokenize`."""
    references = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
    candidates = [tokenize(text) for text in predictions]
    tokenized = [[tokenize(text) for text in refs] for refs in references]
    scores = {f"BLEU-{k}": value for k, value in enumerate(bleu(candidates, tokenized), start=1)}
    scores["ROUGE-L"] = rouge_l(candidates, tokenized)
    scores["CIDEr"] = cider_d(candidates, tokenized)
    return scores


__all__ = ["bleu", "caption_scores", "cider_d", "ngram_counts", "rouge_l", "tokenize"]
