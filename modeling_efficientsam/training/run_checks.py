"""Problems a user fixes, found as early as possible and reported on one line.

``train.py`` prints every :class:`TrainingSetupError` as ``error: <message>`` and exits with status 2
(no traceback). The message names the file, folder or argument at fault and ends with ``Fix: ...``.

* :func:`check_output_dir` runs before any expensive work (dataset preparation, embedding caching,
  model loading): ``output_dir`` must be writable, and must not hold the results of an earlier run
  unless this run resumes from one of its checkpoints or ``overwrite_output_dir`` says to replace it.
* :func:`writing_to` turns a full disk (``ENOSPC``, also when ``datasets`` wraps it in a
  ``DatasetGenerationError``) or a folder that refuses writes, met while a step writes a folder, into
  an error naming that folder.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator, List, Optional

__all__ = ["TrainingSetupError", "check_output_dir", "earlier_run_contents", "find_os_error", "writing_to"]

logger = logging.getLogger(__name__)

# What a finished (or checkpointed) run leaves at the top of output_dir. A prepared dataset, an
# embedding cache or TensorBoard logs alone are no results: a new run reuses or adds to them.
RESULT_FILES = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
    "trainer_state.json", "eval_results.json", "train_results.json", "all_results.json",
)
_CHECKPOINT = re.compile(r"checkpoint-\d+")
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class TrainingSetupError(ValueError):
    """A training run cannot start (or go on) because of its inputs or folders; the message says which and the fix."""


def earlier_run_contents(output_dir: str) -> List[str]:
    """Names of the result files and ``checkpoint-*`` folders an earlier run left in ``output_dir``."""
    if not os.path.isdir(output_dir):
        return []
    names = sorted(os.listdir(output_dir))
    files = [name for name in names if name in RESULT_FILES]
    checkpoints = sorted((name for name in names if _CHECKPOINT.fullmatch(name) and os.path.isdir(os.path.join(output_dir, name))),
                         key=lambda name: int(name.split("-")[1]))
    return files + checkpoints


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _check_writable(folder: str, argument: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        reason = error.strerror or str(error)
        raise TrainingSetupError(
            f"{argument} {folder}: cannot write there ({reason}). Fix: choose a writable folder with --{argument}, "
            "or free space / fix the permissions of this one"
        ) from error


def check_output_dir(training_args) -> None:
    """Refuse an ``output_dir`` that this run cannot write, or whose earlier results it would overwrite.

    An ``output_dir`` holding a saved model, results or ``checkpoint-*`` folders is accepted when the
    run resumes from a checkpoint inside it, or with ``overwrite_output_dir``; then the earlier run's
    ``checkpoint-*`` folders are removed (by the process that saves), so that neither
    ``--resume_from_checkpoint last`` nor the checkpoint rotation can take one of them for this run's.
    Call it before any expensive work.
    """
    output_dir = training_args.output_dir
    resume = training_args.resume_from_checkpoint
    resuming_here = isinstance(resume, str) and os.path.isdir(resume) and _inside(resume, output_dir)
    earlier = earlier_run_contents(output_dir)
    if earlier and not resuming_here:
        if not training_args.overwrite_output_dir:
            shown = ", ".join(earlier[:5]) + (", ..." if len(earlier) > 5 else "")
            raise TrainingSetupError(
                f"output_dir {output_dir} already holds an earlier run ({shown}), which this run would overwrite. "
                "Fix: give another --output_dir, continue that run with --resume_from_checkpoint last, or replace it "
                "with --overwrite_output_dir true"
            )
        if training_args.should_save:
            for name in earlier:
                if _CHECKPOINT.fullmatch(name):
                    logger.info("overwrite_output_dir: removing %s of the earlier run", os.path.join(output_dir, name))
                    shutil.rmtree(os.path.join(output_dir, name))
    _check_writable(output_dir, "output_dir")


def find_os_error(error: BaseException, codes) -> Optional[OSError]:
    """The first ``OSError`` with an errno in ``codes`` in ``error``'s chain of causes, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in codes:
            return error
        error = error.__cause__ or error.__context__
    return None


def _where(error: OSError, folder: str) -> str:
    """The file that failed, when the error names one, else the folder being written."""
    return os.fspath(error.filename) if error.filename else folder


@contextmanager
def writing_to(folder: str, argument: str, doing: str) -> Iterator[None]:
    """Turn a full disk or a refused write met while ``doing`` (writing ``folder``, set by ``argument``)
    into a :class:`TrainingSetupError` naming the folder; other errors pass unchanged."""
    try:
        yield
    except TrainingSetupError:
        raise
    except Exception as error:  # noqa: BLE001 - only disk-full and permission errors are converted, the rest re-raised
        full = find_os_error(error, (errno.ENOSPC, errno.EDQUOT))
        if full is not None:
            raise TrainingSetupError(
                f"{folder}: no space left on the device while {doing} (writing {_where(full, folder)}). Fix: free space "
                f"on that disk, or point --{argument} to a disk with room"
            ) from error
        refused = find_os_error(error, _NOT_WRITABLE)
        if refused is not None:
            raise TrainingSetupError(
                f"{folder}: cannot write there while {doing} ({refused.strerror or refused}: {_where(refused, folder)}). "
                f"Fix: fix the folder's permissions, or point --{argument} to a writable folder"
            ) from error
        raise
