"""Search over your own media: every indexed item is found at rank 1 from the media it was made from, a second run
embeds only new or changed files, outputs are atomic and never land in a non-empty place without `overwrite`."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_mico import MiCoConfig, MiCoModel, MiCoProcessor
from modeling_mico.data import BrokenMediaError
from modeling_mico.search import build_index, embed_texts, load_index, search


REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO / "tests" / "fixtures" / "media"


@pytest.fixture(scope="module")
def model_and_processor() -> tuple[MiCoModel, MiCoProcessor]:
    torch.manual_seed(0)
    config = MiCoConfig.from_preset("tiny")
    return MiCoModel(config).eval(), MiCoProcessor.from_config(config)


@pytest.fixture
def media(tmp_path) -> Path:
    """A folder of an image, a video with its sound clip beside it, a lone audio clip and a depth map."""
    folder = tmp_path / "media"
    (folder / "sounds").mkdir(parents=True)
    shutil.copy(MEDIA / "test.jpeg", folder / "photo.jpeg")
    shutil.copy(MEDIA / "test.mp4", folder / "clip.mp4")
    shutil.copy(MEDIA / "test.flac", folder / "clip.flac")
    shutil.copy(MEDIA / "test.flac", folder / "sounds" / "rain.flac")
    np.save(folder / "room.npy", np.random.default_rng(0).random((40, 40), dtype=np.float32))
    return folder


def test_each_item_is_found_at_rank_one_from_its_own_media(model_and_processor, media, tmp_path):
    model, processor = model_and_processor
    counts = build_index(model, processor, [media], tmp_path / "index", progress=False)
    assert counts == {"items": 4, "embedded": 4, "kept": 0, "skipped": 0}
    index = load_index(tmp_path / "index")
    assert sorted(index["modality"]) == ["audio", "audio+video", "depth", "image"]
    clip = {"video": str(media / "clip.mp4"), "audio": str(media / "clip.flac")}
    queries = {
        str((media / "photo.jpeg").resolve()): media / "photo.jpeg",
        str((media / "sounds" / "rain.flac").resolve()): media / "sounds" / "rain.flac",
        str((media / "room.npy").resolve()): media / "room.npy",
        f"{(media / 'clip.mp4').resolve()} + {(media / 'clip.flac').resolve()}": clip,
    }
    for path, query in queries.items():
        (best, *_) = search(index, model, processor, query, k=4)
        assert best["path"] == path
        assert best["score"] == pytest.approx(1.0, abs=1e-5)


def test_text_queries_rank_by_the_models_cosine_similarity(model_and_processor, media, tmp_path):
    model, processor = model_and_processor
    build_index(model, processor, [media], tmp_path / "index", progress=False)
    hits = search(tmp_path / "index", model, processor, "a dog barking", k=10)
    index = load_index(tmp_path / "index")
    expected = np.asarray(index["embedding"], dtype=np.float32) @ embed_texts(model, processor, ["a dog barking"])[0]
    by_path = dict(zip(index["path"], expected))
    assert len(hits) == 4
    assert [hit["score"] for hit in hits] == sorted((hit["score"] for hit in hits), reverse=True)
    for hit in hits:
        assert hit["score"] == pytest.approx(float(by_path[hit["path"]]), abs=1e-5)


def test_a_second_run_embeds_only_new_files(model_and_processor, media, tmp_path):
    model, processor = model_and_processor
    build_index(model, processor, [media], tmp_path / "index", progress=False)
    before = load_index(tmp_path / "index")
    shutil.copy(MEDIA / "test.jpeg", media / "photo2.jpeg")
    (media / "sounds" / "rain.flac").unlink()
    counts = build_index(model, processor, [media], tmp_path / "index", progress=False)
    assert counts == {"items": 4, "embedded": 1, "kept": 3, "skipped": 0}
    after = load_index(tmp_path / "index")
    kept = dict(zip(before["path"], before["embedding"]))
    assert all(kept[path] == embedding for path, embedding in zip(after["path"], after["embedding"]) if path in kept)
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".index")]


def test_a_non_empty_output_that_is_no_index_needs_overwrite(model_and_processor, media, tmp_path):
    model, processor = model_and_processor
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="output_dir .*taken is not empty; pass overwrite=True"):
        build_index(model, processor, [media], tmp_path / "taken", progress=False)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    build_index(model, processor, [media], tmp_path / "taken", overwrite=True, progress=False)
    assert not (tmp_path / "taken" / "notes.txt").exists() and len(load_index(tmp_path / "taken")) == 4
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        search(tmp_path / "taken", model, processor, "a dog", k=0)
    with pytest.raises(FileNotFoundError, match="is not a search index"):
        load_index(media)


@pytest.mark.slow
def test_run_search_command_line(model_and_processor, media, tmp_path, capsys):
    """The commands of docs/ecosystem.md, on a saved tiny model."""
    model, processor = model_and_processor
    model.save_pretrained(tmp_path / "tiny")
    processor.save_pretrained(tmp_path / "tiny")
    spec = importlib.util.spec_from_file_location("run_search", REPO / "examples" / "run_search.py")
    run_search = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_search)
    common = ["--model_name_or_path", str(tmp_path / "tiny"), "--index_dir", str(tmp_path / "media-index")]
    run_search.main(["index", *common, "--inputs", str(media)])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["embedded"] == 4
    run_search.main(["query", *common, "--text", "a dog", "--media", str(media / "photo.jpeg"), "--top_k", "2"])
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(hit["query"], hit["rank"]) for hit in hits] == [
        ("a dog", 1),
        ("a dog", 2),
        (str(media / "photo.jpeg"), 1),
        (str(media / "photo.jpeg"), 2),
    ]
    assert hits[2]["path"] == str((media / "photo.jpeg").resolve())


def test_sound_tracks_embed_each_video_with_its_own_sound(model_and_processor, tmp_path):
    """With `sound_tracks`, a video without a sound clip beside it is embedded with its own sound (the `va` head)."""
    model, processor = model_and_processor
    (tmp_path / "media").mkdir()
    shutil.copy(MEDIA / "test.mp4", tmp_path / "media" / "street.mp4")
    build_index(model, processor, [tmp_path / "media"], tmp_path / "index", sound_tracks=True, progress=False)
    index = load_index(tmp_path / "index")
    video = str((tmp_path / "media" / "street.mp4").resolve())
    assert index["modality"] == ["audio+video"] and index["path"] == [f"{video} + {video}"]
    (best,) = search(index, model, processor, {"video": video, "audio": video}, k=1)
    assert best["score"] == pytest.approx(1.0, abs=1e-5)


def test_an_undecodable_file_is_named_or_skipped_and_counted(tmp_path, model_and_processor):
    """Without `skip_broken` the run stops naming the file before anything is written; with it, the file is left out
    and counted, and the others are indexed."""
    model, processor = model_and_processor
    media = tmp_path / "media"
    media.mkdir()
    shutil.copy(MEDIA / "test.jpeg", media / "good.jpeg")
    (media / "broken.jpeg").write_bytes(b"not a jpeg")
    with pytest.raises(BrokenMediaError, match=r"cannot decode .*broken\.jpeg"):
        build_index(model, processor, [media], tmp_path / "index", progress=False)
    assert not (tmp_path / "index").exists()
    counts = build_index(model, processor, [media], tmp_path / "index", progress=False, skip_broken=True)
    assert counts == {"items": 1, "embedded": 1, "kept": 0, "skipped": 1}
    assert [
        hit["path"] for hit in search(load_index(tmp_path / "index"), model, processor, str(media / "good.jpeg"))
    ] == [str((media / "good.jpeg").resolve())]
