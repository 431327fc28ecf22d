"""Zero-shot classification with your own labels: batched scores equal the pipeline's, labels come from an annotation
column or from class folders, accuracy counts the argmax, and bad inputs fail by name."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_pipelines import save_tiny
from transformers import pipeline

from modeling_mico import MiCoConfig, MiCoModel, MiCoProcessor
from modeling_mico.synthetic_data import make_synthetic_dataset
from modeling_mico.zero_shot import accuracy, classify_items, load_labelled_items


REPO = Path(__file__).resolve().parents[1]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("zero_shot") / "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("synthetic") / "data"
    make_synthetic_dataset(output, num_samples=8, num_test=4, modalities=("image", "audio"))
    return output


def test_batched_scores_equal_the_pipelines(saved, data):
    model, processor = MiCoModel.from_pretrained(saved).eval(), MiCoProcessor.from_pretrained(saved)
    items, truth = load_labelled_items(data / "test.jsonl", model.config, ["audio"], "attributes.pitch")
    assert truth == [
        json.loads(line)["attributes"]["pitch"] for line in (data / "test.jsonl").read_text().splitlines()
    ]
    labels = ["low", "mid", "high"]
    probabilities = classify_items(model, processor, items, labels, batch_size=3, progress=False)
    classifier = pipeline("zero-shot-audio-classification", model=str(saved), trust_remote_code=True)
    for item, row in zip(items, probabilities):
        ranked = {entry["label"]: entry["score"] for entry in classifier(item["audio"], candidate_labels=labels)}
        np.testing.assert_allclose(row, [ranked[label] for label in labels], atol=1e-5, rtol=0)
    best = [labels[int(np.argmax(row))] for row in probabilities]
    assert accuracy(probabilities, labels, truth) == pytest.approx(np.mean([a == b for a, b in zip(best, truth)]))


def test_class_folders_give_the_labels_and_the_script_reports_accuracy(saved, data, tmp_path, capsys):
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    for row in rows:
        folder = tmp_path / "classes" / row["attributes"]["color"]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(data / row["image"], folder / Path(row["image"]).name)
    spec = importlib.util.spec_from_file_location(
        "zero_shot_cli", REPO / "examples" / "run_zero_shot_classification.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    output = tmp_path / "predictions.jsonl"
    arguments = ["--model_name_or_path", str(saved), "--inputs", str(tmp_path / "classes"), "--labels", *COLORS]
    summary = cli.main([*arguments, "--output_file", str(output)])
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(record["label"] for record in records) == sorted(row["attributes"]["color"] for row in rows)
    hits = [record["predicted"] == record["label"] for record in records]
    assert summary == {
        "items": 4,
        "accuracy": pytest.approx(np.mean(hits)),
        "chance": 1 / 6,
        "output_file": str(output),
    }
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["items"] == 4
    with pytest.raises(SystemExit, match="predictions.jsonl exists; pass --overwrite"):
        cli.main([*arguments, "--output_file", str(output)])


def test_bad_inputs_fail_by_name(saved, data):
    config = MiCoConfig.from_pretrained(saved)
    with pytest.raises(KeyError, match=r"test.jsonl, row 1: no column 'attributes.smell'"):
        load_labelled_items(data / "test.jsonl", config, ["image"], "attributes.smell")
    with pytest.raises(ValueError, match="say which media columns to classify"):
        load_labelled_items(data / "test.jsonl", config)
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        load_labelled_items(data / "test.jsonl", config, ["smell"])
    probabilities = np.array([[0.9, 0.1]])
    with pytest.raises(ValueError, match=r"true labels \['cat'\] are not among the candidate labels"):
        accuracy(probabilities, ["red", "blue"], ["cat"])
    assert accuracy(probabilities, ["red", "blue"], [None]) is None
