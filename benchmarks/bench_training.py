"""Training throughput of MiCoForPreTraining under DDP, DeepSpeed ZeRO-1/2/3 and FSDP2 on 1 and 2 CPU processes (gloo),
at the tiny and base sizes, and the sharded data pipeline alone.

Each engine runs a plain training loop (forward, backward, AdamW step) on fixed random inputs (images and audio
spectrograms with their captions, contrastive + matching + caption losses), so that only the engine differs:
`torch.nn.parallel.DistributedDataParallel`, `deepspeed.initialize` (ZeRO stage 1, 2 or 3, torch AdamW) and
`modeling_mico.engines.shard_model` (FSDP2). Samples/s counts the rows of all processes per second over the timed
steps after one warm-up step; peak memory is each process's peak resident set (the largest over processes). The
data pipeline (`load_shards` + `ShardCollator` in DataLoader workers, decoding synthetic shards) is timed alone.

    python benchmarks/bench_training.py [--quick | --smoke] [--output benchmarks/results/training.json]

The default (full) mode runs every engine at both sizes on 1 and 2 processes (20 runs; tiny: 4 rows per process, 3
timed steps; base: 1 row per process, 1 timed step, where the matching loss is skipped) and the data pipeline.
Each run's processes are forked by a server that imported torch, Transformers, DeepSpeed and the package once, so a
run pays for its model and steps, not for imports. Memory: base under ZeRO-3 peaked at 9.7 GB on one process and
about 8.5 GB per process on two here, so the full mode wants ~20 GB free.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from benchmarks.common import markdown_table, write_json  # noqa: E402


DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "training.json"
ENGINES = ("ddp", "zero1", "zero2", "zero3", "fsdp2")
# rows per process and timed steps per size: base is ~100x the work of tiny and is run at one row, one timed step
WORKLOAD = {"tiny": (4, 3), "base": (1, 1)}
PRELOAD = ["torch", "transformers", "deepspeed", "modeling_mico", "modeling_mico.engines"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _inputs(config, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Random images, audio spectrograms (2 slices) and captions of `config`'s sizes."""
    generator = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    ids = torch.randint(1000, 2000, (batch, 24), generator=generator)
    ids[:, 0], ids[:, -1] = 101, 102
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, size, size, generator=generator),
        "input_features": torch.randn(batch, 2, size, size, generator=generator),
    }


def _engine_model(engine: str, model: torch.nn.Module, world_size: int):
    """Wrap `model` for `engine`; returns `(module to call, backward function, optimizer step function)`."""
    if engine.startswith("zero"):
        import deepspeed

        from modeling_mico.engines import patch_deepspeed_scalar_broadcast

        patch_deepspeed_scalar_broadcast()
        config = {
            "train_micro_batch_size_per_gpu": 1,  # rows are counted by the loop; DeepSpeed only checks consistency
            "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
            "zero_optimization": {"stage": int(engine[-1])},
        }
        wrapped, _, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
        return wrapped, wrapped.backward, wrapped.step
    if engine == "fsdp2":
        from modeling_mico.engines import shard_model

        shard_model(model)
    elif world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, lambda loss: loss.backward(), step


def _worker(rank: int, world_size: int, port: int, engine: str, size: str, batch: int, steps: int, results) -> None:
    import torch.distributed as dist

    from modeling_mico import MiCoConfig, MiCoForPreTraining

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # one thread per process: 2 processes use the 2 cores, with no oversubscription
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        if engine.startswith("zero"):
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
        config = MiCoConfig.from_preset(size)
        torch.manual_seed(0)
        model = MiCoForPreTraining(config).train()
        module, backward, step = _engine_model(engine, model, world_size)
        inputs = _inputs(config, batch, seed=rank)
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            loss = module(**inputs).loss
            backward(loss)
            step()
            times.append(time.perf_counter() - start)
        timed = sum(times[1:])
        results[rank] = {"seconds": timed, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    finally:
        dist.destroy_process_group()


def measure_engine(engine: str, size: str, processes: int, batch: int, steps: int) -> dict:
    """Samples/s and peak memory of `steps` timed steps of `engine` on `processes` spawned CPU processes."""
    results = mp.Manager().dict()
    start = time.perf_counter()
    # forked by a server that imported the libraries once (`PRELOAD`): a run does not pay their import, and the
    # workers do not inherit this process's thread pools (a plain fork after torch ran ops here could hang)
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    args = (processes, _free_port(), engine, size, batch, steps, results)
    mp.start_processes(_worker, args=args, nprocs=processes, start_method="forkserver")
    wall = time.perf_counter() - start
    seconds = max(results[rank]["seconds"] for rank in range(processes))
    return {
        "engine": engine,
        "size": size,
        "processes": processes,
        "batch_per_process": batch,
        "steps": steps,
        "samples_per_s": batch * processes * steps / seconds,
        "seconds_per_step": seconds / steps,
        "peak_rss_mib_per_process": max(results[rank]["peak_rss_mib"] for rank in range(processes)),
        "wall_s": wall,  # start-up, model build, warm-up and timed steps: what the run costs
    }


def measure_data_pipeline(num_samples: int, batch: int, workers: int) -> dict:
    """Samples/s of streaming synthetic shards through `ShardCollator` in DataLoader workers (no model)."""
    from modeling_mico import MiCoConfig, MiCoProcessor
    from modeling_mico.data import MiCoDataCollator
    from modeling_mico.sharded_data import ShardCollator, load_shards, write_shards
    from modeling_mico.synthetic_data import make_synthetic_dataset

    config = MiCoConfig.from_preset("tiny")
    with tempfile.TemporaryDirectory() as directory:
        info = make_synthetic_dataset(Path(directory) / "data", num_samples=num_samples, num_test=1, seed=0)
        rows = [json.loads(line) for line in open(info["train_file"])]
        shards = write_shards(
            rows, Path(directory) / "shards", samples_per_shard=max(1, len(rows) // 4), base_dir=info["output_dir"]
        )
        collator = ShardCollator(MiCoDataCollator(MiCoProcessor.from_config(config), config=config))
        loader = torch.utils.data.DataLoader(
            load_shards(shards, shuffle_buffer=8), batch_size=batch, num_workers=workers, collate_fn=collator
        )
        start = time.perf_counter()
        count = sum(len(batch["input_ids"]) for batch in loader)
        seconds = time.perf_counter() - start
    return {
        "samples": count,
        "batch": batch,
        "workers": workers,
        "modalities": "video, audio, depth, normal, caption",
        "samples_per_s": count / seconds,
    }


def run(quick: bool = False, smoke: bool = False) -> dict:
    """Every engine at tiny and base on 1 and 2 processes and the data pipeline; `quick`: tiny everywhere, base under
    DDP only; `smoke`: three tiny runs of one timed step (the code paths, in seconds)."""
    if smoke:
        plan = [("ddp", "tiny", 1), ("zero1", "tiny", 2), ("fsdp2", "tiny", 2)]
        data = (8, 2, 1)
    else:
        sizes = ("tiny",) if quick else ("tiny", "base")
        plan = [(engine, size, processes) for size in sizes for engine in ENGINES for processes in (1, 2)]
        plan += [("ddp", "base", processes) for processes in (1, 2)] if quick else []
        data = (24, 4, 2) if quick else (64, 4, 2)
    start = time.perf_counter()
    rows = []
    for engine, size, processes in tqdm(plan, desc="Training runs", unit="run"):
        batch, steps = WORKLOAD[size]
        rows.append(measure_engine(engine, size, processes, batch, 1 if smoke else steps))
        print(json.dumps(rows[-1]), flush=True)
    pipeline = measure_data_pipeline(*data)
    return {
        "rows": rows,
        "data_pipeline": pipeline,
        "settings": {"quick": quick, "smoke": smoke, "workload": WORKLOAD, "cores": os.cpu_count()},
        "total_s": time.perf_counter() - start,
    }


def _workload(settings: dict) -> str:
    if settings["smoke"]:
        return "one timed step"
    return "; ".join(
        f"{size}: {rows} rows/process, {steps} timed step(s)" for size, (rows, steps) in settings["workload"].items()
    )


def to_markdown(results: dict) -> str:
    """Tables for RESULTS.md."""
    header = ["model", "engine", "processes", "rows/process", "samples/s", "s/step", "peak RSS MiB/process", "run s"]
    table = markdown_table(
        header,
        [
            [
                row["size"],
                row["engine"],
                row["processes"],
                row["batch_per_process"],
                f"{row['samples_per_s']:.2f}",
                f"{row['seconds_per_step']:.2f}",
                f"{row['peak_rss_mib_per_process']:.0f}",
                f"{row['wall_s']:.0f}",
            ]
            for row in results["rows"]
        ],
        align="lllrrrrr",
    )
    data = results["data_pipeline"]
    tiny = [row for row in results["rows"] if row["size"] == "tiny"]
    fastest = max(tiny, key=lambda row: row["samples_per_s"]) if tiny else None
    note = (
        f"Data pipeline alone (synthetic shards: {data['modalities']}; {data['workers']} DataLoader workers, batch "
        f"{data['batch']}, tiny preset's processor): **{data['samples_per_s']:.1f} samples/s** over {data['samples']} "
        "samples"
    )
    if fastest:
        note += (
            f", against {fastest['samples_per_s']:.1f} samples/s for the fastest tiny training step "
            f"({fastest['engine']}, {fastest['processes']} process(es))"
        )
    return (
        "Plain training loop on fixed random images + audio + captions (all three losses), AdamW, float32, gloo, one torch thread per process; "
        f"{_workload(results['settings'])} after one warm-up step. The machine's "
        f"{results['settings']['cores']} cores are shared by the processes (and by other jobs), so 2 processes split "
        "the same cores: these numbers show the engines' overhead here, not multi-machine scaling.\n\n"
        f'{table}\n\n{note}. "run s": one run\'s wall time (start-up, model build, warm-up, timed steps); the whole '
        f"benchmark took {results['total_s'] / 60:.1f} min."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny at every engine, base under DDP only")
    parser.add_argument("--smoke", action="store_true", help="three tiny runs and a small data pipeline")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON file to write")
    args = parser.parse_args()
    results = run(quick=args.quick, smoke=args.smoke)
    write_json(args.output, results)
    print(to_markdown(results))


if __name__ == "__main__":
    main()
