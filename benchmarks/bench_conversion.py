"""Wall time and peak memory of converting a release-size original checkpoint (`convert_original_checkpoint`).

Writes a synthetic checkpoint in the Hub layout of `Yiyuan/MiCo-ViT-g-14-omnimodal-300k-b64K` - `config.json` with
the original hyper-parameters and `mico_pytorch_model.safetensors` with the original key names and shapes (ViT-g/14,
BERT-base with cross-attention, heads and glue, EVA-CLIP's unused text tower and projection, the MLM decoder copy of
the word embeddings): 1.31B float32 values, 5.24 GB. The file is streamed tensor by tensor from one random pool (every
tensor holds the pool's first values, so tied copies are equal), which keeps this process small. The conversion then
runs in a child process whose peak resident memory (VmHWM) is compared with the checkpoint size.

    python benchmarks/bench_conversion.py [--quick | --smoke]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import psutil


ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks.common import markdown_table  # noqa: E402


PARITY_CONFIG = ROOT / "tests" / "fixtures" / "parity" / "hub" / "config.json"
WEIGHTS_NAME = "mico_pytorch_model.safetensors"
RSS_GOAL = 1.3  # peak RSS of the conversion / checkpoint size
POOL_VALUES = 1 << 24  # 64 MiB of random float32 values reused for every tensor


@dataclass(frozen=True)
class CheckpointSpec:
    """Sizes of a synthetic original checkpoint."""

    vision_width: int = 1408
    vision_layers: int = 40
    vision_mlp: int = 6144
    patch: int = 14
    image_size: int = 224
    eva_embed_dim: int = 1024
    text_width: int = 768
    text_layers: int = 12
    text_ffn: int = 3072
    vocab: int = 30522
    max_positions: int = 512
    projection_dim: int = 512
    eva_text_width: int = 768
    eva_text_layers: int = 12
    eva_text_vocab: int = 49408
    eva_text_context: int = 77
    vision_frames: int = 4
    audio_frames: int = 3
    depth_frames: int = 2


RELEASE = CheckpointSpec()
SPECS = {
    "full": RELEASE,
    "quick": replace(RELEASE, vision_layers=10),
    "smoke": CheckpointSpec(
        vision_width=176,
        vision_layers=1,
        vision_mlp=768,
        eva_embed_dim=32,
        text_width=48,
        text_layers=1,
        text_ffn=96,
        vocab=1000,
        max_positions=64,
        projection_dim=16,
        eva_text_width=16,
        eva_text_layers=1,
        eva_text_vocab=100,
        eva_text_context=8,
    ),
}


def _vision_tensors(spec: CheckpointSpec) -> dict[str, tuple[int, ...]]:
    """EVA-CLIP ViT (`vision_encoder.visual.*`), including the projection `head` MiCo does not use."""
    width, grid = spec.vision_width, spec.image_size // spec.patch
    shapes = {
        "vision_encoder.visual.cls_token": (1, 1, width),
        "vision_encoder.visual.pos_embed": (1, grid * grid + 1, width),
        "vision_encoder.visual.patch_embed.proj.weight": (width, 3, spec.patch, spec.patch),
        "vision_encoder.visual.patch_embed.proj.bias": (width,),
        "vision_encoder.visual.norm.weight": (width,),
        "vision_encoder.visual.norm.bias": (width,),
        "vision_encoder.visual.head.weight": (spec.eva_embed_dim, width),
        "vision_encoder.visual.head.bias": (spec.eva_embed_dim,),
    }
    for i in range(spec.vision_layers):
        block = f"vision_encoder.visual.blocks.{i}"
        shapes.update(
            {
                f"{block}.attn.qkv.weight": (3 * width, width),
                f"{block}.attn.q_bias": (width,),
                f"{block}.attn.v_bias": (width,),
                f"{block}.attn.proj.weight": (width, width),
                f"{block}.attn.proj.bias": (width,),
                f"{block}.mlp.fc1.weight": (spec.vision_mlp, width),
                f"{block}.mlp.fc1.bias": (spec.vision_mlp,),
                f"{block}.mlp.fc2.weight": (width, spec.vision_mlp),
                f"{block}.mlp.fc2.bias": (width,),
                **{f"{block}.{norm}.{p}": (width,) for norm in ("norm1", "norm2") for p in ("weight", "bias")},
            }
        )
    return shapes


def _eva_text_tensors(spec: CheckpointSpec) -> dict[str, tuple[int, ...]]:
    """EVA-CLIP's text tower (`vision_encoder.text.*`) and `logit_scale`, stored in the release but never used."""
    width, text = spec.eva_text_width, "vision_encoder.text"
    shapes = {
        "vision_encoder.logit_scale": (),
        f"{text}.token_embedding.weight": (spec.eva_text_vocab, width),
        f"{text}.positional_embedding": (spec.eva_text_context, width),
        f"{text}.ln_final.weight": (width,),
        f"{text}.ln_final.bias": (width,),
        f"{text}.text_projection": (width, spec.eva_embed_dim),
    }
    for i in range(spec.eva_text_layers):
        block = f"{text}.transformer.resblocks.{i}"
        shapes.update(
            {
                f"{block}.attn.in_proj_weight": (3 * width, width),
                f"{block}.attn.in_proj_bias": (3 * width,),
                f"{block}.attn.out_proj.weight": (width, width),
                f"{block}.attn.out_proj.bias": (width,),
                f"{block}.mlp.c_fc.weight": (4 * width, width),
                f"{block}.mlp.c_fc.bias": (4 * width,),
                f"{block}.mlp.c_proj.weight": (width, 4 * width),
                f"{block}.mlp.c_proj.bias": (width,),
                **{f"{block}.{norm}.{p}": (width,) for norm in ("ln_1", "ln_2") for p in ("weight", "bias")},
            }
        )
    return shapes


def _bert_tensors(spec: CheckpointSpec) -> dict[str, tuple[int, ...]]:
    """BERT with cross-attention (`multimodal_encoder.*`) and its MLM head, the decoder copy of the embeddings too."""
    width, bert, head = spec.text_width, "multimodal_encoder.bert", "multimodal_encoder.cls.predictions"
    shapes = {
        f"{bert}.embeddings.word_embeddings.weight": (spec.vocab, width),
        f"{bert}.embeddings.position_embeddings.weight": (spec.max_positions, width),
        f"{bert}.embeddings.token_type_embeddings.weight": (2, width),
        f"{bert}.embeddings.LayerNorm.weight": (width,),
        f"{bert}.embeddings.LayerNorm.bias": (width,),
        f"{head}.bias": (spec.vocab,),
        f"{head}.decoder.weight": (spec.vocab, width),
        f"{head}.decoder.bias": (spec.vocab,),
        f"{head}.transform.dense.weight": (width, width),
        f"{head}.transform.dense.bias": (width,),
        f"{head}.transform.LayerNorm.weight": (width,),
        f"{head}.transform.LayerNorm.bias": (width,),
    }
    for i in range(spec.text_layers):
        layer = f"{bert}.encoder.layer.{i}"
        for block in ("attention", "crossattention"):
            for name in ("self.query", "self.key", "self.value", "output.dense"):
                shapes[f"{layer}.{block}.{name}.weight"] = (width, width)
                shapes[f"{layer}.{block}.{name}.bias"] = (width,)
            shapes[f"{layer}.{block}.output.LayerNorm.weight"] = (width,)
            shapes[f"{layer}.{block}.output.LayerNorm.bias"] = (width,)
        shapes.update(
            {
                f"{layer}.intermediate.dense.weight": (spec.text_ffn, width),
                f"{layer}.intermediate.dense.bias": (spec.text_ffn,),
                f"{layer}.output.dense.weight": (width, spec.text_ffn),
                f"{layer}.output.dense.bias": (width,),
                f"{layer}.output.LayerNorm.weight": (width,),
                f"{layer}.output.LayerNorm.bias": (width,),
            }
        )
    return shapes


def _glue_tensors(spec: CheckpointSpec) -> dict[str, tuple[int, ...]]:
    """Contrastive heads, temperature, matching head, bridges, frame and type embeddings."""
    vision, text, dim = spec.vision_width, spec.text_width, spec.projection_dim
    shapes: dict[str, tuple[int, ...]] = {"contra_temp": ()}
    for head, size in {"t": text, "s": text, "v": vision, "a": vision, "d": vision}.items():
        shapes[f"contra_head_{head}.linear.weight"] = (dim, size)
    for head, size in {"va": 2 * vision, "id": 2 * vision, "vs": vision + text, "vas": 2 * vision + text}.items():
        shapes[f"contra_head_{head}.weight"] = (dim, size)
        shapes[f"contra_head_{head}.bias"] = (dim,)
    for name, (rows, cols) in {"linear1": (text, text), "linear2": (2, text)}.items():
        shapes[f"itm_head.{name}.weight"] = (rows, cols)
        shapes[f"itm_head.{name}.bias"] = (rows,)
    shapes.update({"itm_head.layernorm.weight": (text,), "itm_head.layernorm.bias": (text,)})
    frames = {"vision": spec.vision_frames, "audio": spec.audio_frames, "depth": spec.depth_frames}
    for modality, size in {"vision": vision, "audio": vision, "depth": vision, "subtitle": text}.items():
        shapes[f"hidden_trans_{modality}_multimodal.0.weight"] = (text, size)
        shapes[f"hidden_trans_{modality}_multimodal.0.bias"] = (text,)
        shapes[f"hidden_trans_{modality}_multimodal.1.weight"] = (text,)
        shapes[f"hidden_trans_{modality}_multimodal.1.bias"] = (text,)
        shapes[f"{modality}_type_embeddings"] = (1, 1, text)
        if modality in frames:
            shapes[f"{modality}_frame_embedding"] = (1, frames[modality], text)
    return shapes


def hub_tensor_shapes(spec: CheckpointSpec) -> dict[str, tuple[int, ...]]:
    """Every float32 tensor of the original Hub file, by original key name (BERT's `position_ids` excluded)."""
    return {**_vision_tensors(spec), **_eva_text_tensors(spec), **_bert_tensors(spec), **_glue_tensors(spec)}


def hub_config(spec: CheckpointSpec) -> dict:
    """The original hyper-parameters of the release (parity fixture's config without the tiny model configs)."""
    config = json.loads(PARITY_CONFIG.read_text(encoding="utf-8"))
    config.pop("evaclip_model_cfg")
    config.pop("bert_config")
    config.update(
        contra_dim=spec.projection_dim,
        vision_resolution=spec.image_size,
        max_vision_sample_num=spec.vision_frames,
        max_audio_sample_num=spec.audio_frames,
        max_depth_sample_num=spec.depth_frames,
    )
    return config


def checkpoint_bytes(spec: CheckpointSpec) -> int:
    """Size of the tensor data of the synthetic file (float32 tensors and the int64 `position_ids`)."""
    return 4 * sum(math.prod(shape) for shape in hub_tensor_shapes(spec).values()) + 8 * spec.max_positions


def write_hub_checkpoint(directory: Path, spec: CheckpointSpec, seed: int = 0) -> Path:
    """Write `config.json` and a streamed `mico_pytorch_model.safetensors` into `directory`; return the latter.

    The safetensors header is built from the shapes alone, then the tensor bytes are written sequentially, so memory
    stays at the 64 MiB random pool whatever the checkpoint size.
    """
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hub_config(spec), indent=2), encoding="utf-8")
    entries = [("multimodal_encoder.bert.embeddings.position_ids", "I64", (1, spec.max_positions))]
    entries += [(name, "F32", shape) for name, shape in sorted(hub_tensor_shapes(spec).items())]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * (8 if dtype == "I64" else 4)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    pool = np.random.default_rng(seed).standard_normal(POOL_VALUES, dtype=np.float32).tobytes()
    path = directory / WEIGHTS_NAME
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        handle.write(np.arange(spec.max_positions, dtype=np.int64).tobytes())
        for _, _, shape in entries[1:]:
            remaining = math.prod(shape) * 4
            while remaining:
                chunk = min(remaining, len(pool))
                handle.write(pool[:chunk])
                remaining -= chunk
    return path


def _poll_rss(process: psutil.Process, samples: list[tuple[float, int]], interval: float = 0.05) -> None:
    """Append `(seconds, rss)` samples of `process` until it exits."""
    start = time.perf_counter()
    while True:
        try:
            samples.append((time.perf_counter() - start, process.memory_info().rss))
        except psutil.Error:
            return
        time.sleep(interval)


def convert_in_child(source: Path, output: Path, max_shard_size: str) -> dict:
    """Run the conversion in a fresh Python process; return its timings, peak RSS and an RSS timeline."""
    command = [sys.executable, "-m", "benchmarks.bench_conversion", "--child", str(source), str(output)]
    environment = {**os.environ, "TQDM_DISABLE": "1"}
    child = subprocess.Popen(
        [*command, "--max_shard_size", max_shard_size], cwd=ROOT, env=environment, stdout=subprocess.PIPE, text=True
    )
    samples: list[tuple[float, int]] = []
    poller = threading.Thread(target=_poll_rss, args=(psutil.Process(child.pid), samples), daemon=True)
    poller.start()
    stdout, _ = child.communicate()
    poller.join()
    if child.returncode:
        raise RuntimeError(f"conversion child failed with exit code {child.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    shards = sorted(output.glob("*.safetensors"))
    result.update(
        max_shard_size=max_shard_size,
        num_shards=len(shards),
        largest_shard_bytes=max(path.stat().st_size for path in shards),
        output_bytes=sum(path.stat().st_size for path in shards),
        polled_peak_rss_bytes=max((rss for _, rss in samples), default=0),
        rss_timeline=[(round(t, 2), rss) for t, rss in samples[:: max(1, len(samples) // 60)]],
    )
    return result


def peak_rss_of_this_process() -> int:
    """Peak resident bytes of this process (VmHWM). Unlike `getrusage(...).ru_maxrss`, which Linux carries over
    from the parent through fork and exec, VmHWM belongs to this process's own address space."""
    with open("/proc/self/status", encoding="utf-8") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def child_main(source: str, output: str, max_shard_size: str) -> None:
    """Inside the child: convert, then print one JSON line with the wall time, baseline RSS and peak RSS."""
    from modeling_mico.convert_original import convert_original_checkpoint

    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    convert_original_checkpoint(source, output, max_shard_size=max_shard_size)
    seconds = time.perf_counter() - start
    print(
        json.dumps({"seconds": seconds, "baseline_rss_bytes": baseline, "peak_rss_bytes": peak_rss_of_this_process()})
    )


def run(quick: bool = False, smoke: bool = False) -> dict:
    """Write the synthetic checkpoint to a temporary folder, convert it once per shard size, measure, clean up.

    `5GB` is the converter's default (the whole converted model fits one shard); `1GB` shows how the peak follows
    the shard size (smoke mode: the default only). Returns `{"skipped": reason}` when the disk is too small.
    """
    mode = "smoke" if smoke else "quick" if quick else "full"
    spec = SPECS[mode]
    size = checkpoint_bytes(spec)
    needed = int(2.2 * size) + (1 << 30)
    free = shutil.disk_usage(tempfile.gettempdir()).free
    base = {"mode": mode, "spec": spec.__dict__, "checkpoint_bytes": size, "goal_ratio": RSS_GOAL}
    if free < needed:
        return {
            **base,
            "skipped": f"needs {needed / 1e9:.1f} GB free in {tempfile.gettempdir()}, has {free / 1e9:.1f}",
        }
    with tempfile.TemporaryDirectory(prefix="mico-bench-conversion-") as tmp:
        start = time.perf_counter()
        weights = write_hub_checkpoint(Path(tmp) / "hub", spec)
        base.update(file_bytes=weights.stat().st_size, write_s=time.perf_counter() - start)
        runs = []
        for shard_size in ("5GB",) if smoke else ("5GB", "1GB"):
            output = Path(tmp) / f"converted-{shard_size}"
            result = convert_in_child(weights.parent, output, shard_size)
            result["peak_rss_ratio"] = result["peak_rss_bytes"] / base["file_bytes"]
            runs.append(result)
            shutil.rmtree(output)
    return {**base, "runs": runs}


def default_run(results: dict) -> dict | None:
    """The run with the converter's default shard size (the goal's measurement), `None` when skipped."""
    return results["runs"][0] if results.get("runs") else None


def to_markdown(results: dict) -> str:
    """Results as a Markdown table."""
    if "skipped" in results:
        return f"Conversion benchmark skipped: {results['skipped']}."
    rows = [
        [
            run["max_shard_size"],
            run["num_shards"],
            f"{results['file_bytes'] / 1e9:.2f}",
            f"{run['output_bytes'] / 1e9:.2f}",
            f"{run['largest_shard_bytes'] / 1e9:.2f}",
            f"{run['seconds']:.1f}",
            f"{run['baseline_rss_bytes'] / 1e9:.2f}",
            f"{run['peak_rss_bytes'] / 1e9:.2f}",
            f"{run['peak_rss_ratio']:.2f}x",
        ]
        for run in results["runs"]
    ]
    header = ["max_shard_size", "shards", "checkpoint GB", "output GB", "largest shard GB", "wall s"]
    header += ["RSS after imports GB", "peak RSS GB", "peak RSS / checkpoint"]
    spec = results["spec"]
    note = (
        f"Synthetic Hub-layout checkpoint: ViT {spec['vision_width']}w x {spec['vision_layers']} blocks, BERT "
        f"{spec['text_width']}w x {spec['text_layers']} layers, EVA text tower {spec['eva_text_width']}w x "
        f"{spec['eva_text_layers']}; written in {results['write_s']:.0f} s."
    )
    return note + "\n\n" + markdown_table(header, rows, "lrrrrrrrr")


def main() -> None:
    """Command-line entry point (also the child process's entry point with `--child`)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 vision blocks instead of 40")
    parser.add_argument("--smoke", action="store_true", help="a tiny checkpoint (seconds)")
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--max_shard_size", default="5GB", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(*args.child, args.max_shard_size)
        return
    results = run(quick=args.quick, smoke=args.smoke)
    print(to_markdown(results))


if __name__ == "__main__":
    main()
