"""Prompt sampling for training: box jitter, point sampling, and the point/label encoding.

All coordinates here are in original image pixels (x to the right, y down; a pixel (col, row)
spans [col, col + 1) x [row, row + 1)) until the processor's ``to_model_frame`` stretches them to
the square model input. Encoding (the prompt encoder's convention, whose labels are defined in
``modeling_efficientsam.py``): a query is at most 6 points; a box is its top-left corner with label 2
and its bottom-right corner with label 3 (``box_corner_points`` of the processor module); a positive
point has label 1, a negative point label 0; padding is the point (-1, -1) with label -1.
"""

from __future__ import annotations

import numpy as np

from ..modeling_efficientsam import LABEL_NEGATIVE, LABEL_PADDING, LABEL_POSITIVE, MAX_POINTS_PER_QUERY
from ..processing_efficientsam import box_corner_points

MIN_BOX_SIDE = 1.0  # pixels; a jittered box is never narrower or lower than this


def _keep_non_empty(low: float, high: float, limit: float) -> tuple:
    """Make ``high - low >= MIN_BOX_SIDE`` inside [0, limit], moving the sides symmetrically."""
    if high - low >= MIN_BOX_SIDE:
        return low, high
    side = min(MIN_BOX_SIDE, limit)
    centre = min(max((low + high) / 2.0, side / 2.0), limit - side / 2.0)
    return centre - side / 2.0, centre + side / 2.0


def jitter_box(box, width: int, height: int, noise_scale: float, rng: np.random.Generator) -> np.ndarray:
    """Perturb each side of an xyxy pixel box in proportion to the box size, inside the image.

    x1 and x2 each move by ``U(-s, s) * box_width``, y1 and y2 by ``U(-s, s) * box_height``
    (four independent draws, ``s = noise_scale``; ``s = 0`` returns the box clipped). The result is
    clipped to [0, width] x [0, height] and never inverted: x2 - x1 and y2 - y1 are at least
    ``MIN_BOX_SIDE`` (a collapsed side is re-centred where the sides met).
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if noise_scale > 0:
        box_w, box_h = x2 - x1, y2 - y1
        dx1, dy1, dx2, dy2 = rng.uniform(-noise_scale, noise_scale, size=4)
        x1, x2 = x1 + dx1 * box_w, x2 + dx2 * box_w
        y1, y2 = y1 + dy1 * box_h, y2 + dy2 * box_h
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 < x1:  # large noise may cross the sides: meet in the middle, then widen
        x1 = x2 = (x1 + x2) / 2.0
    if y2 < y1:
        y1 = y2 = (y1 + y2) / 2.0
    x1, x2 = _keep_non_empty(x1, x2, float(width))
    y1, y2 = _keep_non_empty(y1, y2, float(height))
    return np.array([x1, y1, x2, y2], dtype=np.float64)


def sample_positive_points(mask: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` (x, y) pixel positions inside ``mask``, distinct when the mask has enough pixels."""
    rows, cols = np.nonzero(mask)
    if count <= 0 or rows.size == 0:
        return np.zeros((0, 2), np.float64)
    chosen = rng.choice(rows.size, size=count, replace=rows.size < count)
    return np.stack([cols[chosen], rows[chosen]], axis=1).astype(np.float64)


def box_pixel_window(box, width: int, height: int) -> tuple:
    """Rows/cols (inclusive start, exclusive end) of the pixels whose centre lies inside an xyxy box."""
    x1, y1, x2, y2 = box
    col0, col1 = max(int(np.ceil(x1 - 0.5)), 0), min(int(np.floor(x2 - 0.5)) + 1, width)
    row0, row1 = max(int(np.ceil(y1 - 0.5)), 0), min(int(np.floor(y2 - 0.5)) + 1, height)
    return row0, max(row1, row0), col0, max(col1, col0)


def sample_negative_points(mask: np.ndarray, box, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``count`` (x, y) positions inside ``box`` but outside ``mask`` (fewer if there are fewer)."""
    height, width = mask.shape
    row0, row1, col0, col1 = box_pixel_window(box, width, height)
    rows, cols = np.nonzero(~mask[row0:row1, col0:col1].astype(bool))
    if count <= 0 or rows.size == 0:
        return np.zeros((0, 2), np.float64)
    chosen = rng.choice(rows.size, size=min(count, rows.size), replace=False)
    return np.stack([cols[chosen] + col0, rows[chosen] + row0], axis=1).astype(np.float64)


def box_query(box) -> tuple:
    """A box as two points: (x1, y1) label 2 and (x2, y2) label 3."""
    return box_corner_points(np.reshape(box, 4))


def point_query(positive: np.ndarray, negative: np.ndarray) -> tuple:
    """Positive points (label 1) then negative points (label 0); at most 6 in all."""
    positive, negative = np.reshape(positive, (-1, 2)), np.reshape(negative, (-1, 2))
    if len(positive) + len(negative) > MAX_POINTS_PER_QUERY:
        raise ValueError(f"a query holds at most {MAX_POINTS_PER_QUERY} points, got {len(positive) + len(negative)}")
    points = np.concatenate([positive, negative]).astype(np.float64)
    labels = np.array([LABEL_POSITIVE] * len(positive) + [LABEL_NEGATIVE] * len(negative), np.int64)
    return points, labels


def pad_queries(queries: list, num_points: int) -> tuple:
    """Stack ``[(points (n_i, 2), labels (n_i,)), ...]`` into (Q, P, 2) / (Q, P) padded with -1."""
    points = np.full((len(queries), num_points, 2), -1.0, np.float32)
    labels = np.full((len(queries), num_points), LABEL_PADDING, np.int64)
    for index, (query_points, query_labels) in enumerate(queries):
        points[index, : len(query_points)] = query_points
        labels[index, : len(query_labels)] = query_labels
    return points, labels
