"""Where the time of an end-to-end retrieval evaluation goes (CPU, tiny random model, synthetic data).

Generates a synthetic omni-modal test split into a temporary folder, then runs `evaluation.score_retrieval` (video
and audio targets, matching re-ranking of each query's top-k) and `evaluation.retrieval_results` once, with the
stages timed by wrapping what the evaluation calls:

* decoding: processor calls on media (mp4 decoding and frame resizing, audio loading and filterbanks, images);
* tokenization: processor calls on captions;
* encoding: the model's text features, ViT encoding, pooling and context bridging;
* re-ranking: `retrieval.rerank_top_k` with the matching head over the cached contexts, both directions;
* similarity and rest: the remainder of `score_retrieval` (contrastive heads, the similarity products, bookkeeping);
* metrics: `retrieval_results`.

    python benchmarks/bench_retrieval.py [--quick | --smoke]
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock


if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import markdown_table, run_cli  # noqa: E402
from modeling_mico import MiCoConfig, MiCoProcessor, evaluation  # noqa: E402
from modeling_mico.annotations import load_annotations  # noqa: E402
from modeling_mico.modeling_mico import MiCoModel  # noqa: E402
from modeling_mico.synthetic_data import make_synthetic_dataset  # noqa: E402


MODES = {"full": (64, 10), "quick": (24, 5), "smoke": (3, 2)}  # mode -> (items, re-ranked candidates per query)
TARGETS = ("video", "audio")
ENCODING_METHODS = ("get_text_features", "encode_modality", "pool_tokens", "context_from_tokens")
STAGES = ("decoding", "tokenization", "encoding", "re-ranking", "similarity and rest", "metrics")


class StageTimer:
    """Accumulates wall-clock seconds per stage for wrapped callables (wrappers must not nest)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, stage: str | Callable[..., str], fn: Callable) -> Callable:
        """`fn` timed under `stage`, or under `stage(*args, **kwargs)` when `stage` is a function."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                name = stage(*args, **kwargs) if callable(stage) else stage
                self.seconds[name] += time.perf_counter() - start

        return timed


class TimedProcessor:
    """Proxy of a processor whose calls are timed as tokenization (captions) or decoding (media)."""

    def __init__(self, processor: Any, timer: StageTimer) -> None:
        self._processor = processor
        self._call = timer.wrap(lambda *args, **kwargs: "tokenization" if "text" in kwargs else "decoding", processor)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)


def timed_model(model: MiCoModel, timer: StageTimer) -> MiCoModel:
    """Time the encoding methods the evaluation calls, by shadowing them on the instance."""
    for name in ENCODING_METHODS:
        setattr(model, name, timer.wrap("encoding", getattr(model, name)))
    return model


def evaluate_with_timings(model: MiCoModel, processor: Any, rows: list[dict], top_k: int) -> dict:
    """Run the evaluation once with every stage timed; returns the timings and the metrics."""
    timer = StageTimer()
    model = timed_model(model, timer)
    with mock.patch.object(evaluation, "rerank", timer.wrap("re-ranking", evaluation.rerank)):
        start = time.perf_counter()
        scores = evaluation.score_retrieval(
            model, TimedProcessor(processor, timer), rows, TARGETS, batch_size=16, rerank_top_k=top_k, progress=False
        )
        total = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluation.retrieval_results(scores)
    timer.seconds["metrics"] = time.perf_counter() - start
    timer.seconds["similarity and rest"] = total - sum(timer.seconds[name] for name in STAGES[:4])
    return {"seconds": {name: timer.seconds[name] for name in STAGES}, "metrics": metrics}


def run(quick: bool = False, smoke: bool = False) -> dict:
    """Generate the data, build the tiny model, evaluate with timings; returns the timings and settings."""
    mode = "smoke" if smoke else "quick" if quick else "full"
    items, top_k = MODES[mode]
    torch.manual_seed(0)
    config = MiCoConfig.from_preset("tiny")
    model = MiCoModel(config).eval()
    processor = MiCoProcessor.from_config(config)
    with tempfile.TemporaryDirectory(prefix="mico-bench-retrieval-") as tmp:
        data = make_synthetic_dataset(
            tmp, num_samples=items + 1, num_test=items, image_size=64, modalities=("video", "audio")
        )
        rows = load_annotations(data["test_file"])
        result = evaluate_with_timings(model, processor, rows, top_k)
    total = sum(result["seconds"].values())
    return {
        "stages": [
            {"stage": name, "seconds": seconds, "share": seconds / total}
            for name, seconds in result["seconds"].items()
        ],
        "total_s": total,
        "data_generation_s": data["seconds"],
        "metrics": {key: result["metrics"][key] for key in ("num_items", "num_texts", "t2v/R@1", "itm/t2v/R@1")},
        "settings": {"mode": mode, "items": items, "targets": list(TARGETS), "rerank_top_k": top_k, "model": "tiny"},
    }


def to_markdown(results: dict) -> str:
    """Results as a Markdown table."""
    rows = [[row["stage"], f"{row['seconds']:.2f}", f"{row['share']:.0%}"] for row in results["stages"]]
    rows.append(["**total**", f"{results['total_s']:.2f}", "100%"])
    settings, metrics = results["settings"], results["metrics"]
    note = (
        f"{settings['items']} synthetic items ({metrics['num_texts']} captions), targets {', '.join(settings['targets'])},"
        f" top-{settings['rerank_top_k']} matching re-ranking in both directions, tiny random model (64 px, 2+2 layers)."
    )
    return note + "\n\n" + markdown_table(["stage", "seconds", "share"], rows)


def main() -> None:
    """Command-line entry point: prints the tables and the JSON."""
    run_cli(__doc__, run, to_markdown, quick="24 items", smoke="3 items")


if __name__ == "__main__":
    main()
