"""Synthetic omni-modal captioned data for smoke tests, examples and tiny training runs.

Every sample is a coloured shape of a given size that moves from the centre of the frame towards one edge while a
sound plays. The caption names all attributes ("a small red circle moving left with a low steady tone") and every
modality expresses enough of them to tell most items of a test split apart:

- image (RGB PNG): colour, shape, size and motion direction: it is the clip's last frame, so the object sits near the
  edge it moves to;
- video (H.264 mp4, yuv420p, one second) with its sound track (ALAC, lossless: the audio clip's samples exactly):
  everything; the object's positions lie on one side of the centre, so even an order-free pooling of the frames
  tells left from right;
- audio (16 kHz mono FLAC, one second): pitch (low / mid / high), pattern (steady / beeping / rising / falling) and
  timbre (a tone, a buzz or a chord);
- depth (16-bit PNG, millimetres): shape, size and direction (the object's place in the last frame); larger objects
  are nearer the camera;
- normal (8-bit RGB PNG): shape, size and direction, as the surface normals of the object's relief.

The attribute space has 6 x 4 x 3 x 4 x 3 x 4 x 3 = 31104 combinations (48 geometric ones for depth and normal maps,
288 for images, 36 for audio). Test samples get distinct combinations (and, where possible, distinct visual
combinations) that never occur in the training split, so retrieval on the test split is well posed and measures
compositional generalisation. Generation is deterministic for a seed: each sample draws from
its own random generator seeded with ``(seed, split, index)``.
"""

import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .configuration_mico import BUILTIN_MODALITIES
from .import_utils import require
from .output_utils import atomic_output, remove_stale_partials


SAMPLE_RATE = 16_000
CLIP_SECONDS = 1.0

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.14, "medium": 0.2, "large": 0.27}  # object radius as a fraction of the image side
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) in image coordinates
PITCHES = {"low": 220.0, "mid": 440.0, "high": 880.0}  # Hz, one octave apart
PATTERNS = ("steady", "beeping", "rising", "falling")
# Timbre -> (frequency ratio, amplitude) of its partials: a tone (fundamental and a weak octave), a bright buzz (the
# first eight harmonics, sawtooth-like) and a major chord (root, major third, fifth).
TIMBRES = {
    "tone": ((1.0, 1.0), (2.0, 0.25)),
    "buzz": tuple((float(k), 1.0 / k) for k in range(1, 9)),
    "chord": ((1.0, 1.0), (1.25, 0.8), (1.5, 0.8)),
}

# Attribute name -> vocabulary, in the order of the combination tuples.
ATTRIBUTES = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "motion": tuple(MOTIONS),
    "pitch": tuple(PITCHES),
    "pattern": PATTERNS,
    "timbre": tuple(TIMBRES),
}
VISUAL_ATTRIBUTES = ("color", "shape", "size", "motion")

CAPTION_TEMPLATES = (
    "a {size} {color} {shape} moving {motion} with a {pitch} {pattern} {timbre}",
    "a {size} {color} {shape} moves {motion} while a {pitch} {pattern} {timbre} plays",
    "a {pitch} {pattern} {timbre} plays as a {size} {color} {shape} slides {motion}",
    "video of a {size} {color} {shape} going {motion}, with a {pitch} {pattern} {timbre}",
    "the {color} {shape} is {size} and drifts {motion}; the sound is a {pitch} {pattern} {timbre}",
)

BEEP_RATE = 4.0  # beeps per second for the "beeping" pattern
GLIDE_RATIO = 1.5  # frequency ratio covered by the "rising" and "falling" patterns
BACKGROUND_DEPTH_MM = (6000.0, 4000.0)  # depth of the background plane at the top and bottom rows
OBJECT_DEPTH_MM = {"small": 3000.0, "medium": 2200.0, "large": 1500.0}
RELIEF_MM = 300.0  # how far the centre of an object bulges towards the camera


@dataclass(frozen=True)
class Scene:
    """Everything needed to render the visual modalities of one sample."""

    attributes: dict[str, str]
    background: np.ndarray  # (size, size, 3) uint8
    color: np.ndarray  # (3,) float RGB of the object
    radius: float  # in pixels
    trajectory: np.ndarray  # (num_frames, 2) object centres (x, y) in pixels

    @property
    def image_size(self) -> int:
        return self.background.shape[0]

    @property
    def still_centre(self) -> tuple[float, float]:
        """Object centre in the still image and the depth / normal maps: the end of the trajectory (the last frame)."""
        x, y = self.trajectory[-1]
        return float(x), float(y)


def make_captions(attributes: dict[str, str]) -> list[str]:
    """All caption templates filled in with the sample's attributes."""
    return [template.format(**attributes) for template in CAPTION_TEMPLATES]


def shape_mask(shape: str, centre: tuple[float, float], radius: float, image_size: int) -> np.ndarray:
    """Boolean (image_size, image_size) mask of `shape` centred at `centre` (x, y) with half-extent `radius`."""
    mask = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask)
    x, y = centre
    r = radius
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif shape == "square":
        side = 0.85 * r  # roughly the area of the circle
        draw.rectangle((x - side, y - side, x + side, y + side), fill=255)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=255)
    elif shape == "cross":
        arm = 0.35 * r
        draw.rectangle((x - r, y - arm, x + r, y + arm), fill=255)
        draw.rectangle((x - arm, y - r, x + arm, y + r), fill=255)
    else:
        raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")
    return np.asarray(mask) > 127


def make_scene(attributes: dict[str, str], rng: np.random.Generator, image_size: int, num_frames: int) -> Scene:
    """Draw the random but caption-consistent details of a sample: background, exact colour and trajectory."""
    gray = rng.uniform(30, 70)
    background = gray + rng.normal(0.0, 3.0, size=(image_size, image_size, 1)) + rng.uniform(-8, 8, size=3)
    color = np.asarray(COLORS[attributes["color"]], dtype=np.float64) * rng.uniform(0.92, 1.05)
    radius = SIZES[attributes["size"]] * image_size * rng.uniform(0.95, 1.05)

    # From the centre to as far as the frame allows along the motion direction (so the positions alone, without their
    # order, tell the direction); jitter the position across it.
    half = image_size / 2
    reach = half - radius - 1
    direction = np.asarray(MOTIONS[attributes["motion"]], dtype=np.float64)
    across = np.abs(direction[::-1]) * rng.uniform(-0.15, 0.15) * reach
    steps = np.linspace(0.0, reach, num_frames)[:, None]
    trajectory = half + across + steps * direction
    return Scene(
        attributes=attributes,
        background=np.clip(background, 0, 255).astype(np.uint8),
        color=np.clip(color, 0, 255),
        radius=radius,
        trajectory=trajectory,
    )


def render_frame(scene: Scene, centre: tuple[float, float]) -> np.ndarray:
    """RGB uint8 image of the scene's object at `centre` over its background."""
    mask = shape_mask(scene.attributes["shape"], centre, scene.radius, scene.image_size)
    frame = scene.background.copy()
    frame[mask] = scene.color.astype(np.uint8)
    return frame


def _box_blur(values: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur with edge padding, used to turn a mask into a smooth relief."""
    width = 2 * radius + 1
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius + 1, radius)
        summed = np.cumsum(np.pad(values, pad, mode="edge"), axis=axis)
        values = (
            np.take(summed, range(width, summed.shape[axis]), axis=axis)
            - np.take(summed, range(0, summed.shape[axis] - width), axis=axis)
        ) / width
    return values


def object_relief(scene: Scene) -> np.ndarray:
    """Height of the still object's surface towards the camera, in [0, 1], zero outside the object."""
    mask = shape_mask(scene.attributes["shape"], scene.still_centre, scene.radius, scene.image_size)
    blur_radius = max(1, round(scene.radius / 3))
    relief = _box_blur(_box_blur(mask.astype(np.float64), blur_radius), blur_radius) * mask
    return relief / max(relief.max(), 1e-6)


def render_depth(scene: Scene, relief: np.ndarray) -> np.ndarray:
    """Depth map in millimetres (uint16): a receding background plane and the object in front of it."""
    top, bottom = BACKGROUND_DEPTH_MM
    depth = np.repeat(np.linspace(top, bottom, scene.image_size)[:, None], scene.image_size, axis=1)
    object_depth = OBJECT_DEPTH_MM[scene.attributes["size"]] - RELIEF_MM * relief
    depth = np.where(relief > 0, object_depth, depth)
    return np.round(depth).astype(np.uint16)


def render_normals(relief: np.ndarray, strength: float) -> np.ndarray:
    """RGB uint8 normal map of a relief: x right, y up, z towards the camera, encoded as (n + 1) / 2 * 255."""
    d_row, d_col = np.gradient(relief * strength)
    normals = np.stack([-d_col, d_row, np.ones_like(relief)], axis=-1)  # y points up, rows point down
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    return np.round((normals + 1.0) * 127.5).astype(np.uint8)


def synthesize_audio(attributes: dict[str, str], rng: np.random.Generator) -> np.ndarray:
    """One second of float32 mono audio at SAMPLE_RATE: the sample's timbre at its pitch, with its pattern."""
    t = np.arange(int(SAMPLE_RATE * CLIP_SECONDS)) / SAMPLE_RATE
    base = PITCHES[attributes["pitch"]] * rng.uniform(0.98, 1.02)
    pattern = attributes["pattern"]
    end = {"rising": base * GLIDE_RATIO, "falling": base / GLIDE_RATIO}.get(pattern, base)
    # Linear glide from `base` to `end`; the phase is the integral of the instantaneous frequency.
    phase = 2 * np.pi * (base * t + (end - base) * t**2 / (2 * CLIP_SECONDS)) + rng.uniform(0, 2 * np.pi)
    wave = sum(amplitude * np.sin(ratio * phase) for ratio, amplitude in TIMBRES[attributes["timbre"]])
    if pattern == "beeping":
        wave *= _smooth_gate((t * BEEP_RATE) % 1.0 < 0.5)
    wave *= _smooth_gate(np.ones_like(t, dtype=bool))  # fade in and out to avoid clicks
    wave = rng.uniform(0.3, 0.6) * wave / np.abs(wave).max() + rng.normal(0.0, 0.005, size=t.shape)
    return wave.astype(np.float32)


def _smooth_gate(gate: np.ndarray, ramp_seconds: float = 0.005) -> np.ndarray:
    """A 0/1 gate with its edges (and the clip's ends) smoothed by a short linear ramp."""
    ramp = max(1, int(ramp_seconds * SAMPLE_RATE))
    padded = np.pad(gate.astype(np.float64), ramp)
    kernel = np.ones(ramp) / ramp
    return np.convolve(np.convolve(padded, kernel, mode="same"), kernel, mode="same")[ramp:-ramp] * gate


def write_mp4(path: Path, frames: np.ndarray, fps: int, sound: np.ndarray | None = None) -> None:
    """Write (num_frames, H, W, 3) uint8 RGB frames (H and W even) as a reproducible H.264 yuv420p mp4, with `sound`
    (int16 mono samples at SAMPLE_RATE) as a lossless ALAC sound track when given."""
    av = require("av", "Writing the synthetic videos")
    with av.open(str(path), mode="w") as container:
        # Intra-only (keyint=1): x264's inter-frame coding of such small frames differed from run to run; every frame
        # being a key frame also makes random access cheap.
        options = {"crf": "18", "preset": "veryfast", "x264-params": "keyint=1"}
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        track = None if sound is None else container.add_stream("alac", rate=SAMPLE_RATE, layout="mono", format="s16p")
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
        if track is not None:
            samples = av.AudioFrame.from_ndarray(sound[None], format="s16p", layout="mono")
            samples.sample_rate = SAMPLE_RATE
            container.mux(track.encode(samples))
            container.mux(track.encode())


def write_png(path: Path, pixels: np.ndarray) -> None:
    """Write an image array (uint8 RGB, or uint16 single-channel) as a lossless PNG."""
    Image.fromarray(pixels).save(path)


@dataclass(frozen=True)
class Sample:
    """What the files of one sample are rendered from."""

    scene: Scene
    relief: np.ndarray
    audio: np.ndarray  # int16 samples, written as they are to the audio file and the video's sound track
    num_video_frames: int


def _write_image(path: Path, sample: Sample) -> None:
    write_png(path, render_frame(sample.scene, sample.scene.still_centre))


def _write_video(path: Path, sample: Sample) -> None:
    frames = np.stack([render_frame(sample.scene, tuple(centre)) for centre in sample.scene.trajectory])
    write_mp4(path, frames, fps=round(sample.num_video_frames / CLIP_SECONDS), sound=sample.audio)


def _write_audio(path: Path, sample: Sample) -> None:
    require("soundfile", "Writing the synthetic audio").write(path, sample.audio, SAMPLE_RATE, subtype="PCM_16")


def _write_depth(path: Path, sample: Sample) -> None:
    write_png(path, render_depth(sample.scene, sample.relief))


def _write_normal(path: Path, sample: Sample) -> None:
    write_png(path, render_normals(sample.relief, strength=sample.scene.radius))


# Modality (a name of the registry, `configuration_mico.BUILTIN_MODALITIES`) -> the extension and writer of its file.
# The formats are the generator's own lossless choices, not the registry's routing: depth is a 16-bit PNG in
# millimetres, so tools that route files by extension need `modality="depth"` for it (the registry routes `.png` to
# images); normal maps are 8-bit RGB PNGs.
WRITERS = {
    "image": (".png", _write_image),
    "video": (".mp4", _write_video),
    "audio": (".flac", _write_audio),
    "depth": (".png", _write_depth),
    "normal": (".png", _write_normal),
}
# The modalities the generator writes, in registry order.
MODALITIES = tuple(name for name in BUILTIN_MODALITIES if name in WRITERS)
if len(MODALITIES) != len(WRITERS):
    raise ImportError(f"synthetic writers {sorted(set(WRITERS) - set(MODALITIES))} are not registry modalities")


def split_combinations(num_train: int, num_test: int, rng: np.random.Generator) -> tuple[list[tuple], list[tuple]]:
    """Attribute tuples for both splits: distinct test tuples, absent from train, with distinct visual tuples first."""
    combinations = list(itertools.product(*ATTRIBUTES.values()))
    if num_test >= len(combinations):
        raise ValueError(f"num_test must be below the {len(combinations)} distinct attribute combinations.")
    test, seen, leftovers = [], set(), []
    for combo in (combinations[i] for i in rng.permutation(len(combinations))):
        visual_key = combo[: len(VISUAL_ATTRIBUTES)]
        if len(test) < num_test and visual_key not in seen:
            test.append(combo)
            seen.add(visual_key)
        else:
            leftovers.append(combo)
    extra = num_test - len(test)  # positive only when the test split outnumbers the visual combinations
    test += leftovers[:extra]
    train_pool = leftovers[extra:]
    train = [train_pool[i % len(train_pool)] for i in range(num_train)]  # repeats only past the combination count
    return train, test


def write_sample(
    output_dir: Path,
    sample_id: str,
    attributes: dict[str, str],
    rng: np.random.Generator,
    image_size: int,
    num_video_frames: int,
    modalities: tuple[str, ...],
) -> dict:
    """Render and save one sample's modalities; return its JSON row with paths relative to `output_dir`."""
    captions = make_captions(attributes)
    row = {
        "id": sample_id,
        "caption": captions[rng.integers(len(captions))],
        "captions": captions,
        "attributes": attributes,
    }
    scene = make_scene(attributes, rng, image_size, num_video_frames)
    audio = np.round(synthesize_audio(attributes, rng) * 32767).astype(np.int16)
    sample = Sample(scene, object_relief(scene), audio, num_video_frames)
    for modality in modalities:
        extension, write = WRITERS[modality]
        relative = f"{modality}/{sample_id}{extension}"
        write(output_dir / relative, sample)
        row[BUILTIN_MODALITIES[modality].column] = relative
    return row


def _created_files(output_dir: Path, overwrite: bool) -> set[str]:
    """The files (relative paths) a previous run wrote in `output_dir`, as its `dataset_info.json` lists them;
    refuses a non-empty `output_dir` unless `overwrite`."""
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"output_dir {str(output_dir)!r} exists and is not a directory.")
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return set()
    if not overwrite:
        raise FileExistsError(
            f"output_dir {str(output_dir)!r} is not empty; pass overwrite=True (--overwrite) to replace its "
            "synthetic data, or choose another directory."
        )
    try:
        return set(json.loads((output_dir / "dataset_info.json").read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()  # no previous synthetic data set here: nothing of ours to remove


def _merge_into(staging: Path, output_dir: Path, files: list[str], previous: set[str]) -> None:
    """Replace the previous run's files in `output_dir` by the staged ones; other files are kept (and never
    replaced: a staged file that would land on one of them is refused before anything moves)."""
    foreign = [name for name in files if (output_dir / name).exists() and name not in previous]
    if foreign:
        raise FileExistsError(
            f"output_dir {str(output_dir)!r} holds {foreign[0]!r}, which this generator did not create; move it or "
            "choose another directory."
        )
    for name in sorted(previous):
        path = output_dir / name
        if path.is_file() and ".." not in Path(name).parts:
            path.unlink()
    for name in files:
        (output_dir / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, output_dir / name)
    for modality in MODALITIES:
        directory = output_dir / modality
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


def _validate(
    num_samples: int,
    test_fraction: float,
    num_test: int | None,
    image_size: int,
    num_video_frames: int,
    modalities: tuple[str, ...],
) -> int:
    """Check the arguments of `make_synthetic_dataset` and return the number of test samples."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2 (one train and one test sample), got {num_samples!r}.")
    if num_test is None:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}.")
        num_test = min(max(1, round(num_samples * test_fraction)), num_samples - 1)
    elif not 1 <= num_test < num_samples:
        raise ValueError(f"num_test must be in [1, num_samples - 1] = [1, {num_samples - 1}], got {num_test!r}.")
    if image_size < 16 or image_size % 2:
        raise ValueError(
            f"image_size must be an even integer >= 16 (H.264 yuv420p needs even sizes), got {image_size}."
        )
    if num_video_frames < 2:
        raise ValueError(f"num_video_frames must be >= 2 to show motion, got {num_video_frames}.")
    unknown = sorted(set(modalities) - set(MODALITIES))
    if unknown or not modalities:
        raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got unknown {unknown or 'none'}.")
    return num_test


def make_synthetic_dataset(
    output_dir: str | Path,
    num_samples: int = 400,
    test_fraction: float = 0.2,
    num_test: int | None = None,
    seed: int = 0,
    image_size: int = 64,
    num_video_frames: int = 8,
    modalities: tuple[str, ...] | list[str] = MODALITIES,
    overwrite: bool = False,
) -> dict:
    """
    Generate a captioned synthetic omni-modal dataset with train and test splits.

    Writes `train.jsonl` and `test.jsonl` (one row per sample: `id`, `caption`, `captions`, `attributes` and one
    relative media path per modality), `dataset_info.json` (vocabulary and settings) and one sub-directory per
    modality under `output_dir`.

    Args:
        output_dir: where to write; must be empty or absent unless `overwrite`.
        num_samples: total number of samples over both splits (>= 2).
        test_fraction: share of samples in the test split, in (0, 1); ignored when `num_test` is given.
        num_test: exact number of test samples, overriding `test_fraction`.
        seed: seed of every random choice; the same seed gives the same files.
        image_size: side in pixels of images, video frames, depth and normal maps (even, >= 16).
        num_video_frames: frames per one-second video (so also its frame rate).
        modalities: which of "image", "video", "audio", "depth" and "normal" to write.
        overwrite: allow a non-empty `output_dir`: the files a previous run of this generator wrote there (listed in
            its `dataset_info.json`) are replaced; other files are kept, and never replaced.

    Returns:
        A dict with `output_dir`, `train_file`, `test_file`, `info_file`, `num_train`, `num_test`, `modalities` and
        `seconds` (generation time).
    """
    start = time.perf_counter()
    modalities = tuple(modalities)
    num_test = _validate(num_samples, test_fraction, num_test, image_size, num_video_frames, modalities)
    output_dir = Path(output_dir)
    previous = _created_files(output_dir, overwrite)
    num_train = num_samples - num_test
    settings = (seed, image_size, num_video_frames, modalities)
    if not previous and not (output_dir.is_dir() and any(output_dir.iterdir())):
        with atomic_output(output_dir) as partial:
            _write_dataset(partial, num_train, num_test, *settings)
    else:  # stage beside it, then swap only the previous run's files
        staging = output_dir.with_name(f".{output_dir.name}.partial-{os.getpid()}")
        remove_stale_partials(output_dir)
        shutil.rmtree(staging, ignore_errors=True)
        try:
            files = _write_dataset(staging, num_train, num_test, *settings)
            _merge_into(staging, output_dir, files, previous)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return {
        "output_dir": str(output_dir),
        "train_file": str(output_dir / "train.jsonl"),
        "test_file": str(output_dir / "test.jsonl"),
        "info_file": str(output_dir / "dataset_info.json"),
        "num_train": num_train,
        "num_test": num_test,
        "modalities": list(modalities),
        "seconds": time.perf_counter() - start,
    }


def _write_dataset(
    output_dir: Path,
    num_train: int,
    num_test: int,
    seed: int,
    image_size: int,
    num_video_frames: int,
    modalities: tuple[str, ...],
) -> list[str]:
    """Write the data set into the empty `output_dir`; returns the relative paths written (listed in
    `dataset_info.json` too, so that a later `overwrite` removes exactly these)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for modality in modalities:
        (output_dir / modality).mkdir()
    files = []
    splits = dict(zip(("train", "test"), split_combinations(num_train, num_test, np.random.default_rng(seed))))
    progress = tqdm(total=num_train + num_test, desc="Synthetic omni-modal data", unit="sample")
    for split_index, (split, combinations) in enumerate(splits.items()):
        with open(output_dir / f"{split}.jsonl", "w", encoding="utf-8") as file:
            for index, combination in enumerate(combinations):
                attributes = dict(zip(ATTRIBUTES, combination))
                rng = np.random.default_rng([seed, split_index, index])
                row = write_sample(
                    output_dir, f"{split}_{index:05d}", attributes, rng, image_size, num_video_frames, modalities
                )
                file.write(json.dumps(row) + "\n")
                files += [row[BUILTIN_MODALITIES[modality].column] for modality in modalities]
                progress.update()
        files.append(f"{split}.jsonl")
    progress.close()
    files.append("dataset_info.json")

    info = {
        "seed": seed,
        "num_train": num_train,
        "num_test": num_test,
        "modalities": list(modalities),
        "image_size": image_size,
        "num_video_frames": num_video_frames,
        "video_fps": round(num_video_frames / CLIP_SECONDS),
        "audio_sample_rate": SAMPLE_RATE,
        "clip_seconds": CLIP_SECONDS,
        "depth_unit": "millimetre",
        "normal_encoding": "RGB = (n + 1) / 2 * 255 with x right, y up, z towards the camera",
        "attributes": {name: list(values) for name, values in ATTRIBUTES.items()},
        "caption_templates": list(CAPTION_TEMPLATES),
        "files": sorted(files),
    }
    (output_dir / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return files
