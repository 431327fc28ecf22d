"""Caption folders of images, videos and audio clips with [`MiCoForConditionalGeneration`].

The files are grouped by modality (each becomes one kind of model input), preprocessed by [`MiCoProcessor`] and
captioned in batches; `examples/run_captioning.py` is a command line around [`caption_files`].
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm


# File extension -> knowledge modality.
MEDIA_EXTENSIONS = {
    **dict.fromkeys((".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"), "image"),
    **dict.fromkeys((".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"), "video"),
    **dict.fromkeys((".wav", ".flac", ".mp3", ".ogg", ".m4a"), "audio"),
}

# Modality -> (processor argument, model input).
MODALITY_INPUTS = {
    "image": ("images", "pixel_values"),
    "video": ("videos", "pixel_values_videos"),
    "audio": ("audio", "input_features"),
}


def media_modality(path: str | os.PathLike) -> str | None:
    """`"image"`, `"video"`, `"audio"` from the file extension, or `None` for other files."""
    return MEDIA_EXTENSIONS.get(Path(path).suffix.lower())


def collect_media_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files and (recursively, sorted) folder contents with a known media extension, in the order given."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file() and media_modality(p))
        elif path.is_file():
            if media_modality(path) is None:
                raise ValueError(f"{path}: unknown media extension (known: {', '.join(sorted(MEDIA_EXTENSIONS))})")
            files.append(path)
        else:
            raise FileNotFoundError(path)
    return files


def resolve_device(device: str = "auto") -> torch.device:
    """`"auto"`: the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """`"auto"`: bfloat16 on a GPU that supports it, float32 elsewhere; otherwise a torch dtype name."""
    if dtype == "auto":
        on_gpu = torch.device(device).type == "cuda"
        return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def caption_files(
    model: Any,
    processor: Any,
    paths: Iterable[str | os.PathLike],
    batch_size: int = 8,
    num_frames: int | None = None,
    progress: bool = True,
    **generate_kwargs: Any,
) -> list[dict[str, str]]:
    """Caption media files; returns `{"path", "modality", "caption"}` records in the order of `paths`.

    Args:
        model ([`MiCoForConditionalGeneration`]): the captioner (its device and dtype receive the inputs).
        processor ([`MiCoProcessor`]): preprocessing and decoding.
        paths: image, video and audio files (see `MEDIA_EXTENSIONS`); each batch holds a single modality.
        batch_size (`int`, *optional*, defaults to 8): files per `generate` call.
        num_frames (`int`, *optional*): frames sampled per video (default: the processor's).
        progress (`bool`, *optional*, defaults to `True`): show a tqdm progress bar.
        generate_kwargs: passed to `model.generate` (`num_beams`, `max_new_tokens`, ...).
    """
    paths = [Path(path) for path in paths]
    by_modality: dict[str, list[int]] = {}
    for index, path in enumerate(paths):
        modality = media_modality(path)
        if modality is None:
            raise ValueError(f"{path}: unknown media extension")
        by_modality.setdefault(modality, []).append(index)

    captions: list[str | None] = [None] * len(paths)
    with tqdm(total=len(paths), desc="captioning", unit="file", disable=not progress) as bar:
        for modality, indices in by_modality.items():
            argument, input_name = MODALITY_INPUTS[modality]
            options = {"num_frames": num_frames} if modality == "video" and num_frames else {}
            for start in range(0, len(indices), batch_size):
                batch = indices[start : start + batch_size]
                features = processor(**{argument: [str(paths[i]) for i in batch]}, **options, return_tensors="pt")
                values = features[input_name].to(model.device, model.dtype)
                ids = model.generate(**{input_name: values}, **generate_kwargs)
                for i, caption in zip(batch, processor.batch_decode(ids, skip_special_tokens=True)):
                    captions[i] = caption.strip()
                bar.update(len(batch))
    return [
        {"path": str(path), "modality": media_modality(path), "caption": caption}
        for path, caption in zip(paths, captions)
    ]
