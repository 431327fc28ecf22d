"""Inputs a user brings to MiCoProcessor from elsewhere: 🤗 Datasets media values, the sound track of a video file,
16/32-bit and float images, PCM integer audio, soundfile's array layout, and every setting or input that must be
refused by name (issues 12 and 13)."""

from pathlib import Path

import av
import datasets
import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from transformers.testing_utils import CaptureLogger

from modeling_mico import processing_mico
from modeling_mico.feature_extraction_mico import MiCoFeatureExtractor
from modeling_mico.image_processing_mico import MiCoImageProcessor
from modeling_mico.processing_mico import MiCoProcessor
from modeling_mico.video_processing_mico import MiCoVideoProcessor


MEDIA = Path(__file__).resolve().parent / "fixtures" / "media"
JPEG, FLAC, MP4 = MEDIA / "test.jpeg", MEDIA / "test.flac", MEDIA / "test.mp4"
RATE = 22050


@pytest.fixture(scope="module")
def processor() -> MiCoProcessor:
    return MiCoProcessor()


def write_mp4(path: Path, pcm: np.ndarray | None, rate: int = RATE, frames: int = 12) -> Path:
    """A small mp4: an MPEG-4 video stream and, when `pcm` (int16 mono) is given, a lossless ALAC sound track."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        audio = container.add_stream("alac", rate=rate) if pcm is not None else None
        if audio is not None:
            audio.layout = "mono"
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), index * 20, np.uint8), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if audio is not None:
            for start in range(0, len(pcm), 4096):
                chunk = av.AudioFrame.from_ndarray(pcm[None, start : start + 4096], format="s16p", layout="mono")
                chunk.sample_rate, chunk.pts = rate, start
                container.mux(audio.encode(chunk))
            container.mux(audio.encode())
    return path


@pytest.fixture(scope="module")
def tone(tmp_path_factory) -> dict:
    """The same 2 s of sound as an int16 wav and as the ALAC sound track of an mp4, plus an mp4 without sound."""
    folder = tmp_path_factory.mktemp("tone")
    t = np.arange(RATE * 2) / RATE
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767 + 0.1 * np.sin(2 * np.pi * 97 * t) * 32767).astype(np.int16)
    soundfile.write(folder / "tone.wav", pcm, RATE, subtype="PCM_16")
    return {
        "pcm": pcm,
        "wav": folder / "tone.wav",
        "mp4": write_mp4(folder / "tone.mp4", pcm),
        "silent_mp4": write_mp4(folder / "silent.mp4", None),
    }


# ---------------------------------------------------------------- audio from video files


def test_sound_track_of_an_mp4_equals_the_same_sound_in_a_wav(processor, tone):
    from_wav = processor(audio=str(tone["wav"]))["input_features"]
    from_mp4 = processor(audio=str(tone["mp4"]))["input_features"]
    torch.testing.assert_close(from_mp4, from_wav, rtol=0, atol=0)


def test_packed_stereo_sound_track_uses_channel_zero(processor, tmp_path):
    """Interleaved (packed) PCM in a .mov: channel 0, as soundfile gives for the same samples in a wav."""
    pcm = (np.random.default_rng(2).uniform(-0.5, 0.5, (RATE, 2)) * 32767).astype(np.int16)
    soundfile.write(tmp_path / "stereo.wav", pcm, RATE, subtype="PCM_16")
    with av.open(str(tmp_path / "stereo.mov"), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=RATE)
        stream.layout = "stereo"
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = RATE
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    from_wav = processor(audio=str(tmp_path / "stereo.wav"))["input_features"]
    torch.testing.assert_close(
        processor(audio=str(tmp_path / "stereo.mov"))["input_features"], from_wav, rtol=0, atol=0
    )


def test_one_mp4_feeds_both_video_and_audio(processor, tone):
    out = processor(text="a tone", videos=str(tone["mp4"]), audio=str(tone["mp4"]))
    assert out["pixel_values_videos"].shape == (1, 4, 3, 224, 224) and out["input_features"].shape == (1, 3, 224, 224)


def test_video_without_sound_track_is_refused_by_name(processor, tone):
    with pytest.raises(ValueError, match=r"audio\[0\] file '.*silent.mp4' has no sound track \(no audio stream\)"):
        processor(audio=str(tone["silent_mp4"]))


# ---------------------------------------------------------------- 🤗 Datasets values


def test_datasets_image_column_equals_the_file(processor, tmp_path):
    from_path = processor(images=str(JPEG))["pixel_values"]
    decoded = datasets.Dataset.from_dict({"image": [str(JPEG)]}).cast_column("image", datasets.Image())
    assert isinstance(decoded[0]["image"], Image.Image)
    torch.testing.assert_close(processor(images=decoded[0]["image"])["pixel_values"], from_path, rtol=0, atol=0)
    features = datasets.Features({"image": datasets.Image(decode=False)})
    undecoded = datasets.Dataset.from_dict({"image": [{"bytes": JPEG.read_bytes(), "path": None}]}, features=features)
    torch.testing.assert_close(processor(images=undecoded[0]["image"])["pixel_values"], from_path, rtol=0, atol=0)
    undecoded.save_to_disk(tmp_path / "saved")
    reloaded = datasets.load_from_disk(tmp_path / "saved")
    torch.testing.assert_close(processor(images=[reloaded[0]["image"]])["pixel_values"], from_path, rtol=0, atol=0)


@pytest.mark.parametrize("store", ["path", "bytes"])
def test_datasets_audio_and_video_columns_equal_the_files(processor, tone, store):
    """`Audio` / `Video` columns stored undecoded (`{"path", "bytes"}`, what datasets gives without torchcodec)."""
    files = {"audio": FLAC, "video": MP4, "sound": tone["mp4"]}
    values = {
        name: {"path": str(path), "bytes": path.read_bytes() if store == "bytes" else None}
        for name, path in files.items()
    }
    # built as plain columns, then cast: datasets' own encoder of `Audio` values needs torchcodec
    dataset = datasets.Dataset.from_dict({name: [value] for name, value in values.items()})
    for name, feature in (("audio", datasets.Audio), ("video", datasets.Video), ("sound", datasets.Audio)):
        dataset = dataset.cast_column(name, feature(decode=False))
    row = dataset[0]
    from_dataset = processor(videos=[row["video"]] * 2, audio=[row["audio"], row["sound"]])
    from_files = processor(videos=[str(MP4)] * 2, audio=[str(FLAC), str(tone["wav"])])
    for key in ("pixel_values_videos", "input_features"):
        torch.testing.assert_close(from_dataset[key], from_files[key], rtol=0, atol=0)


def test_array_and_sampling_rate_dict(processor, tone):
    data, rate = soundfile.read(tone["wav"], dtype="float32")
    from_file = processor(audio=str(tone["wav"]))["input_features"]
    torch.testing.assert_close(processor(audio={"array": data, "sampling_rate": rate})["input_features"], from_file)
    with pytest.raises(ValueError, match=r"audio\[0\]\['sampling_rate'\] must be a positive integer, got 0"):
        processor(audio={"array": data, "sampling_rate": 0})


class AudioSamples:
    """Stand-in for torchcodec's `AudioSamples` (torchcodec's PyPI wheel needs a CUDA build of torch)."""

    def __init__(self, data: torch.Tensor, sample_rate: int):
        self.data, self.sample_rate = data, sample_rate


class FrameBatch:
    """Stand-in for torchcodec's `FrameBatch`."""

    def __init__(self, data: torch.Tensor):
        self.data = data


class StandInAudioDecoder:
    """The part of `torchcodec.decoders.AudioDecoder`'s API that MiCo uses: `get_all_samples()` -> (channels, n)."""

    def __init__(self, path: Path):
        data, self.rate = soundfile.read(path, dtype="float32", always_2d=True)
        self.data = torch.from_numpy(data.T.copy())

    def get_all_samples(self) -> AudioSamples:
        return AudioSamples(self.data, self.rate)


class StandInVideoDecoder:
    """The part of `torchcodec.decoders.VideoDecoder`'s API that MiCo uses: `len()` and `get_frames_at(indices)`."""

    def __init__(self, frames: np.ndarray, dimension_order: str = "NCHW"):
        self.frames = torch.from_numpy(frames)
        self.dimension_order = dimension_order
        self.requested: list[int] = []

    def __len__(self) -> int:
        return len(self.frames)

    def get_frames_at(self, indices: list[int]) -> FrameBatch:
        self.requested.extend(indices)
        frames = self.frames[indices]
        return FrameBatch(frames.permute(0, 3, 1, 2) if self.dimension_order == "NCHW" else frames)


@pytest.mark.parametrize("order", ["NCHW", "NHWC"])
def test_torchcodec_decoder_values(processor, order):
    frames = np.random.default_rng(0).integers(0, 256, size=(10, 24, 32, 3), dtype=np.uint8)
    decoder = StandInVideoDecoder(frames, order)
    out = processor(videos=decoder, audio=StandInAudioDecoder(FLAC))
    torch.testing.assert_close(
        out["pixel_values_videos"], processor(videos=frames)["pixel_values_videos"], rtol=0, atol=0
    )
    assert decoder.requested == [1, 4, 6, 8]  # only the sampled frames are decoded
    torch.testing.assert_close(out["input_features"], processor(audio=str(FLAC))["input_features"], rtol=0, atol=0)


# ---------------------------------------------------------------- image bit depths and float images


@pytest.fixture(scope="module")
def grey8() -> np.ndarray:
    return np.asarray(Image.open(JPEG).convert("L").resize((48, 40)))


def test_16_bit_images_are_scaled_by_their_depth(processor, grey8, tmp_path):
    expected = processor(images=Image.fromarray(grey8))["pixel_values"]
    wide = grey8.astype(np.uint16) * 257  # v / 255 == v * 257 / 65535
    Image.fromarray(wide).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    torch.testing.assert_close(processor(images=str(tmp_path / "grey16.png"))["pixel_values"], expected)
    rgb16 = np.repeat(wide[..., None], 3, axis=-1)
    torch.testing.assert_close(processor(images=rgb16)["pixel_values"], expected)


def test_32_bit_integer_images_are_divided_by_int32_max(processor, grey8, tmp_path):
    scaled = (grey8.astype(np.float64) / 255 * np.iinfo(np.int32).max).round().astype(np.int32)
    Image.fromarray(scaled).save(tmp_path / "grey32.tif")
    assert Image.open(tmp_path / "grey32.tif").mode == "I"
    expected = processor(images=Image.fromarray(grey8))["pixel_values"]
    torch.testing.assert_close(processor(images=str(tmp_path / "grey32.tif"))["pixel_values"], expected)


def test_float_images_in_unit_range_are_kept_and_others_refused(processor, grey8, tmp_path):
    Image.fromarray((grey8 / 255).astype(np.float32)).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    expected = processor(images=Image.fromarray(grey8))["pixel_values"]
    torch.testing.assert_close(processor(images=str(tmp_path / "float.tif"))["pixel_values"], expected)
    Image.fromarray(grey8.astype(np.float32)).save(tmp_path / "float255.tif")
    with pytest.raises(ValueError, match=r"images\[0\] is a float array and must lie in \[0, 1\], got \[9.0, 247.0\]"):
        processor(images=str(tmp_path / "float255.tif"))


def test_negative_and_unsupported_image_values_are_refused(processor):
    with pytest.raises(
        ValueError, match=r"images\[0\] is a int16 image with negative values; pixel values must be >= 0"
    ):
        processor(images=np.full((8, 8), -5, dtype=np.int16))
    with pytest.raises(
        ValueError, match=r"images\[0\] must be an integer array or a float array in \[0, 1\], got dtype bool"
    ):
        processor(images=np.ones((8, 8), dtype=bool))


# ---------------------------------------------------------------- audio dtypes and layouts


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_32"])
def test_integer_pcm_arrays_are_scaled_like_soundfile(processor, tone, subtype, tmp_path):
    path = tmp_path / f"{subtype}.wav"
    soundfile.write(path, tone["pcm"].astype(np.int32) << (16 if subtype == "PCM_32" else 0), RATE, subtype=subtype)
    samples, rate = soundfile.read(path, dtype="int16" if subtype == "PCM_16" else "int32")
    from_file = processor(audio=str(path))["input_features"]
    torch.testing.assert_close(
        processor(audio=samples, sampling_rate=rate)["input_features"], from_file, rtol=0, atol=0
    )


def test_samples_by_channels_array_uses_channel_zero(processor, tmp_path):
    stereo = np.random.default_rng(1).uniform(-0.5, 0.5, size=(RATE, 2)).astype(np.float32)
    soundfile.write(tmp_path / "stereo.wav", stereo, RATE, subtype="FLOAT")
    data, rate = soundfile.read(tmp_path / "stereo.wav", dtype="float32")  # (samples, channels)
    assert data.shape == (RATE, 2)
    from_file = processor(audio=str(tmp_path / "stereo.wav"))["input_features"]
    torch.testing.assert_close(processor(audio=data, sampling_rate=rate)["input_features"], from_file, rtol=0, atol=0)
    torch.testing.assert_close(
        processor(audio=data.T, sampling_rate=rate)["input_features"], from_file, rtol=0, atol=0
    )


def test_unsupported_audio_dtypes_are_refused(processor):
    with pytest.raises(ValueError, match=r"audio\[0\] has samples of dtype int64: give float samples in \[-1, 1\] or"):
        processor(audio=torch.zeros(16000, dtype=torch.int64), sampling_rate=16000)


# ---------------------------------------------------------------- settings of 0 or less


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda p: p(audio=np.zeros(16000, np.float32), sampling_rate=0),
            "sampling_rate must be a positive integer, got 0",
        ),
        (
            lambda p: p(audio=np.zeros(16000, np.float32), sampling_rate=-8000),
            "sampling_rate must be a positive integer, got -8000",
        ),
        (lambda p: p(videos=str(MP4), num_frames=0), "num_frames must be a positive integer, got 0"),
        (lambda p: p(images=str(JPEG), image_size=0), "image_size must be a positive integer, got 0"),
        (lambda p: p(audio=str(FLAC), num_slices=-1), "num_slices must be a positive integer, got -1"),
        (lambda p: p(audio=str(FLAC), num_mel_bins=0), "num_mel_bins must be a positive integer, got 0"),
        (lambda p: p(audio=str(FLAC), target_length=0), "target_length must be a positive integer, got 0"),
        (lambda p: p(text="a", max_length=0), "max_length must be a positive integer, got 0"),
        (lambda p: p(images=str(JPEG), sampling_rate=0), "sampling_rate must be a positive integer, got 0"),
        (lambda p: MiCoProcessor(num_frames=0), "num_frames must be a positive integer, got 0"),
        (lambda p: MiCoProcessor(max_length=-1), "max_length must be a positive integer, got -1"),
        (lambda p: MiCoImageProcessor(image_size=0), "image_size must be a positive integer, got 0"),
        (lambda p: MiCoVideoProcessor(num_frames=0), "num_frames must be a positive integer, got 0"),
        (lambda p: MiCoFeatureExtractor(num_slices=0), "num_slices must be a positive integer, got 0"),
        (lambda p: MiCoFeatureExtractor(target_length=2.5), "target_length must be a positive integer, got 2.5"),
    ],
)
def test_settings_of_zero_or_less_are_refused_by_name(processor, call, message):
    with pytest.raises(ValueError, match=rf"^{message}$"):
        call(processor)


# ---------------------------------------------------------------- frame folders, text length


def test_frame_folder_is_read_in_numeric_order(tmp_path):
    for index in range(1, 13):  # frame_1 .. frame_12, each a distinct grey level
        Image.fromarray(np.full((8, 8, 3), index * 20, np.uint8)).save(tmp_path / f"frame_{index}.png")
    video = MiCoVideoProcessor(num_frames=12, image_processor=MiCoImageProcessor(image_size=8))
    pixels = video(str(tmp_path))["pixel_values_videos"][0]
    levels = (pixels[:, 0, 0, 0] * MiCoImageProcessor().image_std[0] + MiCoImageProcessor().image_mean[0]) * 255
    assert levels.round().tolist() == [20.0 * index for index in range(1, 13)]


def test_long_text_is_truncated_with_a_warning_or_refused(processor):
    long_text = "word " * 60
    logger = processing_mico.logger
    with CaptureLogger(logger) as captured:
        out = processor(text=["short", long_text])
    assert out["input_ids"].shape == (2, 40)
    assert "truncated to max_length=40 tokens: {'text[1]': 62}" in captured.out
    with CaptureLogger(logger) as captured:
        processor(text="short")
    assert captured.out == ""
    with pytest.raises(ValueError, match=r"\{'text\[1\]': 62\} tokens exceed max_length=40; shorten them"):
        processor(text=["short", long_text], truncation=False)
