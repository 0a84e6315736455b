"""The predictor's prompt checks: shapes, and whether coordinates are normalized or pixels.

Only the form of the prompts is checked here; every coordinate computation (normalized -> pixels ->
model frame, xywh -> xyxy, clipping, empty / inverted / out-of-range boxes) is the processor's.

How the call forms of ``EfficientSamPredictor.predict(*args, ...)`` are told apart:

* two positional arguments are always ``(image, boxes)``;
* a single positional argument is the *boxes* when it is a list / tuple, or a numpy array / tensor
  with at most 2 dimensions whose last dimension is 4 (:func:`looks_like_prompts`); anything else (a
  path, a PIL image, an (H, W, C) array, ...) is an *image*, and prompts must then come as keywords.
  A 2-D array image that is exactly 4 pixels wide must be passed as ``image=``.

Normalized or pixel coordinates: ``normalized=True`` or ``False`` says it. Left at ``None`` it is
decided per call from the values (:func:`decide_normalized`): if every box and point coordinate
lies in [0, 1] the prompts are read as fractions of the image width and height, if every box /
query has a coordinate above 1 they are pixels, and a mix of the two (some boxes inside [0, 1],
others not) is an error asking for an explicit ``normalized=``. Pixel boxes that fit in [0, 1]
would be smaller than one pixel, so the rule cannot misread a meaningful pixel box.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..modeling_efficientsam import LABEL_PADDING


def _as_array(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numbers in a regular (rectangular) layout: {error}") from None
    if array.size and not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return array


def check_boxes(boxes) -> Optional[np.ndarray]:
    """-> (N, 4) float64, accepting one box as (4,)."""
    if boxes is None:
        return None
    array = _as_array(boxes, "boxes")
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim == 1 and array.shape[0] == 4:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(
            f"boxes must have shape (N, 4) (one (x1, y1, x2, y2) or (x, y, w, h) row per box); got shape {array.shape}"
        )
    return array


def check_points(points, labels) -> tuple:
    """-> (N, P, 2) points and (N, P) labels, accepting one query as (P, 2) / (P,)."""
    if points is None and labels is None:
        return None, None
    if points is None or labels is None:
        raise ValueError("points and labels must be given together (one label per point)")
    points = _as_array(points, "points")
    labels = _as_array(labels, "labels")
    if points.ndim == 2 and labels.ndim == 1:
        points, labels = points[None], labels[None]
    if points.ndim != 3 or points.shape[-1] != 2 or labels.shape != points.shape[:-1]:
        raise ValueError(
            "points must have shape (N, P, 2) (N queries of P (x, y) points) and labels (N, P); "
            f"got {points.shape} and {labels.shape}"
        )
    if labels.size and not np.array_equal(labels, np.round(labels)):
        raise ValueError("labels must be integers (1 positive, 0 negative, 2 / 3 box corners, -1 padding)")
    return points, labels.astype(np.int64)


def check_prompts(boxes, points, labels) -> tuple:
    """Both prompt kinds of one image -> ``(boxes, points, labels, number of queries)``."""
    boxes = check_boxes(boxes)
    points, labels = check_points(points, labels)
    if boxes is None and points is None:
        raise ValueError("no prompts: pass boxes and/or points with labels")
    if boxes is not None and points is not None and len(boxes) != len(points):
        raise ValueError(
            f"boxes and points combine per query and must have the same number of queries; got {len(boxes)} "
            f"boxes and {len(points)} point queries"
        )
    return boxes, points, labels, len(boxes) if boxes is not None else len(points)


def decide_normalized(boxes: Optional[np.ndarray], points: Optional[np.ndarray], labels: Optional[np.ndarray],
                      normalized: Optional[bool]) -> bool:
    """Apply the rule of the module docstring: explicit wins; else all in [0, 1] -> normalized."""
    if normalized is not None:
        return bool(normalized)
    per_query = []  # for each box / query: does every coordinate lie in [0, 1]?
    if boxes is not None and boxes.size:
        per_query.extend(((boxes >= 0) & (boxes <= 1)).all(axis=1).tolist())
    if points is not None and points.size:
        real = labels != LABEL_PADDING
        inside = ((points >= 0) & (points <= 1)).all(axis=-1) | ~real
        per_query.extend((inside.all(axis=1) & real.any(axis=1)).tolist())
    if not per_query:
        return False
    if all(per_query):
        return True
    if not any(per_query):
        return False
    inside = [index for index, flag in enumerate(per_query) if flag]
    raise ValueError(
        f"cannot tell whether the prompts are normalized: {len(inside)} of {len(per_query)} boxes/queries lie "
        f"entirely in [0, 1] (e.g. index {inside[0]}) and the others do not. Pass normalized=True (fractions of "
        "the image width and height) or normalized=False (pixels)."
    )


def looks_like_prompts(value) -> bool:
    """Whether a single positional argument of ``predict`` is boxes (else it is an image)."""
    if isinstance(value, (list, tuple)):
        return True
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.ndim <= 2 and value.ndim > 0 and value.shape[-1] == 4
    return False


__all__ = ["check_boxes", "check_points", "check_prompts", "decide_normalized", "looks_like_prompts"]
