"""Overlay pictures: predicted masks blended over the image, with the prompt boxes outlined."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# Distinct, colour-blind friendly colours (Okabe-Ito plus a few), cycled over the masks of an image.
PALETTE = np.array(
    [
        (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
        (213, 94, 0), (204, 121, 167), (255, 255, 255), (120, 200, 80), (180, 80, 200),
    ],
    dtype=np.float32,
)


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
