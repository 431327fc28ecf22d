"""Safe outputs for every command-line program: atomic writes, no write over an input, explicit overwrites.

A program writes into a hidden temporary sibling of its target (`.<name>.partial-<pid>`) and moves it into place only
when it is complete, so that a kill or an error leaves the previous target (or nothing) - never a half-written file or
directory that still loads. Overwriting replaces the previous target entirely (no stale shard or file survives); a
target that is, contains or lies inside one of the program's inputs is refused, and so is an existing target unless
the caller's overwrite flag is given. Training runs (which write checkpoints as they go) use
`prepare_training_output_dir` instead: it resumes from the last complete checkpoint and never from a replaced run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


logger = logging.getLogger(__name__)

_PARTIAL = re.compile(r"\.(?P<name>.+)\.partial-(?P<pid>\d+)")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last in a checkpoint


def _overlap(target: Path, source: Path) -> str | None:
    """How `target` would touch the input `source`, or `None`."""
    if target == source:
        return "is"
    if source in target.parents:
        return "lies inside"
    if target in source.parents:
        return "contains"
    return None


def check_output_path(
    target: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    flag: str = "--overwrite",
) -> Path:
    """Refuse a `target` that is, contains or lies inside an existing input, and an existing target (a file, or a
    non-empty directory) unless `overwrite`; returns the resolved target. `flag` names the overwrite option."""
    target = Path(target).expanduser().resolve()
    for source in inputs:
        if source is None or not os.path.exists(source):
            continue  # Hub ids and absent optional inputs cannot be written over
        relation = _overlap(target, Path(source).expanduser().resolve())
        if relation:
            raise ValueError(
                f"refusing to write {target}: it {relation} the input {source}; choose an output outside the inputs"
            )
    if target.is_dir() and any(target.iterdir()) or target.exists() and not target.is_dir():
        if not overwrite:
            raise FileExistsError(f"{target} already exists and is not empty; pass {flag} to replace it")
        logger.warning(f"replacing {target} ({flag})")
    return target


def remove_stale_partials(target: Path) -> None:
    """Delete the temporary siblings of `target` left by killed runs (their process is gone)."""
    if not target.parent.is_dir():
        return
    for path in target.parent.iterdir():
        match = _PARTIAL.fullmatch(path.name)
        if not match or match.group("name") != target.name:
            continue
        try:
            os.kill(int(match.group("pid")), 0)
            continue  # a running writer's work in progress
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        logger.warning(f"removing {path}, left by an interrupted run")
        _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def replace_path(source: Path, target: Path) -> None:
    """Move the complete `source` to `target`, removing what `target` held before (a file or a whole directory)."""
    if target.is_dir() and not target.is_symlink():
        retired = target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex[:8]}")
        os.replace(target, retired)
        os.replace(source, target)
        shutil.rmtree(retired)
    else:
        os.replace(source, target)


@contextmanager
def atomic_output(
    target: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    flag: str = "--overwrite",
    directory: bool = True,
) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to write - an empty directory, or with `directory=False` a file path -
    that replaces `target` entirely when the block completes.

    `target` is checked first with `check_output_path` (inputs, existing target, `flag`); on an error (or a kill) the
    previous `target` is untouched, and the leftovers of killed runs are removed by the next run.
    """
    target = check_output_path(target, inputs, overwrite, flag)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    _remove(partial)
    if directory:
        partial.mkdir()
    try:
        yield partial
    except BaseException:
        _remove(partial)
        raise
    replace_path(partial, target)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary sibling (a reader never sees half a file)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether a Trainer checkpoint was saved to the end: its `trainer_state.json` (written last) reads as JSON."""
    try:
        json.loads((Path(path) / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest-step complete `checkpoint-<N>` in `output_dir`; incomplete ones (a kill while saving) are removed
    with a message, so that neither this resume nor a later save sees their files."""
    output_dir = Path(output_dir)
    steps = sorted(
        (int(match.group(1)), path)
        for path in output_dir.iterdir()
        if path.is_dir() and (match := _CHECKPOINT.fullmatch(path.name))
    )
    for _, path in reversed(steps):
        if is_complete_checkpoint(path):
            return str(path)
        logger.warning(f"{path} is incomplete (no readable {TRAINER_STATE}: interrupted while saving); removing it")
        shutil.rmtree(path)
    return None


def require_work(training_args, validation_file: str | None) -> None:
    """Refuse a training script run that was given nothing to do, or evaluation without data to evaluate on."""
    if not training_args.do_train and not training_args.do_eval:
        raise ValueError("nothing to do: pass --do_train and/or --do_eval")
    if training_args.do_eval and not validation_file:
        raise ValueError("--do_eval (or an --eval_strategy) needs --validation_file")


def prepare_training_output_dir(
    training_args,
    overwrite_output_dir: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> str | None:
    """Check a training run's `--output_dir` (`training_args.output_dir`) and return the checkpoint to resume from.

    - an output that is, contains or lies inside an input (model, data or config files) is refused;
    - `overwrite_output_dir` removes everything a previous run left there (checkpoints included): the run starts over;
    - an explicit `--resume_from_checkpoint` must be a complete checkpoint;
    - otherwise training resumes from the last complete `checkpoint-<N>` (incomplete ones are removed with a message);
    - a non-empty `output_dir` without a checkpoint is refused unless `overwrite_output_dir`.
    Call it once the model and data have loaded, so that a bad argument never costs the previous run's outputs. Only
    the process that saves (`should_save`) removes anything, first; the others then find the directory prepared.
    """
    with training_args.main_process_first(desc="preparing the output directory"):
        return _prepare_training_output_dir(
            Path(training_args.output_dir).expanduser().resolve(),
            training_args.do_train,
            training_args.resume_from_checkpoint,
            overwrite_output_dir and training_args.should_save,
            inputs,
            started_over=overwrite_output_dir and not training_args.should_save,
        )


def _prepare_training_output_dir(
    target: Path,
    do_train: bool,
    resume_from_checkpoint: str | None,
    overwrite_output_dir: bool,
    inputs,
    started_over: bool = False,
) -> str | None:
    check_output_path(target, inputs, overwrite=True)
    if started_over and do_train:  # another process replaced the previous run: start from scratch too
        return None
    if not do_train:
        return None
    if resume_from_checkpoint:
        if overwrite_output_dir:
            raise ValueError("--resume_from_checkpoint and --overwrite_output_dir contradict each other; pick one")
        if not is_complete_checkpoint(resume_from_checkpoint):
            raise ValueError(
                f"--resume_from_checkpoint {resume_from_checkpoint} is not a complete checkpoint (no readable "
                f"{TRAINER_STATE})"
            )
        return str(resume_from_checkpoint)
    if not target.is_dir():
        return None
    if overwrite_output_dir:
        logger.warning(f"--overwrite_output_dir: removing the previous run in {target}")
        for path in target.iterdir():
            _remove(path)
        return None
    last = last_complete_checkpoint(target)
    if last is not None:
        logger.warning(f"resuming from {last} (pass --overwrite_output_dir to start over)")
        return last
    if any(target.iterdir()):
        raise FileExistsError(
            f"output directory {target} is not empty and holds no complete checkpoint to resume from; pass "
            "--overwrite_output_dir to replace it"
        )
    return None


__all__ = [
    "atomic_output",
    "check_output_path",
    "is_complete_checkpoint",
    "last_complete_checkpoint",
    "prepare_training_output_dir",
    "remove_stale_partials",
    "replace_path",
    "require_work",
    "write_text_atomic",
]
