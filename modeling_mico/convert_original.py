"""Import checkpoints of the original MiCo code (github.com/invictus717/MiCo) into this package's format.

Two layouts circulate:

* Hub layout: `config.json` (the original training hyper-parameters, *not* a Transformers config) next to
  `mico_pytorch_model.safetensors` or its pickle twin `mico_pytorch_model.bin`;
* repository layout: `ckpt/model_step_<N>.pt` (the largest N is used) next to `log/hps.json` (key `model_cfg`).

The key mapping is written once, as the table `KEY_MAPPING` of (original pattern, our pattern) pairs used in both
directions, so that exporting a converted state dict back gives the source tensors bit for bit.
"""

import functools
import json
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from transformers.configuration_utils import PreTrainedConfig
from transformers.utils import CONFIG_NAME, logging

from . import modeling_mico as modeling
from .configuration_mico import DEFAULT_FUSED_HEADS, MiCoConfig, resolve_modalities
from .modeling_mico import ORIGINAL_MODEL_TYPES, check_local_path, config_model_type, find_checkpoint_file
from .output_utils import atomic_output, check_output_path


logger = logging.get_logger(__name__)

HUB_WEIGHT_NAMES = ("mico_pytorch_model.safetensors", "mico_pytorch_model.bin")

# Keyword arguments of `from_pretrained` that say where files come from (consumed by the lookup of the checkpoint).
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")

# Frame tables the original loader resamples to the configured number of frames (never depth's).
RESAMPLED_FRAME_TABLES = ("vision", "audio")

# Converted keys are in the head layout: the base model's weights under this prefix, the language-model head beside it.
BASE_MODEL_PREFIX = "mico."

# (original name, our name); `{i}` is a layer index, `{m}` a knowledge modality, `{h}` a fused head.
KEY_MAPPING: list[tuple[str, str]] = [
    ("vision_encoder.visual.patch_embed.proj.{p}", "mico.vision_model.embeddings.patch_embedding.{p}"),
    ("vision_encoder.visual.cls_token", "mico.vision_model.embeddings.class_embedding"),
    ("vision_encoder.visual.pos_embed", "mico.vision_model.embeddings.position_embedding"),
    ("vision_encoder.visual.blocks.{i}.norm1.{p}", "mico.vision_model.encoder.layers.{i}.layer_norm1.{p}"),
    ("vision_encoder.visual.blocks.{i}.norm2.{p}", "mico.vision_model.encoder.layers.{i}.layer_norm2.{p}"),
    ("vision_encoder.visual.blocks.{i}.attn.qkv.weight", "mico.vision_model.encoder.layers.{i}.self_attn.qkv.weight"),
    ("vision_encoder.visual.blocks.{i}.attn.q_bias", "mico.vision_model.encoder.layers.{i}.self_attn.q_bias"),
    ("vision_encoder.visual.blocks.{i}.attn.v_bias", "mico.vision_model.encoder.layers.{i}.self_attn.v_bias"),
    ("vision_encoder.visual.blocks.{i}.attn.proj.{p}", "mico.vision_model.encoder.layers.{i}.self_attn.proj.{p}"),
    ("vision_encoder.visual.blocks.{i}.mlp.fc1.{p}", "mico.vision_model.encoder.layers.{i}.mlp.fc1.{p}"),
    ("vision_encoder.visual.blocks.{i}.mlp.fc2.{p}", "mico.vision_model.encoder.layers.{i}.mlp.fc2.{p}"),
    ("vision_encoder.visual.norm.{p}", "mico.vision_model.post_layernorm.{p}"),
    ("multimodal_encoder.bert.embeddings.{rest}", "mico.text_model.embeddings.{rest}"),
    ("multimodal_encoder.bert.encoder.layer.{rest}", "mico.text_model.encoder.layer.{rest}"),
    ("multimodal_encoder.cls.predictions.transform.dense.{p}", "lm_head.dense.{p}"),
    ("multimodal_encoder.cls.predictions.transform.LayerNorm.{p}", "lm_head.LayerNorm.{p}"),
    ("multimodal_encoder.cls.predictions.decoder.{p}", "lm_head.decoder.{p}"),
    ("contra_head_t.linear.weight", "mico.contrastive_heads.text.weight"),
    ("contra_head_s.linear.weight", "mico.contrastive_heads.subtitle.weight"),
    ("contra_head_v.linear.weight", "mico.contrastive_heads.vision.weight"),
    ("contra_head_a.linear.weight", "mico.contrastive_heads.audio.weight"),
    ("contra_head_d.linear.weight", "mico.contrastive_heads.depth.weight"),
    ("contra_head_{h}.{p}", "mico.fused_heads.{h}.{p}"),
    ("contra_temp", "mico.temperature"),
    ("itm_head.linear1.{p}", "mico.itm_head.dense.{p}"),
    ("itm_head.layernorm.{p}", "mico.itm_head.layer_norm.{p}"),
    ("itm_head.linear2.{p}", "mico.itm_head.classifier.{p}"),
    ("{m}_frame_embedding", "mico.frame_embeddings.{m}"),
    ("{m}_type_embeddings", "mico.type_embeddings.{m}"),
    ("hidden_trans_{m}_multimodal.0.{p}", "mico.modality_bridges.{m}.dense.{p}"),
    ("hidden_trans_{m}_multimodal.1.{p}", "mico.modality_bridges.{m}.layer_norm.{p}"),
]

# Keys of the original file that MiCo never uses.
UNUSED_KEY_PATTERNS = (
    r"vision_encoder\.text\..*",
    r"vision_encoder\.logit_scale",
    r"vision_encoder\.visual\.head\..*",
    r"multimodal_encoder\.bert\.embeddings\.position_ids",
)

# Tied tensors stored twice: our name -> (first copy, decoder copy). The original loads both into one parameter and
# the decoder's copy, loaded last, is the value it runs with.
TIED_GROUPS = {
    "mico.text_model.embeddings.word_embeddings.weight": (
        "multimodal_encoder.bert.embeddings.word_embeddings.weight",
        "multimodal_encoder.cls.predictions.decoder.weight",
    ),
    "lm_head.decoder.bias": (
        "multimodal_encoder.cls.predictions.bias",
        "multimodal_encoder.cls.predictions.decoder.bias",
    ),
}
_TIED_KEYS = {key: name for name, keys in TIED_GROUPS.items() for key in keys}

_PLACEHOLDERS = {"i": r"\d+", "p": r"weight|bias", "rest": r".+", "m": r"[a-z]+", "h": r"[a-z]+"}

# EVA-CLIP towers this package implements, by the original `vision_encoder_type`: (head width, config file name).
EVA_TOWERS = {"evaclip01_giant": 88}
BERT_BASE_HEADS = 12


def _pattern(template: str) -> re.Pattern:
    """Compile a mapping template into a regex with one named group per placeholder."""
    regex = re.escape(template)
    for name, group in _PLACEHOLDERS.items():
        regex = regex.replace(re.escape("{" + name + "}"), f"(?P<{name}>{group})")
    return re.compile(regex + r"\Z")


_FORWARD = [(_pattern(src), dst) for src, dst in KEY_MAPPING]
_BACKWARD = [(_pattern(dst), src) for src, dst in KEY_MAPPING]


def _rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in rules:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict())
    return None


def original_to_hf_key(key: str) -> str | None:
    """Our name for an original (final, renamed) key, or `None` when the table does not cover it."""
    return _rename(key, _FORWARD)


def hf_to_original_key(key: str) -> str | None:
    """The original name of one of our keys, or `None` when the table does not cover it."""
    return _rename(key, _BACKWARD)


def rename_legacy_key(key: str) -> tuple[str, bool]:
    """Apply the original loader's three exclusive renames; returns the new key and whether a rule matched.

    A key containing `video` gets every `video` replaced by `vision` (and no other rule); else `evaclip_model` becomes
    `vision_encoder`; else `clip_model` becomes `vision_encoder`. The loader casts only unmatched keys to float32.
    """
    if "video" in key:
        return key.replace("video", "vision"), True
    if "evaclip_model" in key:
        return key.replace("evaclip_model", "vision_encoder"), True
    if "clip_model" in key:
        return key.replace("clip_model", "vision_encoder"), True
    return key, False


# --------------------------------------------------------------------------------------------------------------------
# Locating and reading original checkpoints
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class OriginalCheckpoint:
    """Where an original checkpoint's weights and hyper-parameters live."""

    weights: Path
    hyper_parameters: dict
    layout: str
    config_file: Path | None = None  # where the hyper-parameters were read, for error messages


def _latest_step_file(ckpt_dir: Path) -> Path:
    steps = {}
    for path in ckpt_dir.glob("model_step_*.pt"):
        match = re.fullmatch(r"model_step_(\d+)\.pt", path.name)
        if match:
            steps[int(match.group(1))] = path
    if not steps:
        raise FileNotFoundError(f"{ckpt_dir} holds no ckpt/model_step_<N>.pt file")
    return steps[max(steps)]


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object of hyper-parameters, not a {type(content).__name__}")
    return content


def find_original_checkpoint(source: str | os.PathLike, config_path: str | os.PathLike | None = None):
    """Describe the original checkpoint at `source` (a directory of either layout, or a single weight file together
    with `config_path`); `None` when `source` is not an original-layout directory."""
    source = Path(source)
    if source.is_file():
        if config_path is None:
            raise ValueError(f"{source} is a single checkpoint file: pass its hyper-parameters with --config")
        hyper_parameters = _read_json(Path(config_path))
        return OriginalCheckpoint(
            source, hyper_parameters.get("model_cfg", hyper_parameters), "file", Path(config_path)
        )
    if not source.is_dir():
        return None
    for name in HUB_WEIGHT_NAMES:
        if (source / name).is_file():
            config_file = Path(config_path) if config_path else source / CONFIG_NAME
            if not config_file.is_file():
                raise FileNotFoundError(f"{source} has {name} but no config.json with the original hyper-parameters")
            if config_model_type(str(config_file)) not in ORIGINAL_MODEL_TYPES:
                return None  # a Transformers directory that happens to hold an original weight file too
            return OriginalCheckpoint(source / name, _read_json(config_file), "hub", config_file)
    if (source / "ckpt").is_dir() and (source / "log" / "hps.json").is_file():
        hps = _read_json(source / "log" / "hps.json")
        if "model_cfg" not in hps:
            raise ValueError(f"{source / 'log' / 'hps.json'} has no `model_cfg` entry")
        return OriginalCheckpoint(
            _latest_step_file(source / "ckpt"), hps["model_cfg"], "repo", source / "log/hps.json"
        )
    return None


def _safetensors_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as handle:
        try:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
        except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a valid safetensors file: {error}") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a valid safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    try:
        data_size = max((info["data_offsets"][1] for info in header.values()), default=0)
    except (KeyError, IndexError, TypeError) as error:
        raise ValueError(f"{path} is not a valid safetensors file: malformed tensor entry ({error})") from error
    if path.stat().st_size < 8 + header_size + data_size:
        raise ValueError(
            f"{path} is truncated: {path.stat().st_size} bytes, but its header describes {8 + header_size + data_size}"
        )
    return header, 8 + header_size


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Read one tensor at a time with plain file reads (no memory map), so memory stays at one tensor."""
    header, data_start = _safetensors_header(path)
    with open(path, "rb") as handle:
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            handle.seek(data_start + begin)
            buffer = bytearray(handle.read(end - begin))
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
            yield name, tensor.reshape(info["shape"])


def _iter_pickle(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Load a `.pt`/`.bin` state dict with `weights_only=True` (memory-mapped when the file allows it)."""
    try:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip archive (legacy format): no memory map
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{path} is not a plain tensor state dict loadable with weights_only=True: {error}"
        ) from error
    if isinstance(state_dict, dict) and "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state_dict).__name__})")
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        yield name, tensor


def iter_original_tensors(weights: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream `(key, tensor)` pairs from an original weight file of any supported format."""
    if weights.suffix == ".safetensors":
        return _iter_safetensors(weights)
    return _iter_pickle(weights)


# --------------------------------------------------------------------------------------------------------------------
# Configuration from hyper-parameters and tensor shapes
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _ShapeSummary:
    """Sizes read off the tensors of an original checkpoint."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def get(self, key: str) -> tuple[int, ...]:
        if key not in self.shapes:
            raise ValueError(f"the checkpoint has no tensor {key!r}")
        return self.shapes[key]

    def count(self, regex: str) -> int:
        pattern = re.compile(regex)
        return len({pattern.match(key).group(1) for key in self.shapes if pattern.match(key)})


def _vision_heads(hyper_parameters: dict, width: int) -> int:
    eva_config = hyper_parameters.get("evaclip_model_cfg")
    if eva_config:
        return eva_config["vision_cfg"]["width"] // eva_config["vision_cfg"]["head_width"]
    encoder_type = hyper_parameters.get("vision_encoder_type", "evaclip01_giant")
    if encoder_type not in EVA_TOWERS:
        raise ValueError(
            f"vision_encoder_type {encoder_type!r} is not supported; this package implements {sorted(EVA_TOWERS)}"
        )
    return width // EVA_TOWERS[encoder_type]


def config_from_original(
    hyper_parameters: dict,
    shapes: dict[str, tuple[int, ...]],
    image_size: int | None = None,
    num_frames: int | None = None,
) -> MiCoConfig:
    """Build a `MiCoConfig` from original hyper-parameters, reading sizes from the (renamed) tensor shapes."""
    summary = _ShapeSummary(shapes)
    vision_width = summary.get("vision_encoder.visual.pos_embed")[2]
    patch_size = summary.get("vision_encoder.visual.patch_embed.proj.weight")[-1]
    text_vocab, text_width = summary.get("multimodal_encoder.bert.embeddings.word_embeddings.weight")
    projection_dim = summary.get("contra_head_t.linear.weight")[0]
    if "contra_dim" in hyper_parameters and hyper_parameters["contra_dim"] != projection_dim:
        raise ValueError(f"contra_dim is {hyper_parameters['contra_dim']!r} but the heads project to {projection_dim}")
    bert_config = hyper_parameters.get("bert_config") or {}
    if bert_config.get("hidden_size", text_width) != text_width:
        raise ValueError(
            f"bert_config.hidden_size is {bert_config['hidden_size']} but the embeddings are {text_width} wide"
        )

    modalities = {}
    for key, shape in shapes.items():
        match = re.fullmatch(r"([a-z]+)_frame_embedding", key)
        if match:
            encoder = match.group(1)
            resampled = encoder in RESAMPLED_FRAME_TABLES
            modalities[encoder] = (resampled and hyper_parameters.get(f"max_{encoder}_sample_num")) or shape[1]
    if num_frames is not None:
        modalities["vision"] = num_frames
    # knowledge modalities in the registry's context order; fused heads as the registry declares them
    context_order = dict.fromkeys(spec.encoder for spec in resolve_modalities(modalities).values())
    ordered = {encoder: modalities[encoder] for encoder in context_order}
    fused = {
        name: list(parts) for name, parts in DEFAULT_FUSED_HEADS.items() if f"contra_head_{name}.weight" in shapes
    }
    vision_config = {
        "hidden_size": vision_width,
        "intermediate_size": summary.get("vision_encoder.visual.blocks.0.mlp.fc1.weight")[0],
        "num_hidden_layers": summary.count(r"vision_encoder\.visual\.blocks\.(\d+)\."),
        "num_attention_heads": _vision_heads(hyper_parameters, vision_width),
        "image_size": image_size or hyper_parameters.get("vision_resolution", 224),
        "patch_size": patch_size,
    }
    text_config = {
        "vocab_size": text_vocab,
        "hidden_size": text_width,
        "num_hidden_layers": summary.count(r"multimodal_encoder\.bert\.encoder\.layer\.(\d+)\."),
        "num_attention_heads": bert_config.get("num_attention_heads", BERT_BASE_HEADS),
        "intermediate_size": summary.get("multimodal_encoder.bert.encoder.layer.0.intermediate.dense.weight")[0],
        "max_position_embeddings": summary.get("multimodal_encoder.bert.embeddings.position_embeddings.weight")[0],
        "type_vocab_size": summary.get("multimodal_encoder.bert.embeddings.token_type_embeddings.weight")[0],
    }
    return MiCoConfig(
        vision_config=vision_config,
        text_config=text_config,
        projection_dim=projection_dim,
        knowledge_modalities=ordered,
        fused_heads=fused,
        pool_video=bool(hyper_parameters.get("pool_video", False)),
        max_caption_length=hyper_parameters.get("max_caption_len", 40),
        max_subtitle_length=hyper_parameters.get("max_subtitle_len", 70),
        itm_loss_weight=hyper_parameters.get("itm_ratio", 0.1),
    )


# --------------------------------------------------------------------------------------------------------------------
# Tensor conversion
# --------------------------------------------------------------------------------------------------------------------


def _resize_frame_table(table: torch.Tensor, frames: int) -> torch.Tensor:
    """Nearest-neighbour resampling along the frame axis, as the original loader does."""
    if table.shape[1] == frames:
        return table
    return F.interpolate(table.permute(0, 2, 1), frames, mode="nearest").permute(0, 2, 1)


def _resize_position_embedding(position_embedding: torch.Tensor, grid: int) -> torch.Tensor:
    """Bilinear interpolation of the patch grid (class token kept, `align_corners=False`)."""
    width = position_embedding.shape[-1]
    old_grid = round((position_embedding.shape[1] - 1) ** 0.5)
    if old_grid == grid:
        return position_embedding
    class_token, patches = position_embedding[0, :1], position_embedding[0, 1:]
    patches = patches.reshape(old_grid, old_grid, width).permute(2, 0, 1).unsqueeze(0)
    patches = F.interpolate(patches, (grid, grid), mode="bilinear", align_corners=False)
    patches = patches[0].permute(1, 2, 0).reshape(-1, width)
    return torch.cat([class_token, patches], dim=0).unsqueeze(0)


@dataclass
class ConversionReport:
    """What a conversion dropped, so that callers can list it."""

    dropped: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)


def _renamed_tensors(weights: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Original tensors under their final names, cast as the original loader casts them."""
    for key, tensor in iter_original_tensors(weights):
        new_key, matched = rename_legacy_key(key)
        yield new_key, tensor if matched else tensor.float()


def read_original_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor under its final (renamed) name, read without loading safetensors data."""
    if weights.suffix == ".safetensors":
        header, _ = _safetensors_header(weights)
        # data-offset order: the order `_iter_safetensors` streams in, so that shards are planned in stream order
        ordered = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        items = ((key, tuple(info["shape"])) for key, info in ordered)
    else:
        items = ((key, tuple(tensor.shape)) for key, tensor in iter_original_tensors(weights))
    return {rename_legacy_key(key)[0]: shape for key, shape in items}


def convert_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]], config: MiCoConfig, report: ConversionReport | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Map renamed original tensors to our names, resizing frame tables and the position embedding to `config`.

    Tied copies are emitted once (the decoder's copy, as the original runs with it); unused keys are dropped and
    listed in `report`; any other unmapped key is an error naming it. Resizing happens in the stored dtype, as in
    the original loader.
    """
    report = report if report is not None else ConversionReport()
    grid = config.vision_config.image_size // config.vision_config.patch_size
    tied: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors:
        if key in _TIED_KEYS:
            name = _TIED_KEYS[key]
            tied.setdefault(name, {})[key] = tensor
            if len(tied[name]) == len(TIED_GROUPS[name]):
                yield name, _resolve_tied(name, tied.pop(name), report)
            continue
        if any(re.fullmatch(pattern, key) for pattern in UNUSED_KEY_PATTERNS):
            report.dropped.append(key)
            continue
        new_key = original_to_hf_key(key)
        if new_key is None:
            raise KeyError(f"unexpected key {key!r} in the original checkpoint: no mapping covers it")
        yield new_key, _resize_to_config(key, new_key, tensor, config, grid, report)
    for name, copies in tied.items():
        yield name, _resolve_tied(name, copies, report)


def _resolve_tied(name: str, copies: dict[str, torch.Tensor], report: ConversionReport) -> torch.Tensor:
    """The value the original runs with: the decoder copy when both are stored."""
    first, decoder = TIED_GROUPS[name]
    if first in copies and decoder in copies:
        report.dropped.append(f"{first} (tied copy of {decoder})")
        if copies[decoder].device.type != "meta" and not torch.equal(copies[first], copies[decoder]):
            report.resized.append(f"{name}: stored copies differ; using {decoder} as the original does")
        return copies[decoder]
    return next(iter(copies.values()))


def _resize_to_config(
    key: str, new_key: str, tensor: torch.Tensor, config: MiCoConfig, grid: int, report: ConversionReport
) -> torch.Tensor:
    """Resample frame tables (vision and audio, not depth) and the position embedding when the config differs."""
    new_key = new_key.removeprefix(BASE_MODEL_PREFIX)
    if new_key.startswith("frame_embeddings."):
        modality = new_key.split(".", 1)[1]
        frames = config.knowledge_modalities.get(modality)
        if frames is None:
            raise KeyError(f"{key!r} belongs to modality {modality!r}, which the configuration does not have")
        if modality in RESAMPLED_FRAME_TABLES and frames != tensor.shape[1]:
            report.resized.append(f"{key}: {tensor.shape[1]} -> {frames} frames")
            return _resize_frame_table(tensor, frames)
    elif new_key == "vision_model.embeddings.position_embedding" and round((tensor.shape[1] - 1) ** 0.5) != grid:
        report.resized.append(f"{key}: grid {round((tensor.shape[1] - 1) ** 0.5)} -> {grid}")
        return _resize_position_embedding(tensor, grid)
    return tensor


def export_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict back under the original's final key names, tied duplicates included."""
    exported = {}
    for key, tensor in state_dict.items():
        original_key = hf_to_original_key(key)
        if original_key is None:
            raise KeyError(f"{key!r} has no original counterpart")
        exported[original_key] = tensor
    for first, decoder in TIED_GROUPS.values():
        source = exported.get(first, exported.get(decoder))
        if source is not None:
            exported.setdefault(first, source)
            exported.setdefault(decoder, source)
    return exported


def open_original_checkpoint(
    source: str | os.PathLike,
    config_path: str | os.PathLike | None = None,
    image_size: int | None = None,
    num_frames: int | None = None,
) -> tuple[OriginalCheckpoint, MiCoConfig]:
    """Locate an original checkpoint (local path or Hub repo id) and derive its `MiCoConfig` from tensor shapes."""
    if config_path is not None or Path(source).is_file():
        checkpoint = find_original_checkpoint(source, config_path)
    else:
        checkpoint = locate_original_checkpoint(source)
    if checkpoint is None:
        raise FileNotFoundError(
            f"{source} is not an original MiCo checkpoint ({ORIGINAL_LAYOUTS}, or a weight file with --config)"
        )
    shapes = read_original_shapes(checkpoint.weights)
    if not isinstance(checkpoint.hyper_parameters, dict):
        raise ValueError(f"{checkpoint.config_file}: `model_cfg` must be a JSON object of hyper-parameters")
    try:
        return checkpoint, config_from_original(checkpoint.hyper_parameters, shapes, image_size, num_frames)
    except (KeyError, TypeError, AttributeError, ValueError, StrictDataclassError) as error:
        detail = f"missing entry {error}" if isinstance(error, KeyError) else " ".join(str(error).split())
        raise ValueError(
            f"{checkpoint.config_file} does not describe {checkpoint.weights} (malformed hyper-parameters): {detail}"
        ) from error


def load_original_checkpoint(
    source: str | os.PathLike,
    config_path: str | os.PathLike | None = None,
    image_size: int | None = None,
    num_frames: int | None = None,
) -> tuple[MiCoConfig, dict[str, torch.Tensor], ConversionReport]:
    """Read an original checkpoint into `(config, state dict under our names, report)`."""
    checkpoint, config = open_original_checkpoint(source, config_path, image_size, num_frames)
    report = ConversionReport()
    state_dict = dict(convert_tensors(_renamed_tensors(checkpoint.weights), config, report))
    logger.info(f"Converted {checkpoint.weights} ({checkpoint.layout} layout); dropped {len(report.dropped)} keys")
    return config, state_dict, report


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse a state dict that misses a parameter of `model`, has an extra key, or has a wrong shape. A state dict
    without any language-model head key (`lm_head.*`) is accepted without that head."""
    expected = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = sorted(set(expected) - set(state_dict) - tied)
    if not any(key.startswith("lm_head.") for key in state_dict):
        missing = [key for key in missing if not key.startswith("lm_head.")]
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        raise KeyError(f"the converted checkpoint does not fill {missing}")
    if unexpected:
        raise KeyError(f"the converted checkpoint has keys the model does not have: {unexpected}")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{key}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(expected[key].shape)}"
            )


# --------------------------------------------------------------------------------------------------------------------
# Loading original checkpoints through `from_pretrained` and the Auto classes
# --------------------------------------------------------------------------------------------------------------------

ORIGINAL_LAYOUTS = f"config.json + {' or '.join(HUB_WEIGHT_NAMES)}, or ckpt/model_step_<N>.pt + log/hps.json"


def locate_original_checkpoint(
    name_or_path: str | os.PathLike, hub_kwargs: dict | None = None
) -> OriginalCheckpoint | None:
    """The original checkpoint at a local directory or a Hub repository (Hub layout only), `None` when it is not one.
    `hub_kwargs` are `from_pretrained`'s hub options; their `revision` is resolved to a commit in place.

    For a Hub repository, the config.json is read first (from the cache once `from_pretrained` has fetched it) and the
    weights are fetched only when it holds original hyper-parameters (no `model_type`, or the original's `"vast"`).
    Errors (unreachable Hub, missing repository, unreadable files) propagate with their cause."""
    hub_kwargs = {} if hub_kwargs is None else hub_kwargs
    path = check_local_path(name_or_path)
    if os.path.isdir(path):
        return find_original_checkpoint(os.path.join(path, hub_kwargs.get("subfolder") or ""))
    config_file = find_checkpoint_file(path, CONFIG_NAME, hub_kwargs)
    if config_file is None or config_model_type(config_file) not in ORIGINAL_MODEL_TYPES:
        return None
    for name in HUB_WEIGHT_NAMES:
        weights = find_checkpoint_file(path, name, hub_kwargs)
        if weights is not None:
            return OriginalCheckpoint(Path(weights), _read_json(Path(config_file)), "hub", Path(config_file))
    return None


def load_original_model(model_class, name_or_path: str | os.PathLike, *model_args, **kwargs):
    """`model_class.from_pretrained` for an original checkpoint: converts it in memory and loads the converted state
    dict with Transformers' own loading (so `dtype`, `device_map`, `attn_implementation`, ... work as usual). A
    `config` (a `MiCoConfig`, e.g. from `AutoConfig`) is used as given; by default it is derived from the checkpoint.
    Installed into the model classes by `install_original_checkpoint_support`."""
    checkpoint = locate_original_checkpoint(
        name_or_path, {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
    )
    if checkpoint is None:
        raise FileNotFoundError(
            f"{name_or_path} is neither a MiCo checkpoint nor an original one ({ORIGINAL_LAYOUTS})"
        )
    config = kwargs.pop("config", None)
    if config is None:
        config = config_from_original(checkpoint.hyper_parameters, read_original_shapes(checkpoint.weights))
    elif not isinstance(config, MiCoConfig):
        raise TypeError(f"config must be a MiCoConfig for an original MiCo checkpoint, got {type(config).__name__}")
    report = ConversionReport()
    state_dict = dict(convert_tensors(_renamed_tensors(checkpoint.weights), config, report))
    if kwargs.get("dtype", kwargs.get("torch_dtype")) in (None, "auto"):
        kwargs.pop("torch_dtype", None)
        kwargs["dtype"] = torch.float32  # the original runs in float32 (legacy float16 tensors are cast)
    output_loading_info = kwargs.pop("output_loading_info", False)
    model, info = model_class.from_pretrained(
        None, *model_args, config=config, state_dict=state_dict, output_loading_info=True, **kwargs
    )
    if info["missing_keys"]:
        raise KeyError(f"the converted checkpoint does not fill {sorted(info['missing_keys'])}")
    if info["mismatched_keys"]:
        raise ValueError(f"the converted checkpoint has tensors of the wrong shape: {sorted(info['mismatched_keys'])}")
    logger.warning(
        f"Loaded the original MiCo checkpoint {name_or_path} by converting it on the fly ({len(report.dropped)} unused "
        "keys dropped); convert it once with conversion/convert_mico_original_to_hf.py to skip this step."
    )
    return (model, info) if output_loading_info else model


def _route_original_checkpoints(wrapped):
    """Wrap an Auto model class's `from_pretrained` (see `install_original_checkpoint_support`)."""

    @functools.wraps(wrapped)
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        if isinstance(kwargs.get("config"), PreTrainedConfig) or not isinstance(
            pretrained_model_name_or_path, (str, os.PathLike)
        ):
            return wrapped(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        path = check_local_path(pretrained_model_name_or_path)
        if os.path.isdir(path):
            if find_original_checkpoint(os.path.join(path, kwargs.get("subfolder") or "")) is None:
                return wrapped(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        else:
            try:
                return wrapped(cls, pretrained_model_name_or_path, *model_args, **kwargs)
            except ValueError:  # "Unrecognized model" / unknown model_type: maybe an original Hub repository
                hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
                if locate_original_checkpoint(path, hub_kwargs) is None:
                    raise
                kwargs["revision"] = hub_kwargs["revision"]  # resolved once
        return cls._model_mapping[MiCoConfig].from_pretrained(path, *model_args, **kwargs)

    from_pretrained.wraps_original_checkpoints = True
    return from_pretrained


def install_original_checkpoint_support(*auto_classes) -> None:
    """Let every MiCo class, and the Auto model classes given (those mapping `MiCoConfig`), load original checkpoints.
    Dependency inversion: the model code exposes a loader slot and never imports this module.

    The Auto classes' `from_pretrained` is extended for what Transformers cannot read, a config.json of training
    hyper-parameters or none at all: a local original directory is recognised by its files before anything is read; a
    Hub repository in the original layout only after Transformers refused its config.json, so no other load pays for
    the check. Both go to the MiCo class the Auto class maps to. A local-looking path that does not exist fails at
    once with "no such directory" instead of being tried on the Hub (with retries) as a repository id. Every other
    call, and every other error, is Transformers' own."""
    modeling.original_checkpoint_loader = load_original_model
    for auto_class in auto_classes:
        wrapped = auto_class.from_pretrained.__func__
        if not getattr(wrapped, "wraps_original_checkpoints", False):
            auto_class.from_pretrained = classmethod(_route_original_checkpoints(wrapped))


# --------------------------------------------------------------------------------------------------------------------
# Writing a Transformers directory
# --------------------------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / an integer number of bytes -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size must look like '5GB', '500MB' or a byte count, got {size!r}")
    return int(float(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)])


def _plan_shards(names_and_sizes: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Group tensors, in stream order, into shards of at most `max_shard_size` bytes (a larger tensor stands alone)."""
    shards: list[list[str]] = [[]]
    current = 0
    for name, size in names_and_sizes:
        if shards[-1] and current + size > max_shard_size:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += size
    return shards


def _dry_run(checkpoint: OriginalCheckpoint, config: MiCoConfig, dtype: torch.dtype) -> list[tuple[str, int]]:
    """Names and byte sizes of the converted tensors, in stream order, checked against the model with every head
    (whatever the weight layout) - before any tensor data is read or written."""
    from .modeling_mico import MiCoForPreTraining

    shapes = read_original_shapes(checkpoint.weights)
    meta_tensors = ((key, torch.empty(shape, device="meta")) for key, shape in shapes.items())
    converted = dict(convert_tensors(meta_tensors, config))
    with torch.device("meta"):
        model = MiCoForPreTraining(config)
    check_state_dict(model, converted)
    return [(key, value.numel() * dtype.itemsize) for key, value in converted.items()]


def _write_shards(
    checkpoint: OriginalCheckpoint,
    config: MiCoConfig,
    output_dir: Path,
    dtype: torch.dtype,
    plan: list[list[str]],
    report: ConversionReport,
) -> list[Path]:
    """Stream tensors from the source into the planned safetensors shards, holding at most one shard in memory."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    shard_of = {name: index for index, names in enumerate(plan) for name in names}
    file_names = (
        ["model.safetensors"]
        if len(plan) == 1
        else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    )
    pending: dict[int, dict[str, torch.Tensor]] = {}
    written = []
    stream = convert_tensors(_renamed_tensors(checkpoint.weights), config, report)
    for name, tensor in tqdm(stream, total=len(shard_of), desc="Converting", unit="tensor"):
        index = shard_of[name]
        pending.setdefault(index, {})[name] = tensor.to(dtype).contiguous()
        if len(pending[index]) == len(plan[index]):
            save_file(pending.pop(index), output_dir / file_names[index], metadata={"format": "pt"})
            written.append(output_dir / file_names[index])
    if len(plan) > 1:
        index = {
            "metadata": {"total_size": sum(path.stat().st_size for path in written)},
            "weight_map": {name: file_names[shard_of[name]] for name in shard_of},
        }
        (output_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return written


def _save_code_and_config(config: MiCoConfig, output_dir: Path) -> None:
    """config.json with `auto_map` for every head class, plus the package's model code for remote loading."""
    from transformers.dynamic_module_utils import custom_object_save

    from .modeling_mico import MiCoModel

    with torch.device("meta"):
        model = MiCoModel(config)
    config.auto_map = model.auto_map_for_heads()
    custom_object_save(model, output_dir, config=config)
    config.save_pretrained(output_dir)


def _save_processing(output_dir: Path, tokenizer_dir: str | os.PathLike | None, config: MiCoConfig) -> None:
    """Tokenizer and processor files (the bundled BERT vocabulary unless `tokenizer_dir` is given)."""
    from transformers import AutoTokenizer

    from .image_processing_mico import MiCoImageProcessor
    from .processing_mico import MiCoProcessor

    processor = MiCoProcessor(
        image_processor=MiCoImageProcessor(image_size=config.vision_config.image_size),
        tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else None,
        max_length=config.max_caption_length,
    )
    processor.save_pretrained(output_dir)


def _save_generation_config(config: MiCoConfig, hyper_parameters: dict, output_dir: Path) -> None:
    from .generation_mico import default_generation_config

    generation_config = default_generation_config(config)
    generation_config.num_beams = hyper_parameters.get("beam_size", generation_config.num_beams)
    generation_config.save_pretrained(output_dir)


def convert_original_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    config_path: str | os.PathLike | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: str = "float32",
    image_size: int | None = None,
    num_frames: int | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> ConversionReport:
    """Convert an original checkpoint (either layout, a local path or Hub repo id, or a single file with
    `config_path`) into a Transformers directory: config, sharded safetensors, tokenizer and processor files,
    generation config and the model code (`auto_map`).

    The directory is written atomically (see `output_utils.atomic_output`): `overwrite` replaces a previous
    output entirely, and an output inside, over or around the source checkpoint is refused."""
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    inputs = (source, config_path, tokenizer_dir)
    check_output_path(output_dir, inputs, overwrite)  # before reading gigabytes
    checkpoint, config = open_original_checkpoint(source, config_path, image_size, num_frames)
    config.dtype = dtype
    plan = _plan_shards(_dry_run(checkpoint, config, _DTYPES[dtype]), parse_size(max_shard_size))
    report = ConversionReport()
    with atomic_output(output_dir, (*inputs, checkpoint.weights), overwrite) as partial:
        _write_shards(checkpoint, config, partial, _DTYPES[dtype], plan, report)
        _save_code_and_config(config, partial)
        _save_generation_config(config, checkpoint.hyper_parameters, partial)
        _save_processing(partial, tokenizer_dir, config)
    logger.info(f"Converted {checkpoint.weights} into {output_dir}; dropped: {report.dropped}")
    return report


MODEL_CARD = """---
license: apache-2.0
library_name: transformers
tags: [mico, omni-modal, retrieval, captioning, custom_code]
---

# MiCo ({source})

MiCo (arXiv 2406.09412, "Explore the Limits of Omni-modal Pretraining at Scale") encodes images, video, audio, depth
and normal maps with one shared EVA ViT and language with a cross-attention BERT, pretrained with omni-modal
contrastive, matching and captioning losses. This repository holds the original weights `{source}` converted to
Transformers' format ({dtype}); the model code travels with it (`trust_remote_code=True`).

Architecture: vision tower {vision_layers} blocks x {vision_width} wide ({vision_heads} heads, patch {patch},
{image_size} px); text branch BERT {text_layers} layers x {text_width} with cross-attention; contrastive dim
{projection_dim}; knowledge modalities {modalities}.

## Usage

```python
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
inputs = processor(text=["a man is skiing"], images=["test.jpeg"], return_tensors="pt")
outputs = model(**inputs)
print(outputs.logits_per_text_image)
```

## Parity

The conversion code reproduces the original implementation's outputs on a random-weight parity checkpoint within
2.2e-6 (features, contexts, matching scores) and 4.8e-6 (similarity logits divided by a temperature of 0.05), in
float32, and the original's captions token for token.

## Citation

```bibtex
@article{{zhang2024mico,
  title={{Explore the Limits of Omni-modal Pretraining at Scale}},
  author={{Zhang, Yiyuan and Li, Handong and Liu, Jing and Yue, Xiangyu}},
  journal={{arXiv preprint arXiv:2406.09412}},
  year={{2024}}
}}
```
"""


def write_model_card(output_dir: str | os.PathLike, source: str, repo_id: str) -> Path:
    """README.md for a converted directory: architecture, license, citation, usage and parity figures."""
    config = MiCoConfig.from_pretrained(output_dir)
    vision, text = config.vision_config, config.text_config
    card = MODEL_CARD.format(
        source=source,
        repo_id=repo_id,
        dtype=getattr(config, "dtype", None) or "float32",
        vision_layers=vision.num_hidden_layers,
        vision_width=vision.hidden_size,
        vision_heads=vision.num_attention_heads,
        patch=vision.patch_size,
        image_size=vision.image_size,
        text_layers=text.num_hidden_layers,
        text_width=text.hidden_size,
        projection_dim=config.projection_dim,
        modalities=config.knowledge_modalities,
    )
    path = Path(output_dir) / "README.md"
    path.write_text(card)
    return path


def push_converted_to_hub(output_dir: str | os.PathLike, repo_id: str, source: str, private: bool = False) -> str:
    """Upload a converted directory (with a generated model card) to the Hub; returns the repository URL."""
    from huggingface_hub import HfApi

    write_model_card(output_dir, source, repo_id)
    api = HfApi()
    url = api.create_repo(repo_id, exist_ok=True, private=private)
    api.upload_folder(folder_path=str(output_dir), repo_id=repo_id, commit_message=f"Convert {source} to Transformers")
    return str(url)
