"""Binary masks: COCO RLE decoding and the resize to the model's low-resolution target frame.

The model sees the image stretched (not aspect-preserving) to a square, and predicts
``mask_size x mask_size`` logits for that square. The target mask is stretched the same way by
exact area averaging: every low-resolution cell covers a rectangle of ``H / mask_size`` by
``W / mask_size`` source pixels (fractional at the borders), and its value is the fraction of that
rectangle covered by the mask, computed exactly from a summed-area table. A cell is foreground
when its coverage is at least 0.5. A non-empty mask never becomes empty: if no cell reaches 0.5
(an object smaller than half a cell), the cell(s) with the largest coverage are set.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def compressed_rle_counts(counts) -> np.ndarray:
    """The run lengths held by a COCO compressed RLE string (str or bytes), as int64.

    ``pycocotools`` reads these strings without any check (a corrupt one yields nonsense areas and
    boxes, or uninitialised pixels on decoding), so conversion checks them here first. The format is
    the one of ``maskApi.c`` (``rleToString`` / ``rleFrString``): each value is written in groups of 5
    bits as characters ``chr(48 + c)``, bit 0x20 meaning "more groups follow" and bit 0x10 of the last
    group the sign; from the fourth value on, a value is stored as its difference from the value two
    places before. Raises ``ValueError`` naming what is wrong: a character outside ``'0'..'o'``, a
    truncated last value, or a value too long to be a run length.
    """
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("compressed RLE counts hold a non-ASCII character") from None
    codes = np.frombuffer(bytes(counts), dtype=np.uint8).astype(np.int64) - 48
    if codes.size == 0:
        return np.zeros(0, dtype=np.int64)
    bad = np.flatnonzero((codes < 0) | (codes > 63))
    if bad.size:
        position = int(bad[0])
        raise ValueError(f"compressed RLE counts hold the character {chr(int(codes[position]) + 48)!r} at position "
                         f"{position}; only '0' to 'o' occur in pycocotools' encoding")
    last = (codes & 0x20) == 0  # the final 5-bit group of a value
    if not last[-1]:
        raise ValueError("compressed RLE counts end in the middle of a value (the string is truncated)")
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 7:  # 7 groups = 35 bits hold any 32-bit run length difference
        raise ValueError(f"compressed RLE counts hold a value of {int(lengths.max())} characters, longer than any run length")
    shifts = 5 * (np.arange(codes.size) - np.repeat(starts, lengths))
    values = np.add.reduceat((codes & 0x1F) << shifts, starts)
    negative = (codes[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * lengths[negative])
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])  # value i >= 3 is stored relative to value i - 2
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def rle_problem(rle: dict, height: int, width: int):
    """Why ``rle`` (compressed or uncompressed COCO RLE) is not a valid ``height x width`` mask, or None.

    Checked: ``size`` is ``[height, width]``; the counts are well formed, non-negative, and add up to
    exactly ``height * width`` pixels.
    """
    size = rle.get("size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(v, (int, float, np.integer)) and not isinstance(v, bool) and float(v).is_integer() for v in size)):
        return f'RLE "size" must be [height, width], found {size!r}'
    if [int(size[0]), int(size[1])] != [height, width]:
        return f"RLE size {list(size)} differs from the image size [height, width] = [{height}, {width}]"
    counts = rle.get("counts")
    if isinstance(counts, list):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in counts):
            return "uncompressed RLE counts must be integers"
        runs = np.asarray(counts, dtype=np.int64)
        kind = "uncompressed"
    elif isinstance(counts, (str, bytes)):
        try:
            runs = compressed_rle_counts(counts)
        except ValueError as error:
            return str(error)
        kind = "compressed"
    else:
        return f'RLE "counts" must be a list (uncompressed) or a string (compressed), found {type(counts).__name__}'
    if runs.size and runs.min() < 0:
        return f"{kind} RLE counts hold a negative run length ({int(runs.min())})"
    total = int(runs.sum())
    if total != height * width:
        return (f"{kind} RLE counts cover {total} pixels, but a {height} x {width} mask has {height * width}")
    return None


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE (counts as str, bytes or list; size [h, w]) -> (h, w) bool array."""
    counts = rle["counts"]
    if isinstance(counts, list):
        coco_rle = mask_utils.frPyObjects(rle, *rle["size"])
    else:
        coco_rle = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(coco_rle).astype(bool)


def encode_mask(mask: np.ndarray) -> dict:
    """(h, w) bool array -> COCO compressed RLE with counts as str."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _cell_edges(source: int, target: int):
    """Edges of ``target`` equal cells over ``source`` pixels: integer part (< source) and fraction."""
    position = np.arange(target + 1, dtype=np.float64) * (source / target)
    low = np.minimum(np.floor(position).astype(np.int64), source - 1)
    return low, position - low


def coverage_edges(shape, size) -> tuple:
    """The summed-area-table rows and columns that ``mask_coverage`` reads for an ``(H, W)`` mask and
    an ``(out_h, out_w)`` grid: every cell edge's integer part and the one after it, sorted."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    (height, width), rows_and_columns = shape, []
    for source, target in ((height, out_h), (width, out_w)):
        low, _ = _cell_edges(source, target)
        rows_and_columns.append(np.unique(np.concatenate([low, low + 1])))
    return tuple(rows_and_columns)


def coverage_from_prefix_counts(counts: np.ndarray, rows: np.ndarray, columns: np.ndarray, shape, size) -> np.ndarray:
    """``mask_coverage`` from a summed-area table sampled at some edges only.

    ``counts[i, j]`` is the number of foreground pixels in rows ``< rows[i]`` and columns ``< columns[j]``
    of the ``shape`` = (H, W) mask; ``rows`` / ``columns`` are sorted and hold at least the edges of
    :func:`coverage_edges`. The result is the same, bit for bit, whichever superset of the edges is given
    (the integral is bilinear inside each pixel, so interpolating it at the cell edges is exact).
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    height, width = shape
    y_low, y_frac = _cell_edges(height, out_h)
    x_low, x_frac = _cell_edges(width, out_w)
    table = np.asarray(counts, dtype=np.float64)
    top = table[np.searchsorted(rows, y_low)]
    bottom = table[np.searchsorted(rows, y_low + 1)]
    along_y = top + (bottom - top) * y_frac[:, None]
    left, right = along_y[:, np.searchsorted(columns, x_low)], along_y[:, np.searchsorted(columns, x_low + 1)]
    integral = left + (right - left) * x_frac[None, :]
    area = integral[1:, 1:] - integral[:-1, 1:] - integral[1:, :-1] + integral[:-1, :-1]
    return area / ((height / out_h) * (width / out_w))


def mask_coverage(mask: np.ndarray, size) -> np.ndarray:
    """Fraction of each cell of an ``(out_h, out_w)`` grid stretched over ``mask`` that is foreground.

    Exact (up to float rounding) for any source and target sizes, up- or downscaling. Memory stays
    O(out_h * W): only the summed-area-table rows at the cell edges are built.
    """
    mask = np.asarray(mask).astype(np.uint8, copy=False)
    height, width = mask.shape
    rows, _ = coverage_edges(mask.shape, size)
    # Integral along y at the integer rows we need (row r = count of pixels in rows < r, per column).
    starts = np.unique(np.concatenate([[0], rows[rows < height]]))
    segment_sums = np.add.reduceat(mask, starts, axis=0, dtype=np.int64)
    boundaries = np.concatenate([starts, [height]])
    row_integral = np.concatenate([np.zeros((1, width), np.int64), np.cumsum(segment_sums, axis=0)])
    row_integral = row_integral[np.searchsorted(boundaries, rows)]
    # Full 2-D integral at those rows and every column edge, then bilinear in y and x.
    table = np.zeros((len(rows), width + 1), np.float64)
    np.cumsum(row_integral, axis=1, out=table[:, 1:])
    return coverage_from_prefix_counts(table, rows, np.arange(width + 1), mask.shape, size)


def target_from_coverage(coverage: np.ndarray) -> np.ndarray:
    """Binary target (float32 in {0, 1}) from ``mask_coverage``: coverage >= 0.5, and a non-empty mask never
    becomes empty (the cells of largest coverage are set when none reaches 0.5); see module doc."""
    target = coverage >= 0.5
    if not target.any():
        peak = coverage.max()
        if peak > 0:
            target = coverage >= peak - 1e-12
    return target.astype(np.float32)


def resize_mask(mask: np.ndarray, size) -> np.ndarray:
    """Low-resolution binary target (float32 in {0, 1}) by area coverage >= 0.5; see module doc."""
    return target_from_coverage(mask_coverage(mask, size))
