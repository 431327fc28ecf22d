"""Audio feature extraction for MiCo: Kaldi log-mel filterbanks cut into 224-frame spectrogram slices.

Reproduces the original `AudioProcessor` without torchaudio: soundfile decoding, channel 0 only (no
downmix, as `torchaudio.compliance.kaldi.fbank` selects it), resampling to 16 kHz with torchaudio's
default Hann-windowed sinc kernel, scaling by 2**15, a vectorised Kaldi filterbank (25 ms / 10 ms,
povey window, pre-emphasis 0.97, DC removal, power spectrum, log), bilinear resize of the mel axis to
224 bins, normalisation ``(fbank - 15.41663) / (2 * 6.55582)``, zero padding and segment sampling of
`target_length`-frame slices (see `video_processing_mico.sample_segments`).
"""

from __future__ import annotations

import math
import os
import warnings
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.audio_utils import mel_filter_bank, window_function
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature

from .configuration_mico import BUILTIN_MODALITIES
from .image_processing_mico import check_file, check_finite, map_batch
from .import_utils import require
from .video_processing_mico import make_generator, sample_segments


SAMPLING_RATE = 16000
FRAME_LENGTH = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms at 16 kHz
FFT_LENGTH = 512  # frame length rounded up to a power of two
PREEMPHASIS = 0.97
LOW_FREQUENCY = 20.0
LOG_FLOOR = float(torch.finfo(torch.float32).eps)
DEFAULT_NUM_SLICES = BUILTIN_MODALITIES["audio"].num_frames  # 3

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


def load_waveform(audio: AudioLike, sampling_rate: int | None, what: str) -> tuple[torch.Tensor, int]:
    """Any supported audio input -> (channel-0 float32 waveform (L,) in [-1, 1], its sampling rate).

    Files are read with soundfile (channel 0 of (L, C)); arrays are (L,) or channel-first (C, L) and need a
    sampling rate; a `{"array", "sampling_rate"}` dict (🤗 Datasets `Audio`) is accepted too.
    """
    if isinstance(audio, dict):
        if "array" not in audio or "sampling_rate" not in audio:
            raise ValueError(f"{what} dict must have 'array' and 'sampling_rate' keys, got {sorted(audio)}")
        audio, sampling_rate = audio["array"], audio["sampling_rate"]
    if isinstance(audio, (str, os.PathLike)):
        path = check_file(audio, what)
        soundfile = require("soundfile", "decoding audio files")
        try:
            data, sampling_rate = soundfile.read(path, dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
            raise ValueError(f"cannot decode {what} file {path!r}: {err}") from err
        waveform = torch.from_numpy(np.ascontiguousarray(data[:, 0]))
    elif isinstance(audio, (np.ndarray, torch.Tensor)):
        if sampling_rate is None:
            raise ValueError(f"{what} is an array: pass its sampling_rate")
        waveform = torch.as_tensor(np.asarray(audio, dtype=np.float32))
        if waveform.ndim not in (1, 2):
            raise ValueError(
                f"{what} array must have shape (samples,) or (channels, samples), got {tuple(waveform.shape)}"
            )
        waveform = waveform[0] if waveform.ndim == 2 else waveform
    else:
        raise ValueError(f"{what} must be a path, an array or a dict, got {type(audio).__name__}")
    if waveform.numel() == 0:
        raise ValueError(f"{what} is empty (0 samples)")
    check_finite(waveform, what)
    return waveform, int(sampling_rate)


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


class MiCoFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Audio feature extractor of MiCo: each clip becomes `num_slices` normalised log-mel spectrogram slices of
    `target_length` frames x `feature_size` (224) mel bins -> `input_features` (B, num_slices, target_length, 224).

    Multi-channel audio: only channel 0 is used (no downmix), exactly as the original
    (`torchaudio.compliance.kaldi.fbank` reads the first channel). Clips are resampled to 16 kHz with
    torchaudio's default windowed-sinc resampler.

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
        self.num_mel_bins = int(num_mel_bins)
        self.num_slices = None if num_slices is None else int(num_slices)
        self.target_length = int(target_length)
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
        sampling_rate: int | None = None,
        return_tensors: str | None = "pt",
        **settings: Any,
    ) -> BatchFeature:
        """Clips (paths, arrays with `sampling_rate`, dicts, or a list of them) -> `input_features`.

        An array is one clip, (samples,) or channel-first (channels, samples); pass a list for a batch. `settings`
        (`num_mel_bins`, `num_slices`, `target_length`, `training`, `seed`, `generator`) override the saved ones
        for this call, see [`~MiCoFeatureExtractor.slices`].
        """
        features = self.slices(audio, sampling_rate=sampling_rate, **settings)
        return BatchFeature({"input_features": features}, tensor_type=return_tensors)

    def slices(
        self,
        audio: AudioLike | list[AudioLike],
        *,
        sampling_rate: int | None = None,
        num_mel_bins: int | None = None,
        num_slices: int | None = None,
        target_length: int | None = None,
        training: bool | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        what: str = "audio",
    ) -> torch.Tensor:
        """Clips -> spectrogram slices (B, num_slices, target_length, feature_size); errors name items `what[i]`.

        Slice sampling is deterministic at evaluation; in training it draws from `generator`, else from a
        generator seeded with `seed`, else from torch's global RNG.
        """
        training = self.training if training is None else bool(training)
        generator = generator if generator is not None else make_generator(seed)
        num_mel_bins = num_mel_bins or self.num_mel_bins
        num_slices = num_slices or self.num_slices or DEFAULT_NUM_SLICES
        target_length = target_length or self.target_length
        single = isinstance(audio, (str, os.PathLike, dict, np.ndarray, torch.Tensor))
        clips = [audio] if single else list(audio)
        if not clips:
            raise ValueError(f"{what} must be a clip or a non-empty list of clips")

        def process(clip: AudioLike, name: str) -> torch.Tensor:
            waveform, rate = load_waveform(clip, sampling_rate, name)
            fbank = self.extract(waveform, rate, num_mel_bins, name)
            return spectrogram_slices(fbank, num_slices, target_length, training, generator)

        return torch.stack(map_batch(clips, process, what))


__all__ = ["MiCoFeatureExtractor"]
