"""Fine-tune MiCo with a PEFT adapter (LoRA by default) on MiCo's pretraining losses, reporting retrieval metrics.

On the synthetic data set, from a model saved by examples/run_pretrain.py (or any MiCo directory / Hub repository):

    python examples/run_finetune_peft.py --model_name_or_path runs/tiny --train_file data/synthetic/train.jsonl \
        --validation_file data/synthetic/test.jsonl --output_dir runs/tiny-lora --max_steps 100 \
        --per_device_train_batch_size 16 --learning_rate 1e-3 --modalities image --target_towers both \
        --do_train --do_eval --eval_strategy steps --eval_steps 50 --merge_and_save

The adapter (and the processor, metrics and a model card) is saved in --output_dir; `--merge_and_save` also writes the
merged full model to <output_dir>/merged, loadable by `AutoModel`. A rerun into the same --output_dir resumes from its
last complete checkpoint (or --resume_from_checkpoint); --overwrite_output_dir starts over. `--peft_config
'{"peft_type": "IA3"}'` (or a JSON file) selects another PEFT method. `--push_to_hub` uploads the merged model when
there is one, else the adapter.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

import transformers
from transformers import HfArgumentParser, TrainingArguments, set_seed

from modeling_mico import MiCoForPreTraining
from modeling_mico.annotations import check_columns, load_annotation_dataset
from modeling_mico.data import MiCoDataCollator
from modeling_mico.evaluation import load_processor, targets_for_columns
from modeling_mico.output_utils import prepare_training_output_dir, require_work
from modeling_mico.peft_utils import (
    build_peft_config,
    build_peft_model,
    merge_and_save,
    push_to_hub,
    resolve_towers,
    set_pretraining_losses,
    write_model_card,
)
from modeling_mico.trainer_mico import MiCoRetrievalTrainer, retrieval_compute_metrics


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "the MiCo model to adapt (directory or Hub repository)"})
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa or flash_attention_2"})


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "annotation file (.jsonl, .json, .csv, .parquet)"})
    validation_file: str | None = field(default=None, metadata={"help": "annotation file for evaluation"})
    modalities: list[str] | None = field(
        default=None,
        metadata={
            "help": "annotation columns to load: media columns of the model's modalities (image or video, not both) "
            "and subtitle (default: one column per encoder, videos rather than images, and subtitle)"
        },
    )
    retrieval_targets: list[str] | None = field(
        default=None,
        metadata={
            "help": "retrieval reported at evaluation: the model's modalities and fused targets such as va "
            "(default: every target whose columns are loaded)"
        },
    )
    num_frames: int | None = field(default=None, metadata={"help": "video frames sampled per clip"})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "remove everything in --output_dir (earlier checkpoints too) and train from scratch"},
    )


@dataclass
class AdapterArguments:
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    peft_config: str | None = field(
        default=None, metadata={"help": "JSON (inline or a file) of another PEFT config, with `peft_type`"}
    )
    target_towers: list[str] = field(default_factory=lambda: ["both"], metadata={"help": "vision, text or both"})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "module names to adapt in the chosen towers (default: attention and MLP)"}
    )
    losses: list[str] = field(
        default_factory=lambda: ["contrastive", "matching"],
        metadata={"help": "pretraining losses to train: contrastive, matching, caption"},
    )
    merge_and_save: bool = field(default=False, metadata={"help": "also save the merged model to <output_dir>/merged"})


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, AdapterArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, adapter_args, training_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, adapter_args, training_args = parser.parse_args_into_dataclasses()
    training_args.remove_unused_columns = False  # the collator reads the raw annotation columns
    # the Hub upload happens here, after the model card is written (not through Trainer's own push)
    push, training_args.push_to_hub = training_args.push_to_hub, False

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    output_dir = training_args.output_dir
    require_work(training_args, data_args.validation_file)
    set_seed(training_args.seed)

    options = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    model = MiCoForPreTraining.from_pretrained(model_args.model_name_or_path, **options)
    set_pretraining_losses(model, adapter_args.losses)
    towers = resolve_towers(adapter_args.target_towers)
    peft_config = build_peft_config(
        towers,
        adapter_args.lora_r,
        adapter_args.lora_alpha,
        adapter_args.lora_dropout,
        adapter_args.target_modules,
        adapter_args.peft_config,
    )
    model = build_peft_model(model, peft_config)
    model.print_trainable_parameters()

    config = model.config
    processor = load_processor(model_args.model_name_or_path, config, data_args.num_frames)
    processor.check_matches(config)
    train_collator, eval_collator = (
        MiCoDataCollator(processor, data_args.modalities, training=training, config=config)
        for training in (True, False)
    )
    targets = data_args.retrieval_targets or targets_for_columns(config, train_collator.modalities)
    train_dataset = load_annotation_dataset(data_args.train_file, config=config)
    eval_dataset = (
        load_annotation_dataset(data_args.validation_file, config=config) if data_args.validation_file else None
    )
    inputs = (model_args.model_name_or_path, data_args.train_file, data_args.validation_file)
    check_columns(train_dataset, data_args.modalities, data_args.train_file)  # requested columns: never dropped
    checkpoint = prepare_training_output_dir(training_args, data_args.overwrite_output_dir, inputs)

    trainer = MiCoRetrievalTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=train_collator,
        eval_data_collator=eval_collator,
        processing_class=processor,
        compute_metrics=retrieval_compute_metrics(targets) if targets else None,
        retrieval_targets=targets,
    )
    metrics: dict[str, float] = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()  # the adapter and the processor
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if not training_args.do_train:
        return  # evaluation only: the metrics files are the output; no model card over the directory's README.md

    card = dict(
        base_model=model_args.model_name_or_path,
        train_files=[data_args.train_file],
        metrics=metrics,
        peft_type=str(getattr(peft_config.peft_type, "value", peft_config.peft_type)),
        target_towers=towers,
        losses=adapter_args.losses,
        hyperparameters={
            "learning_rate": training_args.learning_rate,
            "max_steps": training_args.max_steps,
            "per_device_train_batch_size": training_args.per_device_train_batch_size,
            "seed": training_args.seed,
        },
    )
    write_model_card(output_dir, **card)
    upload_dir = output_dir
    if adapter_args.merge_and_save:
        upload_dir = os.path.join(output_dir, "merged")
        merge_and_save(model, upload_dir, processor)
        write_model_card(upload_dir, merged=True, **card)
    if push:
        repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(output_dir))
        url = push_to_hub(upload_dir, repo_id, token=training_args.hub_token, private=training_args.hub_private_repo)
        logger.info(f"pushed {upload_dir} to {url}")


if __name__ == "__main__":
    main()
