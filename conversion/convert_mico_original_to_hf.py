"""Convert an original MiCo checkpoint (research-code layout) into a Transformers model directory. Reads --checkpoint:
a Hub-layout directory or repo id (config.json + mico_pytorch_model.safetensors/.bin), a repository-layout directory
(ckpt/model_step_<N>.pt + log/hps.json), or a single weight file with its hyper-parameters in --config. Writes the
configuration, the weights (safetensors, sharded above --max_shard_size, in --dtype) and the processor with the BERT
tokenizer to --output_dir (required; replaced entirely only with --overwrite, never the source), prints the unused
keys it dropped and what it resized, and with --push_to_hub adds a model card and uploads the directory.

    python conversion/convert_mico_original_to_hf.py --checkpoint Yiyuan/MiCo-ViT-g-14-omnimodal-300k-b64K \\
        --output_dir outputs/mico-vit-g-14 [--dtype bfloat16] [--push_to_hub user/mico-vit-g-14]
"""

import argparse
import sys

from modeling_mico_cli import script_parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="original checkpoint: directory, Hub repo id or file")
    parser.add_argument("--output_dir", required=True, help="where to write the Transformers directory")
    parser.add_argument(
        "--config", dest="config_path", default=None, help="original hyper-parameters (JSON) for a single weight file"
    )
    parser.add_argument("--tokenizer_dir", default=None, help="BERT tokenizer directory (default: bundled vocabulary)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--image_size", type=int, default=None, help="resize the position embedding to this size")
    parser.add_argument("--num_frames", type=int, default=None, help="resample the video frame table to N frames")
    parser.add_argument("--max_shard_size", default="5GB")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO", help="upload the result to this Hub repo")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir entirely")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging

    from modeling_mico.convert_original import convert_original_checkpoint, push_converted_to_hub

    logging.set_verbosity_info()
    options = dict(vars(args))  # named as the arguments of `convert_original_checkpoint`
    push_to = options.pop("push_to_hub")
    report = convert_original_checkpoint(options.pop("checkpoint"), **options)
    print(f"Wrote {args.output_dir}")
    print(f"Dropped {len(report.dropped)} unused keys: {', '.join(report.dropped)}")
    for line in report.resized:
        print(f"Resized {line}")
    if push_to:
        print(f"Pushed to {push_converted_to_hub(args.output_dir, push_to, args.checkpoint)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
