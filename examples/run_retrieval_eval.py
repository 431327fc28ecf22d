"""Zero-shot text<->item retrieval of a MiCo model on an annotation file (R@1/5/10, median and mean rank). Reads a
MiCo model (--model_name_or_path) and an annotation file or 🤗 datasets folder (--test_file) whose rows hold captions
and media; embeds the captions and the items of every target in --modalities (the model's modalities such as video,
audio, image, depth, normal or declared ones like thermal, and fused combinations of its fused heads: va = video +
audio, id = image + depth), optionally re-ranks each query's top k with the matching head (--itm_rerank_top_k).
Writes `retrieval_results.json` (keys such as `t2v/R@1`, `v2t/R@1`, `t2va/R@1`; percentages; re-ranked results under
`itm/`) and one `similarity_<target>.png` heat-map per target to --output_dir (default outputs/retrieval), atomically
(never inside the model directory or over the annotations), and prints a Markdown table.

On the synthetic data set (examples/make_synthetic_dataset.py) with a model saved by examples/run_pretrain.py:

    python examples/run_retrieval_eval.py --model_name_or_path outputs/pretrain \\
        --test_file outputs/synthetic/test.jsonl --modalities video audio depth normal va --itm_rerank_top_k 10

`--skip_broken` leaves out (and reports) items whose media cannot be decoded.
"""

import argparse
import logging

from modeling_mico_cli import default_output, script_parser


logger = logging.getLogger(__name__)
ANNOTATION_FORMATS = (
    "auto (from the extension and content) or one of modeling_mico.annotations.FORMATS: mico, msrvtt, ..."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--model_name_or_path", required=True, help="a MiCo directory or Hub repository")
    parser.add_argument(
        "--test_file",
        required=True,
        help="annotation file (see modeling_mico.annotations) or a 🤗 datasets folder (save_to_disk output or a folder "
        "load_dataset reads) with Image / Audio / Video or path columns",
    )
    parser.add_argument("--output_dir", default=default_output("retrieval"), help="results and heat-maps written")
    parser.add_argument(
        "--modalities",
        nargs="+",
        default=["video"],
        help="retrieval targets: the model's modalities, or fused ones such as va (video+audio) / id (image+depth)",
    )
    parser.add_argument("--itm_rerank_top_k", type=int, default=None, help="re-rank each query's top k by matching")
    parser.add_argument("--batch_size", type=int, default=16, help="items, captions or matching pairs per pass")
    parser.add_argument("--annotation_format", default="auto", help=ANNOTATION_FORMATS)
    parser.add_argument("--media_root", default=None, help="directory media paths are relative to")
    parser.add_argument("--split", default=None, help="keep only rows of this split (of a datasets folder: its split)")
    parser.add_argument("--num_frames", type=int, default=None, help="video frames per clip (default: processor's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, else float32), float32, bfloat16")
    parser.add_argument("--attn_implementation", default=None, help="eager, sdpa or flash_attention_2")
    parser.add_argument("--heatmap_items", type=int, default=16, help="items shown in the similarity heat-maps")
    parser.add_argument("--skip_missing", action="store_true", help="skip targets some rows lack instead of failing")
    parser.add_argument(
        "--skip_broken", action="store_true", help="leave out (and report) items with undecodable files"
    )
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="replace a non-empty --output_dir (its files are removed)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    import torch
    import transformers
    from transformers import AutoModel

    import modeling_mico  # noqa: F401  (registers MiCo with the Auto classes)
    from modeling_mico.annotations import load_annotations
    from modeling_mico.evaluation import (
        load_processor,
        resolve_device_and_dtype,
        resolve_targets,
        retrieval_results,
        score_retrieval,
        write_results,
    )
    from modeling_mico.output_utils import atomic_output, check_output_path
    from modeling_mico.retrieval import format_results_table, plot_similarity_heatmap

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    inputs = (args.model_name_or_path, args.test_file, args.media_root)
    check_output_path(args.output_dir, inputs, args.overwrite_output_dir, "--overwrite_output_dir")

    device, dtype = resolve_device_and_dtype(args.device, args.dtype)
    options = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    model = AutoModel.from_pretrained(args.model_name_or_path, dtype=dtype, **options).to(device).eval()
    resolve_targets(model.config, args.modalities)  # unknown targets fail before the data is read
    processor = load_processor(args.model_name_or_path, model.config, args.num_frames)
    rows = load_annotations(args.test_file, args.annotation_format, args.media_root, args.split, config=model.config)
    logger.info(f"{len(rows)} items from {args.test_file}; targets {args.modalities}; {device}, {dtype}")

    scores = score_retrieval(
        model,
        processor,
        rows,
        args.modalities,
        args.batch_size,
        args.itm_rerank_top_k,
        args.skip_missing,
        source=args.test_file,
        skip_broken=args.skip_broken,
    )
    results = retrieval_results(scores)
    first_captions = scores.first_caption_rows()
    with atomic_output(args.output_dir, inputs, args.overwrite_output_dir, "--overwrite_output_dir") as partial:
        write_results(results, partial / "retrieval_results.json")
        for target, similarity in scores.similarity.items():
            plot_similarity_heatmap(
                similarity[first_captions].to(torch.float32),
                partial / f"similarity_{target}.png",
                max_items=args.heatmap_items,
                title=f"text-{target} cosine similarity (first caption of each item)",
            )
    print(format_results_table(results))
    print(f"{results['num_items']} items, {results['num_texts']} captions; chance R@1 = {results['chance/R@1']:.2f}")
    return results


if __name__ == "__main__":
    main()
