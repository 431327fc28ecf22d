"""PEFT fine-tuning: adapter targets, what trains, retrieval gain, adapter / merged / MiCoModel agreement, other
PEFT methods, the model card, the (mocked) Hub push and the example script end to end."""

import importlib.util
import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel

from modeling_mico import MiCoConfig, MiCoForPreTraining, MiCoModel, MiCoProcessor, peft_utils
from modeling_mico.annotations import load_annotations
from modeling_mico.evaluation import evaluate_retrieval
from modeling_mico.peft_utils import (
    build_peft_config,
    build_peft_model,
    lora_target_modules,
    merge_and_save,
    set_pretraining_losses,
    write_model_card,
)
from modeling_mico.synthetic_data import make_synthetic_dataset


REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH, LR = 40, 16, 5e-3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Synthetic images (40 train, 24 test) and a tiny model saved with its processor."""
    root = tmp_path_factory.mktemp("peft")
    make_synthetic_dataset(root / "data", num_samples=64, num_test=24, image_size=64, modalities=("image",))
    torch.manual_seed(0)
    config = MiCoConfig.from_preset("tiny")
    config.text_config.hidden_dropout_prob = config.text_config.attention_probs_dropout_prob = 0.0
    MiCoForPreTraining(config).save_pretrained(root / "base")
    MiCoProcessor.from_config(config).save_pretrained(root / "base")
    return root


@pytest.fixture(scope="module")
def processor(workdir):
    return MiCoProcessor.from_config(MiCoModel.config_class.from_pretrained(workdir / "base"))


def image_r1(model, processor, rows) -> float:
    model.eval()
    results = evaluate_retrieval(model, processor, rows, ["image"], batch_size=64, progress=False)
    return (results["t2i/R@1"] + results["i2t/R@1"]) / 2


@pytest.fixture(scope="module")
def finetuned(workdir, processor):
    """LoRA (both towers) trained with the contrastive loss only; R@1 before and after on the training items."""
    rows = load_annotations(workdir / "data" / "train.jsonl")
    model = MiCoForPreTraining.from_pretrained(workdir / "base")
    before = image_r1(model, processor, rows)
    set_pretraining_losses(model, ["contrastive"])
    peft_model = build_peft_model(model, towers="both", r=8, lora_alpha=16, lora_dropout=0.0)
    initial = {name: value.detach().clone() for name, value in peft_model.named_parameters()}
    pixels = processor(images=[row["image"] for row in rows])["pixel_values"]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
    generator = torch.Generator().manual_seed(0)
    peft_model.train()
    for _ in range(STEPS):
        batch = torch.randperm(len(rows), generator=generator)[:BATCH]
        captions = [rows[i]["captions"][int(torch.randint(5, (), generator=generator))] for i in batch]
        tokens = processor(text=captions)
        loss = peft_model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels[batch]
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = image_r1(peft_model, processor, rows)
    peft_model.save_pretrained(workdir / "adapter")
    return {"model": peft_model.eval(), "before": before, "after": after, "initial": initial}


def adapted_modules(model) -> list[str]:
    """Adapted module paths below the `MiCoModel` (whether the adapter wraps it or a head class composing it)."""
    return sorted(
        name.removeprefix("base_model.model.").removeprefix("mico.")
        for name, module in model.named_modules()
        if hasattr(module, "lora_A")
    )


@pytest.mark.parametrize("towers", ["vision", "text", "both"])
def test_lora_targets_exactly_the_tower_projections(towers):
    model = MiCoForPreTraining(MiCoConfig.from_preset("tiny"))
    expected = []
    if towers in ("vision", "both"):
        expected += [
            f"vision_model.encoder.layers.{i}.{n}"
            for i in range(2)
            for n in ("self_attn.qkv", "self_attn.proj", "mlp.fc1", "mlp.fc2")
        ]
    if towers in ("text", "both"):
        for i in range(2):
            for block in ("attention", "crossattention"):
                expected += [f"text_model.encoder.layer.{i}.{block}.self.{n}" for n in ("query", "key", "value")]
                expected.append(f"text_model.encoder.layer.{i}.{block}.output.dense")
            expected += [
                f"text_model.encoder.layer.{i}.intermediate.dense",
                f"text_model.encoder.layer.{i}.output.dense",
            ]
    assert adapted_modules(build_peft_model(model, towers=towers)) == sorted(expected)
    # explicit names stay inside the chosen towers ("dense" exists only in the text tower)
    if towers != "vision":
        names = adapted_modules(
            build_peft_model(
                MiCoForPreTraining(MiCoConfig.from_preset("tiny")), towers=towers, target_modules=["dense"]
            )
        )
        assert len(names) == 8 and all(n.startswith("text_model.encoder.") and n.endswith("dense") for n in names)


def test_lora_fine_tune_raises_r1(finetuned):
    print(
        f"image retrieval R@1 (mean of t2i, i2t) on the training items: {finetuned['before']:.1f} -> {finetuned['after']:.1f}"
    )
    assert finetuned["after"] >= finetuned["before"] + 10


def test_only_adapter_parameters_train(finetuned):
    model = finetuned["model"]
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter, finetuned["initial"][name])
        # the contrastive loss does not run the cross-attention
        if ".lora_B." in name and ".crossattention." not in name:
            assert changed, f"{name} did not train (is the module called through its forward?)"
        elif name not in trainable:
            assert not changed, name


def test_vision_qkv_adapter_is_used():
    model = build_peft_model(MiCoForPreTraining(MiCoConfig.from_preset("tiny")).eval(), towers="vision")
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model.get_image_features(pixels).pooler_output
        for name, parameter in model.named_parameters():
            if ".qkv.lora_B." in name:
                parameter.normal_()
        assert not torch.allclose(model.get_image_features(pixels).pooler_output, before)


def test_adapter_merged_and_mico_model_agree(workdir, finetuned, processor):
    rows = load_annotations(workdir / "data" / "test.jsonl")[:6]
    inputs = processor(text=[row["caption"] for row in rows], images=[row["image"] for row in rows])

    def features(model):
        with torch.no_grad():
            return torch.cat(
                [
                    model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output,
                    model.get_image_features(inputs["pixel_values"]).pooler_output,
                ]
            )

    reference = features(finetuned["model"])
    on_mico_model = PeftModel.from_pretrained(MiCoModel.from_pretrained(workdir / "base"), workdir / "adapter").eval()
    assert adapted_modules(on_mico_model) == adapted_modules(finetuned["model"])
    torch.testing.assert_close(features(on_mico_model), reference, atol=1e-5, rtol=0)

    reloaded = PeftModel.from_pretrained(MiCoForPreTraining.from_pretrained(workdir / "base"), workdir / "adapter")
    merge_and_save(reloaded, workdir / "merged", processor)
    merged = AutoModel.from_pretrained(workdir / "merged").eval()
    assert type(merged) is MiCoModel
    torch.testing.assert_close(features(merged), reference, atol=1e-5, rtol=0)
    assert (workdir / "merged" / "processor_config.json").is_file()


@pytest.mark.parametrize(
    "config", [{"peft_type": "IA3"}, {"peft_type": "LOHA", "r": 4}, json.dumps({"peft_type": "lokr", "r": 4})]
)
def test_other_peft_methods_target_the_same_modules(config):
    model = build_peft_model(
        MiCoForPreTraining(MiCoConfig.from_preset("tiny")), build_peft_config("vision", peft_config=config)
    )
    names = [name for name, module in model.named_modules() if name.endswith(("qkv", "proj", "fc1", "fc2"))]
    assert len(names) == 8 and all(".vision_model.encoder.layers." in name for name in names)
    assert all(".lora_" not in name for name, _ in model.named_parameters())
    assert any(parameter.requires_grad for parameter in model.parameters())


def test_lora_target_regex_rejects_other_modules():
    pattern = lora_target_modules("both")
    import re

    for name in ("lm_head.dense", "itm_head.dense", "modality_bridges.vision.dense", "contrastive_heads.text"):
        assert not re.fullmatch(pattern, name)


def test_model_card_content(tmp_path):
    metrics = {"eval_loss": 1.25, "eval_t2v/R@1": 42.0, "eval_v2t/R@1": 40.0}
    path = write_model_card(
        tmp_path,
        base_model="Yiyuan/MiCo-ViT-g-14-omnimodal-300k-b64K",
        train_files=["data/train.jsonl"],
        metrics=metrics,
        target_towers=["vision", "text"],
        losses=["contrastive", "matching"],
        hyperparameters={"learning_rate": 1e-4},
    )
    card = path.read_text()
    header = card.split("---")[1]
    assert "base_model: Yiyuan/MiCo-ViT-g-14-omnimodal-300k-b64K" in header and "library_name: peft" in header
    assert "- lora" in header and "- mico" in header
    assert "`data/train.jsonl`" in card and "contrastive, matching" in card and "learning_rate: 0.0001" in card
    assert "| t2v | 42.00 |" in card and "| v2t | 40.00 |" in card and "eval_loss: 1.25" in card
    assert "PeftModel.from_pretrained" in card
    merged = write_model_card(tmp_path, base_model=str(tmp_path), train_files=["x.jsonl"], merged=True).read_text()
    assert "library_name: transformers" in merged and "base_model:" not in merged.split("---")[1]
    assert "AutoModel.from_pretrained" in merged


def test_push_to_hub_uploads_the_folder(tmp_path):
    with mock.patch.object(peft_utils, "HfApi") as api_class:
        api = api_class.return_value
        api.create_repo.return_value.repo_id = "me/mico-lora"
        peft_utils.push_to_hub(tmp_path, "me/mico-lora", token="t", private=True)
    api_class.assert_called_once_with(token="t")
    api.create_repo.assert_called_once_with("me/mico-lora", private=True, exist_ok=True, repo_type="model")
    upload = api.upload_folder.call_args.kwargs
    assert upload["repo_id"] == "me/mico-lora" and upload["folder_path"] == str(tmp_path)


@pytest.mark.slow
def test_finetune_script_end_to_end(workdir, monkeypatch):
    output_dir = workdir / "run"
    argv = [
        "run_finetune_peft.py",
        "--model_name_or_path",
        str(workdir / "base"),
        "--train_file",
        str(workdir / "data" / "train.jsonl"),
        "--validation_file",
        str(workdir / "data" / "test.jsonl"),
        "--output_dir",
        str(output_dir),
        "--modalities",
        "image",
        "--losses",
        "contrastive",
        "matching",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "24",
        "--do_train",
        "--do_eval",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--merge_and_save",
        "--push_to_hub",
        "--hub_model_id",
        "me/tiny-lora",
        "--use_cpu",
    ]
    spec = importlib.util.spec_from_file_location("run_finetune_peft", REPO / "examples" / "run_finetune_peft.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", argv)
    with mock.patch.object(peft_utils, "push_to_hub") as push:  # the script imports it when it runs
        script.main()
    push.assert_called_once()
    assert push.call_args.args == (str(output_dir / "merged"), "me/tiny-lora")
    assert (output_dir / "adapter_model.safetensors").is_file() and (output_dir / "processor_config.json").is_file()
    metrics = json.loads((output_dir / "eval_results.json").read_text())
    assert 0 <= metrics["eval_t2i/R@1"] <= 100 and "eval_i2t/MeanR" in metrics
    assert "| t2i |" in (output_dir / "README.md").read_text()
    assert "library_name: transformers" in (output_dir / "merged" / "README.md").read_text()
    assert type(AutoModel.from_pretrained(output_dir / "merged")) is MiCoModel
