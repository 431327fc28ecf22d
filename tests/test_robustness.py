"""Nothing a user gave is lost, and bad input is refused by name: atomic outputs under kill and overwrite, training
resume, and validation of checkpoints, annotations and model inputs — exercised as a user hits them (CLI or API)."""

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_mico import MiCoConfig, MiCoForConditionalGeneration, MiCoForPreTraining, MiCoModel
from modeling_mico.annotations import check_columns, load_annotation_dataset, load_annotations
from modeling_mico.convert_original import convert_original_checkpoint
from modeling_mico.data import BrokenMediaError


REPO = Path(__file__).resolve().parents[1]
PARITY = REPO / "tests" / "fixtures" / "parity"
MEDIA = REPO / "tests" / "fixtures" / "media"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def load_example(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    """Run an example/conversion script in a fresh interpreter, after `prelude` (e.g. a patch that kills it)."""
    code = f"import runpy, sys\n{prelude}\nsys.argv = {list(args)!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)


def files(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir()}


def partials(directory: Path) -> list[str]:
    return [path.name for path in directory.iterdir() if ".partial-" in path.name]


# ---- conversion: overwrite, inputs, kill, corrupt sources ---------------------------------------------------------


def test_conversion_overwrite_leaves_no_stale_weights(tmp_path):
    output = tmp_path / "out"
    convert_original_checkpoint(PARITY / "hub", output)
    assert "model.safetensors" in files(output)
    convert_original_checkpoint(PARITY / "hub", output, max_shard_size="2MB", overwrite=True)
    shards = {name for name in files(output) if name.endswith(".safetensors")}
    assert "model.safetensors" not in shards and len(shards) > 1  # the old single file is gone
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == shards
    convert_original_checkpoint(PARITY / "hub", output, dtype="bfloat16", overwrite=True)
    assert {name for name in files(output) if "safetensors" in name} == {"model.safetensors"}
    assert load_file(output / "model.safetensors")["mico.temperature"].dtype == torch.bfloat16
    assert partials(tmp_path) == []


def test_conversion_never_writes_into_or_over_its_source(tmp_path):
    source = tmp_path / "hub"
    shutil.copytree(PARITY / "hub", source)
    before = {name: (source / name).read_bytes() for name in files(source)}
    with pytest.raises(ValueError, match=r"refusing to write .*hub: it is the input .*hub"):
        convert_original_checkpoint(source, source, overwrite=True)
    with pytest.raises(ValueError, match=r"refusing to write .*converted: it lies inside the input"):
        convert_original_checkpoint(source, source / "converted", overwrite=True)
    with pytest.raises(ValueError, match=r"refusing to write .*: it contains the input"):
        convert_original_checkpoint(source, tmp_path, overwrite=True)
    assert {name: (source / name).read_bytes() for name in files(source)} == before


def test_conversion_killed_mid_write_keeps_the_previous_output(tmp_path):
    output = tmp_path / "out"
    convert_original_checkpoint(PARITY / "hub", output)
    before = {name: (output / name).read_bytes() for name in files(output)}
    # a kill after the shards and config were written, before the processor files
    kill = (
        "import os, signal\nimport modeling_mico.convert_original as conversion\n"
        "conversion._save_processing = lambda *args: os.kill(os.getpid(), signal.SIGKILL)"
    )
    cli = ["conversion/convert_mico_original_to_hf.py", "--checkpoint", str(PARITY / "repo"), "--output_dir"]
    killed = run_script(*cli, str(output), "--overwrite", "--max_shard_size", "2MB", prelude=kill)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert {name: (output / name).read_bytes() for name in files(output)} == before  # untouched
    assert len(partials(tmp_path)) == 1  # the half-written directory is a hidden sibling, never the output
    rerun = run_script(*cli, str(output), "--overwrite", "--max_shard_size", "2MB")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "model.safetensors" not in files(output) and "model.safetensors.index.json" in files(output)
    assert partials(tmp_path) == []  # the killed run's leftovers are removed
    assert type(MiCoModel.from_pretrained(output)) is MiCoModel
    fresh = run_script(*cli, str(tmp_path / "fresh"), prelude=kill)
    assert fresh.returncode == -9 and not (tmp_path / "fresh").exists()  # nothing that loads is left


WEIGHTS = "mico_pytorch_model.safetensors"


def _truncate(source: Path) -> str:
    data = (source / WEIGHTS).read_bytes()
    (source / WEIGHTS).write_bytes(data[:-1000])
    return rf"{WEIGHTS} is truncated: {len(data) - 1000} bytes, but its header describes {len(data)}"


def _garbage_pickle(source: Path) -> str:
    (source / WEIGHTS).unlink()
    (source / "mico_pytorch_model.bin").write_bytes(b"not a pickle" * 50)
    return r"mico_pytorch_model.bin is not a plain tensor state dict loadable with weights_only=True"


def _config(edit):
    def mutate(source: Path) -> str:
        config = json.loads((source / "config.json").read_text())
        config, message = edit(config)
        (source / "config.json").write_text(json.dumps(config))
        return message

    return mutate


def _missing_heads(config):
    del config["evaclip_model_cfg"]["vision_cfg"]["head_width"]
    return config, r"config.json does not describe .* \(malformed hyper-parameters\): missing entry 'head_width'"


@pytest.mark.parametrize(
    "corrupt",
    [
        _truncate,
        _garbage_pickle,
        _config(lambda config: ([config], r"config.json must hold a JSON object, not a list")),
        _config(
            lambda config: (
                {**config, "vision_resolution": "224"},
                r"config.json does not describe .*: .*vision_config.image_size must be an integer, got '224'",
            )
        ),
        _config(lambda config: ({**config, "contra_dim": "24"}, r"config.json .*contra_dim is '24' but the heads")),
        _config(_missing_heads),
    ],
    ids=[
        "truncated-safetensors",
        "garbage-pickle",
        "config-list",
        "config-string-size",
        "config-string-dim",
        "config-missing-heads",
    ],
)
def test_conversion_refuses_a_corrupt_source_by_name_before_writing(tmp_path, corrupt):
    source = tmp_path / "source"
    shutil.copytree(PARITY / "hub", source)
    message = corrupt(source)
    with pytest.raises(ValueError, match=message):
        convert_original_checkpoint(source, tmp_path / "out", max_shard_size="2MB")
    assert files(tmp_path) == {"source"}  # not a shard, not a partial directory


# ---- captioning: inputs, overwrite, broken files --------------------------------------------------------------------


@pytest.fixture(scope="module")
def captioner(tmp_path_factory) -> Path:
    """A tiny model saved with the head layout: captioning loads it as a captioner, evaluation as `MiCoModel`."""
    path = tmp_path_factory.mktemp("captioner") / "model"
    torch.manual_seed(0)
    MiCoForConditionalGeneration(MiCoConfig.from_preset("tiny")).save_pretrained(path)
    return path


def caption(captioner: Path, *args: str) -> None:
    argv = ["--model_name_or_path", str(captioner), "--num_beams", "1", "--max_new_tokens", "2", *args]
    load_example("examples/run_captioning.py").main(argv)


def test_captioning_never_writes_over_an_input_or_an_existing_file(tmp_path, captioner):
    video = tmp_path / "clip.mp4"
    shutil.copy(MEDIA / "test.mp4", video)
    with pytest.raises(ValueError, match=r"refusing to write .*clip.mp4: it is the input .*clip.mp4"):
        caption(captioner, "--inputs", str(video), "--output_file", str(video), "--overwrite")
    with pytest.raises(ValueError, match=r"captions.jsonl: it lies inside the input"):
        caption(captioner, "--inputs", str(tmp_path), "--output_file", str(tmp_path / "captions.jsonl"))
    assert video.read_bytes() == (MEDIA / "test.mp4").read_bytes()
    output = tmp_path / "out" / "captions.jsonl"
    output.parent.mkdir()
    output.write_text("my notes\n")
    with pytest.raises(FileExistsError, match=r"captions.jsonl already exists and is not empty; pass --overwrite"):
        caption(captioner, "--inputs", str(video), "--output_file", str(output))
    assert output.read_text() == "my notes\n"
    caption(captioner, "--inputs", str(video), "--output_file", str(output), "--overwrite")
    assert [json.loads(line)["path"] for line in output.read_text().splitlines()] == [str(video)]


def test_captioning_stops_at_a_broken_file_or_skips_it(tmp_path, captioner, capsys):
    media = tmp_path / "media"
    media.mkdir()
    shutil.copy(MEDIA / "test.jpeg", media / "a_good.jpeg")
    (media / "b_broken.jpeg").write_bytes(b"\xff\xd8 not really a jpeg")
    output = tmp_path / "captions.jsonl"
    with pytest.raises(BrokenMediaError, match=r"cannot decode .*b_broken.jpeg: .*--skip_broken"):
        caption(captioner, "--inputs", str(media), "--output_file", str(output))
    assert not output.exists() and partials(tmp_path) == []
    caption(captioner, "--inputs", str(media), "--output_file", str(output), "--skip_broken")
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [Path(record["path"]).name for record in records] == ["a_good.jpeg"]
    assert "wrote 1 captions to" in capsys.readouterr().out.splitlines()[-1].replace("(skipped 1 undecodable", "to")


# ---- retrieval evaluation: shared media, broken files ---------------------------------------------------------------


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def evaluate(model: Path, test_file: Path, output_dir: Path, *args: str) -> dict:
    argv = ["--model_name_or_path", str(model), "--test_file", str(test_file), "--output_dir", str(output_dir)]
    return load_example("examples/run_retrieval_eval.py").main([*argv, "--modalities", "image", *args])


def test_retrieval_refuses_items_sharing_a_media_file(tmp_path, captioner):
    shutil.copy(MEDIA / "test.jpeg", tmp_path / "cat.jpeg")
    rows = [{"caption": "a cat", "image": "cat.jpeg"}, {"caption": "the same cat", "image": "./cat.jpeg"}]
    test_file = write_rows(tmp_path / "test.jsonl", rows)
    with pytest.raises(ValueError, match=r"test.jsonl: rows 0 and 1 share the image file .*cat.jpeg; retrieval needs"):
        evaluate(captioner, test_file, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_retrieval_stops_at_a_broken_file_or_skips_its_item(tmp_path, captioner):
    for name in ("a", "b", "c"):
        shutil.copy(MEDIA / "test.jpeg", tmp_path / f"{name}.jpeg")
    (tmp_path / "broken.jpeg").write_bytes(b"")
    rows = [{"captions": [f"photo {name}", f"picture {name}"], "image": f"{name}.jpeg"} for name in "ab"]
    rows += [{"caption": "broken", "image": "broken.jpeg"}, {"caption": "photo c", "image": "c.jpeg"}]
    test_file = write_rows(tmp_path / "test.jsonl", rows)
    with pytest.raises(BrokenMediaError, match=r"cannot decode .*broken.jpeg"):
        evaluate(captioner, test_file, tmp_path / "eval")
    assert not (tmp_path / "eval").exists() and partials(tmp_path) == []
    results = evaluate(captioner, test_file, tmp_path / "eval", "--skip_broken")
    assert results["num_items"] == 3 and results["num_texts"] == 5
    assert json.loads((tmp_path / "eval" / "retrieval_results.json").read_text())["num_items"] == 3


def test_retrieval_overwrite_replaces_the_previous_results_entirely(tmp_path, captioner):
    shutil.copy(MEDIA / "test.jpeg", tmp_path / "a.jpeg")
    shutil.copy(MEDIA / "test.jpeg", tmp_path / "b.jpeg")
    test_file = write_rows(tmp_path / "test.jsonl", [{"caption": f"{n}", "image": f"{n}.jpeg"} for n in "ab"])
    output = tmp_path / "eval"
    output.mkdir()
    (output / "similarity_video.png").write_bytes(b"stale")
    with pytest.raises(FileExistsError, match="pass --overwrite_output_dir to replace it"):
        evaluate(captioner, test_file, output)
    evaluate(captioner, test_file, output, "--overwrite_output_dir")
    assert files(output) == {"retrieval_results.json", "similarity_image.png"}
    with pytest.raises(ValueError, match=r"refusing to write .*: it contains the input .*test.jsonl"):
        evaluate(captioner, test_file, tmp_path, "--overwrite_output_dir")


# ---- annotations ----------------------------------------------------------------------------------------------------


def test_annotation_rows_null_media_split_and_empty_files(tmp_path):
    rows = [{"caption": "a", "video": "a.mp4", "split": "test"}, {"caption": "b", "video": None, "split": "test"}]
    path = write_rows(tmp_path / "rows.jsonl", rows)
    loaded = load_annotations(path)
    assert loaded[0]["video"] == str(tmp_path / "a.mp4") and "video" not in loaded[1]  # null: the row lacks it
    with pytest.raises(ValueError, match=r"rows.jsonl: no row has split='val'; the file's splits are \['test'\]"):
        load_annotations(path, split="val")
    write_rows(path, [{"caption": "a", "video": 3}])
    with pytest.raises(ValueError, match=r"rows.jsonl, row 0: 'video' must be a media path \(a string\), got 3"):
        load_annotations(path)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty.jsonl: the annotation file is empty"):
        load_annotations(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match=r"empty.jsonl: the annotation file is empty"):
        load_annotation_dataset(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"blank.jsonl: the annotation file holds no rows"):
        load_annotations(tmp_path / "blank.jsonl")


def test_a_requested_column_that_no_row_has_is_refused(tmp_path):
    path = write_rows(tmp_path / "train.jsonl", [{"caption": "a", "image": "a.png", "audio": None}] * 2)
    dataset = load_annotation_dataset(path)
    check_columns(dataset, ["image"], path)
    with pytest.raises(ValueError, match=r"train.jsonl: no row has a value in the requested column 'audio'"):
        check_columns(dataset, ["image", "audio"], path)
    with pytest.raises(ValueError, match=r"train.jsonl: no row has the requested column 'depth'"):
        check_columns(dataset, ["depth"], path)


# ---- training scripts: nothing to do, bad arguments, resume, overwrite ---------------------------------------------


def pretrain(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["run_pretrain.py", *args])
    load_example("examples/run_pretrain.py").main()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from modeling_mico.synthetic_data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("images")
    make_synthetic_dataset(root, num_samples=8, num_test=4, image_size=32, modalities=["image"])
    return root


def test_pretrain_refuses_bad_arguments_by_name(tmp_path, images, monkeypatch):
    common = ["--train_file", str(images / "train.jsonl"), "--output_dir", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=r"nothing to do: pass --do_train and/or --do_eval"):
        pretrain(monkeypatch, "--config_name", "tiny", *common)
    common.append("--do_train")
    with pytest.raises(ValueError, match=r"unknown modalities \['smell'\]; choose among"):
        pretrain(monkeypatch, "--config_name", "tiny", *common, "--modalities", "image", "smell")
    with pytest.raises(ValueError, match=r"train.jsonl: no row has the requested column 'audio'"):
        pretrain(monkeypatch, "--config_name", "tiny", *common, "--modalities", "image", "audio")
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no such directory: .*runs/tny"):
        pretrain(monkeypatch, "--model_name_or_path", str(tmp_path / "runs" / "tny"), *common)
    with pytest.raises(ValueError, match=r"--do_eval \(or an --eval_strategy\) needs --validation_file"):
        pretrain(monkeypatch, "--config_name", "tiny", *common, "--do_eval")
    assert not (tmp_path / "run").exists()


def trainer_step(directory: Path) -> int:
    return json.loads((directory / "trainer_state.json").read_text())["global_step"]


@pytest.mark.slow
def test_pretrain_resumes_the_last_complete_checkpoint_and_overwrite_starts_over(
    tmp_path, images, monkeypatch, caplog
):
    output = tmp_path / "run"
    args = [
        "examples/run_pretrain.py", "--config_name", "tiny", "--image_size", "32", "--train_file",
        str(images / "train.jsonl"), "--output_dir", str(output), "--do_train", "--per_device_train_batch_size", "2",
        "--save_steps", "1", "--report_to", "none", "--use_cpu", "--modalities", "image",
    ]  # fmt: skip
    # killed while saving checkpoint-2: after the weights and optimizer, before the trainer state
    kill = (
        "import os, signal, transformers\norigin = transformers.Trainer._save_rng_state\n"
        "def save(self, output_dir):\n"
        "    if self.state.global_step == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    origin(self, output_dir)\ntransformers.Trainer._save_rng_state = save"
    )
    killed = run_script(*args, "--max_steps", "3", prelude=kill)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (
        files(output) == {"checkpoint-1", "checkpoint-2"} and not (output / "checkpoint-2/trainer_state.json").exists()
    )
    with caplog.at_level(logging.WARNING):
        pretrain(monkeypatch, *args[1:], "--max_steps", "3")
    assert f"{output / 'checkpoint-2'} is incomplete (no readable trainer_state.json" in caplog.text
    assert f"resuming from {output / 'checkpoint-1'}" in caplog.text
    assert trainer_step(output) == 3 and trainer_step(output / "checkpoint-2") == 2
    # --overwrite_output_dir: the old run (its checkpoint-3 included) is removed and never resumed
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pretrain(monkeypatch, *args[1:], "--max_steps", "1", "--overwrite_output_dir")
    assert "resuming" not in caplog.text and "removing the previous run" in caplog.text
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1"] and trainer_step(output) == 1
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint .*checkpoint-9 is not a complete checkpoint"):
        pretrain(monkeypatch, *args[1:], "--max_steps", "1", "--resume_from_checkpoint", str(output / "checkpoint-9"))
    inside = [arg if arg != str(output) else str(images) for arg in args[1:]]
    with pytest.raises(ValueError, match=r"refusing to write .*: it contains the input .*train.jsonl"):
        pretrain(monkeypatch, *inside, "--max_steps", "1", "--overwrite_output_dir")
    assert (images / "train.jsonl").exists()


@pytest.mark.slow
def test_peft_resumes_and_evaluation_alone_keeps_the_readme(tmp_path, images, monkeypatch, caplog):
    from modeling_mico import MiCoProcessor

    base = tmp_path / "base"
    config = MiCoConfig.from_preset("tiny")
    MiCoForPreTraining(config).save_pretrained(base)
    MiCoProcessor.from_config(config).save_pretrained(base)
    output = tmp_path / "lora"
    args = [
        "--model_name_or_path", str(base), "--train_file", str(images / "train.jsonl"), "--validation_file",
        str(images / "test.jsonl"), "--output_dir", str(output), "--modalities", "image", "--losses", "contrastive",
        "--per_device_train_batch_size", "2", "--save_steps", "1", "--report_to", "none", "--use_cpu",
    ]  # fmt: skip

    def finetune(*extra: str) -> None:
        monkeypatch.setattr(sys, "argv", ["run_finetune_peft.py", *args, *extra])
        load_example("examples/run_finetune_peft.py").main()

    finetune("--do_train", "--max_steps", "2")
    (output / "checkpoint-2" / "trainer_state.json").write_text('{"global_st')  # killed while writing it
    with caplog.at_level(logging.WARNING):
        finetune("--do_train", "--max_steps", "3")
    assert f"resuming from {output / 'checkpoint-1'}" in caplog.text and trainer_step(output) == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        finetune("--do_train", "--max_steps", "3", "--resume_from_checkpoint", str(output / "checkpoint-2"))
    assert "resuming from" not in caplog.text and trainer_step(output) == 3  # the given checkpoint, not the last
    (output / "README.md").write_text("my notes")
    finetune("--do_eval")
    assert (output / "README.md").read_text() == "my notes"
    assert "eval_i2t/R@1" in json.loads((output / "eval_results.json").read_text())


# ---- model inputs ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretraining_model() -> MiCoForPreTraining:
    torch.manual_seed(0)
    return MiCoForPreTraining(MiCoConfig.from_preset("tiny"))


def test_model_names_mismatched_inputs(pretraining_model):
    size = pretraining_model.config.vision_config.image_size
    ids = torch.tensor([[101, 1037, 102]] * 2)
    videos, audio = torch.randn(2, 2, 3, size, size), torch.randn(3, 1, size, size)
    with pytest.raises(ValueError, match=r"different batch sizes \(pixel_values_videos 2, input_features 3\)"):
        pretraining_model(input_ids=ids, pixel_values_videos=videos, input_features=audio)
    with pytest.raises(ValueError, match=r"different batch sizes \(pixel_values_videos 2, input_features 3\)"):
        pretraining_model.mico(pixel_values_videos=videos, input_features=audio)
    with pytest.raises(ValueError, match=r"different batch sizes \(input_ids 3, pixel_values_videos 2\)"):
        pretraining_model(input_ids=torch.tensor([[101, 102]] * 3), pixel_values_videos=videos)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 3\) but the text is \(2, 3\)"):
        pretraining_model(input_ids=ids, attention_mask=torch.ones(3, 3), pixel_values_videos=videos)
    positions = pretraining_model.config.text_config.max_position_embeddings
    long_ids = torch.full((2, positions + 1), 1037)
    message = rf"the text is {positions + 1} tokens long but the model has {positions} positions"
    with pytest.raises(ValueError, match=message):
        pretraining_model(input_ids=long_ids, pixel_values_videos=videos)
    with pytest.raises(ValueError, match=message):
        pretraining_model.get_text_features(long_ids)


def test_one_token_captions_give_a_finite_pretraining_loss(pretraining_model):
    size = pretraining_model.config.vision_config.image_size
    output = pretraining_model(input_ids=torch.full((4, 1), 101), pixel_values=torch.randn(4, 3, size, size))
    assert torch.isfinite(output.loss) and output.caption_loss is None
    assert sorted(output.task_losses) == ["contrastive_tv", "matching_tv"]
    output.loss.backward()
