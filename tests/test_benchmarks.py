"""The benchmark entry point in its tiny mode, the goal logic and the synthetic release-layout checkpoint (no timed
assertions: only structure and the arithmetic of ratios against goals are checked)."""

import json
import re

import pytest

from benchmarks import bench_conversion, bench_retrieval, run_all
from benchmarks.common import Goal
from modeling_mico.convert_original import _safetensors_header, config_from_original, read_original_shapes


PARITY_WEIGHTS = bench_conversion.ROOT / "tests" / "fixtures" / "parity" / "hub" / "mico_pytorch_model.safetensors"


@pytest.mark.parametrize(
    ("value", "target", "higher_is_better", "met"),
    [
        (1.02, 1.0, True, True),
        (0.98, 1.0, True, False),
        (1.0, 1.0, True, True),
        (0.99, 1.3, False, True),
        (1.31, 1.3, False, False),
        (None, 5.0, True, None),
    ],
)
def test_goal_met(value, target, higher_is_better, met):
    goal = Goal("ratio", value, target, higher_is_better)
    assert goal.met is met
    assert goal.to_dict()["status"] == {True: "met", False: "missed", None: "pending"}[met]


def test_goals_from_results():
    results = {
        "attention": {"rows": [{"tower": "vision ViT-B", "speedup": 0.5}, {"tower": "vision ViT-g", "speedup": 1.1}]},
        "generation": {
            "rows": [{"num_beams": 1, "speedup": 9.0}, {"num_beams": 3, "speedup": 4.0}],
            "steps": [
                {"items": 1, "num_beams": 1, "package_ms": 20.0, "roofline": {"fraction_of_bound": 0.7}},
                {"items": 3, "num_beams": 1, "package_ms": 40.0, "roofline": {"fraction_of_bound": 0.5}},
                {"items": 1, "num_beams": 3, "package_ms": 30.0, "roofline": {"fraction_of_bound": 0.5}},
                {"items": 4, "num_beams": 1, "package_ms": 50.0, "roofline": {"fraction_of_bound": 0.6}},
            ],
        },
        "processing": {"decode": {"speedup": 3.5}},
        "retrieval": {"stages": [{"stage": "decoding", "share": 0.2}, {"stage": "re-ranking", "share": 0.8}]},
        "conversion": {"runs": [{"peak_rss_ratio": 0.99}, {"peak_rss_ratio": 0.3}]},
        "original": {
            "rows": [
                {"path": "greedy caption, batch 1", "speedup": 12.0},
                {"path": "3-beam caption, batch 4", "speedup": 11.0},
                {"path": "ViT 1408 wide", "speedup": 1.1},
                {"path": "video preprocessing, test.mp4, 4 frames", "speedup": 1.7},
                {"path": "video preprocessing, test.mp4, 8 frames", "speedup": 1.4},
            ]
        },
    }
    goals = run_all.evaluate_goals(results)
    assert [goal.value for goal in goals] == [1.1, 4.0, 0.7, 0.6, 0.75, 3.5, 0.2, 11.0, 1.4, 0.99]
    assert [goal.met for goal in goals] == [True, False, True, False, True, True, True, True, False, True]
    assert [goal.unit for goal in goals] == ["x", "x", "", "", "x", "x", "", "x", "x", "x"]

    pending = run_all.evaluate_goals({"generation": {"pending": "not written"}, "conversion": {"skipped": "disk"}})
    assert [goal.met for goal in pending] == [None] * 10
    not_run = "not run (--only)"
    assert [goal.note for goal in pending] == [not_run] + ["not written"] * 4 + [not_run] * 4 + ["disk"]


def test_release_checkpoint_layout_matches_the_original_keys():
    """The synthetic checkpoint has the parity fixture's key set (up to layer indices) and the release's size."""

    def patterns(keys):
        return {re.sub(r"\.\d+\.", ".N.", key) for key in keys}

    original, _ = _safetensors_header(PARITY_WEIGHTS)
    synthetic = bench_conversion.hub_tensor_shapes(bench_conversion.RELEASE)
    assert patterns(synthetic) | {"multimodal_encoder.bert.embeddings.position_ids"} == patterns(original)
    assert round(bench_conversion.checkpoint_bytes(bench_conversion.RELEASE) / 1e9, 2) == 5.24
    assert round(sum(map(_numel, synthetic.values())) / 1e9, 2) == 1.31


def _numel(shape: tuple[int, ...]) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


def test_streamed_checkpoint_is_readable_by_the_converter(tmp_path):
    spec = bench_conversion.SPECS["smoke"]
    weights = bench_conversion.write_hub_checkpoint(tmp_path, spec)
    assert weights.stat().st_size > bench_conversion.checkpoint_bytes(spec)
    hyper_parameters = json.loads((tmp_path / "config.json").read_text())
    assert "bert_config" not in hyper_parameters and "evaclip_model_cfg" not in hyper_parameters
    config = config_from_original(hyper_parameters, read_original_shapes(weights))
    assert config.vision_config.num_attention_heads == spec.vision_width // 88
    assert config.text_config.num_attention_heads == 12
    assert config.projection_dim == spec.projection_dim


def test_entry_point_smoke(tmp_path):
    summary = run_all.main(["--smoke", "--only", "attention,retrieval,conversion", "--output_dir", str(tmp_path)])
    assert summary["mode"] == "smoke"
    for name in ("attention", "retrieval", "conversion", "summary"):
        assert json.loads((tmp_path / f"{name}.json").read_text())
    assert not (tmp_path / "generation.json").exists()
    conversion = json.loads((tmp_path / "conversion.json").read_text())
    if "skipped" not in conversion:
        run = conversion["runs"][0]
        assert run["peak_rss_bytes"] >= run["baseline_rss_bytes"] > 0
    stages = json.loads((tmp_path / "retrieval.json").read_text())["stages"]
    assert [stage["stage"] for stage in stages] == list(bench_retrieval.STAGES)
    markdown = (tmp_path / "RESULTS.md").read_text()
    assert "## Goals" in markdown and "](summary.png)" in markdown
    assert markdown.count("| --- |") >= 4
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    statuses = {goal["name"].split(",")[0]: goal["status"] for goal in summary["goals"]}
    assert statuses["cached vs recompute generation"] == "pending"


def test_roofline_counts_of_a_decoding_step():
    """The BERT-base decoding step over a 4-frame context (1,028 tokens) needs about 0.52 GFLOP and reads about
    0.57 GB in fp32 at batch 1 (weights, context keys/values once per item); beams add rows, not context bytes."""
    from benchmarks import roofline

    shape = dict(hidden=768, intermediate=3072, layers=12, vocab=30522, context_length=1028, cached_tokens=20)
    greedy = roofline.decoding_step_cost(items=1, rows=1, **shape)
    assert round(greedy.flops / 1e9, 2) == 0.52 and round(greedy.bytes / 1e9, 2) == 0.57
    beams = roofline.decoding_step_cost(items=1, rows=3, **shape)
    three_rows = roofline.decoding_step_cost(items=3, rows=3, **shape)
    assert beams.flops == three_rows.flops
    context_bytes = 12 * 2 * 1028 * 768 * 4
    assert three_rows.bytes - beams.bytes == 2 * context_bytes
    bf16 = roofline.decoding_step_cost(items=1, rows=1, value_bytes=2, **shape)
    assert bf16.bytes == pytest.approx(greedy.bytes / 2)

    machine = {"fp32_gflops": 100.0, "read_gb_s": 50.0}
    row = roofline.roofline_row("step", 0.1, greedy, machine)
    assert row["bound_ms"] == pytest.approx(greedy.bytes / 50e9 * 1e3)  # bandwidth-bound at batch 1
    assert row["fraction_of_bound"] == pytest.approx(row["bound_ms"] / 100)


def test_roofline_bound_of_a_whole_caption():
    """A caption's bound: the context's key/value projections (FLOP-bound, 29 GFLOP for BERT-base over 1,028 tokens)
    plus each step at its own bound with one more cached token per step; 40 greedy steps at batch 1 take about 1 s
    at 378 GFLOP/s and 23.4 GB/s (the original needed 6.4 s there: at most 6.1x)."""
    from benchmarks import roofline

    shape = dict(hidden=768, intermediate=3072, layers=12, vocab=30522, context_length=1028)
    machine = {"fp32_gflops": 378.0, "read_gb_s": 23.4}
    projections = roofline.linear_cost(1028, 768, 1536, 4) * 12
    assert round(projections.flops / 1e9) == 29
    first = roofline.caption_bound_seconds(machine, 1, **shape, items=1, rows=1)
    step = roofline.decoding_step_cost(**shape, items=1, rows=1, cached_tokens=1)
    assert first == pytest.approx(projections.flops / 378e9 + step.bytes / 23.4e9)
    caption = roofline.caption_bound_seconds(machine, 40, **shape, items=1, rows=1)
    assert 1.0 < caption < 1.1 and round(6.39 / caption, 1) == 6.1
    beams = roofline.caption_bound_seconds(machine, 40, **shape, items=1, rows=3)
    assert caption < beams < caption * 1.01  # beams add rows, which cost FLOPs, not bytes, at this size


def test_roofline_of_the_attention_rows():
    """Every tower of the attention benchmark gets a cost: ViT blocks from the shape, the text tower with its
    cross-attention to the context."""
    from benchmarks import roofline

    results = {
        "settings": {"context_length": 2056, "text_tokens": 40},
        "rows": [
            {"tower": "vision ViT-B", "shape": "768w/12h/3072mlp", "layers": 2, "batch": 4, "tokens": 257},
            {
                "tower": "text + cross-attention",
                "shape": "768w/12h/3072ffn",
                "layers": 4,
                "batch": 8,
                "tokens": "40 (context 2056)",
            },
        ],
    }
    (vit_row, vit), (_, text) = roofline.attention_rows_costs(results)
    linear = 2 * 4 * 257 * (4 * 768 * 768 + 2 * 768 * 3072)
    assert vit.flops == 2 * (linear + 4 * 4 * 257 * 257 * 768)
    assert text.flops > roofline.encoder_cost(768, 3072, 4, 40, 8).flops
    with pytest.raises(ValueError, match="unrecognised tower shape '768 wide'"):
        roofline.attention_rows_costs({"settings": {"context_length": 0}, "rows": [{**vit_row, "shape": "768 wide"}]})
