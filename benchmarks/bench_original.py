"""Side by side with the original MiCo code: captioning, the ViT forward and preprocessing, same weights and inputs.

Given a checkout of github.com/invictus717/MiCo (`--original_repo`) and a Python environment with its pins
(`--original_python`: torch 2.0.1, torchvision 0.15.2, torchaudio 2.0.2, transformers 4.31, decord, timm, easydict,
einops, ipdb), this benchmark

1. builds the package's `MiCoForConditionalGeneration` with random weights (drawn as for the parity fixture: every
   parameter non-trivial, so a wrong mapping or a near-tie shows) at the issue's sizes: a ViT of ViT-g width (1408,
   16 heads, MLP 6144) with 4 blocks and a BERT-base text tower (12 x 768, vocabulary 30,522) with cross-attention;
2. writes those weights in the original training layout (`ckpt/model_step_1.pt` + `log/hps.json`, the original key
   names from `convert_original.export_to_original`) and the inputs (contexts of 4 frames x 257 tokens, ViT pixels)
   to a temporary folder;
3. starts `benchmarks/original_driver.py` under `--original_python`, which loads them with the original loader and
   answers timing requests; each case alternates the original and the package after one untimed call each, both with
   the same number of torch threads, and reports the medians and the median of per-pair ratios;
4. checks the outputs: caption tokens identical (after `[CLS]`, up to `[SEP]`), ViT tokens within the parity
   tolerance (1e-5), preprocessing within 1e-4 (image, video) and 1e-3 (audio) of the original's.

Cases: captions of 40 new tokens at most (greedy and 3 beams, length penalty 0.6, batch 1 and 4), the ViT on a batch
of 4 images, and preprocessing of tests/fixtures/media (test.jpeg; test.mp4 at 4 and 8 frames; test.flac, 3 slices)
in batches of 8 files (the original processes one file per call, as its data loader does).

    python benchmarks/bench_original.py --original_repo DIR --original_python PY [--quick | --smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import roofline  # noqa: E402
from benchmarks.common import markdown_table, write_json  # noqa: E402
from modeling_mico import MiCoConfig, MiCoForConditionalGeneration, MiCoProcessor  # noqa: E402
from modeling_mico.convert_original import export_to_original  # noqa: E402


DRIVER = Path(__file__).resolve().parent / "original_driver.py"
MEDIA = ROOT / "tests" / "fixtures" / "media"
PARITY_HYPER_PARAMETERS = ROOT / "tests" / "fixtures" / "parity" / "hub" / "config.json"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "original.json"
CLS, SEP, PAD = 101, 102, 0
NUM_FRAMES = 4
TOKENS_PER_FRAME = 257
TOLERANCES = {"vit": 1e-5, "image": 1e-4, "video": 1e-4, "audio": 1e-3}


@dataclass(frozen=True)
class Mode:
    """Sizes and repeats of one run."""

    vision: dict
    text: dict
    new_tokens: int
    caption_cases: tuple[tuple[int, int], ...]  # (batch, beams)
    caption_repeats: int
    vit_batch: int
    files: int
    repeats: int


BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
VIT_G_4 = dict(hidden_size=1408, num_hidden_layers=4, num_attention_heads=16, intermediate_size=6144)
CAPTION_CASES = ((1, 1), (1, 3), (4, 1), (4, 3))
MODES = {
    "full": Mode(VIT_G_4, BERT_BASE, 40, CAPTION_CASES, 1, 4, 8, 3),
    "quick": Mode(VIT_G_4, BERT_BASE, 40, CAPTION_CASES, 1, 4, 4, 2),
    "smoke": Mode(
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
        6,
        ((1, 1), (2, 3)),
        1,
        2,
        2,
        1,
    ),
}


def build_config(mode: Mode) -> MiCoConfig:
    """The configuration of the mode's sizes: 224 px images in 14 px patches, 4 video frames, no dropout."""
    return MiCoConfig(
        vision_config={**mode.vision, "image_size": 224, "patch_size": 14},
        text_config={**mode.text, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        knowledge_modalities={"vision": NUM_FRAMES, "audio": 3, "depth": 2},
    )


def build_model(mode: Mode, seed: int = 0) -> MiCoForConditionalGeneration:
    """The package's captioning model at the mode's sizes, with every parameter drawn as for the parity fixture:
    Linear/conv weights N(0, 1/fan_in), biases (q/v biases included) N(0, 0.1), LayerNorm weights 1 + N(0, 0.1),
    embedding tables N(0, 0.25), other tensors N(0, 0.04), temperature 0.05."""
    model = MiCoForConditionalGeneration(build_config(mode)).eval()
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            module = modules[name.rsplit(".", 1)[0]] if "." in name else model
            if name.endswith("temperature"):
                parameter.fill_(0.05)
            elif name.endswith("bias"):
                parameter.normal_(0.0, 0.1, generator=generator)
            elif isinstance(module, torch.nn.LayerNorm):
                parameter.normal_(1.0, 0.1, generator=generator)
            elif isinstance(module, torch.nn.Embedding):
                parameter.normal_(0.0, 0.25, generator=generator)
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                parameter.normal_(0.0, parameter[0].numel() ** -0.5, generator=generator)
            else:
                parameter.normal_(0.0, 0.04, generator=generator)
    return model


def original_hyper_parameters(config: MiCoConfig) -> dict:
    """The original `model_cfg` (hps.json) of `config`: the parity fixture's, with this model's tower sizes in its
    `evaclip_model_cfg` and `bert_config` entries (read by the driver's patches P1 and P3)."""
    hyper_parameters = json.loads(PARITY_HYPER_PARAMETERS.read_text(encoding="utf-8"))
    vision, text = config.vision_config, config.text_config
    hyper_parameters["evaclip_model_cfg"]["vision_cfg"].update(
        layers=vision.num_hidden_layers,
        width=vision.hidden_size,
        head_width=vision.hidden_size // vision.num_attention_heads,
        # EVA builds int(width * mlp_ratio) hidden units: half a unit above the exact ratio survives the rounding
        mlp_ratio=(vision.intermediate_size + 0.5) / vision.hidden_size,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
    )
    hyper_parameters["bert_config"].update(
        hidden_size=text.hidden_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        intermediate_size=text.intermediate_size,
        vocab_size=text.vocab_size,
    )
    hyper_parameters.update(
        contra_dim=config.projection_dim,
        vision_resolution=vision.image_size,
        **{f"max_{name}_sample_num": frames for name, frames in config.knowledge_modalities.items()},
    )
    return hyper_parameters


def write_original_checkpoint(model: MiCoForConditionalGeneration, directory: Path) -> None:
    """`model`'s weights in the original training layout under `directory` (ckpt/ + log/hps.json)."""
    weights = {key: tensor.contiguous() for key, tensor in export_to_original(model.state_dict()).items()}
    (directory / "ckpt").mkdir(parents=True)
    (directory / "log").mkdir()
    torch.save(weights, directory / "ckpt" / "model_step_1.pt")
    hps = {"model_cfg": original_hyper_parameters(model.config), "run_cfg": {}, "data_cfg": {}}
    (directory / "log" / "hps.json").write_text(json.dumps(hps, indent=1), encoding="utf-8")


def make_inputs(model: MiCoForConditionalGeneration, mode: Mode, seed: int = 0) -> dict[str, np.ndarray]:
    """Contexts of `NUM_FRAMES` x 257 tokens per caption batch size, and ViT pixels on a 1/8 grid (exact in fp32)."""
    generator = torch.Generator().manual_seed(seed)
    width = model.config.text_config.hidden_size
    inputs = {
        f"context_b{batch}": torch.randn(batch, NUM_FRAMES * TOKENS_PER_FRAME, width, generator=generator).numpy()
        for batch in sorted({batch for batch, _ in mode.caption_cases})
    }
    pixels = torch.randint(-16, 17, (mode.vit_batch, 1, 3, 224, 224), generator=generator).float() / 8
    inputs["vit_pixels"] = pixels.numpy()
    return inputs


class OriginalProcess:
    """The driver process running the original code: one JSON request, one JSON reply."""

    def __init__(self, original_repo: Path, original_python: Path, workdir: Path, threads: int) -> None:
        self.workdir = workdir
        self.stderr = open(workdir / "original_stderr.log", "w", encoding="utf-8")  # noqa: SIM115 (closed in close)
        command = [str(original_python), str(DRIVER), "--original_repo", str(original_repo)]
        command += ["--workdir", str(workdir), "--threads", str(threads)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True
        )
        self.ready = self._reply("starting the original code")
        if self.ready["missing"] or self.ready["unexpected"]:
            self.close()
            raise RuntimeError(
                f"the original model did not load the package's weights exactly: missing {self.ready['missing']}, "
                f"unexpected {self.ready['unexpected']}"
            )

    def _reply(self, what: str) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            log = (self.workdir / "original_stderr.log").read_text(encoding="utf-8")[-3000:]
            raise RuntimeError(f"the original code exited ({self.process.returncode}) while {what}:\n{log}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the original code failed while {what}: {reply['error']}")
        return reply

    def call(self, op: str, **request) -> float:
        """Run one request; returns the seconds the original code took (measured in the driver)."""
        self.process.stdin.write(json.dumps({"op": op, **request}) + "\n")
        self.process.stdin.flush()
        return self._reply(f"running {op} {request}")["seconds"]

    def output(self, name: str) -> np.ndarray:
        """An output the original saved with `save=name`."""
        return np.load(self.workdir / f"{name}.npy")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)
        self.stderr.close()


def alternate(original: Callable[[], float], package: Callable[[], float], repeats: int, warmup: int) -> dict:
    """Run the original and the package alternately; medians and the median of per-pair speed-ups."""
    for _ in range(warmup):
        original()
        package()
    pairs = [(original(), package()) for _ in range(repeats)]
    return {
        "original_s": statistics.median(first for first, _ in pairs),
        "package_s": statistics.median(second for _, second in pairs),
        "speedup": statistics.median(first / second for first, second in pairs),
        "repeats": repeats,
    }


def caption_tokens(ids: np.ndarray | torch.Tensor) -> list[list[int]]:
    """Generated tokens per row: `[CLS]` dropped, cut before `[SEP]`, `[PAD]` dropped."""
    rows = []
    for row in np.asarray(ids).tolist():
        row = row[1:]
        row = row[: row.index(SEP)] if SEP in row else row
        rows.append([token for token in row if token != PAD])
    return rows


def compare_arrays(original: np.ndarray, package: np.ndarray, tolerance: float) -> dict:
    """Shapes and the max-abs difference against `tolerance`."""
    if original.shape != package.shape:
        return {"identical": False, "detail": f"shapes differ: original {original.shape}, package {package.shape}"}
    difference = float(np.abs(original - package).max())
    return {"identical": difference <= tolerance, "max_abs_diff": difference, "tolerance": tolerance}


def caption_row(
    model, original: OriginalProcess, context: torch.Tensor, beams: int, mode: Mode, machine: dict | None = None
) -> dict:
    """Captions of every item of `context` with `beams` beams (1: greedy), original vs package; with `machine` (the
    roofline's rates), also the package's bound time per caption and the speed-up it would give."""
    batch = context.shape[0]
    name = f"caption_b{batch}_k{beams}"
    kwargs = dict(num_beams=beams, max_new_tokens=mode.new_tokens, length_penalty=0.6)
    # length_penalty only scores beams (Transformers warns about it in greedy decoding)
    package_kwargs = kwargs if beams > 1 else {**kwargs, "length_penalty": None}
    result: dict = {}

    def package() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            result["ids"] = model.generate(context=context, **package_kwargs)
            return time.perf_counter() - start

    def original_caption() -> float:
        return original.call("caption", batch=batch, save=name, **kwargs)

    # captioning batch after batch as `caption_files` does, inside `keep_decoding_weights`: one untimed call on each
    # side first; the package's builds the decoding weights the later calls reuse (timed apart)
    with model.keep_decoding_weights():
        first_call = package()
        original_caption()
        timing = alternate(original_caption, package, mode.caption_repeats, 0)
    expected, got = caption_tokens(original.output(name)), caption_tokens(result["ids"])
    check = {"identical": expected == got, "tokens_per_caption": statistics.mean(map(len, expected))}
    if expected != got:
        check["detail"] = f"original {expected}, package {got}"
    if machine is not None:
        text = model.config.text_config
        bound = roofline.caption_bound_seconds(
            machine,
            steps=result["ids"].shape[1] - 1,  # every new position, the last `[SEP]` included
            hidden=text.hidden_size,
            intermediate=text.intermediate_size,
            layers=text.num_hidden_layers,
            vocab=text.vocab_size,
            context_length=context.shape[1],
            items=batch,
            rows=batch * beams,
        )
        check.update(bound_s=bound / batch, speedup_at_bound=timing["original_s"] / bound)
    return {
        "path": f"{'greedy' if beams == 1 else f'{beams}-beam'} caption, batch {batch}",
        "unit": "s / caption",
        "original": timing["original_s"] / batch,
        "package": timing["package_s"] / batch,
        "package_first_call": first_call / batch,
        **timing,
        **check,
    }


def vit_row(model, original: OriginalProcess, inputs: dict, mode: Mode) -> dict:
    """The vision tower on a batch of images, original vs package."""
    pixels = torch.from_numpy(inputs["vit_pixels"])
    result: dict = {}

    def package() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            result["tokens"] = model.mico.encode_modality("image", pixels)
            return time.perf_counter() - start

    timing = alternate(lambda: original.call("vit", save="vit"), package, mode.repeats, 1)
    vision = model.config.vision_config
    return {
        "path": f"ViT {vision.hidden_size} wide, {vision.num_hidden_layers} blocks, batch {mode.vit_batch}, fp32",
        "unit": "images / s",
        "original": mode.vit_batch / timing["original_s"],
        "package": mode.vit_batch / timing["package_s"],
        **timing,
        **compare_arrays(original.output("vit"), result["tokens"].numpy(), TOLERANCES["vit"]),
    }


def preprocessing_row(
    original: OriginalProcess, kind: str, file: str, option: tuple[str, int] | None, mode: Mode
) -> dict:
    """`mode.files` copies of a media file through the package's processor and the original's, `option` being
    `("num_frames", F)` or `("num_slices", S)`."""
    processor = MiCoProcessor()
    files = [str(MEDIA / file)] * mode.files
    options = dict([option]) if option else {}
    name = f"prep_{kind}_{option[1] if option else 1}"
    call = {
        "image": lambda: processor(images=files)["pixel_values"],
        "video": lambda: processor(videos=files, num_frames=options["num_frames"])["pixel_values_videos"],
        "audio": lambda: processor(audio=files, num_slices=options["num_slices"])["input_features"],
    }[kind]
    result: dict = {}

    def package() -> float:
        start = time.perf_counter()
        result["output"] = call()
        return time.perf_counter() - start

    timing = alternate(
        lambda: original.call("preprocess", kind=kind, files=files, save=name, **options), package, mode.repeats, 1
    )
    detail = f"{option[1]} {option[0].removeprefix('num_').replace('_', ' ')}" if option else "224 px"
    return {
        "path": f"{kind} preprocessing, {file}, {detail}, {mode.files} files",
        "unit": "clips / s",
        "original": mode.files / timing["original_s"],
        "package": mode.files / timing["package_s"],
        **timing,
        **compare_arrays(original.output(name), result["output"].numpy(), TOLERANCES[kind]),
    }


PREPROCESSING_CASES = (
    ("image", "test.jpeg", None),
    ("video", "test.mp4", ("num_frames", 4)),
    ("video", "test.mp4", ("num_frames", 8)),
    ("audio", "test.flac", ("num_slices", 3)),
)


def run(
    original_repo: str | os.PathLike,
    original_python: str | os.PathLike,
    quick: bool = False,
    smoke: bool = False,
    threads: int | None = None,
    machine: dict | None = None,
) -> dict:
    """Run every case against the original; returns `{"rows": [...], "settings": {...}, "original": {...}}`. With
    `machine` (the roofline's rates, `benchmarks.roofline.measure_machine`) caption rows also give their bound."""
    original_repo, original_python = Path(original_repo), Path(original_python)
    if not (original_repo / "model" / "mico.py").is_file():
        raise FileNotFoundError(f"--original_repo {original_repo} is not a MiCo checkout (no model/mico.py)")
    if not original_python.is_file():
        raise FileNotFoundError(f"--original_python {original_python} does not exist")
    mode_name = "smoke" if smoke else "quick" if quick else "full"
    mode = MODES[mode_name]
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    model = build_model(mode)
    inputs = make_inputs(model, mode)
    with tempfile.TemporaryDirectory(prefix="mico-original-") as tmp:
        workdir = Path(tmp)
        write_original_checkpoint(model, workdir / "repo")
        np.savez(workdir / "inputs.npz", **inputs)
        original = OriginalProcess(original_repo, original_python, workdir, threads)
        try:
            rows = [
                caption_row(model, original, torch.from_numpy(inputs[f"context_b{batch}"]), beams, mode, machine)
                for batch, beams in mode.caption_cases
            ]
            rows.append(vit_row(model, original, inputs, mode))
            rows += [preprocessing_row(original, *case, mode) for case in PREPROCESSING_CASES]
        finally:
            original.close()
    for row in rows:
        row["speedup_vs_original"] = row["speedup"]
    return {
        "rows": rows,
        "original": {"repo": str(original_repo), "python": str(original_python), **original.ready},
        "settings": {"mode": mode_name, "threads": threads, "new_tokens": mode.new_tokens, **mode.__dict__},
    }


def minimum_speedup(results: dict, prefix: str | tuple[str, ...]) -> float | None:
    """The smallest speed-up over the rows whose path starts with `prefix` (`None` when there is none)."""
    values = [row["speedup"] for row in results.get("rows", []) if row["path"].startswith(prefix)]
    return min(values) if values else None


def to_markdown(results: dict) -> str:
    """The side-by-side table."""
    if "skipped" in results:
        return f"Skipped: {results['skipped']}."
    header = ["path", "unit", "original", "package", "package speed-up", "outputs"]
    rows = []
    for row in results["rows"]:
        if "tokens_per_caption" in row:
            outputs = "identical tokens" if row["identical"] else f"**tokens differ**: {row['detail']}"
        elif "max_abs_diff" in row:
            outputs = f"max diff {row['max_abs_diff']:.1e}" + ("" if row["identical"] else " **over tolerance**")
        else:
            outputs = f"**{row['detail']}**"
        rows.append(
            [
                row["path"],
                row["unit"],
                f"{row['original']:.3g}",
                f"{row['package']:.3g}",
                f"{row['speedup']:.2f}x",
                outputs,
            ]
        )
    settings, original = results["settings"], results["original"]
    note = (
        f"The original code ({original['repo']}, torch {original['torch']}) in its own environment "
        f"({original['python']}) against the package, same random weights and inputs, {settings['threads']} torch "
        "threads each, alternated runs after one untimed call each (median; speed-up = median of per-pair ratios). "
        "Captions stop at `[SEP]` or "
        f"after {settings['new_tokens']} new tokens (the rows give the tokens identical or the first difference)."
    )
    return note + "\n\n" + markdown_table(header, rows, "llrrrl") + caption_bounds_markdown(results["rows"])


def caption_bounds_markdown(rows: list[dict]) -> str:
    """The caption rows against their roofline bound (empty when the run had no machine rates)."""
    bounded = [row for row in rows if "bound_s" in row]
    if not bounded:
        return ""
    header = [
        "path",
        "package first call s / caption",
        "package s / caption",
        "bound s / caption",
        "fraction of bound",
        "speed-up at the bound",
    ]
    table = [
        [
            row["path"],
            f"{row['package_first_call']:.3g}",
            f"{row['package']:.3g}",
            f"{row['bound_s']:.3g}",
            f"{row['bound_s'] / row['package']:.2f}",
            f"{row['speedup_at_bound']:.2f}x",
        ]
        for row in bounded
    ]
    note = (
        "Bound: the context's key/value projections at the fp32 GEMM rate plus every decoding step at its own roofline "
        "bound (`benchmarks.roofline.caption_bound_seconds`, the rates measured at the start of the run); the speed-up "
        "at the bound is the most any fp32 implementation could show against the original on this machine. The "
        "package captions inside `keep_decoding_weights` (as `caption_files` does): its first call also builds the "
        "decoding weights the later calls reuse (fused, and packed for the decoding kernels or, without them, for "
        "oneDNN with several captions or beams); the timed calls follow one untimed call on each side."
    )
    return "\n\n" + note + "\n\n" + markdown_table(header, table, "lrrrrr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original_repo", required=True, help="checkout of github.com/invictus717/MiCo")
    parser.add_argument("--original_python", required=True, help="Python of an environment with the original's pins")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repeats and files")
    size.add_argument("--smoke", action="store_true", help="tiny towers, short captions (seconds; for tests)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="where to write the JSON results")
    args = parser.parse_args()
    machine = roofline.measure_machine(quick=args.quick or args.smoke)
    results = run(args.original_repo, args.original_python, quick=args.quick, smoke=args.smoke, machine=machine)
    print(to_markdown(results))
    write_json(Path(args.output), results)


if __name__ == "__main__":
    main()
