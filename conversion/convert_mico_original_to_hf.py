"""Convert an original MiCo checkpoint (research-code layout) into a Transformers model directory.

    python conversion/convert_mico_original_to_hf.py --checkpoint Yiyuan/MiCo-ViT-g-14-omnimodal-300k-b64K \\
        --output_dir mico-vit-g-14 [--dtype bfloat16] [--push_to_hub user/mico-vit-g-14]

`--checkpoint` is a Hub-layout directory or repo id (config.json + mico_pytorch_model.safetensors/.bin), a
repository-layout directory (ckpt/model_step_<N>.pt + log/hps.json), or a single weight file with --config.
"""

import argparse
import sys

from transformers.utils import logging

from modeling_mico.convert_original import convert_original_checkpoint, push_converted_to_hub


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="original checkpoint: directory, Hub repo id or file")
    parser.add_argument("--output_dir", required=True, help="where to write the Transformers directory")
    parser.add_argument("--config", default=None, help="original hyper-parameters (JSON) for a single weight file")
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
    logging.set_verbosity_info()
    report = convert_original_checkpoint(
        args.checkpoint,
        args.output_dir,
        config_path=args.config,
        tokenizer_dir=args.tokenizer_dir,
        dtype=args.dtype,
        image_size=args.image_size,
        num_frames=args.num_frames,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(f"Wrote {args.output_dir}")
    print(f"Dropped {len(report.dropped)} unused keys: {', '.join(report.dropped)}")
    for line in report.resized:
        print(f"Resized {line}")
    if args.push_to_hub:
        print(f"Pushed to {push_converted_to_hub(args.output_dir, args.push_to_hub, args.checkpoint)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
