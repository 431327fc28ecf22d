"""Tar shards (`modeling_mico.sharded_data`): writing, streaming split over processes and workers, shuffling,
corrupt members, and a streaming run of run_pretrain.py killed and resumed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import psutil
import pytest
import torch

from modeling_mico import MiCoConfig, MiCoForPreTraining, MiCoProcessor
from modeling_mico.data import BrokenMediaError, MiCoDataCollator
from modeling_mico.sharded_data import ShardCollator, expand_shards, iterate_shard, load_shards, write_shards
from modeling_mico.synthetic_data import make_synthetic_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    info = make_synthetic_dataset(root / "data", num_samples=14, num_test=2, seed=0, image_size=64)
    rows = [json.loads(line) for line in open(info["train_file"])]
    shards = write_shards(rows, root / "shards", samples_per_shard=3, base_dir=root / "data")
    return root, rows, shards


def tiny_config_64() -> MiCoConfig:
    config = MiCoConfig.from_preset("tiny")
    config.vision_config.image_size = 64  # the synthetic media's size
    return config


def keys_of(dataset) -> list[str]:
    return [sample["key"] for sample in dataset]


def test_written_shards_hold_each_row_once_with_its_media_bytes(data):
    root, rows, shards = data
    assert [os.path.basename(path) for path in shards] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert expand_shards(str(root / "shards" / "shard-{000000..000003}.tar")) == shards
    samples = list(load_shards(shards))
    assert [sample["key"] for sample in samples] == [row["id"] for row in rows]
    first, row = samples[0], rows[0]
    assert json.loads(first["text"]) == {"id": row["id"], "caption": row["caption"], "captions": row["captions"]}
    assert first["media"]["video.mp4"] == (root / "data" / row["video"]).read_bytes()
    with pytest.raises(FileExistsError, match="already holds shard"):
        write_shards(rows, root / "shards")
    with pytest.raises(FileNotFoundError, match=f"row 0 \\({row['id']}\\): the image file .* does not exist"):
        write_shards(rows, root / "elsewhere", base_dir=root)
    with pytest.raises(FileNotFoundError, match="1 shard\\(s\\) missing, e.g. .*shard-000004.tar"):
        expand_shards(str(root / "shards" / "shard-{000000..000004}.tar"))


def test_write_shards_command_prints_the_pattern_to_train_on(data, tmp_path):
    root, rows, _ = data
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "write_shards.py")
    command = [
        sys.executable, script, "--train_file", str(root / "data" / "train.jsonl"), "--output_dir",
        str(tmp_path / "shards"), "--samples_per_shard", "3",
    ]  # fmt: skip
    done = subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
    pattern = str(tmp_path / "shards" / "shard-{000000..000003}.tar")
    assert done.stdout.strip() == f"4 shards: {pattern}"
    assert [sample["key"] for sample in load_shards(pattern)] == [row["id"] for row in rows]


def test_processes_and_workers_read_disjoint_shards_covering_everything(data):
    """What accelerate does for each process (`shard`), then two DataLoader workers splitting its shards."""
    _, rows, shards = data
    dataset = load_shards(shards, shuffle_buffer=4, seed=1)
    seen = []
    for rank in range(2):
        loader = torch.utils.data.DataLoader(dataset.shard(num_shards=2, index=rank), num_workers=2, collate_fn=list)
        seen.append([sample["key"] for batch in loader for sample in batch])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(row["id"] for row in rows)


def test_shuffle_is_buffered_and_the_same_for_the_same_seed_and_epoch(data):
    _, rows, shards = data
    ordered = keys_of(load_shards(shards))
    shuffled = keys_of(load_shards(shards, shuffle_buffer=4, seed=1))
    assert shuffled == keys_of(load_shards(shards, shuffle_buffer=4, seed=1)) != ordered
    assert sorted(shuffled) == sorted(ordered)
    next_epoch = load_shards(shards, shuffle_buffer=4, seed=1)
    next_epoch.set_epoch(1)
    assert keys_of(next_epoch) != shuffled


def _with_corrupt_image(shard: str, target) -> str:
    """A copy of `shard` whose first sample's image bytes are garbage; returns that sample's key."""
    with tarfile.open(shard) as source, tarfile.open(target, "w") as copy:
        members = source.getmembers()
        key = members[0].name.split(".")[0]
        for member in members:
            content = source.extractfile(member).read()
            if member.name == f"{key}.image.png":
                content = b"not a png"
                member.size = len(content)
            copy.addfile(member, __import__("io").BytesIO(content))
    return key


def test_a_corrupt_member_is_named_or_skipped_and_counted(data, tmp_path):
    root, _, shards = data
    key = _with_corrupt_image(shards[0], tmp_path / "shard-000000.tar")
    samples = list(load_shards([str(tmp_path / "shard-000000.tar")]))
    config = tiny_config_64()
    processor = MiCoProcessor.from_config(config)
    strict = ShardCollator(MiCoDataCollator(processor, ["image"], config=config))
    with pytest.raises(
        BrokenMediaError, match=f"cannot read the image of a row from .*shard-000000.tar/{key}.image.png"
    ):
        strict(samples)
    lenient = ShardCollator(MiCoDataCollator(processor, ["image"], skip_broken=True, config=config))
    batch = lenient(samples)
    assert batch["pixel_values"].shape[0] == len(samples) - 1 and lenient.num_skipped == 1


def test_a_truncated_shard_is_named(data, tmp_path):
    _, _, shards = data
    truncated = tmp_path / "shard-000009.tar"
    truncated.write_bytes(open(shards[1], "rb").read()[:3000])
    with pytest.raises(tarfile.ReadError, match="shard .*shard-000009.tar is corrupt near sample"):
        list(iterate_shard(str(truncated)))


@pytest.mark.slow
def test_streaming_run_on_two_processes_killed_after_a_checkpoint_resumes_like_an_uninterrupted_run(data, tmp_path):
    """Shards → run_pretrain.py --train_shards on 2 processes x 2 DataLoader workers (one shard each, shuffle buffer)
    → SIGKILL once checkpoint-2 is written → the same command resumes: steps 3-4 log the losses of an uninterrupted
    run (same batches, same per-row caption/frame draws)."""
    root, _, _ = data
    config = tiny_config_64()
    torch.manual_seed(0)
    MiCoForPreTraining(config).save_pretrained(tmp_path / "init")
    MiCoProcessor.from_config(config).save_pretrained(tmp_path / "init")
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "run_pretrain.py")

    def command(output_dir) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script, "--model_name_or_path",
            str(tmp_path / "init"), "--train_shards", str(root / "shards" / "shard-{000000..000003}.tar"),
            "--shuffle_buffer", "4", "--output_dir", str(output_dir), "--max_steps", "4",
            "--per_device_train_batch_size", "2", "--do_train", "--report_to", "none", "--use_cpu", "--ddp_backend",
            "gloo", "--dataloader_num_workers", "2", "--logging_steps", "1", "--save_steps", "2",
            "--lr_scheduler_type", "constant", "--seed", "3",
        ]  # fmt: skip

    def losses(output_dir) -> list[float]:
        history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        return [entry["loss"] for entry in history if "loss" in entry]

    subprocess.run(command(tmp_path / "full"), check=True, capture_output=True, timeout=300)
    killed = subprocess.Popen(command(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "killed" / "checkpoint-2" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    for process in [*psutil.Process(killed.pid).children(recursive=True), psutil.Process(killed.pid)]:
        process.send_signal(signal.SIGKILL)  # the training processes (own sessions), their workers, the launcher
    killed.wait()
    assert marker.exists() and not (tmp_path / "killed" / "trainer_state.json").exists()
    shutil.rmtree(tmp_path / "killed" / "checkpoint-4", ignore_errors=True)  # a fast machine may get there first
    subprocess.run(command(tmp_path / "killed"), check=True, capture_output=True, timeout=300)
    assert len(losses(tmp_path / "full")) == 4
    assert losses(tmp_path / "killed") == pytest.approx(losses(tmp_path / "full"), rel=1e-6)
