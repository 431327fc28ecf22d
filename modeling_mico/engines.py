"""Training engines past DDP: DeepSpeed ZeRO (1–3) and PyTorch FSDP2, on CPU (gloo) as on GPU.

DeepSpeed runs through the 🤗 Trainer (`run_pretrain.py --deepspeed <config>`): `prepare_deepspeed` makes that work
on CPU processes and with MiCo's 0-dim `temperature` parameter, `zero_checkpoint_to_model_directory` turns a ZeRO
checkpoint into an ordinary model directory. FSDP2 (`torch.distributed.fsdp.fully_shard`) is applied by
`shard_model`, one unit per vision block and text layer, with `full_state_dict` / `save_sharded` / `load_sharded` for
its weights; the Trainer's FSDP path needs GPUs (see `check_fsdp_request`).
"""

import os
import shutil
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist


def prepare_deepspeed(training_args) -> None:
    """Make a `--deepspeed` run work on CPU as on GPU; call it before building the model.

    Starts the process group (`training_args.device`) and DeepSpeed's communication layer on it, so that ZeRO-3's
    `zero.Init` (entered by Transformers while the model is built) sees every process: on CPU (`--use_cpu`) the
    Trainer starts a plain gloo group and DeepSpeed would otherwise count one process. Then patches the start-up
    broadcast for 0-dim parameters (`patch_deepspeed_scalar_broadcast`).
    """
    import deepspeed

    training_args.device  # noqa: B018 (the property starts the process group)
    if dist.is_available() and dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    patch_deepspeed_scalar_broadcast()


@contextmanager
def _scalars_as_vectors(parameters: Iterable[torch.nn.Parameter]):
    """Give every 0-dim parameter a one-element view of its own storage for the duration (writes reach the same
    memory), then restore its shape unless ZeRO-3 partitioned it meanwhile (an empty local shard)."""
    scalars = [p for p in parameters if p.data.dim() == 0]
    for parameter in scalars:
        parameter.data = parameter.data.reshape(1)
    try:
        yield
    finally:
        for parameter in scalars:
            if parameter.data.numel() == 1:
                parameter.data = parameter.data.reshape(())


def patch_deepspeed_scalar_broadcast() -> None:
    """Let DeepSpeed broadcast 0-dimensional parameters (MiCo's `temperature`).

    DeepSpeed (0.19) broadcasts parameters as `p.data.view(torch.uint8)`, which PyTorch refuses for a 0-dim tensor:
    in the engine's start-up broadcast, in ZeRO-3's `zero.Init` and when `GatheredParameters(modifier_rank=...)`
    hands modified weights back. Those three run with 0-dim parameters viewed as one-element tensors of the same
    storage (`_scalars_as_vectors`); under `zero.Init` the view is taken after DeepSpeed recorded the shape
    (`ds_shape`, which the gathered parameter takes again). Idempotent.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters, Init

    if getattr(DeepSpeedEngine._broadcast_model, "_mico_scalar_safe", False):
        return
    broadcast_original, exit_original = DeepSpeedEngine._broadcast_model, GatheredParameters._exit
    convert_original = Init._convert_to_deepspeed_param

    def broadcast_model(engine) -> None:
        with _scalars_as_vectors(engine.module.parameters()):
            broadcast_original(engine)

    def gathered_exit(gathered, *exc):
        with _scalars_as_vectors(gathered.params if gathered.enabled else ()):
            return exit_original(gathered, *exc)

    def convert_to_deepspeed_param(init, parameter) -> None:
        convert_original(init, parameter)
        if parameter.data.dim() == 0:
            parameter.data = parameter.data.reshape(1)

    broadcast_model._mico_scalar_safe = True
    DeepSpeedEngine._broadcast_model = broadcast_model
    GatheredParameters._exit = gathered_exit
    Init._convert_to_deepspeed_param = convert_to_deepspeed_param


def zero_checkpoint_to_model_directory(checkpoint: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Write the full-precision weights of a DeepSpeed ZeRO (1–3) `checkpoint-N` directory of `run_pretrain.py`
    as an ordinary model directory (config, `model.safetensors`, processor) that `from_pretrained` loads.

    The weights are reassembled from every process's shards by DeepSpeed's `zero_to_fp32` (no process group
    needed); the tied word-embedding / LM-head weight is stored once, as by `save_pretrained`. `output_dir` must not
    exist or be empty; it is written under a temporary name and renamed when complete.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from .configuration_mico import MiCoConfig
    from .modeling_mico import MiCoForPreTraining
    from .processing_mico import MiCoProcessor

    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    if not (checkpoint / "latest").is_file():
        raise FileNotFoundError(
            f"{checkpoint} is not a DeepSpeed checkpoint (no 'latest' file naming its global_step)"
        )
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"output directory {output_dir} is not empty")
    model = MiCoForPreTraining(MiCoConfig.from_pretrained(checkpoint))
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint)), strict=True)
    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    if (checkpoint / "processor_config.json").is_file():
        MiCoProcessor.from_pretrained(checkpoint).save_pretrained(partial)
    if output_dir.exists():
        output_dir.rmdir()
    partial.rename(output_dir)
    return output_dir


# ---- FSDP2 ----------------------------------------------------------------------------------------------------------


def shard_model(model: torch.nn.Module, mesh=None, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Shard a MiCo model in place with FSDP2 (`fully_shard`): one unit per vision encoder block and per text layer,
    then the root unit holding the rest (embeddings, bridges, heads, temperature).

    The tied word-embedding / LM-head weight is one parameter, so it lives in the root unit once and stays tied.
    FSDP2 cannot shard 0-dim parameters (the `temperature`): they stay replicated (`ignored_params`) and their
    gradient is averaged over the processes by a hook, as DDP would. `mesh` defaults to all processes (`init_device_mesh` on the process group's device type: "cpu" with gloo).
    A unit called several times per step (the text layers run for contrastive, matching and caption tasks) is
    gathered again at each call. Returns the model, whose parameters are now `DTensor` shards.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .modeling_mico import MiCoVisionEncoderLayer
    from .modeling_mico_text import MiCoTextLayer

    if not dist.is_initialized():
        raise RuntimeError("shard_model needs an initialised process group (torch.distributed.init_process_group)")
    if mesh is None:
        device_type = "cpu" if dist.get_backend() == "gloo" else "cuda"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    scalars = {parameter for parameter in model.parameters() if parameter.dim() == 0}
    for module in model.modules():
        if isinstance(module, MiCoVisionEncoderLayer | MiCoTextLayer):
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=scalars)
    for parameter in scalars:
        parameter.register_post_accumulate_grad_hook(_average_gradient)
    return model


def _average_gradient(parameter: torch.nn.Parameter) -> None:
    """Average a replicated parameter's gradient over all processes (the sum, divided: gloo has no AVG)."""
    dist.all_reduce(parameter.grad)
    parameter.grad.div_(dist.get_world_size())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights of an FSDP2-sharded model, on CPU, on process 0 (empty elsewhere); a collective, to call
    on every process. Process 0 can then `save_pretrained(directory, state_dict=...)`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, path: str | os.PathLike) -> None:
    """Save an FSDP2 model (and optimizer) as a `torch.distributed.checkpoint` directory: every process writes its
    own shards; any number of processes can load it again (`load_sharded`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_state} | ({"optimizer": optimizer_state} if optimizer is not None else {})
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, path: str | os.PathLike) -> None:
    """Load what `save_sharded` wrote into an FSDP2-sharded model (and optimizer) in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_state} | ({"optimizer": optimizer_state} if optimizer is not None else {})
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model,
        optimizer if optimizer is not None else [],
        model_state_dict=state["model"],
        optim_state_dict=state.get("optimizer", {}),
    )


def check_fsdp_request(training_args) -> None:
    """Refuse `--fsdp` / an accelerate FSDP config on CPU processes instead of letting the Trainer run plain DDP.

    The Trainer's FSDP path (accelerate) only shards on accelerators; with `--use_cpu` or no GPU it falls back to
    replicated DDP without a word. FSDP2 on CPU processes is available through `shard_model` in a custom loop.
    """
    fsdp_requested = bool(training_args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_requested and (training_args.use_cpu or not torch.cuda.is_available()):
        raise ValueError(
            "--fsdp needs GPUs: on CPU processes the Trainer (accelerate) does not shard and would silently run DDP. "
            "Use --deepspeed examples/configs/deepspeed_zero3.json to shard on CPU, or "
            "modeling_mico.engines.shard_model in your own loop."
        )
