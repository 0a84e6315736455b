"""Processor for EfficientSAM: images plus box / point prompts in original pixels or [0, 1].

Prompts are rescaled to the model's square input frame (x * size / W, y * size / H), because the
image is stretched, not letterboxed. Images with different numbers of queries are padded: a padded
box is (-1, -1, -1, -1) and padded points are (-1, -1) with label -1, which the model treats as
padding (see `EfficientSamModel`).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from transformers import ProcessorMixin
from transformers.image_processing_utils import BatchFeature

from .modeling_efficientsam import LABEL_PADDING, VALID_LABELS

PromptInput = Union[torch.Tensor, np.ndarray, Sequence]


def _per_image(values: Optional[PromptInput], depth: int, name: str, num_images: int) -> Optional[list]:
    """Normalize a prompt argument to a list (one entry per image) of float64 arrays.

    `depth` is the number of array dimensions per image (boxes: 2 -> (Q, 4); points: 3 -> (Q, P, 2);
    labels: 2 -> (Q, P)). A single image's prompts may be given without the image level.
    """
    if values is None:
        return None
    if isinstance(values, (torch.Tensor, np.ndarray)):
        array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
        if array.ndim == depth:
            array = array[None]
        if array.ndim != depth + 1:
            raise ValueError(f"{name} must have {depth + 1} dimensions (images first); got shape {array.shape}")
        items = [np.asarray(item, dtype=np.float64) for item in array]
    else:
        values = list(values)
        probe = np.asarray(values[0], dtype=object) if values else None
        nested_depth = 0
        while probe is not None and probe.ndim > 0 and len(probe) > 0:
            nested_depth += 1
            probe = np.asarray(probe[0], dtype=object) if isinstance(probe[0], (list, tuple, np.ndarray, torch.Tensor)) else None
        if nested_depth == depth - 1:  # one image's prompts without the image level
            values = [values]
        items = []
        for image_index, item in enumerate(values):
            array = np.asarray(item.tolist() if isinstance(item, torch.Tensor) else item, dtype=np.float64)
            if array.size == 0:
                array = array.reshape((0,) + ((4,) if name == "input_boxes" else ()))
            items.append(array)
    if len(items) != num_images:
        raise ValueError(f"{name} has prompts for {len(items)} images but {num_images} images were given")
    for image_index, array in enumerate(items):
        if array.ndim != depth and not (array.size == 0 and name == "input_boxes"):
            raise ValueError(f"{name} for image {image_index} must have {depth} dimensions; got shape {array.shape}")
    return items


class EfficientSamProcessor(ProcessorMixin):
    r"""Wraps [`EfficientSamImageProcessor`] and rescales prompts to the model's input frame.

    Call it with `images` and any of `input_boxes` (per image: a list of boxes), `input_points` (per
    image: a list of queries, each a list of (x, y) points) and `input_labels` (per image: a list of
    queries, each a list of labels). Coordinates are original-image pixels, or fractions of the image
    width and height with `normalized=True`. Boxes are `"xyxy"` or `"xywh"` (`box_format`); boxes are
    clipped to the image, and an empty or inverted box is an error. Points labelled -1 are padding and
    pass through untouched.
    """

    attributes = ["image_processor"]
    image_processor_class = "EfficientSamImageProcessor"

    def __init__(self, image_processor=None, **kwargs):
        if image_processor is None:
            from .image_processing_efficientsam import EfficientSamImageProcessor

            image_processor = EfficientSamImageProcessor()
        super().__init__(image_processor, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "EfficientSamProcessor":
        """Load the processor saved beside a model (a folder or a Hub repo)."""
        from .image_processing_efficientsam import EfficientSamImageProcessor

        return cls(EfficientSamImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs))

    @property
    def size(self) -> int:
        return self.image_processor.size

    def __call__(
        self,
        images=None,
        input_boxes: Optional[PromptInput] = None,
        input_points: Optional[PromptInput] = None,
        input_labels: Optional[PromptInput] = None,
        box_format: str = "xyxy",
        normalized: bool = False,
        original_sizes: Optional[PromptInput] = None,
        return_tensors: Optional[str] = "pt",
        **kwargs,
    ) -> BatchFeature:
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if box_format not in ("xyxy", "xywh"):
            raise ValueError(f"box_format must be 'xyxy' or 'xywh'; got {box_format!r}")
        data = {}
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors))
            sizes = data["original_sizes"].tolist()
        elif original_sizes is not None:
            sizes = torch.as_tensor(original_sizes).reshape(-1, 2).tolist()
            data["original_sizes"] = torch.tensor(sizes, dtype=torch.long)
        else:
            if input_boxes is not None or input_points is not None:
                raise ValueError("prompts need the image sizes: pass images or original_sizes")
            raise ValueError("nothing to process: pass images and/or prompts")
        num_images = len(sizes)

        boxes = _per_image(input_boxes, 2, "input_boxes", num_images)
        points = _per_image(input_points, 3, "input_points", num_images)
        labels = _per_image(input_labels, 2, "input_labels", num_images)
        if (points is None) != (labels is None):
            raise ValueError("input_points and input_labels must be given together")
        if boxes is not None:
            data["input_boxes"] = self._pad_stack(
                [self.rescale_boxes(b, s, box_format, normalized, i) for i, (b, s) in enumerate(zip(boxes, sizes))],
                (4,),
            )
        if points is not None:
            rescaled, checked = [], []
            for index, (pts, lbl, size) in enumerate(zip(points, labels, sizes)):
                if pts.shape[:-1] != lbl.shape or pts.shape[-1:] != (2,):
                    raise ValueError(
                        f"image {index}: input_points must be (queries, points, 2) and input_labels (queries, points); "
                        f"got {pts.shape} and {lbl.shape}"
                    )
                bad = ~np.isin(lbl, VALID_LABELS)
                if bad.any():
                    raise ValueError(f"image {index}: input_labels must be in {VALID_LABELS}; got {sorted(set(lbl[bad]))}")
                rescaled.append(self.rescale_points(pts, lbl, size, normalized))
                checked.append(lbl)
            data["input_points"] = self._pad_stack(rescaled, None)
            data["input_labels"] = self._pad_stack(checked, None).to(torch.long)
        return BatchFeature(data=data)

    # -- coordinate handling --------------------------------------------------------------------
    def _to_pixels(self, coords: np.ndarray, size, normalized: bool, what: str) -> np.ndarray:
        height, width = size
        if normalized:
            if coords.size and (coords.min() < 0 or coords.max() > 1):
                raise ValueError(
                    f"normalized {what} must lie in [0, 1]; got values from {coords.min():.4g} to {coords.max():.4g}. "
                    "Pass normalized=False for pixel coordinates."
                )
            coords = coords * np.array([width, height], dtype=np.float64)
        return coords

    def rescale_boxes(self, boxes: np.ndarray, size, box_format: str, normalized: bool, image_index: int = 0):
        """(Q, 4) boxes -> xyxy in the model frame, clipped to the image; errors for empty boxes."""
        height, width = size
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if box_format == "xywh":
            boxes = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
        corners = self._to_pixels(boxes.reshape(-1, 2, 2), size, normalized, "boxes").reshape(-1, 4)
        for query, (x1, y1, x2, y2) in enumerate(corners):
            if not (x2 > x1 and y2 > y1):
                raise ValueError(
                    f"image {image_index}, box {query}: ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is empty or inverted; "
                    f"boxes are {box_format} with x2 > x1 and y2 > y1"
                )
        clipped = corners.copy()
        clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
        clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
        for query, (x1, y1, x2, y2) in enumerate(clipped):
            if not (x2 > x1 and y2 > y1):
                raise ValueError(
                    f"image {image_index}, box {query}: ({', '.join(f'{v:g}' for v in corners[query])}) lies outside the "
                    f"{width}x{height} image"
                )
        scale = np.array([self.size / width, self.size / height] * 2)
        return clipped * scale

    def rescale_points(self, points: np.ndarray, labels: np.ndarray, size, normalized: bool) -> np.ndarray:
        """(Q, P, 2) points -> model frame; padding points (label -1) are returned untouched."""
        height, width = size
        padding = labels == LABEL_PADDING
        real = self._to_pixels(np.where(padding[..., None], 0.0, points), size, normalized, "points")
        scaled = real * np.array([self.size / width, self.size / height])
        return np.where(padding[..., None], points, scaled)

    @staticmethod
    def _pad_stack(arrays: list, trailing) -> torch.Tensor:
        """Stack per-image arrays, padding queries (and points) with -1."""
        max_queries = max(array.shape[0] for array in arrays) if arrays else 0
        max_queries = max(max_queries, 1)
        if trailing is None:  # points (Q, P, 2) or labels (Q, P)
            max_points = max((array.shape[1] for array in arrays if array.ndim > 1 and array.shape[0]), default=1)
            shape_tail = arrays[0].shape[2:]
            out = np.full((len(arrays), max_queries, max_points) + shape_tail, -1.0)
            for index, array in enumerate(arrays):
                if array.size:
                    out[index, : array.shape[0], : array.shape[1]] = array
        else:
            out = np.full((len(arrays), max_queries) + tuple(trailing), -1.0)
            for index, array in enumerate(arrays):
                if array.size:
                    out[index, : array.shape[0]] = array
        return torch.from_numpy(out).to(torch.float32)

    def post_process_masks(self, *args, **kwargs):
        return self.image_processor.post_process_masks(*args, **kwargs)


__all__ = ["EfficientSamProcessor"]
