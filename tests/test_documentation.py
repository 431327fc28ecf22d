"""The Python snippets of the README and of every page under docs/ run as written.

Snippets that name Hub repositories or the outputs of earlier commands run against local stand-ins: a Hugging Face
cache (offline) holding the parity fixture under the released repository's id and a converted tiny model under
`user/mico-vit-g-14`, and a working directory where `runs/tiny` and `runs/tiny-lora` were produced by the library.
"""

import re
import shutil
from pathlib import Path

import pytest
import torch


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
    adapter = get_peft_model(MiCoForPreTraining.from_pretrained(work / "runs" / "tiny"), LoraConfig(target_modules=["qkv"]))
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
