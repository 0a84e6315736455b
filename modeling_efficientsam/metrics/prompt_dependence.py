"""Does the model use its prompt? The wrong-box check.

A promptable model can reach a good mIoU without looking at its prompt: when one object fills most
of every image, returning "the big object" whatever the box says scores well, and box jitter changes
nothing. The check asks the model the same question twice:

* **own box**: each object prompted with its own box (the usual evaluation);
* **wrong box**: each object prompted with another object's box in the same image (the one that
  overlaps it least), or, when the image has a single object, with its own box moved off it
  (:func:`displaced_box`);

and scores both answers against the object's own mask. A model that uses its prompt follows the
wrong box to the wrong place and its wrong-box mIoU collapses; a model that ignores its prompt
returns the same mask both times, so the two mIoUs are equal. ``prompt_gap`` = own - wrong. When
the gap is below :data:`DEFAULT_MIN_PROMPT_GAP` (absolute mIoU) the model is reported as ignoring
its prompts and :func:`prompt_dependence_warning` says what that means and what to try.

Boxes here are xyxy in any pixel frame (original image pixels for ``efficientsam-evaluate``, the
square model frame in the trainer); only their relative placement matters.
"""

from __future__ import annotations

import logging
from typing import Dict, Mapping, Optional

import numpy as np

__all__ = [
    "DEFAULT_MIN_PROMPT_GAP",
    "box_iou_matrix",
    "displaced_box",
    "prompt_dependence_summary",
    "prompt_dependence_warning",
    "warn_if_prompt_ignored",
    "wrong_boxes",
]

logger = logging.getLogger(__name__)

#: Smallest own-box minus wrong-box mIoU of a model that uses its prompts. A model that segments what
#: it is pointed at loses most of its mIoU when pointed elsewhere (the quickstart model: 0.62 -> 0.03).
DEFAULT_MIN_PROMPT_GAP = 0.1


def box_iou_matrix(boxes: np.ndarray) -> np.ndarray:
    """(n, n) IoU between xyxy boxes."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    y1 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    x2 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
    y2 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area[:, None] + area[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def displaced_box(box, width: float, height: float) -> np.ndarray:
    """The box moved off itself, inside the ``width`` x ``height`` frame.

    The box is shifted by its own width (left or right) or height (up or down), whichever direction
    leaves the largest part of it inside the frame, then clipped. When no shift leaves anything (the
    box spans the frame), a quarter-size box in the corner farthest from its centre is returned.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    candidates = [(x1 - w, y1, x1, y2), (x2, y1, x2 + w, y2), (x1, y1 - h, x2, y1), (x1, y2, x2, y2 + h)]
    best, best_area = None, 0.0
    for cx1, cy1, cx2, cy2 in candidates:
        cx1, cx2 = min(max(cx1, 0.0), width), min(max(cx2, 0.0), width)
        cy1, cy2 = min(max(cy1, 0.0), height), min(max(cy2, 0.0), height)
        area = max(cx2 - cx1, 0.0) * max(cy2 - cy1, 0.0)
        if area > best_area:
            best, best_area = (cx1, cy1, cx2, cy2), area
    if best is None:
        qw, qh = width / 4.0, height / 4.0
        left = (x1 + x2) / 2.0 > width / 2.0
        top = (y1 + y2) / 2.0 > height / 2.0
        bx1 = 0.0 if left else width - qw
        by1 = 0.0 if top else height - qh
        best = (bx1, by1, bx1 + qw, by1 + qh)
    return np.asarray(best, dtype=np.float64)


def wrong_boxes(boxes, width: float, height: float) -> np.ndarray:
    """A wrong box for each of an image's boxes: another object's box (the least overlapping one),
    or :func:`displaced_box` when the image has one box. ``(n, 4)`` in, ``(n, 4)`` out."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return boxes.copy()
    if len(boxes) == 1:
        return displaced_box(boxes[0], width, height)[None]
    iou = box_iou_matrix(boxes)
    np.fill_diagonal(iou, np.inf)
    # Least overlap first; ties (several disjoint boxes) go to the next object in order.
    order = np.arange(len(boxes))
    tie_break = ((order[None, :] - order[:, None]) % len(boxes)) * 1e-9
    return boxes[np.argmin(iou + tie_break, axis=1)]


def prompt_dependence_summary(own_box_miou: float, wrong_box_miou: float,
                              min_prompt_gap: float = DEFAULT_MIN_PROMPT_GAP) -> Dict[str, object]:
    """``own_box_miou``, ``wrong_box_miou``, ``prompt_gap`` (own - wrong) and ``ignores_prompt`` (gap < min)."""
    gap = float(own_box_miou) - float(wrong_box_miou)
    return {"own_box_miou": float(own_box_miou), "wrong_box_miou": float(wrong_box_miou), "prompt_gap": gap,
            "min_prompt_gap": float(min_prompt_gap), "ignores_prompt": bool(gap < min_prompt_gap)}


def prompt_dependence_warning(summary: Mapping[str, object], where: str = "") -> Optional[str]:
    """The warning text for a model that ignores its prompts (None when it uses them)."""
    if not summary["ignores_prompt"]:
        return None
    prefix = f"{where}: " if where else ""
    if summary["own_box_miou"] < 2 * summary["min_prompt_gap"]:
        return (
            f"{prefix}mIoU {summary['own_box_miou']:.3f} with each object's own box vs {summary['wrong_box_miou']:.3f} with "
            f"a wrong box: the model barely segments yet, so it cannot be told whether it uses its prompts. Train longer "
            "(or check the learning rate and data) and look at the gap again."
        )
    return (
        f"{prefix}the model seems to ignore its box prompts: mIoU {summary['own_box_miou']:.3f} with each object's own box "
        f"vs {summary['wrong_box_miou']:.3f} with a wrong box (another object's box, or the box moved off the object); "
        f"gap {summary['prompt_gap']:.3f} < {summary['min_prompt_gap']:.2f}. It returns about the same mask whatever it "
        "is asked, so its mIoU measures how much of each image one object fills, not promptable segmentation. Try: "
        "training data with several objects per image (or crops where the object is not the whole frame), more "
        "training steps, box jitter (box_noise_scale 0.1), and check that the prompt encoder is not frozen at random "
        "weights; compare with the same evaluation at --box_noise_scale 0.3, which a prompt-using model feels."
    )


def warn_if_prompt_ignored(summary: Mapping[str, object], where: str = "", log: Optional[logging.Logger] = None) -> Optional[str]:
    """Log (WARNING) and return :func:`prompt_dependence_warning` when the model ignores its prompts."""
    message = prompt_dependence_warning(summary, where)
    if message is not None:
        (log or logger).warning(message)
    return message
