"""Caption metrics (hand-computed cases), the caption-masking collator (its loss is the pretraining caption loss)
and examples/run_captioning_finetune.py end to end on synthetic data."""

import math
import re
from pathlib import Path

import pytest
import torch
from test_classification import synthetic_run

from modeling_mico import MiCoConfig, MiCoForConditionalGeneration, MiCoForPreTraining, MiCoProcessor
from modeling_mico.caption_metrics import bleu, caption_scores, cider_d, rouge_l, tokenize
from modeling_mico.data import ROW_POSITION, MiCoDataCollator
from modeling_mico.finetuning import MiCoCaptionMaskingCollator, references_of
from modeling_mico.peft_utils import set_pretraining_losses


ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT / "tests" / "fixtures" / "media"


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Red circle, moving LEFT; it's 2 x.") == [
        "a",
        "red",
        "circle",
        "moving",
        "left",
        "it's",
        "2",
        "x",
    ]
    with pytest.raises(TypeError, match="captions must be strings, got int: 3"):
        tokenize(3)


def test_bleu_and_rouge_l_against_a_hand_computed_case():
    # candidate "the cat sat" against "the cat sat down" and "a cat":
    # 1-, 2-, 3-gram precisions 3/3, 2/2, 1/1; no 4-gram (coco-caption's 1e-15 / 1e-9 -> 1e-6 precision);
    # reference lengths 4 and 2 are equally close to 3 -> the shorter (2): no brevity penalty.
    candidate, references = ["the cat sat"], [["the cat sat down", "a cat"]]
    scores = caption_scores(candidate, references)
    assert [scores[f"BLEU-{k}"] for k in (1, 2, 3)] == pytest.approx([1.0, 1.0, 1.0])
    assert scores["BLEU-4"] == pytest.approx(1e-6**0.25, rel=1e-6)
    # ROUGE-L: best precision 3/3 (first reference), best recall 3/4 (first) -> F(beta=1.2)
    assert scores["ROUGE-L"] == pytest.approx((1 + 1.44) * 1 * 0.75 / (0.75 + 1.44 * 1))
    # brevity penalty: "the cat" against "the cat sat down" -> exp(1 - 4/2)
    (_, b2, _, _) = bleu([["the", "cat"]], [[["the", "cat", "sat", "down"]]])
    assert b2 == pytest.approx(math.exp(1 - 4 / 2), rel=1e-6)
    assert rouge_l([["x"]], [[["y"]]]) == 0.0


def test_cider_d_against_a_hand_computed_case():
    # two items, so idf = log(2) - log(df) = log(2) for every n-gram (each occurs in one item's references).
    # item 1 "a b" vs "a b": unigram and bigram cosines 1, no 3- and 4-grams (0), same length -> (1+1+0+0)/4 * 10 = 5
    # item 2 "c" vs "d": nothing shared -> 0; corpus CIDEr-D = (5 + 0) / 2
    assert cider_d([["a", "b"], ["c"]], [[["a", "b"]], [["d"]]]) == pytest.approx(2.5)
    # the length penalty exp(-(delta^2) / (2 * 6^2)) counts bigrams: "a b" (1) vs "a b a b" (3) -> delta 2;
    # with a third, unrelated item, log(3) idf; clipping: the candidate's tf-idf is capped by the reference's
    candidate, reference = ["a", "b"], ["a", "b", "a", "b"]
    score = cider_d([candidate, ["z"], ["y"]], [[reference], [["q"]], [["r"]]])
    # unigrams: cand {a: L, b: L}, ref {a: 2L, b: 2L} -> sum(min(cand, ref) * ref) / (|cand| |ref|) = 4L^2 / (2L^2 * 2)
    # = 1; bigrams: cand {ab: L}, ref {ab: 2L, ba: L} -> 2L^2 / (L * sqrt(5) L)
    per_order = [1.0, 2 / math.sqrt(5), 0.0, 0.0]
    expected = sum(per_order) / 4 * math.exp(-(2**2) / (2 * 36)) * 10 / 3
    assert score == pytest.approx(expected)


def test_several_references_and_errors():
    scores = caption_scores(["a red circle", "a blue square"], [["a red circle", "red circle"], "a blue square"])
    assert scores["BLEU-1"] == pytest.approx(1.0) and scores["ROUGE-L"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 candidates but 1 reference lists"):
        caption_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"items \[0\] have no reference caption"):
        caption_scores(["a"], [[]])
    assert references_of({"captions": ["x", "y"], "caption": "z"}) == ["x", "y"]
    assert references_of({"caption": "z"}) == ["z"]


def test_caption_masking_collator_trains_the_pretraining_caption_loss(tmp_path):
    """The loss of MiCoForConditionalGeneration on the collator's masked captions equals MiCoForPreTraining's
    caption loss (caption task alone) on the same captions, weights and random draws."""
    torch.manual_seed(0)
    config = MiCoConfig.from_preset("tiny", caption_tasks=["tv"])
    pretraining = MiCoForPreTraining(config).eval()
    set_pretraining_losses(pretraining, ["caption"])
    pretraining.save_pretrained(tmp_path / "model")
    captioner = MiCoForConditionalGeneration.from_pretrained(tmp_path / "model").eval()
    processor = MiCoProcessor.from_config(config)
    rows = [{"image": str(MEDIA / "test.jpeg"), "captions": ["a red circle", "a small red circle moving"]}] * 2
    plain = MiCoDataCollator(processor, ["image"], training=False, config=config)(rows)
    torch.manual_seed(1)
    batch = MiCoCaptionMaskingCollator(processor, config, ["image"], training=False)(rows)
    assert torch.equal(batch["input_ids"][batch["labels"] == -100], plain["input_ids"][batch["labels"] == -100])
    assert torch.equal(batch["labels"][batch["labels"] != -100], plain["input_ids"][batch["labels"] != -100])
    torch.manual_seed(1)
    with torch.no_grad():
        expected = pretraining(**plain).caption_loss
        loss = captioner(**batch).loss
    torch.testing.assert_close(loss, expected)


def test_seeded_caption_masking_depends_on_the_rows_and_epoch_only(tmp_path):
    """With a seed, the caption chosen per row and the batch's masking come from (seed, epoch, positions): the same
    batch whatever was collated before and whatever torch's global RNG did, other draws in the next epoch; at
    evaluation (no seed) the masking follows the global RNG as before."""
    config = MiCoConfig.from_preset("tiny", caption_tasks=["tv"])
    processor = MiCoProcessor.from_config(config)
    captions = ["a red circle", "a small red circle moving", "a round red shape on grey", "red"]
    rows = [{"image": str(MEDIA / "test.jpeg"), "captions": captions, ROW_POSITION: str(i)} for i in range(4)]
    collator = MiCoCaptionMaskingCollator(processor, config, ["image"], seed=2)
    first = collator(rows)
    torch.manual_seed(5)
    collator(rows[:3])  # another batch collated in between
    again = collator(rows)
    for key in ("input_ids", "attention_mask", "labels"):
        torch.testing.assert_close(again[key], first[key], rtol=0, atol=0)
    collator.set_epoch(1)
    assert not torch.equal(collator(rows)["labels"], first["labels"])
    evaluation = MiCoCaptionMaskingCollator(processor, config, ["image"], training=False)
    torch.manual_seed(0)
    draws = evaluation(rows)["labels"]
    torch.manual_seed(1)
    assert not torch.equal(evaluation(rows)["labels"], draws)
    # the captioning trainer stamps the training rows with their position and sets the epoch, as EvalCollatorTrainer
    from transformers import TrainingArguments

    from modeling_mico.finetuning import MiCoCaptioningTrainer
    from modeling_mico.trainer_mico import CollatorEpochCallback

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=False)
    unstamped = [{key: value for key, value in row.items() if key != ROW_POSITION} for row in rows]
    trainer = MiCoCaptioningTrainer.for_datasets(
        MiCoForConditionalGeneration(config), args, processor, lambda training: collator, unstamped
    )
    assert trainer.train_dataset[3][ROW_POSITION] == "3"
    assert any(isinstance(c, CollatorEpochCallback) for c in trainer.callback_handler.callbacks)


@pytest.mark.slow
def test_run_captioning_finetune_end_to_end(tmp_path):
    run_captioning_finetune = synthetic_run(tmp_path, "run_captioning_finetune", num_samples=20, num_test=4)
    output = tmp_path / "out"
    metrics = run_captioning_finetune.main(
        [
            "--model_name_or_path", str(tmp_path / "tiny"), "--modalities", "image",
            "--train_file", str(tmp_path / "data" / "train.jsonl"),
            "--validation_file", str(tmp_path / "data" / "test.jsonl"),
            "--output_dir", str(output), "--do_train", "--do_eval", "--max_steps", "2",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4", "--learning_rate", "1e-3",
            "--num_beams", "1", "--max_new_tokens", "6", "--use_peft",
            "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
        ]
    )  # fmt: skip
    for prefix in ("pretrained", "eval"):
        assert {f"{prefix}_{name}" for name in ("BLEU-4", "ROUGE-L", "CIDEr", "loss")} <= set(metrics)
        assert metrics[f"{prefix}_CIDEr"] >= 0
    model = MiCoForConditionalGeneration.from_pretrained(output)
    card = (output / "README.md").read_text()
    assert (output / "adapter" / "adapter_config.json").is_file() and "| eval_CIDEr |" in card
    assert model.generate(pixel_values=torch.randn(1, 3, 64, 64), max_new_tokens=3).shape[0] == 1


def test_documented_commands_parse_with_the_scripts_parsers():
    """Every command of docs/fine-tuning.md's bash blocks uses options its script accepts (the end-to-end tests run the
    scripts with the same options on smaller data)."""
    import importlib
    import shlex
    import sys

    from transformers import HfArgumentParser

    sys.path.insert(0, str(ROOT / "examples"))
    page = (ROOT / "docs" / "fine-tuning.md").read_text()
    commands = [
        shlex.split(command.replace("\\\n", " "))
        for block in re.findall(r"```bash\n(.*?)```", page, re.S)
        for command in re.split(r"\n(?=python )", block.strip())
    ]
    scripts = {Path(words[1]).stem for words in commands}
    assert {"run_classification", "run_captioning_finetune"} <= scripts
    for words in commands:
        module = importlib.import_module(Path(words[1]).stem)
        parser = module.COMMAND_LINE.parser() if hasattr(module, "COMMAND_LINE") else module.build_parser()
        if isinstance(parser, HfArgumentParser):
            parser.parse_args_into_dataclasses(args=words[2:])
        else:
            parser.parse_args(words[2:])
