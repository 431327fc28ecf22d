"""Each install of `mico-transformers` runs what it promises, with only the packages it declares.

`pip install .` (inference) runs conversion, captioning, search, zero-shot classification and retrieval evaluation;
`[train]` every training example; `[ecosystem]` the sentence-transformers module; `[dev]` the test suite. Each is run
in an environment holding only the extra's dependency closure (tests/extras_env.py: pyproject's requirements followed
through the installed distributions' metadata, laid out as a site directory of symlinks, Python started with `-S`),
so an import of anything undeclared fails as in a fresh virtual environment, offline.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from extras_env import ROOT, build_site, dependency_closure, site_distributions


EXTRAS = {"base": (), "train": ("train",), "ecosystem": ("ecosystem",), "dev": ("dev",)}


def run_in_extra(extra: str, tmp_path: Path, script: Path | None = None) -> subprocess.CompletedProcess:
    """`python -S tests/extras_programs.py extra work [script]` in an environment of `extra`'s closure only."""
    site = tmp_path / f"site-{extra}"
    present = build_site(site, dependency_closure(EXTRAS[extra]))
    everything = build_site(tmp_path / "site-all", set(site_distributions()))
    work = tmp_path / f"work-{extra}"
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]),
        PYTHONNOUSERSITE="1",
        MICO_EXTRAS_OUTSIDE=json.dumps(sorted(everything - present)),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf-home"),
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="2",
    )
    command = [sys.executable, "-S", str(ROOT / "tests" / "extras_programs.py"), extra, str(work)]
    return subprocess.run(
        command + ([str(script)] if script else []), env=env, capture_output=True, text=True, timeout=900
    )


def test_closures_follow_pyproject_and_the_installed_metadata():
    base, train, dev = dependency_closure(), dependency_closure(("train",)), dependency_closure(("dev",))
    assert {"torch", "transformers", "tokenizers", "huggingface-hub", "safetensors", "decord", "soundfile"} <= base
    assert "filelock" in base  # transformers' own requirement, found through its metadata
    assert {"matplotlib", "peft", "deepspeed", "pytest", "sentence-transformers"}.isdisjoint(base)
    assert base < train < dev and {"peft", "evaluate", "matplotlib"} <= train and {"pytest", "ruff"} <= dev
    with pytest.raises(KeyError, match="pyproject.toml has no extra 'gpu'"):
        dependency_closure(("gpu",))


def test_an_undeclared_import_fails_and_a_declared_one_runs(tmp_path):
    """The check bites: a program importing matplotlib (declared by [train] only) fails with the inference install,
    naming the package and the file, and runs with [train]."""
    program = tmp_path / "plot_something.py"
    program.write_text("import modeling_mico.retrieval\nimport matplotlib\nprint('imported', matplotlib.__name__)\n")
    failed = run_in_extra("base", tmp_path, program)
    assert failed.returncode != 0
    assert f"undeclared import 'matplotlib' by {program}" in failed.stderr
    assert "dependency closure of mico-transformers (pyproject.toml)" in failed.stderr
    passed = run_in_extra("train", tmp_path, program)
    assert passed.returncode == 0, passed.stderr[-3000:]
    assert "imported matplotlib" in passed.stdout


@pytest.mark.slow
@pytest.mark.parametrize("extra", list(EXTRAS))
def test_each_extra_runs_its_programs_with_only_its_packages(extra, tmp_path):
    result = run_in_extra(extra, tmp_path)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["extra"] == extra
    if extra == "base":  # the retrieval results are written; the heat-maps degrade to a message without matplotlib
        results = json.loads((tmp_path / "work-base" / "retrieval" / "retrieval_results.json").read_text())
        assert results["num_items"] > 0 and "t2va/R@1" in results
        assert "heat-maps not drawn: matplotlib is not installed" in result.stdout + result.stderr


def test_retrieval_heatmaps_degrade_to_a_message_without_matplotlib(monkeypatch, capsys):
    """The inference install has no matplotlib: the retrieval script announces the missing heat-maps instead of
    failing after the retrieval was computed (the slow test above runs the whole script that way)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_retrieval_eval", ROOT / "examples" / "run_retrieval_eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.heatmaps_available()

    def missing(module: str, feature: str):
        raise ImportError(f"{feature} needs the `matplotlib` package, which is not installed")

    monkeypatch.setattr("modeling_mico.import_utils.require", missing)
    assert not script.heatmaps_available()
    assert capsys.readouterr().out.startswith("heat-maps not drawn: matplotlib is not installed (the similarity")
