"""Tests of the main job (`scripts/main_job.sh`) and of its summary (`examples/summarize_main_job.py`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "main_job.sh"
SUMMARY = REPO_ROOT / "examples" / "summarize_main_job.py"


def run_script(*arguments: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "MICO_SKIP_INSTALL": "1", **env}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        ["bash", str(SCRIPT), *arguments], capture_output=True, text=True, env=environment, check=False
    )


def test_help_prints_the_usage_and_exits_0():
    completed = run_script("--help")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("usage: bash scripts/main_job.sh [OUTPUT_DIR] [--overwrite] [--help]")
    for word in ("retrieval", "zero-shot", "captions", "MICO_MAX_STEPS", "outputs/main_job"):
        assert word in completed.stdout


def test_bad_options_and_non_empty_output_are_refused_before_any_work(tmp_path):
    completed = run_script("--fast")
    assert completed.returncode == 2 and "unknown option --fast" in completed.stderr
    (tmp_path / "notes.txt").write_text("keep me")
    completed = run_script(str(tmp_path))
    assert completed.returncode == 1 and "is not empty; pass --overwrite" in completed.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


def fake_output(out: Path) -> None:
    """The files a main-job run writes that the summary reads, with known numbers."""
    (out / "retrieval").mkdir(parents=True)
    results = {"num_items": 100, "num_texts": 500, "chance/R@1": 1.0}
    for number, direction in enumerate(("t2i", "i2t", "t2va", "va2t")):
        results.update({f"{direction}/R@1": 10.0 + number, f"{direction}/R@5": 40.0, f"{direction}/R@10": 60.0})
    results["itm/t2va/R@1"] = 99.0  # re-ranked results are not rows of the table
    (out / "retrieval" / "retrieval_results.json").write_text(json.dumps(results))
    (out / "retrieval" / "similarity_va.png").write_bytes(b"png")
    (out / "zero_shot").mkdir()
    records = [
        {"item": {"image": "a.png"}, "label": "red", "predicted": "red", "scores": {"red": 0.6, "blue": 0.4}},
        {"item": {"image": "b.png"}, "label": "blue", "predicted": "red", "scores": {"red": 0.7, "blue": 0.3}},
    ]
    (out / "zero_shot" / "image_color.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    clip = str(out / "caption_inputs" / "test_00000_test_00000.mp4")
    (out / "captions.jsonl").write_text(
        json.dumps({"path": clip, "modality": "video+audio", "caption": "a red circle"}) + "\n"
    )
    (out / "caption_references.json").write_text(json.dumps({clip: "a small red circle moving left"}))


def test_summary_prints_every_row_accuracy_captions_and_where_things_are(tmp_path):
    fake_output(tmp_path)
    completed = subprocess.run(
        [sys.executable, str(SUMMARY), str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert "| text → image | 10.0 | 40.0 | 60.0 | 1.0 | 5.0 | 10.0x |" in lines
    assert "| image → text | 11.0 | 40.0 | 60.0 | 1.0 | 5.0 | 11.0x |" in lines
    assert "| text → video+audio (fused head) | 12.0 | 40.0 | 60.0 | 1.0 | 5.0 | 12.0x |" in lines
    assert "| video+audio → text | 13.0 | 40.0 | 60.0 | 1.0 | 5.0 | 13.0x |" in lines
    assert not any("99.0" in line for line in lines)
    assert "| image | color | 2 | 50.0 | 50.0 |" in lines
    assert "- video+audio test_00000_test_00000.mp4: 'a red circle'  [a small red circle moving left]" in lines
    assert f"Written under {tmp_path}/:" in lines
    assert "- similarity heat-maps (similarity_va.png): retrieval/" in lines
    assert "- trained model and processor: model/" in lines


@pytest.mark.slow
def test_main_job_end_to_end_on_a_tiny_run(tmp_path):
    """The whole job with 2 training steps on 30 samples: every stage runs and the summary has every row."""
    out = tmp_path / "job"
    completed = run_script(str(out), MICO_MAX_STEPS="2", MICO_NUM_SAMPLES="30")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((out / "retrieval" / "retrieval_results.json").read_text())
    directions = ("t2i", "i2t", "t2v", "v2t", "t2a", "a2t", "t2d", "d2t", "t2n", "n2t", "t2va", "va2t")
    assert all(f"{direction}/R@1" in results for direction in directions) and results["num_items"] == 6
    for direction in directions:
        assert f"| {direction_row(direction)} |" in completed.stdout
    assert sorted(path.name for path in (out / "zero_shot").iterdir()) == [
        "audio_timbre.jsonl",
        "depth_size.jsonl",
        "image_color.jsonl",
        "normal_shape.jsonl",
        "video_motion.jsonl",
    ]
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert sorted(record["modality"] for record in captions) == [
        *["image"] * 2,
        *["video+audio"] * 3,  # the synthetic videos have their sound track, and are captioned with it
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["caption_tasks"] == ["tva", "ti"] and config["task_loss_weights"]["contrastive_td"] == 2
    assert (out / "model" / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert "Written under" in completed.stdout


def direction_row(direction: str) -> str:
    """The first cell of a summary row, as `summarize_main_job.direction_name` writes it."""
    sys.path.insert(0, str(SUMMARY.parent))
    try:
        from summarize_main_job import direction_name
    finally:
        sys.path.remove(str(SUMMARY.parent))
    return direction_name(direction)


def test_captioning_routes_a_video_with_its_sound_track_to_the_video_audio_context(tmp_path):
    """`caption_files(sound_tracks=True)`: a synthetic clip (with its sound track) is captioned from its frames and its
    sound, as `generate(videos, audio)` captions it; a silent video from its frames alone."""
    import numpy as np
    import torch

    from modeling_mico import MiCoConfig, MiCoForConditionalGeneration, MiCoProcessor
    from modeling_mico.captioning import caption_files
    from modeling_mico.synthetic_data import make_synthetic_dataset, write_mp4

    make_synthetic_dataset(tmp_path / "data", num_samples=2, modalities=["video"])
    clip = next((tmp_path / "data" / "video").iterdir())
    silent = tmp_path / "silent.mp4"
    write_mp4(silent, np.zeros((8, 64, 64, 3), dtype=np.uint8), fps=8)
    torch.manual_seed(0)
    config = MiCoConfig.from_preset("tiny")
    model = MiCoForConditionalGeneration(config).eval()
    processor = MiCoProcessor.from_config(config)
    options = {"num_beams": 1, "max_new_tokens": 4, "do_sample": False}
    records = caption_files(model, processor, [clip, silent], progress=False, sound_tracks=True, **options)
    assert [record["modality"] for record in records] == ["video+audio", "video"]
    inputs = processor(videos=[str(clip)], audio=[str(clip)], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(
            pixel_values_videos=inputs["pixel_values_videos"], input_features=inputs["input_features"], **options
        )
    assert records[0]["caption"] == processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
    without = caption_files(model, processor, [clip], progress=False, **options)
    assert without[0]["modality"] == "video"
