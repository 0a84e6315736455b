"""Writing files and folders so that a reader never sees a half-written one, and hashing them.

Every writer of the package goes through here (dataset conversion, embedding cache, the command
lines' results, exports):

* a file is written under a temporary name in its own folder (``NAME.tmp-PID``), flushed to disk and
  renamed over ``NAME`` with ``os.replace``, which is atomic on one file system. The file is created
  with ``open`` like any other, so it gets the usual permissions (0666 minus the umask, 0644 for the
  common umask 022), not the owner-only 0600 of ``tempfile.mkstemp``. A failed write removes its
  temporary file and leaves ``NAME`` as it was.
* a folder is built beside its target and swapped in at the end (:func:`staged_directory`).

A crash can still leave ``*.tmp-PID`` files behind; :func:`remove_partial_writes` clears them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
TEMPORARY_MARKER = ".tmp-"


def temporary_name(path: PathLike) -> str:
    """The name a write to ``path`` uses until it is complete: ``path.tmp-PID``, in the same folder."""
    return f"{os.fspath(path)}{TEMPORARY_MARKER}{os.getpid()}"


def atomic_write(path: PathLike, write: Callable[[str], object]) -> str:
    """Call ``write(temporary_path)``, flush the result to disk, then rename it to ``path``.

    The parent folder is created when missing. Returns ``path`` as a string.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = temporary_name(path)
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    return path


def write_bytes_atomic(path: PathLike, data: bytes) -> str:
    def write(temporary: str) -> None:
        with open(temporary, "wb") as handle:
            handle.write(data)

    return atomic_write(path, write)


def write_json_atomic(path: PathLike, document, indent: Optional[int] = None, **dump_options) -> str:
    """``document`` as UTF-8 JSON with a final newline (``dump_options`` go to ``json.dumps``)."""
    text = json.dumps(document, indent=indent, **dump_options) + "\n"
    return write_bytes_atomic(path, text.encode("utf-8"))


def save_image_atomic(path: PathLike, image, format: str = "PNG") -> str:
    """Save a PIL image (``format`` explicit, since the temporary name has no image extension)."""
    return atomic_write(path, lambda temporary: image.save(temporary, format=format))


def read_json_or_none(path: PathLike) -> Optional[dict]:
    """The JSON document at ``path``; None when the file is missing, or unreadable (with a warning).

    For bookkeeping files that the caller can rebuild (a cache manifest, a conversion report); input
    files that cannot be rebuilt must raise instead.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("ignoring unreadable %s (%s)", path, error)
        return None


def remove_partial_writes(directory: PathLike) -> list:
    """Delete the temporary files an interrupted write left in ``directory``; returns their names."""
    removed = []
    for name in sorted(os.listdir(directory)):
        if TEMPORARY_MARKER in name:
            os.remove(os.path.join(directory, name))
            removed.append(name)
    return removed


def replace_directory(source: PathLike, target: PathLike) -> None:
    """Move the folder ``source`` to ``target``, replacing what is there; ``target`` is never half-written.

    The old ``target`` is first renamed aside (same parent folder), then ``source`` is renamed into
    place, then the old one is deleted.
    """
    source, target = os.fspath(source), os.fspath(target)
    if not os.path.lexists(target):
        os.rename(source, target)
        return
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(os.path.abspath(target)))
    os.rename(target, os.path.join(aside, "previous"))
    os.rename(source, target)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(target: PathLike, merge: bool = False) -> Iterator[Path]:
    """Yield an empty folder beside ``target``; when the block succeeds its content goes to ``target``.

    ``merge=False`` replaces ``target`` as a whole (:func:`replace_directory`); ``merge=True`` moves
    each entry of the staged folder into ``target`` (``os.replace``) and keeps whatever else
    ``target`` holds. If the block raises, ``target`` is left untouched. The staged folder gets the
    usual permissions (it is made with ``os.mkdir`` inside a private work folder).
    """
    target = Path(os.path.abspath(os.fspath(target)))
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}{TEMPORARY_MARKER}", dir=target.parent))
    staged = work / target.name
    try:
        staged.mkdir()
        yield staged
        if merge:
            target.mkdir(exist_ok=True)
            for entry in sorted(staged.iterdir()):
                os.replace(entry, target / entry.name)
        else:
            replace_directory(staged, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def file_sha256(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def json_sha256(document) -> str:
    """SHA-256 of a JSON document in canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


__all__ = [
    "atomic_write",
    "file_sha256",
    "json_sha256",
    "read_json_or_none",
    "remove_partial_writes",
    "replace_directory",
    "save_image_atomic",
    "staged_directory",
    "temporary_name",
    "write_bytes_atomic",
    "write_json_atomic",
]
