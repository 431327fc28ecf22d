"""Collectives for the contrastive and matching losses: gathering the global batch across processes.

`all_gather_with_grad` concatenates every process's tensor along the first axis and keeps the autograd graph: the
backward pass sums, over processes, the gradients that each process's loss sends to a shard, and hands every process
the sum for its own shard. Each process's shard thus gets the exact gradient of the sum of all processes' losses, so
that after DDP's gradient averaging the update equals that of one process on the concatenated batch (equal shards; the
original code gathered without gradient and kept only the local term). Shards may hold different numbers of rows.
Without an initialised process group (or with one process) both functions are the identity.
"""

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_sizes(tensor: torch.Tensor) -> list[int]:
    """The first-axis size of `tensor` on every process."""
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _gather(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All-gather shards of possibly different lengths (padded to the longest for the collective)."""
    longest = max(sizes)
    padded = tensor.contiguous()
    if tensor.shape[0] < longest:
        padding = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([padded, padding])
    shards = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(shards, padded)
    return torch.cat([shard[:size] for shard, size in zip(shards, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate all shards; backward all-reduces (sums) the gradient and returns this process's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int], start: int) -> torch.Tensor:
        ctx.bounds = (start, start + tensor.shape[0])
        return _gather(tensor, sizes)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start, end = ctx.bounds
        return grad[start:end], None, None


def all_gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate `tensor` from all processes (rank order) with gradients flowing back to every shard.

    Returns the global tensor and the offset of this process's rows in it (0 in a single process).
    """
    if not is_distributed():
        return tensor, 0
    sizes = _gather_sizes(tensor)
    start = sum(sizes[: dist.get_rank()])
    return _AllGatherWithGrad.apply(tensor, sizes, start), start


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (e.g. token ids) from all processes in rank order, without gradient."""
    if not is_distributed():
        return tensor
    return _gather(tensor, _gather_sizes(tensor))


def present_everywhere(flags: dict[str, bool], device: torch.device) -> dict[str, bool]:
    """Keep a flag only when it is set on every process, so that all processes run the same collectives (a
    modality present in one process's batch but not another's would otherwise leave the others waiting)."""
    if not is_distributed() or not flags:
        return flags
    values = torch.tensor([float(flag) for flag in flags.values()], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return {name: bool(value) for name, value in zip(flags, values.tolist())}
