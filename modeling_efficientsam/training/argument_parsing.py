"""Recipes and command lines -> the three argument dataclasses of :mod:`.arguments`.

:func:`parse_efficientsam_args` reads, in increasing priority:

1. a flat YAML or JSON recipe given as the first argument (``train.py recipes/quickstart.yaml``);
2. a nested config file of the original guide given with ``--config FILE`` (see
   :mod:`.config_mapping`), and the guide's flags ``--save_dir``, ``--resume`` and ``--device``;
3. ``--key value`` flags.

A recipe key or flag that is no field of the three dataclasses is an error naming it, and so is an
abbreviated flag (``--learning_rat``: abbreviations are off). Every problem a user fixes (a missing
or malformed recipe or config file, an unknown key, a value out of range, nothing to resume from) is
a :class:`~.run_checks.TrainingSetupError` naming the file or argument and the fix.
``resume_from_checkpoint: last`` (or ``true``) becomes the newest complete checkpoint of output_dir
(:func:`~.checkpoints.last_complete_checkpoint`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from transformers import HfArgumentParser

from .arguments import ARGUMENT_CLASSES, DataArguments, EfficientSamTrainingArguments, ModelArguments
from .checkpoints import checkpoint_problem, last_complete_checkpoint
from .run_checks import TrainingSetupError

__all__ = ["argument_parser", "last_complete_checkpoint", "load_recipe", "parse_efficientsam_args"]

RECIPE_FIX = "Fix: check the path (the recipes are listed in recipes/README.md)"


# The original guide's command line: finetune.py --config C --save_dir D [--device cuda] [--resume CKPT]
_GUIDE_FLAG_ALIASES = {"--save_dir": "--output_dir", "--resume": "--resume_from_checkpoint"}


def _read_text(path: str, what: str, fix: str) -> str:
    """The UTF-8 text of ``path``; a missing or unreadable file is a one-line error naming ``what``."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError as error:
        raise TrainingSetupError(f"{what}: no such file. {fix}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise TrainingSetupError(f"{what}: cannot be read ({error}). {fix}") from error


def load_recipe(path: str) -> Dict[str, Any]:
    """Read a flat YAML (``.yaml``/``.yml``) or JSON recipe into a dict (empty file -> {}).

    Raises :class:`TrainingSetupError` naming the file for a missing or unreadable file, a YAML / JSON
    syntax error (with its line and column) and a recipe that is not a flat mapping.
    """
    if not path.endswith((".yaml", ".yml", ".json")):
        raise TrainingSetupError(f"recipe {path}: expected a .yaml, .yml or .json file. {RECIPE_FIX}")
    text = _read_text(path, f"recipe {path}", RECIPE_FIX)
    if path.endswith(".json"):
        data = _parse_json(text, f"recipe {path}")
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or " ".join(str(error).split())
            raise TrainingSetupError(
                f"recipe {path}: not valid YAML ({problem}{where}). Fix: write one flat 'key: value' line per "
                "argument (see recipes/README.md)"
            ) from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainingSetupError(
            f"recipe {path}: expected a mapping of argument names to values, got {type(data).__name__}. "
            "Fix: write one flat 'key: value' line per argument"
        )
    nested = sorted(k for k, v in data.items() if isinstance(v, dict) and k not in ("model_config", "lr_scheduler_kwargs",
                                                                               "gradient_checkpointing_kwargs", "fsdp_config",
                                                                               "accelerator_config", "deepspeed"))
    if nested:
        raise TrainingSetupError(
            f"recipe {path}: recipes are flat 'key: value' files, but {nested} hold sections. Fix: flatten them; a "
            "nested config of the original guide is read with --config FILE"
        )
    return data


def _parse_json(text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise TrainingSetupError(
            f"{what}: not valid JSON ({error.msg}: line {error.lineno}, column {error.colno}; "
            "is the file cut short?). Fix: repair or restore the file"
        ) from error


def _read_guide_config(path: str) -> Dict[str, Any]:
    """The original guide's nested JSON config given with --config, mapped to our argument names."""
    from .config_mapping import map_original_config

    text = _read_text(path, f"--config {path}", "Fix: check the path of the guide's JSON config")
    try:
        return map_original_config(_parse_json(text, f"--config {path}"), source=path)
    except TrainingSetupError:
        raise
    except ValueError as error:
        raise TrainingSetupError(str(error)) from error


class _ArgumentParser(HfArgumentParser):
    """HfArgumentParser that raises TrainingSetupError instead of printing the (long) usage and exiting."""

    def error(self, message):
        raise TrainingSetupError(f"{message}. Fix: see `python train.py --help` for the accepted names and values")


def argument_parser() -> HfArgumentParser:
    """The parser of train.py's three dataclasses; flags must be spelled in full (no abbreviations)."""
    return _ArgumentParser(ARGUMENT_CLASSES, allow_abbrev=False)


def _named_argument(message: str, names) -> Optional[str]:
    """The first argument name that ``message`` mentions (``--name`` or ``name``), if any."""
    found = [(match.start(), match.group(1)) for match in re.finditer(r"(?<![\w])-{0,2}([a-z][a-z0-9_]*)", message)
             if match.group(1) in names]
    return min(found)[1] if found else None


def _with_source(error: Exception, names, sources: Dict[str, str], argv: Sequence[str], recipe: Optional[str]) -> str:
    """``error``'s message plus where the argument it names was set (recipe, --config file or command line)."""
    message = " ".join(str(error).split())
    message, _, fix = message.partition(". Fix: ")
    name = _named_argument(message, names)
    if name is not None and any(item == f"--{name}" or item.startswith(f"--{name}=") for item in argv):
        where = "set on the command line"
    elif name is not None and name in sources:
        where = f"set in {sources[name]}"
    elif recipe is not None:
        where = f"recipe {recipe}"
    else:
        where = None
    if where and where not in message:
        message = f"{message} ({where})"
    default_fix = f"set {name} to an accepted value" if name and message.startswith(name) else "correct the arguments named above"
    return f"{message}. Fix: {fix or default_fix + ' (see `python train.py --help`)'}"


def _pop_flag(argv: List[str], flag: str) -> Optional[str]:
    """Remove ``flag VALUE`` or ``flag=VALUE`` from argv and return VALUE (None when absent)."""
    for index, item in enumerate(argv):
        if item == flag:
            if index + 1 >= len(argv):
                raise TrainingSetupError(f"{flag} needs a value. Fix: give it one ({flag} VALUE)")
            value = argv[index + 1]
            del argv[index:index + 2]
            return value
        if item.startswith(flag + "="):
            del argv[index]
            return item.split("=", 1)[1]
    return None


def _guide_aliases(argv: List[str]) -> List[str]:
    out = []
    for item in argv:
        name, eq, value = item.partition("=")
        if name in _GUIDE_FLAG_ALIASES:
            item = _GUIDE_FLAG_ALIASES[name] + (eq + value if eq else "")
        out.append(item)
    device = _pop_flag(out, "--device")
    if device is not None:
        if device.startswith("cpu"):
            out += ["--use_cpu", "true"]
        elif not device.startswith(("cuda", "gpu")):
            raise TrainingSetupError(f"--device {device}: unknown device. Fix: use cpu or cuda (devices are chosen by accelerate launch)")
    return out


# The ways to give a run its data: one on the command line replaces the recipe's (flags override the recipe).
DATA_SOURCES = (
    ("dataset_name", "dataset_revision"),
    ("dataset_path",),
    ("train_annotations", "train_images", "validation_annotations", "validation_images"),
)


def _given_on_command_line(argv: Sequence[str], name: str) -> bool:
    """Whether ``--name VALUE`` (or ``--name=VALUE``) is in argv with a VALUE other than none / null / empty."""
    for index, item in enumerate(argv):
        for spelling in (f"--{name}", f"--{name.replace('_', '-')}"):
            if item == spelling:
                value = argv[index + 1] if index + 1 < len(argv) else ""
            elif item.startswith(spelling + "="):
                value = item.split("=", 1)[1]
            else:
                continue
            if value.strip().lower() not in ("", "none", "null"):
                return True
    return False


def _drop_replaced_data_sources(values: Dict[str, Any], argv: Sequence[str]) -> None:
    """A data source given as flags (``--dataset_name ...``) replaces the one the recipe names."""
    chosen = [group for group in DATA_SOURCES if any(_given_on_command_line(argv, name) for name in group)]
    if len(chosen) != 1:
        return  # none given, or several: the dataclass refuses a mix with a clear message
    for group in DATA_SOURCES:
        if group is not chosen[0]:
            for name in group:
                values.pop(name, None)


def _recipe_value_for_argparse(value):
    # Scalars become strings so argparse type-checks them exactly like command-line values.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return value


def parse_efficientsam_args(
    argv: Optional[Sequence[str]] = None,
) -> Tuple[ModelArguments, DataArguments, EfficientSamTrainingArguments]:
    """Parse ``[RECIPE] [--config GUIDE_JSON] [--key value ...]`` into the three dataclasses.

    Raises :class:`TrainingSetupError` (a ValueError) naming any recipe key, guide-config key or
    flag that is not an argument, an abbreviated flag, a value out of range (with the file that set
    it) and a missing or malformed recipe / config file.
    ``resume_from_checkpoint: true`` (or ``last``) means the newest complete checkpoint in output_dir.
    """
    argv = _guide_aliases(list(sys.argv[1:] if argv is None else argv))
    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    recipe_path = None
    if argv and not argv[0].startswith("-"):
        recipe_path = argv.pop(0)
        recipe = load_recipe(recipe_path)
        values.update(recipe)
        sources.update({key: recipe_path for key in recipe})
    config_path = _pop_flag(argv, "--config")
    if config_path is not None:
        mapped = _read_guide_config(config_path)
        values.update(mapped)
        sources.update({key: config_path for key in mapped})

    _drop_replaced_data_sources(values, argv)
    parser = argument_parser()
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        where = ", ".join(f"{key!r} (from {sources[key]})" for key in unknown)
        raise TrainingSetupError(f"unknown argument(s) {where}. Fix: correct the name; `python train.py --help` lists the accepted names")
    for action in parser._actions:
        if action.dest in values:
            action.default = _recipe_value_for_argparse(values[action.dest])
            action.required = False
    try:
        model_args, data_args, training_args, remaining = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True
        )
    except TrainingSetupError as error:
        raise TrainingSetupError(_with_source(error, known, sources, argv, recipe_path)) from error
    except (ValueError, TypeError) as error:  # range checks of the dataclasses' __post_init__
        raise TrainingSetupError(_with_source(error, known, sources, argv, recipe_path)) from error
    if remaining:
        raise TrainingSetupError(
            f"unknown command-line argument(s) {remaining}. Fix: spell each flag in full (abbreviations are not "
            "accepted); `python train.py --help` lists the accepted names"
        )
    _resolve_resume(training_args)
    return model_args, data_args, training_args


def _resolve_resume(training_args: EfficientSamTrainingArguments) -> None:
    """``last`` / ``true`` -> the newest complete checkpoint of output_dir; a folder given -> checked to be complete."""
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last", "latest"):
        last = last_complete_checkpoint(training_args.output_dir)
        if last is None:
            broken = [name for name in sorted(os.listdir(training_args.output_dir)) if name.startswith("checkpoint-")] \
                if os.path.isdir(training_args.output_dir) else []
            found = f" (only incomplete ones: {', '.join(broken)})" if broken else ""
            raise TrainingSetupError(
                f"--resume_from_checkpoint {resume}: no complete checkpoint-* folder in {training_args.output_dir}{found}. "
                "Fix: start the run without --resume_from_checkpoint, or check --output_dir"
            )
        training_args.resume_from_checkpoint = last
    elif isinstance(resume, str) and resume.lower() in ("false", "none", ""):
        training_args.resume_from_checkpoint = None
    elif isinstance(resume, str):
        problem = checkpoint_problem(resume)
        if problem is not None:
            raise TrainingSetupError(
                f"--resume_from_checkpoint {resume}: cannot resume from it: {problem}. Fix: give a complete "
                "checkpoint-* folder, or 'last' for the newest complete one of output_dir"
            )
