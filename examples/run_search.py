#!/usr/bin/env python
"""Search your own media with MiCo. `index` reads a MiCo model (--model_name_or_path) and the images, videos (with a
same-named sound clip beside them, or their own sound track with --sound_tracks), audio clips and depth `.npy` maps
of the files and folders in --inputs, and embeds them once into a 🤗 dataset with a FAISS index in --index_dir
(default outputs/search_index; a second run into the same index embeds only new or changed files); `query` reads
that index and ranks its items for text queries and media queries (any modality to any), printing one JSON line per
hit: query, rank, path, modality, score (cosine similarity).

    python examples/run_search.py index --model_name_or_path outputs/pretrain --inputs media/
    python examples/run_search.py query --model_name_or_path outputs/pretrain --text "a dog" \\
        --media media/clip.mp4 --top_k 5
"""

from __future__ import annotations

import argparse
import json

from modeling_mico_cli import HelpFormatter, default_output, script_parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    summaries = {"index": "embed media files into a search index", "query": "rank the indexed items for queries"}
    index, query = (
        commands.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter)
        for name, summary in summaries.items()
    )
    for command in (index, query):
        command.add_argument("--model_name_or_path", required=True, help="MiCo directory or Hub repository")
        command.add_argument("--index_dir", default=default_output("search_index"), help="the search index (a folder)")
        command.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    index.add_argument("--inputs", nargs="+", required=True, help="media files and/or folders (searched recursively)")
    index.add_argument("--batch_size", type=int, default=8)
    index.add_argument("--sound_tracks", action="store_true", help="embed every video with its own sound track")
    index.add_argument("--modality", default=None, help="the modality of every input file (default: by extension)")
    index.add_argument("--overwrite", action="store_true", help="replace a non-empty --index_dir that is no index")
    index.add_argument("--skip_broken", action="store_true", help="leave out undecodable files (counted)")
    query.add_argument("--text", nargs="*", default=[], help="text queries")
    query.add_argument("--media", nargs="*", default=[], help="media file queries (modality by extension)")
    query.add_argument("--top_k", type=int, default=5)
    args = parser.parse_args(argv)
    if args.command == "query" and not (args.text or args.media):
        parser.error("query: give at least one --text or --media query")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from modeling_mico import MiCoModel
    from modeling_mico.captioning import resolve_device
    from modeling_mico.evaluation import load_processor
    from modeling_mico.search import build_index, load_index, search

    model = MiCoModel.from_pretrained(args.model_name_or_path).to(resolve_device(args.device)).eval()
    processor = load_processor(args.model_name_or_path, model.config)
    if args.command == "index":
        counts = build_index(
            model,
            processor,
            args.inputs,
            args.index_dir,
            batch_size=args.batch_size,
            sound_tracks=args.sound_tracks,
            modality=args.modality,
            overwrite=args.overwrite,
            skip_broken=args.skip_broken,
        )
        print(json.dumps({"index_dir": args.index_dir, **counts}))
        return
    index = load_index(args.index_dir)
    queries = [({"text": text}, text) for text in args.text] + [(path, path) for path in args.media]
    for query, shown in queries:
        for rank, hit in enumerate(search(index, model, processor, query, k=args.top_k), start=1):
            print(json.dumps({"query": shown, "rank": rank, **hit}))


if __name__ == "__main__":
    main()
