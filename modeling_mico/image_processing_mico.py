"""Image, depth-map and normal-map preprocessing for MiCo.

MiCo's vision tower (EVA-CLIP ViT-g/14) was trained on pixels produced by the original
`ImageProcessor`: PIL decoding, conversion to RGB, scaling to ``[0, 1]`` as float32, a *tensor*
resize to 224x224 (torchvision 0.15 ``Resize`` on a tensor = bilinear ``interpolate`` without
antialiasing, aspect ratio not kept) and CLIP mean/std normalisation. This module reproduces that
pipeline with PIL, NumPy and plain torch only (torchvision is not required), and extends it to depth
maps (per-map min-max scaling, replicated to 3 channels) and surface-normal maps (the image pipeline).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEPTH_SCALINGS = ("min_max", "none")
# PIL modes holding more than 8 bits per value (16-bit and 32-bit integers, 32-bit floats): scaled by their dtype
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")

ImageLike = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor | Mapping


def check_file(path: str | os.PathLike, what: str) -> str:
    """Return `path` as a string, raising `FileNotFoundError` naming the input when it does not exist."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path!r}")
    return path


def open_image(source: str | os.PathLike | io.BytesIO, what: str = "image", path: str | None = None) -> Image.Image:
    """Decode an image file (or its bytes) fully with PIL (lazy decoding would hide truncated files until later)."""
    if not isinstance(source, io.BytesIO):
        source = path = check_file(source, what)
    try:
        with Image.open(source) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot decode {what} file {path or '(bytes)'!r}: {err}") from err


def pil_to_tensor(img: Image.Image, what: str = "image") -> torch.Tensor:
    """PIL image -> float32 tensor (3, H, W) in [0, 1]: 8-bit modes as torchvision's `ToTensor` (RGB uint8 / 255),
    16- and 32-bit integer and float modes (`I;16`, `I`, `F`) by the array rule of `array_to_tensor`."""
    if img.mode in WIDE_MODES:
        return array_to_tensor(np.asarray(img), what)
    array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return uint8_frames_to_tensor(array[None])[0]


def uint8_frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 array -> float32 tensor (T, 3, H, W) in [0, 1] (channels-last strides).

    NumPy's float32 division is the same IEEE operation as torch's `.float().div(255)` (and torchvision's `ToTensor`),
    bit for bit on all 256 values, in one pass and about 4x faster on CPU: an HD frame is a 10 MB float32 tensor, so
    this is a visible share of video decoding.
    """
    return torch.from_numpy(np.divide(frames, np.float32(255), dtype=np.float32)).permute(0, 3, 1, 2)


def scale_to_unit(array: np.ndarray, what: str) -> np.ndarray:
    """Pixel values -> float32 in [0, 1]: integers are divided by their dtype's maximum (255 for uint8, 65535 for
    16-bit, 2**31 - 1 for int32) and must not be negative; floats must already lie in [0, 1]."""
    if np.issubdtype(array.dtype, np.integer):
        if array.size and array.min() < 0:
            raise ValueError(f"{what} is a {array.dtype} image with negative values; pixel values must be >= 0")
        return (array / np.iinfo(array.dtype).max).astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{what} must be an integer array or a float array in [0, 1], got dtype {array.dtype}")
    check_finite(array, what)
    if array.size and (array.min() < 0 or array.max() > 1):
        raise ValueError(f"{what} is a float array and must lie in [0, 1], got [{array.min()}, {array.max()}]")
    return array.astype(np.float32, copy=False)


def array_to_tensor(array: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    """An in-memory image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> float32 tensor (3, H, W) in [0, 1].

    Values are scaled by `scale_to_unit` (uint8 / 255 exactly as for files). Grey images are replicated to three
    channels and an alpha channel is dropped, as PIL's `convert("RGB")` does.
    """
    array = array.numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"{what} must have shape (H, W), (H, W, 3) or (H, W, 4), got {tuple(array.shape)}")
    array = array[..., :3]
    if array.dtype == np.uint8:
        return uint8_frames_to_tensor(array[None])[0]
    return torch.from_numpy(np.require(scale_to_unit(array, what), np.float32, ["C", "W"])).permute(2, 0, 1)


def check_positive(name: str, value: Any) -> int | None:
    """A setting that must be a positive integer (frames, slices, sizes, rates): `None` passes (unset), anything
    else is returned as an `int` or refused by name, so that 0 never silently becomes a default."""
    if value is None:
        return None
    integral = isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def media_bytes(value: Mapping, what: str) -> tuple[io.BytesIO | str, str | None]:
    """A 🤗 Datasets media value stored undecoded, `{"path": ..., "bytes": ...}` -> (its bytes as a file object, or
    its path; the path for messages and extension checks). Bytes win over the path, as in `datasets`."""
    if "bytes" not in value and "path" not in value:
        raise ValueError(f"{what} dict must have 'path' and/or 'bytes' keys, got {sorted(value)}")
    path = value.get("path")
    if value.get("bytes") is not None:
        return io.BytesIO(value["bytes"]), path
    if path is None:
        raise ValueError(f"{what} dict has neither 'path' nor 'bytes'")
    return os.fspath(path), os.fspath(path)


def check_finite(array: np.ndarray | torch.Tensor, what: str) -> None:
    """Raise `ValueError` naming the input when it holds NaN or infinite values."""
    finite = torch.isfinite(array).all() if isinstance(array, torch.Tensor) else np.isfinite(array).all()
    if not finite:
        raise ValueError(f"{what} contains NaN or infinite values")


def load_image(image: ImageLike, what: str = "image") -> torch.Tensor:
    """Any supported image input -> float32 tensor (3, H, W) in [0, 1] (grey and CMYK converted to RGB); a
    `{"path", "bytes"}` dict is what a 🤗 Datasets `Image(decode=False)` column holds."""
    if isinstance(image, Mapping):
        source, path = media_bytes(image, what)
        image = open_image(source, what, path)
    if isinstance(image, (str, os.PathLike)):
        return pil_to_tensor(open_image(image, what), what)
    if isinstance(image, Image.Image):
        return pil_to_tensor(image, what)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return array_to_tensor(image, what)
    raise ValueError(f"{what} must be a path, a PIL image or an array, got {type(image).__name__}")


def load_depth(depth: ImageLike, what: str = "depth") -> torch.Tensor:
    """A depth map (16-bit or 8-bit image file, `.npy` file, PIL image or 2-D array) -> float32 tensor (H, W).

    Colour images are converted to 8-bit grey ("L"); an array of shape (H, W, 1) is squeezed.
    """
    if isinstance(depth, Mapping):
        source, path = media_bytes(depth, what)
        depth = open_image(source, what, path) if isinstance(source, io.BytesIO) else source
    if isinstance(depth, (str, os.PathLike)):
        path = check_file(depth, what)
        if path.lower().endswith(".npy"):
            try:
                depth = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise ValueError(f"cannot read {what} file {path!r}: {err}") from err
        else:
            depth = open_image(path, what)
    if isinstance(depth, Image.Image):
        if depth.mode not in ("I", "I;16", "I;16B", "I;16L", "F", "L"):
            depth = depth.convert("L")
        depth = np.asarray(depth)
    if not isinstance(depth, (np.ndarray, torch.Tensor)):
        raise ValueError(f"{what} must be a path, a PIL image or an array, got {type(depth).__name__}")
    depth = torch.as_tensor(np.asarray(depth, dtype=np.float32))
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2 or depth.numel() == 0:
        raise ValueError(f"{what} must be a non-empty 2-D map (H, W), got shape {tuple(depth.shape)}")
    check_finite(depth, what)
    return depth


def scale_depth(depth: torch.Tensor, scaling: str) -> torch.Tensor:
    """Scale a depth map to [0, 1]: per-map min-max (a constant map gives zeros) or `"none"` (kept as is)."""
    if scaling == "none":
        return depth
    low, high = depth.min(), depth.max()
    if high <= low:
        return torch.zeros_like(depth)
    return (depth - low) / (high - low)


def resize_and_normalize(pixels: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 3, size, size): bilinear resize without antialiasing, then normalisation.

    This is torchvision 0.15's tensor `Resize((size, size))` followed by `Normalize(mean, std)`.
    """
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    mean_t = torch.tensor(mean, dtype=pixels.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype).view(1, -1, 1, 1)
    return (pixels - mean_t) / std_t


def as_batch(inputs: Any, is_single) -> list:
    """Wrap a single input in a list; keep lists/tuples of inputs as they are."""
    if is_single(inputs):
        return [inputs]
    if isinstance(inputs, (list, tuple)) and len(inputs) > 0:
        return list(inputs)
    raise ValueError(f"expected an input or a non-empty list of inputs, got {type(inputs).__name__}")


def is_single_image(image: Any) -> bool:
    """True for one image (path, PIL image, `{"path", "bytes"}` dict or array of rank <= 3), False for a batch."""
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return image.ndim <= 3
    return isinstance(image, (str, os.PathLike, Image.Image, Mapping))


def first_set(*values: Any) -> Any:
    """The first value that is not `None` (per-call setting, then the saved one, then the modality's default)."""
    return next((value for value in values if value is not None), None)


def map_batch(items: list, fn, what: str, workers: int = 1) -> list:
    """Apply `fn(item, name)` to each item with its name (e.g. `images[2]`), so errors say which item failed.

    With `workers` > 1 the items are processed by that many threads (for work that releases the GIL: decoders, torch
    ops); results keep the items' order and the error of the first failing item is raised, as in the serial loop.
    """
    names = [f"{what}[{index}]" for index in range(len(items))]
    if workers <= 1 or len(items) <= 1:
        return [fn(item, name) for item, name in zip(items, names)]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items, names))


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class MiCoImageProcessor(BaseImageProcessor):
    r"""
    Image processor of MiCo for images, depth maps and surface-normal maps.

    Every input ends as a float32 tensor normalised with CLIP's mean/std at `image_size` x `image_size`:

    * images (path, PIL image, 🤗 Datasets `{"path", "bytes"}` dict, (H, W[, 1|3|4]) array): decoded with PIL,
      converted to RGB (grey and CMYK included), scaled to [0, 1] (integers divided by their dtype's maximum: 16-bit
      PNG/TIFF by 65535, 32-bit by 2**31 - 1; floats, float TIFFs included, must already lie in [0, 1]), resized by
      bilinear interpolation *without antialiasing* (the aspect ratio is not kept), normalised -> `pixel_values`
      (B, 3, H, W).
    * depth maps (16-bit or 8-bit PNG, `.npy`, PIL image or 2-D array): per-map min-max scaled to [0, 1]
      (`depth_scaling="min_max"`, a constant map gives zeros) or used as is (`depth_scaling="none"`, values
      must already be in [0, 1]), replicated to 3 channels, then resized and normalised as images
      -> `depth_values` (B, 1, 3, H, W) (one frame per map).
    * surface-normal maps (RGB images): exactly the image pipeline -> `normal_values` (B, 1, 3, H, W).

    Args:
        image_size (`int`, *optional*, defaults to 224): output height and width.
        image_mean (`list[float]`, *optional*): per-channel mean (CLIP's by default).
        image_std (`list[float]`, *optional*): per-channel standard deviation (CLIP's by default).
        depth_scaling (`str`, *optional*, defaults to `"min_max"`): how depth values are brought to [0, 1].
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 224,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        depth_scaling: str = "min_max",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if depth_scaling not in DEPTH_SCALINGS:
            raise ValueError(f"depth_scaling must be one of {DEPTH_SCALINGS}, got {depth_scaling!r}")
        self.image_size = check_positive("image_size", image_size)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.depth_scaling = depth_scaling

    def transform(self, pixels: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
        """Resize and normalise (N, 3, H, W) pixels in [0, 1] (frames of one size are resized in one call)."""
        size = first_set(check_positive("image_size", image_size), self.image_size)
        return resize_and_normalize(pixels, size, self.image_mean, self.image_std)

    def _transform_each(self, tensors: list[torch.Tensor], image_size: int | None) -> torch.Tensor:
        """Resize and normalise a list of (3, H, W) tensors of possibly different sizes into (N, 3, S, S)."""
        return torch.cat([self.transform(t[None], image_size) for t in tensors])

    def preprocess(
        self,
        images: ImageLike | list[ImageLike],
        image_size: int | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Images -> `pixel_values` (B, 3, image_size, image_size)."""
        self._reject_unknown(kwargs)
        return BatchFeature({"pixel_values": self.image_pixels(images, image_size)}, tensor_type=return_tensors)

    def preprocess_depth(
        self,
        depth: ImageLike | list[ImageLike],
        image_size: int | None = None,
        depth_scaling: str | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Depth maps -> `depth_values` (B, 1, 3, image_size, image_size)."""
        pixels = self.depth_pixels(depth, image_size, depth_scaling)[:, None]
        return BatchFeature({"depth_values": pixels}, tensor_type=return_tensors)

    def preprocess_normals(
        self, normals: ImageLike | list[ImageLike], image_size: int | None = None, return_tensors: str | None = "pt"
    ) -> BatchFeature:
        """Surface-normal maps (RGB images) -> `normal_values` (B, 1, 3, image_size, image_size)."""
        pixels = self.image_pixels(normals, image_size, what="normals")[:, None]
        return BatchFeature({"normal_values": pixels}, tensor_type=return_tensors)

    def image_pixels(
        self, images: ImageLike | list[ImageLike], image_size: int | None = None, what: str = "images"
    ) -> torch.Tensor:
        """RGB images (one or a list) -> (B, 3, S, S); errors name the failing item as `what[i]`."""
        tensors = map_batch(as_batch(images, is_single_image), load_image, what)
        return self._transform_each(tensors, image_size)

    def depth_pixels(
        self,
        depth: ImageLike | list[ImageLike],
        image_size: int | None = None,
        depth_scaling: str | None = None,
        what: str = "depth",
    ) -> torch.Tensor:
        """Single-channel maps (one or a list) -> scaled to [0, 1], copied to 3 channels, (B, 3, S, S)."""
        scaling = depth_scaling or self.depth_scaling
        if scaling not in DEPTH_SCALINGS:
            raise ValueError(f"depth_scaling must be one of {DEPTH_SCALINGS}, got {scaling!r}")

        def to_pixels(item: ImageLike, name: str) -> torch.Tensor:
            scaled = scale_depth(load_depth(item, name), scaling)
            if scaled.min() < 0 or scaled.max() > 1:
                raise ValueError(f"{name} must lie in [0, 1] with depth_scaling='none'")
            return scaled.expand(3, *scaled.shape)

        return self._transform_each(map_batch(as_batch(depth, is_single_image), to_pixels, what), image_size)

    @staticmethod
    def _reject_unknown(kwargs: dict) -> None:
        """Fail loudly on misspelt options instead of ignoring them."""
        if kwargs:
            raise ValueError(f"unexpected image processor arguments: {sorted(kwargs)}")


__all__ = ["MiCoImageProcessor"]
