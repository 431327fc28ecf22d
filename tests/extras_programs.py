"""Run the programs an extra of `mico-transformers` promises, on tiny inputs, as their command lines would.

    python -S tests/extras_programs.py EXTRA WORKDIR [SCRIPT]   (inside the environment of tests/extras_env.py)

`EXTRA` is `base` (`pip install .`: conversion, captioning, search, zero-shot, retrieval evaluation, synthetic data),
`train` (`[train]`: pretraining, PEFT, classification and captioning fine-tuning, tar shards), `ecosystem`
(sentence-transformers) or `dev` (collecting the test suite, running two of its modules). Every program runs through `runpy` with its own
`sys.argv`, exactly as `python examples/<program>.py ...`. An import, by this repository's code, of a package the
environment does not hold fails at once with `undeclared import '<name>'`.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import runpy
import sys
import sysconfig
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT / "tests" / "fixtures" / "media"
MISSING_NAMES = set(json.loads(os.environ.get("MICO_EXTRAS_OUTSIDE", "[]")))
# code under these folders is third-party or the standard library: its imports are probes, not declarations
LIBRARIES = [Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib", "stdlib")]


class UndeclaredImportFinder(importlib.abc.MetaPathFinder):
    """Last finder on `sys.meta_path`: reached only when no installed package matched. For a package that is
    installed on this machine but outside the extra's closure it raises `ModuleNotFoundError("undeclared import ...")`
    when our code (anything outside site-packages and the standard library) imports it, and records it when a
    third-party library probes for it (Transformers' availability checks), which then sees it absent, as it would in
    a real environment."""

    def __init__(self, extra: str) -> None:
        self.extra = extra
        self.probed: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        name = fullname.partition(".")[0]
        if path is not None or name not in MISSING_NAMES:
            return None
        caller = sys._getframe(1)
        while caller is not None and "importlib" in caller.f_code.co_filename:  # the import machinery's frames
            caller = caller.f_back
        filename = Path(caller.f_code.co_filename).resolve() if caller is not None else None
        ours = filename is not None and filename.is_file() and not any(lib in filename.parents for lib in LIBRARIES)
        if ours:
            raise ModuleNotFoundError(
                f"undeclared import {name!r} by {filename}: it is not in the dependency closure of "
                f"mico-transformers{'' if self.extra == 'base' else f'[{self.extra}]'} (pyproject.toml)",
                name=name,
            )
        self.probed.add(name)
        return None


def run(script: str, *arguments: str) -> None:
    """`python <script> <arguments>`: run the program's `__main__`; a non-zero exit is an error."""
    print(f"$ python {script} {' '.join(arguments)}", flush=True)
    sys.argv = [str(ROOT / script), *arguments]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise RuntimeError(f"{script} exited with {exit_.code!r}") from exit_


def synthetic_data(work: Path) -> Path:
    data = work / "synthetic"
    if not data.exists():
        run("examples/make_synthetic_dataset.py", "--output_dir", str(data), "--num_samples", "12",
            "--image_size", "32")  # fmt: skip
    return data


def base(work: Path) -> None:
    """Inference: conversion, captioning, search, zero-shot, retrieval evaluation."""
    model = str(work / "converted")
    run("conversion/convert_mico_original_to_hf.py", "--checkpoint", str(ROOT / "tests/fixtures/parity/hub"),
        "--output_dir", model)  # fmt: skip
    data = synthetic_data(work)
    run("examples/run_captioning.py", "--model_name_or_path", model, "--inputs", str(MEDIA),
        "--output_file", str(work / "captions.jsonl"), "--num_beams", "2", "--max_new_tokens", "3")  # fmt: skip
    index = ["--model_name_or_path", model, "--index_dir", str(work / "index")]
    run("examples/run_search.py", "index", *index, "--inputs", str(MEDIA))
    run("examples/run_search.py", "query", *index, "--text", "a dog", "--media", str(MEDIA / "test.jpeg"),
        "--top_k", "2")  # fmt: skip
    run("examples/run_zero_shot_classification.py", "--model_name_or_path", model, "--inputs",
        str(data / "test.jsonl"), "--modalities", "image", "--label_column", "attributes.color",
        "--output_file", str(work / "zero_shot.jsonl"))  # fmt: skip
    run("examples/run_retrieval_eval.py", "--model_name_or_path", model, "--test_file", str(data / "test.jsonl"),
        "--output_dir", str(work / "retrieval"), "--modalities", "image", "audio", "va", "--itm_rerank_top_k", "2")  # fmt: skip


def train(work: Path) -> None:
    """Training: pretraining, PEFT, classification and captioning fine-tuning, tar shards."""
    data = synthetic_data(work)
    files = ["--train_file", str(data / "train.jsonl"), "--validation_file", str(data / "test.jsonl")]
    steps = ["--max_steps", "1", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
             "--report_to", "none", "--use_cpu", "--dataloader_num_workers", "0", "--save_strategy", "no"]  # fmt: skip
    model = str(work / "tiny")
    run("examples/run_pretrain.py", "--config_name", "tiny", *files, "--output_dir", model, "--do_train", "--do_eval",
        "--modalities", "image", "audio", *steps)  # fmt: skip
    run("examples/run_finetune_peft.py", "--model_name_or_path", model, *files, "--output_dir", str(work / "lora"),
        "--modalities", "image", "--do_train", "--do_eval", "--merge_and_save", *steps)  # fmt: skip
    run("examples/run_classification.py", "--model_name_or_path", model, "--modality", "image", *files,
        "--label_column", "attributes.color", "--output_dir", str(work / "colour"), "--do_train", "--do_eval", *steps)  # fmt: skip
    run("examples/run_captioning_finetune.py", "--model_name_or_path", model, "--modalities", "image", *files,
        "--output_dir", str(work / "captions"), "--do_train", "--do_eval", "--num_beams", "1",
        "--max_new_tokens", "3", *steps)  # fmt: skip
    run("examples/write_shards.py", "--train_file", str(data / "train.jsonl"), "--output_dir", str(work / "shards"),
        "--samples_per_shard", "4")  # fmt: skip


def ecosystem(work: Path) -> None:
    """sentence-transformers over a saved tiny model."""
    import torch
    from sentence_transformers import SentenceTransformer

    from modeling_mico import MiCoConfig, MiCoModel, MiCoProcessor

    config = MiCoConfig.from_preset("tiny")
    MiCoModel(config).save_pretrained(work / "tiny-st")
    MiCoProcessor.from_config(config).save_pretrained(work / "tiny-st")
    encoder = SentenceTransformer(str(work / "tiny-st"), trust_remote_code=True, device="cpu")
    texts = encoder.encode(["a dog barking"], convert_to_tensor=True)
    images = encoder.encode([str(MEDIA / "test.jpeg")], convert_to_tensor=True)
    assert torch.isfinite(encoder.similarity(texts, images)).all()


def dev(work: Path) -> None:
    """The test suite: pytest collects (imports) every test module and conftest, then runs the fast tests of two
    modules that need no subprocess (which would leave this environment): annotations and the benchmarks."""
    import pytest

    code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")])
    if code != 0:
        raise RuntimeError(f"pytest could not collect the test suite (exit {code})")
    modules = [str(ROOT / "tests" / name) for name in ("test_annotations.py", "test_benchmarks.py")]
    code = pytest.main(["-q", "-m", "not slow", "-p", "no:cacheprovider", *modules])
    if code != 0:
        raise RuntimeError(f"the tests of {modules} failed in the [dev] environment (exit {code})")


PROGRAMS = {"base": base, "train": train, "ecosystem": ecosystem, "dev": dev}

if __name__ == "__main__":
    extra, work, *script = sys.argv[1:]  # a third argument runs that one script instead of the extra's programs
    finder = UndeclaredImportFinder(extra)
    sys.meta_path.append(finder)
    os.chdir(work)
    if script:
        runpy.run_path(script[0], run_name="__main__")
    else:
        PROGRAMS[extra](Path(work))
    print(json.dumps({"extra": extra, "ok": True, "absent_packages_probed": sorted(finder.probed)}))
