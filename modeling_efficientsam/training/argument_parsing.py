"""Recipes and command lines -> the three argument dataclasses of :mod:`.arguments`.

:func:`parse_efficientsam_args` reads, in increasing priority:

1. a flat YAML or JSON recipe given as the first argument (``train.py recipes/quickstart.yaml``);
2. a nested config file of the original guide given with ``--config FILE`` (see
   :mod:`.config_mapping`), and the guide's flags ``--save_dir``, ``--resume`` and ``--device``;
3. ``--key value`` flags.

A recipe key or flag that is no field of the three dataclasses is an error naming it.
``resume_from_checkpoint: last`` (or ``true``) becomes the newest complete checkpoint of output_dir.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from transformers import HfArgumentParser

from .arguments import ARGUMENT_CLASSES, DataArguments, EfficientSamTrainingArguments, ModelArguments

__all__ = ["last_complete_checkpoint", "load_recipe", "parse_efficientsam_args"]


# The original guide's command line: finetune.py --config C --save_dir D [--device cuda] [--resume CKPT]
_GUIDE_FLAG_ALIASES = {"--save_dir": "--output_dir", "--resume": "--resume_from_checkpoint"}


def load_recipe(path: str) -> Dict[str, Any]:
    """Read a flat YAML (``.yaml``/``.yml``) or JSON recipe into a dict (empty file -> {})."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    elif path.endswith(".json"):
        data = json.loads(text)
    else:
        raise ValueError(f"recipe {path}: expected a .yaml, .yml or .json file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path}: expected a mapping of argument names to values, got {type(data).__name__}")
    nested = sorted(k for k, v in data.items() if isinstance(v, dict) and k not in ("model_config", "lr_scheduler_kwargs",
                                                                               "gradient_checkpointing_kwargs", "fsdp_config",
                                                                               "accelerator_config", "deepspeed"))
    if nested:
        raise ValueError(
            f"recipe {path}: recipes are flat 'key: value' files, but {nested} hold sections; a nested config of the "
            "original guide is read with --config FILE"
        )
    return data


def _pop_flag(argv: List[str], flag: str) -> Optional[str]:
    """Remove ``flag VALUE`` or ``flag=VALUE`` from argv and return VALUE (None when absent)."""
    for index, item in enumerate(argv):
        if item == flag:
            if index + 1 >= len(argv):
                raise ValueError(f"{flag} needs a value")
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
            raise ValueError(f"--device {device}: use cpu or cuda (devices are chosen by accelerate launch)")
    return out


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

    Raises ValueError naming any recipe key, guide-config key or flag that is not an argument.
    ``resume_from_checkpoint: true`` (or ``last``) means the newest checkpoint in output_dir.
    """
    from .config_mapping import map_original_config

    argv = _guide_aliases(list(sys.argv[1:] if argv is None else argv))
    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    if argv and not argv[0].startswith("-"):
        recipe_path = argv.pop(0)
        recipe = load_recipe(recipe_path)
        values.update(recipe)
        sources.update({key: recipe_path for key in recipe})
    config_path = _pop_flag(argv, "--config")
    if config_path is not None:
        with open(config_path, encoding="utf-8") as handle:
            mapped = map_original_config(json.load(handle), source=config_path)
        values.update(mapped)
        sources.update({key: config_path for key in mapped})

    parser = HfArgumentParser(ARGUMENT_CLASSES)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        where = ", ".join(f"{key!r} (from {sources[key]})" for key in unknown)
        raise ValueError(f"unknown argument(s) {where}; see `python train.py --help` for the accepted names")
    for action in parser._actions:
        if action.dest in values:
            action.default = _recipe_value_for_argparse(values[action.dest])
            action.required = False
    model_args, data_args, training_args, remaining = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if remaining:
        raise ValueError(f"unknown command-line argument(s) {remaining}; see `python train.py --help`")
    _resolve_resume(training_args)
    return model_args, data_args, training_args


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The newest ``checkpoint-<step>`` folder of ``output_dir`` that was written to the end.

    The Trainer writes ``trainer_state.json`` last, so a folder without it is the remains of a run
    killed while saving and is skipped.
    """
    import re

    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isfile(os.path.join(output_dir, name, "trainer_state.json")):
            steps.append(int(match.group(1)))
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def _resolve_resume(training_args: EfficientSamTrainingArguments) -> None:
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last", "latest"):
        last = last_complete_checkpoint(training_args.output_dir)
        if last is None:
            raise ValueError(f"resume_from_checkpoint={resume}: no complete checkpoint-* folder in {training_args.output_dir}")
        training_args.resume_from_checkpoint = last
    elif isinstance(resume, str) and resume.lower() in ("false", "none", ""):
        training_args.resume_from_checkpoint = None
