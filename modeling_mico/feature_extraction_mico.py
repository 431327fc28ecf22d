"""Audio feature extraction for MiCo: Kaldi log-mel filterbanks cut into 224-frame spectrogram slices.

Reproduces the original `AudioProcessor` without torchaudio: soundfile decoding, channel 0 only (no
downmix, as `torchaudio.compliance.kaldi.fbank` selects it), resampling to 16 kHz with torchaudio's
default Hann-windowed sinc kernel, scaling by 2**15, a vectorised Kaldi filterbank (25 ms / 10 ms,
povey window, pre-emphasis 0.97, DC removal, power spectrum, log), bilinear resize of the mel axis to
224 bins, normalisation ``(fbank - 15.41663) / (2 * 6.55582)``, zero padding and segment sampling of
`target_length`-frame slices (see `video_processing_mico.sample_segments`).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Unpack

import numpy as np
import torch
import torch.nn.functional as F
from transformers.audio_utils import mel_filter_bank, window_function
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature

from .configuration_mico import BUILTIN_MODALITIES
from .image_processing_mico import (
    check_file,
    check_finite,
    check_positive,
    check_settings,
    first_set,
    map_batch,
    media_bytes,
)
from .import_utils import require
from .video_processing_mico import MiCoSamplingSettings, sample_segments, sampling


SAMPLING_RATE = 16000
FRAME_LENGTH = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms at 16 kHz
FFT_LENGTH = 512  # frame length rounded up to a power of two
PREEMPHASIS = 0.97
LOW_FREQUENCY = 20.0
LOG_FLOOR = float(torch.finfo(torch.float32).eps)
DEFAULT_NUM_SLICES = BUILTIN_MODALITIES["audio"].num_frames  # 3
# Files whose sound is read with PyAV (a video's sound track, or AAC / ALAC audio that libsndfile does not read)
SOUND_TRACK_EXTENSIONS = (*BUILTIN_MODALITIES["video"].extensions, ".m4a", ".aac")

AudioLike = str | os.PathLike | np.ndarray | torch.Tensor | dict


@lru_cache(maxsize=16)
def sinc_resample_kernel(
    orig_freq: int, new_freq: int, lowpass_filter_width: int = 6, rolloff: float = 0.99
) -> tuple[torch.Tensor, int]:
    """Hann-windowed sinc kernel of torchaudio's default `Resample` -> (kernel (new, 1, taps) float32, width).

    `orig_freq` and `new_freq` must already be divided by their gcd. Computed in float64, cast to float32.
    """
    base_freq = min(orig_freq, new_freq) * rolloff
    width = math.ceil(lowpass_filter_width * orig_freq / base_freq)
    idx = torch.arange(-width, width + orig_freq, dtype=torch.float64)[None, None] / orig_freq
    t = torch.arange(0, -new_freq, -1, dtype=torch.float64)[:, None, None] / new_freq + idx
    t = (t * base_freq).clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return (kernel * window * (base_freq / orig_freq)).float(), width


def resample(waveform: torch.Tensor, orig_freq: int, new_freq: int = SAMPLING_RATE) -> torch.Tensor:
    """Resample a (..., L) float32 waveform as `torchaudio.transforms.Resample(orig_freq, new_freq)` does."""
    if orig_freq == new_freq:
        return waveform
    gcd = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // gcd, int(new_freq) // gcd
    kernel, width = sinc_resample_kernel(orig, new)
    shape = waveform.shape
    flat = F.pad(waveform.reshape(-1, shape[-1]), (width, width + orig))
    out = F.conv1d(flat[:, None], kernel, stride=orig).transpose(1, 2).reshape(flat.shape[0], -1)
    target_length = math.ceil(new * shape[-1] / orig)
    return out[..., :target_length].reshape(*shape[:-1], -1)


@lru_cache(maxsize=8)
def kaldi_mel_filters(num_mel_bins: int) -> torch.Tensor:
    """Kaldi mel filters (triangles in mel space, 20 Hz .. Nyquist) -> (FFT_LENGTH // 2 + 1, num_mel_bins) float32.

    With many bins (e.g. 128) the lowest filters fall between FFT bins and are all zero, in Kaldi and torchaudio
    alike; transformers' warning about it is silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
        filters = mel_filter_bank(
            num_frequency_bins=FFT_LENGTH // 2 + 1,
            num_mel_filters=num_mel_bins,
            min_frequency=LOW_FREQUENCY,
            max_frequency=SAMPLING_RATE / 2,
            sampling_rate=SAMPLING_RATE,
            norm=None,
            mel_scale="kaldi",
            triangularize_in_mel_space=True,
        )
    return torch.from_numpy(filters).float()


@lru_cache(maxsize=1)
def povey_window() -> torch.Tensor:
    """Kaldi's povey window (symmetric Hann to the power 0.85) of FRAME_LENGTH samples, float32."""
    return torch.from_numpy(window_function(FRAME_LENGTH, "povey", periodic=False)).float()


def kaldi_fbank(waveform: torch.Tensor, num_mel_bins: int) -> torch.Tensor:
    """Log-mel filterbank of a 1-D 16 kHz waveform, as `torchaudio.compliance.kaldi.fbank` with dither 0.

    Frames (snip_edges) -> DC removal -> pre-emphasis -> povey window -> |rfft(512)|^2 -> mel -> log.
    Returns (num_frames, num_mel_bins) float32; all frames in one batched FFT.
    """
    frames = waveform.unfold(0, FRAME_LENGTH, FRAME_SHIFT)
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = (frames - PREEMPHASIS * previous) * povey_window()
    power = torch.fft.rfft(frames, n=FFT_LENGTH).abs().pow(2)
    return (power @ kaldi_mel_filters(num_mel_bins)).clamp_min(LOG_FLOOR).log()


def scale_samples(samples: np.ndarray, what: str) -> np.ndarray:
    """PCM samples -> float32 in [-1, 1] as soundfile reads them: float kept, int8/16/32 divided by 2**(bits - 1)
    (int16 / 32768), uint8 centred ((x - 128) / 128); other dtypes (int64, bool, ...) are refused."""
    dtype = samples.dtype
    if np.issubdtype(dtype, np.floating):
        return samples.astype(np.float32, copy=False)
    if dtype in (np.int8, np.int16, np.int32):
        return (samples / float(2 ** (8 * dtype.itemsize - 1))).astype(np.float32)
    if dtype == np.uint8:
        return ((samples - 128.0) / 128.0).astype(np.float32)
    raise ValueError(f"{what} has samples of dtype {dtype}: give float samples in [-1, 1] or int16 / int32 PCM")


def first_channel(samples: np.ndarray, what: str) -> np.ndarray:
    """Channel 0 of a clip: (samples,), channel-first (channels, samples) or soundfile's (samples, channels); the
    shorter axis is the channel axis (a clip always has more samples than channels)."""
    if samples.ndim == 1:
        return samples
    if samples.ndim != 2 or samples.shape[0] == samples.shape[1]:
        raise ValueError(
            f"{what} array must have shape (samples,), (channels, samples) or (samples, channels), "
            f"got {tuple(samples.shape)}"
        )
    return samples[0] if samples.shape[0] < samples.shape[1] else samples[:, 0]


def is_audio_decoder(value: Any) -> bool:
    """True for a torchcodec `AudioDecoder` (duck-typed: torchcodec is not a dependency)."""
    return hasattr(value, "get_all_samples")


def is_single_clip(audio: Any) -> bool:
    """True for one clip (path, array, dict, torchcodec decoder), False for a batch (a list of clips)."""
    return isinstance(audio, (str, os.PathLike, Mapping, np.ndarray, torch.Tensor)) or is_audio_decoder(audio)


def read_sound_track(source: str | io.BytesIO, path: str | None, what: str) -> tuple[np.ndarray, int]:
    """Channel 0 of the first audio stream of a video (or any container FFmpeg reads) with PyAV -> (float32 samples,
    rate); a file without an audio stream is refused by name."""
    av = require("av", "decoding the sound track of video files")
    try:
        with av.open(source) as container:
            if not container.streams.audio:
                raise ValueError(f"{what} file {path!r} has no sound track (no audio stream)")
            stream = container.streams.audio[0]
            chunks = []
            for frame in container.decode(stream):
                samples = frame.to_ndarray()  # planar: (channels, n); packed: (1, n * channels) interleaved
                channels = len(frame.layout.channels)
                chunks.append(samples[0] if frame.format.is_planar else samples.reshape(-1, channels)[:, 0])
            rate = stream.rate
    except av.FFmpegError as err:
        raise ValueError(f"cannot decode {what} file {path!r}: {err}") from err
    if not chunks:
        raise ValueError(f"{what} file {path!r} has an empty sound track")
    return scale_samples(np.concatenate(chunks), what), int(rate)


def has_sound_track(path: str | os.PathLike) -> bool:
    """Whether a video (or any container FFmpeg reads) has an audio stream (PyAV); an unreadable file is an error."""
    av = require("av", "looking for the sound track of video files")
    try:
        with av.open(os.fspath(path)) as container:
            return bool(container.streams.audio)
    except av.FFmpegError as err:
        raise ValueError(f"cannot open {os.fspath(path)!r} to look for a sound track: {err}") from err


def read_audio_file(source: str | io.BytesIO, path: str | None, what: str) -> tuple[np.ndarray, int]:
    """Channel 0 of an audio file (soundfile) or of a video file's sound track (PyAV, for video extensions and for
    what libsndfile does not read, such as `.m4a`) -> (float32 samples, rate)."""
    extension = os.path.splitext(path or "")[1].lower()
    if extension in SOUND_TRACK_EXTENSIONS:
        return read_sound_track(source, path, what)
    soundfile = require("soundfile", "decoding audio files")
    try:
        data, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise ValueError(f"cannot decode {what} file {path!r}: {err}") from err
    return np.ascontiguousarray(data[:, 0]), int(rate)


def load_waveform(audio: AudioLike, sampling_rate: int | None, what: str) -> tuple[torch.Tensor, int]:
    """Any supported audio input -> (channel-0 float32 waveform (L,) in [-1, 1], its sampling rate).

    Files are read with soundfile (channel 0), video files' sound tracks with PyAV; arrays are (samples,),
    (channels, samples) or (samples, channels), float or int PCM (scaled as soundfile does), and need a sampling
    rate. 🤗 Datasets values are accepted too: `{"array", "sampling_rate"}` and `{"path", "bytes"}` dicts and
    torchcodec `AudioDecoder`s (channel 0 of `get_all_samples()`, not the downmix of their `["array"]`).
    """
    if isinstance(audio, Mapping) and "array" in audio:
        if "sampling_rate" not in audio:
            raise ValueError(f"{what} dict must have 'array' and 'sampling_rate' keys, got {sorted(audio)}")
        audio, sampling_rate = audio["array"], check_positive(f"{what}['sampling_rate']", audio["sampling_rate"])
    if is_audio_decoder(audio):
        samples = audio.get_all_samples()
        audio, sampling_rate = samples.data, samples.sample_rate
    if isinstance(audio, Mapping):
        source, path = media_bytes(audio, what)
        if isinstance(source, str):
            source = check_file(source, what)
        data, sampling_rate = read_audio_file(source, path, what)
    elif isinstance(audio, (str, os.PathLike)):
        path = check_file(audio, what)
        data, sampling_rate = read_audio_file(path, path, what)
    elif isinstance(audio, (np.ndarray, torch.Tensor)):
        if sampling_rate is None:
            raise ValueError(f"{what} is an array: pass its sampling_rate")
        samples = audio.numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
        data = first_channel(scale_samples(samples, what), what)
    else:
        raise ValueError(
            f"{what} must be a path, an array, a dict or a torchcodec AudioDecoder, got {type(audio).__name__}"
        )
    waveform = torch.from_numpy(np.ascontiguousarray(data))
    if waveform.numel() == 0:
        raise ValueError(f"{what} is empty (0 samples)")
    check_finite(waveform, what)
    return waveform, check_positive("sampling_rate", sampling_rate)


def spectrogram_slices(
    fbank: torch.Tensor, num_slices: int, target_length: int, training: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """(L, bins) normalised fbank -> (num_slices, target_length, bins) slices chosen by segment sampling.

    Pads max(T * n - L, T - L % T) zero frames (a whole extra slice when L is a multiple of T), as the original.
    """
    length = fbank.shape[0]
    pad = max(target_length * num_slices - length, target_length - length % target_length)
    fbank = F.pad(fbank, (0, 0, 0, pad))
    total = fbank.shape[0] // target_length
    chosen = sample_segments(range(total), num_slices, training, generator)
    return fbank[: total * target_length].reshape(total, target_length, -1)[chosen]


class MiCoAudioSettings(MiCoSamplingSettings, total=False):
    r"""
    Per-call settings of [`MiCoFeatureExtractor`] (and of [`MiCoProcessor`]); each overrides the saved one for the
    call, and `training` / `seed` / `generator` drive the slice sampling ([`MiCoSamplingSettings`]).

    sampling_rate (`int`):
        Rate of array clips (required for them); files and 🤗 Datasets values carry theirs.
    num_mel_bins (`int`):
        Kaldi mel bins before the resize to `feature_size`.
    num_slices (`int`):
        Slices sampled per clip (one per segment).
    target_length (`int`):
        Frames (10 ms each) per slice.
    """

    sampling_rate: int
    num_mel_bins: int
    num_slices: int
    target_length: int


class MiCoFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Audio feature extractor of MiCo: each clip becomes `num_slices` normalised log-mel spectrogram slices of
    `target_length` frames x `feature_size` (224) mel bins -> `input_features` (B, num_slices, target_length, 224).

    Clips: audio files (soundfile), video files (their first sound track, PyAV), arrays (float samples, or int16 /
    int32 PCM scaled as soundfile reads it; `(samples,)`, `(channels, samples)` or `(samples, channels)`, the shorter
    axis being the channels) with `sampling_rate`, and 🤗 Datasets values (`{"array", "sampling_rate"}` and
    `{"path", "bytes"}` dicts, torchcodec `AudioDecoder`s). Multi-channel audio: only channel 0 is used (no downmix),
    exactly as the original (`torchaudio.compliance.kaldi.fbank` reads the first channel). Clips are resampled to
    16 kHz with torchaudio's default windowed-sinc resampler.

    Args:
        num_mel_bins (`int`, *optional*, defaults to 64): Kaldi mel bins before the resize to `feature_size`.
        num_slices (`int`, *optional*): slices sampled per clip (one per segment); `None` (the default) takes the
            modality's `num_frames` in [`MiCoProcessor`] (3 for `audio`), and 3 when called directly.
        target_length (`int`, *optional*, defaults to 224): frames (10 ms each) per slice.
        feature_size (`int`, *optional*, defaults to 224): mel bins after the bilinear resize.
        mean (`float`, *optional*, defaults to 15.41663): normalisation mean.
        std (`float`, *optional*, defaults to 6.55582): normalisation std (the original divides by `2 * std`).
        training (`bool`, *optional*, defaults to `False`): random slice within each segment instead of the middle.
        sampling_rate (`int`, *optional*, defaults to 16000): rate the filterbank runs at.
    """

    model_input_names = ["input_features"]

    def __init__(
        self,
        num_mel_bins: int = 64,
        num_slices: int | None = None,
        target_length: int = 224,
        feature_size: int = 224,
        mean: float = 15.41663,
        std: float = 6.55582,
        training: bool = False,
        sampling_rate: int = SAMPLING_RATE,
        padding_value: float = 0.0,
        **kwargs,
    ):
        super().__init__(feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value, **kwargs)
        if sampling_rate != SAMPLING_RATE:
            raise ValueError(f"MiCo's filterbank runs at {SAMPLING_RATE} Hz, got sampling_rate={sampling_rate}")
        self.num_mel_bins = check_positive("num_mel_bins", num_mel_bins)
        self.num_slices = check_positive("num_slices", num_slices)
        self.target_length = check_positive("target_length", target_length)
        check_positive("feature_size", feature_size)
        self.mean = float(mean)
        self.std = float(std)
        self.training = bool(training)

    def extract(
        self, waveform: torch.Tensor, sampling_rate: int, num_mel_bins: int, what: str = "audio"
    ) -> torch.Tensor:
        """(L,) waveform at `sampling_rate` -> normalised (frames, feature_size) filterbank (before slicing)."""
        waveform = resample(waveform, sampling_rate) * 2**15
        if waveform.shape[-1] < FRAME_LENGTH:
            raise ValueError(
                f"{what} is too short: {waveform.shape[-1]} samples at 16 kHz, at least {FRAME_LENGTH} (25 ms) needed"
            )
        fbank = kaldi_fbank(waveform, num_mel_bins)
        if fbank.shape[1] != self.feature_size:
            size = (fbank.shape[0], self.feature_size)
            fbank = F.interpolate(fbank[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        return (fbank - self.mean) / (self.std * 2)

    def __call__(
        self,
        audio: AudioLike | list[AudioLike],
        *,
        return_tensors: str | None = "pt",
        **settings: Unpack[MiCoAudioSettings],
    ) -> BatchFeature:
        """Clips (paths, arrays with `sampling_rate`, dicts, or a list of them) -> `input_features`.

        An array is one clip, (samples,), (channels, samples) or (samples, channels); pass a list for a batch.
        `settings` ([`MiCoAudioSettings`]: `sampling_rate`, `num_mel_bins`, `num_slices`, `target_length`,
        `training`, `seed`, `generator`) override the saved ones for this call, see [`~MiCoFeatureExtractor.slices`].
        """
        return BatchFeature({"input_features": self.slices(audio, **settings)}, tensor_type=return_tensors)

    def slices(
        self, audio: AudioLike | list[AudioLike], *, what: str = "audio", **settings: Unpack[MiCoAudioSettings]
    ) -> torch.Tensor:
        """Clips -> spectrogram slices (B, num_slices, target_length, feature_size); errors name items `what[i]`.

        Slice sampling is deterministic at evaluation; in training it draws from `generator`, else from a
        generator seeded with `seed`, else from torch's global RNG.
        """
        settings = check_settings(settings, MiCoAudioSettings, "MiCoFeatureExtractor")
        training, generator = sampling(settings, self.training)
        sampling_rate = settings.get("sampling_rate")
        num_mel_bins = first_set(settings.get("num_mel_bins"), self.num_mel_bins)
        num_slices = first_set(settings.get("num_slices"), self.num_slices, DEFAULT_NUM_SLICES)
        target_length = first_set(settings.get("target_length"), self.target_length)
        single = is_single_clip(audio)
        clips = [audio] if single else list(audio)
        if not clips:
            raise ValueError(f"{what} must be a clip or a non-empty list of clips")

        def process(clip: AudioLike, name: str) -> torch.Tensor:
            waveform, rate = load_waveform(clip, sampling_rate, name)
            fbank = self.extract(waveform, rate, num_mel_bins, name)
            return spectrogram_slices(fbank, num_slices, target_length, training, generator)

        return torch.stack(map_batch(clips, process, what))


__all__ = ["MiCoAudioSettings", "MiCoFeatureExtractor"]
