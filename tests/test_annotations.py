"""Tests of the annotation loaders: one small file per supported format, format detection and error messages."""

import json
from pathlib import Path

import pytest

from modeling_mico.annotations import flatten_captions, load_annotations


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_mico_jsonl_resolves_paths_against_the_file(tmp_path: Path):
    (tmp_path / "ann").mkdir()
    lines = [
        {"id": "a", "caption": "a dog barks", "video": "videos/a.mp4", "audio": "/abs/a.wav", "subtitle": "woof"},
        {"captions": ["a cat", "a kitten"], "image": "b.jpg", "depth": "b_depth.png", "split": "test"},
    ]
    path = write_text(tmp_path / "ann" / "rows.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n\n")
    rows = load_annotations(path)
    root = tmp_path.resolve() / "ann"
    assert rows[0] == {
        "id": "a",
        "captions": ["a dog barks"],
        "caption": "a dog barks",
        "video": str(root / "videos" / "a.mp4"),
        "audio": "/abs/a.wav",
        "subtitle": "woof",
    }
    assert rows[1]["id"] == "1"
    assert rows[1]["captions"] == ["a cat", "a kitten"] and rows[1]["caption"] == "a cat"
    assert rows[1]["image"] == str(root / "b.jpg") and rows[1]["depth"] == str(root / "b_depth.png")
    assert [row["id"] for row in load_annotations(path, split="test")] == ["1"]


def test_flat_blip_list_with_media_root(tmp_path: Path):
    data = [{"image": "val2014/x.jpg", "caption": ["one", "two"]}, {"image": "val2014/y.jpg", "caption": "three"}]
    rows = load_annotations(write_json(tmp_path / "coco_test.json", data), media_root="/data/coco")
    assert [row["image"] for row in rows] == ["/data/coco/val2014/x.jpg", "/data/coco/val2014/y.jpg"]
    assert flatten_captions(rows) == (["one", "two", "three"], [0, 0, 1])


def test_msrvtt_list_groups_captions(tmp_path: Path):
    data = [
        {"video_id": "video7020", "caption": "a woman talks"},
        {"video_id": "video7021", "caption": ["a car", "a red car"]},
        {"video_id": "video7020", "caption": "someone speaks"},
        {"clip_name": "video7022", "caption": "cooking"},
    ]
    rows = load_annotations(write_json(tmp_path / "msrvtt_test.json", data), media_root="/videos")
    assert [row["id"] for row in rows] == ["video7020", "video7021", "video7022"]
    assert rows[0]["captions"] == ["a woman talks", "someone speaks"]
    assert rows[0]["video"] == "/videos/video7020.mp4"
    assert flatten_captions(rows)[1] == [0, 0, 1, 1, 2]
    webm = load_annotations(tmp_path / "msrvtt_test.json", format="msrvtt", media_root="/v", video_extension=".webm")
    assert webm[2]["video"] == "/v/video7022.webm"


def test_msrvtt_official_with_split(tmp_path: Path):
    data = {
        "videos": [{"video_id": "video0", "split": "train"}, {"video_id": "video1", "split": "test"}],
        "sentences": [
            {"video_id": "video1", "caption": "a man sings", "sen_id": 0},
            {"video_id": "video0", "caption": "a dog runs", "sen_id": 1},
            {"video_id": "video1", "caption": "music plays", "sen_id": 2},
        ],
    }
    path = write_json(tmp_path / "train_val_videodatainfo.json", data)
    rows = load_annotations(path, split="test", media_root="/m")
    assert rows == [
        {
            "id": "video1",
            "captions": ["a man sings", "music plays"],
            "caption": "a man sings",
            "video": "/m/video1.mp4",
            "split": "test",
        }
    ]
    assert len(load_annotations(path)) == 2


def test_karpathy_split_filter(tmp_path: Path):
    data = {
        "images": [
            {
                "filepath": "val2014",
                "filename": "COCO_val2014_1.jpg",
                "cocoid": 1,
                "split": "test",
                "sentences": [{"raw": "A plane. ", "tokens": ["a", "plane"]}, {"raw": "A jet."}],
            },
            {"filepath": "train2014", "filename": "t.jpg", "cocoid": 2, "split": "train", "sentences": [{"raw": "x"}]},
            {"filename": "flickr.jpg", "imgid": 3, "split": "test", "sentences": [{"tokens": ["two", "dogs"]}]},
        ]
    }
    rows = load_annotations(write_json(tmp_path / "dataset_coco.json", data), media_root="/coco", split="test")
    assert [row["id"] for row in rows] == ["1", "3"]
    assert rows[0]["captions"] == ["A plane.", "A jet."]
    assert rows[0]["image"] == "/coco/val2014/COCO_val2014_1.jpg"
    assert rows[1]["image"] == "/coco/flickr.jpg" and rows[1]["caption"] == "two dogs"
    assert load_annotations(tmp_path / "dataset_coco.json", format="coco", split="train")[0]["id"] == "2"


def test_audiocaps_csv_groups_by_youtube_id(tmp_path: Path):
    csv_text = (
        "audiocap_id,youtube_id,start_time,caption\n"
        "1,abc,30,A dog barks\n"
        "2,xyz,0,Rain falls\n"
        '3,abc,30,"Barking, then silence"\n'
    )
    path = write_text(tmp_path / "test.csv", csv_text)
    rows = load_annotations(path, media_root="/audio", audio_extension=".flac")
    assert rows[0] == {
        "id": "abc",
        "captions": ["A dog barks", "Barking, then silence"],
        "caption": "A dog barks",
        "audio": "/audio/abc.flac",
        "start_time": 30.0,
    }
    assert rows[1]["audio"] == "/audio/xyz.flac"
    assert load_annotations(path)[0]["audio"] == str(tmp_path.resolve() / "abc.wav")


def test_clotho_csv(tmp_path: Path):
    header = "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
    line = '"rain, heavy.wav",rain,heavy rain,a storm,water falls,drops\n'
    rows = load_annotations(write_text(tmp_path / "clotho_captions_evaluation.csv", header + line), media_root="/c")
    assert rows == [
        {
            "id": "rain, heavy.wav",
            "captions": ["rain", "heavy rain", "a storm", "water falls", "drops"],
            "caption": "rain",
            "audio": "/c/rain, heavy.wav",
        }
    ]


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "match"),
    [
        ("a.jsonl", '{"video": "a.mp4"}\n', {}, r"a\.jsonl, row 0: missing 'caption' / 'captions'"),
        ("a.jsonl", '{"video": "a.mp4", "caption": ""}\n', {}, r"row 0: captions must be non-empty strings"),
        ("a.jsonl", '{"video": "a.mp4", "caption": []}\n', {}, r"row 0: expected a caption string"),
        ("a.jsonl", '{"video": "a.mp4", "caption": "x"}\n{oops\n', {}, r"a\.jsonl, line 2: not valid JSON"),
        ("m.json", '[{"video_id": "v0"}]', {}, r"m\.json, row 0: missing 'caption'"),
        ("m.json", '[{"caption": "x"}]', {"format": "msrvtt"}, r"row 0: missing 'video_id' / 'clip_name'"),
        ("m.json", '{"videos": [{"video_id": "v0"}], "sentences": []}', {}, r"videos\[0\]: video 'v0' has no"),
        ("k.json", '{"images": [{"filename": "a.jpg", "sentences": []}]}', {}, r"images\[0\]: missing 'sentences'"),
        ("u.json", '{"foo": 1}', {}, r"u\.json: cannot detect the annotation format"),
        ("u.json", '[{"caption": "x", "image": "a"}]', {"format": "vatex"}, r"unknown annotation format 'vatex'"),
        ("u.json", '[{"caption": "x", "image": "a"}]', {"format": "clotho"}, r"format 'clotho' does not apply"),
        ("u.json", '[{"caption": "x", "image": "a"}]', {"split": "test"}, r"split='test' was requested"),
        ("c.csv", "id,text\n1,x\n", {}, r"c\.csv: unknown CSV header \['id', 'text'\]"),
        ("c.csv", "audiocap_id,youtube_id,start_time,caption\n1,abc,0,\n", {}, r"c\.csv, line 2: captions must be"),
        ("c.csv", "file_name,caption_1\n,x\n", {}, r"c\.csv, line 2: missing 'file_name'"),
    ],
)
def test_malformed_files_name_the_file_and_row(tmp_path: Path, name: str, content: str, kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        load_annotations(write_text(tmp_path / name, content), **kwargs)


def test_missing_file_and_captionless_row(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        load_annotations(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="row 1 \\(id 'b'\\) has no caption"):
        flatten_captions([{"id": "a", "captions": ["x"]}, {"id": "b", "captions": []}])
