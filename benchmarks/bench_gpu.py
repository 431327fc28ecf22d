"""One-shot GPU benchmark: machine ceilings, ViT-g/14 bf16 inference and training, `torch.compile`, caption decoding.

Made for a short lease of one GPU (an H200 here): one command measures everything in about four minutes and writes
`gpu_bench.json` and `gpu_bench.md` into `--out` after every measurement, so a run cut short still leaves its numbers.
Every configuration is wrapped: one that fails records its error and the others go on; a global time budget skips
what would not fit. Random weights everywhere (nothing is downloaded); only the public API of `modeling_mico`.

1. Ceilings: bf16 and fp32 (TF32 and IEEE) `8192^3` matrix products (TFLOP/s, mean of 10 after 3 warm-ups) and a
   device-to-device copy (GB/s counting bytes read plus bytes written).
2. ViT-g/14 (`MiCoVisionConfig()` defaults: 1408 wide, 40 blocks, 16 heads of 88, MLP 6144, 257 tokens) in bf16:
   images/s at batch 64 and 256 for each attention path (SDPA default dispatch, SDPA forced to FlashAttention,
   memory-efficient, cuDNN or math, eager, and transformers' `flash_attention_2`/`_3` when their packages exist),
   analytic FLOPs (2 x multiply-adds of every linear and the patch convolution, plus QK^T and AV), achieved TFLOP/s,
   MFU against the measured bf16 ceiling, peak memory and the error against an fp32 reference; a training step
   (fp32 master weights, bf16 autocast, forward + backward) at batch 64 with and without gradient checkpointing, the
   fused AdamW step apart; `torch.compile` of the tower in a child process with a time limit.
3. Caption decoding: `MiCoForConditionalGeneration` with the BERT-base text tower over a precomputed 4-frame video
   context (4 x 257 tokens), exactly 40 new tokens, greedy and 3 beams, batch 1 and 8, fp32 and bf16: ms/step,
   tokens/s, peak memory and the bandwidth bound of a step (weights and cached keys/values read once).

    python benchmarks/bench_gpu.py --out DIR [--budget 300] [--sections ceilings,vit,train,decode,compile]
    python benchmarks/bench_gpu.py --smoke --device cpu --out /tmp/gpusmoke     # seconds, tiny sizes, CPU
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.machinery
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
import warnings
from collections.abc import Callable
from pathlib import Path


# the repository root: the first folder above this file that holds the package (the script also runs from a copy)
ROOT = next((p for p in Path(__file__).resolve().parents if (p / "modeling_mico").is_dir()), Path.cwd())
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402


SECTIONS = ("ceilings", "vit", "train", "decode", "compile")
DATASHEET_BF16_TFLOPS = 989.4  # H100/H200 SXM dense bf16, vendor datasheet (a lead, not a measurement)
GIB = 2**30

FULL = {
    "matmul_n": 8192,
    "matmul_warmup": 3,
    "matmul_iters": 10,
    "copy_bytes": 2 * GIB,
    "copy_iters": 20,
    "vision": {},  # MiCoVisionConfig() defaults: ViT-g/14
    "vit_batches": (64, 256),
    "vit_iters": {64: 10, 256: 4},
    "vit_warmup": 2,
    "train_batch": 64,
    "train_iters": 5,
    "train_warmup": 2,
    "optimizer_iters": 5,
    "text": {},  # MiCoTextConfig() defaults: BERT-base with cross-attention
    "decode_vision": dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128),
    "frames": 4,
    "new_tokens": 40,
    "decode_batches": (1, 8),
    "decode_beams": (1, 3),
    "decode_repeats": 3,
    "compile_batch": 64,
    "compile_iters": 10,
    "compile_backend": "inductor",
    "compile_limit_s": 60,
    "compile_timeout_s": 150,
}
# The smoke run's vision and text towers share one shape.
SMOKE_TOWER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
SMOKE = {
    **FULL,
    "matmul_n": 256,
    "matmul_warmup": 1,
    "matmul_iters": 2,
    "copy_bytes": 8 * 2**20,
    "copy_iters": 2,
    "vision": dict(SMOKE_TOWER, image_size=56),
    "vit_batches": (2,),
    "vit_iters": {2: 2},
    "vit_warmup": 1,
    "train_batch": 2,
    "train_iters": 2,
    "train_warmup": 1,
    "optimizer_iters": 2,
    "text": dict(SMOKE_TOWER, max_position_embeddings=64, vocab_size=1024),
    "decode_vision": dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=56
    ),
    "new_tokens": 5,
    "decode_batches": (2,),
    "decode_repeats": 1,
    "compile_batch": 2,
    "compile_iters": 2,
    "compile_backend": "eager",  # dynamo only: checks the plumbing in seconds
    "compile_limit_s": 30,
    "compile_timeout_s": 60,
}


# ---- small helpers --------------------------------------------------------------------------------------------------


class Budget:
    """Wall-clock budget of the whole run; sections ask `fits(seconds)` before starting a configuration."""

    def __init__(self, seconds: float):
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def fits(self, seconds: float) -> bool:
        return self.left() >= seconds

    def admits(self, record: dict, seconds: float) -> bool:
        """Whether a configuration needing `seconds` still fits; if not, its `record` is marked skipped."""
        if not self.fits(seconds):
            record["status"] = "skipped (time budget)"
            return False
        return True


def stub_missing_media_backends() -> list[str]:
    """`decord`/`soundfile` are only needed to decode media, which this benchmark never does; where they cannot be
    imported (no wheel carried), a stand-in module lets `import modeling_mico` succeed. Returns the stubbed names."""
    stubbed = []
    for name in ("decord", "soundfile"):
        try:
            importlib.import_module(name)
        except Exception:  # ImportError, or OSError from a missing shared library
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
            module.__dict__["__getattr__"] = lambda attribute, name=name: _missing(name, attribute)
            sys.modules[name] = module
            stubbed.append(name)
    return stubbed


def _missing(module: str, attribute: str):
    if attribute.startswith("__"):
        raise AttributeError(attribute)
    raise ImportError(f"`{module}` is not installed (stubbed by bench_gpu.py; `{module}.{attribute}` was asked for)")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 3) if device.type == "cuda" else None


def allocated_gib(device: torch.device) -> float | None:
    return round(torch.cuda.memory_allocated(device) / GIB, 3) if device.type == "cuda" else None


def step_times(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of `iters` calls after `warmup` untimed ones, the device synchronized around each call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def mean_back_to_back(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> float:
    """Mean seconds per call of `iters` calls issued back to back (one synchronization at the end)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference|| / ||reference|| in float64."""
    output, reference = output.double(), reference.double()
    return ((output - reference).norm() / reference.norm()).item()


def error_text(error: BaseException, caught: list | None = None) -> str:
    """The error, plus the reasons PyTorch gave as warnings (SDPA explains why a forced kernel cannot run)."""
    text = f"{type(error).__name__}: {error}"
    keywords = ("sdp", "attention", "kernel")
    reasons = [str(item.message) for item in caught or [] if any(k in str(item.message).lower() for k in keywords)]
    if reasons:
        text += " | warnings: " + " / ".join(dict.fromkeys(reason.strip() for reason in reasons))
    return text[:1500]


def attempt(record: dict, fn: Callable[[], dict], device: torch.device) -> dict:
    """Run one configuration: its numbers go into `record`, or `status: error` with the error; memory is freed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            record.update(fn())
            record.setdefault("status", "ok")
        except Exception as error:
            record["status"] = "error"
            record["error"] = error_text(error, caught)
            record["traceback"] = traceback.format_exc()[-2500:]
            print(f"  ! {record.get('name', '')}: {record['error'][:300]}", flush=True)
    reset_peak(device)
    return record


def fmt(value, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{suffix}"
    return f"{value}{suffix}"


def nvidia_smi() -> str | None:
    query = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,memory.used"
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
        return f"{query}: {done.stdout.strip() or done.stderr.strip()}"
    except Exception as error:
        return f"nvidia-smi: {type(error).__name__}: {error}"


def machine(device: torch.device, stubbed: list[str]) -> dict:
    import transformers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "stubbed_modules": stubbed,
        "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
        "flash_attn_interface_installed": importlib.util.find_spec("flash_attn_interface") is not None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            {
                "gpu": props.name,
                "compute_capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
                "gpu_memory_gib": round(props.total_memory / GIB, 1),
                "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
                "cudnn": torch.backends.cudnn.version(),
                "sdpa_flash_available": getattr(torch.backends.cuda, "is_flash_attention_available", lambda: None)(),
                "tf32_default": torch.get_float32_matmul_precision(),
                "nvidia_smi_start": nvidia_smi(),
            }
        )
    else:
        info["gpu"] = None
    return info


# ---- 1. ceilings ----------------------------------------------------------------------------------------------------


def matmul_tflops(a: torch.Tensor, b: torch.Tensor, iters: int, warmup: int, device: torch.device) -> float:
    """TFLOP/s of `a @ b` (square), mean of `iters` back-to-back products after `warmup`."""
    return 2 * a.shape[0] ** 3 / mean_back_to_back(lambda: a @ b, iters, warmup, device) / 1e12


def measure_ceilings(sizes: dict, device: torch.device) -> dict:
    n, warmup, iters = sizes["matmul_n"], sizes["matmul_warmup"], sizes["matmul_iters"]
    out: dict = {"matmul_n": n, "matmul_iters": iters, "matmul_warmup": warmup}
    generator = torch.Generator(device=device).manual_seed(0)

    def operands(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2))

    out["bf16_tflops"] = matmul_tflops(*operands(torch.bfloat16), iters, warmup, device)
    previous = torch.get_float32_matmul_precision()
    try:
        for precision, key in (("high", "tf32_tflops"), ("highest", "fp32_tflops")):
            torch.set_float32_matmul_precision(precision)
            out[key] = matmul_tflops(*operands(torch.float32), max(2, iters // 2), warmup, device)
    finally:
        torch.set_float32_matmul_precision(previous)

    elements = sizes["copy_bytes"] // 2
    source = torch.randn(elements, device=device, dtype=torch.bfloat16, generator=generator)
    target = torch.empty_like(source)
    seconds = mean_back_to_back(lambda: target.copy_(source), sizes["copy_iters"], 2, device)
    out["copy_gb_per_s"] = 2 * sizes["copy_bytes"] / seconds / 1e9  # bytes read + bytes written
    out["copy_tensor_gib"] = sizes["copy_bytes"] / GIB
    return out


# ---- 2. ViT-g -------------------------------------------------------------------------------------------------------


def build_vision(sizes: dict, device: torch.device) -> nn.Module:
    from modeling_mico import MiCoVisionConfig, MiCoVisionModel

    torch.manual_seed(0)
    with torch.device(device):
        return MiCoVisionModel(MiCoVisionConfig(**sizes["vision"]))


def vision_flops_per_image(model: nn.Module) -> dict:
    """Analytic forward FLOPs of one image: 2 x multiply-adds of every linear layer (all tokens) and of the patch
    convolution (patch tokens), plus QK^T and AV (2 x tokens^2 x width each, per block)."""
    config = model.config
    patches = (config.image_size // config.patch_size) ** 2
    tokens = patches + 1
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    conv = sum(
        m.out_channels * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    )
    attention = 4 * tokens * tokens * config.hidden_size * config.num_hidden_layers
    total = 2 * linear * tokens + 2 * conv * patches + attention
    return {
        "tokens": tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
        "linear_weights": linear,
        "gflop_per_image": total / 1e9,
        "attention_share": attention / total,
    }


def attention_paths() -> list[tuple[str, str, str | None]]:
    """(name, transformers attn_implementation, forced SDPA backend)."""
    return [
        ("sdpa (default dispatch)", "sdpa", None),
        ("sdpa FLASH_ATTENTION", "sdpa", "FLASH_ATTENTION"),
        ("sdpa EFFICIENT_ATTENTION", "sdpa", "EFFICIENT_ATTENTION"),
        ("sdpa CUDNN_ATTENTION", "sdpa", "CUDNN_ATTENTION"),
        ("sdpa MATH", "sdpa", "MATH"),
        ("eager", "eager", None),
        ("flash_attention_2", "flash_attention_2", None),
        ("flash_attention_3", "flash_attention_3", None),
    ]


def sdpa_context(backend: str | None):
    import contextlib

    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, backend)])


def run_vit_inference(sizes, device, results, save, budget, model_fp32) -> None:
    section = results["vit_inference"]
    flops = vision_flops_per_image(model_fp32)
    section["model"] = {
        **flops,
        "config": {
            k: getattr(model_fp32.config, k)
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "image_size",
                "patch_size",
            )
        },
    }
    ceiling = (results.get("ceilings") or {}).get("bf16_tflops")
    config = model_fp32.config
    generator = torch.Generator(device=device).manual_seed(1)
    inputs = {
        batch: torch.randn(batch, 3, config.image_size, config.image_size, device=device, generator=generator)
        for batch in sizes["vit_batches"]
    }
    # fp32 reference (IEEE fp32 matrix products, math attention) of the first batch, for the bf16 error
    first = sizes["vit_batches"][0]
    reference = None
    with torch.inference_mode(), sdpa_context("MATH"):
        try:
            reference = model_fp32(pixel_values=inputs[first]).last_hidden_state.float()
        except Exception as error:
            section["reference_error"] = error_text(error)
    model = copy.deepcopy(model_fp32).to(torch.bfloat16).eval()
    section["weights_gib"] = allocated_gib(device)
    rows = section["rows"]
    for batch in sizes["vit_batches"]:
        pixels = inputs[batch].to(torch.bfloat16)
        for name, implementation, backend in attention_paths():
            record = {"name": name, "attn_implementation": implementation, "sdpa_backend": backend, "batch": batch}
            rows.append(record)
            if implementation.startswith("flash_attention_"):
                package = "flash_attn" if implementation.endswith("2") else "flash_attn_interface"
                if importlib.util.find_spec(package) is None:
                    record.update(status="not installed", error=f"package `{package}` not importable")
                    continue
            if not budget.admits(record, 25 if batch > 64 else 12):
                continue

            def measure(batch=batch, pixels=pixels, implementation=implementation, backend=backend) -> dict:
                model.set_attn_implementation(implementation)
                reset_peak(device)
                resident = allocated_gib(device)
                with torch.inference_mode(), sdpa_context(backend):
                    output = model(pixel_values=pixels).last_hidden_state  # also the first warm-up
                    error = relative_error(output, reference) if reference is not None and batch == first else None
                    del output
                    times = step_times(
                        lambda: model(pixel_values=pixels), sizes["vit_iters"][batch], sizes["vit_warmup"], device
                    )
                seconds = statistics.median(times)
                tflops = batch * flops["gflop_per_image"] / seconds / 1e3
                return {
                    "images_per_s": batch / seconds,
                    "ms_per_batch": seconds * 1e3,
                    "ms_per_batch_mean": statistics.mean(times) * 1e3,
                    "ms_per_batch_min": min(times) * 1e3,
                    "iters": len(times),
                    "tflops": tflops,
                    "mfu": tflops / ceiling if ceiling else None,
                    "mfu_datasheet": tflops / DATASHEET_BF16_TFLOPS if device.type == "cuda" else None,
                    "peak_gib": peak_gib(device),
                    "resident_gib": resident,
                    "rel_error_vs_fp32": error,
                }

            attempt(record, measure, device)
            model.set_attn_implementation("sdpa")
            print(
                f"  vit {name:26s} b{batch:<4d} {record['status']:8s} {fmt(record.get('images_per_s'))} img/s "
                f"mfu {fmt(record.get('mfu'), 3)} peak {fmt(record.get('peak_gib'), 2)} GiB",
                flush=True,
            )
            save()


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Activation (gradient) checkpointing of every block, non-reentrant; `activation_checkpointing_*` where this
    transformers has it, else the older `gradient_checkpointing_*` names."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def run_vit_training(sizes, device, results, save, budget, model_fp32) -> None:
    section = results["vit_training"]
    flops = vision_flops_per_image(model_fp32)
    ceiling = (results.get("ceilings") or {}).get("bf16_tflops")
    batch = sizes["train_batch"]
    config = model_fp32.config
    generator = torch.Generator(device=device).manual_seed(2)
    pixels = torch.randn(batch, 3, config.image_size, config.image_size, device=device, generator=generator)
    model = model_fp32
    model.train()
    model.set_attn_implementation("sdpa")
    section["precision"] = (
        "fp32 master weights and gradients, forward under torch.autocast(bfloat16); SDPA default dispatch; loss = "
        "mean square of the last hidden state; timed: zero_grad + forward + backward (the optimizer step apart)"
    )

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            hidden = model(pixel_values=pixels).last_hidden_state
        hidden.float().pow(2).mean().backward()

    for checkpointing in (False, True):
        record = {
            "name": f"sdpa, gradient checkpointing {'on' if checkpointing else 'off'}",
            "batch": batch,
            "gradient_checkpointing": checkpointing,
        }
        section["rows"].append(record)
        if not budget.admits(record, 20):
            continue

        def measure(checkpointing=checkpointing) -> dict:
            set_checkpointing(model, checkpointing)
            reset_peak(device)
            resident = allocated_gib(device)
            times = step_times(train_step, sizes["train_iters"], sizes["train_warmup"], device)
            seconds = statistics.median(times)
            model_tflops = 3 * batch * flops["gflop_per_image"] / seconds / 1e3  # forward + 2x for backward
            return {
                "images_per_s": batch / seconds,
                "ms_per_step": seconds * 1e3,
                "iters": len(times),
                "model_tflops": model_tflops,
                "mfu": model_tflops / ceiling if ceiling else None,
                "hardware_flop_factor": 4 if checkpointing else 3,  # the recomputed forward
                "peak_gib": peak_gib(device),
                "resident_gib": resident,
            }

        attempt(record, measure, device)
        print(
            f"  train {record['name']:40s} {record['status']:8s} {fmt(record.get('images_per_s'))} img/s "
            f"mfu {fmt(record.get('mfu'), 3)} peak {fmt(record.get('peak_gib'), 2)} GiB",
            flush=True,
        )
        save()
    set_checkpointing(model, False)

    record = {"name": "AdamW step (fused on cuda), fp32 states"}
    section["optimizer"] = record
    if budget.admits(record, 10):

        def measure_optimizer() -> dict:
            train_step()
            fused = device.type == "cuda"
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=fused)
            reset_peak(device)
            times = step_times(optimizer.step, sizes["optimizer_iters"], 1, device)
            states = sum(
                t.numel() * t.element_size()
                for s in optimizer.state.values()
                for t in s.values()
                if torch.is_tensor(t)
            )
            optimizer.state.clear()
            return {
                "ms_per_step": statistics.median(times) * 1e3,
                "states_gib": states / GIB,
                "fused": fused,
                "peak_gib_with_states_and_grads": peak_gib(device),
            }

        attempt(record, measure_optimizer, device)
    model.zero_grad(set_to_none=True)
    model.eval()
    save()


# ---- 3. caption decoding --------------------------------------------------------------------------------------------


def decode_step_bytes(text_config, batch: int, context_tokens: int, mean_past: float, element_size: int) -> float:
    """Fewest bytes one decoding step must read: the text tower's weights a step uses (self-attention, the query and
    output of cross-attention, feed-forward, LM head with its transform) and, once per caption (shared by its beams),
    the cached context keys/values plus the self-attention cache of the tokens so far."""
    h, i, v, layers = (
        text_config.hidden_size,
        text_config.intermediate_size,
        text_config.vocab_size,
        text_config.num_hidden_layers,
    )
    weights = layers * (6 * h * h + 2 * h * i) + h * h + v * h
    caches = layers * 2 * batch * (context_tokens + mean_past) * h
    return (weights + caches) * element_size


def run_decoding(sizes, device, results, save, budget) -> None:
    from modeling_mico import MiCoConfig, MiCoForConditionalGeneration

    section = results["decoding"]
    torch.manual_seed(0)
    config = MiCoConfig(
        vision_config=sizes["decode_vision"],
        text_config=dict(sizes["text"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        knowledge_modalities={"vision": sizes["frames"], "audio": 3, "depth": 2},
    )
    with torch.device(device):
        model_fp32 = MiCoForConditionalGeneration(config).eval()
    vision = config.vision_config
    context_tokens = sizes["frames"] * ((vision.image_size // vision.patch_size) ** 2 + 1)
    new_tokens = sizes["new_tokens"]
    bandwidth = (results.get("ceilings") or {}).get("copy_gb_per_s")
    section["settings"] = {
        "text": {
            k: getattr(config.text_config, k)
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        },
        "context_tokens": context_tokens,
        "context": "random normal (batch, frames x tokens, hidden), passed as `context=` to generate",
        "new_tokens": new_tokens,
        "lengths": "min_new_tokens = max_new_tokens, so every caption has exactly that many tokens",
        "bound": "bytes a step must read (weights a step uses; per caption, not per beam: context K/V and the "
        "self-attention cache) / the measured copy bandwidth",
    }
    generator = torch.Generator(device=device).manual_seed(3)
    contexts = {
        batch: torch.randn(batch, context_tokens, config.text_config.hidden_size, device=device, generator=generator)
        for batch in sizes["decode_batches"]
    }
    fp32_ids: dict = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = model_fp32.to(dtype)  # in place: the bf16 rows use the fp32 weights rounded
        for num_beams in sizes["decode_beams"]:
            for batch in sizes["decode_batches"]:
                record = {
                    "name": f"{dtype_name} {'greedy' if num_beams == 1 else f'{num_beams} beams'} b{batch}",
                    "dtype": dtype_name,
                    "num_beams": num_beams,
                    "batch": batch,
                }
                section["rows"].append(record)
                if not budget.admits(record, 12):
                    continue
                context = contexts[batch].to(dtype)

                def generate(context=context, num_beams=num_beams, model=model) -> torch.Tensor:
                    ids = model.generate(
                        context=context,
                        num_beams=num_beams,
                        do_sample=False,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                    )
                    if ids.shape[1] != 1 + new_tokens:
                        raise RuntimeError(f"expected {new_tokens} new tokens, got {ids.shape[1] - 1}")
                    return ids

                def measure(generate=generate, batch=batch, num_beams=num_beams, dtype=dtype) -> dict:
                    reset_peak(device)
                    resident = allocated_gib(device)
                    ids = generate()  # warm-up
                    times = step_times(generate, sizes["decode_repeats"], 0, device)
                    seconds = statistics.median(times)
                    key = (num_beams, batch)
                    if dtype is torch.float32:
                        fp32_ids[key] = ids
                    same = (ids == fp32_ids[key]).float().mean().item() if key in fp32_ids else None
                    step_bytes = decode_step_bytes(
                        config.text_config, batch, context_tokens, new_tokens / 2, torch.finfo(dtype).bits // 8
                    )
                    bound_ms = step_bytes / (bandwidth * 1e9) * 1e3 if bandwidth else None
                    ms_per_step = seconds / new_tokens * 1e3
                    return {
                        "s_per_generate": seconds,
                        "ms_per_step": ms_per_step,
                        "tokens_per_s": batch * new_tokens / seconds,
                        "repeats": len(times),
                        "peak_gib": peak_gib(device),
                        "resident_gib": resident,
                        "step_bytes_mb": step_bytes / 1e6,
                        "bound_ms_per_step": bound_ms,
                        "fraction_of_bound": bound_ms / ms_per_step if bound_ms else None,
                        "token_agreement_with_fp32": same,
                    }

                attempt(record, measure, device)
                print(
                    f"  decode {record['name']:22s} {record['status']:8s} {fmt(record.get('ms_per_step'), 2)} ms/step "
                    f"{fmt(record.get('tokens_per_s'))} tok/s peak {fmt(record.get('peak_gib'), 2)} GiB",
                    flush=True,
                )
                save()
    del model_fp32, model, contexts
    reset_peak(device)


# ---- torch.compile, in a child process with a time limit ------------------------------------------------------------


def compile_child(args, sizes: dict, device: torch.device) -> None:
    """Child: build the bf16 tower, time it eagerly, compile, time it compiled; write JSON after every stage."""
    path = Path(args.compile_child)
    record: dict = {"stage": "building", "backend": sizes["compile_backend"], "batch": sizes["compile_batch"]}

    def write() -> None:
        path.write_text(json.dumps(record, default=str))

    write()
    model = build_vision(sizes, device).to(torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    flops = vision_flops_per_image(model)
    config = model.config
    batch = sizes["compile_batch"]
    generator = torch.Generator(device=device).manual_seed(4)
    pixels = torch.randn(batch, 3, config.image_size, config.image_size, device=device, generator=generator)
    pixels = pixels.to(torch.bfloat16)
    with torch.inference_mode():
        record["stage"] = "eager timing"
        write()
        eager = step_times(lambda: model(pixel_values=pixels), sizes["compile_iters"], 2, device)
        reference = model(pixel_values=pixels).last_hidden_state
        record["eager_images_per_s"] = batch / statistics.median(eager)
        record["stage"] = "compiling"
        write()
        compiled = torch.compile(model, backend=sizes["compile_backend"])
        start = time.perf_counter()
        output = compiled(pixel_values=pixels).last_hidden_state
        synchronize(device)
        record["compile_s"] = time.perf_counter() - start  # first call: tracing, compilation and one run
        record["rel_error_vs_eager"] = relative_error(output, reference)
        record["stage"] = "compiled timing"
        write()
        times = step_times(lambda: compiled(pixel_values=pixels), sizes["compile_iters"], 2, device)
    seconds = statistics.median(times)
    record.update(
        stage="done",
        compiled_images_per_s=batch / seconds,
        ms_per_batch=seconds * 1e3,
        speedup=(batch / seconds) / record["eager_images_per_s"],
        tflops=batch * flops["gflop_per_image"] / seconds / 1e3,
        within_limit=record["compile_s"] <= sizes["compile_limit_s"],
        peak_gib=peak_gib(device),
    )
    write()


def run_compile(args, sizes, device, results, save, budget) -> None:
    record = results["compile"]
    record.update(backend=sizes["compile_backend"], batch=sizes["compile_batch"], limit_s=sizes["compile_limit_s"])
    timeout = min(args.compile_timeout or sizes["compile_timeout_s"], budget.left() - 5)
    if timeout < min(45, args.compile_timeout or 45):
        record["status"] = "skipped (time budget)"
        save()
        return
    path = Path(tempfile.gettempdir()) / f"bench_gpu_compile_{os.getpid()}.json"
    path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--compile-child", str(path), "--device", str(device)]
    if args.smoke:
        command.append("--smoke")
    record["timeout_s"] = round(timeout)
    start = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = process.communicate(timeout=timeout)
        killed = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the child and its compile workers
        log, _ = process.communicate()
        killed = True
    record["wall_s"] = time.perf_counter() - start
    child = json.loads(path.read_text()) if path.exists() else {}
    path.unlink(missing_ok=True)
    record.update(child)
    if killed:
        record["status"] = f"error: killed after {timeout:.0f} s at stage '{child.get('stage', 'starting')}'"
    elif process.returncode != 0 or child.get("stage") != "done":
        record["status"] = f"error: exit {process.returncode} at stage '{child.get('stage', 'starting')}'"
    elif not child.get("within_limit"):
        record["status"] = f"compiled, but took {child['compile_s']:.0f} s (limit {sizes['compile_limit_s']} s)"
    else:
        record["status"] = "ok"
    if record["status"] != "ok":
        record["log_tail"] = (log or "")[-3000:]
    print(
        f"  compile {record['status']} compile_s {fmt(record.get('compile_s'))} "
        f"{fmt(record.get('compiled_images_per_s'))} img/s (eager {fmt(record.get('eager_images_per_s'))})",
        flush=True,
    )
    save()


# ---- report ---------------------------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table: first column left-aligned, the others right-aligned, the last (status) left-aligned."""
    rule = ["---"] + ["---:"] * (len(header) - 2) + ["---"]
    body = [header, rule] + [[str(cell) for cell in row] for row in rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in body)


def status_cell(record: dict) -> str:
    status = record.get("status", "pending")
    detail = record.get("error", "") if status != "ok" else ""
    return f"{status}: {detail[:160]}".replace("|", "/").replace("\n", " ") if detail else status


def col(key: str, digits: int = 1, suffix: str = "") -> Callable[[dict], str]:
    """A table column: the record's `key` formatted by `fmt`."""
    return lambda record: fmt(record.get(key), digits, suffix)


def memory_columns() -> dict[str, Callable[[dict], str]]:
    return {"peak GiB": col("peak_gib", 2), "resident GiB": col("resident_gib", 2)}


def vision_tower_columns(kind: str, step: str, tflops_header: str, tflops_key: str) -> dict[str, Callable]:
    """The columns the vision tower tables share: the `kind` of run, batch, images/s, ms per `step`, TFLOP/s, MFU
    and memory."""
    return {
        kind: lambda r: r["name"],
        "batch": lambda r: r["batch"],
        "images/s": col("images_per_s"),
        f"ms/{step}": col(f"ms_per_{step}"),
        tflops_header: col(tflops_key),
        "MFU": col("mfu", 3),
        **memory_columns(),
    }


def sci(value) -> str:
    return "-" if value is None else f"{value:.1e}"


def records_table(records: list[dict], columns: dict[str, Callable[[dict], object]]) -> str:
    """A table with one row per record; `columns` maps each header to the cell of a record."""
    return table(list(columns), [[cell(record) for cell in columns.values()] for record in records])


def table_section(title: str, intro: str, records: list[dict], columns: dict[str, Callable[[dict], object]]) -> list:
    """Lines of a `### title` section: the `intro` paragraph (when there is one) and the records' table."""
    return ["", f"### {title}", "", *([intro, ""] if intro else []), records_table(records, columns)]


def describe_vision_tower(model: dict) -> str:
    """The measured vision tower in words: its shape, tokens, parameters and FLOPs per image."""
    cfg = model.get("config", {})
    return (
        f"{cfg.get('hidden_size')} wide, {cfg.get('num_hidden_layers')} blocks, {cfg.get('num_attention_heads')} "
        f"heads, MLP {cfg.get('intermediate_size')}, {model.get('tokens')} tokens; "
        f"{model.get('parameters', 0) / 1e6:,.0f} M parameters; {fmt(model.get('gflop_per_image'))} GFLOP per "
        f"image (attention {100 * model.get('attention_share', 0):.1f} %)"
    )


def to_markdown(results: dict) -> str:
    info = results["machine"]
    title = info.get("gpu") or info["device"]
    gpu = (
        f" ({info['multiprocessors']} SMs, {info['gpu_memory_gib']} GiB, compute capability "
        f"{info['compute_capability']}, cuDNN {info['cudnn']})"
        if info.get("gpu")
        else ""
    )
    lines = [
        f"## GPU: {title}",
        "",
        f"Measured with `benchmarks/bench_gpu.py{' --smoke' if results['smoke'] else ''}` on {title}{gpu}, torch "
        f"{info['torch']} (CUDA {info['cuda']}), transformers {info['transformers']}, Python {info['python']}, "
        f"{info['date']}; random weights; wall time {results.get('wall_s', 0):.0f} s.",
    ]
    if info.get("nvidia_smi_start"):
        lines += ["", f"nvidia-smi at the start: `{info['nvidia_smi_start']}`"]
    ceilings = results.get("ceilings") or {}
    if ceilings:
        n = ceilings.get("matmul_n")
        lines += ["", "### Ceilings", ""]
        lines.append(
            table(
                ["measurement", "value"],
                [
                    [
                        f"bf16 matmul {n}^3 TFLOP/s (mean of {ceilings.get('matmul_iters')})",
                        fmt(ceilings.get("bf16_tflops")),
                    ],
                    [f"fp32 matmul {n}^3, TF32 allowed, TFLOP/s", fmt(ceilings.get("tf32_tflops"))],
                    [f"fp32 matmul {n}^3, IEEE (no TF32), TFLOP/s", fmt(ceilings.get("fp32_tflops"))],
                    ["device-to-device copy GB/s (read + write)", fmt(ceilings.get("copy_gb_per_s"))],
                    ["status", status_cell(ceilings)],
                ],
            )
        )
    vit = results.get("vit_inference") or {}
    if vit.get("rows"):
        lines += table_section(
            "Vision tower inference (bf16)",
            f"{describe_vision_tower(vit.get('model', {}))}. MFU: against the measured bf16 matmul "
            "ceiling. Error: relative L2 distance to an fp32 forward (IEEE matmuls, math attention) of the same "
            "batch. Peak: `torch.cuda.max_memory_allocated`; resident: allocated before the run (weights of the fp32 "
            "reference and bf16 models, inputs).",
            vit["rows"],
            {
                **vision_tower_columns("attention", "batch", "TFLOP/s", "tflops"),
                "error vs fp32": lambda r: sci(r.get("rel_error_vs_fp32")),
                "status": status_cell,
            },
        )
    train = results.get("vit_training") or {}
    if train.get("rows"):
        lines += table_section(
            "Vision tower training step",
            train.get("precision", ""),
            train["rows"],
            {
                **vision_tower_columns("configuration", "step", "model TFLOP/s (3x forward)", "model_tflops"),
                "status": status_cell,
            },
        )
        opt = train.get("optimizer") or {}
        if opt.get("status") == "ok":
            lines += [
                "",
                f"{opt['name']}: {opt['ms_per_step']:.1f} ms, states {opt['states_gib']:.2f} GiB, peak with weights, "
                f"gradients and states {fmt(opt.get('peak_gib_with_states_and_grads'), 2)} GiB.",
            ]
        elif opt:
            lines += ["", f"{opt.get('name')}: {status_cell(opt)}"]
    comp = results.get("compile") or {}
    if comp.get("status"):
        lines += table_section(
            "torch.compile of the vision tower (bf16, SDPA)",
            "",
            [comp],
            {
                "backend": lambda r: r.get("backend"),
                "batch": lambda r: r.get("batch"),
                "compile s (first call)": col("compile_s"),
                "eager images/s": col("eager_images_per_s"),
                "compiled images/s": col("compiled_images_per_s"),
                "speed-up": col("speedup", 2, "x"),
                "error vs eager": lambda r: sci(r.get("rel_error_vs_eager")),
                "status": status_cell,
            },
        )
    dec = results.get("decoding") or {}
    if dec.get("rows"):
        settings = dec.get("settings", {})
        text = settings.get("text", {})
        lines += table_section(
            "Caption decoding",
            f"Text tower {text.get('num_hidden_layers')} x {text.get('hidden_size')} (vocab {text.get('vocab_size')}) "
            f"with cross-attention to a {settings.get('context_tokens')}-token context, exactly "
            f"{settings.get('new_tokens')} new tokens. Bound: {settings.get('bound')}.",
            dec["rows"],
            {
                "dtype": lambda r: r["dtype"],
                "decoding": lambda r: "greedy" if r["num_beams"] == 1 else f"{r['num_beams']} beams",
                "batch": lambda r: r["batch"],
                "ms/step": col("ms_per_step", 2),
                "tokens/s": col("tokens_per_s"),
                "bound ms/step": col("bound_ms_per_step", 3),
                "bound/measured": col("fraction_of_bound", 3),
                **memory_columns(),
                "tokens = fp32": col("token_agreement_with_fp32", 2),
                "status": status_cell,
            },
        )
    errors = results.get("section_errors") or {}
    if errors:
        lines += ["", "### Section errors", ""] + [f"- {name}: {text}" for name, text in errors.items()]
    return "\n".join(lines) + "\n"


# ---- main -----------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/gpu"), help="output folder")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script in seconds, on CPU too")
    parser.add_argument(
        "--budget", type=float, default=300.0, help="wall-clock seconds for the whole run (the compile child last)"
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--compile-timeout", type=float, default=None, help="seconds for the compile child process")
    parser.add_argument("--compile-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget)
    sizes = SMOKE if args.smoke else FULL
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stubbed = stub_missing_media_backends()
    if args.compile_child:
        compile_child(args, sizes, device)
        return 0
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "smoke": args.smoke,
        "budget_s": args.budget,
        "sections": sections,
        "sizes": {k: v for k, v in sizes.items() if k != "vit_iters"} | {"vit_iters": dict(sizes["vit_iters"])},
        "machine": machine(device, stubbed),
        "ceilings": {},
        "vit_inference": {"rows": []},
        "vit_training": {"rows": []},
        "decoding": {"rows": []},
        "compile": {},
        "section_errors": {},
    }

    def save() -> None:
        results["wall_s"] = budget.elapsed()
        (out / "gpu_bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        (out / "gpu_bench.md").write_text(to_markdown(results), encoding="utf-8")

    print(
        f"bench_gpu on {results['machine'].get('gpu') or device}; torch {torch.__version__}; "
        f"budget {args.budget:.0f} s"
        f"{'; stubbed ' + ', '.join(stubbed) if stubbed else ''}",
        flush=True,
    )
    save()

    def section(name: str, fn: Callable[[], None], always: bool = False) -> None:
        if name not in sections and not always:
            return
        print(f"[{budget.elapsed():6.1f} s] {name}", flush=True)
        try:
            fn()
        except Exception as error:
            results["section_errors"][name] = error_text(error)
            results.setdefault("section_tracebacks", {})[name] = traceback.format_exc()[-3000:]
            print(f"  ! section {name}: {error_text(error)[:300]}", flush=True)
        reset_peak(device)
        save()

    def ceilings() -> None:
        results["ceilings"] = attempt({}, lambda: measure_ceilings(sizes, device), device)
        c = results["ceilings"]
        print(
            f"  bf16 {fmt(c.get('bf16_tflops'))} TFLOP/s, tf32 {fmt(c.get('tf32_tflops'))}, fp32 "
            f"{fmt(c.get('fp32_tflops'))}, copy {fmt(c.get('copy_gb_per_s'))} GB/s",
            flush=True,
        )

    section("ceilings", ceilings)
    vision: dict = {}
    if {"vit", "train"} & set(sections):
        section("vision model", lambda: vision.update(model=build_vision(sizes, device).eval()), always=True)
    if "model" in vision:
        section("vit", lambda: run_vit_inference(sizes, device, results, save, budget, vision["model"]))
        section("train", lambda: run_vit_training(sizes, device, results, save, budget, vision["model"]))
        vision.clear()
        reset_peak(device)
    section("decode", lambda: run_decoding(sizes, device, results, save, budget))
    section("compile", lambda: run_compile(args, sizes, device, results, save, budget))
    if device.type == "cuda":
        results["machine"]["nvidia_smi_end"] = nvidia_smi()
    save()
    print(f"[{budget.elapsed():6.1f} s] done; wrote {out / 'gpu_bench.json'} and {out / 'gpu_bench.md'}\n", flush=True)
    print(to_markdown(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
