"""Pretrain MiCo (omni-modal contrastive + matching + caption losses) with the 🤗 Trainer.

Single process (CPU or one GPU), on the synthetic data set:

    python examples/make_synthetic_dataset.py --output_dir data/synthetic --num_samples 400
    python examples/run_pretrain.py --config_name tiny --train_file data/synthetic/train.jsonl \
        --validation_file data/synthetic/test.jsonl --output_dir runs/tiny --max_steps 50 \
        --per_device_train_batch_size 8 --learning_rate 5e-4 --dataloader_num_workers 2

Several processes: `torchrun --nproc_per_node N examples/run_pretrain.py ...` (add `--ddp_backend gloo` on CPU), or
`accelerate launch --config_file examples/configs/<config>.yaml examples/run_pretrain.py ...` (see
examples/configs/README.md for DeepSpeed ZeRO-2/3 and FSDP).
"""

import logging
import os
import sys
from dataclasses import dataclass, field

import transformers
from transformers import HfArgumentParser, TrainingArguments, set_seed

from modeling_mico import MiCoConfig, MiCoForPreTraining, MiCoProcessor
from modeling_mico.annotations import check_columns, load_annotation_dataset
from modeling_mico.data import MiCoDataCollator
from modeling_mico.engines import check_fsdp_request, prepare_deepspeed
from modeling_mico.output_utils import prepare_training_output_dir, require_work
from modeling_mico.sharded_data import ShardCollator, load_shards
from modeling_mico.trainer_mico import EvalCollatorTrainer


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "weights to start from (a MiCo directory, Hub id or original checkpoint)"}
    )
    config_name: str | None = field(
        default=None, metadata={"help": "a size preset (tiny, base, giant) or a config JSON file, for a fresh model"}
    )
    processor_name: str | None = field(
        default=None, metadata={"help": "processor directory (default: model_name_or_path, else the default one)"}
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa or flash_attention_2"})


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "annotation file (.jsonl, .json, .csv, .parquet) or a 🤗 datasets folder (save_to_disk output or a "
            "folder load_dataset reads) with Image / Audio / Video or path columns; or give --train_shards"
        },
    )
    train_shards: str | None = field(
        default=None,
        metadata={
            "help": "tar shards written by examples/write_shards.py, e.g. 'dir/shard-{000000..000099}.tar', streamed "
            "(split over processes and DataLoader workers by shard; needs --max_steps)"
        },
    )
    shuffle_buffer: int = field(default=1000, metadata={"help": "samples in the --train_shards shuffle buffer"})
    validation_file: str | None = field(default=None, metadata={"help": "annotation file or datasets folder"})
    train_split: str | None = field(default=None, metadata={"help": "split of a datasets folder (--train_file)"})
    validation_split: str | None = field(
        default=None, metadata={"help": "split of a datasets folder (--validation_file)"}
    )
    streaming: bool = field(default=False, metadata={"help": "stream the annotations (needs --max_steps)"})
    modalities: list[str] | None = field(
        default=None,
        metadata={
            "help": "annotation columns to load: media columns of the model's modalities (image or video, not both) "
            "and subtitle (default: one column per encoder, videos rather than images, and subtitle)"
        },
    )
    image_size: int | None = field(default=None, metadata={"help": "input resolution of a fresh model"})
    num_frames: int | None = field(default=None, metadata={"help": "video frames sampled per clip"})
    num_slices: int | None = field(default=None, metadata={"help": "audio spectrogram slices per clip"})
    skip_broken: bool = field(default=False, metadata={"help": "skip (and count) rows with broken media files"})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "remove everything in --output_dir (earlier checkpoints too) and train from scratch"},
    )


def build_model(model_args: ModelArguments, data_args: DataArguments) -> MiCoForPreTraining:
    """Fresh weights from `--config_name`, or pretrained ones from `--model_name_or_path`."""
    options = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    if model_args.model_name_or_path:
        return MiCoForPreTraining.from_pretrained(model_args.model_name_or_path, **options)
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


def build_processor(model_args: ModelArguments, data_args: DataArguments, config: MiCoConfig) -> MiCoProcessor:
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


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()
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
    set_seed(training_args.seed)

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
    train_collator, eval_collator = (
        MiCoDataCollator(
            processor,
            data_args.modalities,
            training=training,
            skip_broken=data_args.skip_broken,
            config=model.config,
            seed=data_seed if training else None,  # per-row draws: a resumed run repeats them
        )
        for training in (True, False)
    )
    train_source = data_args.train_file or data_args.train_shards
    inputs = (model_args.model_name_or_path, model_args.config_name, train_source, data_args.validation_file)
    check_columns(train_dataset, data_args.modalities, train_source)  # requested columns: never dropped
    checkpoint = prepare_training_output_dir(training_args, data_args.overwrite_output_dir, inputs)
    if data_args.train_shards:
        train_collator = ShardCollator(train_collator)

    trainer = EvalCollatorTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=train_collator,
        eval_data_collator=eval_collator,
        processing_class=processor,
    )
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        if data_args.skip_broken:
            logger.info(f"rows skipped for broken media: {train_collator.num_skipped}")
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if training_args.push_to_hub:
        trainer.push_to_hub(finetuned_from=model_args.model_name_or_path, tags=["mico", "pretraining"])


if __name__ == "__main__":
    main()
