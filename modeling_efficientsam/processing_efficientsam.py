"""Processor for EfficientSAM: images plus box / point prompts in original pixels or [0, 1].

Prompts are rescaled to the model's square input frame (x * size / W, y * size / H), because the
image is stretched, not letterboxed. Images with different numbers of queries are padded: a padded
box is (-1, -1, -1, -1) and padded points are (-1, -1) with label -1, which the model treats as
padding (see `EfficientSamModel`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
from transformers import ProcessorMixin
from transformers.image_processing_utils import BatchFeature

from .modeling_efficientsam import LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT, LABEL_PADDING, LABEL_POSITIVE, VALID_LABELS

logger = logging.getLogger(__name__)

PromptInput = Union[torch.Tensor, np.ndarray, Sequence]

#: Files a saved processor may live in (ProcessorMixin writes the first; older folders hold the second).
PROCESSOR_CONFIG_FILES = ("processor_config.json", "preprocessor_config.json")


# -- the one definition of the prompt geometry ----------------------------------------------------
def box_corner_points(boxes) -> tuple:
    """xyxy boxes ``(..., 4)`` -> the prompt encoder's form: points ``(..., 2, 2)`` and labels ``(..., 2)``.

    A box is its top-left corner (x1, y1), label 2, then its bottom-right corner (x2, y2), label 3.
    Points are float64 numpy arrays, labels int64.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must have a last dimension of 4 (x1, y1, x2, y2); got shape {boxes.shape}")
    labels = np.array([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT], dtype=np.int64)
    return boxes.reshape(*boxes.shape[:-1], 2, 2), np.broadcast_to(labels, boxes.shape[:-1] + (2,)).copy()


def to_model_frame(points, original_size, image_size: int) -> np.ndarray:
    """Pixel (x, y) points ``(..., 2)`` of an image of ``original_size`` (H, W) -> the square model input.

    The image is stretched (not letterboxed) to ``image_size`` x ``image_size``, so
    ``(x, y) -> (x * S / W, y * S / H)``.
    """
    height, width = original_size
    return np.asarray(points, dtype=np.float64) * np.array([image_size / width, image_size / height])


def to_original_frame(points, original_size, image_size: int) -> np.ndarray:
    """The inverse of :func:`to_model_frame`: model-frame (x, y) -> pixels of the original image."""
    height, width = original_size
    return np.asarray(points, dtype=np.float64) * np.array([width / image_size, height / image_size])


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
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> BatchFeature:
        """`dtype` is the floating type of `pixel_values` and of the rescaled coordinates (float32 by
        default; torch.float64 for a model run in double precision). Labels are always int64."""
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch dtype such as torch.float64; got {dtype!r}")
        if box_format not in ("xyxy", "xywh"):
            raise ValueError(f"box_format must be 'xyxy' or 'xywh'; got {box_format!r}")
        data = {}
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors, dtype=dtype))
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
        if labels is not None and points is None:
            raise ValueError("input_labels were given without input_points")
        if points is not None and labels is None:  # as in SAM: points without labels are positive clicks
            labels = [np.full(pts.shape[:-1], float(LABEL_POSITIVE)) for pts in points]
        if boxes is not None:
            data["input_boxes"] = self._pad_stack(
                [self.rescale_boxes(b, s, box_format, normalized, i) for i, (b, s) in enumerate(zip(boxes, sizes))],
                (4,),
            ).to(dtype)
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
                rescaled.append(self.rescale_points(pts, lbl, size, normalized, index))
                checked.append(lbl)
            data["input_points"] = self._pad_stack(rescaled, None).to(dtype)
            data["input_labels"] = self._pad_stack(checked, None).to(torch.long)
        return BatchFeature(data=data)

    # -- coordinate handling --------------------------------------------------------------------
    def _to_pixels(self, coords: np.ndarray, size, normalized: bool, what: str, image_index: int = 0) -> np.ndarray:
        height, width = size
        if not np.isfinite(coords).all():
            raise ValueError(
                f"image {image_index}: {what} must be finite numbers; got {coords[~np.isfinite(coords)][:4].tolist()} "
                "among them; fix or drop those prompts (a NaN or an infinity from an upstream computation?)"
            )
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
        corners = self._to_pixels(boxes.reshape(-1, 2, 2), size, normalized, "boxes", image_index).reshape(-1, 4)
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
        return to_model_frame(clipped.reshape(-1, 2, 2), size, self.size).reshape(-1, 4)

    def rescale_points(self, points: np.ndarray, labels: np.ndarray, size, normalized: bool,
                       image_index: int = 0) -> np.ndarray:
        """(Q, P, 2) points -> model frame; padding points (label -1) are returned untouched."""
        padding = labels == LABEL_PADDING
        if not np.isfinite(points[padding]).all():  # they enter the model (at (-1, -1) in the original)
            raise ValueError(f"image {image_index}: padding points (label -1) must have finite coordinates; use (-1, -1)")
        real = self._to_pixels(np.where(padding[..., None], 0.0, points), size, normalized, "points", image_index)
        return np.where(padding[..., None], points, to_model_frame(real, size, self.size))

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
        return torch.from_numpy(out)

    def post_process_masks(self, *args, **kwargs):
        """See `EfficientSamImageProcessor.post_process_masks` (SAM's call pattern)."""
        return self.image_processor.post_process_masks(*args, **kwargs)


_HUB_ARGUMENTS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def _processor_config_files(pretrained_model_name_or_path, **kwargs) -> list:
    """Paths of the processor config files that exist in a folder (or a Hub repo, downloaded)."""
    source = os.fspath(pretrained_model_name_or_path)
    if os.path.isdir(source):
        folder = os.path.join(source, kwargs.get("subfolder") or "")
        return [os.path.join(folder, name) for name in PROCESSOR_CONFIG_FILES if os.path.isfile(os.path.join(folder, name))]
    from transformers.utils import cached_file

    hub = {key: kwargs[key] for key in _HUB_ARGUMENTS if key in kwargs}
    found = [cached_file(source, name, _raise_exceptions_for_missing_entries=False, **hub) for name in PROCESSOR_CONFIG_FILES]
    return [path for path in found if path is not None]


def load_processor(pretrained_model_name_or_path, image_size: Optional[int] = None, **kwargs) -> EfficientSamProcessor:
    """The processor saved with a model (a folder or a Hub repo); the one loader every tool uses.

    * A folder without any processor config (``processor_config.json`` / ``preprocessor_config.json``)
      gets the default processor for ``image_size`` (the model's input size; 1024 when None), and a
      log line says so.
    * A processor config that exists but is not valid JSON is an error naming the file: silently
      falling back to the defaults could change the preprocessing of a fine-tuned model.

    ``kwargs`` go to ``EfficientSamImageProcessor.from_pretrained`` (``revision``, ``cache_dir``, ...).
    """
    from .image_processing_efficientsam import EfficientSamImageProcessor

    files = _processor_config_files(pretrained_model_name_or_path, **kwargs)
    if not files:
        size = 1024 if image_size is None else int(image_size)
        logger.info("%s has no processor config; using the default processor for size %d", pretrained_model_name_or_path, size)
        return EfficientSamProcessor(EfficientSamImageProcessor(size=size))
    for path in files:
        try:
            with open(path, encoding="utf-8") as handle:
                document = json.load(handle)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{path}: the processor config is not valid JSON ({error}). Fix: repair the file (save the processor "
                "again with save_pretrained), or delete it to use the default processor for the model's image size."
            ) from error
        if not isinstance(document, dict):
            raise ValueError(f"{path}: the processor config must be a JSON object, found {type(document).__name__}. "
                             "Fix: save the processor again with save_pretrained.")
    return EfficientSamProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)


__all__ = ["EfficientSamProcessor", "box_corner_points", "load_processor", "to_model_frame", "to_original_frame"]
