"""A new image-like modality (`thermal`), declared only in `MiCoConfig`, runs end to end with no code change:
annotation file -> processor and collator -> pretraining step (gradients reach its bridge and head) -> retrieval
evaluation -> captions (`generate` and `caption_files`, by declared extension or by `modality=`)."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import thermal_config
from PIL import Image

from modeling_mico import MiCoForConditionalGeneration, MiCoForPreTraining, MiCoProcessor
from modeling_mico.annotations import load_annotations
from modeling_mico.captioning import caption_files
from modeling_mico.data import MiCoDataCollator
from modeling_mico.evaluation import evaluate_retrieval


pytestmark = pytest.mark.slow

NUM_ROWS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """The configuration, a processor built from it, an annotation file of image + thermal rows (PNG files; the
    thermal ones under the declared `.tir` extension) and the pretraining model after one optimisation step."""
    root = tmp_path_factory.mktemp("thermal")
    rng = np.random.default_rng(0)
    rows = []
    for index in range(NUM_ROWS):
        for name in (f"rgb{index}.png", f"ir{index}.tir"):
            pixels = (rng.random((48, 40, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name, format="PNG")
        rows.append(
            {
                "id": str(index),
                "caption": f"a warm object number {index}",
                "image": f"rgb{index}.png",
                "thermal": f"ir{index}.tir",
            }
        )
    annotations = root / "train.jsonl"
    annotations.write_text("".join(json.dumps(row) + "\n" for row in rows))

    config = thermal_config(modalities={"thermal": {"extensions": [".tir"]}})
    processor = MiCoProcessor.from_config(config)
    torch.manual_seed(0)
    model = MiCoForPreTraining(config)
    rows = load_annotations(annotations, config=config)
    batch = MiCoDataCollator(processor, ["image", "thermal"], config=config)(rows)
    output = model(**batch)
    output.loss.backward()
    return {
        "root": root,
        "config": config,
        "processor": processor,
        "model": model,
        "rows": rows,
        "batch": batch,
        "output": output,
    }


def test_processor_produces_the_declared_input(setup):
    processor, config = setup["processor"], setup["config"]
    processor.check_matches(config)
    paths = [str(setup["root"] / f"ir{i}.tir") for i in range(2)]
    values = processor(thermal=paths, return_tensors="pt")["thermal_values"]
    assert values.shape == (2, 1, 3, 64, 64)
    # image-like layout: the same pixels through the image argument give the same values
    torch.testing.assert_close(values, processor(images=paths, return_tensors="pt")["pixel_values"][:, None])


def test_pretraining_step_trains_the_thermal_branch(setup):
    batch, output, model = setup["batch"], setup["output"], setup["model"]
    assert sorted(batch) == ["attention_mask", "input_ids", "pixel_values", "thermal_values"]
    assert batch["thermal_values"].shape == (NUM_ROWS, 1, 3, 64, 64)
    assert sorted(output.task_losses) == [
        "caption_th",
        "caption_tv",
        "contrastive_th",
        "contrastive_tv",
        "matching_th",
        "matching_tv",
    ]
    assert all(math.isfinite(loss.item()) for loss in output.task_losses.values())
    assert math.isfinite(output.loss.item())
    mico = model.mico
    for name, module in (
        ("bridge", mico.modality_bridges["thermal"]),
        ("contrastive head", mico.contrastive_heads["thermal"]),
    ):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), name
    assert mico.frame_embeddings["thermal"].grad.abs().sum() > 0


def test_retrieval_evaluation_on_the_thermal_target(setup):
    model, processor, rows = setup["model"].eval(), setup["processor"], setup["rows"]
    results = evaluate_retrieval(model, processor, rows, ["thermal"], batch_size=2, rerank_top_k=2, progress=False)
    for key in ("t2thermal/R@1", "t2thermal/R@5", "thermal2t/R@1", "itm/t2thermal/R@1", "itm/thermal2t/R@1"):
        assert 0 <= results[key] <= 100, key
    assert results["num_items"] == NUM_ROWS and results["chance/R@1"] == 100 / NUM_ROWS
    # the same similarities as the model's own forward on the collated batch
    batch = setup["batch"]
    with torch.no_grad():
        out = model.mico(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            thermal_values=batch["thermal_values"],
        )
    ranks = out.logits_per_text_thermal.argmax(dim=1)
    assert results["t2thermal/R@1"] == pytest.approx(100 * (ranks == torch.arange(NUM_ROWS)).float().mean().item())


def test_captions_of_thermal_files(setup):
    config, processor, root = setup["config"], setup["processor"], setup["root"]
    captioner = MiCoForConditionalGeneration(config).eval()
    captioner.load_state_dict(setup["model"].state_dict())
    paths = [root / f"ir{i}.tir" for i in range(3)]
    values = processor(thermal=[str(p) for p in paths], return_tensors="pt")["thermal_values"]
    ids = captioner.generate(thermal_values=values, num_beams=2, max_new_tokens=4)
    assert ids.shape[0] == 3 and ids.shape[1] <= 4 + 1
    expected = [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]
    # routed by the declared `.tir` extension, and by `modality=` for a file whose extension names another modality
    by_extension = caption_files(
        captioner, processor, paths, batch_size=2, progress=False, num_beams=2, max_new_tokens=4
    )
    assert [(r["modality"], r["caption"]) for r in by_extension] == [("thermal", c) for c in expected]
    assert (
        caption_files(
            captioner,
            processor,
            [root / "rgb0.png"],
            modality="thermal",
            progress=False,
            num_beams=2,
            max_new_tokens=4,
        )[0]["modality"]
        == "thermal"
    )
