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
from .mask_generation_efficientsam import EfficientSamMaskGenerationMixin

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SquareInputSize(int):
    """The side of the square model input: an `int` that also answers the size-dict lookups of transformers
    (`size["height"]`, `size.get("longest_edge")`, ...), which its pipelines make on every image processor.
    It is saved to JSON as a plain integer."""

    _KEYS = ("height", "width", "longest_edge", "shortest_edge")

    def __getitem__(self, key: str) -> int:
        if key not in self._KEYS:
            raise KeyError(key)
        return int(self)

    def get(self, key: str, default=None):
        return int(self) if key in self._KEYS else default

    def __repr__(self) -> str:
        return int.__repr__(self)


class EfficientSamImageProcessor(EfficientSamMaskGenerationMixin, BaseImageProcessor):
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

    It also provides the methods of transformers' `mask-generation` pipeline (`generate_crop_boxes`,
    `filter_masks`, `post_process_for_mask_generation`; see `mask_generation_efficientsam.py`).
    """

    model_input_names = ["pixel_values"]

    @property
    def size(self) -> SquareInputSize:
        """Side of the square model input (an int; also readable as `size["height"]`)."""
        return self.__dict__["size"]

    @size.setter
    def size(self, value) -> None:
        self.__dict__["size"] = SquareInputSize(value)

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
        masks: torch.Tensor,
        original_sizes: Union[torch.Tensor, Sequence[Sequence[int]]],
        reshaped_input_sizes: Optional[Union[torch.Tensor, Sequence[Sequence[int]]]] = None,
        mask_threshold: Optional[float] = None,
        binarize: bool = True,
        pad_size: Optional[dict] = None,
        return_tensors: str = "pt",
    ) -> list[torch.Tensor]:
        """Resize low-resolution logits to each image's original size.

        The call pattern is that of transformers' `SamImageProcessor.post_process_masks`
        (`masks, original_sizes, reshaped_input_sizes, mask_threshold=0.0, binarize=True`). EfficientSAM
        stretches the whole image to the square input without padding, so `reshaped_input_sizes` and
        `pad_size`, when given, must describe that square (anything else is an error: those masks
        were not made by this model's preprocessing).

        Args:
            masks: (B, Q, M, h, w) logits from the model (or (Q, M, h, w) for one image).
            original_sizes: (B, 2) sizes as (H, W).
            reshaped_input_sizes: optional (B, 2); each must be (size, size).
            mask_threshold: threshold for `binarize` (default the processor's, 0.0).
            binarize: threshold to booleans; if False, return the resized logits.
            pad_size: optional {"height": size, "width": size}.

        Returns a list of B tensors (Q, M, H, W): images may differ in size. The logits are resized
        bicubically (align_corners off) straight to H x W, as the original model.
        """
        if not isinstance(binarize, bool):
            raise TypeError(
                f"binarize must be True or False, got {type(binarize).__name__}; pass other arguments by keyword: "
                "post_process_masks(masks, original_sizes, reshaped_input_sizes=None, mask_threshold=None, binarize=True)"
            )
        if return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        if not isinstance(masks, torch.Tensor):
            raise TypeError(f"masks must be a torch.Tensor of logits (B, Q, M, h, w); got {type(masks).__name__}")
        if masks.dim() == 4:
            masks = masks.unsqueeze(0)
        if masks.dim() != 5:
            raise ValueError(f"masks must have shape (B, Q, M, h, w); got {tuple(masks.shape)}")
        sizes = torch.as_tensor(original_sizes).reshape(-1, 2).tolist()
        if len(sizes) != masks.shape[0]:
            raise ValueError(f"{len(sizes)} original sizes for {masks.shape[0]} images")
        square = [self.size, self.size]
        if reshaped_input_sizes is not None:
            reshaped = torch.as_tensor(reshaped_input_sizes).reshape(-1, 2).tolist()
            if any(list(map(int, item)) != square for item in reshaped):
                raise ValueError(
                    f"reshaped_input_sizes {reshaped} differ from this processor's {self.size}x{self.size} input: "
                    "EfficientSAM stretches every image to the square input (no aspect-preserving resize)"
                )
        if pad_size is not None and [pad_size.get("height"), pad_size.get("width")] != square:
            raise ValueError(f"pad_size {pad_size} differs from the {self.size}x{self.size} input; EfficientSAM pads nothing")
        threshold = self.mask_threshold if mask_threshold is None else mask_threshold
        results = []
        for image_masks, (height, width) in zip(masks, sizes):
            queries, candidates = image_masks.shape[:2]
            flat = image_masks.reshape(queries * candidates, 1, *image_masks.shape[-2:])
            if flat.dtype != torch.float64:  # half types are resized in float32; float64 stays float64
                flat = flat.to(torch.float32)
            resized = F.interpolate(flat, size=(int(height), int(width)), mode="bicubic", align_corners=False)
            resized = resized.reshape(queries, candidates, int(height), int(width))
            results.append(resized > threshold if binarize else resized)
        return results


__all__ = ["EfficientSamImageProcessor"]
