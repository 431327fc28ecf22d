"""Parity with the original MiCo code: tests/fixtures/parity holds a small random checkpoint in both original layouts
and the outputs the original code computes from it (see its README). Every recorded model output is reproduced here
after converting each layout to disk and after loading it on the fly."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modeling_mico import MiCoModel
from modeling_mico.convert_original import convert_original_checkpoint


PARITY = Path(__file__).parent / "fixtures" / "parity"
REFERENCE = np.load(PARITY / "reference_outputs.npz")
MANIFEST = json.loads((PARITY / "manifest.json").read_text())

TOKENS_TOLERANCE = 1e-5
LOGITS_TOLERANCE = 2e-5

# fixture name -> (registry modality, its encoder, input array)
KNOWLEDGE = {
    "image": ("image", "vision", "in_pixel_values_image"),
    "video": ("video", "vision", "in_pixel_values_video"),
    "audio": ("audio", "audio", "in_input_features_audio"),
    "audio_interp": ("audio", "audio", "in_input_features_audio_interp"),
    "depth": ("depth", "depth", "in_depth_values"),
    "depth_interp": ("depth", "depth", "in_depth_values_interp"),
}
CONTEXTS = {
    "video": {"pixel_values_videos": "in_pixel_values_video"},
    "audio": {"input_features": "in_input_features_audio"},
    "va": {"pixel_values_videos": "in_pixel_values_video", "input_features": "in_input_features_audio"},
    "id": {"pixel_values": "in_pixel_values_image", "depth_values": "in_depth_values"},
    "full": {
        "pixel_values_videos": "in_pixel_values_video",
        "input_features": "in_input_features_audio_interp",
        "depth_values": "in_depth_values_interp",
        "subtitle_input_ids": "in_subtitle_input_ids",
        "subtitle_attention_mask": "in_subtitle_attention_mask",
    },
}
FUSED_INPUTS = {
    "va": {"pixel_values_videos": "in_pixel_values_video", "input_features": "in_input_features_audio"},
    "id": {"pixel_values": "in_pixel_values_image", "depth_values": "in_depth_values"},
    "vs": {
        "pixel_values_videos": "in_pixel_values_video",
        "subtitle_input_ids": "in_subtitle_input_ids",
        "subtitle_attention_mask": "in_subtitle_attention_mask",
    },
    "vas": {
        "pixel_values_videos": "in_pixel_values_video",
        "input_features": "in_input_features_audio",
        "subtitle_input_ids": "in_subtitle_input_ids",
        "subtitle_attention_mask": "in_subtitle_attention_mask",
    },
}


def ref(name: str) -> torch.Tensor:
    return torch.from_numpy(REFERENCE[name])


def inputs(mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    return {argument: ref(name) for argument, name in mapping.items()}


def compute_outputs(model: MiCoModel) -> dict[str, torch.Tensor]:
    """Every `out_*` array of the fixture, computed with the package's public API."""
    out = {}
    texts = {"input_ids": ref("in_text_input_ids"), "attention_mask": ref("in_text_attention_mask")}
    subtitles = {"input_ids": ref("in_subtitle_input_ids"), "attention_mask": ref("in_subtitle_attention_mask")}
    with torch.no_grad():
        for name, (modality, encoder, array) in KNOWLEDGE.items():
            tokens = model.encode_modality(modality, ref(array))
            pooled = model.pool_tokens(tokens)
            out[f"out_tokens_{name}"] = tokens
            out[f"out_pooled_{name}"] = pooled
            out[f"out_feat_{name}_proj"] = model.project({encoder: pooled})
            out[f"out_context_{name}"] = model.context_from_tokens(encoder, tokens)
        out["out_feat_image_proj"] = model.get_image_features(ref("in_pixel_values_image")).pooler_output
        out["out_feat_video_proj"] = model.get_video_features(ref("in_pixel_values_video")).pooler_output
        out["out_feat_audio_proj"] = model.get_audio_features(ref("in_input_features_audio")).pooler_output
        out["out_feat_depth_proj"] = model.get_depth_features(ref("in_depth_values")).pooler_output
        out["out_text_sequence_output"] = model.encode_text(**texts)
        out["out_feat_text_proj"] = model.get_text_features(**texts).pooler_output
        out["out_subtitle_sequence_output"] = model.encode_text(**subtitles)
        out["out_feat_subtitle_proj"] = model.get_subtitle_features(**subtitles).pooler_output
        out["out_context_subtitle"] = model.subtitle_context(**subtitles)
        for head, mapping in FUSED_INPUTS.items():
            out[f"out_feat_{head}_proj"] = model.get_fused_features(**inputs(mapping)).pooler_output
        for name in [key[len("out_feat_") : -len("_proj")] for key in list(out) if key.endswith("_proj")]:
            out[f"out_feat_{name}_norm"] = F.normalize(out[f"out_feat_{name}_proj"], dim=-1)
        out["out_contra_temp"] = model.temperature.detach().reshape(1)
        text = out["out_feat_text_norm"]
        for name in ("image", "video", "audio", "depth", "va", "vs", "vas", "id"):
            out[f"out_logits_per_text_{name}"] = text @ out[f"out_feat_{name}_norm"].t() / model.temperature
        pair = {"input_ids": texts["input_ids"][:2], "attention_mask": texts["attention_mask"][:2]}
        for name, mapping in CONTEXTS.items():
            context = model.get_multimodal_context(**inputs(mapping))
            for suffix, ctx in (("matched", context), ("mismatched", context.flip(0))):
                logits = model.get_matching_logits(**pair, context=ctx)
                out[f"out_itm_logits_{name}_{suffix}"] = logits
                out[f"out_itm_scores_{name}_{suffix}"] = model.get_matching_scores(**pair, context=ctx)
            out[f"out_context_{name}"] = context
    return out


def assert_parity(outputs: dict[str, torch.Tensor]) -> float:
    """Compare with every recorded `out_*` array; returns the worst max-abs difference."""
    expected = [name for name in REFERENCE.files if name.startswith("out_")]
    expected += list(MANIFEST["derived_entries"])
    worst = 0.0
    for name in expected:
        assert name in outputs, f"{name} was not computed"
        reference = (
            ref(name)
            if name in REFERENCE.files
            else torch.cat(
                [ref(part) for part in MANIFEST["derived_entries"][name]["equals_concatenation_along_dim1_of"]], dim=1
            )
        )
        tolerance = LOGITS_TOLERANCE if name.startswith("out_logits_per_text") else TOKENS_TOLERANCE
        diff = (outputs[name].float() - reference.float()).abs().max().item()
        assert outputs[name].shape == reference.shape, f"{name}: shape {outputs[name].shape} != {reference.shape}"
        assert diff <= tolerance, f"{name}: max abs difference {diff:.2e} > {tolerance:.0e}"
        worst = max(worst, diff)
    return worst


@pytest.fixture(scope="module")
def converted_dirs(tmp_path_factory) -> dict[str, Path]:
    """Both original layouts converted to Transformers directories with the conversion library."""
    root = tmp_path_factory.mktemp("converted")
    dirs = {}
    for layout in ("hub", "repo"):
        dirs[layout] = root / layout
        convert_original_checkpoint(PARITY / layout, dirs[layout])
    return dirs


@pytest.mark.parametrize("layout", ["hub", "repo"])
def test_converted_directory_reproduces_original_outputs(converted_dirs, layout):
    model = MiCoModel.from_pretrained(converted_dirs[layout], attn_implementation="eager").eval()
    assert_parity(compute_outputs(model))


@pytest.mark.parametrize("layout", ["hub", "repo"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_on_the_fly_loading_reproduces_original_outputs(layout, attn_implementation):
    model = MiCoModel.from_pretrained(PARITY / layout, attn_implementation=attn_implementation)
    worst = assert_parity(compute_outputs(model))
    assert worst < 1e-5


def test_pickle_twin_matches_safetensors(tmp_path):
    """The Hub layout's `.bin` twin (rebuilt here from the safetensors file) converts to the same model."""
    from safetensors.torch import load_file

    state = load_file(PARITY / "hub" / "mico_pytorch_model.safetensors")
    torch.save(state, tmp_path / "mico_pytorch_model.bin")
    (tmp_path / "config.json").write_text((PARITY / "hub" / "config.json").read_text())
    from_bin = MiCoModel.from_pretrained(tmp_path)
    from_safetensors = MiCoModel.from_pretrained(PARITY / "hub")
    for (name, a), (_, b) in zip(from_bin.state_dict().items(), from_safetensors.state_dict().items()):
        assert torch.equal(a, b), name
