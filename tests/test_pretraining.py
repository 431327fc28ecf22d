"""MiCoForPreTraining: each loss against a direct re-computation, the samplers' statistics, two-process gathering,
Trainer steps and resuming."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import tiny_config_kwargs
from huggingface_hub.errors import StrictDataclassClassValidationError

from modeling_mico import MiCoConfig, MiCoForPreTraining, MiCoModel
from modeling_mico import modeling_mico as mm
from modeling_mico import pretraining_mico as pm


VOCAB = 30522


def tiny_config(**overrides) -> MiCoConfig:
    """One-layer towers 32 wide, 28 px images, BERT's vocabulary, the release's modalities, no dropout."""
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return MiCoConfig(
        **tiny_config_kwargs(
            width=32,
            layers=1,
            heads=2,
            vision=dict(image_size=28),
            text=dict(vocab_size=VOCAB, max_position_embeddings=32, **no_dropout),
            **{"max_caption_length": 32, "knowledge_modalities": None, **overrides},
        )
    )


def only(config: MiCoConfig, contrastive=(), matching=(), caption=()) -> MiCoConfig:
    """Select the tasks (set after construction: the config treats empty lists as 'use the defaults')."""
    config.contrastive_tasks, config.matching_tasks, config.caption_tasks = (
        list(contrastive),
        list(matching),
        list(caption),
    )
    return config


def make_batch(batch_size: int = 4, seq_len: int = 10, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (batch_size, seq_len), generator=generator)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    for row in range(batch_size):
        length = seq_len - row % 3
        ids[row, length - 1] = 102
        ids[row, length:] = 0
        mask[row, length:] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(batch_size, 3, 28, 28, generator=generator),
        "input_features": torch.randn(batch_size, 2, 28, 28, generator=generator),
    }


def model_for(config: MiCoConfig, seed: int = 0) -> MiCoForPreTraining:
    torch.manual_seed(seed)
    return MiCoForPreTraining(config).eval()


# ---- structure ------------------------------------------------------------------------------------------------------


def test_weights_shared_with_mico_model_and_lm_head_tied():
    model = model_for(tiny_config())
    base_keys = set(MiCoModel(tiny_config()).state_dict())
    assert {f"mico.{key}" for key in base_keys} <= set(model.state_dict())
    assert set(model.mico.state_dict()) == base_keys
    assert model.lm_head.decoder.weight is model.mico.text_model.embeddings.word_embeddings.weight


def test_task_letters_and_validation():
    config = tiny_config(knowledge_modalities={"vision": 2, "audio": 2, "depth": 1, "normal": 1})
    assert config.task_letters["n"] == "normal"
    assert config.parse_task("tvas") == ("vision", "audio", "subtitle")
    for bad in ("vt", "t", "tvv", "tx"):
        with pytest.raises(ValueError, match=f"task '{bad}' must be 't' followed by distinct modality letters"):
            config.parse_task(bad)
    with pytest.raises(ValueError, match=r"no fused head combines \['audio', 'depth'\]"):
        MiCoForPreTraining(only(tiny_config(), contrastive=["tad"]))
    with pytest.raises(StrictDataclassClassValidationError, match="task 'td' must be"):
        tiny_config(knowledge_modalities={"vision": 2, "audio": 2}, contrastive_tasks=["td"])


def test_missing_modalities_skip_tasks_and_no_task_raises():
    model = model_for(tiny_config())
    batch = make_batch()
    batch.pop("input_features")
    out = model(**batch)
    assert sorted(out.task_losses) == ["caption_tv", "contrastive_tv", "matching_tv"]
    with pytest.raises(ValueError, match="no pretraining task"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_batch_of_one_skips_matching():
    model = model_for(tiny_config())
    batch = {key: value[:1] for key, value in make_batch().items()}
    out = model(**batch)
    assert out.matching_loss is None and out.contrastive_loss is not None and out.caption_loss is not None


# ---- losses against direct re-computation ----------------------------------------------------------------------------


def text_and_modality_embeds(model, batch, modality="image", values="pixel_values"):
    text = F.normalize(model.mico.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output, dim=-1)
    other = F.normalize(model.mico.get_modality_features(modality, batch[values]).pooler_output, dim=-1)
    return text, other


def manual_contrastive(text, other, temperature, smoothing=0.1):
    logits = text @ other.t() / temperature
    n = logits.shape[0]
    targets = torch.arange(n)

    def smoothed_ce(scores):
        log_probs = scores.log_softmax(dim=-1)
        soft = torch.full_like(log_probs, smoothing / n)
        soft[targets, targets] += 1 - smoothing
        return -(soft * log_probs).sum(-1).mean()

    return (smoothed_ce(logits) + smoothed_ce(logits.t())) / 2


def test_contrastive_loss_matches_manual():
    model = model_for(only(tiny_config(), contrastive=["tv", "ta", "tva"]))
    with torch.no_grad():
        model.mico.temperature.fill_(0.05)
    batch = make_batch()
    out = model(**batch)
    text, vision = text_and_modality_embeds(model, batch)
    _, audio = text_and_modality_embeds(model, batch, "audio", "input_features")
    pooled_v = model.mico.pool_tokens(model.mico.encode_modality("image", batch["pixel_values"]))
    pooled_a = model.mico.pool_tokens(model.mico.encode_modality("audio", batch["input_features"]))
    fused = F.normalize(model.mico.fused_heads["va"](torch.cat([pooled_v, pooled_a], -1)), dim=-1)
    expected = {
        "tv": manual_contrastive(text, vision, 0.05),
        "ta": manual_contrastive(text, audio, 0.05),
        "tva": manual_contrastive(text, fused, 0.05),
    }
    for task, value in expected.items():
        torch.testing.assert_close(out.task_losses[f"contrastive_{task}"], value)
    torch.testing.assert_close(out.contrastive_loss, torch.stack(list(expected.values())).mean())
    torch.testing.assert_close(out.loss, out.contrastive_loss)
    torch.testing.assert_close(out.logits_per_text["tv"], text @ vision.t() / 0.05)


def test_matching_loss_matches_recomputation_from_sampled_indices(monkeypatch):
    model = model_for(only(tiny_config(), matching=["tva"]))
    batch = make_batch()
    drawn = []
    sampler = mm.sample_hard_negatives
    monkeypatch.setattr(mm, "sample_hard_negatives", lambda *a: drawn.append(sampler(*a)) or drawn[-1])
    torch.manual_seed(3)
    out = model(**batch)
    negative_contexts, negative_texts = drawn
    ids, mask = batch["input_ids"], batch["attention_mask"]
    context = model.mico.get_multimodal_context(
        pixel_values=batch["pixel_values"], input_features=batch["input_features"]
    )
    logits = model.mico.get_matching_logits(
        torch.cat([ids, ids, ids[negative_texts]]),
        torch.cat([mask, mask, mask[negative_texts]]),
        context=torch.cat([context, context[negative_contexts], context]),
    )
    labels = torch.tensor([1] * 4 + [0] * 8)
    torch.testing.assert_close(out.matching_logits["tva"], logits)
    torch.testing.assert_close(out.matching_loss, 0.1 * F.cross_entropy(logits, labels))
    assert out.contrastive_loss is None and out.caption_loss is None
    torch.testing.assert_close(out.loss, out.matching_loss)


def test_caption_loss_matches_recomputation():
    model = model_for(only(tiny_config(), caption=["tv", "ta"]))
    batch = make_batch()
    torch.manual_seed(5)
    out = model(**batch)
    masked, labels = out.caption_input_ids, out.caption_labels
    seq = masked.shape[1]
    mask3d = torch.tril(torch.ones(seq, seq)).bool()[None] & batch["attention_mask"].bool()[:, None, :]
    losses = []
    for values in ("pixel_values", "input_features"):
        context = model.mico.get_multimodal_context(**{values: batch[values]})
        hidden = model.mico.text_model(input_ids=masked, attention_mask=mask3d.long(), encoder_hidden_states=context)
        scores = model.lm_head(hidden.last_hidden_state)
        losses.append(F.cross_entropy(scores.view(-1, scores.shape[-1]), labels.view(-1), ignore_index=-100))
    torch.testing.assert_close(out.task_losses["caption_tv"], losses[0])
    torch.testing.assert_close(out.task_losses["caption_ta"], losses[1])
    torch.testing.assert_close(out.caption_loss, (losses[0] + losses[1]) / 2)


def test_task_loss_weights_and_caption_loss_weight_weight_the_means():
    weights = {"contrastive_ta": 3.0, "caption_tv": 0.5}
    plain = model_for(only(tiny_config(), contrastive=["tv", "ta"], caption=["tv", "ta"]))
    weighted = model_for(
        only(
            tiny_config(task_loss_weights=weights, caption_loss_weight=0.2),
            contrastive=["tv", "ta"],
            caption=["tv", "ta"],
        )
    )
    batch = make_batch()
    torch.manual_seed(5)
    reference = plain(**batch)
    torch.manual_seed(5)
    out = weighted(**batch)
    contrastive = {task: reference.task_losses[f"contrastive_{task}"] for task in ("tv", "ta")}
    torch.testing.assert_close(out.contrastive_loss, (contrastive["tv"] + 3 * contrastive["ta"]) / 4)
    caption = {task: 0.2 * reference.task_losses[f"caption_{task}"] for task in ("tv", "ta")}
    torch.testing.assert_close(out.task_losses["caption_ta"], caption["ta"])
    torch.testing.assert_close(out.caption_loss, (0.5 * caption["tv"] + caption["ta"]) / 1.5)
    torch.testing.assert_close(out.loss, out.contrastive_loss + out.caption_loss)
    # equal weights keep the release's arithmetic exactly
    assert torch.equal(reference.contrastive_loss, torch.stack(list(contrastive.values())).mean())


def test_task_loss_weights_are_validated():
    with pytest.raises(
        StrictDataclassClassValidationError,
        match="task_loss_weights names 'contrastive_tx', which is not a configured task",
    ):
        tiny_config(task_loss_weights={"contrastive_tx": 2.0})
    for bad in (0, -1.0, float("nan"), True, "2"):
        with pytest.raises(
            StrictDataclassClassValidationError,
            match=r"task_loss_weights\['contrastive_tv'\] must be a positive number",
        ):
            tiny_config(task_loss_weights={"contrastive_tv": bad})
    with pytest.raises(
        StrictDataclassClassValidationError, match="caption_loss_weight must be a positive number, got 0"
    ):
        tiny_config(caption_loss_weight=0)


def test_encoders_run_once_per_batch(monkeypatch):
    model = model_for(tiny_config())
    calls = []
    encode = model.mico.encode_modality
    monkeypatch.setattr(model.mico, "encode_modality", lambda name, values: calls.append(name) or encode(name, values))
    model(**make_batch())
    assert sorted(calls) == ["audio", "image"]


# ---- samplers -------------------------------------------------------------------------------------------------------


def test_hard_negative_sampler_never_draws_the_positive():
    torch.manual_seed(0)
    logits = torch.eye(6) * 50  # the positive dominates the softmax
    logits[2, 4] = 50  # a duplicate of the positive may be drawn
    for offset, columns in ((0, 6), (6, 12)):
        full = torch.cat([torch.zeros(6, offset), logits, torch.zeros(6, columns - 6 - offset)], dim=1)[:, :columns]
        draws = torch.stack([pm.sample_hard_negatives(full, offset) for _ in range(2000)])
        assert not (draws == torch.arange(6) + offset).any()
    assert (draws[:, 2] == 10).float().mean() > 0.9


def test_caption_masking_statistics():
    torch.manual_seed(0)
    rows, length = 400, 50
    ids = torch.randint(1000, 2000, (rows, length))
    attention = torch.ones_like(ids)
    attention[::2, 40:] = 0  # padding
    masked, labels = pm.mask_caption_tokens(ids, attention, 0.6, 103, VOCAB)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[attention == 0].any()
    assert chosen.sum(1).min() >= 1
    torch.testing.assert_close(labels[chosen], ids[chosen])
    eligible = attention.bool().clone()
    eligible[:, 0] = False
    assert abs(chosen.sum() / eligible.sum() - 0.6) < 0.01
    became_mask = (masked == 103)[chosen].float().mean()
    kept = (masked == ids)[chosen].float().mean()
    random = 1 - became_mask - kept
    assert abs(became_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(random - 0.1) < 0.01
    assert (masked[chosen & (masked != 103) & (masked != ids)] >= 106).all()
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_caption_masking_conditions_on_at_least_one():
    """Two eligible tokens: P(both | at least one) = 0.36 / 0.84 as in the original's redraw loop."""
    torch.manual_seed(0)
    ids = torch.randint(1000, 2000, (20000, 4))
    attention = torch.tensor([[1, 1, 1, 0]]).expand_as(ids)
    _, labels = pm.mask_caption_tokens(ids, attention, 0.6, 103, VOCAB)
    counts = (labels != -100).sum(1)
    assert counts.min() == 1 and counts.max() == 2
    assert abs((counts == 2).float().mean() - 0.36 / 0.84) < 0.015


# ---- two processes --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, batch: dict, state: dict, results: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model = MiCoForPreTraining(only(tiny_config(), contrastive=["tv", "tva"]))
    model.load_state_dict(state)
    model.eval()
    shard = {key: value.chunk(world_size)[rank] for key, value in batch.items()}
    out = model(**shard)
    out.loss.backward()
    grads = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()])
    dist.all_reduce(grads)  # DDP averages the processes' gradients: sum / world size
    results[rank] = (out.loss.detach(), grads / world_size)
    dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_concatenated_batch():
    """Each process's loss is the mean over its rows of the CE against the global batch, so the mean of the
    processes' losses is the single-process loss, and the averaged gradients are its gradients."""
    config = only(tiny_config(), contrastive=["tv", "tva"])
    model = model_for(config)
    batch = make_batch(batch_size=6)
    out = model(**batch)
    out.loss.backward()
    expected = torch.cat(
        [p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()]
    )

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), batch, model.state_dict(), results), nprocs=2, join=True)
    losses = torch.stack([results[rank][0] for rank in range(2)])
    torch.testing.assert_close(losses.mean(), out.loss.detach())
    for rank in range(2):
        torch.testing.assert_close(results[rank][1], expected, rtol=1e-4, atol=1e-6)


# ---- Trainer ------------------------------------------------------------------------------------------------------


class TensorRows(torch.utils.data.Dataset):
    def __init__(self, size: int = 32):
        self.batch = make_batch(batch_size=size, seed=1)

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, index: int) -> dict:
        return {key: value[index] for key, value in self.batch.items()}


def make_trainer(output_dir, max_steps: int, **kwargs):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        logging_steps=1,
        save_steps=3,
        report_to=[],
        use_cpu=True,
        seed=7,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        **kwargs,
    )
    torch.manual_seed(0)
    return Trainer(model=MiCoForPreTraining(tiny_config()), args=args, train_dataset=TensorRows())


def logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_steps_reduce_the_loss(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=24, save_strategy="no")
    trainer.train()
    losses = logged_losses(trainer)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4


def test_trainer_logs_each_task_loss(tmp_path):
    from transformers import TrainingArguments

    from modeling_mico.trainer_mico import EvalCollatorTrainer

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=2,
        report_to=[],
        use_cpu=True,
        seed=7,
        remove_unused_columns=False,
        save_strategy="no",
    )
    torch.manual_seed(0)
    model = MiCoForPreTraining(tiny_config())
    seen = []
    forward = model.forward
    model.forward = lambda **inputs: seen.append(forward(**inputs)) or seen[-1]
    trainer = EvalCollatorTrainer(model=model, args=args, train_dataset=TensorRows())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    tasks = sorted(f"loss_{name}" for name in seen[0].task_losses)
    assert len(tasks) == 9 and [sorted(name for name in entry if name.startswith("loss_")) for entry in logs] == [
        tasks,
        tasks,
    ]
    for entry, outputs in zip(logs, (seen[:2], seen[2:])):
        for name in ("contrastive_tv", "caption_ta"):
            mean = sum(float(output.task_losses[name].detach()) for output in outputs) / 2
            assert entry[f"loss_{name}"] == pytest.approx(mean, abs=1e-4)


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    continuous = make_trainer(tmp_path / "a", max_steps=6)
    continuous.train()
    resumed = make_trainer(tmp_path / "b", max_steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert logged_losses(resumed)[3:] == pytest.approx(logged_losses(continuous)[3:], rel=1e-5)
    for (name, a), b in zip(continuous.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, msg=name)


# ---- the example script ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_pretrain_script_on_synthetic_data(tmp_path):
    """A fresh tiny model trained and evaluated by the script; its output loads with the Auto classes, and a rerun
    into the directory without its checkpoint is refused (2 processes: tests/test_distributed_engines.py)."""
    import subprocess
    import sys

    from transformers import AutoModel, AutoProcessor

    from modeling_mico.synthetic_data import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", num_samples=24, seed=0, image_size=64)
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "run_pretrain.py")
    launcher = [sys.executable]
    output = tmp_path / "run"
    args = [
        script,
        "--config_name",
        "tiny",
        "--train_file",
        data["train_file"],
        "--validation_file",
        data["test_file"],
        "--output_dir",
        str(output),
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "4",
        "--do_train",
        "--do_eval",
        "--report_to",
        "none",
        "--use_cpu",
        "--dataloader_num_workers",
        "1",
    ]
    subprocess.run(launcher + args, check=True, capture_output=True, timeout=300)
    assert type(AutoModel.from_pretrained(output)).__name__ == "MiCoModel"
    assert AutoProcessor.from_pretrained(output).image_processor.image_size == 64
    (output / "checkpoint-3").rename(tmp_path / "moved")  # no checkpoint left to resume from: a foreign directory
    with pytest.raises(subprocess.CalledProcessError, match="returned non-zero exit status") as failure:
        subprocess.run(launcher + args, check=True, capture_output=True, timeout=300)
    assert b"is not empty and holds no complete checkpoint to resume from" in failure.value.stderr
