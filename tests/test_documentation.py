"""The Python snippets and the shell commands of the README and of every page under docs/ run as written.

Snippets that name Hub repositories or the outputs of earlier commands run against local stand-ins: a Hugging Face
cache (offline) holding the parity fixture under the released repository's id and a converted tiny model under
`user/mico-vit-g-14`, and a working directory where `runs/tiny` and `runs/tiny-lora` were produced by the library.
"""

import ast
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from extras_env import tomllib


ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCKS = [
    (f"{page.relative_to(ROOT)} block {index}", block)
    for page in PAGES
    for index, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
]
RELEASE_REPO = "Yiyuan/MiCo-ViT-g-14-omnimodal-300k-b64K"
CONVERTED_REPO = "user/mico-vit-g-14"
PARITY_HUB = ROOT / "tests" / "fixtures" / "parity" / "hub"


def _cache_repo(cache: Path, repo_id: str, files: Path) -> None:
    """Lay `files` out as the cached snapshot of `repo_id`, as `huggingface_hub` stores downloads."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copytree(files, repo_dir / "snapshots" / commit)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A Hub cache and a working directory with everything the README's snippets load."""
    from peft import LoraConfig, get_peft_model

    from modeling_mico import MiCoConfig, MiCoForPreTraining, MiCoProcessor

    root = tmp_path_factory.mktemp("readme")
    work = root / "work"
    work.mkdir()
    (work / "tests").symlink_to(ROOT / "tests")
    torch.manual_seed(0)
    config = MiCoConfig.from_preset("tiny")
    model = MiCoForPreTraining(config)
    model.save_pretrained(work / "runs" / "tiny")
    MiCoProcessor.from_config(config).save_pretrained(work / "runs" / "tiny")
    adapter = get_peft_model(
        MiCoForPreTraining.from_pretrained(work / "runs" / "tiny"), LoraConfig(target_modules=["qkv"])
    )
    adapter.save_pretrained(work / "runs" / "tiny-lora")
    adapter.merge_and_unload().save_pretrained(work / "runs" / "tiny-lora" / "merged")

    cache = root / "hub"
    _cache_repo(cache, RELEASE_REPO, PARITY_HUB)
    _cache_repo(cache, CONVERTED_REPO, work / "runs" / "tiny")
    return work, cache


@pytest.mark.parametrize(("name", "block"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_documentation_snippet_runs(name, block, stand_ins, monkeypatch, tmp_path):
    work, cache = stand_ins
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.chdir(work)
    exec(compile(block.replace("/tmp/", f"{tmp_path}/"), name, "exec"), {})


# ---- commands -------------------------------------------------------------------------------------------------------
# Every command of a ```bash block is one of three kinds, and a new one must be classified here (never skipped
# silently): run by this file (in the page's order, in a fresh working directory, slow), run by another test with the
# same options (checked statically: the test, or a fixture it requests, names the script and every option), or one
# that cannot run inside the test suite (the suite itself, downloads), with what is checked instead.


def documented_commands() -> list[tuple[str, str]]:
    """(page, command) of every ```bash block line, continuations joined and comments dropped, in page order."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    found.append((str(page.relative_to(ROOT)), shlex.join(words)))
    return found


COMMANDS = documented_commands()

# Commands whose own test runs them: (page, the command's start, "tests/file.py::test_name").
TORCHRUN = "torchrun --nproc_per_node 2 examples/run_pretrain.py --model_name_or_path runs/init"
RUN_BY_TESTS = [
    ("README.md", "bash scripts/main_job.sh", "tests/test_main_job.py::test_main_job_end_to_end_on_a_tiny_run"),
    ("docs/main-job.md", "bash scripts/main_job.sh", "tests/test_main_job.py::test_main_job_end_to_end_on_a_tiny_run"),
    ("docs/ecosystem.md", "python examples/run_search.py index", "tests/test_search.py::test_run_search_command_line"),
    ("docs/ecosystem.md", "python examples/run_search.py query", "tests/test_search.py::test_run_search_command_line"),
    (
        "docs/ecosystem.md",
        "python examples/run_zero_shot_classification.py --model_name_or_path runs/tiny --inputs classes/",
        "tests/test_zero_shot.py::test_class_folders_give_the_labels_and_the_script_reports_accuracy",
    ),
    (
        "docs/ecosystem.md",
        "python examples/run_zero_shot_classification.py --model_name_or_path runs/tiny --attributes",
        "tests/test_zero_shot.py::test_attribute_table_script",
    ),
    (
        "docs/processing.md",
        "python examples/run_pretrain.py",
        "tests/test_dataset_inputs.py::test_run_pretrain_on_a_saved_dataset",
    ),
    (
        "docs/processing.md",
        "python examples/run_retrieval_eval.py",
        "tests/test_dataset_inputs.py::test_retrieval_cli_on_a_saved_dataset_equals_the_annotation_file",
    ),
    (
        "docs/training.md",
        f"{TORCHRUN} --train_file data/synthetic/train.jsonl --output_dir runs/ddp --",
        "tests/test_distributed_engines.py::test_ddp_resumed_on_two_processes_logs_the_uninterrupted_losses",
    ),
    (
        "docs/training.md",
        f"{TORCHRUN} --train_file data/synthetic/train.jsonl --output_dir runs/ddp-resumed",
        "tests/test_distributed_engines.py::test_ddp_resumed_on_two_processes_logs_the_uninterrupted_losses",
    ),
    (
        "docs/training.md",
        f"{TORCHRUN} --train_file data/synthetic/train.jsonl --output_dir runs/zero3",
        "tests/test_distributed_engines.py::test_deepspeed_zero_matches_ddp_resumes_and_converts_to_a_model_directory",
    ),
    (
        "docs/training.md",
        "python examples/write_shards.py",
        "tests/test_shards.py::test_write_shards_command_prints_the_pattern_to_train_on",
    ),
    (
        "docs/training.md",
        f"{TORCHRUN} --train_shards",
        "tests/test_shards.py::test_streaming_run_on_two_processes_killed_after_a_checkpoint_resumes_like_an_uninterrupted_run",
    ),
    (
        "docs/command-line.md",
        "python examples/run_pretrain.py pretrain.json",
        "tests/test_cli.py::test_training_options_parse_from_the_command_line_and_a_json_file",
    ),
    (
        "docs/performance.md",
        "python -m benchmarks --only original",
        "tests/test_bench_original.py::test_side_by_side_run_reports_ratios_and_catches_differing_outputs",
    ),
]

# Commands that cannot run inside the test suite, and the check that stands for them.
OUTSIDE_THE_SUITE = {
    "bash scripts/test.sh": "the test suite itself: `.ci/run` runs exactly this command",
    "bash scripts/install.sh": "the first step of scripts/test.sh, so CI runs exactly this command before the suite",
    "pip install torch --index-url https://download.pytorch.org/whl/cpu": (
        "downloads from PyTorch's index, which this machine cannot reach: install.sh's TORCH_INDEX=cpu uses this index"
    ),
    "pip install torch": "downloads PyPI's CUDA build (GBs): install.sh's TORCH_INDEX=cuda uses PyPI's index",
    "pip install .": "installs into the environment: tests/test_extras.py runs this install's programs with only its closure",
    "pip install '.[train]'": "installs into the environment: tests/test_extras.py runs [train]'s programs with its closure",
    "pip install '.[dev]'": "installs into the environment: tests/test_extras.py collects the tests with [dev]'s closure",
}

# Run here at a smaller size: these option values in place of the page's (every other word as documented).
SIZES = {"docs/fine-tuning.md": {"--num_samples": "40", "--max_steps": "2"}}


def sized(page: str, command: str) -> str:
    """`command` with the option values of `SIZES[page]` substituted."""
    words = shlex.split(command)
    for index, word in enumerate(words[:-1]):
        if word in SIZES.get(page, {}):
            words[index + 1] = SIZES[page][word]
    return shlex.join(words)


def run_by_test(page: str, command: str) -> str | None:
    matches = [test for where, start, test in RUN_BY_TESTS if where == page and command.startswith(start)]
    assert len(matches) <= 1, f"{page}: `{command}` matches several RUN_BY_TESTS entries"
    return matches[0] if matches else None


EXECUTED_PAGES = sorted(
    {page for page, command in COMMANDS if command not in OUTSIDE_THE_SUITE and not run_by_test(page, command)}
)


def test_every_documented_command_is_run_or_stands_for_a_check():
    """Each command is classified, each classification is used, and the checks for the ones outside hold."""
    assert len({page for page, _ in COMMANDS}) >= 6 and EXECUTED_PAGES
    documented = {command for _, command in COMMANDS}
    assert set(OUTSIDE_THE_SUITE) <= documented, set(OUTSIDE_THE_SUITE) - documented
    for page, start, _ in RUN_BY_TESTS:
        assert any(p == page and c.startswith(start) for p, c in COMMANDS), f"{page} has no command `{start} ...`"
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == "bash scripts/test.sh"
    test_script = [line for line in (ROOT / "scripts" / "test.sh").read_text().splitlines() if line.startswith("bash")]
    assert test_script[0] == "bash scripts/install.sh"
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert "cpu) index=https://download.pytorch.org/whl/cpu ;;" in install
    assert "cuda) index=https://pypi.org/simple ;;" in install
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"train", "dev"} <= set(extras)
    from test_extras import EXTRAS

    assert {"base", "train", "dev"} <= set(EXTRAS)


def _function_sources(test: str) -> str:
    """Source of a test function and of the module-level functions (fixtures, helpers) and constants it names."""
    path, name = test.split("::")
    text = (ROOT / path).read_text()
    tree = ast.parse(text)
    definitions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            definitions.update({target.id: node for target in node.targets if isinstance(target, ast.Name)})
    assert isinstance(definitions.get(name), ast.FunctionDef), f"{test} does not exist"
    pending, seen, sources = [name], set(), []
    while pending:
        current = pending.pop()
        if current in seen or current not in definitions:
            continue
        seen.add(current)
        node = definitions[current]
        sources.append(ast.get_source_segment(text, node))
        pending.extend(argument.arg for argument in getattr(getattr(node, "args", None), "args", []))
        pending.extend(child.id for child in ast.walk(node) if isinstance(child, ast.Name))
    return "\n".join(sources)


@pytest.mark.parametrize(
    ("page", "start", "test"), RUN_BY_TESTS, ids=[f"{page}: {start}" for page, start, _ in RUN_BY_TESTS]
)
def test_commands_run_by_other_tests_name_every_option(page, start, test):
    """The test (or a fixture it requests) runs the script with every option the documented command gives."""
    source = _function_sources(test)
    for _, command in (item for item in COMMANDS if item[0] == page and item[1].startswith(start)):
        words = shlex.split(command)
        scripts = [Path(word).name for word in words if word.endswith((".py", ".sh"))]
        script = scripts[0] if scripts else words[words.index("-m") + 1]  # a file, or `python -m module`
        assert Path(script).stem in source, f"{test} does not run {script}"
        missing = [word for word in words if word.startswith("--") and f'"{word}"' not in source]
        assert not missing, f"{test} runs {script} without {missing}, which {page} gives"


@pytest.mark.slow
@pytest.mark.parametrize("page", EXECUTED_PAGES)
def test_documented_commands_run(page, tmp_path):
    """The page's commands, in order, in a fresh working directory holding a tiny model at `runs/tiny` and the
    repository's programs; each must exit 0."""
    from modeling_mico import MiCoConfig, MiCoForPreTraining, MiCoProcessor

    work = tmp_path / "work"
    work.mkdir()
    for name in ("examples", "conversion", "scripts", "tests", "benchmarks", "modeling_mico", "pyproject.toml"):
        (work / name).symlink_to(ROOT / name)
    commands = [command for where, command in COMMANDS if where == page and command not in OUTSIDE_THE_SUITE]
    commands = [command for command in commands if not run_by_test(page, command)]
    if not any("--output_dir runs/tiny " in f"{command} " for command in commands):  # unless the page trains it
        torch.manual_seed(0)
        config = MiCoConfig.from_preset("tiny")
        MiCoForPreTraining(config).save_pretrained(work / "runs" / "tiny")
        MiCoProcessor.from_config(config).save_pretrained(work / "runs" / "tiny")
    cache = tmp_path / "hub"
    _cache_repo(cache, RELEASE_REPO, PARITY_HUB)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    for command in commands:
        result = subprocess.run(
            ["bash", "-c", sized(page, command)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{page}: `{command}` failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def test_model_page_api_reference_names_what_the_package_exports():
    """Every `[[autodoc]] Name` of the model page is exported by `modeling_mico` with the methods listed under it, and
    every public model class is listed."""
    import modeling_mico

    page = (ROOT / "docs" / "model_doc" / "mico.md").read_text()
    entries = re.findall(r"\[\[autodoc\]\] (\w+)\n((?:    - \w+\n)*)", page)
    assert len(entries) >= 15
    for name, methods in entries:
        assert hasattr(modeling_mico, name), f"modeling_mico has no {name}"
        for method in re.findall(r"- (\w+)", methods):
            assert callable(getattr(getattr(modeling_mico, name), method, None)), f"{name} has no method {method}"
    listed = {name for name, _ in entries}
    models = {name for name in dir(modeling_mico) if name.startswith("MiCoFor") and not name.endswith("Output")}
    assert models <= listed, models - listed


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_relative_links_and_anchors_resolve():
    for page in PAGES:
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", page.read_text(), flags=re.S))
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.relative_to(ROOT)} links to a missing {target}"
            if anchor and linked.suffix == ".md":
                assert anchor in _anchors(linked), f"{page.relative_to(ROOT)}: no heading #{anchor} in {path or 'it'}"
