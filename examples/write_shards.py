"""Pack an annotation file and its media into WebDataset-style tar shards for `run_pretrain.py --train_shards`.

One sample is `<key>.json` (caption(s), subtitle, id) plus `<key>.<column>.<ext>` per media column holding the file's
encoded bytes (decoded later in the DataLoader workers). Shards are named `<output_dir>/shard-000000.tar`, ...; the
command prints the brace pattern to give to `--train_shards`.

Example:
    python examples/write_shards.py --train_file data/synthetic/train.jsonl --output_dir data/shards \
        --samples_per_shard 1000
"""

import argparse

from modeling_mico import MiCoConfig
from modeling_mico.annotations import load_annotation_dataset
from modeling_mico.sharded_data import write_shards


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_file", required=True, help="annotation file (.jsonl, .json, .csv, .parquet)")
    parser.add_argument("--output_dir", required=True, help="directory for the shards (must hold no shards yet)")
    parser.add_argument("--samples_per_shard", type=int, default=1000, help="samples per tar file (default: 1000)")
    parser.add_argument(
        "--config_name", default=None, help="preset or config JSON whose modalities name the media columns"
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    config = None
    if args.config_name:
        config = (
            MiCoConfig.from_json_file(args.config_name)
            if args.config_name.endswith(".json")
            else MiCoConfig.from_preset(args.config_name)
        )
    rows = load_annotation_dataset(args.train_file, config=config)
    shards = write_shards(rows, args.output_dir, samples_per_shard=args.samples_per_shard, config=config)
    print(f"{len(shards)} shards: {args.output_dir}/shard-{{000000..{len(shards) - 1:06d}}}.tar")


if __name__ == "__main__":
    main()
