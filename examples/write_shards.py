"""Pack an annotation file and its media into WebDataset-style tar shards for `run_pretrain.py --train_shards`.
Reads the annotation file (--train_file) and the media files its rows name (the media columns of the default
modalities, or of --config_name's). One sample is `<key>.json` (caption(s), subtitle, id) plus
`<key>.<column>.<ext>` per media column holding the file's encoded bytes (decoded later in the DataLoader workers).
Writes `shard-000000.tar`, `shard-000001.tar`, ... to --output_dir (default outputs/shards; it must hold no shards
yet) and prints the brace pattern to give to `--train_shards`.

    python examples/write_shards.py --train_file outputs/synthetic/train.jsonl --samples_per_shard 1000
"""

import argparse

from modeling_mico_cli import default_output, script_parser


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    parser.add_argument("--train_file", required=True, help="annotation file (.jsonl, .json, .csv, .parquet)")
    parser.add_argument("--output_dir", default=default_output("shards"), help="directory for the shards")
    parser.add_argument("--samples_per_shard", type=int, default=1000, help="samples per tar file (default: 1000)")
    parser.add_argument(
        "--config_name", default=None, help="preset or config JSON whose modalities name the media columns"
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    from modeling_mico import MiCoConfig
    from modeling_mico.annotations import load_annotation_dataset
    from modeling_mico.sharded_data import write_shards

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
