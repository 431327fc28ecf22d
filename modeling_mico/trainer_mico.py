"""🤗 `Trainer` subclasses for MiCo pretraining and fine-tuning, and the retrieval metric they report.

- `EvalCollatorTrainer` collates evaluation batches with their own collator (first caption, middle frames), so that
  the evaluation loss does not depend on random choices (`examples/run_pretrain.py`).
- `MiCoRetrievalTrainer` also returns the batch's text and target embeddings as predictions
  (`evaluation.batch_retrieval_embeddings`), and `retrieval_compute_metrics(targets)` turns them into retrieval
  metrics under the keys of `evaluation.target_prefix` (`eval_t2v/R@1`, ...) (`examples/run_finetune_peft.py`).
- `AnnotationArguments`, `parse_script_arguments` and `train_and_evaluate`: what the example training scripts share
  (their annotation options, argument parsing and logging, the train / save / evaluate sequence).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import transformers
from transformers import EvalPrediction, HfArgumentParser, Trainer, TrainingArguments

from .evaluation import batch_retrieval_embeddings, mico_base_model, resolve_targets, target_prefix
from .retrieval import retrieval_metrics


def retrieval_compute_metrics(
    targets: Sequence[str], ks: Sequence[int] = (1, 5, 10)
) -> Callable[[EvalPrediction], dict[str, float]]:
    """A `Trainer(compute_metrics=...)` function for `MiCoRetrievalTrainer` predictions `(text, *targets)`: text i
    describes item i; items without embeddings (NaN, absent from their batch) are left out with their text."""
    targets = list(targets)

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        text, *items = eval_pred.predictions
        results: dict[str, float] = {}
        for target, item in zip(targets, items, strict=True):
            valid = ~np.isnan(item).any(axis=1)
            if valid.sum() < 2:
                continue
            similarity = torch.from_numpy(text[valid] @ item[valid].T)
            results.update(
                retrieval_metrics(similarity, np.arange(int(valid.sum())), prefix=target_prefix(target), ks=ks)
            )
        return results

    return compute_metrics


class EvalCollatorTrainer(Trainer):
    """A `Trainer` that collates evaluation batches with their own collator (first caption, middle frames).

    Args:
        eval_data_collator: collator of evaluation batches (default: `data_collator`).
    """

    def __init__(self, *args, eval_data_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator

    def get_eval_dataloader(self, eval_dataset=None):
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator or self.data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator


class MiCoRetrievalTrainer(EvalCollatorTrainer):
    """A `Trainer` whose evaluation returns text and item embeddings as predictions (for
    `retrieval_compute_metrics`) beside the pretraining loss, and collates evaluation batches with their own collator
    (first caption, middle frames).

    Args:
        retrieval_targets: targets whose embeddings evaluation returns (`evaluation.retrieval_targets(config)`
            names: `video`, `va`, `thermal`, ...).
        eval_data_collator: collator of evaluation batches (default: `data_collator`).
    """

    def __init__(self, *args, retrieval_targets: Sequence[str] = ("video",), **kwargs):
        super().__init__(*args, **kwargs)
        resolve_targets(mico_base_model(self.model).config, retrieval_targets)  # validates the names
        self.retrieval_targets = list(retrieval_targets)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs).detach()
            if prediction_loss_only:
                return loss, None, None
            embeds = batch_retrieval_embeddings(self.accelerator.unwrap_model(model), inputs, self.retrieval_targets)
        # compute_metrics runs only when labels exist; text i of the evaluation set describes item i
        labels = torch.zeros(inputs["input_ids"].shape[0], dtype=torch.long, device=loss.device)
        return loss, embeds, labels


@dataclass
class AnnotationArguments:
    """Annotation options of the example training scripts (`examples/run_pretrain.py`, `run_finetune_peft.py`),
    which extend it with their own."""

    train_file: str = field(
        metadata={
            "help": "annotation file (.jsonl, .json, .csv, .parquet) or a 🤗 datasets folder (save_to_disk output or a "
            "folder load_dataset reads) with Image / Audio / Video or path columns"
        }
    )
    validation_file: str | None = field(default=None, metadata={"help": "annotation file or datasets folder"})
    train_split: str | None = field(default=None, metadata={"help": "split of a datasets folder (--train_file)"})
    validation_split: str | None = field(
        default=None, metadata={"help": "split of a datasets folder (--validation_file)"}
    )
    modalities: list[str] | None = field(
        default=None,
        metadata={
            "help": "annotation columns to load: media columns of the model's modalities (image or video, not both) "
            "and subtitle (default: one column per encoder, videos rather than images, and subtitle)"
        },
    )
    num_frames: int | None = field(default=None, metadata={"help": "video frames sampled per clip"})


def parse_script_arguments(dataclass_types: Sequence[type]) -> tuple:
    """Parse the command line (or a single `.json` file argument) into `dataclass_types`, whose last one is
    `TrainingArguments`; set up logging at the process's level."""
    parser = HfArgumentParser(dataclass_types)
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        parsed = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        parsed = parser.parse_args_into_dataclasses()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(parsed[-1].get_process_log_level())
    return tuple(parsed)


def train_and_evaluate(
    trainer_class: type[EvalCollatorTrainer],
    model: torch.nn.Module,
    training_args: TrainingArguments,
    processor: Any,
    collators: tuple[Callable, Callable],
    datasets: tuple[Any, Any],
    resume_from_checkpoint: str | bool | None = None,
    **trainer_kwargs: Any,
) -> tuple[EvalCollatorTrainer, dict[str, float]]:
    """Build the scripts' trainer (`collators` and `datasets` for training and evaluation, the evaluation data set may
    be `None`; `processor` is saved with the model), then with `--do_train` train, save the model, the train metrics
    and the state, and with `--do_eval` and an evaluation set evaluate and save the metrics. Returns the trainer and
    the evaluation metrics (empty when none ran)."""
    (train_collator, eval_collator), (train_dataset, eval_dataset) = collators, datasets
    # Trainer's leading arguments: model, args, data_collator, train_dataset, eval_dataset, processing_class
    trainer = trainer_class(
        model,
        training_args,
        train_collator,
        train_dataset,
        eval_dataset,
        processor,
        eval_data_collator=eval_collator,
        **trainer_kwargs,
    )
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    metrics: dict[str, float] = {}
    if training_args.do_eval and eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    return trainer, metrics


__all__ = [
    "AnnotationArguments",
    "EvalCollatorTrainer",
    "MiCoRetrievalTrainer",
    "parse_script_arguments",
    "retrieval_compute_metrics",
    "train_and_evaluate",
]
