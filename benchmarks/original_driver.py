"""Drive the ORIGINAL MiCo code (github.com/invictus717/MiCo) for `benchmarks/bench_original.py`.

Runs under the original's own Python environment (torch 2.0.1, transformers 4.31, decord), started by the harness as
`ORIGINAL_PYTHON benchmarks/original_driver.py --original_repo DIR --workdir DIR --threads N`. It imports nothing from
this package: it builds the original `MiCo` from a checkpoint in the original training layout that the harness wrote
(`<workdir>/repo/ckpt/model_step_1.pt` + `log/hps.json`, our random weights under the original names) with the
original loader (`inference_demo.load_from_pretrained_dir`, `MiCo.from_pretrained`), then answers one JSON request
per line on stdin with one JSON reply per line on stdout (everything the original code prints goes to stderr):

* `{"op": "caption", "batch": B, "num_beams": K, "max_new_tokens": N, "length_penalty": L, "save": name}`: one
  `multimodal_encoder.generate` call as in the original `inference_demo.py`, over the context `context_b<B>` of
  `<workdir>/inputs.npz`;
* `{"op": "vit", "save": name}`: `forward_vision_encoder` on `vit_pixels` (a batch of 1-frame videos);
* `{"op": "preprocess", "kind": "image" | "video" | "audio", "files": [...], "num_frames": F, "num_slices": S,
  "num_mel_bins": M, "save": name}`: the original processors in evaluation mode, one file at a time as its data
  loader calls them, stacked;
* `{"op": "quit"}`.

Every reply holds `seconds` (the wall time of the call, measured here) and, with `save`, the output is written to
`<workdir>/<save>.npy`. The original needs patches to run a small configuration on CPU, the same as those used to
make the parity fixture (tests/fixtures/parity/manifest.json, `patches`):

* P1: `evaclip.add_model_config` registers the configured `EVA01-CLIP-g-14` (model_cfg `evaclip_model_cfg`);
* P2: after `load_clip_model`, `vision_dim` is the built tower's width (the original hard-codes 1408);
* P3: `BertConfig.from_pretrained('./model/bert-base-uncased-crossattn')` gives the configured BERT (model_cfg
  `bert_config`) and `multimodal_dim` its width (the original hard-codes 768);
* P4: `model.videoprocessor.decord = decord` (the original's raw-video path refers to `decord` without importing it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


# Tensors of the original model that MiCo never uses (EVA-CLIP's text tower, logit scale and projection head, BERT's
# position-id buffer): the package does not store them, so the checkpoint it writes lacks them.
UNUSED = (
    "vision_encoder.text.",
    "vision_encoder.logit_scale",
    "vision_encoder.visual.head.",
    "multimodal_encoder.bert.embeddings.position_ids",
)


def apply_patches(model_cfg: dict, workdir: str) -> None:
    """P1-P4 above, for the configuration in `model_cfg` (the original's `hps.json` entry); P1's file is written in
    `workdir`."""
    import decord
    import model.mico as mico
    import model.videoprocessor as videoprocessor
    from model import evaclip
    from transformers.models.bert.configuration_bert import BertConfig

    configs = os.path.join(workdir, "model_configs")
    os.makedirs(configs)
    with open(os.path.join(configs, "EVA01-CLIP-g-14.json"), "w", encoding="utf-8") as handle:
        json.dump(model_cfg["evaclip_model_cfg"], handle)
    evaclip.add_model_config(configs)

    load_clip_model = mico.MMGeneralModule.load_clip_model

    def load_clip_model_with_width(self):
        load_clip_model(self)
        self.vision_dim = self.vision_encoder.visual.pos_embed.shape[-1]

    mico.MMGeneralModule.load_clip_model = load_clip_model_with_width

    from_pretrained = BertConfig.from_pretrained.__func__

    def configured_bert(cls, name, *args, **kwargs):
        config = from_pretrained(cls, name, *args, **kwargs)
        if "bert-base-uncased-crossattn" in str(name):
            for key, value in model_cfg["bert_config"].items():
                setattr(config, key, value)
        return config

    BertConfig.from_pretrained = classmethod(configured_bert)

    construct = mico.MMGeneralModule.construct_multimodal_encoder

    def construct_with_width(self):
        construct(self)
        self.multimodal_dim = self.multimodal_encoder.config.hidden_size

    mico.MMGeneralModule.construct_multimodal_encoder = construct_with_width
    videoprocessor.decord = decord


class Driver:
    """The original model and processors, and the requests the harness sends."""

    def __init__(self, workdir: str) -> None:
        import numpy as np
        import torch
        from inference_demo import load_from_pretrained_dir
        from model.mico import MiCo

        self.workdir = workdir
        with open(os.path.join(workdir, "repo", "log", "hps.json"), encoding="utf-8") as handle:
            apply_patches(json.load(handle)["model_cfg"], workdir)
        checkpoint, model_cfg = load_from_pretrained_dir(os.path.join(workdir, "repo"))
        torch.manual_seed(0)
        self.model = MiCo.from_pretrained(model_cfg, checkpoint).eval()
        expected, given = set(self.model.state_dict()), set(checkpoint)
        self.load_report = {  # all but the tensors MiCo never uses, which the package does not store
            "missing": sorted(key for key in expected - given if not key.startswith(UNUSED)),
            "unexpected": sorted(key for key in given - expected if not key.startswith(UNUSED)),
        }
        self.inputs = dict(np.load(os.path.join(workdir, "inputs.npz")))

    def save(self, name: str | None, array) -> None:
        import numpy as np

        if name:
            np.save(os.path.join(self.workdir, f"{name}.npy"), np.asarray(array))

    def caption(self, batch: int, num_beams: int, max_new_tokens: int, length_penalty: float, save=None) -> dict:
        """One caption call as the original `inference_demo.py` makes it, over the stored context."""
        import torch

        encoder = self.model.multimodal_encoder
        context = torch.from_numpy(self.inputs[f"context_b{batch}"])
        start = time.perf_counter()
        with torch.no_grad():
            init_input_ids = torch.full((batch, 1), encoder.tokenizer.bos_token_id, dtype=torch.long)
            ids = encoder.generate(
                input_ids=init_input_ids,
                attention_mask=init_input_ids.new_ones(batch, 1, 1),
                encoder_hidden_states=context,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                eos_token_id=encoder.tokenizer.sep_token_id,
                pad_token_id=encoder.tokenizer.pad_token_id,
                length_penalty=length_penalty,
            )
        seconds = time.perf_counter() - start
        self.save(save, ids.numpy())
        return {"seconds": seconds}

    def vit(self, save=None) -> dict:
        """The vision tower on `vit_pixels` (B, 1, 3, H, W): all tokens after the final LayerNorm."""
        import torch

        pixels = torch.from_numpy(self.inputs["vit_pixels"])
        start = time.perf_counter()
        with torch.no_grad():
            tokens = self.model.forward_vision_encoder(pixels)
        seconds = time.perf_counter() - start
        self.save(save, tokens.numpy())
        return {"seconds": seconds}

    def preprocess(self, kind: str, files: list, num_frames=4, num_slices=3, num_mel_bins=64, save=None) -> dict:
        """The original processor of `kind` in evaluation mode on each file, stacked as a batch."""
        import torch
        from model.audioprocessor import AudioProcessor
        from model.imageprocessor import ImageProcessor
        from model.videoprocessor import VideoProcessor

        resolution = self.model.config.vision_resolution
        processor = {
            "image": lambda: ImageProcessor(resolution, "evaclip01_giant", training=False),
            "video": lambda: VideoProcessor(
                resolution, "evaclip01_giant", sample_num=num_frames, data_format="raw", training=False
            ),
            "audio": lambda: AudioProcessor(num_mel_bins, 224, num_slices, training=False),
        }[kind]()
        start = time.perf_counter()
        outputs = [processor(path) for path in files]
        seconds = time.perf_counter() - start
        failed = [path for path, output in zip(files, outputs) if output is None]
        if failed:
            raise RuntimeError(f"the original {kind} processor returned None for {failed} (its error is on stderr)")
        self.save(save, torch.cat([output if kind == "image" else output[None] for output in outputs]).numpy())
        return {"seconds": seconds}


def serve(driver: Driver, requests, replies) -> None:
    """Answer each JSON request line with one JSON reply line; errors are replied, not raised."""
    operations = {"caption": driver.caption, "vit": driver.vit, "preprocess": driver.preprocess}
    for line in requests:
        request = json.loads(line)
        operation = request.pop("op")
        if operation == "quit":
            break
        try:
            reply = operations[operation](**request)
        except Exception as error:  # reported to the harness, which raises it with the request
            reply = {"error": f"{type(error).__name__}: {error}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original_repo", required=True, help="checkout of github.com/invictus717/MiCo")
    parser.add_argument("--workdir", required=True, help="folder with repo/ (checkpoint) and inputs.npz")
    parser.add_argument("--threads", type=int, required=True, help="torch intra-op threads")
    args = parser.parse_args()
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the original code prints (Python or C) goes to stderr, not into the replies
    workdir = os.path.abspath(args.workdir)
    os.chdir(args.original_repo)  # the original reads ./model/bert-base-uncased-crossattn and ./model/tokenizer
    sys.path.insert(0, os.path.abspath(args.original_repo))
    import torch

    torch.set_num_threads(args.threads)
    driver = Driver(workdir)
    replies.write(json.dumps({"ready": True, "torch": torch.__version__, **driver.load_report}) + "\n")
    replies.flush()
    serve(driver, sys.stdin, replies)


if __name__ == "__main__":
    main()
