"""Fine-tune a MiCo encoder for image, video, audio or depth classification (single- or multi-label) with 🤗 Trainer.
Reads a MiCo checkpoint (--model_name_or_path; its encoder is kept, the head is new: pooled class tokens ->
LayerNorm -> linear) and the data as a folder-per-class tree (`train/<label>/<file>`) or an annotation file
(.jsonl/.json/.csv) with the media column of --modality and a label column (--label_column, a dotted path such as
`attributes.shape`; a list of labels makes it multi-label). Trains every weight, or a LoRA adapter on the vision
tower with --use_peft; layer-wise learning-rate decay (--layer_decay 0.9, as BEiT/EVA) and mixup/cutmix
(--mixup_alpha, --cutmix_alpha) are off by default. Reports accuracy (single-label) or mAP (multi-label) before and
after training, and writes the model (merged when PEFT is used, the adapter in <output_dir>/adapter), processor,
metrics and a model card to --output_dir (default outputs/classification); --push_to_hub uploads them.

On the synthetic data set (examples/make_synthetic_dataset.py) from a model pretrained by examples/run_pretrain.py:

    python examples/run_classification.py --model_name_or_path outputs/pretrain --modality image \\
        --train_file outputs/synthetic/train.jsonl --validation_file outputs/synthetic/test.jsonl \\
        --label_column attributes.shape --do_train --do_eval --max_steps 60
"""

import sys
from dataclasses import dataclass, field

from modeling_mico_cli import (
    DataArguments,
    FinetuneLoraArguments,
    ModelArguments,
    TrainerScript,
)


HEADS = {
    "image": "MiCoForImageClassification",
    "video": "MiCoForVideoClassification",
    "audio": "MiCoForAudioClassification",
    "depth": "MiCoForDepthClassification",
}
PIPELINE_TASKS = {"image": "image-classification", "video": "video-classification", "audio": "audio-classification"}


@dataclass
class ClassificationModelArguments(ModelArguments):
    modality: str = field(default="image", metadata={"help": "what is classified", "choices": list(HEADS)})
    fused_modalities: list[str] = field(
        default_factory=list, metadata={"help": "modalities fused with it (e.g. audio for video+audio)"}
    )


@dataclass
class ClassificationDataArguments(DataArguments):
    label_column: str = field(default="label", metadata={"help": "label column of annotation files (dotted path)"})


@dataclass
class FinetuneArguments:
    layer_decay: float = field(default=1.0, metadata={"help": "layer-wise learning-rate decay (1 = none; EVA: 0.9)"})
    mixup_alpha: float = field(default=0.0, metadata={"help": "mixup Beta(alpha, alpha) (0 = off)"})
    cutmix_alpha: float = field(default=0.0, metadata={"help": "cutmix Beta(alpha, alpha) (0 = off)"})


COMMAND_LINE = TrainerScript(
    __doc__,
    (ClassificationModelArguments, ClassificationDataArguments, FinetuneArguments, FinetuneLoraArguments),
    "classification",
)


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, finetune_args, lora_args, training_args = COMMAND_LINE.parse(argv)
    import datasets
    import torch

    import modeling_mico
    from modeling_mico.evaluation import load_processor
    from modeling_mico.finetuning import (
        MiCoClassificationCollator,
        classification_compute_metrics,
        label_names,
        layer_decay_parameter_groups,
        load_classification_rows,
        prepare_run,
        run_finetuning,
    )
    from modeling_mico.trainer_mico import EvalCollatorTrainer

    push = prepare_run(training_args, data_args.validation_file)
    model_class = getattr(modeling_mico, HEADS[model_args.modality])
    modalities = [model_args.modality, *model_args.fused_modalities]
    model = model_args.from_pretrained(model_class)  # MiCo or original checkpoints
    train_rows = load_classification_rows(data_args.train_file, model.config, modalities, data_args.label_column)
    eval_rows = []
    if data_args.validation_file:
        eval_rows = load_classification_rows(
            data_args.validation_file, model.config, modalities, data_args.label_column
        )
    labels, multi_label = label_names(train_rows + eval_rows)  # every label of either split gets an id
    model.configure_head(
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: index for index, name in enumerate(labels)},
        problem_type="multi_label_classification" if multi_label else "single_label_classification",
        classifier_modalities=modalities,
    )
    config = model.config
    processor = load_processor(model_args.model_name_or_path, config, data_args.num_frames)
    model = lora_args.wrap(model, "vision", modules_to_save=["fc_norm", "classifier"])  # the new head in full

    data_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed

    def collator(training: bool):  # seeded frames, slices and mixing in training: a resumed run repeats them
        mixing = {"mixup_alpha": finetune_args.mixup_alpha, "cutmix_alpha": finetune_args.cutmix_alpha}
        seed = data_seed if training else None
        return MiCoClassificationCollator(processor, config, modalities, training, multi_label, **mixing, seed=seed)

    eval_dataset = datasets.Dataset.from_list(eval_rows) if eval_rows else None
    groups = layer_decay_parameter_groups(
        model,
        training_args.learning_rate,
        finetune_args.layer_decay,
        training_args.weight_decay,
        config.vision_config.num_hidden_layers,
    )
    optimizer = torch.optim.AdamW(
        groups, betas=(training_args.adam_beta1, training_args.adam_beta2), eps=training_args.adam_epsilon
    )
    trainer = EvalCollatorTrainer.for_datasets(
        model,
        training_args,
        processor,
        collator,
        datasets.Dataset.from_list(train_rows),
        eval_dataset,
        compute_metrics=classification_compute_metrics(multi_label),
        optimizers=(optimizer, None),
    )
    task, tags = (
        PIPELINE_TASKS.get(model_args.modality, "image-classification"),
        ["mico", f"{model_args.modality}-classification"],
    )
    metrics = run_finetuning(trainer, processor, push, model_args.model_name_or_path, data_args, task, tags)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
