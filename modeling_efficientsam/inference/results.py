"""What a prediction is: the predictor's result for one image, and a mask as a COCO results record."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils

from ..data.masks import encode_mask


@dataclass
class EfficientSamPrediction:
    """Masks for the N prompts (queries) of one image; every tensor is on the CPU.

    Attributes:
        masks (`torch.BoolTensor` of shape `(N, H, W)`): the chosen candidate of each query, resized to
            the original image (H x W) and thresholded at the processor's mask threshold (logit 0).
        scores (`torch.FloatTensor` of shape `(N,)`): predicted IoU of the chosen candidate.
        candidate_index (`torch.LongTensor` of shape `(N,)`): which of the M candidates was chosen
            (the one with the highest predicted IoU).
        iou_scores (`torch.FloatTensor` of shape `(N, M)`): predicted IoU of every candidate.
        low_res_logits (`torch.FloatTensor` of shape `(N, M, h, w)`): mask logits of every candidate
            in the model frame (256 x 256 for 1024 inputs), e.g. to post-process another candidate.
        original_size (`tuple[int, int]`): (H, W) of the image.
        normalized (`bool`): whether the prompts were read as fractions of the image size.
    """

    masks: torch.Tensor
    scores: torch.Tensor
    candidate_index: torch.Tensor
    iou_scores: torch.Tensor
    low_res_logits: torch.Tensor
    original_size: tuple
    normalized: bool = False

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls, original_size, num_candidates: int, grid: int, normalized: bool = False) -> "EfficientSamPrediction":
        """The result for an image without prompts."""
        height, width = original_size
        return cls(
            masks=torch.zeros((0, height, width), dtype=torch.bool), scores=torch.zeros(0),
            candidate_index=torch.zeros(0, dtype=torch.long), iou_scores=torch.zeros((0, num_candidates)),
            low_res_logits=torch.zeros((0, num_candidates, grid, grid)), original_size=(height, width),
            normalized=normalized,
        )


def result_record(mask: np.ndarray, image_id: int, category_id: int, score: float, with_bbox: bool = True) -> dict:
    """One COCO segmentation result: compressed RLE (counts as str), score and, optionally, the mask's box.

    ``bbox`` is the tight xywh box of the predicted mask ([0, 0, 0, 0] for an empty mask). Note that
    ``COCO.loadRes`` takes a result's ``area`` from ``bbox`` when ``bbox`` is present and from the
    mask otherwise; mask AP matching uses the masks either way.
    """
    rle = encode_mask(np.asarray(mask, dtype=bool))
    record = {"image_id": int(image_id), "category_id": int(category_id), "segmentation": rle, "score": float(score)}
    if with_bbox:
        coco_rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        record["bbox"] = [float(v) for v in mask_utils.toBbox(coco_rle)]
    return record


__all__ = ["EfficientSamPrediction", "result_record"]
