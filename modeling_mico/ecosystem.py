"""What a saved MiCo directory needs to load in the ecosystem: Transformers' custom pipelines and
sentence-transformers.

`add_ecosystem_files(directory)` copies `pipelines_mico.py` and `sentence_transformers_mico.py` next to the model
code, declares the pipelines under `custom_pipelines` in config.json, and writes `modules.json` /
`config_sentence_transformers.json`. After `import modeling_mico`, every `save_pretrained` of a MiCo model runs it
(`MiCoPreTrainedModel.save_hooks`); conversion and training scripts get it that way. Save the processor into the same
directory too: pipelines and sentence-transformers load it from there.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .pipelines_mico import custom_pipelines


PACKAGE = Path(__file__).resolve().parent
# Modules shipped as the checkpoint's remote code for the ecosystem (they import no other module of the package).
ECOSYSTEM_MODULES = ("pipelines_mico.py", "sentence_transformers_mico.py")
SENTENCE_TRANSFORMERS_FILES = {
    "modules.json": [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers_mico.MiCoSentenceEncoder"}],
    "config_sentence_transformers.json": {"model_type": "SentenceTransformer", "similarity_fn_name": "cosine"},
}


def write_json(path: Path, content: Any) -> None:
    """Write `content` as JSON atomically (a temporary file renamed over `path`)."""
    temporary = path.with_name(f"{path.name}.tmp")
    temporary.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def add_ecosystem_files(save_directory: str | os.PathLike) -> None:
    """Ship the pipelines and the sentence-transformers module in a saved MiCo directory (see the module docstring)."""
    directory = Path(save_directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: save the model to {directory} first")
    for name in ECOSYSTEM_MODULES:
        shutil.copyfile(PACKAGE / name, directory / name)
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["custom_pipelines"] = {**config.get("custom_pipelines", {}), **custom_pipelines()}
    write_json(config_file, config)
    for name, content in SENTENCE_TRANSFORMERS_FILES.items():
        write_json(directory / name, content)


def save_hook(model: Any, save_directory: str | os.PathLike) -> None:
    """`MiCoPreTrainedModel.save_hooks` entry: the ecosystem files of every saved MiCo model."""
    add_ecosystem_files(save_directory)


__all__ = ["ECOSYSTEM_MODULES", "add_ecosystem_files", "save_hook"]
