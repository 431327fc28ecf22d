"""The command-line layer of the scripts in `examples/` and `conversion/`: their shared options and parsers.

`--help` of every script answers in well under a second because nothing here imports torch, Transformers' models or
`modeling_mico` (whose import registers the MiCo classes with the Auto classes, which loads torch: seconds). This is
why the module is a package of its own rather than `modeling_mico.cli`: importing a submodule runs its package's
`__init__` first. The scripts parse their arguments with the helpers below and import the library afterwards.

- `script_parser`: an `argparse` parser whose help leads with the script's description (the first paragraph of its
  docstring), lists the options with their defaults and ends with the rest of the docstring (example commands).
- `parse_training_args` (or `TrainerScript.parse`): the Trainer scripts' parser. `--help` shows the description and the script's own options
  (the dataclasses given) without importing torch; `--help_all` adds every option of 🤗 `TrainingArguments`;
  anything else is parsed by `HfArgumentParser` into the dataclasses and `TrainingArguments`, from the command line
  or from a single JSON file, with `--output_dir` defaulting under `outputs/`.
- The option dataclasses the Trainer scripts share (`ModelArguments`, `DataArguments`, `PretrainingDataArguments`,
  `LoraArguments`, `FinetuneLoraArguments`).
- `arguments_for`: the parsed options named as the keyword arguments of a library function.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints


OUTPUT_ROOT = "outputs"  # default outputs go here (relative to the working directory; git-ignored in the checkout)
HELP_ALL = ("--help_all", "--help-all")
TRAINING_EPILOG = (
    "Every option of 🤗 TrainingArguments is accepted too (--output_dir, --do_train, --do_eval, --max_steps, "
    "--num_train_epochs, --per_device_train_batch_size, --learning_rate, --warmup_steps, --eval_strategy, "
    "--save_strategy, --logging_steps, --seed, --report_to, --push_to_hub, ...); --help_all lists them all. A single "
    "JSON file of options (`script.py options.json`) replaces the command line."
)


def default_output(name: str) -> str:
    """Where a script writes `name` unless told otherwise: `outputs/<name>`."""
    return f"{OUTPUT_ROOT}/{name}"


class HelpFormatter(argparse.HelpFormatter):
    """Shows the defaults that say something (not `None`, `False`, `[]` or suppressed), fills prose paragraphs to the
    terminal's width and keeps indented lines (example commands) and lists as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        unsaid = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
        if action.required:
            return f"{help_text} (required)"
        if unsaid or "%(default)" in help_text or "(default:" in help_text:  # said already
            return help_text
        return f"{help_text} (default: %(default)s)"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in re.split(r"\n\s*\n", text.strip("\n")):
            if any(line.startswith((" ", "-", "*")) for line in paragraph.splitlines()):  # commands, lists
                paragraphs.append(textwrap.indent(paragraph, indent))
            else:
                words = " ".join(paragraph.split())
                paragraphs.append(
                    textwrap.fill(
                        words, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
                    )
                )
        return "\n\n".join(paragraphs)


def split_docstring(doc: str | None) -> tuple[str, str]:
    """A script docstring's first paragraph (the description) and the rest (examples and notes)."""
    if not doc:
        raise ValueError("a script needs a docstring: its first paragraph is the description --help prints")
    description, _, rest = doc.strip().partition("\n\n")
    return description, rest


def script_parser(doc: str | None, epilog: str = "", **kwargs: Any) -> argparse.ArgumentParser:
    """An `argparse` parser for a script whose docstring is `doc`: --help prints its first paragraph, the options with
    their defaults, then the rest of `doc` and `epilog`."""
    description, rest = split_docstring(doc)
    epilog = "\n\n".join(part for part in (rest, epilog) if part)
    return argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=HelpFormatter, **kwargs)


def arguments_for(function: Callable, options: argparse.Namespace | dict[str, Any]) -> dict[str, Any]:
    """The entries of `options` named as keyword parameters of `function` (the scripts name their options after the
    arguments of the library function they call, so that no call lists them one by one)."""
    options = vars(options) if isinstance(options, argparse.Namespace) else options
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {name for name, parameter in inspect.signature(function).parameters.items() if parameter.kind in keyword}
    return {name: value for name, value in options.items() if name in names}


# --------------------------------------------------------------------------------------------------------------------
# Trainer scripts
# --------------------------------------------------------------------------------------------------------------------


USAGE = "%(prog)s [script options] [TrainingArguments options] | %(prog)s OPTIONS.json"


def training_parser(doc: str | None, dataclass_types: Sequence[type], output_dir: str):
    """The full parser of a Trainer script (an `HfArgumentParser`): its own dataclasses, then `TrainingArguments`
    (whose import loads torch), with `--output_dir` defaulting to `output_dir`."""
    from transformers import HfArgumentParser, TrainingArguments

    description, rest = split_docstring(doc)
    parser = HfArgumentParser(
        [*dataclass_types, TrainingArguments],
        description=description,
        epilog=f"{rest}\n\n{TRAINING_EPILOG}",
        formatter_class=HelpFormatter,
        usage=USAGE,
    )
    parser.set_defaults(output_dir=output_dir)
    return parser


def parse_training_args(
    doc: str | None, dataclass_types: Sequence[type], output_dir: str, argv: Sequence[str] | None = None
) -> tuple:
    """Parse a Trainer script's command line `argv` (default: `sys.argv[1:]`) into instances of `dataclass_types` and
    `TrainingArguments`, in that order.

    `-h`/`--help` prints the script's description (`doc`'s first paragraph), its own options and its examples, and
    exits without importing torch or Transformers; `--help_all` prints the `TrainingArguments` options too. A single
    argument ending in `.json` is a file of options. `--output_dir` defaults to `output_dir`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(argument in HELP_ALL for argument in argv):
        from transformers import HfArgumentParser, TrainingArguments

        print(help_parser(doc, dataclass_types).format_help().rstrip())
        training = HfArgumentParser(TrainingArguments, add_help=False, usage=argparse.SUPPRESS)
        training.set_defaults(output_dir=output_dir)
        print("\n🤗 TrainingArguments " + training.format_help().lstrip())
        raise SystemExit(0)
    if any(argument in ("-h", "--help") for argument in argv):
        help_parser(doc, dataclass_types).print_help()
        raise SystemExit(0)
    parser = training_parser(doc, dataclass_types, output_dir)
    if len(argv) == 1 and argv[0].endswith(".json"):
        options = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
        return parser.parse_dict({"output_dir": output_dir, **options})
    return parser.parse_args_into_dataclasses(args=argv)


def help_parser(doc: str | None, dataclass_types: Sequence[type]) -> argparse.ArgumentParser:
    """A parser that only shows the --help of a Trainer script: its description, the options of `dataclass_types`
    (named, typed and documented as `HfArgumentParser` reads them; built with `argparse` alone, because importing
    Transformers takes about a second) and its examples. `training_parser` parses."""
    parser = script_parser(doc, TRAINING_EPILOG, usage=USAGE)
    for dataclass_type in dataclass_types:
        hints = get_type_hints(dataclass_type)
        for option in fields(dataclass_type):
            names = [f"--{option.name}", *([f"--{option.name.replace('_', '-')}"] if "_" in option.name else [])]
            required = option.default is MISSING and option.default_factory is MISSING
            default = None if required else option.default_factory() if option.default is MISSING else option.default
            kwargs: dict[str, Any] = {**option.metadata, "default": default, "required": required}
            if isinstance(default, bool):
                kwargs["action"] = "store_true"
            elif any(get_origin(hint) is list for hint in (hints[option.name], *get_args(hints[option.name]))):
                kwargs["nargs"] = "+"
            parser.add_argument(*names, **kwargs)
    parser.add_argument("--help_all", "--help-all", action="store_true", help="list the TrainingArguments options too")
    return parser


@dataclass(frozen=True)
class TrainerScript:
    """The command line of a Trainer script: its docstring (`__doc__`), its option dataclasses and the name of its
    default output folder under `outputs/`."""

    doc: str | None
    arguments: tuple[type, ...]
    output_name: str

    @property
    def output_dir(self) -> str:
        return default_output(self.output_name)

    def parse(self, argv: Sequence[str] | None = None) -> tuple:
        """`parse_training_args`: instances of `arguments`, then `TrainingArguments`."""
        return parse_training_args(self.doc, self.arguments, self.output_dir, argv)

    def parser(self):
        """`training_parser`: the full `HfArgumentParser` (imports torch)."""
        return training_parser(self.doc, self.arguments, self.output_dir)


# --------------------------------------------------------------------------------------------------------------------
# Options the Trainer scripts share (HfArgumentParser dataclasses)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """The checkpoint a script starts from."""

    model_name_or_path: str = field(
        metadata={"help": "the MiCo checkpoint to start from: a directory, a Hub repository or an original checkpoint"}
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa or flash_attention_2"})

    def from_pretrained(self, model_class: Any, **kwargs: Any) -> Any:
        """`model_class.from_pretrained(model_name_or_path, **kwargs)` with the chosen attention implementation."""
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        return model_class.from_pretrained(self.model_name_or_path, **kwargs)


@dataclass
class DataArguments:
    """The training and evaluation data of a Trainer script, and whether to start its output folder over."""

    train_file: str = field(
        metadata={
            "help": "training data: an annotation file (.jsonl, .json, .csv, .parquet; classification: or a folder)"
        }
    )
    validation_file: str | None = field(default=None, metadata={"help": "the same, for evaluation (--do_eval)"})
    num_frames: int | None = field(default=None, metadata={"help": "video frames sampled per clip"})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "remove everything in --output_dir (earlier checkpoints too) and train from scratch"},
    )


@dataclass
class PretrainingDataArguments(DataArguments):
    """`DataArguments` and the annotation columns the pretraining collator loads."""

    modalities: list[str] | None = field(
        default=None,
        metadata={
            "help": "annotation columns to load: media columns of the model's modalities (image or video, not both) "
            "and subtitle (default: one column per encoder, videos rather than images, and subtitle)"
        },
    )


@dataclass
class LoraArguments:
    """The LoRA adapter's shape."""

    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})


@dataclass
class FinetuneLoraArguments(LoraArguments):
    """The fine-tuning scripts' choice between every weight and a LoRA adapter."""

    use_peft: bool = field(
        default=False, metadata={"help": "train a LoRA adapter (merged into the saved model) instead of every weight"}
    )

    def wrap(self, model: Any, tower: str, modules_to_save: Sequence[str] = ()) -> Any:
        """`model` with a LoRA adapter on `tower` (`peft_utils.build_peft_config`) and `modules_to_save` trained in
        full, when `use_peft`; else `model`."""
        if not self.use_peft:
            return model
        from modeling_mico.peft_utils import build_peft_config, build_peft_model

        config = build_peft_config(tower, self.lora_r, self.lora_alpha, self.lora_dropout)
        config.modules_to_save = list(modules_to_save) or None
        model = build_peft_model(model, config)
        model.print_trainable_parameters()
        return model


__all__ = [
    "OUTPUT_ROOT",
    "DataArguments",
    "FinetuneLoraArguments",
    "HelpFormatter",
    "LoraArguments",
    "ModelArguments",
    "PretrainingDataArguments",
    "TrainerScript",
    "arguments_for",
    "default_output",
    "help_parser",
    "parse_training_args",
    "script_parser",
    "split_docstring",
    "training_parser",
]
