"""Tests of the synthetic omni-modal data generator and its command-line wrapper."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import decord
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from modeling_mico.feature_extraction_mico import read_sound_track
from modeling_mico.synthetic_data import (
    ATTRIBUTES,
    COLORS,
    GLIDE_RATIO,
    MODALITIES,
    PITCHES,
    SAMPLE_RATE,
    SIZES,
    VISUAL_ATTRIBUTES,
    make_synthetic_dataset,
    split_combinations,
)


REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = REPO_ROOT / "examples" / "make_synthetic_dataset.py"
NUM_SAMPLES = 20


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A 20-sample dataset with every modality, shared by the read-only tests."""
    output_dir = tmp_path_factory.mktemp("synthetic") / "data"
    make_synthetic_dataset(output_dir, num_samples=NUM_SAMPLES, seed=0)
    return output_dir


def read_rows(output_dir: Path) -> dict[str, list[dict]]:
    return {split: [json.loads(line) for line in open(output_dir / f"{split}.jsonl")] for split in ("train", "test")}


def all_rows(output_dir: Path) -> list[dict]:
    rows = read_rows(output_dir)
    return rows["train"] + rows["test"]


def object_pixels(image: np.ndarray) -> np.ndarray:
    """Mask of saturated pixels: the object, since the background is nearly grey."""
    image = image.astype(np.int64)
    return image.max(axis=-1) - image.min(axis=-1) > 60


def nearest_color(rgb: np.ndarray) -> str:
    return min(COLORS, key=lambda name: np.linalg.norm(rgb - np.asarray(COLORS[name])))


def dominant_frequency(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / SAMPLE_RATE)[spectrum.argmax()])


def test_rows_have_fields_and_existing_relative_paths(dataset):
    rows = read_rows(dataset)
    assert len(rows["train"]) == 16 and len(rows["test"]) == 4
    for row in rows["train"] + rows["test"]:
        assert set(row) == {"id", "caption", "captions", "attributes", *MODALITIES}
        assert set(row["attributes"]) == set(ATTRIBUTES)
        assert row["caption"] in row["captions"]
        for caption in row["captions"]:
            assert all(value in caption for value in row["attributes"].values())
        for modality in MODALITIES:
            assert not Path(row[modality]).is_absolute()
            assert (dataset / row[modality]).is_file()
    info = json.loads((dataset / "dataset_info.json").read_text())
    assert info["num_train"] == 16 and info["num_test"] == 4


def test_generation_is_deterministic_for_a_seed(dataset, tmp_path):
    make_synthetic_dataset(tmp_path / "same", num_samples=NUM_SAMPLES, seed=0)
    make_synthetic_dataset(tmp_path / "other", num_samples=NUM_SAMPLES, seed=1)
    files = sorted(path.relative_to(dataset) for path in dataset.rglob("*") if path.is_file())
    assert files == sorted(
        path.relative_to(tmp_path / "same") for path in (tmp_path / "same").rglob("*") if path.is_file()
    )
    for file in files:
        assert (dataset / file).read_bytes() == (tmp_path / "same" / file).read_bytes(), file
    assert (dataset / "train.jsonl").read_bytes() != (tmp_path / "other" / "train.jsonl").read_bytes()


def test_splits_are_disjoint_with_distinct_test_combinations(dataset):
    rows = read_rows(dataset)
    key = lambda row: tuple(row["attributes"][name] for name in ATTRIBUTES)  # noqa: E731
    train, test = {key(row) for row in rows["train"]}, [key(row) for row in rows["test"]]
    assert len(set(test)) == len(test) and not train & set(test)
    assert len({combo[: len(VISUAL_ATTRIBUTES)] for combo in test}) == len(test)
    assert not {row["id"] for row in rows["train"]} & {row["id"] for row in rows["test"]}


def test_split_combinations_beyond_the_combination_space():
    train, test = split_combinations(3000, 300, np.random.default_rng(0))
    assert len(train) == 3000 and len(set(test)) == 300
    assert not set(train) & set(test)


def moved_towards(motion: str, dx: float, dy: float, margin: float) -> bool:
    """Whether the displacement (dx, dy) in image coordinates goes `margin` pixels towards `motion`."""
    return {"left": dx < -margin, "right": dx > margin, "up": dy < -margin, "down": dy > margin}[motion]


def test_image_colour_size_and_direction_match_the_caption(dataset):
    for row in all_rows(dataset):
        image = np.asarray(Image.open(dataset / row["image"]).convert("RGB"))
        assert image.shape == (64, 64, 3)
        mask = object_pixels(image)
        assert nearest_color(image[mask].mean(axis=0)) == row["attributes"]["color"]
        rows_, cols = np.nonzero(mask)
        extent = max(np.ptp(rows_), np.ptp(cols)) + 1  # 1.7 to 2 radii (+1), whatever the shape
        sizes = sorted(SIZES, key=SIZES.get)
        assert sizes[int(np.searchsorted([20.7, 28.5], extent))] == row["attributes"]["size"], extent
        # the still is the clip's last frame: the object sits towards the edge it moves to
        assert moved_towards(row["attributes"]["motion"], cols.mean() - 31.5, rows_.mean() - 31.5, margin=8)


def test_video_decodes_with_colour_and_motion_of_the_caption(dataset):
    for row in all_rows(dataset):
        reader = decord.VideoReader(str(dataset / row["video"]))
        assert len(reader) == 8
        frames = reader.get_batch(list(range(len(reader)))).asnumpy()
        assert frames.shape == (8, 64, 64, 3)
        centres = []
        for frame in frames:
            mask = object_pixels(frame)
            assert nearest_color(frame[mask].mean(axis=0)) == row["attributes"]["color"]
            rows_, cols = np.nonzero(mask)
            centres.append((cols.mean(), rows_.mean()))
        dx, dy = np.subtract(centres[-1], centres[0])
        assert moved_towards(row["attributes"]["motion"], dx, dy, margin=5), (row["caption"], dx, dy)
        # from the centre towards the edge: even the positions' mean, without their order, gives the direction
        assert moved_towards(row["attributes"]["motion"], *np.subtract(np.mean(centres, axis=0), 31.5), margin=3)


def test_video_sound_track_is_the_audio_clip_exactly(dataset):
    for row in all_rows(dataset):
        track, rate = read_sound_track(str(dataset / row["video"]), row["video"], "audio")
        clip, clip_rate = sf.read(dataset / row["audio"], dtype="float32")
        assert rate == clip_rate == SAMPLE_RATE
        np.testing.assert_array_equal(track, clip)


def heard_timbre(audio: np.ndarray, pitch: float) -> str:
    """The timbre of a clip from its first 0.1 s (before a glide moves the partials): a chord has partials between
    the root and its octave, a buzz many harmonics above the octave, a tone neither."""
    start = int(0.02 * SAMPLE_RATE)
    window = audio[start : start + SAMPLE_RATE // 10]
    power = np.abs(np.fft.rfft(window * np.hanning(len(window)))) ** 2
    frequencies = np.fft.rfftfreq(len(window), 1 / SAMPLE_RATE) / pitch

    def share(low: float, high: float) -> float:
        return power[(frequencies > low) & (frequencies < high)].sum() / power.sum()

    return "chord" if share(1.15, 1.85) > 0.3 else "buzz" if share(2.5, 8.5) > 0.08 else "tone"


def test_audio_pitch_pattern_and_timbre_match_the_caption(dataset):
    for row in all_rows(dataset):
        audio, sample_rate = sf.read(dataset / row["audio"])
        assert sample_rate == SAMPLE_RATE and audio.shape == (SAMPLE_RATE,)
        pitch, pattern = PITCHES[row["attributes"]["pitch"]], row["attributes"]["pattern"]
        low, high = {"rising": (pitch, pitch * GLIDE_RATIO), "falling": (pitch / GLIDE_RATIO, pitch)}.get(
            pattern, (pitch, pitch)
        )
        assert 0.97 * low <= dominant_frequency(audio) <= 1.03 * high, row["caption"]
        half = SAMPLE_RATE // 2
        first, second = dominant_frequency(audio[:half]), dominant_frequency(audio[half:])
        assert {"rising": second > first * 1.1, "falling": second < first / 1.1}.get(pattern, True), row["caption"]
        window_rms = np.sqrt((audio[: SAMPLE_RATE // 160 * 160].reshape(-1, 160) ** 2).mean(axis=1))
        quiet = (window_rms < 0.1 * window_rms.max()).mean()
        assert (quiet > 0.3) == (pattern == "beeping"), (row["caption"], quiet)
        assert heard_timbre(audio, pitch) == row["attributes"]["timbre"], row["caption"]


def test_depth_is_16_bit_and_nearer_for_larger_objects(dataset):
    for row in all_rows(dataset):
        depth = np.asarray(Image.open(dataset / row["depth"]))
        assert depth.dtype == np.uint16 and depth.shape == (64, 64)
        assert depth.min() == {"small": 2700, "medium": 1900, "large": 1200}[row["attributes"]["size"]]


def test_normal_map_is_8_bit_rgb_facing_the_camera(dataset):
    for row in all_rows(dataset):
        normal = Image.open(dataset / row["normal"])
        assert normal.mode == "RGB" and normal.size == (64, 64)
        pixels = np.asarray(normal)
        assert tuple(pixels[0, 0]) == (128, 128, 255)  # flat background
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # the object's relief


def test_modality_subset_and_image_size(tmp_path):
    make_synthetic_dataset(tmp_path, num_samples=3, modalities=["audio", "depth"], image_size=32)
    row = read_rows(tmp_path)["train"][0]
    assert "audio" in row and "depth" in row and "video" not in row and "image" not in row
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == ["audio", "depth"]
    assert np.asarray(Image.open(tmp_path / row["depth"])).shape == (32, 32)


def test_refuses_non_empty_output_dir_unless_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        make_synthetic_dataset(tmp_path, num_samples=4)
    make_synthetic_dataset(tmp_path, num_samples=4, overwrite=True)
    (tmp_path / "video" / "mine.mp4").write_bytes(b"user data")
    result = make_synthetic_dataset(tmp_path, num_samples=3, modalities=["image"], overwrite=True)
    assert result["num_train"] + result["num_test"] == 3
    # only the generator's own files were replaced: the user's files survive, no stale generated file does
    assert (tmp_path / "video" / "mine.mp4").read_bytes() == b"user data" and (tmp_path / "notes.txt").exists()
    assert sorted(path.name for path in (tmp_path / "video").iterdir()) == ["mine.mp4"]
    assert not (tmp_path / "audio").exists() and len(list((tmp_path / "image").iterdir())) == 3
    assert not [path for path in tmp_path.parent.iterdir() if ".partial-" in path.name]


def test_overwrite_refuses_to_replace_a_file_it_did_not_create(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"id": "my own annotations"}\n')
    with pytest.raises(FileExistsError, match="holds 'train.jsonl', which this generator did not create"):
        make_synthetic_dataset(tmp_path, num_samples=3, modalities=["image"], overwrite=True)
    assert (tmp_path / "train.jsonl").read_text() == '{"id": "my own annotations"}\n'
    assert sorted(path.name for path in tmp_path.iterdir()) == ["train.jsonl"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_samples": 1}, "num_samples"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"num_test": 4}, "num_test"),
        ({"modalities": ["image", "smell"]}, "smell"),
        ({"modalities": []}, "modalities"),
        ({"image_size": 63}, "image_size"),
        ({"num_video_frames": 1}, "num_video_frames"),
    ],
)
def test_argument_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic_dataset(tmp_path / "data", **{"num_samples": 4, **kwargs})
    assert not (tmp_path / "data").exists()


def test_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(CLI), "--output_dir", str(tmp_path / "data"), "--num_samples", "5"]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "Wrote 4 train + 1 test samples" in completed.stdout
    assert len(read_rows(tmp_path / "data")["train"]) == 4


def test_cli_reports_a_non_empty_output_dir(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    monkeypatch.setattr(
        sys, "argv", ["make_synthetic_dataset.py", "--output_dir", str(tmp_path), "--num_samples", "4"]
    )
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        runpy.run_path(str(CLI), run_name="__main__")
    assert "not empty" in capsys.readouterr().err


def test_optional_backends_are_imported_on_first_use(tmp_path):
    """With av, soundfile and matplotlib unavailable, the generator and the metrics import; images are written and a
    video or a heat-map fails naming the missing package."""
    code = f"""
import sys
for name in ("av", "soundfile", "matplotlib"):
    sys.modules[name] = None
import modeling_mico.retrieval as retrieval
from modeling_mico.synthetic_data import make_synthetic_dataset

make_synthetic_dataset({str(tmp_path / "images")!r}, num_samples=2, modalities=("image",))
for call in (
    lambda: make_synthetic_dataset({str(tmp_path / "videos")!r}, num_samples=2, modalities=("video",)),
    lambda: make_synthetic_dataset({str(tmp_path / "audio")!r}, num_samples=2, modalities=("audio",)),
    lambda: retrieval.plot_similarity_heatmap([[1.0]], {str(tmp_path / "sim.png")!r}),
):
    try:
        call()
    except ImportError as error:
        print(error)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert [line.split(" needs ")[0] for line in lines] == [
        "Writing the synthetic videos",
        "Writing the synthetic audio",
        "plot_similarity_heatmap",
    ]
    assert "`pip install av`" in lines[0] and "`pip install soundfile`" in lines[1] and "matplotlib" in lines[2]
