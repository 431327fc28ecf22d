"""Downstream fine-tuning of MiCo: classification data, layer-wise learning-rate decay, mixup/cutmix, metrics, and
captioning fine-tuning with caption metrics reported by `Trainer.evaluate`.

- Classification (`examples/run_classification.py`): `load_classification_rows` reads a folder-per-class tree or an
  annotation file with a label column; `MiCoClassificationCollator` decodes the media of the classifier's modalities
  through [`MiCoProcessor`] and turns labels into ids (or multi-hot vectors); `mix_batch` is mixup/cutmix;
  `layer_decay_parameter_groups` gives the optimizer groups of layer-wise learning-rate decay (BEiT/EVA);
  `classification_compute_metrics` reports accuracy (single-label) or mAP (multi-label).
- Captioning (`examples/run_captioning_finetune.py`): `MiCoCaptionMaskingCollator` masks the captions as the
  pretraining caption loss does, so that [`MiCoForConditionalGeneration`] trains that objective alone;
  `MiCoCaptioningTrainer.evaluate` also generates captions of the evaluation set and scores them against every
  reference (`caption_metrics.caption_scores`: BLEU-4, ROUGE-L, CIDEr-D).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import EvalPrediction

from .annotations import is_present, nested_value
from .caption_metrics import caption_scores
from .captioning import decoding_weights_kept, media_modality
from .configuration_mico import MiCoConfig
from .data import MiCoDataCollator
from .output_utils import prepare_training_output_dir, require_work
from .pretraining_mico import mask_caption_tokens
from .trainer_mico import EvalCollatorTrainer, train_and_evaluate


# --------------------------------------------------------------------------------------------------------------------
# Classification data
# --------------------------------------------------------------------------------------------------------------------


def load_classification_rows(
    source: str | os.PathLike, config: MiCoConfig, modalities: Sequence[str], label_column: str = "label"
) -> list[dict]:
    """Rows `{<media column>: absolute path, ..., "label": str | list[str]}` of a classification data set.

    Args:
        source: a directory with one sub-directory per class (the folder name is the label; media files of the
            single modality in `modalities` inside, found by extension), or an annotation file (`.jsonl`, `.json`
            list, `.csv`) whose rows hold the media columns of `modalities` (`ModalitySpec.column`, paths relative to
            the file) and the label (a string, or a list of strings for multi-label data) under `label_column`, a
            dotted path for nested objects (`attributes.shape`).
        config: the model's configuration (its modality registry names the columns and extensions).
        modalities: registry names of the classifier's inputs (e.g. `["video", "audio"]`).
        label_column: where the label is in annotation rows.
    """
    specs = config.modality_specs
    unknown = [name for name in modalities if name not in specs]
    if unknown:
        raise ValueError(f"modalities {unknown} are not modalities of this model; choose among {list(specs)}")
    path = Path(source)
    if path.is_dir():
        if len(modalities) != 1:
            raise ValueError(
                f"a folder-per-class tree holds one modality; got {list(modalities)}: use an annotation file"
            )
        column = specs[modalities[0]].column
        rows = [
            {column: str(file.resolve()), "label": folder.name}
            for folder in sorted(p for p in path.iterdir() if p.is_dir())
            for file in sorted(folder.rglob("*"))
            if file.is_file() and media_modality(file, config) == modalities[0]
        ]
        if not rows:
            raise ValueError(f"{path}: no {modalities[0]} files in class sub-directories")
        return rows
    if not path.is_file():
        raise FileNotFoundError(f"classification data not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".json":
        records = json.loads(path.read_text(encoding="utf-8"))
    elif suffix == ".csv":
        import csv

        with open(path, newline="", encoding="utf-8") as file:
            records = list(csv.DictReader(file))
    else:
        raise ValueError(f"{path}: classification annotation files must end in .jsonl, .json or .csv")
    rows = []
    for index, record in enumerate(records):
        where = f"{path} row {index}"
        row = {"label": nested_value(record, label_column, where, "label column")}
        for name in modalities:
            column = specs[name].column
            if not is_present(record.get(column)):
                raise ValueError(f"{where} has no {column!r} (needed for the {name} input)")
            row[column] = os.path.join(path.parent, record[column])
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def label_names(rows: Sequence[dict]) -> tuple[list[str], bool]:
    """The sorted label names of `rows` and whether the data is multi-label (labels are lists)."""
    multi_label = any(isinstance(row["label"], list) for row in rows)
    names = {str(name) for row in rows for name in (row["label"] if multi_label else [row["label"]])}
    return sorted(names), multi_label


class MiCoClassificationCollator(MiCoDataCollator):
    r"""
    Turn classification rows (`load_classification_rows`) into a batch of the classifier's inputs and `labels`:
    class ids (single-label) or multi-hot float vectors (multi-label), optionally mixed by mixup/cutmix in training.

    Args:
        processor ([`MiCoProcessor`]): decodes the media.
        config ([`MiCoConfig`]): the model's configuration; `config.label2id` maps label names to ids.
        modalities (`Sequence[str]`): registry names of the classifier's inputs.
        training (`bool`): random frames / slices (as pretraining) and mixing; at evaluation the middle ones.
        multi_label (`bool`): labels are lists of names.
        mixup_alpha, cutmix_alpha (`float`): see `mix_batch`; 0 (default) switches each off.
        seed (`int`, *optional*): in training, each row's frames / slices from its own generator and the batch's
            mixing from `batch_generator(rows)`, seeded with `(seed, epoch, positions)` as [`MiCoDataCollator`]'s, so
            that a resumed run mixes as the uninterrupted one did; `None`: torch's global RNG.
    """

    def __init__(
        self,
        processor: Any,
        config: MiCoConfig,
        modalities: Sequence[str],
        training: bool = True,
        multi_label: bool = False,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        seed: int | None = None,
    ):
        columns = [config.modality_specs[name].column for name in modalities]
        super().__init__(processor, columns, training=training, config=config, seed=seed)
        self.label2id = {str(name): int(index) for name, index in config.label2id.items()}
        self.multi_label = multi_label
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)

    def label_ids(self, label: Any) -> list[int]:
        names = label if self.multi_label else [label]
        missing = [name for name in names if str(name) not in self.label2id]
        if missing:
            raise ValueError(f"labels {missing} are not among the model's labels {sorted(self.label2id)}")
        return [self.label2id[str(name)] for name in names]

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        items = [self._decode_row(row, self.modalities, self._row_generator(row)) for row in rows]
        batch = {key: torch.cat([item[key] for item in items]) for key in items[0]}
        ids = [self.label_ids(row["label"]) for row in rows]
        if self.multi_label:
            labels = torch.zeros(len(rows), len(self.label2id))
            for i, row_ids in enumerate(ids):
                labels[i, row_ids] = 1.0
        else:
            labels = torch.tensor([row_ids[0] for row_ids in ids])
        batch["labels"] = labels
        if self.training and (self.mixup_alpha or self.cutmix_alpha):
            mixing = self.batch_generator(rows)
            batch = mix_batch(batch, len(self.label2id), self.mixup_alpha, self.cutmix_alpha, generator=mixing)
        return batch


def mix_batch(
    batch: dict[str, torch.Tensor],
    num_labels: int,
    mixup_alpha: float,
    cutmix_alpha: float,
    generator: torch.Generator | None = None,
) -> dict:
    """Mixup (Zhang et al.) or cutmix (Yun et al.; one of them at random when both are on) of every input of a batch
    with the batch reversed, one mixing ratio for the batch drawn from Beta(alpha, alpha); labels become the same mix
    of one-hot (or multi-hot) targets. Cutmix pastes one box of the last two dimensions (pixels, spectrogram). The
    draws come from `generator` (a CPU one; default: torch's global RNG)."""
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha} and {cutmix_alpha}")
    labels = batch.pop("labels")
    targets = labels.float() if labels.is_floating_point() else nn.functional.one_hot(labels, num_labels).float()
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or bool(torch.rand((), generator=generator) < 0.5))
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    if generator is None:
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
    else:  # torch.distributions take no generator: numpy's Beta sampler, seeded from it
        lam = float(np.random.default_rng(int(torch.randint(2**62, (), generator=generator))).beta(alpha, alpha))
    mixed = {}
    for key, values in batch.items():
        other = values.flip(0)
        if use_cutmix:
            height, width = values.shape[-2:]
            cut_h, cut_w = int(height * (1 - lam) ** 0.5), int(width * (1 - lam) ** 0.5)
            top = int(torch.randint(height - cut_h + 1, (), generator=generator))
            left = int(torch.randint(width - cut_w + 1, (), generator=generator))
            values = values.clone()
            values[..., top : top + cut_h, left : left + cut_w] = other[..., top : top + cut_h, left : left + cut_w]
            ratio = 1 - cut_h * cut_w / (height * width)
        else:
            values, ratio = lam * values + (1 - lam) * other, lam
        mixed[key] = values
    mixed["labels"] = ratio * targets + (1 - ratio) * targets.flip(0)
    return mixed


# --------------------------------------------------------------------------------------------------------------------
# Optimisation and metrics
# --------------------------------------------------------------------------------------------------------------------

_LAYER = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.")
_NO_DECAY = re.compile(r"(bias|norm[^.]*\.weight|class_embedding|position_embedding)$")


def layer_decay_parameter_groups(
    model: nn.Module, learning_rate: float, layer_decay: float, weight_decay: float, num_layers: int
) -> list[dict]:
    """Optimizer parameter groups with layer-wise learning-rate decay (BEiT, EVA): the vision embeddings get
    `learning_rate * layer_decay ** (num_layers + 1)`, block i `learning_rate * layer_decay ** (num_layers - i)`,
    everything else (the new head, other MiCo modules) `learning_rate`. Biases, norms and the class/position
    embeddings get no weight decay. Only trainable parameters are grouped (PEFT-wrapped models work too)."""
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        match = _LAYER.search(name)
        depth = int(match.group(1)) + 1 if match else (0 if "vision_model.embeddings." in name else num_layers + 1)
        decay = not _NO_DECAY.search(name) and parameter.dim() > 1
        group = groups.setdefault(
            (depth, decay),
            {"params": [], "lr": learning_rate * layer_decay ** (num_layers + 1 - depth), "weight_decay": 0.0},
        )
        group["weight_decay"] = weight_decay if decay else 0.0
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


def classification_compute_metrics(multi_label: bool) -> Callable[[EvalPrediction], dict[str, float]]:
    """A `Trainer(compute_metrics=...)` function: `accuracy` (single-label) or `mAP` (multi-label: mean over classes
    with a positive of scikit-learn's average precision) with micro `accuracy` of the thresholded predictions."""
    from sklearn.metrics import accuracy_score, average_precision_score

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        logits, labels = np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids)
        if not multi_label:
            return {"accuracy": float(accuracy_score(labels, logits.argmax(-1)))}
        present = labels.sum(axis=0) > 0
        average_precision = average_precision_score(labels[:, present], logits[:, present], average="macro")
        return {"mAP": float(average_precision), "accuracy": float(((logits > 0) == (labels > 0.5)).mean())}

    return compute_metrics


# --------------------------------------------------------------------------------------------------------------------
# Captioning fine-tuning
# --------------------------------------------------------------------------------------------------------------------


class MiCoCaptionMaskingCollator(MiCoDataCollator):
    r"""
    A [`MiCoDataCollator`] whose batches train [`MiCoForConditionalGeneration`] on the masked-caption objective of
    pretraining: the captions are masked as `MiCoForPreTraining`'s caption loss masks them
    (`config.caption_mask_probability`; `[MASK]` / random / kept) and `labels` hold the original ids at the masked
    positions (-100 elsewhere). With the causal text mask and cross-attention to the media's context that
    `MiCoForConditionalGeneration.forward` applies, its loss is the pretraining caption loss of that task alone.
    Args:
        processor ([`MiCoProcessor`]): decodes media and tokenizes captions.
        config ([`MiCoConfig`]): the model's configuration (mask probability, `[MASK]` id, vocabulary, modalities).
        modalities (`Sequence[str]`, *optional*): annotation columns to load, as for [`MiCoDataCollator`].
        training (`bool`, *optional*, defaults to `True`): random caption / frames in training, else the first ones.
        seed (`int`, *optional*): in training, each row's caption / frames from its own generator and the masking
            from `batch_generator(rows)`, seeded with `(seed, epoch, positions)` as [`MiCoDataCollator`]'s, so that a
            resumed run masks as the uninterrupted one did; `None`: torch's global RNG.
    """

    def __init__(
        self,
        processor: Any,
        config: MiCoConfig,
        modalities: Sequence[str] | None = None,
        training: bool = True,
        seed: int | None = None,
    ):
        super().__init__(processor, modalities, training=training, config=config, seed=seed)
        self.config = config

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        text_config = self.config.text_config
        masked, labels = mask_caption_tokens(
            batch["input_ids"],
            batch["attention_mask"],
            self.config.caption_mask_probability,
            text_config.mask_token_id,
            text_config.vocab_size,
            generator=self.batch_generator(rows),
        )
        batch.pop("token_type_ids", None)
        return {**batch, "input_ids": masked, "labels": labels}


def references_of(row: dict) -> list[str]:
    """Every reference caption of an annotation row (`captions`, else `caption`)."""
    captions = row.get("captions") if is_present(row.get("captions")) else row.get("caption")
    if isinstance(captions, str):
        return [captions]
    if not is_present(captions):
        raise ValueError(f"a row has no caption: {row}")
    return list(captions)


def generate_captions(
    model: Any,
    processor: Any,
    collator: MiCoDataCollator,
    rows: Sequence[dict],
    batch_size: int = 8,
    progress: bool = True,
    **generate_kwargs: Any,
) -> list[str]:
    """Captions of annotation `rows` by `model.generate` on the media `collator` decodes (text inputs dropped)."""
    captions: list[str] = []
    media_inputs = {spec.input_name for spec in model.config.modality_specs.values()}
    with decoding_weights_kept(model):
        for start in tqdm(range(0, len(rows), batch_size), desc="captioning", disable=not progress):
            batch = collator(list(rows[start : start + batch_size]))
            inputs = {key: value.to(model.device, model.dtype) for key, value in batch.items() if key in media_inputs}
            with torch.no_grad():
                ids = model.generate(**inputs, **generate_kwargs)
            captions.extend(text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True))
    return captions


class MiCoCaptioningTrainer(EvalCollatorTrainer):
    """A `Trainer` for captioning fine-tuning whose `evaluate` adds caption metrics: it generates a caption for every
    item of the evaluation set (media decoded by the evaluation collator) and scores it against all the item's
    references (`caption_scores`: `<prefix>_BLEU-4`, `<prefix>_ROUGE-L`, `<prefix>_CIDEr`, ...), beside the loss.

    Args:
        generate_kwargs: passed to `generate` (`num_beams`, `max_new_tokens`, ...).
        eval_data_collator: collator of evaluation batches (default: `data_collator`).
    """

    def __init__(self, *args, generate_kwargs: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.generate_kwargs = dict(generate_kwargs or {})
        self.last_captions: list[str] = []

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        rows = [dataset[i] for i in range(len(dataset))]
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            self.last_captions = generate_captions(
                model,
                self.processing_class,
                self.eval_data_collator or self.data_collator,
                rows,
                batch_size=self.args.per_device_eval_batch_size,
                progress=not self.args.disable_tqdm,
                **self.generate_kwargs,
            )
        finally:
            model.train(was_training)
        scores = caption_scores(self.last_captions, [references_of(row) for row in rows])
        scores = {f"{metric_key_prefix}_{name}": value for name, value in scores.items()}
        self.log(scores)
        metrics.update(scores)
        return metrics


def append_metrics_to_card(output_dir: str | os.PathLike, metrics: dict[str, float], title: str) -> Path:
    """Append a `## <title>` table of `metrics` to the model card `<output_dir>/README.md` (written by
    `Trainer.create_model_card`, which keeps only the evaluation loss of its log history)."""
    path = Path(output_dir) / "README.md"
    if not path.is_file():
        raise FileNotFoundError(f"no model card to complete at {path}")
    rows = [f"| {name} | {value:.4f} |" for name, value in metrics.items() if isinstance(value, (int, float))]
    table = "\n".join([f"\n## {title}\n", "| metric | value |", "|---|---|", *rows, ""])
    with open(path, "a", encoding="utf-8") as file:
        file.write(table)
    return path


# --------------------------------------------------------------------------------------------------------------------
# The fine-tuning scripts' common steps
# --------------------------------------------------------------------------------------------------------------------


def prepare_run(training_args: Any, validation_file: str | None) -> bool:
    """Set-up shared by the fine-tuning scripts: a run with nothing to do is refused (`output_utils.require_work`),
    the collator reads raw rows (`remove_unused_columns=False`), logging, the seed. Trainer's own Hub push is
    switched off (the scripts push after writing the model card); returns whether to push. The output directory is
    checked later, once model and data have loaded (`output_utils.prepare_training_output_dir`)."""
    import logging

    import transformers

    require_work(training_args, validation_file)
    training_args.remove_unused_columns = False
    push, training_args.push_to_hub = training_args.push_to_hub, False
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    transformers.set_seed(training_args.seed)
    return push


def save_and_publish(
    trainer: Any,
    model: Any,
    processor: Any,
    metrics: dict[str, float],
    push: bool,
    base_model: str,
    dataset: str,
    task: str,
    tags: Sequence[str],
) -> Any:
    """Save the fine-tuned model to `trainer.args.output_dir` (a PEFT model: its adapter in `<output_dir>/adapter`,
    the merged model in `output_dir`), the processor and a model card (Trainer's, plus a table of `metrics`), then
    push the directory to `hub_model_id` (default: its name) when `push`. Returns the saved (merged) model."""
    from peft import PeftModel

    from .peft_utils import push_to_hub

    args = trainer.args
    output_dir = args.output_dir
    if isinstance(model, PeftModel):
        model.save_pretrained(os.path.join(output_dir, "adapter"))
        model = model.merge_and_unload()
        tags = [*tags, "peft", "lora"]
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    name = os.path.basename(os.path.abspath(output_dir))
    trainer.create_model_card(model_name=name, finetuned_from=base_model, tasks=task, dataset=dataset, tags=list(tags))
    append_metrics_to_card(output_dir, metrics, "Evaluation (before fine-tuning: `pretrained_*`, after: `eval_*`)")
    if push:
        url = push_to_hub(output_dir, args.hub_model_id or name, token=args.hub_token, private=args.hub_private_repo)
        print(f"pushed {output_dir} to {url}")
    return model


def run_finetuning(
    trainer: Any, processor: Any, push: bool, base_model: str, data: Any, task: str, tags: Sequence[str]
) -> dict[str, float]:
    """The fine-tuning scripts' run once `trainer` is built: check the output folder (never an input: `base_model`,
    `data.train_file`, `data.validation_file`; resume from its last checkpoint unless `data.overwrite_output_dir`),
    evaluate before and after training, then `save_and_publish` `trainer.model`. Returns the metrics (`pretrained_*`,
    `eval_*`)."""
    inputs = (base_model, data.train_file, data.validation_file)
    checkpoint = prepare_training_output_dir(trainer.args, data.overwrite_output_dir, inputs)
    metrics = train_and_evaluate(trainer, checkpoint, evaluate_before=True)
    save_and_publish(trainer, trainer.model, processor, metrics, push, base_model, data.train_file, task, tags)
    return metrics


__all__ = [
    "append_metrics_to_card",
    "MiCoCaptionMaskingCollator",
    "MiCoCaptioningTrainer",
    "MiCoClassificationCollator",
    "classification_compute_metrics",
    "generate_captions",
    "label_names",
    "layer_decay_parameter_groups",
    "load_classification_rows",
    "mix_batch",
    "prepare_run",
    "run_finetuning",
    "save_and_publish",
    "train_and_evaluate",
    "references_of",
]
