"""Fine-tune MiCo captioning on image, video, audio or video+audio captions with 🤗 Trainer, and score the captions.

Training is the masked-caption objective of MiCo's pretraining alone (captions masked as pretraining masks them,
causal text branch with cross-attention to the media's context), on `MiCoForConditionalGeneration` initialised from
any MiCo checkpoint; `--use_peft` trains a LoRA adapter on the text branch instead (merged into the saved model).
Evaluation generates a caption per item of --validation_file and scores it against every reference caption of the
row (`captions` list, or `caption`) with BLEU-1..4, ROUGE-L and CIDEr-D (modeling_mico.caption_metrics; METEOR and
SPICE need Java and are not computed); the scores of the model before and after fine-tuning are both reported. On the
synthetic data:

    python examples/run_captioning_finetune.py --model_name_or_path runs/tiny --modalities image \
        --train_file data/synthetic/train.jsonl --validation_file data/synthetic/test.jsonl \
        --output_dir runs/tiny-captions --do_train --do_eval --max_steps 100
"""

import logging
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments

from modeling_mico import MiCoForConditionalGeneration
from modeling_mico.annotations import load_annotation_dataset
from modeling_mico.evaluation import load_processor
from modeling_mico.finetuning import (
    FinetuneDataArguments,
    LoraArguments,
    MiCoCaptioningTrainer,
    MiCoCaptionMaskingCollator,
    prepare_run,
    save_and_publish,
    train_and_evaluate,
)
from modeling_mico.output_utils import prepare_training_output_dir


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "the MiCo checkpoint to fine-tune"})
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa or flash_attention_2"})


@dataclass
class DataArguments(FinetuneDataArguments):
    modalities: list[str] = field(
        default_factory=lambda: ["video"],
        metadata={"help": "media columns captioned: image, video, audio, or video audio (fused context)"},
    )


@dataclass
class CaptioningArguments:
    num_beams: int = field(default=3, metadata={"help": "beams of the evaluation captions"})
    max_new_tokens: int = field(default=20, metadata={"help": "longest evaluation caption"})


def build_parser() -> HfArgumentParser:
    """The command-line options: the dataclasses above and `TrainingArguments`."""
    return HfArgumentParser(
        (ModelArguments, DataArguments, CaptioningArguments, LoraArguments, TrainingArguments),
        description=__doc__.split("\n\n")[0],
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = build_parser()
    model_args, data_args, caption_args, lora_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    push = prepare_run(training_args, data_args.validation_file)
    training_args.prediction_loss_only = True  # evaluation scores generated captions, not the logits
    options = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    model = MiCoForConditionalGeneration.from_pretrained(model_args.model_name_or_path, **options)
    model.accepts_loss_kwargs = False  # the loss is the mean over masked tokens of each batch, as in pretraining
    config = model.config
    processor = load_processor(model_args.model_name_or_path, config, data_args.num_frames)
    model = lora_args.wrap(model, "text")
    train_collator, eval_collator = (
        MiCoCaptionMaskingCollator(processor, config, data_args.modalities, training=training)
        for training in (True, False)
    )
    eval_dataset = (
        load_annotation_dataset(data_args.validation_file, config=config) if data_args.validation_file else None
    )
    trainer = MiCoCaptioningTrainer(
        model=model,
        args=training_args,
        train_dataset=load_annotation_dataset(data_args.train_file, config=config),
        eval_dataset=eval_dataset,
        data_collator=train_collator,
        eval_data_collator=eval_collator,
        processing_class=processor,
        generate_kwargs={"num_beams": caption_args.num_beams, "max_new_tokens": caption_args.max_new_tokens},
    )
    inputs = (model_args.model_name_or_path, data_args.train_file, data_args.validation_file)
    checkpoint = prepare_training_output_dir(training_args, data_args.overwrite_output_dir, inputs)
    metrics = train_and_evaluate(trainer, checkpoint)
    if trainer.last_captions:
        logger.info(f"captions of the first evaluation items: {trainer.last_captions[:3]}")
    save_and_publish(
        trainer,
        model,
        processor,
        metrics,
        push,
        base_model=model_args.model_name_or_path,
        dataset=data_args.train_file,
        task="image-text-to-text",
        tags=["mico", "captioning", *data_args.modalities],
    )
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
