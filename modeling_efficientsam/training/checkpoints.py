"""``checkpoint-<step>`` folders of a run: which ones can be resumed from, and which ones rotation may delete.

* :func:`checkpoint_problem` says why a folder cannot be resumed from: its ``trainer_state.json``
  must parse and its model weights must be there and readable (a safetensors header that opens). A
  run killed while saving leaves a half-written folder; resuming from it would end in an error that
  names no file.
* :func:`last_complete_checkpoint` is the newest folder without a problem (what
  ``--resume_from_checkpoint last`` means); newer broken folders are skipped with a warning.
* :func:`rotate_checkpoints` applies ``save_total_limit`` by step number and never deletes the best
  checkpoint (compared as real paths, so a resumed run that spells ``output_dir`` differently keeps it)
  nor the newest, which a run continues from.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Iterable, List, Optional, Tuple

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

__all__ = ["BestAndNewestRotation", "checkpoint_problem", "last_complete_checkpoint", "list_checkpoints", "rotate_checkpoints"]

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
TRAINER_STATE = "trainer_state.json"


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """``(step, path)`` of every ``checkpoint-<step>`` folder of ``output_dir``, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.fullmatch(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _safetensors_problem(path: str) -> Optional[str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt"):
            return None
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type (or OSError) for damaged files
        return f"{path}: the weights cannot be read ({' '.join(str(error).split())})"


def _weights_problem(folder: str) -> Optional[str]:
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return _safetensors_problem(single)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            return f"{index}: the weights index cannot be read ({error})"
        for shard in shards:
            path = os.path.join(folder, shard)
            if not os.path.isfile(path):
                return f"{path}: missing (listed in {index})"
            problem = _safetensors_problem(path)
            if problem is not None:
                return problem
        return None
    pickled = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(pickled):
        return None if os.path.getsize(pickled) > 0 else f"{pickled}: empty file"
    if any(name.startswith("pytorch_model_fsdp") for name in os.listdir(folder)):
        return None  # FSDP's sharded state dict: a folder of distributed-checkpoint files
    return f"{folder}: no model weights (model.safetensors)"


def checkpoint_problem(folder: str) -> Optional[str]:
    """Why ``folder`` cannot be resumed from (a message naming the file), or None when it can."""
    if not os.path.isdir(folder):
        return f"{folder}: no such checkpoint folder"
    state = os.path.join(folder, TRAINER_STATE)
    try:
        with open(state, encoding="utf-8") as handle:
            json.load(handle)
    except FileNotFoundError:
        return f"{state}: missing (the run stopped while saving this checkpoint)"
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"{state}: cannot be read ({error}; the run stopped while writing it?)"
    return _weights_problem(folder)


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The newest ``checkpoint-<step>`` folder of ``output_dir`` that can be resumed from, or None.

    Newer folders that cannot (see :func:`checkpoint_problem`) are skipped with a warning naming the file.
    """
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping %s, which cannot be resumed from: %s", path, problem)
    return None


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def rotate_checkpoints(output_dir: str, save_total_limit: Optional[int], keep: Iterable[Optional[str]] = ()) -> List[str]:
    """Delete the oldest ``checkpoint-*`` folders beyond ``save_total_limit``; return the deleted paths.

    Never deleted: the newest folder (by step) and every folder of ``keep`` (the best checkpoint, the
    one just written). So ``save_total_limit=1`` with a best model keeps two folders when the best is
    not the newest. No limit (None or < 1) deletes nothing.
    """
    if save_total_limit is None or save_total_limit < 1:
        return []
    checkpoints = [path for _, path in list_checkpoints(output_dir)]
    protected = set(checkpoints[-1:])
    for path in keep:
        protected.update(c for c in checkpoints if path is not None and _same_path(c, path))
    excess = len(checkpoints) - max(save_total_limit, len(protected))
    deleted = []
    for path in checkpoints:
        if len(deleted) >= excess:
            break
        if path not in protected:
            logger.info("deleting %s (save_total_limit=%d; the best and the newest checkpoints are kept)", path, save_total_limit)
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted


class BestAndNewestRotation:
    """Mixin for a ``transformers.Trainer``: checkpoint rotation that never deletes the best or the
    newest checkpoint, by step number (see :func:`rotate_checkpoints`)."""

    def train(self, *args, **kwargs):
        """``Trainer.train`` with this trainer's checkpoint rotation.

        Trainer rotates by modification time inside its own save and, with ``save_total_limit=1`` and
        a best model, deletes the newest checkpoint when training ends (the one a continued run needs,
        possibly while an upload reads it). During ``train`` its rotation is off (the limit is held in
        ``checkpoint_limit``; checkpoints' ``training_args.bin`` show None) and :meth:`_save_checkpoint`
        rotates instead.
        """
        self.checkpoint_limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            return super().train(*args, **kwargs)
        finally:
            self.args.save_total_limit = self.checkpoint_limit

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        push = getattr(self, "push_in_progress", None)
        if push is not None and not push.is_done():
            return  # a Hub upload may still read a checkpoint folder: rotate after the next save
        run_dir = self._get_output_dir(trial=trial)
        newest = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        rotate_checkpoints(run_dir, getattr(self, "checkpoint_limit", self.args.save_total_limit),
                           keep=(self.state.best_model_checkpoint, newest))
