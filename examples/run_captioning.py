#!/usr/bin/env python
"""Caption media files with a MiCo model and write one JSON line per file. Reads a MiCo checkpoint
(--model_name_or_path: a directory or a Hub repository) and the media files and folders (searched recursively) given
in --inputs; a file's modality (image, video, audio, depth, ...) comes from the extensions the model's modalities
declare, or --modality names it for every file. Files are batched by modality, captioned with beam search (bfloat16 on
a GPU, float32 on the CPU unless --dtype says otherwise), and written as JSON lines `{"path", "modality", "caption"}`
to --output_file (default outputs/captions.jsonl), atomically; an existing file is replaced only with --overwrite.

    python examples/run_captioning.py --model_name_or_path outputs/pretrain --inputs media/ clip.mp4 \\
        --num_beams 3 --max_new_tokens 40 --num_frames 4
    python examples/run_captioning.py --model_name_or_path outputs/pretrain --inputs depth_maps/ --modality depth \\
        --output_file outputs/depth_captions.jsonl
"""

from __future__ import annotations

import argparse
import json

from modeling_mico_cli import arguments_for, default_output, script_parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--model_name_or_path", required=True, help="converted MiCo directory or Hub repository")
    parser.add_argument("--inputs", nargs="+", required=True, help="media files and/or folders (searched recursively)")
    parser.add_argument("--output_file", default=default_output("captions.jsonl"), help="JSON lines written")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_beams", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=40)
    parser.add_argument("--num_frames", type=int, default=4, help="frames sampled per video")
    parser.add_argument("--modality", default=None, help="the modality of every input file (default: by extension)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--dtype", default="auto", help="'auto' (bfloat16 on GPU), 'float32', 'bfloat16', 'float16'")
    parser.add_argument("--skip_broken", action="store_true", help="skip (and report) files that cannot be decoded")
    parser.add_argument("--sound_tracks", action="store_true", help="caption videos with their sound track, if any")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from modeling_mico import MiCoForConditionalGeneration
    from modeling_mico.captioning import caption_files, collect_media_files, resolve_device, resolve_dtype
    from modeling_mico.evaluation import load_processor
    from modeling_mico.output_utils import atomic_output, check_output_path

    inputs = [*args.inputs, args.model_name_or_path]
    check_output_path(args.output_file, inputs, args.overwrite)  # before minutes of captioning
    device = resolve_device(args.device)
    model = MiCoForConditionalGeneration.from_pretrained(
        args.model_name_or_path, dtype=resolve_dtype(args.dtype, device)
    )
    model = model.to(device).eval()
    processor = load_processor(args.model_name_or_path, model.config)
    files = collect_media_files(args.inputs, model.config, args.modality)
    if not files:
        raise SystemExit(
            f"no media files of the model's modalities ({', '.join(model.config.modality_specs)}) in {args.inputs}"
        )
    generation = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    records = caption_files(model, processor, files, **arguments_for(caption_files, args), **generation)
    with atomic_output(args.output_file, inputs, args.overwrite, directory=False) as partial:
        partial.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    skipped = f" (skipped {len(files) - len(records)} undecodable files)" if len(records) < len(files) else ""
    print(f"wrote {len(records)} captions to {args.output_file}{skipped}")


if __name__ == "__main__":
    main()
