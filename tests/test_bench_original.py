"""The side-by-side benchmark against the original MiCo code (benchmarks/bench_original.py, original_driver.py).

CI has no environment with the original's pins, so the end-to-end test drives a stand-in "original repository" written
here: the module names and call signatures the driver uses (`inference_demo.load_from_pretrained_dir`, `model.mico.MiCo`
with `multimodal_encoder.generate` and `forward_vision_encoder`, the three processors, `model.evaclip`), implemented with
the package itself, so its outputs equal the package's except where `differ.json` makes them wrong on purpose. The
real run (`python -m benchmarks --original_repo ... --original_python ...`) is documented in docs/performance.md.
"""

import dataclasses
import json
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bench_original, run_all


STAND_IN = {
    "inference_demo.py": """
        import json, os
        from types import SimpleNamespace

        import torch


        def load_from_pretrained_dir(pretrain_dir):
            with open(os.path.join(pretrain_dir, "log", "hps.json")) as handle:
                model_cfg = SimpleNamespace(**json.load(handle)["model_cfg"])
            steps = [int(name.split("_")[2].split(".")[0]) for name in os.listdir(os.path.join(pretrain_dir, "ckpt"))]
            path = os.path.join(pretrain_dir, "ckpt", f"model_step_{max(steps)}.pt")
            return torch.load(path, map_location="cpu"), model_cfg
    """,
    "model/__init__.py": "",
    "model/evaclip/__init__.py": """
        def add_model_config(path):
            pass
    """,
    "model/mico.py": """
        import json, os
        from types import SimpleNamespace

        import torch
        from modeling_mico import MiCoForConditionalGeneration
        from modeling_mico.convert_original import ConversionReport, config_from_original, convert_tensors
        from modeling_mico.convert_original import export_to_original

        DIFFER = json.load(open(os.path.join(os.path.dirname(__file__), "differ.json")))


        class MMGeneralModule(torch.nn.Module):
            def load_clip_model(self):
                pass

            def construct_multimodal_encoder(self):
                pass


        class Encoder:
            tokenizer = SimpleNamespace(bos_token_id=101, sep_token_id=102, pad_token_id=0)

            def __init__(self, package):
                self.package = package

            def generate(self, input_ids, attention_mask, encoder_hidden_states, max_new_tokens, num_beams,
                         eos_token_id, pad_token_id, length_penalty):
                ids = self.package.generate(context=encoder_hidden_states, num_beams=num_beams,
                                            max_new_tokens=max_new_tokens,
                                            length_penalty=length_penalty if num_beams > 1 else None)
                if num_beams in DIFFER.get("beams", []):
                    ids[:, 1] = torch.where(ids[:, 1] == 1000, 1001, 1000)
                return ids


        class MiCo(MMGeneralModule):
            def __init__(self, config, package):
                super().__init__()
                self.config, self.package = config, package
                self.multimodal_encoder = Encoder(package)

            @classmethod
            def from_pretrained(cls, opts, state_dict):
                shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
                config = config_from_original(vars(opts), shapes)
                package = MiCoForConditionalGeneration(config)
                package.load_state_dict(dict(convert_tensors(state_dict.items(), config, ConversionReport())), strict=False)
                return cls(opts, package.eval())

            def state_dict(self):
                return export_to_original(self.package.state_dict())

            def forward_vision_encoder(self, pixels):
                return self.package.mico.encode_modality("image", pixels) + DIFFER.get("vit", 0.0)
    """,
    "model/imageprocessor.py": """
        from modeling_mico import MiCoProcessor


        class ImageProcessor:
            def __init__(self, image_resolution, image_encoder_type, image_transforms="none", training=True):
                pass

            def __call__(self, path):
                return MiCoProcessor()(images=path)["pixel_values"]
    """,
    "model/videoprocessor.py": """
        from modeling_mico import MiCoProcessor


        class VideoProcessor:
            def __init__(self, video_resolution, video_encoder_type, sample_num=4, video_transforms="none",
                         data_format="frame", training=True):
                self.sample_num = sample_num

            def __call__(self, path):
                return MiCoProcessor()(videos=path, num_frames=self.sample_num)["pixel_values_videos"][0]
    """,
    "model/audioprocessor.py": """
        from modeling_mico import MiCoProcessor


        class AudioProcessor:
            def __init__(self, melbins, target_length, sample_num, frame_shift=10, resize_melbin_num=224,
                         mean=15.41663, std=6.55582, training=True):
                self.sample_num = sample_num

            def __call__(self, path):
                return MiCoProcessor()(audio=path, num_slices=self.sample_num)["input_features"][0]
    """,
}


def write_stand_in(directory: Path, differ: dict) -> Path:
    """A stand-in original repository under `directory`; `differ` makes some of its outputs wrong on purpose."""
    for name, source in STAND_IN.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source).lstrip(), encoding="utf-8")
    (directory / "model" / "differ.json").write_text(json.dumps(differ), encoding="utf-8")
    return directory


@pytest.mark.slow
def test_side_by_side_run_reports_ratios_and_catches_differing_outputs(tmp_path):
    """`python -m benchmarks --only original` against a stand-in whose 3-beam captions and ViT tokens are wrong:
    every case is timed on both sides, the equal outputs pass, the wrong ones are reported, the goals are read."""
    repo = write_stand_in(tmp_path / "original", {"beams": [3], "vit": 1e-3})
    output = tmp_path / "results"
    summary = run_all.main(
        ["--smoke", "--only", "original", "--output_dir", str(output)]
        + ["--original_repo", str(repo), "--original_python", sys.executable]
    )
    results = json.loads((output / "original.json").read_text())
    rows = {row["path"]: row for row in results["rows"]}
    assert list(rows) == [
        "greedy caption, batch 1",
        "3-beam caption, batch 2",
        "ViT 64 wide, 2 blocks, batch 2, fp32",
        "image preprocessing, test.jpeg, 224 px, 2 files",
        "video preprocessing, test.mp4, 4 frames, 2 files",
        "video preprocessing, test.mp4, 8 frames, 2 files",
        "audio preprocessing, test.flac, 3 slices, 2 files",
    ]
    assert results["original"]["missing"] == results["original"]["unexpected"] == []
    for row in rows.values():
        assert row["original_s"] > 0 and row["package_s"] > 0 and row["speedup"] > 0
    assert rows["greedy caption, batch 1"]["identical"] and rows["greedy caption, batch 1"]["tokens_per_caption"] > 0
    for name in list(rows)[:2]:  # against the roofline measured at the start of the run; the cold call apart
        assert rows[name]["package_first_call"] > 0
        assert 0 < rows[name]["bound_s"] and rows[name]["speedup_at_bound"] == pytest.approx(
            rows[name]["original"] / rows[name]["bound_s"]
        )
    beams = rows["3-beam caption, batch 2"]
    assert not beams["identical"] and re.match(r"original \[\[100[01], ", beams["detail"])
    vit = rows["ViT 64 wide, 2 blocks, batch 2, fp32"]
    assert not vit["identical"] and vit["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    for name in list(rows)[3:]:
        assert rows[name]["identical"] and rows[name]["max_abs_diff"] == 0.0
    goals = {goal["name"]: goal for goal in summary["goals"]}
    captions = goals["captions vs the original code (slowest case)"]
    assert captions["value"] == min(rows[name]["speedup"] for name in list(rows)[:2])
    video = goals["video preprocessing vs the original code (slower of 4, 8 frames)"]
    assert video["value"] == min(rows[name]["speedup"] for name in list(rows)[4:6])
    markdown = (output / "RESULTS.md").read_text()
    assert "## Side by side with the original MiCo code" in markdown
    assert "| 3-beam caption, batch 2 | s / caption |" in markdown and "**tokens differ**" in markdown
    assert "**over tolerance**" in markdown and "identical tokens" in markdown
    assert (
        "| path | package first call s / caption | package s / caption | bound s / caption | fraction of bound "
        "| speed-up at the bound |" in markdown
    )


def test_without_an_original_the_benchmark_is_skipped(tmp_path):
    assert run_all.run_benchmark("original", "smoke", original={"original_repo": None, "original_python": None}) == {
        "skipped": "needs --original_repo and --original_python (see docs/performance.md)"
    }
    assert bench_original.to_markdown({"skipped": "why"}) == "Skipped: why."
    with pytest.raises(SystemExit):
        run_all.parse_args(["--original_repo", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="is not a MiCo checkout"):
        bench_original.run(tmp_path, sys.executable, smoke=True)


def test_caption_tokens_and_array_checks():
    ids = np.array([[101, 7, 8, 102, 0, 0], [101, 9, 0, 5, 6, 6]])
    assert bench_original.caption_tokens(ids) == [[7, 8], [9, 5, 6, 6]]
    same = bench_original.compare_arrays(np.zeros((2, 3)), np.full((2, 3), 1e-6), 1e-5)
    assert same == {"identical": True, "max_abs_diff": 1e-6, "tolerance": 1e-5}
    assert not bench_original.compare_arrays(np.zeros((2, 3)), np.full((2, 3), 1e-4), 1e-5)["identical"]
    shapes = bench_original.compare_arrays(np.zeros((2, 3)), np.zeros((3, 2)), 1e-5)
    assert shapes == {"identical": False, "detail": "shapes differ: original (2, 3), package (3, 2)"}


@pytest.mark.parametrize("width,intermediate", [(1408, 6144), (64, 128), (1024, 4096), (64, 279)])
def test_original_hyper_parameters_build_the_same_towers(width, intermediate):
    """EVA builds int(width * mlp_ratio) MLP units: the written ratio must give back the package's size."""
    mode = dataclasses.replace(
        bench_original.MODES["smoke"],
        vision=dict(hidden_size=width, num_hidden_layers=1, num_attention_heads=4, intermediate_size=intermediate),
    )
    hyper = bench_original.original_hyper_parameters(bench_original.build_config(mode))
    vision = hyper["evaclip_model_cfg"]["vision_cfg"]
    assert int(vision["width"] * vision["mlp_ratio"]) == intermediate
    assert (vision["layers"], vision["width"] // vision["head_width"]) == (1, 4)
    assert hyper["bert_config"]["hidden_size"] == 32 and hyper["bert_config"]["vocab_size"] == 30522
    assert hyper["max_vision_sample_num"] == bench_original.NUM_FRAMES
