"""Fine-tune MiCo captioning with 🤗 Trainer and score its captions. Reads a MiCo checkpoint (--model_name_or_path)
and annotation files whose rows hold the media of --modalities (image, video, audio, or video audio for a fused
context) and their captions (`captions` list or `caption`); trains `MiCoForConditionalGeneration` on MiCo's
masked-caption objective alone (or a LoRA adapter on the text branch with --use_peft, merged on save); with
--do_eval, generates a caption per item of --validation_file before and after training and scores it against every
reference caption (BLEU-1..4, ROUGE-L, CIDEr-D; METEOR and SPICE need Java and are not computed). Writes the model,
processor, metrics (`all_results.json`) and a model card to --output_dir (default outputs/captioning_finetune);
--push_to_hub uploads them.

On the synthetic data set (examples/make_synthetic_dataset.py) from a model pretrained by examples/run_pretrain.py:

    python examples/run_captioning_finetune.py --model_name_or_path outputs/pretrain --modalities image \\
        --train_file outputs/synthetic/train.jsonl --validation_file outputs/synthetic/test.jsonl \\
        --do_train --do_eval --max_steps 100
"""

import logging
import sys
from dataclasses import dataclass, field

from modeling_mico_cli import (
    DataArguments,
    FinetuneLoraArguments,
    ModelArguments,
    TrainerScript,
)


logger = logging.getLogger(__name__)


@dataclass
class CaptioningDataArguments(DataArguments):
    modalities: list[str] = field(
        default_factory=lambda: ["video"],
        metadata={"help": "media columns captioned: image, video, audio, or video audio (fused context)"},
    )


@dataclass
class CaptioningArguments:
    num_beams: int = field(default=3, metadata={"help": "beams of the evaluation captions"})
    max_new_tokens: int = field(default=20, metadata={"help": "longest evaluation caption"})


COMMAND_LINE = TrainerScript(
    __doc__,
    (ModelArguments, CaptioningDataArguments, CaptioningArguments, FinetuneLoraArguments),
    "captioning_finetune",
)


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, caption_args, lora_args, training_args = COMMAND_LINE.parse(argv)
    from modeling_mico import MiCoForConditionalGeneration
    from modeling_mico.annotations import load_annotation_dataset
    from modeling_mico.evaluation import load_processor
    from modeling_mico.finetuning import (
        MiCoCaptioningTrainer,
        MiCoCaptionMaskingCollator,
        prepare_run,
        run_finetuning,
    )

    push = prepare_run(training_args, data_args.validation_file)
    training_args.prediction_loss_only = True  # evaluation scores generated captions, not the logits
    model = model_args.from_pretrained(MiCoForConditionalGeneration)
    model.accepts_loss_kwargs = False  # the loss is the mean over masked tokens of each batch, as in pretraining
    config = model.config
    processor = load_processor(model_args.model_name_or_path, config, data_args.num_frames)
    model = lora_args.wrap(model, "text")

    data_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed

    def collator(training: bool):  # seeded captions, frames and masking in training: a resumed run repeats them
        seed = data_seed if training else None
        return MiCoCaptionMaskingCollator(processor, config, data_args.modalities, training=training, seed=seed)

    eval_dataset = (
        load_annotation_dataset(data_args.validation_file, config=config) if data_args.validation_file else None
    )
    trainer = MiCoCaptioningTrainer.for_datasets(
        model,
        training_args,
        processor,
        collator,
        load_annotation_dataset(data_args.train_file, config=config),
        eval_dataset,
        generate_kwargs={"num_beams": caption_args.num_beams, "max_new_tokens": caption_args.max_new_tokens},
    )
    task, tags = "image-text-to-text", ["mico", "captioning", *data_args.modalities]
    metrics = run_finetuning(trainer, processor, push, model_args.model_name_or_path, data_args, task, tags)
    if trainer.last_captions:
        logger.info(f"captions of the first evaluation items: {trainer.last_captions[:3]}")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
