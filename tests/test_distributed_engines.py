"""DeepSpeed ZeRO-1/2/3 through run_pretrain.py and FSDP2 (`modeling_mico.engines`) on 2 CPU processes (gloo)."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from test_pretraining import _free_port, make_batch, model_for, only, tiny_config

from modeling_mico import MiCoForPreTraining, engines


def _flat_grads(parameters) -> torch.Tensor:
    grads = []
    for parameter in parameters:
        grad = parameter.grad
        if grad is not None and hasattr(grad, "full_tensor"):
            grad = grad.full_tensor()
        grads.append(grad.flatten() if grad is not None else torch.zeros(parameter.numel()))
    return torch.cat(grads)


def _fsdp_worker(rank: int, world_size: int, port: int, batch: dict, state: dict, path: str, results: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        model = MiCoForPreTraining(only(tiny_config(), contrastive=["tv", "tva"])).eval()
        model.load_state_dict(state)
        engines.shard_model(model)
        tied = model.lm_head.decoder.weight is model.mico.text_model.embeddings.word_embeddings.weight
        out = model(**{key: value.chunk(world_size)[rank] for key, value in batch.items()})
        out.loss.backward()
        grads = _flat_grads(model.parameters())
        engines.save_sharded(model, None, path)
        reloaded = MiCoForPreTraining(only(tiny_config(), contrastive=["tv", "tva"]))
        engines.shard_model(reloaded)
        engines.load_sharded(reloaded, None, path)
        results[rank] = (out.loss.detach(), grads, tied, engines.full_state_dict(reloaded))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_process_and_the_sharded_checkpoint_reloads(tmp_path):
    """FSDP2 averages the processes' gradients (reduce-scatter), so with the gathered contrastive negatives both
    the mean loss and every gradient equal those of one process on the concatenated batch."""
    model = model_for(only(tiny_config(), contrastive=["tv", "tva"]))
    batch = make_batch(batch_size=6)
    out = model(**batch)
    out.loss.backward()
    expected = _flat_grads(model.parameters())

    results = mp.Manager().dict()
    state = model.state_dict()
    mp.spawn(_fsdp_worker, args=(2, _free_port(), batch, state, str(tmp_path / "dcp"), results), nprocs=2, join=True)
    torch.testing.assert_close(torch.stack([results[rank][0] for rank in range(2)]).mean(), out.loss.detach())
    for rank in range(2):
        _, grads, tied, _ = results[rank]
        assert tied
        torch.testing.assert_close(grads, expected, rtol=1e-4, atol=1e-6)
    reloaded, nothing = results[0][3], results[1][3]
    assert reloaded.keys() == state.keys() and nothing == {}
    for key, value in state.items():
        torch.testing.assert_close(reloaded[key], value, msg=key)


# ---- DeepSpeed through run_pretrain.py ------------------------------------------------------------------------------

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "examples", "run_pretrain.py")
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "examples", "configs")


def _command(output_dir, data: dict, init: str, *extra: str, workers: int = 0) -> list[str]:
    """run_pretrain.py on 2 CPU processes: 3 steps of 2 x 4 rows, checkpoint-2 saved."""
    import sys

    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", SCRIPT, "--model_name_or_path", init,
        "--train_file", data["train_file"], "--output_dir", str(output_dir), "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--do_train", "--report_to", "none", "--use_cpu", "--ddp_backend", "gloo",
        "--dataloader_num_workers", str(workers), "--logging_steps", "1", "--save_steps", "2", "--seed", "3", *extra,
    ]  # fmt: skip


def _launch(output_dir, data: dict, init: str, *extra: str, workers: int = 0) -> list[float]:
    """Run `_command` and return the logged losses."""
    import json
    import subprocess

    command = _command(output_dir, data, init, *extra, workers=workers)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The data, initial weights, and DDP's losses (with a DataLoader worker and evaluation) in one run and resumed
    from its checkpoint-2; every DeepSpeed run (no worker) is compared with them."""
    from modeling_mico import MiCoConfig, MiCoProcessor
    from modeling_mico.synthetic_data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("ddp")
    data = make_synthetic_dataset(root / "data", num_samples=24, seed=0, image_size=64)
    config = MiCoConfig.from_preset("tiny")
    config.vision_config.image_size = 64
    torch.manual_seed(0)
    MiCoForPreTraining(config).save_pretrained(root / "init")
    MiCoProcessor.from_config(config).save_pretrained(root / "init")
    init = str(root / "init")
    evaluation = ["--validation_file", data["test_file"], "--do_eval"]
    losses = _launch(root / "run", data, init, *evaluation, workers=1)
    checkpoint = ["--resume_from_checkpoint", str(root / "run" / "checkpoint-2")]
    return data, init, losses, _launch(root / "resumed", data, init, *checkpoint, workers=1), root


@pytest.mark.slow
def test_ddp_resumed_on_two_processes_logs_the_uninterrupted_losses(ddp_run, tmp_path):
    """The collator's draws (caption, frames, slices) are seeded per row and epoch and the model's draws come from the
    per-process RNG files, so the step run after resuming from checkpoint-2 is the uninterrupted run's third step.
    The run's output loads with the Auto classes; a non-empty output directory without a checkpoint is refused."""
    import json
    import shutil
    import subprocess

    from transformers import AutoModel, AutoProcessor

    data, init, losses, resumed, root = ddp_run
    assert len(losses) == 3
    assert resumed == pytest.approx(losses, rel=1e-6)
    assert type(AutoModel.from_pretrained(root / "run")).__name__ == "MiCoModel"
    assert AutoProcessor.from_pretrained(root / "run").image_processor.image_size == 64
    assert json.loads((root / "run" / "eval_results.json").read_text())["eval_loss"] > 0

    shutil.copytree(root / "run", tmp_path / "foreign", ignore=shutil.ignore_patterns("checkpoint-*"))
    done = subprocess.run(_command(tmp_path / "foreign", data, init), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "is not empty and holds no complete checkpoint to resume from" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_matches_ddp_resumes_and_converts_to_a_model_directory(tmp_path, ddp_run, stage):
    """ZeRO-1/2/3 on 2 CPU processes: the losses equal DDP's from the same weights and data (fp32: rel 1e-5), a run
    resumed from checkpoint-2 logs them too (steps 1-2 from the checkpoint's history, step 3 rerun), and
    checkpoint-2 becomes a model directory that loads with the weights the Trainer saved and the LM head tied."""
    from modeling_mico.engines import zero_checkpoint_to_model_directory

    data, init, ddp_losses, _, _ = ddp_run
    engine = ["--deepspeed", os.path.join(CONFIGS, f"deepspeed_zero{stage}.json")]
    losses = _launch(tmp_path / "run", data, init, *engine)
    assert losses == pytest.approx(ddp_losses, rel=1e-5)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    resumed = _launch(tmp_path / "resumed", data, init, *engine, "--resume_from_checkpoint", str(checkpoint))
    assert resumed == pytest.approx(ddp_losses, rel=1e-5)

    converted = MiCoForPreTraining.from_pretrained(zero_checkpoint_to_model_directory(checkpoint, tmp_path / "model"))
    assert converted.lm_head.decoder.weight is converted.mico.text_model.embeddings.word_embeddings.weight
    saved = MiCoForPreTraining.from_pretrained(checkpoint)  # the weights the Trainer gathered at save time
    for (name, value), expected in zip(converted.state_dict().items(), saved.state_dict().values()):
        torch.testing.assert_close(value, expected, msg=name)
    with pytest.raises(FileExistsError, match="is not empty"):
        zero_checkpoint_to_model_directory(checkpoint, tmp_path / "model")


def test_fsdp_through_the_trainer_on_cpu_is_refused(tmp_path, monkeypatch):
    """accelerate's FSDP path does not shard on CPU (it would run DDP); run_pretrain.py calls this check first."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    engines.check_fsdp_request(args)  # no FSDP asked: nothing to refuse
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="--fsdp needs GPUs: on CPU processes the Trainer .* would silently run DDP"):
        engines.check_fsdp_request(args)
