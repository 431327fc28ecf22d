"""Fine-tune MiCo with a PEFT adapter (LoRA by default) on MiCo's pretraining losses, reporting retrieval metrics.
Reads a MiCo model (--model_name_or_path: a directory saved by examples/run_pretrain.py, a Hub repository or an
original checkpoint) and annotation files (--train_file, --validation_file) whose rows hold captions and the media
columns of --modalities; trains the adapter on the chosen towers (--target_towers) with the chosen losses (--losses),
and with --do_eval reports text<->media retrieval (R@1/5/10, median and mean rank) of every target whose columns are
loaded. Writes the adapter, processor, metrics and a model card to --output_dir (default outputs/finetune_peft), and
with --merge_and_save the merged full model (loadable by `AutoModel`) to <output_dir>/merged; --push_to_hub uploads
the merged model when there is one, else the adapter. A rerun into the same --output_dir resumes from its last
complete checkpoint (or --resume_from_checkpoint); --overwrite_output_dir starts over.

On the synthetic data set (examples/make_synthetic_dataset.py):

    python examples/run_finetune_peft.py --model_name_or_path outputs/pretrain \\
        --train_file outputs/synthetic/train.jsonl --validation_file outputs/synthetic/test.jsonl --max_steps 100 \\
        --per_device_train_batch_size 16 --learning_rate 1e-3 --modalities image --target_towers both \\
        --do_train --do_eval --eval_strategy steps --eval_steps 50 --merge_and_save

`--peft_config '{"peft_type": "IA3"}'` (or a JSON file) selects another PEFT method.
"""

import logging
import os
from dataclasses import dataclass, field

from modeling_mico_cli import (
    LoraArguments,
    ModelArguments,
    PretrainingDataArguments,
    TrainerScript,
)


logger = logging.getLogger(__name__)


@dataclass
class RetrievalDataArguments(PretrainingDataArguments):
    retrieval_targets: list[str] | None = field(
        default=None, metadata={"help": "retrieval reported at evaluation, e.g. image va (default: every loaded one)"}
    )


@dataclass
class AdapterArguments(LoraArguments):
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


COMMAND_LINE = TrainerScript(__doc__, (ModelArguments, RetrievalDataArguments, AdapterArguments), "finetune_peft")


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, adapter_args, training_args = COMMAND_LINE.parse(argv)
    from modeling_mico import MiCoForPreTraining
    from modeling_mico.annotations import check_columns, load_annotation_dataset
    from modeling_mico.data import MiCoDataCollator
    from modeling_mico.evaluation import load_processor, targets_for_columns
    from modeling_mico.finetuning import prepare_run
    from modeling_mico.output_utils import prepare_training_output_dir
    from modeling_mico.peft_utils import (
        build_peft_config,
        build_peft_model,
        merge_and_save,
        push_to_hub,
        resolve_towers,
        set_pretraining_losses,
        write_model_card,
    )
    from modeling_mico.trainer_mico import MiCoRetrievalTrainer, retrieval_compute_metrics, train_and_evaluate

    push = prepare_run(training_args, data_args.validation_file)  # the upload happens after the model card is written
    output_dir = training_args.output_dir

    model = model_args.from_pretrained(MiCoForPreTraining)
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

    data_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed

    def collator(training: bool):  # seeded per-row draws in training: a resumed run repeats them
        seed = data_seed if training else None
        return MiCoDataCollator(processor, data_args.modalities, training=training, config=config, seed=seed)

    targets = data_args.retrieval_targets or targets_for_columns(config, collator(True).modalities)
    train_dataset = load_annotation_dataset(data_args.train_file, config=config)
    eval_dataset = (
        load_annotation_dataset(data_args.validation_file, config=config) if data_args.validation_file else None
    )
    inputs = (model_args.model_name_or_path, data_args.train_file, data_args.validation_file)
    check_columns(train_dataset, data_args.modalities, data_args.train_file)  # requested columns: never dropped
    checkpoint = prepare_training_output_dir(training_args, data_args.overwrite_output_dir, inputs)

    trainer = MiCoRetrievalTrainer.for_datasets(
        model,
        training_args,
        processor,
        collator,
        train_dataset,
        eval_dataset,
        compute_metrics=retrieval_compute_metrics(targets) if targets else None,
        retrieval_targets=targets,
    )
    metrics = train_and_evaluate(trainer, checkpoint, save=True)  # the adapter and the processor
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
