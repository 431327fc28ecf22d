"""Write a synthetic captioned omni-modal dataset (image, video, audio, depth, normal) with train and test splits.
Reads nothing: every sample is drawn from a seeded random generator (shapes, colours, sizes, motion and sounds that
its captions describe). Writes `train.jsonl` and `test.jsonl` (one row per sample: id, captions, attributes and one
relative media path per modality), `dataset_info.json` and one sub-folder per modality to --output_dir (default
outputs/synthetic), which must be empty unless --overwrite.

    python examples/make_synthetic_dataset.py --num_samples 400
"""

import argparse

from modeling_mico_cli import default_output, script_parser


def build_parser() -> argparse.ArgumentParser:
    """Command-line options; they mirror the arguments of `make_synthetic_dataset`."""
    parser = script_parser(__doc__)
    parser.add_argument("--output_dir", default=default_output("synthetic"), help="directory to write")
    parser.add_argument("--num_samples", type=int, default=400, help="samples over both splits (default: 400)")
    parser.add_argument("--test_fraction", type=float, default=0.2, help="share of test samples (default: 0.2)")
    parser.add_argument(
        "--num_test", type=int, default=None, help="exact number of test samples (overrides the fraction)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files")
    parser.add_argument("--image_size", type=int, default=64, help="side of images, frames and maps in pixels")
    parser.add_argument("--num_video_frames", type=int, default=8, help="frames per one-second video (default: 8)")
    parser.add_argument(
        "--modalities", nargs="+", default=None, help="what to write (default: image video audio depth normal)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the synthetic data in a non-empty directory")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    from modeling_mico.synthetic_data import make_synthetic_dataset

    options = {name: value for name, value in vars(args).items() if value is not None}  # None: the function's default
    try:
        result = make_synthetic_dataset(**options)  # the options are named as its arguments
    except (ValueError, FileExistsError, NotADirectoryError) as error:
        parser.error(str(error))
    print(
        f"Wrote {result['num_train']} train + {result['num_test']} test samples "
        f"({', '.join(result['modalities'])}) to {result['output_dir']} in {result['seconds']:.1f} s."
    )


if __name__ == "__main__":
    main()
