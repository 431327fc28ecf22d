"""🤗 `Trainer` subclasses for MiCo pretraining and fine-tuning, and the retrieval metric they report.

- `EvalCollatorTrainer` logs every pretraining task's loss beside the total (`loss_contrastive_td`, ...), collates
  evaluation batches with their own collator (first caption, middle frames), so that the evaluation loss does not
  depend on random choices, and with a seeded training collator
  (`MiCoDataCollator(seed=...)`) stamps the training rows with their position and tells the collator the epoch, so that
  a resumed run draws the captions and frames the uninterrupted run drew (`examples/run_pretrain.py`).
- `MiCoRetrievalTrainer` also returns the batch's text and target embeddings as predictions
  (`evaluation.batch_retrieval_embeddings`), and `retrieval_compute_metrics(targets)` turns them into retrieval
  metrics under the keys of `evaluation.target_prefix` (`eval_t2v/R@1`, ...) (`examples/run_finetune_peft.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction, Trainer, TrainerCallback
from transformers.trainer_pt_utils import nested_gather

from .data import index_rows
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


class CollatorEpochCallback(TrainerCallback):
    """Tells a seeded collator (`set_epoch`) the Trainer's epoch as each begins, so that its per-row draws change per
    epoch and a run resumed mid-epoch uses the epoch it stopped in."""

    def __init__(self, collator):
        self.collator = collator
        self.epoch = 0

    def on_train_begin(self, args, state, control, **kwargs):
        # epochs already done when resuming: the Trainer's state.epoch is epoch + steps done / steps per epoch
        # (exactly epoch + 1 after an epoch's last step)
        self.epoch = math.floor(state.epoch or 0)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(self.epoch)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epoch += 1  # a stream that ends before max_steps starts the next epoch with state.epoch below 1


class EvalCollatorTrainer(Trainer):
    """A `Trainer` that logs each pretraining task's loss, collates evaluation batches with their own collator (first
    caption, middle frames), and with a seeded training collator (`seed` set, e.g. `MiCoDataCollator(seed=...)`)
    stamps the training rows with their position (`data.index_rows`) and sets the collator's epoch, so that resuming
    repeats the uninterrupted run's draws.

    With a model whose outputs carry `task_losses` ([`MiCoForPreTraining`]), every training log has, beside `loss`,
    `loss_<task>` for each task (`loss_contrastive_td`, `loss_caption_tva`, ...): its mean over the steps since the
    last log and over all processes, so that a task that does not learn (stuck at ln(batch size)) shows.

    Args:
        eval_data_collator: collator of evaluation batches (default: `data_collator`).
    """

    def __init__(self, *args, eval_data_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator
        self._task_loss_sums: dict[str, torch.Tensor] = {}
        self._task_loss_count = 0
        if getattr(self.data_collator, "seed", None) is not None and self.train_dataset is not None:
            self.train_dataset = index_rows(self.train_dataset)
            self.add_callback(CollatorEpochCallback(self.data_collator))

    @classmethod
    def for_datasets(
        cls,
        model: Any,
        args: Any,
        processor: Any,
        collator: Callable[[bool], Any],
        train_dataset: Any = None,
        eval_dataset: Any = None,
        **kwargs: Any,
    ) -> EvalCollatorTrainer:
        """The trainer of a training script: `collator(True)` collates training batches, `collator(False)` evaluation
        ones; `processor` is saved with the model; `kwargs` go to the constructor."""
        return cls(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=collator(True),
            eval_data_collator=collator(False),
            processing_class=processor,
            **kwargs,
        )

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        task_losses = outputs.get("task_losses") if isinstance(outputs, Mapping) else None
        if model.training and task_losses:
            for name, value in task_losses.items():
                self._task_loss_sums[name] = self._task_loss_sums.get(name, 0) + value.detach().float()
            self._task_loss_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._task_loss_count:
            # every process runs the same tasks (`_runnable_tasks`), so the gathered vectors line up
            names = sorted(self._task_loss_sums)
            means = torch.stack([self._task_loss_sums[name] for name in names]) / self._task_loss_count
            means = nested_gather(means, self.args.parallel_mode).view(-1, len(names)).mean(0)
            logs.update({f"loss_{name}": round(float(mean), 4) for name, mean in zip(names, means)})
            self._task_loss_sums, self._task_loss_count = {}, 0
        super().log(logs, *args, **kwargs)

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


def train_and_evaluate(
    trainer: Trainer, checkpoint: str | None = None, evaluate_before: bool = False, save: bool = False
) -> dict[str, float]:
    """The training scripts' run, as `trainer.args` asks (`do_train`, `do_eval`): evaluate first with
    `evaluate_before` (`pretrained_*` metrics), train (resuming from `checkpoint`, see
    `output_utils.prepare_training_output_dir`; with `save`, then save the model and the trainer state), evaluate
    (`eval_*`). Saves the metrics files and returns the evaluation metrics."""
    args, metrics = trainer.args, {}
    evaluate = args.do_eval and trainer.eval_dataset is not None
    if evaluate and evaluate_before:
        metrics.update(trainer.evaluate(metric_key_prefix="pretrained"))
    if args.do_train:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        if save:
            trainer.save_model()
            trainer.save_state()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
    if evaluate:
        after = trainer.evaluate()
        trainer.log_metrics("eval", after)
        metrics.update(after)
        trainer.save_metrics("eval", metrics)
    return metrics


__all__ = [
    "CollatorEpochCallback",
    "EvalCollatorTrainer",
    "MiCoRetrievalTrainer",
    "retrieval_compute_metrics",
    "train_and_evaluate",
]
