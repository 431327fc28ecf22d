"""Parameter-efficient fine-tuning of MiCo with 🤗 PEFT: adapter targets per tower, merging, model cards, Hub push.

Adapters are placed on the attention and MLP projections of the vision tower (`qkv`, `proj`, `fc1`, `fc2` of every
block), of the text branch (`query`, `key`, `value` and every `dense` of the self-attention, cross-attention and
feed-forward sub-layers) or of both. Targets are regular expressions over module names that accept any prefix before
the towers (`vision_model`, `text_model`), so they select the same modules in `MiCoModel` and in the head classes that
compose it (`mico.vision_model...`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_config, get_peft_model
from torch import nn

from .configuration_mico import TASK_KINDS
from .output_utils import atomic_output, write_text_atomic
from .retrieval import format_results_table


# Tower -> prefix of its encoder layers and the default module names adapted in them.
TOWERS = {
    "vision": ("vision_model.encoder.layers", ("qkv", "proj", "fc1", "fc2")),
    "text": ("text_model.encoder.layer", ("query", "key", "value", "dense")),
}
# Tower -> the second projection of its feed-forward block (IA3's `feedforward_modules` scale their inputs).
FEEDFORWARD_MODULES = {"vision": r"mlp\.fc2", "text": r"output\.dense"}
# Any module path before a tower (`mico.` in the head classes, nothing in `MiCoModel`).
_ANY_PREFIX = r"(?:.*\.)?"


def resolve_towers(towers: str | Sequence[str]) -> list[str]:
    """`"both"` -> `["vision", "text"]`; validates tower names."""
    towers = [towers] if isinstance(towers, str) else list(towers)
    towers = ["vision", "text"] if "both" in towers else towers
    unknown = [tower for tower in towers if tower not in TOWERS]
    if unknown or not towers:
        raise ValueError(f"unknown towers {unknown or towers}; choose among vision, text, both")
    return list(dict.fromkeys(towers))


def lora_target_modules(towers: str | Sequence[str] = "both", module_names: Sequence[str] | None = None) -> str:
    """A regular expression (`PeftConfig.target_modules`, matched in full against module names) selecting the
    modules called `module_names` (default: each tower's attention and MLP projections) in the encoder layers of
    the chosen towers. A name may be dotted (`self_attn.qkv`) and matches the end of a module path."""
    patterns = []
    for tower in resolve_towers(towers):
        prefix, defaults = TOWERS[tower]
        names = "|".join(re.escape(name) for name in (module_names or defaults))
        patterns.append(rf"{_ANY_PREFIX}{re.escape(prefix)}\.\d+\.(?:.*\.)?(?:{names})")
    return "|".join(patterns)


def feedforward_target_modules(towers: str | Sequence[str] = "both") -> str:
    """Regular expression of the feed-forward output projections of the chosen towers (IA3's feedforward modules)."""
    return "|".join(
        rf"{_ANY_PREFIX}{re.escape(TOWERS[tower][0])}\.\d+\.{FEEDFORWARD_MODULES[tower]}"
        for tower in resolve_towers(towers)
    )


def build_peft_config(
    towers: str | Sequence[str] = "both",
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    target_modules: Sequence[str] | None = None,
    peft_config: dict[str, Any] | str | PeftConfig | None = None,
) -> PeftConfig:
    """A LoRA configuration on the chosen towers, or any PEFT method from `peft_config` (a `PeftConfig`, a dict or
    a JSON string/file with `peft_type`, e.g. `{"peft_type": "IA3"}`, `{"peft_type": "LOHA", "r": 8}`); when it
    names no `target_modules`, the towers' projections are targeted (and IA3's `feedforward_modules` filled in)."""
    targets = lora_target_modules(towers, target_modules)
    if peft_config is None:
        return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets, bias="none")
    if isinstance(peft_config, PeftConfig):
        return peft_config
    if isinstance(peft_config, str):
        text = Path(peft_config).read_text() if os.path.isfile(peft_config) else peft_config
        peft_config = json.loads(text)
    peft_config = dict(peft_config)
    if "peft_type" not in peft_config:
        raise ValueError(f"peft_config needs a `peft_type` (LORA, IA3, LOHA, LOKR, ...), got {sorted(peft_config)}")
    peft_config["peft_type"] = str(peft_config["peft_type"]).upper()
    peft_config.setdefault("target_modules", targets)
    if peft_config["peft_type"] == "IA3":
        peft_config.setdefault("feedforward_modules", feedforward_target_modules(towers))
    return get_peft_config(peft_config)


def build_peft_model(model: nn.Module, config: PeftConfig | None = None, **config_kwargs: Any) -> PeftModel:
    """Wrap `model` with an adapter (`config`, or `build_peft_config(**config_kwargs)`); everything else is frozen."""
    return get_peft_model(model, config if config is not None else build_peft_config(**config_kwargs))


def set_pretraining_losses(model: nn.Module, losses: Sequence[str]) -> None:
    """Keep only the given losses (`contrastive`, `matching`, `caption`) of a `MiCoForPreTraining` (or a PEFT
    wrapper of one): the tasks of the other kinds are switched off for this model instance, not in its config."""
    unknown = [loss for loss in losses if loss not in TASK_KINDS]
    if unknown or not losses:
        raise ValueError(f"unknown losses {unknown or losses}; choose among {list(TASK_KINDS)}")
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    for kind in TASK_KINDS:
        if kind not in losses:
            base.tasks[kind] = {}


def merge_and_save(model: PeftModel, output_dir: str | os.PathLike, processor: Any = None) -> nn.Module:
    """Merge the adapter into the base weights (in place: `model` is unloaded) and save a full model directory,
    loadable by `AutoModel` and every head class, with the processor when given; the directory is written atomically
    and replaces a previous one entirely (see `output_utils.atomic_output`). Returns the merged model."""
    merged = model.merge_and_unload()
    with atomic_output(output_dir, overwrite=True) as partial:
        merged.save_pretrained(partial)
        if processor is not None:
            processor.save_pretrained(partial)
    return merged


def write_model_card(
    output_dir: str | os.PathLike,
    base_model: str,
    train_files: Sequence[str],
    metrics: dict[str, float] | None = None,
    peft_type: str = "LORA",
    target_towers: Sequence[str] = ("vision", "text"),
    losses: Sequence[str] = ("contrastive",),
    merged: bool = False,
    hyperparameters: dict[str, Any] | None = None,
) -> Path:
    """Write `README.md` (YAML metadata + description) for an adapter or a merged model directory.

    The card names the base model, the training data, the adapter, the losses, the hyper-parameters and the
    evaluation metrics (retrieval keys such as `eval_t2v/R@1` as a Markdown table, others listed)."""
    on_hub = not os.path.exists(base_model)
    tags = ["mico", "omni-modal", "retrieval", "peft", peft_type.lower()]
    header = ["---", *([f"base_model: {base_model}"] if on_hub else [])]
    header += [f"library_name: {'transformers' if merged else 'peft'}", "tags:"] + [f"- {tag}" for tag in tags]
    header.append("---")
    base_link = f"[{base_model}](https://huggingface.co/{base_model})" if on_hub else f"`{base_model}`"
    kind = f"the base model with a {peft_type} adapter merged into its weights" if merged else f"a {peft_type} adapter"
    lines = [
        "",
        f"# MiCo {peft_type} fine-tune of {os.path.basename(os.path.normpath(base_model))}",
        "",
        f"This is {kind} for {base_link}, a [MiCo](https://arxiv.org/abs/2406.09412) omni-modal model, fine-tuned "
        f"on the {', '.join(target_towers)} tower(s) with the {', '.join(losses)} loss(es) of MiCo's pretraining.",
        "",
        "## Training data",
        "",
        *[f"- `{file}`" for file in train_files],
        "",
    ]
    if hyperparameters:
        lines += ["## Training hyper-parameters", ""]
        lines += [f"- {name}: {value}" for name, value in hyperparameters.items()] + [""]
    if metrics:
        lines += ["## Evaluation", ""]
        retrieval = {key.removeprefix("eval_"): value for key, value in metrics.items() if "/" in key}
        if retrieval:
            lines += ["Text<->item retrieval (recalls in %):", "", format_results_table(retrieval), ""]
        lines += [f"- {key}: {value:.4g}" for key, value in metrics.items() if "/" not in key] + [""]
    lines += ["## Usage", "", "```python", "import modeling_mico  # registers MiCo with the Auto classes"]
    if merged:
        lines += [
            "from transformers import AutoModel, AutoProcessor",
            "",
            'model = AutoModel.from_pretrained("<this repository>")',
        ]
    else:
        lines += [
            "from peft import PeftModel",
            "from modeling_mico import MiCoModel",
            "",
            f'model = PeftModel.from_pretrained(MiCoModel.from_pretrained("{base_model}"), "<this repository>")',
        ]
    lines += ["```", ""]
    path = Path(output_dir) / "README.md"
    write_text_atomic(path, "\n".join(header + lines))
    return path


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload MiCo fine-tune",
    ignore_patterns: Sequence[str] = ("checkpoint-*", "runs/*"),
) -> str:
    """Create `repo_id` (if needed) and upload `folder` (adapter or merged model, with its README.md model card)."""
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        repo_id=url.repo_id,
        folder_path=os.fspath(folder),
        commit_message=commit_message,
        ignore_patterns=list(ignore_patterns),
    )
    return str(url)


__all__ = [
    "build_peft_config",
    "build_peft_model",
    "feedforward_target_modules",
    "lora_target_modules",
    "merge_and_save",
    "push_to_hub",
    "resolve_towers",
    "set_pretraining_losses",
    "write_model_card",
]
