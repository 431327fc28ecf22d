"""Zero-shot classification with your own labels: batched scores equal the pipeline's, labels come from an annotation
column or from class folders, accuracy counts the argmax, and bad inputs fail by name."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_pipelines import save_tiny
from transformers import pipeline

from modeling_mico import MiCoConfig, MiCoModel, MiCoProcessor
from modeling_mico.synthetic_data import make_synthetic_dataset
from modeling_mico.zero_shot import (
    accuracy,
    attribute_accuracy,
    attribute_prompts,
    classify_items,
    load_labelled_items,
)


REPO = Path(__file__).resolve().parents[1]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("zero_shot") / "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("synthetic") / "data"
    make_synthetic_dataset(output, num_samples=8, num_test=4, modalities=("image", "video", "audio"))
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
    with pytest.raises(ValueError, match=r"test.jsonl, row 1 has no column 'attributes.smell'"):
        load_labelled_items(data / "test.jsonl", config, ["image"], "attributes.smell")
    with pytest.raises(ValueError, match="say which media columns to classify"):
        load_labelled_items(data / "test.jsonl", config)
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        load_labelled_items(data / "test.jsonl", config, ["smell"])
    probabilities = np.array([[0.9, 0.1]])
    with pytest.raises(ValueError, match=r"true labels \['cat'\] are not among the candidate labels"):
        accuracy(probabilities, ["red", "blue"], ["cat"])
    assert accuracy(probabilities, ["red", "blue"], [None]) is None


def test_attribute_accuracy_with_a_template_is_the_classifiers_accuracy(saved, data):
    """Every (modality, attribute) of the data against its whole vocabulary; with a template, the accuracy is that of
    `classify_items` on the same labels."""
    model, processor = MiCoModel.from_pretrained(saved).eval(), MiCoProcessor.from_pretrained(saved)
    info = json.loads((data / "dataset_info.json").read_text())
    rows = attribute_accuracy(model, processor, data / "test.jsonl", ["image", "audio"], "a {} thing", progress=False)
    assert [(row["modality"], row["attribute"]) for row in rows] == [
        (modality, attribute) for modality in ("image", "audio") for attribute in info["attributes"]
    ]
    assert all(row["items"] == 4 and row["chance"] == 1 / len(info["attributes"][row["attribute"]]) for row in rows)
    items, truth = load_labelled_items(data / "test.jsonl", model.config, ["audio"], "attributes.pitch")
    labels = info["attributes"]["pitch"]
    probabilities = classify_items(model, processor, items, labels, "a {} thing", progress=False)
    (pitch,) = [row for row in rows if row["modality"] == "audio" and row["attribute"] == "pitch"]
    assert pitch["accuracy"] == pytest.approx(accuracy(probabilities, labels, truth))


def test_attribute_prompts_are_captions_of_the_datas_grammar_naming_the_label(data):
    info = json.loads((data / "dataset_info.json").read_text())
    prompts = attribute_prompts(info, "color", "purple", 8)
    assert prompts == attribute_prompts(info, "color", "purple", 8)  # fixed seed
    assert len(prompts) == 8 and all("purple" in prompt for prompt in prompts)
    assert not any(other in prompt for prompt in prompts for other in COLORS if other != "purple")
    vocabulary = {name: "(" + "|".join(values) + ")" for name, values in info["attributes"].items()}
    grammar = [
        re.compile(re.escape(template).replace(r"\{", "{").replace(r"\}", "}").format(**vocabulary))
        for template in info["caption_templates"]
    ]
    assert all(any(pattern.fullmatch(prompt) for pattern in grammar) for prompt in prompts)
    assert len({prompt.split()[0] for prompt in prompts}) > 1  # other attributes and templates vary


def test_attribute_table_script(saved, data, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "zero_shot_cli", REPO / "examples" / "run_zero_shot_classification.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    output = tmp_path / "zero_shot.jsonl"
    arguments = ["--model_name_or_path", str(saved), "--inputs", str(data / "test.jsonl"), "--attributes"]
    summary = cli.main([*arguments, "--modalities", "image", "video+audio", "--output_file", str(output)])
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert written == summary["rows"] and {row["attribute"] for row in written} >= {"color", "shape", "pitch"}
    assert {row["modality"] for row in written} == {"image", "video+audio"}
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| modality | attribute | accuracy | chance | items |"
    assert table[2] == "| image | {attribute} | {accuracy:.3f} | {chance:.3f} | 4 |".format(**written[0])
    with pytest.raises(SystemExit, match="--attributes takes --modalities and no --labels"):
        cli.main([*arguments, "--labels", "red", "blue", "--output_file", str(tmp_path / "other.jsonl")])
    with pytest.raises(FileNotFoundError, match="dataset_info.json not found: attribute accuracy needs"):
        attribute_accuracy(None, None, tmp_path / "zero_shot.jsonl", ["image"])
