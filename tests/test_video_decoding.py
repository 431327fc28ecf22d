"""Parallel video decoding: the files of a batch decoded by one thread each, with the same frames as one at a time."""

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_mico import MiCoProcessor
from modeling_mico import video_processing_mico as video
from modeling_mico.image_processing_mico import map_batch, uint8_frames_to_tensor


MEDIA = Path(__file__).parent / "fixtures" / "media"


def test_map_batch_with_workers_keeps_order_and_names_the_first_failing_item():
    barrier = threading.Barrier(2, timeout=30)

    def meet(item, name):  # returns only once two items run at the same time
        barrier.wait()
        return item

    assert map_batch([3, 4], meet, "items", workers=2) == [3, 4]

    def square(item, name):
        if item < 0:
            raise ValueError(f"{name} is negative")
        return item * item

    assert map_batch(list(range(8)), square, "items", workers=3) == [i * i for i in range(8)]
    with pytest.raises(ValueError, match=r"^items\[2\] is negative$"):
        map_batch([1, 2, -3, -4], square, "items", workers=2)


def test_uint8_frames_scale_exactly_as_float_then_divide():
    frames = np.arange(256, dtype=np.uint8).reshape(1, 4, 64, 1).repeat(3, axis=-1)
    expected = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255)
    assert torch.equal(uint8_frames_to_tensor(frames), expected)


def test_decoding_plan(monkeypatch, tmp_path):
    monkeypatch.setattr(video, "usable_cores", lambda: 2)
    files = [str(MEDIA / "test.mp4")] * 3
    assert video.decoding_plan(files, training=False) == (2, 1)
    assert video.decoding_plan(files[:1], training=False) == (1, 2)
    assert video.decoding_plan([{"bytes": b"", "path": "a.mp4"}] * 2, training=False) == (2, 1)
    assert video.decoding_plan([str(tmp_path), np.zeros((2, 4, 4, 3))], training=False) == (1, 2)  # no files
    assert video.decoding_plan(files, training=True) == (1, 2)  # frames drawn in item order
    monkeypatch.setattr(video, "usable_cores", lambda: 1)
    assert video.decoding_plan(files, training=False) == (1, 1)
    monkeypatch.setattr(video, "usable_cores", lambda: 2)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    assert video.decoding_plan(files, training=False) == (1, 1)


def test_parallel_decoding_gives_the_serial_frames_and_names_broken_files(monkeypatch, tmp_path):
    processor = MiCoProcessor().video_processor
    files = [str(MEDIA / "test.mp4")] * 2
    monkeypatch.setattr(video, "usable_cores", lambda: 2)
    plans = []
    plan = video.decoding_plan
    monkeypatch.setattr(video, "decoding_plan", lambda *args: plans.append(plan(*args)) or plans[-1])
    parallel = processor(videos=files, num_frames=3, return_frame_indices=True)
    monkeypatch.setattr(video, "decoding_plan", lambda *args: (1, 1))
    serial = processor(videos=files, num_frames=3, return_frame_indices=True)
    assert plans == [(2, 1)]
    assert torch.equal(parallel["pixel_values_videos"], serial["pixel_values_videos"])
    assert torch.equal(parallel["frame_indices"], serial["frame_indices"])
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    monkeypatch.setattr(video, "decoding_plan", plan)
    with pytest.raises(ValueError, match=r"cannot decode videos\[1\] file .*broken\.mp4"):
        processor(videos=[files[0], str(broken), files[0]])
