"""Conversion of original checkpoints: key mapping, legacy renames, resizing, refusals, CLI and Hub-style output."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageTextToText, AutoModelForPreTraining, AutoProcessor

from modeling_mico import MiCoForConditionalGeneration, MiCoForPreTraining, MiCoModel
from modeling_mico.configuration_mico import DEFAULT_FUSED_HEADS
from modeling_mico.convert_original import (
    config_from_original,
    convert_original_checkpoint,
    export_to_original,
    hf_to_original_key,
    load_original_checkpoint,
    original_to_hf_key,
    rename_legacy_key,
)


ROOT = Path(__file__).resolve().parents[1]
PARITY = ROOT / "tests" / "fixtures" / "parity"
HUB_WEIGHTS = PARITY / "hub" / "mico_pytorch_model.safetensors"
HYPER_PARAMETERS = json.loads((PARITY / "hub" / "config.json").read_text())


def write_hub_layout(directory: Path, state: dict[str, torch.Tensor], hyper_parameters: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, directory / "mico_pytorch_model.safetensors")
    (directory / "config.json").write_text(json.dumps(hyper_parameters or HYPER_PARAMETERS))
    return directory


def legacy_name(key: str) -> str:
    """The training-time name the original loader rewrites into `key`."""
    for new, old in (
        ("vision_frame_embedding", "video_frame_embedding"),
        ("vision_type_embeddings", "video_type_embeddings"),
        ("hidden_trans_vision_multimodal", "hidden_trans_video_multimodal"),
    ):
        if key.startswith(new):
            return old + key[len(new) :]
    if key.startswith("vision_encoder.visual."):
        return "evaclip_model." + key[len("vision_encoder.") :]
    if key.startswith("vision_encoder."):
        return "clip_model." + key[len("vision_encoder.") :]
    return key


def test_legacy_renames_are_exclusive_and_ordered():
    assert rename_legacy_key("video_frame_embedding") == ("vision_frame_embedding", True)
    assert rename_legacy_key("evaclip_model.visual.video_x") == ("evaclip_model.visual.vision_x", True)
    assert rename_legacy_key("evaclip_model.visual.cls_token") == ("vision_encoder.visual.cls_token", True)
    assert rename_legacy_key("clip_model.text.ln_final.bias") == ("vision_encoder.text.ln_final.bias", True)
    assert rename_legacy_key("contra_temp") == ("contra_temp", False)


def test_mapping_is_reversible_bit_for_bit():
    """Every tensor MiCo uses comes back under its original name with identical bits."""
    source = load_file(HUB_WEIGHTS)
    _, converted, report = load_original_checkpoint(PARITY / "hub")
    exported = export_to_original(converted)
    unused = {entry.split(" ")[0] for entry in report.dropped if "tied copy" not in entry}
    assert set(exported) == set(source) - unused
    for key, tensor in exported.items():
        assert torch.equal(tensor, source[key]), key
    assert all(hf_to_original_key(original_to_hf_key(key)) == key for key in exported if original_to_hf_key(key))


def test_legacy_names_float16_and_unused_text_tower(tmp_path):
    """A training-time checkpoint: legacy names, float16 legacy tensors, EVA text tower; same model once loaded."""
    source = load_file(HUB_WEIGHTS)
    legacy = {legacy_name(key): value for key, value in source.items()}
    legacy["evaclip_model.visual.blocks.0.attn.qkv.weight"] = source[
        "vision_encoder.visual.blocks.0.attn.qkv.weight"
    ].half()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "log").mkdir()
    torch.save(legacy, tmp_path / "ckpt" / "model_step_20.pt")
    torch.save({key: value * 0 for key, value in legacy.items()}, tmp_path / "ckpt" / "model_step_3.pt")
    (tmp_path / "log" / "hps.json").write_text(json.dumps({"model_cfg": HYPER_PARAMETERS}))
    _, state, report = load_original_checkpoint(tmp_path)
    assert state["mico.vision_model.encoder.layers.0.self_attn.qkv.weight"].dtype == torch.float16
    assert any(entry.startswith("vision_encoder.text.") for entry in report.dropped)
    model = MiCoModel.from_pretrained(tmp_path)
    reference = MiCoModel.from_pretrained(PARITY / "hub")
    expected_qkv = source["vision_encoder.visual.blocks.0.attn.qkv.weight"].half().float()
    assert torch.equal(model.vision_model.encoder.layers[0].self_attn.qkv.weight, expected_qkv)
    assert torch.equal(model.frame_embeddings["vision"], reference.frame_embeddings["vision"])


def test_heads_and_modalities_come_from_the_registry():
    """The fused heads are the registry's (`DEFAULT_FUSED_HEADS`) that the checkpoint has; the knowledge modalities
    come in the registry's context order whatever the order of the stored tensors."""
    shapes = {key: tuple(value.shape) for key, value in reversed(load_file(HUB_WEIGHTS).items())}
    config = config_from_original(HYPER_PARAMETERS, shapes)
    assert config.fused_heads == DEFAULT_FUSED_HEADS
    assert list(config.knowledge_modalities) == list(config.context_order) == ["vision", "audio", "depth"]
    without = {
        key: shape for key, shape in shapes.items() if not key.startswith(("contra_head_vs.", "contra_head_id."))
    }
    config = config_from_original(HYPER_PARAMETERS, without)
    assert config.fused_heads == {name: DEFAULT_FUSED_HEADS[name] for name in ("va", "vas")}


def test_resolution_and_frame_changes_follow_the_original_loader(tmp_path):
    hyper_parameters = {**HYPER_PARAMETERS, "vision_resolution": 196, "max_vision_sample_num": 6}
    write_hub_layout(tmp_path, load_file(HUB_WEIGHTS), hyper_parameters)
    config, state, report = load_original_checkpoint(tmp_path)
    source = load_file(HUB_WEIGHTS)
    assert config.vision_config.image_size == 196 and config.knowledge_modalities["vision"] == 6
    grid = source["vision_encoder.visual.pos_embed"][0, 1:].reshape(16, 16, -1).permute(2, 0, 1)[None]
    resized = F.interpolate(grid, (14, 14), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).reshape(196, -1)
    expected = torch.cat([source["vision_encoder.visual.pos_embed"][0, :1], resized])[None]
    assert torch.equal(state["mico.vision_model.embeddings.position_embedding"], expected)
    frames = F.interpolate(source["vision_frame_embedding"].permute(0, 2, 1), 6, mode="nearest").permute(0, 2, 1)
    assert torch.equal(state["mico.frame_embeddings.vision"], frames)
    assert torch.equal(state["mico.frame_embeddings.depth"], source["depth_frame_embedding"])
    assert len(report.resized) == 2
    model = MiCoModel.from_pretrained(tmp_path)
    assert model.get_video_features(torch.randn(1, 6, 3, 196, 196)).pooler_output.shape == (1, 24)


def test_refuses_unknown_missing_and_mis_shaped_keys(tmp_path):
    source = load_file(HUB_WEIGHTS)
    write_hub_layout(tmp_path / "unknown", {**source, "contra_head_x.linear.weight": torch.zeros(24, 64)})
    with pytest.raises(KeyError, match="contra_head_x.linear.weight"):
        convert_original_checkpoint(tmp_path / "unknown", tmp_path / "out1")
    missing = {key: value for key, value in source.items() if key != "itm_head.linear2.bias"}
    write_hub_layout(tmp_path / "missing", missing)
    with pytest.raises(KeyError, match="itm_head.classifier.bias"):
        convert_original_checkpoint(tmp_path / "missing", tmp_path / "out2")
    with pytest.raises(KeyError, match="itm_head.classifier.bias"):
        MiCoModel.from_pretrained(tmp_path / "missing")
    shaped = {**source, "itm_head.linear1.bias": torch.zeros(31)}
    write_hub_layout(tmp_path / "shaped", shaped)
    with pytest.raises(ValueError, match=r"itm_head.dense.bias: checkpoint shape \(31,\)"):
        convert_original_checkpoint(tmp_path / "shaped", tmp_path / "out3")
    assert not any((tmp_path / name).exists() for name in ("out1", "out2", "out3"))


def test_refuses_pickles_that_are_not_plain_tensors(tmp_path):
    import datetime

    (tmp_path / "hps.json").write_text(json.dumps(HYPER_PARAMETERS))
    torch.save({"contra_temp": torch.tensor(0.05), "saved": datetime.datetime(2024, 1, 1)}, tmp_path / "object.bin")
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_original_checkpoint(tmp_path / "object.bin", tmp_path / "out", config_path=tmp_path / "hps.json")
    torch.save({"contra_temp": torch.tensor(0.05), "note": "not a tensor"}, tmp_path / "string.bin")
    with pytest.raises(ValueError, match="entry 'note' is a str, not a tensor"):
        convert_original_checkpoint(tmp_path / "string.bin", tmp_path / "out", config_path=tmp_path / "hps.json")


def test_refuses_a_non_empty_output_dir(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_original_checkpoint(PARITY / "hub", tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_single_file_with_config_sharded_bfloat16(tmp_path):
    shutil.copy(HUB_WEIGHTS, tmp_path / "weights.safetensors")
    convert_original_checkpoint(
        tmp_path / "weights.safetensors",
        tmp_path / "out",
        config_path=PARITY / "hub" / "config.json",
        dtype="bfloat16",
        max_shard_size="2MB",
    )
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModel.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    reference = MiCoModel.from_pretrained(PARITY / "hub")
    torch.testing.assert_close(model.temperature.float(), reference.temperature.to(torch.bfloat16).float())


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "conversion" / "convert_mico_original_to_hf.py"), *args]
    return subprocess.run(
        command, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    )


def test_cli_writes_a_complete_directory(tmp_path):
    arguments = ("--checkpoint", str(PARITY / "repo"), "--output_dir", str(tmp_path / "out"))
    result = run_cli(*arguments)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Dropped 23 unused keys" in result.stdout
    files = {path.name for path in (tmp_path / "out").iterdir()}
    expected = {"config.json", "model.safetensors", "generation_config.json", "processor_config.json"}
    assert expected | {"tokenizer.json", "modeling_mico.py", "configuration_mico.py"} <= files
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "mico" and "AutoModel" in config["auto_map"]
    assert type(AutoProcessor.from_pretrained(tmp_path / "out")).__name__ == "MiCoProcessor"
    assert type(AutoModelForPreTraining.from_pretrained(tmp_path / "out")) is MiCoForPreTraining
    captioner = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert type(captioner) is MiCoForConditionalGeneration
    assert captioner.lm_head.decoder.weight is captioner.mico.text_model.embeddings.word_embeddings.weight
    assert captioner.generation_config.num_beams == 3 and captioner.generation_config.length_penalty == 0.6
    again = run_cli(*arguments)
    assert again.returncode != 0 and "--overwrite" in again.stderr
