"""Caption media files with [`MiCoForConditionalGeneration`], routed to the model's modalities by file extension.

A file's modality comes from the extensions each modality of the model's registry declares (`ModalitySpec.extensions`:
images, videos, audio clips, depth `.npy` arrays, and declared modalities such as `thermal` with their extensions). A
file whose extension no modality declares, or one that several declare, needs `modality=` (e.g. depth maps stored as
PNG: `modality="depth"`). The files are grouped by modality (each becomes one kind of model input), preprocessed by
[`MiCoProcessor`] and captioned in batches; `examples/run_captioning.py` is a command line around [`caption_files`].
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .annotations import modality_specs
from .configuration_mico import MiCoConfig, ModalitySpec


logger = logging.get_logger(__name__)


def media_extensions(config: MiCoConfig | None = None) -> dict[str, list[str]]:
    """File extension -> the modalities of `config` (default: the built-in ones) that declare it."""
    extensions: dict[str, list[str]] = {}
    for spec in modality_specs(config).values():
        for extension in spec.extensions:
            extensions.setdefault(extension, []).append(spec.name)
    return extensions


def media_modality(
    path: str | os.PathLike, config: MiCoConfig | None = None, modality: str | None = None
) -> str | None:
    """The modality of a media file: `modality` when given (checked against `config`'s modalities), else the one
    that declares the file's extension, or `None` when none does; an extension that several modalities declare is an
    error asking for `modality`."""
    specs = modality_specs(config)
    if modality is not None:
        if modality not in specs:
            raise ValueError(f"unknown modality {modality!r}; this model takes {list(specs)}")
        return modality
    suffix = Path(path).suffix.lower()
    names = media_extensions(config).get(suffix, [])
    if len(names) > 1:
        raise ValueError(f"{path}: the extension {suffix!r} is declared by {names}; say which with `modality`")
    return names[0] if names else None


def collect_media_files(
    inputs: Iterable[str | os.PathLike], config: MiCoConfig | None = None, modality: str | None = None
) -> list[Path]:
    """Files and (recursively, sorted) folder contents with an extension of `config`'s modalities (every file of a
    folder when `modality` is given), in the order given."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file() and media_modality(p, config, modality))
        elif path.is_file():
            if media_modality(path, config, modality) is None:
                known = ", ".join(sorted(media_extensions(config)))
                raise ValueError(f"{path}: unknown media extension (known: {known}); say which with `modality`")
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
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, dtype)


def media_name(media: Any, default: str) -> str:
    """How errors name a media value: its path (a string, or the `path` of a 🤗 Datasets `{"path", "bytes"}` value),
    else `default`."""
    if isinstance(media, dict):
        media = media.get("path")
    return media if isinstance(media, str) and media else default


def decode_media(
    processor: Any, spec: ModalitySpec, paths: Sequence[Any], skip_broken: bool = False, **options: Any
) -> tuple[list[int], torch.Tensor | None]:
    """Preprocess media of one modality one by one (paths, or any value the processor takes, such as 🤗 Datasets
    media): `(indices of the decoded items, their stacked model input)`.

    A file that cannot be decoded raises `BrokenMediaError` naming it, or with `skip_broken` is left out with a
    warning (the returned indices say which files the rows of the tensor are; `None` when none decoded)."""
    from .data import BrokenMediaError

    kept, values = [], []
    for index, media in enumerate(paths):
        media = os.fspath(media) if isinstance(media, os.PathLike) else media
        try:
            features = processor(**{spec.processor_argument: [media]}, **options, return_tensors="pt")
        except ImportError:  # a missing back-end is no broken file
            raise
        except Exception as error:
            name = media_name(media, f"{spec.name} item {index}")
            if not skip_broken:
                raise BrokenMediaError(f"cannot decode {name}: {error} (--skip_broken skips such files)") from error
            logger.warning(f"skipping {name}: cannot decode it: {error}")
            continue
        kept.append(index)
        values.append(features[spec.input_name])
    return kept, torch.cat(values) if values else None


def decoding_weights_kept(model: Any) -> contextlib.AbstractContextManager:
    """`model.keep_decoding_weights()` for a MiCo captioning model (also behind a PEFT wrapper), else a no-op: caption
    loops reuse the decoding weights `generate` builds across their batches."""
    keep = getattr(model, "keep_decoding_weights", None)
    return keep() if keep is not None else contextlib.nullcontext()


def caption_files(
    model: Any,
    processor: Any,
    paths: Iterable[str | os.PathLike],
    batch_size: int = 8,
    num_frames: int | None = None,
    progress: bool = True,
    modality: str | None = None,
    skip_broken: bool = False,
    sound_tracks: bool = False,
    **generate_kwargs: Any,
) -> list[dict[str, str]]:
    """Caption media files; returns `{"path", "modality", "caption"}` records in the order of `paths`.

    Args:
        model ([`MiCoForConditionalGeneration`]): the captioner (its device and dtype receive the inputs; its
            configuration's modalities route the files).
        processor ([`MiCoProcessor`]): preprocessing and decoding.
        paths: media files (see `media_modality`); each batch holds a single modality.
        batch_size (`int`, *optional*, defaults to 8): files per `generate` call.
        num_frames (`int`, *optional*): frames sampled per clip of video-like modalities (default: the processor's).
        progress (`bool`, *optional*, defaults to `True`): show a tqdm progress bar.
        modality (`str`, *optional*): the modality of every file, for extensions that name none or several.
        skip_broken (`bool`, *optional*, defaults to `False`): leave out (with a warning) files that cannot be
            decoded; otherwise the first one raises `BrokenMediaError` naming it.
        sound_tracks (`bool`, *optional*, defaults to `False`): caption a video that has a sound track from its
            frames *and* its sound (context `video` + `audio`, record modality `"video+audio"`), as the model was
            trained on clips with their sound; videos without one are captioned from their frames alone.
        generate_kwargs: passed to `model.generate` (`num_beams`, `max_new_tokens`, ...).
    """
    from .feature_extraction_mico import has_sound_track

    config = model.config
    specs = config.modality_specs
    paths = [Path(path) for path in paths]
    modalities: list[tuple[str, ...]] = []
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, path in enumerate(paths):
        name = media_modality(path, config, modality)
        if name is None:
            raise ValueError(f"{path}: unknown media extension; say which modality with `modality`")
        with_sound = sound_tracks and name == "video" and "audio" in specs and has_sound_track(path)
        names = (name, "audio") if with_sound else (name,)
        modalities.append(names)
        groups.setdefault(names, []).append(index)

    captions: list[str | None] = [None] * len(paths)
    progress_bar = tqdm(total=len(paths), desc="captioning", unit="file", disable=not progress)
    with progress_bar as bar, decoding_weights_kept(model):
        for names, indices in groups.items():
            for start in range(0, len(indices), batch_size):
                batch = indices[start : start + batch_size]
                decoded = {}
                for name in names:  # a video's sound track is decoded from the same file
                    spec = specs[name]
                    options = {"num_frames": num_frames} if spec.layout == "video" and num_frames else {}
                    decoded[spec.input_name] = decode_media(
                        processor, spec, [paths[i] for i in batch], skip_broken, **options
                    )
                kept = sorted(set.intersection(*(set(k) for k, _ in decoded.values())))
                if kept:
                    inputs = {
                        input_name: values[[k.index(i) for i in kept]].to(model.device, model.dtype)
                        for input_name, (k, values) in decoded.items()
                    }
                    ids = model.generate(**inputs, **generate_kwargs)
                    for k, caption in zip(kept, processor.batch_decode(ids, skip_special_tokens=True)):
                        captions[batch[k]] = caption.strip()
                bar.update(len(batch))
    return [
        {"path": str(path), "modality": "+".join(names), "caption": caption}
        for path, names, caption in zip(paths, modalities, captions)
        if caption is not None
    ]
