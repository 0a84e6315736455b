"""Automatic mask generation ("segment everything") for EfficientSAM, in plain torch.

transformers' ``pipeline("mask-generation")`` prompts the model with a regular grid of single
positive points and keeps the good masks. It asks the image processor for three steps, which
[`EfficientSamMaskGenerationMixin`] provides:

1. ``generate_crop_boxes``: the crops (the whole image, plus overlapping tiles with ``crops_n_layers``)
   and, for each crop, a grid of points in the model's input frame.
2. ``filter_masks`` (per batch of points): keep masks whose predicted IoU and stability score pass
   their thresholds, drop empty masks and masks cut by a crop border, paste them into the full image and
   encode them as run-length codes.
3. ``post_process_for_mask_generation``: greedy box non-maximum suppression over all kept masks.

EfficientSAM stretches every image (or crop) to its square input without padding, so a point at the
fractions (u, v) of a crop's width and height sits at (u * S, v * S) in the model frame, whatever the
crop's aspect ratio. Nothing here needs torchvision.

Besides math, numpy and torch it imports only the processor's coordinate mapping (relatively), so it is
copied next to saved models, with the image processor, for ``trust_remote_code`` loading.
"""

from __future__ import annotations

import math
from itertools import product
from typing import Optional, Sequence

import numpy as np
import torch

from .processing_efficientsam import to_model_frame


def point_grid(points_per_side: int) -> torch.Tensor:
    """(n * n, 2) points (x, y) at the centres of an n x n grid of cells over [0, 1] x [0, 1], row by row."""
    if int(points_per_side) < 1:
        raise ValueError(f"points_per_crop must be at least 1; got {points_per_side}")
    n = int(points_per_side)
    centres = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)


def layered_crop_boxes(height: int, width: int, crop_n_layers: int, overlap_ratio: float) -> tuple[list, list]:
    """Crops as xyxy pixel boxes and their layer: the whole image (layer 0), then for layer k >= 1 a
    2^k x 2^k tiling whose neighbouring tiles overlap by ``overlap_ratio * short side * 2 / 2^k`` pixels."""
    if crop_n_layers < 0:
        raise ValueError(f"crops_n_layers must be >= 0; got {crop_n_layers}")
    boxes, layers = [[0, 0, width, height]], [0]
    short_side = min(height, width)
    for layer in range(1, crop_n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * short_side * 2 / per_side)
        crop_width = math.ceil((overlap * (per_side - 1) + width) / per_side)
        crop_height = math.ceil((overlap * (per_side - 1) + height) / per_side)
        lefts = [(crop_width - overlap) * i for i in range(per_side)]
        tops = [(crop_height - overlap) * i for i in range(per_side)]
        for left, top in product(lefts, tops):
            boxes.append([left, top, min(left + crop_width, width), min(top + crop_height, height)])
            layers.append(layer)
    return boxes, layers


def stability_scores(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU between the masks thresholded at ``mask_threshold + offset`` and at ``mask_threshold - offset``.

    The first mask lies inside the second, so the IoU is a ratio of pixel counts. ``logits`` is
    (N, H, W); the result is (N,), 0 where both masks are empty.
    """
    inner = (logits > mask_threshold + offset).flatten(1).sum(-1, dtype=torch.int64)
    outer = (logits > mask_threshold - offset).flatten(1).sum(-1, dtype=torch.int64)
    return inner.double() / outer.clamp(min=1).double()  # outer == 0 implies inner == 0


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool masks -> (N, 4) int64 boxes (x1, y1, x2, y2) of pixel indices, both ends inclusive;
    an empty mask gives (0, 0, 0, 0)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.int64, device=masks.device)
    height, width = masks.shape[-2:]
    rows, columns = masks.any(dim=-1), masks.any(dim=-2)  # (N, H), (N, W)
    row_index = torch.arange(height, device=masks.device)
    column_index = torch.arange(width, device=masks.device)
    y1 = torch.where(rows, row_index, height).amin(dim=-1)
    y2 = torch.where(rows, row_index, -1).amax(dim=-1)
    x1 = torch.where(columns, column_index, width).amin(dim=-1)
    x2 = torch.where(columns, column_index, -1).amax(dim=-1)
    boxes = torch.stack([x1, y1, x2, y2], dim=-1)
    return boxes * rows.any(dim=-1, keepdim=True)


def boxes_near_crop_edge(boxes: torch.Tensor, crop_box: Sequence[int], image_box: Sequence[int], atol: float = 20.0):
    """(N,) True for boxes (in full-image pixels) within ``atol`` of a crop side that is not an image side:
    such masks are probably cut by the crop and are better found in another crop."""
    crop = torch.as_tensor(crop_box, dtype=torch.float64, device=boxes.device)
    image = torch.as_tensor(image_box, dtype=torch.float64, device=boxes.device)
    boxes = boxes.to(torch.float64)
    near_crop = (boxes - crop).abs() <= atol
    near_image = (boxes - image).abs() <= atol
    return (near_crop & ~near_image).any(dim=-1)


def masks_to_rle(masks: torch.Tensor, as_lists: bool = True) -> list[dict]:
    """(N, H, W) bool masks -> uncompressed COCO run-length codes ``{"size": [H, W], "counts": [...]}``.

    Runs are counted in column-major order and start with a run of zeros (possibly of length 0),
    as ``pycocotools.mask.frPyObjects`` expects. With ``as_lists=False`` the counts are int64 tensors
    (compact while the pipeline moves its intermediate outputs around).
    """
    count, height, width = masks.shape
    flat = masks.transpose(1, 2).reshape(count, height * width).cpu()
    changes = torch.nonzero(flat[:, 1:] != flat[:, :-1])  # (K, 2) sorted by mask, then position
    per_mask = torch.bincount(changes[:, 0], minlength=count).tolist() if count else []
    codes = []
    for index, positions in enumerate(torch.split(changes[:, 1] + 1, per_mask)):
        first = torch.zeros(1 + int(bool(flat[index, 0])), dtype=torch.int64)  # [0] or [0, 0]
        bounds = torch.cat([first, positions, torch.tensor([height * width])])
        runs = bounds[1:] - bounds[:-1]  # a leading [0, 0] makes the first run of zeros empty
        codes.append({"size": [int(height), int(width)], "counts": runs.tolist() if as_lists else runs})
    return codes


def rle_to_mask(rle: dict) -> np.ndarray:
    """An uncompressed run-length code (see :func:`masks_to_rle`) -> an (H, W) bool array."""
    height, width = rle["size"]
    counts = np.asarray(torch.as_tensor(rle["counts"], dtype=torch.int64).cpu(), dtype=np.int64)
    if counts.sum() != height * width:
        raise ValueError(f"run lengths add up to {counts.sum()}, not {height} x {width} pixels")
    values = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return np.ascontiguousarray(values.reshape(width, height).T)


def box_iou(box: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of one inclusive pixel box (4,) with each of (N, 4) inclusive pixel boxes -> (N,)."""
    box, boxes = box.to(torch.float64), boxes.to(torch.float64)
    width = (torch.minimum(box[2], boxes[:, 2]) - torch.maximum(box[0], boxes[:, 0]) + 1).clamp(min=0)
    height = (torch.minimum(box[3], boxes[:, 3]) - torch.maximum(box[1], boxes[:, 1]) + 1).clamp(min=0)
    intersection = width * height
    area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    return intersection / (area + areas - intersection)


def greedy_box_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first.

    Visiting boxes from the highest score down, a box is kept unless its IoU with an already kept box
    exceeds ``iou_threshold``. Ties in score keep the earlier box first. Memory is O(N).
    """
    if boxes.shape[0] != scores.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes for {scores.shape[0]} scores")
    order = torch.sort(scores.detach().cpu().to(torch.float64), descending=True, stable=True).indices
    ordered = boxes.detach().cpu()[order]
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for position in range(len(order)):
        if suppressed[position]:
            continue
        keep.append(position)
        suppressed[position + 1 :] |= box_iou(ordered[position], ordered[position + 1 :]) > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long)]


class EfficientSamMaskGenerationMixin:
    """The image-processor methods that transformers' ``mask-generation`` pipeline calls.

    Mixed into [`EfficientSamImageProcessor`], which provides ``size`` (the square input side) and
    ``to_rgb``.
    """

    def generate_crop_boxes(
        self,
        image,
        target_size: Optional[int] = None,
        crop_n_layers: int = 0,
        overlap_ratio: float = 512 / 1500,
        points_per_crop: int = 32,
        crop_n_points_downscale_factor: int = 1,
        device: Optional[torch.device] = None,
    ):
        """Crops of one image and a grid of point prompts for each.

        Args:
            image: one image (path, PIL image, array or tensor; see the image processor).
            target_size: the model's input side; must equal this processor's `size` when given.
            crop_n_layers: extra layers of crops; layer k tiles the image 2^k x 2^k.
            overlap_ratio: overlap of neighbouring first-layer tiles, as a fraction of the short side.
            points_per_crop: points per side of the grid on the whole image (`points_per_crop ** 2` points).
            crop_n_points_downscale_factor: layer k uses `points_per_crop / factor ** k` points per side;
                every layer must then have the same number of points (factor 1, or no extra layers).

        Returns:
            crop_boxes `(C, 4)` float xyxy pixel boxes of the crops (the first is the whole image);
            points `(1, N, C, 2)` float, point n of crop c in the model's S x S input frame;
            cropped_images, a list of C `(h, w, 3)` uint8 arrays;
            labels `(1, N, C)` int64, all 1 (positive points).
        """
        if target_size is not None and int(target_size) != int(self.size):
            raise ValueError(f"target_size {target_size} differs from this processor's input size {int(self.size)}")
        rgb = self.to_rgb(image)
        height, width = rgb.shape[:2]
        boxes, layers = layered_crop_boxes(height, width, int(crop_n_layers), float(overlap_ratio))
        sides = {layer: int(points_per_crop / (crop_n_points_downscale_factor**layer)) for layer in set(layers)}
        if len(set(sides.values())) > 1:
            raise ValueError(
                f"crop_n_points_downscale_factor={crop_n_points_downscale_factor} gives {sorted(set(sides.values()))} "
                "points per side on different crop layers; the mask-generation pipeline needs the same number of "
                "points on every crop (use crop_n_points_downscale_factor=1 or crops_n_layers=0)"
            )
        grid = point_grid(sides[0]).numpy()
        crops, per_crop = [], []
        for left, top, right, bottom in boxes:
            crops.append(rgb[top:bottom, left:right])
            crop_size = (bottom - top, right - left)  # (h, w); each crop is stretched to the S x S input
            per_crop.append(to_model_frame(grid * np.array([right - left, bottom - top]), crop_size, int(self.size)))
        points = torch.from_numpy(np.stack(per_crop, axis=1)[None]).to(torch.float32)  # (1, N, C, 2)
        labels = torch.ones(points.shape[:-1], dtype=torch.int64)
        crop_boxes = torch.tensor(boxes, dtype=torch.float32)
        device = torch.device("cpu") if device is None else device
        return crop_boxes.to(device), points.to(device), crops, labels.to(device)

    def filter_masks(
        self,
        masks: torch.Tensor,
        iou_scores: torch.Tensor,
        original_size,
        cropped_box_image,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        mask_threshold: float = 0.0,
        stability_score_offset: float = 1.0,
    ):
        """Keep the good masks of one crop and move them into the full image.

        Args:
            masks: `(Q, M, h, w)` logits at the crop's size (`post_process_masks(..., binarize=False)`).
            iou_scores: `(Q, M)` predicted IoU.
            original_size: (H, W) of the full image.
            cropped_box_image: the crop's xyxy box in full-image pixels.
            pred_iou_thresh: keep masks whose predicted IoU is above this (0 turns the test off).
            stability_score_thresh: keep masks whose stability score is above this (0 turns it off).
            mask_threshold: logit threshold of the masks.
            stability_score_offset: logit offset of the stability score.

        Empty masks, and masks within 20 px of a crop side that is not an image side, are dropped.

        Returns run-length codes of the kept masks at the full image size, their scores `(K,)` and their
        boxes `(K, 4)` (inclusive pixel indices in the full image).
        """
        full_height, full_width = (int(value) for value in (torch.as_tensor(original_size).tolist()))
        masks = masks.flatten(0, 1)
        scores = iou_scores.flatten(0, 1).to(masks.device)
        if masks.shape[0] != scores.shape[0]:
            raise ValueError(f"{masks.shape[0]} masks for {scores.shape[0]} IoU scores")
        keep = torch.ones(masks.shape[0], dtype=torch.bool, device=masks.device)
        if pred_iou_thresh > 0:
            keep &= scores > pred_iou_thresh
        if stability_score_thresh > 0:
            keep &= stability_scores(masks, mask_threshold, stability_score_offset).to(masks.device) > stability_score_thresh
        binary = masks[keep] > mask_threshold
        scores = scores[keep]
        boxes = masks_to_boxes(binary)
        left, top, right, bottom = (int(value) for value in torch.as_tensor(cropped_box_image).tolist())
        boxes = boxes + torch.tensor([left, top, left, top], device=boxes.device)
        keep = binary.flatten(1).any(dim=-1)
        keep &= ~boxes_near_crop_edge(boxes, [left, top, right, bottom], [0, 0, full_width, full_height])
        binary, scores, boxes = binary[keep], scores[keep], boxes[keep]
        if (left, top, right, bottom) != (0, 0, full_width, full_height):
            binary = torch.nn.functional.pad(binary, (left, full_width - right, top, full_height - bottom), value=False)
        return masks_to_rle(binary, as_lists=False), scores, boxes

    def post_process_for_mask_generation(self, all_masks, all_scores, all_boxes, crops_nms_thresh: float = 0.7):
        """Greedy box NMS over the masks of all crops and batches.

        Returns the kept masks as `(H, W)` bool numpy arrays, their scores `(K,)`, their run-length codes
        and their boxes `(K, 4)`, best score first.
        """
        keep = greedy_box_nms(all_boxes, all_scores, crops_nms_thresh)
        codes = [all_masks[int(index)] for index in keep]
        masks = [rle_to_mask(code) for code in codes]
        codes = [{"size": list(code["size"]), "counts": torch.as_tensor(code["counts"]).tolist()} for code in codes]
        return masks, all_scores[keep.to(all_scores.device)], codes, all_boxes[keep.to(all_boxes.device)]


__all__ = [
    "EfficientSamMaskGenerationMixin",
    "box_iou",
    "boxes_near_crop_edge",
    "greedy_box_nms",
    "layered_crop_boxes",
    "masks_to_boxes",
    "masks_to_rle",
    "point_grid",
    "rle_to_mask",
    "stability_scores",
]
