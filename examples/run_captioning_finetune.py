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
import os
import sys
from dataclasses import dataclass, field

import transformers
from transformers import HfArgumentParser, TrainingArguments, set_seed

from modeling_mico import MiCoForConditionalGeneration
from modeling_mico.annotations import load_annotation_dataset
from modeling_mico.evaluation import load_processor
from modeling_mico.finetuning import MiCoCaptioningTrainer, MiCoCaptionMaskingCollator, append_metrics_to_card
from modeling_mico.peft_utils import build_peft_config, build_peft_model, push_to_hub


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "the MiCo checkpoint to fine-tune"})
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa or flash_attention_2"})


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "annotation file (.jsonl, .json, .csv, .parquet) with captions"})
    validation_file: str | None = field(default=None, metadata={"help": "annotation file to caption and score"})
    modalities: list[str] = field(
        default_factory=lambda: ["video"],
        metadata={"help": "media columns captioned: image, video, audio, or video audio (fused context)"},
    )
    num_frames: int | None = field(default=None, metadata={"help": "video frames sampled per clip"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "write into a non-empty --output_dir"})


@dataclass
class CaptioningArguments:
    num_beams: int = field(default=3, metadata={"help": "beams of the evaluation captions"})
    max_new_tokens: int = field(default=20, metadata={"help": "longest evaluation caption"})
    use_peft: bool = field(default=False, metadata={"help": "LoRA on the text branch instead of full fine-tuning"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator"})


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, CaptioningArguments, TrainingArguments), description=__doc__.split("\n\n")[0]
    )
    model_args, data_args, caption_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    training_args.remove_unused_columns = False  # the collator reads the raw annotation columns
    training_args.prediction_loss_only = True  # evaluation scores generated captions, not the logits
    push, training_args.push_to_hub = training_args.push_to_hub, False  # pushed below, with the model card
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    output_dir = training_args.output_dir
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not data_args.overwrite_output_dir:
        raise FileExistsError(f"output directory {output_dir} is not empty; pass --overwrite_output_dir")
    set_seed(training_args.seed)

    options = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    model = MiCoForConditionalGeneration.from_pretrained(model_args.model_name_or_path, **options)
    model.accepts_loss_kwargs = False  # the loss is the mean over masked tokens of each batch, as in pretraining
    config = model.config
    processor = load_processor(model_args.model_name_or_path, config, data_args.num_frames)
    if caption_args.use_peft:
        model = build_peft_model(model, build_peft_config("text", caption_args.lora_r, caption_args.lora_alpha))
        model.print_trainable_parameters()
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
    metrics: dict[str, float] = {}
    if training_args.do_eval and eval_dataset is not None:
        metrics.update(trainer.evaluate(metric_key_prefix="pretrained"))
    if training_args.do_train:
        result = trainer.train()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
    if training_args.do_eval and eval_dataset is not None:
        after = trainer.evaluate()
        trainer.log_metrics("eval", after)
        metrics.update(after)
        trainer.save_metrics("eval", metrics)
        examples = [f"{caption!r}" for caption in trainer.last_captions[:3]]
        logger.info(f"captions of the first evaluation items: {', '.join(examples)}")

    if caption_args.use_peft:
        model.save_pretrained(os.path.join(output_dir, "adapter"))
        model = model.merge_and_unload()
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    trainer.create_model_card(
        model_name=os.path.basename(os.path.abspath(output_dir)),
        finetuned_from=model_args.model_name_or_path,
        tasks="image-text-to-text",
        dataset=data_args.train_file,
        tags=["mico", "captioning", *data_args.modalities] + (["peft", "lora"] if caption_args.use_peft else []),
    )
    append_metrics_to_card(
        output_dir, metrics, "Caption metrics (before: `pretrained_*`, after fine-tuning: `eval_*`)"
    )
    if push:
        repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(output_dir))
        url = push_to_hub(output_dir, repo_id, token=training_args.hub_token, private=training_args.hub_private_repo)
        logger.info(f"pushed {output_dir} to {url}")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
