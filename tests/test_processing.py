"""Tests of MiCo's processing: real media, parity with the original code, reference DSP, errors, saving."""

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from modeling_mico.feature_extraction_mico import MiCoFeatureExtractor, kaldi_fbank, resample
from modeling_mico.image_processing_mico import CLIP_MEAN, CLIP_STD, MiCoImageProcessor
from modeling_mico.processing_mico import MiCoProcessor, register_processing_auto_classes
from modeling_mico.video_processing_mico import MiCoVideoProcessor, sample_segments, split_segments


ROOT = Path(__file__).resolve().parent
MEDIA = ROOT / "fixtures" / "media"
PARITY = ROOT / "fixtures" / "parity"
JPEG, FLAC, MP4 = MEDIA / "test.jpeg", MEDIA / "test.flac", MEDIA / "test.mp4"
AUDIO_CLIPS = {
    "test_flac": FLAC,
    "stereo_44k1": PARITY / "media" / "stereo_44k1.wav",
    "short_1p2s": PARITY / "media" / "short_1p2s_16k.wav",
    "exact_448": PARITY / "media" / "exact_448frames_16k.wav",
}


@pytest.fixture(scope="module")
def processor() -> MiCoProcessor:
    return MiCoProcessor()


@pytest.fixture(scope="module")
def reference() -> dict:
    with np.load(PARITY / "reference_outputs.npz") as data:
        return {key: data[key] for key in data.files if key.startswith("prep_")}


@pytest.fixture()
def depth_png(tmp_path: Path) -> Path:
    """A 16-bit depth PNG with a horizontal ramp."""
    depth = np.tile(np.linspace(500, 40000, 64, dtype=np.uint16), (48, 1))
    path = tmp_path / "depth.png"
    Image.fromarray(depth).save(path)
    assert Image.open(path).mode.startswith("I")
    return path


@pytest.fixture()
def normal_png(tmp_path: Path) -> Path:
    """An RGB normal map encoding unit normals as (n + 1) / 2 * 255."""
    rng = np.random.default_rng(0)
    normals = rng.normal(size=(40, 56, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    path = tmp_path / "normals.png"
    Image.fromarray(((normals + 1) / 2 * 255).round().astype(np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- parity with the original code


def test_image_parity(processor, reference):
    out = processor(images=str(JPEG))["pixel_values"]
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), reference["prep_image_test_jpeg"], atol=1e-4, rtol=0)


def test_video_parity(reference):
    out = MiCoVideoProcessor(num_frames=4)(str(MP4), return_frame_indices=True)
    assert out["frame_indices"].tolist() == [reference["prep_video_test_mp4_f4_indices"].tolist()]
    np.testing.assert_allclose(out["pixel_values_videos"][0].numpy(), reference["prep_video_test_mp4_f4"], atol=1e-4)


@pytest.mark.parametrize(
    "key",
    [
        "prep_audio_test_flac_mel64_n1",
        "prep_audio_test_flac_mel64_n3",
        "prep_audio_test_flac_mel128_n1",
        "prep_audio_test_flac_mel128_n3",
        "prep_audio_stereo_44k1_mel64_n1",
        "prep_audio_short_1p2s_mel128_n1",
        "prep_audio_exact_448_mel64_n2",
    ],
)
def test_audio_parity(reference, key):
    clip, mel, slices = key[len("prep_audio_") :].rsplit("_", 2)
    extractor = MiCoFeatureExtractor(num_mel_bins=int(mel[3:]), num_slices=int(slices[1:]))
    out = extractor(str(AUDIO_CLIPS[clip]))["input_features"][0]
    assert out.shape == reference[key].shape
    np.testing.assert_allclose(out.numpy(), reference[key], atol=1e-3, rtol=0)


# ---------------------------------------------------------------- real media through the processor


def test_all_modalities_shapes_and_ranges(processor, depth_png, normal_png):
    out = processor(
        text=["a dog runs on the beach"],
        images=str(JPEG),
        videos=str(MP4),
        audio=str(FLAC),
        depth=str(depth_png),
        normals=str(normal_png),
    )
    assert out["input_ids"].shape == (1, 40) and out["attention_mask"].shape == (1, 40)
    assert "token_type_ids" not in out
    assert out["pixel_values"].shape == (1, 3, 224, 224)
    assert out["pixel_values_videos"].shape == (1, 4, 3, 224, 224)
    assert out["input_features"].shape == (1, 3, 224, 224)
    assert out["depth_values"].shape == (1, 1, 3, 224, 224)
    assert out["normal_values"].shape == (1, 1, 3, 224, 224)
    low = (0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    high = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    for key in ("pixel_values", "pixel_values_videos", "depth_values", "normal_values"):
        values = out[key].reshape(-1, 3, 224 * 224)
        assert torch.isfinite(values).all()
        assert (values.amin(dim=(0, 2)) >= low - 1e-5).all() and (values.amax(dim=(0, 2)) <= high + 1e-5).all()
    assert torch.isfinite(out["input_features"]).all()


def test_depth_min_max_and_constant(processor, depth_png, tmp_path):
    depth = processor(depth=str(depth_png))["depth_values"][0, 0]
    unit = depth * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    torch.testing.assert_close(unit[0], unit[1])
    torch.testing.assert_close(unit[0], unit[2])
    unit = unit[0]
    assert abs(float(unit.min())) < 1e-3 and abs(float(unit.max()) - 1) < 1e-3
    np.save(tmp_path / "flat.npy", np.full((10, 12), 7.5, dtype=np.float32))
    flat = processor(depth=str(tmp_path / "flat.npy"))["depth_values"]
    expected = ((0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).view(3, 1, 1).expand(3, 224, 224)
    torch.testing.assert_close(flat[0, 0], expected)
    eight_bit = Image.fromarray(np.tile(np.arange(0, 250, 10, dtype=np.uint8), (5, 1)))
    assert processor(depth=[eight_bit, np.arange(12.0).reshape(3, 4)])["depth_values"].shape == (2, 1, 3, 224, 224)


def test_normals_follow_image_pipeline(processor, normal_png):
    normals = processor(normals=str(normal_png))["normal_values"][:, 0]
    torch.testing.assert_close(normals, processor(images=str(normal_png))["pixel_values"])


def test_grey_and_cmyk_images_become_rgb(processor):
    rgb = Image.open(JPEG).convert("RGB").resize((64, 48))
    for mode in ("L", "CMYK"):
        out = processor(images=rgb.convert(mode))["pixel_values"]
        torch.testing.assert_close(out, processor(images=rgb.convert(mode).convert("RGB"))["pixel_values"])
    torch.testing.assert_close(
        processor(images=np.asarray(rgb))["pixel_values"], processor(images=rgb)["pixel_values"]
    )


def test_in_memory_video_inputs_and_frame_folder(tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, size=(10, 32, 40, 3), dtype=np.uint8)
    video = MiCoVideoProcessor(num_frames=4)
    from_array = video(frames, return_frame_indices=True)
    assert from_array["frame_indices"].tolist() == [[1, 4, 6, 8]]
    from_pil = video([Image.fromarray(f) for f in frames])["pixel_values_videos"]
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"img_{i:04d}.png")
    from_folder = video(str(tmp_path))["pixel_values_videos"]
    torch.testing.assert_close(from_array["pixel_values_videos"], from_pil)
    torch.testing.assert_close(from_array["pixel_values_videos"], from_folder)
    batch = video([frames, frames[:2]], return_frame_indices=True)
    assert batch["pixel_values_videos"].shape == (2, 4, 3, 224, 224)
    assert batch["frame_indices"].tolist() == [[1, 4, 6, 8], [0, 1, 1, 1]]


def test_audio_array_input_matches_file(processor):
    data, rate = soundfile.read(FLAC, dtype="float32")
    from_file = processor(audio=str(FLAC))["input_features"]
    torch.testing.assert_close(processor(audio=data, sampling_rate=rate)["input_features"], from_file)
    torch.testing.assert_close(processor(audio={"array": data, "sampling_rate": rate})["input_features"], from_file)
    batch = processor(audio=[str(FLAC), {"array": data[:20000], "sampling_rate": rate}])["input_features"]
    assert batch.shape == (2, 3, 224, 224)


def test_stereo_uses_channel_zero():
    rng = np.random.default_rng(2)
    stereo = rng.uniform(-0.5, 0.5, size=(2, 16000)).astype(np.float32)
    extractor = MiCoFeatureExtractor(num_slices=1)
    torch.testing.assert_close(
        extractor(stereo, sampling_rate=16000)["input_features"],
        extractor(stereo[0], sampling_rate=16000)["input_features"],
    )


# ---------------------------------------------------------------- sampling


def test_evaluation_is_deterministic(processor):
    first = processor(videos=str(MP4), audio=str(FLAC))
    second = processor(videos=str(MP4), audio=str(FLAC))
    assert torch.equal(first["pixel_values_videos"], second["pixel_values_videos"])
    assert torch.equal(first["input_features"], second["input_features"])


def test_training_randomness_follows_seed():
    frames = np.arange(200, dtype=np.uint8)[:, None, None, None].repeat(8, 1).repeat(8, 2).repeat(3, 3)
    video = MiCoVideoProcessor(num_frames=4, training=True)

    def indices(seed):
        return video(frames, seed=seed, return_frame_indices=True)["frame_indices"].tolist()

    assert indices(0) == indices(0)
    assert indices(0) != indices(1)
    waveform = np.random.default_rng(3).uniform(-0.3, 0.3, 16000 * 20).astype(np.float32)
    audio = MiCoFeatureExtractor(num_slices=2, training=True)
    same = [audio(waveform, sampling_rate=16000, seed=5)["input_features"] for _ in range(2)]
    assert torch.equal(same[0], same[1])
    draws = {audio(waveform, sampling_rate=16000, seed=s)["input_features"].sum().item() for s in range(6)}
    assert len(draws) > 1


def test_processor_seed_setting_is_used(tmp_path):
    processor = MiCoProcessor(training=True, seed=11)
    one = processor(videos=str(MP4), num_frames=2)["pixel_values_videos"]
    two = processor(videos=str(MP4), num_frames=2)["pixel_values_videos"]
    assert torch.equal(one, two)


@pytest.mark.parametrize("length", [1, 3, 4, 7, 10, 360, 1001])
@pytest.mark.parametrize("num", [1, 3, 4, 8])
def test_segment_arithmetic(length, num):
    items = list(range(length))
    padded = items + [items[-1]] * max(0, num - length)
    k, m = divmod(len(padded), num)
    expected = [padded[i * k + min(i, m) : (i + 1) * k + min(i + 1, m)] for i in range(num)]
    segments = split_segments(items, num)
    assert segments == expected and sum(segments, []) == padded
    assert sample_segments(items, num) == [s[(len(s) + 1) // 2 - 1] for s in segments]
    generator = torch.Generator().manual_seed(0)
    picked = sample_segments(items, num, training=True, generator=generator)
    assert all(p in s for p, s in zip(picked, segments))


def test_segment_examples():
    assert sample_segments(range(360), 4) == [44, 134, 224, 314]
    assert sample_segments([0, 1], 4) == [0, 1, 1, 1]
    assert split_segments(list(range(5)), 2) == [[0, 1, 2], [3, 4]]


@pytest.mark.parametrize(("frames", "pad", "total"), [(1070, 50, 5), (448, 224, 3), (118, 106, 1), (224, 224, 2)])
def test_audio_padding_formula(frames, pad, total):
    samples = 400 + 160 * (frames - 1)
    waveform = np.random.default_rng(4).uniform(-0.2, 0.2, samples).astype(np.float32)
    extractor = MiCoFeatureExtractor(num_slices=total)
    out = extractor(waveform, sampling_rate=16000)["input_features"][0]
    flat = out.reshape(-1, 224)
    assert flat.shape[0] == frames + pad == 224 * total
    assert (flat[frames:] == 0).all() and (flat[:frames].abs().sum(dim=1) > 0).all()


# ---------------------------------------------------------------- reference DSP


def reference_kaldi_fbank(waveform: np.ndarray, num_mel_bins: int) -> np.ndarray:
    """Kaldi's fbank recipe written out frame by frame (float64)."""
    frame_length, shift, fft_length = 400, 160, 512
    window = np.array(
        [(0.5 - 0.5 * math.cos(2 * math.pi * n / (frame_length - 1))) ** 0.85 for n in range(frame_length)]
    )

    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    low, high = mel(20.0), mel(8000.0)
    delta = (high - low) / (num_mel_bins + 1)
    banks = np.zeros((num_mel_bins, fft_length // 2 + 1))
    for b in range(num_mel_bins):
        left, center, right = low + b * delta, low + (b + 1) * delta, low + (b + 2) * delta
        for k in range(fft_length // 2):
            m = mel(k * 16000 / fft_length)
            if left < m < right:
                banks[b, k] = (m - left) / (center - left) if m <= center else (right - m) / (right - center)
    num_frames = 1 + (len(waveform) - frame_length) // shift
    out = np.zeros((num_frames, num_mel_bins))
    for i in range(num_frames):
        frame = waveform[i * shift : i * shift + frame_length].astype(np.float64)
        frame = frame - frame.mean()
        frame = np.concatenate([[frame[0] - 0.97 * frame[0]], frame[1:] - 0.97 * frame[:-1]])
        padded = np.zeros(fft_length)
        padded[:frame_length] = frame * window
        power = np.abs(np.fft.rfft(padded)) ** 2
        out[i] = np.log(np.maximum(banks @ power, np.finfo(np.float32).eps))
    return out


@pytest.mark.parametrize("num_mel_bins", [64, 128])
def test_filterbank_matches_reference_recipe(num_mel_bins):
    waveform = np.random.default_rng(5).normal(0, 3000, 400 + 160 * 99).astype(np.float32)
    ours = kaldi_fbank(torch.from_numpy(waveform), num_mel_bins).numpy()
    expected = reference_kaldi_fbank(waveform, num_mel_bins)
    assert ours.shape == expected.shape == (100, num_mel_bins)
    # float32 against float64: log-mel values lie in ~10..25, so 5e-4 here is < 4e-5 after normalisation
    np.testing.assert_allclose(ours, expected, atol=5e-4, rtol=0)


def reference_resample(x: np.ndarray, orig: int, new: int, width: int = 6, rolloff: float = 0.99) -> np.ndarray:
    """Direct Hann-windowed sinc interpolation: y[n] = sum_i x[i] * beta * sinc(beta * d) * hann(d), float64."""
    beta = min(orig, new) * rolloff / orig
    out = np.zeros(math.ceil(len(x) * new / orig))
    for n in range(len(out)):
        position = n * orig / new
        lo, hi = max(0, math.floor(position - width / beta) - 1), min(len(x), math.ceil(position + width / beta) + 2)
        t = np.clip(beta * (np.arange(lo, hi) - position), -width, width)
        kernel = beta * np.sinc(t) * np.cos(np.pi * t / (2 * width)) ** 2
        out[n] = np.dot(x[lo:hi], kernel)
    return out


@pytest.mark.parametrize(("orig", "new"), [(44100, 16000), (8000, 16000), (22050, 16000), (48000, 16000)])
def test_resampler_matches_direct_windowed_sinc(orig, new):
    x = np.random.default_rng(6).uniform(-1, 1, orig // 10).astype(np.float32)
    ours = resample(torch.from_numpy(x), orig, new).numpy()
    expected = reference_resample(x.astype(np.float64), orig, new)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- errors


@pytest.fixture()
def bad_files(tmp_path: Path) -> dict:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"this is not media" * 50)
    files = {"garbage": garbage}
    for name, source, keep in (("cut.jpeg", JPEG, 0.3), ("cut.mp4", MP4, 0.02), ("cut.flac", FLAC, 0.5)):
        data = source.read_bytes()
        (tmp_path / name).write_bytes(data[: int(len(data) * keep)])
        files[name] = tmp_path / name
    (tmp_path / "empty_folder").mkdir()
    files["empty_folder"] = tmp_path / "empty_folder"
    return files


def test_missing_files_raise(processor, tmp_path):
    missing = str(tmp_path / "nope")
    for kwargs, what in (
        ({"images": missing + ".jpg"}, "images"),
        ({"videos": missing + ".mp4"}, "videos"),
        ({"audio": missing + ".wav"}, "audio"),
        ({"depth": missing + ".png"}, "depth"),
        ({"normals": missing + ".png"}, "normals"),
    ):
        with pytest.raises(FileNotFoundError, match=rf"{what}\[0\] file not found: .*nope"):
            processor(**kwargs)


def test_undecodable_and_truncated_files_raise(processor, bad_files):
    with pytest.raises(ValueError, match=r"cannot decode images\[0\] file .*garbage"):
        processor(images=str(bad_files["garbage"]))
    with pytest.raises(ValueError, match=r"cannot decode images\[0\] file .*cut.jpeg"):
        processor(images=str(bad_files["cut.jpeg"]))
    with pytest.raises(ValueError, match=r"cannot decode videos\[0\] file .*garbage"):
        processor(videos=str(bad_files["garbage"]))
    with pytest.raises(ValueError, match=r"cannot decode .*videos\[0\] file .*cut.mp4"):
        processor(videos=str(bad_files["cut.mp4"]))
    with pytest.raises(ValueError, match=r"cannot decode audio\[0\] file .*garbage"):
        processor(audio=str(bad_files["garbage"]))
    with pytest.raises(ValueError, match=r"cannot decode audio\[0\] file .*cut.flac"):
        processor(audio=str(bad_files["cut.flac"]))


def test_batch_error_names_the_bad_item(processor, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"images\[1\] file not found: .*missing.jpg"):
        processor(images=[str(JPEG), str(tmp_path / "missing.jpg")])
    with pytest.raises(ValueError, match=r"audio\[1\] contains NaN"):
        processor(audio=[str(FLAC), {"array": np.full(8000, np.nan), "sampling_rate": 16000}])


def test_bad_audio_arrays_raise(processor):
    with pytest.raises(ValueError, match=r"audio\[0\] is empty"):
        processor(audio=np.zeros(0, dtype=np.float32), sampling_rate=16000)
    with pytest.raises(ValueError, match=r"audio\[0\] contains NaN or infinite"):
        processor(audio=np.array([0.1, np.inf] * 1000), sampling_rate=16000)
    with pytest.raises(ValueError, match=r"audio\[0\] is an array: pass its sampling_rate"):
        processor(audio=np.zeros(16000))
    with pytest.raises(
        ValueError, match=r"audio\[0\] array must have shape \(samples,\), \(channels, samples\) or \("
    ):
        processor(audio=np.zeros((1, 2, 16000)), sampling_rate=16000)
    with pytest.raises(ValueError, match=r"audio\[0\] is too short"):
        processor(audio=np.ones(100), sampling_rate=16000)


def test_bad_video_inputs_raise(processor, bad_files):
    with pytest.raises(ValueError, match=r"videos\[0\] has zero frames"):
        processor(videos=np.zeros((0, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"videos\[0\] frame folder .*empty_folder.* contains no frame files"):
        processor(videos=str(bad_files["empty_folder"]))
    with pytest.raises(ValueError, match=r"videos\[0\] array must have shape \(T, H, W, 3\), got \(8, 8, 3\)"):
        processor(videos=np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"videos\[0\] array must have shape \(T, H, W, 3\), got \(2, 8, 8, 4\)"):
        processor(videos=np.zeros((2, 8, 8, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"videos\[0\] is a float array and must lie in \[0, 1\]"):
        processor(videos=np.full((2, 8, 8, 3), 255.0))


def test_bad_image_arrays_raise(processor):
    with pytest.raises(ValueError, match=r"images\[0\] must have shape \(H, W\), \(H, W, 3\) or \(H, W, 4\)"):
        processor(images=np.zeros((8, 8, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"images\[0\] is a float array and must lie in \[0, 1\]"):
        processor(images=np.full((8, 8, 3), 3.0))
    with pytest.raises(ValueError, match=r"depth\[0\] must be a non-empty 2-D map"):
        processor(depth=np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match=r"depth\[0\] contains NaN"):
        processor(depth=np.array([[0.0, np.nan]]))


def test_mismatched_media_batch_sizes_raise(processor):
    with pytest.raises(
        ValueError, match=r"all media inputs must have the same batch size, got \{'images': 2, 'audio': 1\}"
    ):
        processor(text=["a", "b"], images=[str(JPEG), str(JPEG)], audio=str(FLAC))
    with pytest.raises(ValueError, match="give at least one of"):
        processor()


def test_text_batch_may_differ_from_media_batch(processor):
    """Zero-shot classification: several candidate labels against one clip (as CLIPProcessor allows)."""
    labels = ["a dog barking", "rain falling", "a car engine"]
    out = processor(text=labels, audio=[str(FLAC)], images=str(JPEG))
    assert out["input_ids"].shape == (3, 40) and out["input_features"].shape[0] == 1
    assert out["pixel_values"].shape[0] == 1
    torch.testing.assert_close(out["input_ids"], processor(text=labels)["input_ids"], rtol=0, atol=0)


def test_unknown_settings_raise(processor):
    with pytest.raises(ValueError, match="depth_scaling must be one of"):
        MiCoImageProcessor(depth_scaling="log")
    with pytest.raises(ValueError, match="num_frames must be a positive integer, got 0"):
        MiCoVideoProcessor()(str(MP4), num_frames=0)
    with pytest.raises(TypeError, match=r"MiCoFeatureExtractor got unexpected arguments \['num_slice'\]"):
        MiCoFeatureExtractor()(np.zeros(16000), sampling_rate=16000, num_slice=2)
    with pytest.raises(TypeError, match=r"unexpected arguments \['num_frame'\]"):
        processor(videos=str(MP4), num_frame=2)


# ---------------------------------------------------------------- text, settings, saving


def test_text_tokenization_and_decoding(processor):
    out = processor(text=["A Dog on the BEACH.", "word " * 100])
    assert out["input_ids"].shape == (2, 40)
    assert out["input_ids"][0, 0].item() == processor.tokenizer.cls_token_id
    assert out["attention_mask"][1].sum().item() == 40
    assert processor.batch_decode(out["input_ids"])[0] == "a dog on the beach."
    assert processor.decode(out["input_ids"][0]) == "a dog on the beach."
    assert processor(text="hi", max_length=8)["input_ids"].shape == (1, 8)


def test_per_call_settings(processor):
    out = processor(
        videos=str(MP4),
        audio=str(FLAC),
        num_frames=2,
        num_mel_bins=128,
        num_slices=2,
        target_length=100,
        image_size=112,
    )
    assert out["pixel_values_videos"].shape == (1, 2, 3, 112, 112)
    assert out["input_features"].shape == (1, 2, 100, 224)
    # the saved settings are untouched: unset, so each modality's default (4 frames, 3 slices) applies
    assert processor.num_frames is None and processor.feature_extractor.num_slices is None


def test_save_and_load_round_trip(tmp_path):
    original = MiCoProcessor(
        image_processor=MiCoImageProcessor(image_size=196, depth_scaling="none"),
        feature_extractor=MiCoFeatureExtractor(num_mel_bins=128, num_slices=2, target_length=100, training=True),
        num_frames=6,
        training=True,
        seed=3,
        max_length=20,
    )
    original.save_pretrained(tmp_path)
    loaded = MiCoProcessor.from_pretrained(tmp_path)
    assert (loaded.num_frames, loaded.training, loaded.seed, loaded.max_length) == (6, True, 3, 20)
    assert loaded.image_processor.to_dict() == original.image_processor.to_dict()
    assert loaded.feature_extractor.to_dict() == original.feature_extractor.to_dict()
    assert loaded(text="x")["input_ids"].shape == (1, 20)
    restored = pickle.loads(pickle.dumps(loaded))
    torch.testing.assert_close(restored(images=str(JPEG))["pixel_values"], loaded(images=str(JPEG))["pixel_values"])


def test_auto_processor_after_registration(tmp_path, processor):
    from transformers import AutoProcessor
    from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    from modeling_mico.configuration_mico import MiCoConfig

    register_processing_auto_classes()
    processor.save_pretrained(tmp_path)
    config = (tmp_path / "processor_config.json").read_text()
    assert '"auto_map"' in config and "processing_mico.MiCoProcessor" in config
    assert (tmp_path / "processing_mico.py").exists()
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "MiCoProcessor"
    torch.testing.assert_close(loaded(images=str(JPEG))["pixel_values"], processor(images=str(JPEG))["pixel_values"])
    assert FEATURE_EXTRACTOR_MAPPING[MiCoConfig] is MiCoFeatureExtractor
    assert MiCoImageProcessor in IMAGE_PROCESSOR_MAPPING[MiCoConfig].values()


def test_from_default_matches_plain_constructor():
    default = MiCoProcessor.from_default(num_frames=8)
    assert default.num_frames == 8 and default.feature_extractor.num_mel_bins == 64


# ---------------------------------------------------------------- the modality registry: declared modalities


THERMAL_CONFIG_KWARGS = dict(
    knowledge_modalities={"vision": 8, "audio": 4, "depth": 4, "thermal": 1}, contrastive_tasks=["tv", "ta", "th"]
)


@pytest.fixture(scope="module")
def thermal_config():
    from modeling_mico.configuration_mico import MiCoConfig

    return MiCoConfig(**THERMAL_CONFIG_KWARGS)


@pytest.fixture(scope="module")
def small_inputs() -> dict:
    rng = np.random.default_rng(7)
    image = Image.open(JPEG).convert("RGB").resize((40, 30))
    return {
        "images": [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)],
        "depth": np.tile(np.linspace(0.5, 9.0, 24, dtype=np.float32), (18, 1)),
        "frames": rng.integers(0, 256, size=(9, 20, 24, 3), dtype=np.uint8),
        "waveform": rng.uniform(-0.3, 0.3, 16000 * 6).astype(np.float32),
    }


@pytest.fixture(scope="module")
def declared_outputs(thermal_config, small_inputs) -> dict:
    """Every declared-modality output and its built-in counterpart, computed once for the tests below."""
    images, depth, frames, waveform = (small_inputs[k] for k in ("images", "depth", "frames", "waveform"))
    thermal = MiCoProcessor.from_config(thermal_config)
    declared = MiCoProcessor(
        modalities={
            "lidar": {"layout": "depth"},
            "clip": {"layout": "video", "num_frames": 2},
            "sonar": {"layout": "spectrogram", "num_frames": 2},
        }
    )
    plain = MiCoProcessor()
    return {
        "thermal_processor": thermal,
        "declared_processor": declared,
        "thermal": thermal(thermal=images)["thermal_values"],
        "images": plain(images=images)["pixel_values"],
        "lidar": declared(lidar=depth)["lidar_values"],
        "depth": plain(depth=depth)["depth_values"],
        "clip": declared(clip=frames)["clip_values"],
        "clip_4": declared(clip=frames, num_frames=4)["clip_values"],
        "videos_2": plain(videos=frames, num_frames=2)["pixel_values_videos"],
        "videos_4": plain(videos=frames)["pixel_values_videos"],
        "sonar": declared(sonar={"array": waveform, "sampling_rate": 16000})["sonar_values"],
        "audio_2": plain(audio=waveform, sampling_rate=16000, num_slices=2)["input_features"],
    }


def test_declared_image_like_modality_follows_image_transform(declared_outputs):
    thermal = declared_outputs["thermal"]
    assert thermal.shape == (2, 1, 3, 224, 224)
    torch.testing.assert_close(thermal[:, 0], declared_outputs["images"], rtol=0, atol=0)


def test_declared_depth_layout_behaves_like_depth(declared_outputs):
    assert declared_outputs["lidar"].shape == (1, 1, 3, 224, 224)
    torch.testing.assert_close(declared_outputs["lidar"], declared_outputs["depth"], rtol=0, atol=0)


def test_declared_video_and_spectrogram_take_their_frame_count_from_the_spec(declared_outputs):
    assert declared_outputs["clip"].shape == (1, 2, 3, 224, 224)
    torch.testing.assert_close(declared_outputs["clip"], declared_outputs["videos_2"], rtol=0, atol=0)
    torch.testing.assert_close(declared_outputs["clip_4"], declared_outputs["videos_4"], rtol=0, atol=0)
    assert declared_outputs["sonar"].shape == (1, 2, 224, 224)
    torch.testing.assert_close(declared_outputs["sonar"], declared_outputs["audio_2"], rtol=0, atol=0)


def test_model_input_names_come_from_the_registry(declared_outputs, thermal_config):
    names = declared_outputs["thermal_processor"].model_input_names
    assert names == [
        "input_ids",
        "attention_mask",
        "pixel_values",
        "pixel_values_videos",
        "input_features",
        "depth_values",
        "normal_values",
        "thermal_values",
    ]
    assert {spec.input_name for spec in thermal_config.modality_specs.values()} <= set(names)
    assert MiCoProcessor().model_input_names == names[:-1]
    assert {"lidar_values", "clip_values", "sonar_values"} <= set(
        declared_outputs["declared_processor"].model_input_names
    )


def test_from_config_settings(thermal_config):
    from modeling_mico.configuration_mico import MiCoConfig

    config = MiCoConfig.from_preset("tiny", max_caption_length=24)
    processor = MiCoProcessor.from_config(config, num_frames=6, num_slices=2, training=True, seed=4)
    assert processor.image_processor.image_size == 64
    assert (processor.feature_extractor.target_length, processor.feature_extractor.feature_size) == (64, 64)
    assert (processor.num_frames, processor.feature_extractor.num_slices) == (6, 2)
    assert (processor.training, processor.seed, processor.max_length) == (True, 4, 24)
    assert processor.modalities == {}  # every modality of the tiny preset is built in
    default = MiCoProcessor.from_config(config)
    assert default.num_frames is None and default.feature_extractor.num_slices is None
    default.check_matches(config)
    thermal = MiCoProcessor.from_config(thermal_config)
    assert thermal.modalities["thermal"]["input_name"] == "thermal_values"
    assert thermal.modalities["thermal"]["layout"] == "image"


def test_save_load_keeps_declared_modalities(tmp_path, declared_outputs, small_inputs):
    original = declared_outputs["thermal_processor"]
    original.save_pretrained(tmp_path)
    loaded = MiCoProcessor.from_pretrained(tmp_path)
    assert loaded.modalities == original.modalities and "thermal" in loaded.modalities
    assert loaded.modality_specs == original.modality_specs
    torch.testing.assert_close(loaded(thermal=small_inputs["images"])["thermal_values"], declared_outputs["thermal"])


def test_check_matches_refuses_a_processor_that_would_feed_the_model_wrongly(thermal_config, declared_outputs):
    from modeling_mico.configuration_mico import MiCoConfig

    declared_outputs["thermal_processor"].check_matches(thermal_config)
    with pytest.raises(
        ValueError, match=r"the model takes the modality 'thermal' \(thermal_values\) but the processor"
    ):
        MiCoProcessor().check_matches(thermal_config)
    with pytest.raises(ValueError, match=r"the model takes 64x64 inputs but the processor has .*image_size': 224"):
        MiCoProcessor().check_matches(MiCoConfig.from_preset("tiny"))
    as_depth = MiCoProcessor(modalities={"thermal": {"layout": "depth"}})
    with pytest.raises(ValueError, match=r"modality 'thermal' differs .*'layout': \('depth', 'image'\)"):
        as_depth.check_matches(thermal_config)


def test_declared_modality_errors(declared_outputs, small_inputs):
    thermal = declared_outputs["thermal_processor"]
    image = small_inputs["images"][0]
    with pytest.raises(TypeError, match=r"unexpected arguments \['thermol'\]; it takes text and the modalities"):
        thermal(thermol=image)
    with pytest.raises(TypeError, match=r"unexpected arguments \['thermal'\]"):
        MiCoProcessor()(thermal=image)
    with pytest.raises(ValueError, match=r"same batch size, got \{'images': 1, 'thermal': 2\}"):
        thermal(images=image, thermal=[image, image])
    with pytest.raises(ValueError, match=r"give at least one of text, images, videos, audio, depth, normals, thermal"):
        thermal()
    with pytest.raises(FileNotFoundError, match=r"thermal\[1\] file not found: .*nope.png"):
        thermal(thermal=[image, "nope.png"])
    with pytest.raises(ValueError, match=r"modalities\['x'\].layout must be one of"):
        MiCoProcessor(modalities={"x": {"layout": "cube"}})
    with pytest.raises(ValueError, match=r"processor arguments \['seed'\] are settings of MiCoProcessor"):
        MiCoProcessor(modalities={"seed": {}})
    with pytest.raises(ValueError, match=r"modalities must map modality names to dicts"):
        MiCoProcessor(modalities={"x": "image"})


def test_builtin_override_and_clash(small_inputs):
    frames = small_inputs["frames"]
    two = MiCoProcessor(modalities={"video": {"num_frames": 2}})
    assert two(videos=frames)["pixel_values_videos"].shape[1] == 2
    # a declared modality taking a built-in's argument replaces that built-in
    replaced = MiCoProcessor(modalities={"nmap": {"processor_argument": "normals", "layout": "depth"}})
    assert "normal" not in replaced.modality_specs
    assert replaced(normals=small_inputs["depth"])["nmap_values"].shape == (1, 1, 3, 224, 224)


BACKEND_SCRIPT = """
import sys
sys.modules["soundfile"] = None  # as if not installed: the import below must not need it
import numpy as np
from modeling_mico.processing_mico import MiCoProcessor
assert "decord" not in sys.modules, "importing the processor imported decord"
sys.modules["decord"] = None

processor = MiCoProcessor()
assert processor(images=sys.argv[1])["pixel_values"].shape == (1, 3, 224, 224)
assert processor(videos=np.zeros((3, 8, 8, 3), dtype=np.uint8))["pixel_values_videos"].shape == (1, 4, 3, 224, 224)
assert processor(audio=np.zeros(16000, dtype=np.float32), sampling_rate=16000)["input_features"].shape[1] == 3
for argument, path in (("videos", sys.argv[2]), ("audio", sys.argv[3])):
    try:
        processor(**{argument: path})
    except ImportError as err:
        print(argument, "|", err)
    else:
        raise SystemExit(f"{argument}: no ImportError")
"""


def test_missing_backends_fail_at_use_naming_the_package():
    """Importing the processor needs neither decord nor soundfile; decoding a file needs its back-end."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT.parent)}
    result = subprocess.run(
        [sys.executable, "-c", BACKEND_SCRIPT, str(JPEG), str(MP4), str(FLAC)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" | ", 1) for line in result.stdout.strip().splitlines())
    assert "decoding video files needs the `decord` package" in lines["videos"]
    assert "pip install decord" in lines["videos"] and "mico-transformers" in lines["videos"]
    assert "decoding audio files needs the `soundfile` package" in lines["audio"]
    assert "pip install soundfile" in lines["audio"]


def test_processing_docstring_example_runs():
    import doctest

    import modeling_mico.processing_mico

    result = doctest.testmod(modeling_mico.processing_mico, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0
