"""Pretrain MiCo (omni-modal contrastive + matching + caption losses) with the 🤗 Trainer. Starts from a size preset
or config JSON (--config_name, fresh weights) or from a checkpoint (--model_name_or_path); reads annotation files or
🤗 datasets folders (--train_file, --validation_file) whose rows hold captions and media files (image or video,
audio, depth, normal, subtitles), or tar shards (--train_shards, streamed). Trains with `--do_train`, reports the
pretraining loss on the validation data with `--do_eval`, and writes checkpoints, the final model and processor,
metrics and the trainer state to --output_dir (default outputs/pretrain). A rerun into the same --output_dir resumes
from its last complete checkpoint; --overwrite_output_dir starts over.

Single process (CPU or one GPU), on the synthetic data set:

    python examples/make_synthetic_dataset.py --num_samples 400
    python examples/run_pretrain.py --config_name tiny --train_file outputs/synthetic/train.jsonl \\
        --validation_file outputs/synthetic/test.jsonl --do_train --do_eval --max_steps 50 \\
        --per_device_train_batch_size 8 --learning_rate 5e-4 --dataloader_num_workers 2

Several processes: `torchrun --nproc_per_node N examples/run_pretrain.py ...` (add `--ddp_backend gloo` on CPU), or
`accelerate launch --config_file examples/configs/<config>.yaml examples/run_pretrain.py ...` (see
examples/configs/README.md for DeepSpeed ZeRO-2/3 and FSDP).
"""

import logging
import os
from dataclasses import dataclass, field

from modeling_mico_cli import ModelArguments, PretrainingDataArguments, TrainerScript


logger = logging.getLogger(__name__)


@dataclass
class PretrainModelArguments(ModelArguments):
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "weights to start from (a MiCo directory, Hub id or original checkpoint)"}
    )
    config_name: str | None = field(
        default=None, metadata={"help": "a size preset (tiny, base, giant) or a config JSON file, for a fresh model"}
    )
    processor_name: str | None = field(
        default=None, metadata={"help": "processor directory (default: model_name_or_path, else the default one)"}
    )


@dataclass
class DataArguments(PretrainingDataArguments):
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "annotation file (.jsonl, .json, .csv, .parquet) or a 🤗 datasets folder (save_to_disk output or a "
            "folder load_dataset reads) with Image / Audio / Video or path columns; or give --train_shards"
        },
    )
    validation_file: str | None = field(default=None, metadata={"help": "annotation file or datasets folder"})
    train_shards: str | None = field(
        default=None,
        metadata={
            "help": "tar shards written by examples/write_shards.py, e.g. 'dir/shard-{000000..000099}.tar', streamed "
            "(split over processes and DataLoader workers by shard; needs --max_steps)"
        },
    )
    shuffle_buffer: int = field(default=1000, metadata={"help": "samples in the --train_shards shuffle buffer"})
    train_split: str | None = field(default=None, metadata={"help": "split of a datasets folder (--train_file)"})
    validation_split: str | None = field(
        default=None, metadata={"help": "split of a datasets folder (--validation_file)"}
    )
    streaming: bool = field(default=False, metadata={"help": "stream the annotations (needs --max_steps)"})
    image_size: int | None = field(default=None, metadata={"help": "input resolution of a fresh model"})
    num_slices: int | None = field(default=None, metadata={"help": "audio spectrogram slices per clip"})
    skip_broken: bool = field(default=False, metadata={"help": "skip (and count) rows with broken media files"})


COMMAND_LINE = TrainerScript(__doc__, (PretrainModelArguments, DataArguments), "pretrain")


def build_model(model_args: PretrainModelArguments, data_args: DataArguments):
    """Fresh weights from `--config_name`, or pretrained ones from `--model_name_or_path` (`MiCoForPreTraining`)."""
    from modeling_mico import MiCoConfig, MiCoForPreTraining

    if model_args.model_name_or_path:
        return model_args.from_pretrained(MiCoForPreTraining)
    if not model_args.config_name:
        raise ValueError("give --config_name (tiny, base, giant or a config JSON) or --model_name_or_path")
    if os.path.isfile(model_args.config_name):
        config = MiCoConfig.from_json_file(model_args.config_name)
    else:
        config = MiCoConfig.from_preset(model_args.config_name)
    if data_args.image_size:
        config.vision_config.image_size = data_args.image_size
    if model_args.attn_implementation:
        config._attn_implementation = model_args.attn_implementation
    return MiCoForPreTraining._from_config(config)  # as AutoModel.from_config: ZeRO-3 partitions it while built


def build_processor(model_args: PretrainModelArguments, data_args: DataArguments, config):
    """The processor of `--processor_name` or `--model_name_or_path`, else the default one of `config`."""
    from modeling_mico import MiCoProcessor

    source = model_args.processor_name or model_args.model_name_or_path
    if source and os.path.isfile(os.path.join(source, "processor_config.json")):
        processor = MiCoProcessor.from_pretrained(source)
        if data_args.num_frames:
            processor.num_frames = data_args.num_frames
        if data_args.num_slices:
            processor.feature_extractor.num_slices = data_args.num_slices
    else:
        processor = MiCoProcessor.from_config(config, num_frames=data_args.num_frames, num_slices=data_args.num_slices)
    processor.check_matches(config)
    return processor


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, training_args = COMMAND_LINE.parse(argv)
    import transformers

    from modeling_mico.annotations import check_columns, load_annotation_dataset
    from modeling_mico.data import MiCoDataCollator
    from modeling_mico.engines import check_fsdp_request, prepare_deepspeed
    from modeling_mico.output_utils import prepare_training_output_dir, require_work
    from modeling_mico.sharded_data import ShardCollator, load_shards
    from modeling_mico.trainer_mico import EvalCollatorTrainer, train_and_evaluate

    training_args.remove_unused_columns = False  # the collator reads the raw annotation columns
    training_args.prediction_loss_only = True  # evaluation reports the pretraining loss
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = True  # tasks absent from a batch leave their heads unused

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    require_work(training_args, data_args.validation_file)
    check_fsdp_request(training_args)
    if training_args.deepspeed:
        prepare_deepspeed(training_args)
    transformers.set_seed(training_args.seed)

    model = build_model(model_args, data_args)
    processor = build_processor(model_args, data_args, model.config)
    if training_args.gradient_checkpointing:
        model.config.use_cache = False

    if (data_args.train_file is None) == (data_args.train_shards is None):
        raise ValueError("give exactly one of --train_file and --train_shards")
    if data_args.train_shards:
        if training_args.max_steps <= 0:
            raise ValueError("--train_shards needs --max_steps (a stream has no length)")
        train_dataset = load_shards(data_args.train_shards, data_args.shuffle_buffer, seed=training_args.seed)
        training_args.accelerator_config.dispatch_batches = False  # every process reads its own shards
    else:
        train_dataset = load_annotation_dataset(
            data_args.train_file, streaming=data_args.streaming, config=model.config, split=data_args.train_split
        )
    eval_dataset = (
        load_annotation_dataset(
            data_args.validation_file,
            streaming=data_args.streaming,
            config=model.config,
            split=data_args.validation_split,
        )
        if data_args.validation_file
        else None
    )
    if data_args.streaming and training_args.max_steps <= 0:
        raise ValueError("--streaming needs --max_steps (a streamed data set has no length)")
    data_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed

    def collator(training: bool):
        collate = MiCoDataCollator(
            processor,
            data_args.modalities,
            training=training,
            skip_broken=data_args.skip_broken,
            config=model.config,
            seed=data_seed if training else None,  # per-row draws: a resumed run repeats them
        )
        return ShardCollator(collate) if training and data_args.train_shards else collate

    collator(True)  # refuses unknown --modalities before the output folder is prepared
    train_source = data_args.train_file or data_args.train_shards
    inputs = (model_args.model_name_or_path, model_args.config_name, train_source, data_args.validation_file)
    check_columns(train_dataset, data_args.modalities, train_source)  # requested columns: never dropped
    checkpoint = prepare_training_output_dir(training_args, data_args.overwrite_output_dir, inputs)
    trainer = EvalCollatorTrainer.for_datasets(model, training_args, processor, collator, train_dataset, eval_dataset)
    train_and_evaluate(trainer, checkpoint, save=True)
    if training_args.do_train and data_args.skip_broken:
        logger.info(f"rows skipped for broken media: {trainer.data_collator.num_skipped}")
    if training_args.push_to_hub:
        trainer.push_to_hub(finetuned_from=model_args.model_name_or_path, tags=["mico", "pretraining"])


if __name__ == "__main__":
    main()
