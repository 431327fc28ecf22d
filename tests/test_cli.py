"""The command-line layer: every script of examples/ and conversion/ answers --help with its description without
importing torch, Transformers or the package; the Trainer scripts' options parse as before; shell scripts answer
--help; default outputs go under outputs/."""

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_cli
from modeling_mico_cli import (
    HelpFormatter,
    arguments_for,
    help_parser,
    parse_training_args,
    script_parser,
)


REPO = Path(__file__).resolve().parents[1]
SCRIPTS = bench_cli.scripts(REPO)
TRAINER_SCRIPTS = [
    "examples/run_captioning_finetune.py",
    "examples/run_classification.py",
    "examples/run_finetune_peft.py",
    "examples/run_pretrain.py",
]
# Runs every script's --help in one fresh interpreter (one interpreter start instead of one per script): after each,
# which of torch, Transformers and the package are imported. A script that imported torch would show it in its own record and every later one.
PROBE = """
import contextlib, io, json, runpy, sys
HEAVY = ("torch", "transformers", "modeling_mico")
records = {}
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            runpy.run_path(script, run_name="__main__")
            code = None
        except SystemExit as exit:
            code = exit.code
    records[script] = {"code": code, "help": output.getvalue(), "imported": [name for name in HEAVY if name in sys.modules]}
print(json.dumps(records))
"""


def module(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def helps() -> dict[str, dict]:
    completed = subprocess.run(
        [sys.executable, "-c", PROBE, *SCRIPTS], capture_output=True, text=True, cwd=REPO, check=True, timeout=300
    )
    return json.loads(completed.stdout)


def test_every_script_is_covered():
    assert len(SCRIPTS) >= 12 and "examples/summarize_main_job.py" in SCRIPTS and set(TRAINER_SCRIPTS) <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_description_without_importing_torch(helps, script):
    record = helps[script]
    assert record["code"] == 0, record["help"]
    assert record["imported"] == [], f"{script} --help imported {record['imported']}"
    description = ast.get_docstring(ast.parse((REPO / script).read_text())).split("\n\n")[0]
    assert len(description.split()) >= 30, "the description says what the script reads and writes"
    assert record["help"].startswith("usage: ")
    assert flat(description) in flat(record["help"])
    assert not re.search(r"\(default: [^)]*\)\s*\(default:", flat(record["help"])), "a default said twice"
    if script.startswith("examples/"):
        assert "default outputs/" in flat(description), "the description says where the outputs go by default"


def test_examples_keep_their_lines_in_help(helps):
    """Example commands are printed as written (indented, one option group per line), prose is filled."""
    text = helps["examples/run_pretrain.py"]["help"]
    assert (
        "\n    python examples/run_pretrain.py --config_name tiny --train_file outputs/synthetic/train.jsonl \\\n"
        in text
    )
    assert "--help_all" in text and "TrainingArguments" in text
    assert len(text.splitlines()) < 120  # was 655 lines, the TrainingArguments options first


@pytest.mark.parametrize("script", TRAINER_SCRIPTS)
def test_help_lists_exactly_options_the_parser_accepts(script):
    """The --help of a Trainer script (built without Transformers) shows the options `HfArgumentParser` parses, with
    the same defaults and choices."""
    command_line = module(script).COMMAND_LINE
    shown = {action.dest: action for action in help_parser(command_line.doc, command_line.arguments)._actions}
    parsed = {action.dest: action for action in command_line.parser()._actions}
    for dest, action in shown.items():
        if dest in ("help", "help_all"):
            continue
        assert set(action.option_strings) == set(parsed[dest].option_strings)
        assert (action.default, action.choices) == (parsed[dest].default, parsed[dest].choices), dest
        assert action.required == parsed[dest].required, dest


def test_help_all_lists_training_arguments(capsys):
    with pytest.raises(SystemExit, match="^0$"):
        module("examples/run_pretrain.py").COMMAND_LINE.parse(["--help_all"])
    text = capsys.readouterr().out
    own, training = text.split("🤗 TrainingArguments options:")
    assert "\n  --train_shards" in own and "\n  --learning_rate" not in own
    assert "\n  --learning_rate" in training and "\n  --per_device_train_batch_size" in training


def test_training_options_parse_from_the_command_line_and_a_json_file(tmp_path):
    command_line = module("examples/run_pretrain.py").COMMAND_LINE
    argv = ["--config_name", "tiny", "--train_file", "a.jsonl", "--modalities", "video", "audio", "--do_train"]
    model_args, data_args, training_args = command_line.parse(argv)
    assert (model_args.config_name, data_args.train_file, data_args.modalities) == (
        "tiny",
        "a.jsonl",
        ["video", "audio"],
    )
    assert training_args.do_train and training_args.output_dir == "outputs/pretrain"  # not "trainer_output"
    options = tmp_path / "options.json"
    options.write_text(json.dumps({"config_name": "tiny", "train_file": "a.jsonl", "learning_rate": 0.01}))
    _, data_args, training_args = parse_training_args(
        command_line.doc, command_line.arguments, "outputs/x", [str(options)]
    )
    assert (data_args.train_file, training_args.learning_rate, training_args.output_dir) == (
        "a.jsonl",
        0.01,
        "outputs/x",
    )
    given = ["--train_file", "a.jsonl", "--output_dir", str(tmp_path / "run")]
    assert command_line.parse(given)[2].output_dir == str(tmp_path / "run")


def test_classification_refuses_an_unknown_modality_by_name(capsys):
    argv = ["--model_name_or_path", "m", "--train_file", "t", "--modality", "smell"]
    with pytest.raises(SystemExit, match="^2$"):
        module("examples/run_classification.py").COMMAND_LINE.parse(argv)
    assert "argument --modality: invalid choice: 'smell'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "script, argv, option, default",
    [
        ("examples/run_captioning.py", ["--model_name_or_path", "m", "--inputs", "a"], "output_file",
         "outputs/captions.jsonl"),
        ("examples/run_retrieval_eval.py", ["--model_name_or_path", "m", "--test_file", "t"], "output_dir",
         "outputs/retrieval"),
        ("examples/run_zero_shot_classification.py", ["--model_name_or_path", "m", "--inputs", "a"], "output_file",
         "outputs/zero_shot.jsonl"),
        ("examples/run_search.py", ["index", "--model_name_or_path", "m", "--inputs", "a"], "index_dir",
         "outputs/search_index"),
    ],
)  # fmt: skip
def test_default_outputs_are_under_outputs(script, argv, option, default):
    assert getattr(module(script).parse_args(argv), option) == default


def test_default_outputs_of_the_other_scripts():
    assert module("examples/make_synthetic_dataset.py").build_parser().parse_args([]).output_dir == "outputs/synthetic"
    assert module("examples/write_shards.py").build_parser().parse_args(["--train_file", "t"]).output_dir == (
        "outputs/shards"
    )
    for script in TRAINER_SCRIPTS:
        assert module(script).COMMAND_LINE.output_dir.startswith("outputs/")


@pytest.mark.parametrize("script", ["scripts/install.sh", "scripts/test.sh"])
def test_shell_scripts_answer_help_without_running(script):
    completed = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert completed.returncode == 0 and completed.stdout.startswith(f"usage: bash {script}")
    assert len(completed.stdout.split()) >= 30 and completed.stderr == ""


def test_help_formatter_fills_prose_keeps_commands_and_shows_useful_defaults():
    doc = "A description that is long enough to be filled to the width of the terminal by the formatter here.\n\n" \
          "    python run.py --a 1 \\\n        --b 2\n\nA closing note."  # fmt: skip
    parser = script_parser(doc)
    parser.add_argument("--count", type=int, default=3, help="how many")
    parser.add_argument("--name", required=True, help="the name")
    parser.add_argument("--flag", action="store_true", help="a flag")
    parser.add_argument("--path", default=None, help="a path")
    formatter = parser.formatter_class
    assert formatter is HelpFormatter
    text = parser.format_help()
    assert "    python run.py --a 1 \\\n        --b 2\n" in text
    assert "how many (default: 3)" in text and "the name (required)" in text
    assert "a flag\n" in text and "a path\n" in text  # False and None are not shown as defaults


def test_arguments_for_picks_the_options_named_as_the_function_arguments():
    def caption(model, paths, batch_size=8, *, skip_broken=False, **generate_kwargs):
        return None

    options = argparse.Namespace(batch_size=4, skip_broken=True, output_file="x", num_beams=3)
    assert arguments_for(caption, options) == {"batch_size": 4, "skip_broken": True}
    assert arguments_for(caption, {"paths": ["a"], "other": 1}) == {"paths": ["a"]}


def test_script_docstrings_are_required():
    with pytest.raises(ValueError, match="a script needs a docstring"):
        script_parser(None)


def test_help_benchmark_reports_every_script_against_the_goal(monkeypatch):
    monkeypatch.setattr(
        bench_cli, "_seconds", lambda command, root: (0.5 if "--help" in command else 4.0, "usage: x\n")
    )
    results = bench_cli.run(quick=True)
    assert [row["script"] for row in results["rows"]] == SCRIPTS and results["repeats"] == 3
    assert results["goal_met"] and results["baselines_s"]["import modeling_mico"] == 4.0
    text = bench_cli.to_markdown(results)
    assert "| examples/run_pretrain.py | 0.50 | 1 |" in text and "goal < 2 s: met" in text


def test_the_command_line_page_lists_every_script_and_its_commands_run(tmp_path, monkeypatch, capsys):
    """docs/command-line.md: every script is in its table; each command of its bash blocks runs (the --help ones) or
    parses (the JSON options file, written as the page shows it)."""
    import runpy
    import shlex

    page = (REPO / "docs" / "command-line.md").read_text()
    assert all(f"`{script}`" in page for script in SCRIPTS)
    commands = [
        shlex.split(line) for block in re.findall(r"```bash\n(.*?)```", page, re.S) for line in block.splitlines()
    ]
    assert len(commands) == 7
    monkeypatch.chdir(tmp_path)
    for words in commands:
        script = str(REPO / words[1])
        if words[0] == "bash":
            completed = subprocess.run(words[:1] + [script, *words[2:]], capture_output=True, text=True, timeout=60)
            assert completed.returncode == 0 and completed.stdout.startswith("usage: bash"), words
        elif words[-1].endswith(".json"):
            (tmp_path / words[-1]).write_text(re.search(r"`(\{.*?\})`", page, re.S).group(1).replace("\n", " "))
            model_args, data_args, training_args = module(words[1]).COMMAND_LINE.parse(words[2:])
            assert (model_args.config_name, data_args.train_file, training_args.max_steps) == (
                "tiny",
                "outputs/synthetic/train.jsonl",
                50,
            )
        else:
            monkeypatch.setattr(sys, "argv", [script, *words[2:]])
            with pytest.raises(SystemExit, match="^0$"):
                runpy.run_path(script, run_name="__main__")
            assert capsys.readouterr().out.startswith("usage: "), words
