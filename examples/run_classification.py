"""Fine-tune a MiCo encoder for image, video, audio or depth classification (single- or multi-label) with 🤗 Trainer.

The data is a folder-per-class tree (`train/<label>/<file>`) or an annotation file (.jsonl/.json/.csv) with the media
column of the modality and a label column (`--label_column`, a dotted path such as `attributes.shape`; a list of
labels makes it multi-label). The head (pooled class tokens -> LayerNorm -> linear) is new; the encoder comes from any
MiCo checkpoint. Full fine-tuning by default, or LoRA on the vision tower (`--use_peft`); layer-wise learning-rate
decay (`--layer_decay 0.9`, as BEiT/EVA), mixup/cutmix (`--mixup_alpha`, `--cutmix_alpha`, off by default). Reports
accuracy (single-label) or mAP (multi-label), saves the model (merged when PEFT is used, the adapter in
<output_dir>/adapter) with the processor and a model card, and `--push_to_hub` uploads it. On the synthetic data:

    python examples/run_classification.py --model_name_or_path runs/tiny --modality image \
        --train_file data/synthetic/train.jsonl --validation_file data/synthetic/test.jsonl \
        --label_column attributes.shape --output_dir runs/tiny-shape --do_train --do_eval --max_steps 60
"""

import sys
from dataclasses import dataclass, field

import datasets
import torch
from transformers import HfArgumentParser, TrainingArguments

from modeling_mico import (
    MiCoForAudioClassification,
    MiCoForDepthClassification,
    MiCoForImageClassification,
    MiCoForVideoClassification,
)
from modeling_mico.evaluation import load_processor
from modeling_mico.finetuning import (
    FinetuneDataArguments,
    LoraArguments,
    MiCoClassificationCollator,
    classification_compute_metrics,
    label_names,
    layer_decay_parameter_groups,
    load_classification_rows,
    prepare_run,
    save_and_publish,
    train_and_evaluate,
)
from modeling_mico.output_utils import prepare_training_output_dir
from modeling_mico.trainer_mico import EvalCollatorTrainer


HEADS = {
    "image": MiCoForImageClassification,
    "video": MiCoForVideoClassification,
    "audio": MiCoForAudioClassification,
    "depth": MiCoForDepthClassification,
}
PIPELINE_TASKS = {"image": "image-classification", "video": "video-classification", "audio": "audio-classification"}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "the MiCo checkpoint whose encoder is fine-tuned"})
    modality: str = field(default="image", metadata={"help": "what is classified: image, video, audio or depth"})
    fused_modalities: list[str] = field(
        default_factory=list, metadata={"help": "modalities fused with it (e.g. audio for video+audio)"}
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa or flash_attention_2"})


@dataclass
class DataArguments(FinetuneDataArguments):
    label_column: str = field(default="label", metadata={"help": "label column of annotation files (dotted path)"})


@dataclass
class FinetuneArguments:
    layer_decay: float = field(default=1.0, metadata={"help": "layer-wise learning-rate decay (1 = none; EVA: 0.9)"})
    mixup_alpha: float = field(default=0.0, metadata={"help": "mixup Beta(alpha, alpha) (0 = off)"})
    cutmix_alpha: float = field(default=0.0, metadata={"help": "cutmix Beta(alpha, alpha) (0 = off)"})


def build_parser() -> HfArgumentParser:
    """The command-line options: the dataclasses above and `TrainingArguments`."""
    return HfArgumentParser(
        (ModelArguments, DataArguments, FinetuneArguments, LoraArguments, TrainingArguments),
        description=__doc__.split("\n\n")[0],
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = build_parser()
    model_args, data_args, finetune_args, lora_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if model_args.modality not in HEADS:
        parser.error(f"--modality must be one of {sorted(HEADS)}, got {model_args.modality!r}")
    push = prepare_run(training_args, data_args.validation_file)

    model_class = HEADS[model_args.modality]
    modalities = [model_args.modality, *model_args.fused_modalities]
    options = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    model = model_class.from_pretrained(model_args.model_name_or_path, **options)  # MiCo or original checkpoints
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

    def collator(training: bool) -> MiCoClassificationCollator:
        mixing = {"mixup_alpha": finetune_args.mixup_alpha, "cutmix_alpha": finetune_args.cutmix_alpha}
        return MiCoClassificationCollator(processor, config, modalities, training, multi_label, **mixing)

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
    trainer = EvalCollatorTrainer(
        model=model,
        args=training_args,
        train_dataset=datasets.Dataset.from_list(train_rows),
        eval_dataset=eval_dataset,
        data_collator=collator(training=True),
        eval_data_collator=collator(training=False),
        processing_class=processor,
        compute_metrics=classification_compute_metrics(multi_label),
        optimizers=(optimizer, None),
    )
    inputs = (model_args.model_name_or_path, data_args.train_file, data_args.validation_file)
    checkpoint = prepare_training_output_dir(training_args, data_args.overwrite_output_dir, inputs)
    metrics = train_and_evaluate(trainer, checkpoint)
    save_and_publish(
        trainer,
        model,
        processor,
        metrics,
        push,
        base_model=model_args.model_name_or_path,
        dataset=data_args.train_file,
        task=PIPELINE_TASKS.get(model_args.modality, "image-classification"),
        tags=["mico", f"{model_args.modality}-classification"],
    )
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
