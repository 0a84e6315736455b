"""Overlay pictures: masks blended over the image with their prompt boxes outlined, in one palette.

The one renderer of the package: ``efficientsam-predict --overlays`` writes :func:`draw_overlay`
pictures and the TensorBoard callback logs :func:`render_overlay` (ground truth beside prediction).
Query ``i`` always gets colour ``i`` of :data:`PALETTE` (cycled), for its mask and its box.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# Distinct, colour-blind friendly colours (Okabe-Ito plus a few), cycled over the queries of an image.
PALETTE = np.array(
    [
        (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
        (213, 94, 0), (204, 121, 167), (255, 255, 255), (120, 200, 80), (180, 80, 200),
    ],
    dtype=np.float32,
)
PANEL_GAP = 4  # white pixels between the two panels of render_overlay


def draw_overlay(image: np.ndarray, masks, boxes_xyxy=None, alpha: float = 0.45, outline: int = 2) -> Image.Image:
    """(H, W, 3) uint8 image + (N, H, W) boolean masks -> an RGB PIL image.

    Each mask is tinted with its own colour (later masks on top); ``boxes_xyxy`` (N, 4) pixel boxes,
    if given, are outlined in the same colour.
    """
    canvas = np.asarray(image, dtype=np.float32).copy()
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3 or masks.shape[1:] != canvas.shape[:2]:
        raise ValueError(f"masks must be (N, {canvas.shape[0]}, {canvas.shape[1]}); got {masks.shape}")
    for index, mask in enumerate(masks):
        colour = PALETTE[index % len(PALETTE)]
        canvas[mask] = (1.0 - alpha) * canvas[mask] + alpha * colour
    picture = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
    if boxes_xyxy is not None:
        draw = ImageDraw.Draw(picture)
        for index, box in enumerate(np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)):
            colour = tuple(int(v) for v in PALETTE[index % len(PALETTE)])
            draw.rectangle([float(v) for v in box], outline=colour, width=outline)
    return picture


def render_overlay(image: np.ndarray, boxes: np.ndarray, true_masks: np.ndarray, pred_masks: np.ndarray,
                   alpha: float = 0.45) -> np.ndarray:
    """Two :func:`draw_overlay` panels side by side: true masks (left), predicted masks (right).

    Args:
        image: (H, W, 3) uint8.
        boxes: (Q, 4) x1, y1, x2, y2 in pixels of ``image``, outlined on both panels.
        true_masks, pred_masks: (Q, H, W) bool.

    Returns:
        (H, 2W + 4, 3) uint8; query q has the same colour in both panels.
    """
    left = np.asarray(draw_overlay(image, true_masks, boxes, alpha=alpha))
    right = np.asarray(draw_overlay(image, pred_masks, boxes, alpha=alpha))
    gap = np.full((left.shape[0], PANEL_GAP, 3), 255, dtype=np.uint8)
    return np.concatenate([left, gap, right], axis=1)


__all__ = ["PALETTE", "draw_overlay", "render_overlay"]
