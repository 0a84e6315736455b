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


def mask_coverage(mask: np.ndarray, size) -> np.ndarray:
    """Fraction of each cell of an ``(out_h, out_w)`` grid stretched over ``mask`` that is foreground.

    Exact (up to float rounding) for any source and target sizes, up- or downscaling. Memory stays
    O(out_h * W): only the summed-area-table rows at the cell edges are built.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    mask = np.asarray(mask).astype(np.uint8, copy=False)
    height, width = mask.shape
    y_low, y_frac = _cell_edges(height, out_h)
    x_low, x_frac = _cell_edges(width, out_w)
    # Integral along y at the integer rows we need (row r = count of pixels in rows < r, per column).
    rows = np.unique(np.concatenate([y_low, y_low + 1]))
    starts = np.unique(np.concatenate([[0], rows[rows < height]]))
    segment_sums = np.add.reduceat(mask, starts, axis=0, dtype=np.int64)
    boundaries = np.concatenate([starts, [height]])
    row_integral = np.concatenate([np.zeros((1, width), np.int64), np.cumsum(segment_sums, axis=0)])
    row_integral = row_integral[np.searchsorted(boundaries, rows)]
    # Full 2-D integral at those rows and every column edge, then bilinear in y and x (the integral
    # of a piecewise-constant image is bilinear inside each pixel, so this is exact).
    table = np.zeros((len(rows), width + 1), np.float64)
    np.cumsum(row_integral, axis=1, out=table[:, 1:])
    top = table[np.searchsorted(rows, y_low)]
    bottom = table[np.searchsorted(rows, y_low + 1)]
    along_y = top + (bottom - top) * y_frac[:, None]
    left, right = along_y[:, x_low], along_y[:, x_low + 1]
    integral = left + (right - left) * x_frac[None, :]
    area = integral[1:, 1:] - integral[:-1, 1:] - integral[1:, :-1] + integral[:-1, :-1]
    return area / ((height / out_h) * (width / out_w))


def resize_mask(mask: np.ndarray, size) -> np.ndarray:
    """Low-resolution binary target (float32 in {0, 1}) by area coverage >= 0.5; see module doc."""
    coverage = mask_coverage(mask, size)
    target = coverage >= 0.5
    if not target.any():
        peak = coverage.max()
        if peak > 0:
            target = coverage >= peak - 1e-12
    return target.astype(np.float32)
