"""DeepSpeed ZeRO-2/3 through run_pretrain.py and FSDP2 (`modeling_mico.engines`) on 2 CPU processes (gloo)."""

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
