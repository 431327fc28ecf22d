"""Video preprocessing for MiCo: segment-based frame sampling, then the image transform per frame.

The original `VideoProcessor` splits the frame indices into `num_frames` consecutive segments
(``k, m = divmod(n, num_frames)``; segment ``i`` is ``[i*k + min(i, m), (i+1)*k + min(i+1, m))``; a
video with fewer frames than requested first repeats its last frame), takes the middle frame of each
segment at evaluation (index ``(len + 1) // 2 - 1`` inside it) and a random one in training, decodes
those frames only (decord ``get_batch``) and applies the image transform. The same segment arithmetic
picks the spectrogram slices of audio clips (`feature_extraction_mico`).

`MiCoVideoProcessor` is a plain, picklable class rather than a transformers `BaseVideoProcessor`,
which requires torchvision in transformers 5; `MiCoProcessor` saves its settings (`num_frames`).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature

from .image_processing_mico import (
    MiCoImageProcessor,
    check_file,
    check_positive,
    load_image,
    map_batch,
    media_bytes,
    scale_to_unit,
    uint8_frames_to_tensor,
    usable_cores,
)
from .import_utils import require


VideoLike = str | os.PathLike | np.ndarray | torch.Tensor | Sequence[Image.Image] | Mapping


def split_segments(items: Sequence[Any], num_segments: int) -> list[list[Any]]:
    """Split `items` into `num_segments` consecutive segments whose lengths differ by at most one.

    Fewer items than segments: the last item is repeated first, so every segment holds one item.
    """
    if num_segments < 1:
        raise ValueError(f"the number of segments must be >= 1, got {num_segments}")
    if len(items) == 0:
        raise ValueError("cannot split an empty sequence into segments")
    items = list(items) + [items[-1]] * max(0, num_segments - len(items))
    k, m = divmod(len(items), num_segments)
    return [items[i * k + min(i, m) : (i + 1) * k + min(i + 1, m)] for i in range(num_segments)]


def sample_segments(
    items: Sequence[Any], num_segments: int, training: bool = False, generator: torch.Generator | None = None
) -> list[Any]:
    """One item per segment: the middle one (evaluation) or a uniformly random one (training, from `generator`)."""
    segments = split_segments(items, num_segments)
    if not training:
        return [segment[(len(segment) + 1) // 2 - 1] for segment in segments]
    return [segment[int(torch.randint(len(segment), (1,), generator=generator))] for segment in segments]


def make_generator(seed: int | None) -> torch.Generator | None:
    """A fresh generator seeded with `seed`, or `None` (torch's global RNG, distinct per DataLoader worker)."""
    return None if seed is None else torch.Generator().manual_seed(int(seed))


def read_video_file(
    source: str | os.PathLike | io.BytesIO,
    num_frames: int,
    training: bool,
    generator: torch.Generator | None,
    what: str,
    path: str | None = None,
    decoder_threads: int = 1,
) -> tuple[torch.Tensor, list[int]]:
    """Decode only the sampled frames of a video file (or its bytes, named `path`) with decord -> ((T, 3, H, W) in
    [0, 1], frame indices), with `decoder_threads` FFmpeg threads (the frames are the same for any number).

    decord is imported here, on first use: without it, frame folders and in-memory videos still work.
    """
    if not isinstance(source, io.BytesIO):
        source = path = check_file(source, what)
    decord = require("decord", "decoding video files")
    try:
        reader = decord.VideoReader(source, num_threads=decoder_threads)
        length = len(reader)
    except (decord.DECORDError, RuntimeError) as err:
        raise ValueError(f"cannot decode {what} file {path!r}: {err}") from err
    if length == 0:
        raise ValueError(f"{what} file {path!r} has no frames")
    indices = sample_segments(range(length), num_frames, training, generator)
    try:
        frames = reader.get_batch(indices).asnumpy()
    except (decord.DECORDError, RuntimeError) as err:
        raise ValueError(f"cannot decode frames {indices} of {what} file {path!r}: {err}") from err
    return uint8_frames_to_tensor(frames), indices


def natural_key(name: str) -> list:
    """Sort key comparing the digit runs of a file name as numbers: `frame_2` before `frame_10`."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def read_torchcodec_video(
    decoder: Any, num_frames: int, training: bool, generator: torch.Generator | None, what: str
) -> tuple[torch.Tensor, list[int]]:
    """Sample frames from a `torchcodec.decoders.VideoDecoder` (what a 🤗 Datasets `Video` column decodes to): only
    the sampled frames are decoded (`get_frames_at`), in NCHW or NHWC order, uint8."""
    length = len(decoder)
    if length == 0:
        raise ValueError(f"{what} has no frames")
    indices = sample_segments(range(length), num_frames, training, generator)
    frames = decoder.get_frames_at(indices).data
    if frames.ndim == 4 and frames.shape[1] != 3 and frames.shape[-1] == 3:  # NHWC
        frames = frames.permute(0, 3, 1, 2)
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"{what}: the video decoder gave {frames.dtype} frames {tuple(frames.shape)}, not RGB uint8")
    return frames.float().div(255), indices


def is_video_decoder(value: Any) -> bool:
    """True for a torchcodec `VideoDecoder` (duck-typed: torchcodec is not a dependency)."""
    return hasattr(value, "get_frames_at") and hasattr(value, "__len__")


def read_frame_folder(
    folder: str, num_frames: int, training: bool, generator: torch.Generator | None, what: str
) -> tuple[torch.Tensor, list[int]]:
    """Sample frames from a folder of frame images sorted by file name, numbers compared as numbers (`frame_2`
    before `frame_10`; hidden files ignored)."""
    names = sorted(
        (n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))),
        key=natural_key,
    )
    if not names:
        raise ValueError(f"{what} frame folder {folder!r} contains no frame files")
    indices = sample_segments(range(len(names)), num_frames, training, generator)
    frames = [load_image(os.path.join(folder, names[i]), f"{what} frame") for i in indices]
    if len({tuple(f.shape) for f in frames}) > 1:
        raise ValueError(
            f"{what} frames in {folder!r} have different sizes: {sorted({tuple(f.shape) for f in frames})}"
        )
    return torch.stack(frames), indices


def read_frame_array(
    frames: np.ndarray | torch.Tensor | Sequence[Image.Image],
    num_frames: int,
    training: bool,
    generator: torch.Generator | None,
    what: str,
) -> tuple[torch.Tensor, list[int]]:
    """Sample frames from an in-memory video: a (T, H, W, 3) array/tensor (uint8, wider integers or [0, 1] floats,
    scaled as images) or a list of PIL images."""
    if isinstance(frames, (list, tuple)):
        if not frames or not all(isinstance(f, Image.Image) for f in frames):
            raise ValueError(f"{what} given as a list must be a non-empty list of PIL images")
        indices = sample_segments(range(len(frames)), num_frames, training, generator)
        return torch.stack([load_image(frames[i], f"{what} frame {i}") for i in indices]), indices
    array = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"{what} array must have shape (T, H, W, 3), got {tuple(array.shape)}")
    if array.shape[0] == 0:
        raise ValueError(f"{what} has zero frames")
    indices = sample_segments(range(array.shape[0]), num_frames, training, generator)
    if array.dtype == np.uint8:
        return uint8_frames_to_tensor(array[indices]), indices
    return torch.from_numpy(np.ascontiguousarray(scale_to_unit(array[indices], what))).permute(0, 3, 1, 2), indices


def read_video(
    video: VideoLike,
    num_frames: int,
    training: bool,
    generator: torch.Generator | None,
    what: str = "video",
    decoder_threads: int = 1,
) -> tuple[torch.Tensor, list[int]]:
    """Any supported video input -> ((num_frames, 3, H, W) pixels in [0, 1], sampled frame indices); video files are
    decoded with `decoder_threads` threads."""
    if isinstance(video, Mapping):
        source, path = media_bytes(video, what)
        if isinstance(source, io.BytesIO):
            return read_video_file(source, num_frames, training, generator, what, path, decoder_threads)
        video = source
    if is_video_decoder(video):
        return read_torchcodec_video(video, num_frames, training, generator, what)
    if isinstance(video, (str, os.PathLike)):
        if os.path.isdir(video):
            return read_frame_folder(os.fspath(video), num_frames, training, generator, what)
        return read_video_file(video, num_frames, training, generator, what, decoder_threads=decoder_threads)
    if isinstance(video, (np.ndarray, torch.Tensor, list, tuple)):
        return read_frame_array(video, num_frames, training, generator, what)
    raise ValueError(
        f"{what} must be a path, a frame folder, a (T, H, W, 3) array, a list of PIL images, a `{{'path', 'bytes'}}` "
        f"dict or a torchcodec VideoDecoder, got {type(video).__name__}"
    )


def is_video_file(video: Any) -> bool:
    """True for what decord decodes: a path to a file (not a frame folder) or a 🤗 Datasets `{"path", "bytes"}` dict."""
    return isinstance(video, Mapping) or (isinstance(video, (str, os.PathLike)) and not os.path.isdir(video))


def decoding_plan(videos: list, training: bool) -> tuple[int, int]:
    """(threads over the files of a batch, FFmpeg threads per file) for decoding `videos` on the usable cores.

    A batch of several video files is decoded by one thread per file (up to the cores), each file with one FFmpeg
    thread: files are independent, so this uses the cores fully, while FFmpeg's own threads only partly overlap the
    frames of one file. A lone file gets FFmpeg threads instead (at most 2: decord fails on some files beyond that).
    Frames are drawn from a shared random generator in training, in item order, so training decodes one file at a
    time; inside a `DataLoader` worker the workers already share the cores, so each decodes serially on one thread.
    """
    if torch.utils.data.get_worker_info() is not None:
        return 1, 1
    cores = usable_cores()
    files = sum(is_video_file(video) for video in videos)
    if training or files <= 1 or cores <= 1:
        return 1, min(2, cores)
    return min(files, cores), 1


def is_single_video(video: Any) -> bool:
    """True for one video (path, array of rank <= 4, list of PIL images, `{"path", "bytes"}` dict, torchcodec
    decoder), False for a batch of videos."""
    if isinstance(video, (str, os.PathLike, Mapping)) or is_video_decoder(video):
        return True
    if isinstance(video, (np.ndarray, torch.Tensor)):
        return video.ndim <= 4
    return isinstance(video, (list, tuple)) and len(video) > 0 and isinstance(video[0], Image.Image)


class MiCoVideoProcessor:
    r"""
    Video processor of MiCo: samples `num_frames` frames per video and applies the image transform to each.

    Accepted videos: a video file or its bytes in a 🤗 Datasets `{"path", "bytes"}` dict (decoded with decord; only the
    sampled frames are decoded), a torchcodec `VideoDecoder` (likewise), a folder of frame images (sorted by file name
    with numbers compared as numbers, converted to RGB), a (T, H, W, 3) array or tensor (uint8, wider integers or [0, 1]
    floats, scaled as images), or a list of PIL images. A batch is a list of those (or a (B, T, H, W, 3) array).

    Args:
        num_frames (`int`, *optional*, defaults to 4): frames sampled per video (one per segment).
        training (`bool`, *optional*, defaults to `False`): random frame within each segment instead of the middle.
        image_processor ([`MiCoImageProcessor`], *optional*): the per-frame transform (size, mean, std).
    """

    model_input_names = ["pixel_values_videos"]

    def __init__(self, num_frames: int = 4, training: bool = False, image_processor: MiCoImageProcessor | None = None):
        self.num_frames = check_positive("num_frames", num_frames)
        self.training = bool(training)
        self.image_processor = image_processor if image_processor is not None else MiCoImageProcessor()

    def __call__(
        self,
        videos: VideoLike | list[VideoLike],
        num_frames: int | None = None,
        training: bool | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        image_size: int | None = None,
        return_frame_indices: bool = False,
        do_sample_frames: bool = True,
        return_tensors: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Videos -> `{"pixel_values_videos": (B, T, 3, S, S)}` (+ `"frame_indices"` (B, T) when asked).

        Sampling is deterministic at evaluation; in training it draws from `generator`, else from a generator
        seeded with `seed`, else from torch's global RNG. `do_sample_frames` and `return_tensors` are the arguments
        Transformers' `video-classification` pipeline passes: frames are always sampled (`False` is refused), and
        with `return_tensors` the result is a `BatchFeature`.
        """
        if not do_sample_frames:
            raise ValueError("MiCoVideoProcessor always samples num_frames frames per video; do_sample_frames=False")
        num_frames = self.num_frames if num_frames is None else check_positive("num_frames", num_frames)
        training = self.training if training is None else bool(training)
        generator = generator if generator is not None else make_generator(seed)
        pixels, indices = self.sample(videos, num_frames, training, generator, image_size)
        output = {"pixel_values_videos": pixels}
        if return_frame_indices:
            output["frame_indices"] = indices
        return BatchFeature(output, tensor_type=return_tensors) if return_tensors else output

    def sample(
        self,
        videos: VideoLike | list[VideoLike],
        num_frames: int,
        training: bool,
        generator: torch.Generator | None,
        image_size: int | None = None,
        what: str = "videos",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Videos -> (pixels (B, T, 3, S, S), sampled frame indices (B, T)); errors name the item as `what[i]`."""
        check_positive("num_frames", num_frames)
        batch = [videos] if is_single_video(videos) else list(videos)
        if not batch:
            raise ValueError(f"{what} must be a video or a non-empty list of videos")
        workers, decoder_threads = decoding_plan(batch, training)

        def decode(video: VideoLike, name: str) -> tuple[torch.Tensor, list[int]]:
            frames, indices = read_video(video, num_frames, training, generator, name, decoder_threads)
            return self.image_processor.transform(frames, image_size), indices

        decoded = map_batch(batch, decode, what, workers)
        return torch.stack([pixels for pixels, _ in decoded]), torch.tensor([i for _, i in decoded], dtype=torch.long)


__all__ = ["MiCoVideoProcessor", "sample_segments", "split_segments"]
