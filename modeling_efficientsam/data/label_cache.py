"""Training targets prepared once per (dataset split, mask size) and read from disk at every epoch.

An object's training target (its mask stretched to the ``mask_size`` square and binarized by area
coverage, :func:`~.masks.resize_mask`) does not change between epochs, so it is computed once and
stored, bit-packed. Point prompts need the object's full-resolution pixels: for them the cache
stores, per object, the mask cut to the smallest window holding the object and its box's pixel
window (see :func:`~.prompts.box_pixel_window`); sampling points in that window and shifting them
back gives exactly the points sampled in the whole mask. With the cache, an epoch decodes no RLE
and touches no full-resolution mask; prompts and jitter are still drawn per (seed, epoch, image).

Building works from the RLE runs themselves, never decoding a full-resolution mask: the target
needs only a summed-area table at the cell edges (:func:`~.masks.coverage_from_prefix_counts`), and
the point window is filled from the runs inside it. The targets equal ``resize_mask(decode_rle(rle))``
bit for bit (tested).

Layout: ``<root>/<first 24 hex digits of the key>/`` with ``object_offsets.npy`` (row -> first
object), ``targets-<m>.npy`` (objects x packed m*m bits) and, when point prompts are used,
``windows.npy`` (objects x [bit offset, row, column, height, width]) and ``window_bits.npy``; a JSON
file per part, written last, marks it complete. The key is a digest of the format version and the
split's identity (its conversion fingerprint, ``datasets``' own fingerprint, row count and image
ids), so an edited, filtered or re-converted split gets a new folder. By default ``<root>`` is
``labels/`` in the saved dataset folder (beside ``embeddings/``).
"""

from __future__ import annotations

import io
import logging
import os
from typing import Optional

import numpy as np

from ..file_utils import json_sha256, read_json_or_none, write_bytes_atomic, write_json_atomic
from .masks import compressed_rle_counts, coverage_edges, coverage_from_prefix_counts, target_from_coverage

logger = logging.getLogger(__name__)

LABEL_FORMAT_VERSION = 1
_METADATA_COLUMNS = ["image_id", "width", "height", "objects"]
_PIECE_CHUNK = 1 << 14  # RLE pieces per step of the prefix-count computation (bounds its memory)


# ------------------------------------------------------------------------------------------------
# Masks from their RLE runs, without decoding them
# ------------------------------------------------------------------------------------------------
def rle_column_pieces(rle: dict) -> tuple:
    """The foreground of a COCO RLE as vertical pieces ``(column, first row, end row)`` (int64 arrays).

    COCO RLE runs alternate background / foreground in column-major order; a run that wraps over
    several columns is split at the column ends. Pieces come sorted by column, then row.
    """
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = np.asarray(counts, dtype=np.int64) if isinstance(counts, list) else compressed_rle_counts(counts)
    ends = np.cumsum(runs)
    starts, stops = ends[0::2][: len(ends) // 2], ends[1::2]
    keep = stops > starts
    starts, stops = starts[keep], stops[keep]
    if height == 0 or width == 0 or starts.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    first_column, last_column = starts // height, (stops - 1) // height
    per_run = last_column - first_column + 1
    run = np.repeat(np.arange(starts.size), per_run)
    column = first_column[run] + (np.arange(run.size) - np.repeat(np.cumsum(per_run) - per_run, per_run))
    top = np.where(column == first_column[run], starts[run] % height, 0)
    bottom = np.where(column == last_column[run], (stops[run] - 1) % height + 1, height)
    return column, top, bottom


def prefix_counts(pieces: tuple, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """``counts[i, j]``: foreground pixels in rows ``< rows[i]`` and columns ``< columns[j]`` (int64)."""
    column, top, bottom = pieces
    # counts per column bin (pixels of columns[j - 1] <= c < columns[j] go to bin j), then summed over bins
    per_bin = np.zeros((len(rows), len(columns) + 1), np.int64)
    bins = np.searchsorted(columns, column, side="right")
    rows = np.asarray(rows, np.int64)[:, None]
    for start in range(0, column.size, _PIECE_CHUNK):
        part = slice(start, start + _PIECE_CHUNK)
        inside = np.minimum(rows, bottom[None, part]) - np.minimum(rows, top[None, part])
        chunk_bins = bins[part]
        first = np.flatnonzero(np.r_[True, chunk_bins[1:] != chunk_bins[:-1]])
        per_bin[:, chunk_bins[first]] += np.add.reduceat(inside, first, axis=1)
    return np.cumsum(per_bin, axis=1)[:, : len(columns)]


def rle_target(rle: dict, mask_size) -> np.ndarray:
    """``resize_mask(decode_rle(rle), mask_size)``, bit for bit, computed from the runs."""
    shape = (int(rle["size"][0]), int(rle["size"][1]))
    rows, columns = coverage_edges(shape, mask_size)
    counts = prefix_counts(rle_column_pieces(rle), rows, columns)
    return target_from_coverage(coverage_from_prefix_counts(counts, rows, columns, shape, mask_size))


def point_window(rle: dict, box) -> tuple:
    """(row, column, mask crop) with the object's pixels and its box's pixel window, from the runs.

    ``sample_positive_points(crop)`` and ``sample_negative_points(crop, box shifted by the window)``,
    shifted back, draw exactly what they draw on the whole mask (same pixel order, same counts).
    """
    from .prompts import box_pixel_window

    height, width = (int(v) for v in rle["size"])
    column, top, bottom = rle_column_pieces(rle)
    row0, row1, col0, col1 = box_pixel_window(box, width, height)
    if row1 > row0 and col1 > col0:
        extents = [(row0, row1, col0, col1)]
    else:
        extents = []
    if column.size:
        extents.append((int(top.min()), int(bottom.max()), int(column.min()), int(column.max()) + 1))
    if not extents:
        return 0, 0, np.zeros((0, 0), bool)
    r0, r1 = min(e[0] for e in extents), max(e[1] for e in extents)
    c0, c1 = min(e[2] for e in extents), max(e[3] for e in extents)
    change = np.zeros((r1 - r0 + 1, c1 - c0), np.int32)
    np.add.at(change, (top - r0, column - c0), 1)
    np.add.at(change, (bottom - r0, column - c0), -1)
    return r0, c0, np.cumsum(change, axis=0)[:-1] > 0


# ------------------------------------------------------------------------------------------------
# The cache on disk
# ------------------------------------------------------------------------------------------------
def label_cache_key(split) -> dict:
    """The identity of a split's labels and its digest under ``"key"``."""
    from .embedding_cache.fingerprint import split_fingerprint

    parts = {
        "format_version": LABEL_FORMAT_VERSION,
        "split": split_fingerprint(split, str(getattr(split, "split", None) or "")),
        "datasets_fingerprint": getattr(split, "_fingerprint", None),
    }
    return {"key": json_sha256(parts), "parts": parts}


def default_label_root(split) -> Optional[str]:
    """``labels/`` in the saved dataset folder holding ``split``; None for a split without files."""
    from .hub_format import is_saved_dataset_folder

    files = [entry["filename"] for entry in getattr(split, "cache_files", [])]
    if not files:
        return None
    split_dir = os.path.dirname(os.path.abspath(files[0]))
    for folder in (os.path.dirname(split_dir), split_dir):
        if is_saved_dataset_folder(folder):
            return os.path.join(folder, "labels")
    return os.path.join(split_dir, "efficientsam_labels")


def _save_array(path: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    write_bytes_atomic(path, buffer.getvalue())


def _pack(mask: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(mask, bool).reshape(-1))


class LabelCache:
    """The stored targets (and point windows) of one split at one mask size.

    ``LabelCache.open_or_build(split, mask_size, root, points=...)`` reuses a complete cache or
    builds the missing parts. ``target(row, position)`` returns the (m, m) float32 target of the
    ``position``-th object of row ``row``; ``window(row, position)`` its point window as (row, column,
    bool crop). Arrays are memory-mapped lazily in the process that reads them, so the object can go
    to DataLoader workers.
    """

    def __init__(self, directory: str, mask_size: int, with_windows: bool):
        self.directory, self.mask_size, self.with_windows = directory, int(mask_size), with_windows
        self._arrays: dict = {}
        self._pid = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"], state["_pid"] = {}, None
        return state

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def open_or_build(cls, split, mask_size: int, root: str, points: bool = False) -> "LabelCache":
        identity = label_cache_key(split)
        directory = os.path.join(root, identity["key"][:24])
        os.makedirs(directory, exist_ok=True)
        metadata = split.select_columns(_METADATA_COLUMNS)
        offsets_path = os.path.join(directory, "object_offsets.npy")
        if _complete(directory, "object_offsets", identity["key"]) is None:
            objects_per_row = [len(objects) for batch in metadata.iter(batch_size=256) for objects in batch["objects"]]
            offsets = np.concatenate([[0], np.cumsum(objects_per_row, dtype=np.int64)])
            _save_array(offsets_path, offsets)
            _mark_complete(directory, "object_offsets", identity, {"rows": len(split), "objects": int(offsets[-1])})
        cache = cls(directory, mask_size, points)
        offsets = cache._array("object_offsets")
        if len(offsets) != len(split) + 1:
            raise ValueError(f"{directory}: the label cache holds {len(offsets) - 1} rows, the split {len(split)}")
        parts = [f"targets-{int(mask_size)}"] + (["windows"] if points else [])
        for part in parts:
            if _complete(directory, part, identity["key"]) is None:
                cache._build(part, metadata, identity, int(offsets[-1]))
        return cache

    def _build(self, part: str, metadata, identity: dict, num_objects: int) -> None:
        logger.info("preparing %s of %d objects in %s (once for this split)", part.split("-")[0], num_objects, self.directory)
        self._arrays, self._pid = {}, None
        if part.startswith("targets"):
            packed = np.zeros((num_objects, -(-self.mask_size * self.mask_size // 8)), np.uint8)
            for index, obj in enumerate(_all_objects(metadata)):
                packed[index] = _pack(rle_target(obj["mask"], self.mask_size))
            _save_array(os.path.join(self.directory, f"{part}.npy"), packed)
        else:
            windows, bits, offset = np.zeros((num_objects, 5), np.int64), [], 0
            for index, obj in enumerate(_all_objects(metadata)):
                row, column, crop = point_window(obj["mask"], obj["box"])
                packed = _pack(crop)
                windows[index] = (offset, row, column, crop.shape[0], crop.shape[1])
                bits.append(packed)
                offset += packed.size
            _save_array(os.path.join(self.directory, "window_bits.npy"),
                        np.concatenate(bits) if bits else np.zeros(0, np.uint8))
            _save_array(os.path.join(self.directory, "windows.npy"), windows)
        _mark_complete(self.directory, part, identity, {"objects": num_objects, "mask_size": self.mask_size})

    # -- reading ------------------------------------------------------------------------------
    def _array(self, name: str) -> np.ndarray:
        if self._pid != os.getpid():
            self._arrays, self._pid = {}, os.getpid()
        if name not in self._arrays:
            self._arrays[name] = np.load(os.path.join(self.directory, f"{name}.npy"), mmap_mode="r", allow_pickle=False)
        return self._arrays[name]

    def _object_index(self, row: int, position: int, count: int) -> int:
        offsets = self._array("object_offsets")
        start, stop = int(offsets[row]), int(offsets[row + 1])
        if stop - start != count:
            raise ValueError(f"{self.directory}: row {row} has {stop - start} objects in the label cache but "
                             f"{count} in the dataset; the split changed without a new fingerprint")
        return start + position

    def target(self, row: int, position: int, count: int) -> np.ndarray:
        """The (m, m) float32 target of object ``position`` of ``row`` (``count`` objects in the row)."""
        bits = self._array(f"targets-{self.mask_size}")[self._object_index(row, position, count)]
        size = self.mask_size * self.mask_size
        return np.unpackbits(bits, count=size).reshape(self.mask_size, self.mask_size).astype(np.float32)

    def window(self, row: int, position: int, count: int) -> tuple:
        """(row, column, bool crop): the object's point window (see :func:`point_window`)."""
        offset, top, left, height, width = (int(v) for v in self._array("windows")[self._object_index(row, position, count)])
        bits = self._array("window_bits")[offset : offset + -(-height * width // 8)]
        return top, left, np.unpackbits(bits, count=height * width).reshape(height, width).astype(bool)


def open_label_cache(split, mask_size: int, label_cache="auto", points: bool = False) -> Optional[LabelCache]:
    """The label cache a training dataset reads, or None (then targets are computed per item).

    ``label_cache``: ``"auto"`` (``labels/`` in the saved dataset folder, see :func:`default_label_root`;
    a split without files computes per item), a folder to keep the caches in, or False. A folder
    that cannot be written falls back to computing per item, with a warning.
    """
    if label_cache is False or label_cache is None:
        return None
    root = default_label_root(split) if label_cache == "auto" else os.fspath(label_cache)
    if root is None:
        return None
    try:
        return LabelCache.open_or_build(split, mask_size, root, points=points)
    except OSError as error:
        logger.warning("cannot keep training targets in %s (%s); computing them for every item instead", root, error)
        return None


def _all_objects(metadata):
    """Every object of every row, in row order (read a batch of rows at a time)."""
    for batch in metadata.iter(batch_size=256):
        for objects in batch["objects"]:
            yield from objects


def _complete(directory: str, part: str, key: str) -> Optional[dict]:
    document = read_json_or_none(os.path.join(directory, f"{part}.json"))
    if document is None or document.get("key") != key or not os.path.isfile(os.path.join(directory, f"{part}.npy")):
        return None
    return document


def _mark_complete(directory: str, part: str, identity: dict, details: dict) -> None:
    write_json_atomic(os.path.join(directory, f"{part}.json"), {**identity, **details}, indent=1, sort_keys=True)


__all__ = ["LABEL_FORMAT_VERSION", "LabelCache", "default_label_root", "label_cache_key", "open_label_cache",
           "point_window", "prefix_counts", "rle_column_pieces", "rle_target"]
