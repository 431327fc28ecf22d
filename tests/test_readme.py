"""The README's Python snippets run as written (those that need the Hub or outputs of earlier commands are skipped)."""

import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
NEEDS_OUTSIDE = ("Yiyuan/", "user/", "runs/")


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index, monkeypatch, tmp_path):
    block = BLOCKS[index]
    if any(marker in block for marker in NEEDS_OUTSIDE):
        pytest.skip("needs the Hub or the outputs of an earlier command")
    monkeypatch.chdir(ROOT)
    exec(compile(block.replace("/tmp/", f"{tmp_path}/"), f"README.md block {index}", "exec"), {})
