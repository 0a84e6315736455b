"""Image files referenced by a COCO file: check their size, pick the orientation, encode for storage.

Orientation rule (see data/README.md). Annotation tools (labelme, CVAT, Roboflow, ...) draw on the
image as it is displayed, i.e. after its EXIF orientation, and write that displayed size into the
JSON. Annotations are never transformed; only the image is. So:

* JSON (width, height) equals the EXIF-oriented size -> the image is stored with EXIF applied.
  Orientations that keep the size (none, mirror, 180 degrees) always land here: the size cannot
  tell the two readings apart and the displayed one is what tools show.
* otherwise, JSON equals the raw stored size -> the image is stored as its pixels lie in the file
  (the annotations were made on the un-rotated pixels).
* neither -> :class:`CocoValidationError` stating both sizes.

Stored images carry no orientation tag, so any reader (``datasets.Image`` applies EXIF on decode)
sees the pixels the annotations refer to.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from ..image_utils import image_size, pil_to_rgb
from .coco import CocoImage, coco_error, image_file_path

_ORIENTATION_TAG = 0x0112
_PASS_THROUGH_FORMATS = ("JPEG", "PNG")


@dataclass(frozen=True)
class ResolvedImage:
    path: str
    apply_exif: bool


def resolve_image(annotations_path: str, images_dir: str, image: CocoImage) -> ResolvedImage:
    """Find the file, compare its size with the JSON and decide whether EXIF rotation applies."""
    path = image_file_path(annotations_path, images_dir, image)
    record = f"image id {image.id} ({image.file_name})"
    try:
        raw = image_size(path, apply_exif=False)
        shown = image_size(path, apply_exif=True)
    except FileNotFoundError:
        raise coco_error(annotations_path, record, f"image file not found at {path}",
                         "put the image there, pass the right images directory, or remove the image record") from None
    except ValueError as error:
        raise coco_error(annotations_path, record, str(error).rstrip("."),
                         "replace the file with a readable image or remove the record") from error
    expected = (image.width, image.height)
    if expected == shown:
        return ResolvedImage(path, apply_exif=True)
    if expected == raw:
        return ResolvedImage(path, apply_exif=False)
    rotated = f" ({shown[0]}x{shown[1]} after its EXIF rotation)" if shown != raw else ""
    raise coco_error(
        annotations_path, record,
        f"the JSON says {image.width}x{image.height} (width x height) but the file {path} is {raw[0]}x{raw[1]}{rotated}",
        "correct width/height in the JSON or use the image the annotations were made on",
    )


def encode_for_storage(annotations_path: str, image: CocoImage, resolved: ResolvedImage) -> bytes:
    """Bytes of an 8-bit RGB image with no orientation tag, the pixels the annotations refer to.

    The whole image is decoded once to prove it is readable. An 8-bit RGB JPEG or PNG without an
    orientation tag is kept byte for byte (no recompression); anything else (grayscale, RGBA,
    palette, 16-bit, CMYK, an orientation tag, other formats) is converted to RGB and stored as PNG,
    losslessly.
    """
    record = f"image id {image.id} ({image.file_name})"
    try:
        with open(resolved.path, "rb") as handle:
            data = handle.read()
        with Image.open(io.BytesIO(data)) as source:
            source.load()
            orientation = source.getexif().get(_ORIENTATION_TAG, 1)
            if source.mode == "RGB" and source.format in _PASS_THROUGH_FORMATS and orientation == 1:
                return data
            # copy(): the pixels must outlive the file handle closed below
            rgb = pil_to_rgb(source, apply_exif=resolved.apply_exif).copy()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise coco_error(annotations_path, record, f"cannot decode {resolved.path} ({error})",
                         "replace the file with a readable image or remove the record") from error
    if rgb.size != (image.width, image.height):  # cannot happen after resolve_image; guards the rule above
        raise coco_error(annotations_path, record,
                         f"decoded size {rgb.size} differs from the JSON size {(image.width, image.height)}",
                         "correct width/height in the JSON")
    rgb.info.pop("exif", None)  # never store an orientation tag (datasets.Image would apply it)
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    return buffer.getvalue()
