"""Reading images into RGB, the one place where image modes and EXIF orientation are handled.

Used by the image processor (inference), the dataset converter and the predictor, so that every
path into the model sees the same pixels.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, "torch.Tensor"]  # noqa: F821


def _high_bit_depth_to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale a 16-bit (or 32-bit integer) array to uint8 by its full numeric range."""
    if array.dtype == np.uint16:
        return (array.astype(np.float32) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        return ((array.astype(np.float64) - info.min) / (info.max - info.min) * 255.0 + 0.5).astype(np.uint8)
    raise TypeError(f"unsupported array dtype {array.dtype}")


#: Float pixels may lie this far outside their range: less than half an 8-bit step, so the value
#: rounds to 0 or 255 anyway. Anything further out is an error, never silently clipped.
FLOAT_RANGE_TOLERANCE = 0.5 / 255.0


def _float_to_uint8(array: np.ndarray, high: float = 1.0) -> np.ndarray:
    """Float pixels in [0, high] -> uint8 by rounding; NaN, infinity or values outside the range are errors."""
    finite = np.isfinite(array)
    if not finite.all():
        bad = array[~finite].flat[0]
        raise ValueError(
            f"the float image holds {int((~finite).sum())} non-finite values (e.g. {bad}). "
            "Fix: replace NaN / infinite pixels before passing the image"
        )
    low_value, high_value = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    slack = FLOAT_RANGE_TOLERANCE * high
    if low_value < -slack or high_value > high + slack:
        scale = "[0, 1]" if high == 1.0 else f"[0, 1] or [0, {high:g}]"
        raise ValueError(
            f"float image values must lie in {scale}; found {low_value:g} to {high_value:g}. Fix: scale the image into "
            "[0, 1] (e.g. divide 8-bit values by 255) or pass it as uint8"
        )
    return (np.clip(array / high, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def pil_to_rgb(image: Image.Image, apply_exif: bool = True) -> Image.Image:
    """Convert any PIL image (L, LA, P, PA, RGBA, CMYK, I;16, I, F, ...) to 8-bit RGB.

    EXIF orientation is applied first when ``apply_exif`` is true. Alpha is dropped (not composited):
    segmentation targets refer to the colour pixels, whatever their transparency.
    """
    if apply_exif:
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image)
        if mode == "I" and array.max(initial=0) <= 65535 and array.min(initial=0) >= 0:
            array = array.astype(np.uint16)
        return Image.fromarray(_high_bit_depth_to_uint8(array)).convert("RGB")
    if mode == "F":  # 32-bit float pixels: [0, 1], or [0, 255] when any value exceeds 1
        array = np.asarray(image, dtype=np.float32)
        finite_max = float(array[np.isfinite(array)].max(initial=0.0))
        high = 1.0 if finite_max <= 1.0 + FLOAT_RANGE_TOLERANCE else 255.0
        return Image.fromarray(_float_to_uint8(array, high)).convert("RGB")
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_image(path: Union[str, os.PathLike], apply_exif: bool = True) -> Image.Image:
    """Open an image file and return it as 8-bit RGB; errors name the file."""
    try:
        with Image.open(path) as handle:
            handle.load()
            return pil_to_rgb(handle, apply_exif=apply_exif)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {path}: {error}. Check that the file is a valid image.") from error


def image_size(path: Union[str, os.PathLike], apply_exif: bool = False) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels.

    With ``apply_exif`` the size after EXIF rotation is returned (width and height swapped for
    orientations 5 to 8).
    """
    try:
        with Image.open(path) as handle:
            width, height = handle.size
            if apply_exif:
                orientation = handle.getexif().get(0x0112, 1)
                if orientation in (5, 6, 7, 8):
                    width, height = height, width
            return width, height
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}. Check that the file is a valid image.") from error


def _non_empty(array: np.ndarray, what: str) -> np.ndarray:
    """``array`` (H, W, ...) unless it has no pixel, which would only fail later deep inside torch."""
    if array.ndim < 2 or array.shape[0] == 0 or array.shape[1] == 0:
        size = f"{array.shape[1]} x {array.shape[0]}" if array.ndim >= 2 else f"shape {array.shape}"
        raise ValueError(f"the {what} has no pixels ({size}, width x height). Fix: pass an image at least 1 x 1 pixel")
    return array


def to_rgb_array(image: ImageLike, apply_exif: bool = True) -> np.ndarray:
    """Return an (H, W, 3) uint8 array from a path, PIL image, numpy array or torch tensor.

    Arrays and tensors may be (H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4}; uint8 values are
    used as they are, uint16 is scaled by 65535, floats must be in [0, 1] already (within half an
    8-bit step): NaN, infinity or values outside that range raise ``ValueError`` rather than being
    clipped. An image without pixels (0 x 0, or zero width or height) raises ``ValueError`` too.
    """
    if isinstance(image, (str, os.PathLike)):
        return _non_empty(np.asarray(load_image(image, apply_exif=apply_exif)), f"image {os.fspath(image)}")
    if isinstance(image, Image.Image):
        return _non_empty(np.asarray(pil_to_rgb(image, apply_exif=apply_exif)), "PIL image")
    if type(image).__module__.startswith("torch"):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"expected a file path, PIL.Image, numpy array or torch tensor, got {type(image).__name__}"
        )
    array = image
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.transpose(array, (1, 2, 0))
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"expected an image array of shape (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; got {image.shape}"
        )
    _non_empty(array, f"image array of shape {tuple(image.shape)}")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        array = _float_to_uint8(array)
    elif np.issubdtype(array.dtype, np.integer):
        array = _high_bit_depth_to_uint8(array.astype(np.uint16) if array.max(initial=0) <= 65535 and array.min(initial=0) >= 0 else array)
    else:
        raise TypeError(f"unsupported image dtype {array.dtype}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        array = array[..., :3]
    return np.ascontiguousarray(array)
