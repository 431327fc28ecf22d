"""Retrieval evaluation: the CLI's outputs and hygiene, the library against a brute-force computation from the
model's feature methods, matching re-ranking, missing modalities and the Trainer metric."""

import copy
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import EvalPrediction

from modeling_mico import MiCoConfig, MiCoModel, MiCoProcessor
from modeling_mico.annotations import flatten_captions, load_annotations
from modeling_mico.evaluation import evaluate_retrieval, retrieval_results, score_retrieval
from modeling_mico.retrieval import retrieval_metrics
from modeling_mico.synthetic_data import make_synthetic_dataset
from modeling_mico.trainer_mico import retrieval_compute_metrics


REPO = Path(__file__).resolve().parents[1]
TARGETS = ["image", "audio", "normal", "va", "id"]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model() -> MiCoModel:
    """The `tiny` preset (whose wider initialisation keeps random embeddings apart)."""
    torch.manual_seed(0)
    return MiCoModel(MiCoConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("retrieval")
    make_synthetic_dataset(root / "data", num_samples=16, num_test=12, image_size=64, num_video_frames=4)
    tiny_model().save_pretrained(root / "model")  # no processor files: the CLI falls back to the default one
    return root


@pytest.fixture(scope="module")
def model(workdir) -> MiCoModel:
    return MiCoModel.from_pretrained(workdir / "model").eval()


@pytest.fixture(scope="module")
def processor(model):
    return MiCoProcessor.from_config(model.config)


@pytest.fixture(scope="module")
def rows(workdir) -> list[dict]:
    return load_annotations(workdir / "data" / "test.jsonl")


def tree(root: Path) -> set[str]:
    return {str(path) for path in root.rglob("*")}


def test_cli_writes_results_heatmaps_and_nothing_else(workdir, monkeypatch, capsys):
    cwd = workdir / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    output_dir = workdir / "eval"
    before = tree(workdir)
    results = load_example("run_retrieval_eval").main(
        [
            "--model_name_or_path",
            str(workdir / "model"),
            "--test_file",
            str(workdir / "data" / "test.jsonl"),
            "--output_dir",
            str(output_dir),
            "--modalities",
            *TARGETS,
            "--itm_rerank_top_k",
            "3",
            "--batch_size",
            "64",
        ]
    )
    created = tree(workdir) - before
    assert created and all(path.startswith(str(output_dir)) for path in created), created - {str(output_dir)}

    saved = json.loads((output_dir / "retrieval_results.json").read_text())
    assert saved == pytest.approx(results)
    assert saved["num_items"] == 12 and saved["num_texts"] == 60
    assert saved["chance/R@1"] == pytest.approx(100 / 12)
    for forward, backward in [("t2i", "i2t"), ("t2a", "a2t"), ("t2n", "n2t"), ("t2va", "va2t"), ("t2id", "id2t")]:
        for direction in (forward, backward, f"itm/{forward}", f"itm/{backward}"):
            for metric in ("R@1", "R@5", "R@10"):
                assert 0 <= saved[f"{direction}/{metric}"] <= 100
            assert 1 <= saved[f"{direction}/MedR"] and 1 <= saved[f"{direction}/MeanR"]
    for target in TARGETS:
        assert (output_dir / f"similarity_{target}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| t2va |" in printed and "| itm/id2t |" in printed


def test_cli_refuses_a_non_empty_output_dir(workdir):
    output_dir = workdir / "occupied"
    output_dir.mkdir()
    (output_dir / "keep.txt").write_text("mine")
    argv = ["--model_name_or_path", str(workdir / "model"), "--test_file", str(workdir / "data" / "test.jsonl")]
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        load_example("run_retrieval_eval").main([*argv, "--output_dir", str(output_dir)])
    assert os.listdir(output_dir) == ["keep.txt"]


def brute_force_embeddings(model, processor, rows, texts):
    """Embeddings straight from the model's public feature methods, one call per modality."""
    with torch.no_grad():
        tokens = processor(text=texts)
        inputs = processor(
            images=[r["image"] for r in rows],
            videos=[r["video"] for r in rows],
            audio=[r["audio"] for r in rows],
            depth=[r["depth"] for r in rows],
            normals=[r["normal"] for r in rows],
        )
        features = {
            "text": model.get_text_features(tokens["input_ids"], tokens["attention_mask"]),
            "image": model.get_image_features(inputs["pixel_values"]),
            "audio": model.get_audio_features(inputs["input_features"]),
            "normal": model.get_modality_features("normal", inputs["normal_values"]),
            "va": model.get_fused_features(
                pixel_values_videos=inputs["pixel_values_videos"], input_features=inputs["input_features"]
            ),
            "id": model.get_fused_features(pixel_values=inputs["pixel_values"], depth_values=inputs["depth_values"]),
        }
    return {name: F.normalize(value.pooler_output, dim=-1) for name, value in features.items()}


def test_library_equals_brute_force(model, processor, rows):
    results = evaluate_retrieval(model, processor, rows, TARGETS, batch_size=5, progress=False)
    texts, text_to_item = flatten_captions(rows)
    embeds = brute_force_embeddings(model, processor, rows, texts)
    prefixes = {"image": "t2i", "audio": "t2a", "normal": "t2n", "va": "t2va", "id": "t2id"}
    expected = {}
    for target, prefix in prefixes.items():
        expected.update(retrieval_metrics(embeds["text"] @ embeds[target].t(), text_to_item, prefix=prefix))
    assert {key: results[key] for key in expected} == pytest.approx(expected)
    assert not any(key.startswith("itm/") for key in results)


def test_rerank_only_reorders_within_top_k(model, processor, rows):
    k = 3
    scores = score_retrieval(model, processor, rows, ["va"], batch_size=7, rerank_top_k=k, progress=False)
    similarity, reranked = scores.similarity["va"].double(), scores.reranked_t2x["va"]
    for matrix, rerank in [(similarity, reranked), (similarity.t(), scores.reranked_x2t["va"])]:
        top = matrix.topk(k, dim=1).indices.sort(dim=1).values
        assert torch.equal(rerank.topk(k, dim=1).indices.sort(dim=1).values, top)
        outside = torch.ones_like(matrix, dtype=torch.bool).scatter_(1, top, False)
        assert torch.equal(rerank[outside], matrix[outside])

    # the new order of a query's top k is the order of its matching scores with the items' contexts
    texts, _ = flatten_captions(rows)
    query = 0
    candidates = similarity[query].topk(k).indices
    with torch.no_grad():
        inputs = processor(
            text=[texts[query]] * k,
            videos=[rows[i]["video"] for i in candidates],
            audio=[rows[i]["audio"] for i in candidates],
        )
        matching = model.get_matching_scores(
            inputs["input_ids"],
            inputs["attention_mask"],
            pixel_values_videos=inputs["pixel_values_videos"],
            input_features=inputs["input_features"],
        )
    assert torch.equal(reranked[query, candidates].argsort(descending=True), matching.argsort(descending=True))
    results = retrieval_results(scores)
    assert {"itm/t2va/R@1", "itm/va2t/R@1", "t2va/R@1", "va2t/R@1"} <= set(results)


def test_unknown_target_names_the_models_targets(model, processor, rows):
    with pytest.raises(
        ValueError, match=r"unknown retrieval targets \['thermal'\]; this model's targets are \['image',"
    ):
        score_retrieval(model, processor, rows, ["video", "thermal"], progress=False)


def test_missing_modality_is_named_or_skipped(model, processor, rows):
    broken = copy.deepcopy(rows)
    del broken[4]["audio"]
    with pytest.raises(ValueError, match=r"test\.jsonl: row 4 \(id 'test_00004'\) has no 'audio'"):
        score_retrieval(model, processor, broken, ["image", "va"], source="data/test.jsonl", progress=False)
    results = evaluate_retrieval(model, processor, broken, ["image", "va"], skip_missing=True, progress=False)
    assert "t2i/R@1" in results and not any("va" in key for key in results)


def test_trainer_compute_metrics_builds_the_similarity():
    compute = retrieval_compute_metrics(["video", "audio"])
    text = np.eye(4, dtype=np.float32)
    audio = np.full((4, 4), np.nan, dtype=np.float32)
    audio[:2] = text[[1, 0]]  # the batch of rows 2-3 had no audio
    metrics = compute(EvalPrediction(predictions=(text, text.copy(), audio), label_ids=np.zeros(4)))
    assert metrics["t2v/R@1"] == 100 and metrics["v2t/R@1"] == 100
    assert metrics["t2a/R@1"] == 0 and metrics["a2t/MeanR"] == 2
