"""Image processor for EfficientSAM: stretch to the square input, normalize, and map masks back.

EfficientSAM does not keep the aspect ratio: the [0, 1] float image is resized straight to
``size x size`` with bilinear interpolation (no antialiasing, align_corners off) and nothing is padded.
This processor reproduces that arithmetic with torch so its pixels equal the original model's.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .image_utils import to_rgb_array

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EfficientSamImageProcessor(BaseImageProcessor):
    r"""Turns images into `pixel_values` and resizes predicted mask logits back to the images.

    Args:
        size (`int`, defaults to 1024): side of the square model input (the model's `image_size`).
        image_mean (`tuple[float]`), image_std (`tuple[float]`): normalization of [0, 1] RGB values.
        mask_threshold (`float`, defaults to 0.0): logit threshold used by `post_process_masks`.
        apply_exif_orientation (`bool`, defaults to True): rotate PIL images / files by their EXIF tag.

    Accepted images: file paths, PIL images of any mode (RGB, L, LA, P, RGBA, I;16, ...), numpy arrays
    or torch tensors shaped (H, W), (H, W, C) or (C, H, W) with 1, 3 or 4 channels, uint8, uint16
    (scaled by 65535) or float in [0, 1]. Everything becomes 8-bit RGB first, as the original model
    was fed ``uint8 / 255``.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: int = 1024,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        mask_threshold: float = 0.0,
        apply_exif_orientation: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(size, dict):  # tolerate the {"height": h, "width": w} form of other processors
            if size.get("height") != size.get("width"):
                raise ValueError(f"EfficientSAM takes a square input; got size={size}")
            size = size["height"]
        self.size = int(size)
        self.image_mean = [float(value) for value in image_mean]
        self.image_std = [float(value) for value in image_std]
        self.mask_threshold = float(mask_threshold)
        self.apply_exif_orientation = bool(apply_exif_orientation)

    def to_rgb(self, image) -> np.ndarray:
        """One image as an (H, W, 3) uint8 array (EXIF orientation applied when enabled)."""
        try:
            return to_rgb_array(image, apply_exif=self.apply_exif_orientation)
        except (TypeError, ValueError) as error:
            raise ValueError(f"EfficientSamImageProcessor cannot read this image: {error}") from error

    def normalize_tensor(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, 3, H, W) uint8 tensor -> (B, 3, size, size) normalized pixels, as the original model.

        `dtype` is the floating type of the whole computation (float32 by default; float64 reproduces
        the original model run in double precision). The mean and std are rounded to float32 first in
        every dtype, because the original keeps them as float32 buffers.
        """
        images = images.to(dtype) / 255.0
        if images.shape[-2:] != (self.size, self.size):
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        mean = torch.tensor(self.image_mean, dtype=torch.float32, device=images.device).to(dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32, device=images.device).to(dtype).view(1, -1, 1, 1)
        return (images - mean) / std

    def preprocess(
        self, images, return_tensors: Optional[str] = "pt", dtype: torch.dtype = torch.float32, **kwargs
    ) -> BatchFeature:
        """Images (one or a list) -> `pixel_values` (B, 3, size, size) and `original_sizes` (B, 2) as (H, W).

        `dtype` (float32 by default, or float64 / a half type) is the floating type of `pixel_values`.
        """
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch dtype such as torch.float64; got {dtype!r}")
        if images is None:
            raise ValueError("no images were given")
        single = not isinstance(images, (list, tuple))
        if single and isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            images = list(images)
        elif single:
            images = [images]
        if len(images) == 0:
            raise ValueError("an empty list of images was given")
        pixel_values, original_sizes = [], []
        for image in images:
            array = self.to_rgb(image)
            original_sizes.append(array.shape[:2])
            tensor = torch.from_numpy(np.array(array, copy=not array.flags.writeable)).permute(2, 0, 1).unsqueeze(0)
            pixel_values.append(self.normalize_tensor(tensor, dtype))
        data = {
            "pixel_values": torch.cat(pixel_values),
            "original_sizes": torch.tensor(original_sizes, dtype=torch.long),
        }
        if return_tensors not in ("pt", None):
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        return BatchFeature(data=data, tensor_type=None)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def post_process_masks(
        self,
        pred_masks: torch.Tensor,
        original_sizes: Union[torch.Tensor, Sequence[Sequence[int]]],
        binarize: bool = True,
        mask_threshold: Optional[float] = None,
    ) -> list[torch.Tensor]:
        """Resize low-resolution logits to each image's original size.

        Args:
            pred_masks: (B, Q, M, h, w) logits from the model (or (Q, M, h, w) for one image).
            original_sizes: (B, 2) sizes as (H, W).
            binarize: threshold at `mask_threshold` (default the processor's, 0.0) to booleans; if False,
                return the resized logits.

        Returns a list of B tensors (Q, M, H, W): images may differ in size. The logits are resized
        bicubically (align_corners off) straight to H x W, as the original model.
        """
        if pred_masks.dim() == 4:
            pred_masks = pred_masks.unsqueeze(0)
        if pred_masks.dim() != 5:
            raise ValueError(f"pred_masks must have shape (B, Q, M, h, w); got {tuple(pred_masks.shape)}")
        sizes = torch.as_tensor(original_sizes).reshape(-1, 2).tolist()
        if len(sizes) != pred_masks.shape[0]:
            raise ValueError(f"{len(sizes)} original sizes for {pred_masks.shape[0]} images")
        threshold = self.mask_threshold if mask_threshold is None else mask_threshold
        results = []
        for masks, (height, width) in zip(pred_masks, sizes):
            queries, candidates = masks.shape[:2]
            flat = masks.reshape(queries * candidates, 1, *masks.shape[-2:])
            if flat.dtype != torch.float64:  # half types are resized in float32; float64 stays float64
                flat = flat.to(torch.float32)
            resized = F.interpolate(flat, size=(int(height), int(width)), mode="bicubic", align_corners=False)
            resized = resized.reshape(queries, candidates, int(height), int(width))
            results.append(resized > threshold if binarize else resized)
        return results


__all__ = ["EfficientSamImageProcessor"]
