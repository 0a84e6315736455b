"""Validate the annotations of a COCO instance-segmentation file, repair or drop what cannot be used.

The file itself is read by :mod:`.coco` (fatal problems: it is not COCO, ids collide, a reference
points nowhere, a record is malformed; those raise :class:`~.coco.CocoValidationError` naming the
file, the record and the fix). Here the annotations are cleaned: problems with one obvious repair,
or that make an annotation unusable, are repaired or dropped, and every affected annotation id is
recorded under a named reason (see :data:`REPAIR_REASONS` and :data:`DROP_REASONS`) so the report
accounts for each of them. With ``strict=True`` each of them is a ``CocoValidationError`` instead.

Masks are computed exactly as ``pycocotools.coco.COCO.annToRLE`` does (polygons rasterised at the
JSON image size and merged; uncompressed RLE compressed; compressed RLE kept), so a decoded mask
equals ``COCO.annToMask`` bit for bit. Two guards come first, because pycocotools trusts its input:
every RLE is checked to encode exactly height x width pixels (:func:`~.masks.rle_problem`), and a
polygon part reaching more than :data:`POLYGON_MARGIN` image sides outside the image is clipped to
that margin (a 1e12 coordinate would crash the rasteriser; see :func:`polygon_parts`). Box checks use ``pycocotools.mask.toBbox`` and ``area`` on
the RLE, so no dense mask is built during conversion.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

from pycocotools import mask as mask_utils

from .coco import CocoImage, coco_error, is_number, parse_bbox, parse_categories, parse_images, read_coco_json, require_int
from .masks import rle_problem

#: Polygon points may lie this many image sides (the larger one) outside the image before the
#: polygon is clipped (see :func:`polygon_parts`).
POLYGON_MARGIN = 1.0

# Repairs keep the annotation; drops remove it. Keys are the reason names used in report.json.
REPAIR_REASONS = {
    "polygon_part_too_few_points": "a polygon part with fewer than 3 points was removed (other parts kept)",
    "polygon_clipped": "polygon points lay more than one image side outside the image; the polygon was clipped to "
                       "the image grown by that margin",
    "box_missing": "the annotation has no bbox; the mask's tight box is used",
    "box_outside_image": "the box reached outside the image and was clipped to it",
    "box_zero_size": "the box had zero (or negative) width or height; the mask's tight box is used",
}
DROP_REASONS = {
    "segmentation_missing": "the annotation has no segmentation (missing, null or empty)",
    "no_valid_polygon": "every polygon part had fewer than 3 points",
    "polygon_outside_image": "the polygon lies wholly outside the image",
    "empty_mask": "the mask covers no pixel",
    "box_mask_mismatch": "the IoU between the box and the mask's tight box is below box_mask_iou_threshold",
}


@dataclass
class CocoSplit:
    """A parsed and cleaned COCO file."""

    annotations_path: str
    images_dir: str
    categories: dict  # COCO category id -> name
    images: list  # CocoImage, in JSON order
    num_annotations: int
    dropped: dict  # reason -> [{"annotation_id", "image_id", "file_name"}]
    repaired: dict  # reason -> [{"annotation_id", "image_id", "file_name"}]


def _clip_polygon(points: list, left: float, top: float, right: float, bottom: float) -> list:
    """Sutherland-Hodgman clip of a polygon (list of (x, y)) to a rectangle, in exact arithmetic.

    Fractions keep the cut points exact for any finite input (1e300 included), where float
    differences could overflow to inf.
    """
    def cut(points, inside, crossing):
        kept = []
        for index, current in enumerate(points):
            previous = points[index - 1]
            if inside(current):
                if not inside(previous):
                    kept.append(crossing(previous, current))
                kept.append(current)
            elif inside(previous):
                kept.append(crossing(previous, current))
        return kept

    def at_x(limit):
        return lambda p, q: (limit, p[1] + (q[1] - p[1]) * (limit - p[0]) / (q[0] - p[0]))

    def at_y(limit):
        return lambda p, q: (p[0] + (q[0] - p[0]) * (limit - p[1]) / (q[1] - p[1]), limit)

    left, top, right, bottom = (Fraction(v) for v in (left, top, right, bottom))
    points = [(Fraction(x), Fraction(y)) for x, y in points]
    for inside, crossing in (
        (lambda p: p[0] >= left, at_x(left)), (lambda p: p[0] <= right, at_x(right)),
        (lambda p: p[1] >= top, at_y(top)), (lambda p: p[1] <= bottom, at_y(bottom)),
    ):
        if not points:
            break
        points = cut(points, inside, crossing)
    return [(float(x), float(y)) for x, y in points]


def polygon_parts(path, record, segmentation: list, height: int, width: int, repairs: list) -> list:
    """Checked polygon parts, ready for ``frPyObjects``; an empty list means none is left.

    * A part that is not a flat list of finite numbers, or has an odd length, is a
      :class:`~.coco.CocoValidationError` (NaN and infinity included).
    * A part with fewer than 3 points is removed (``polygon_part_too_few_points``).
    * A part with a point more than :data:`POLYGON_MARGIN` image sides outside the image is clipped
      to the image grown by that margin (``polygon_clipped``); a part that lies wholly outside it
      is removed. ``pycocotools`` rasterises at 5x resolution in C ints and allocates memory in
      proportion to the edge lengths, so a coordinate like 1e12 crashes it (or exhausts memory);
      within the margin the polygon is passed on untouched, so its mask is exactly ``annToMask``'s.
    """
    margin = POLYGON_MARGIN * max(height, width)
    left, top, right, bottom = -margin, -margin, width + margin, height + margin
    parts = []
    for part in segmentation:
        if not isinstance(part, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in part):
            raise coco_error(path, record, "a polygon must be a list of numbers [x1, y1, x2, y2, ...]", "fix or remove the polygon")
        if not all(is_number(value) for value in part):
            bad = next(value for value in part if not is_number(value))
            raise coco_error(path, record, f"a polygon has a coordinate that is not a finite number ({bad!r})",
                             "fix or remove the polygon")
        if len(part) % 2:
            raise coco_error(path, record, f"a polygon has an odd number of coordinates ({len(part)})", "fix or remove the polygon")
        if len(part) < 6:
            repairs.append("polygon_part_too_few_points")
            continue
        xs, ys = part[0::2], part[1::2]
        if min(xs) < left or max(xs) > right or min(ys) < top or max(ys) > bottom:
            repairs.append("polygon_clipped")
            clipped = _clip_polygon(list(zip(xs, ys)), left, top, right, bottom)
            if len(clipped) < 3:
                continue
            part = [value for point in clipped for value in point]
        parts.append([float(value) for value in part])
    return parts


def _covers_image(part: list, height: int, width: int) -> bool:
    """Whether the part's extent overlaps the inside of the image (else pycocotools draws no pixel of it)."""
    xs, ys = part[0::2], part[1::2]
    return min(xs) < width and max(xs) > 0 and min(ys) < height and max(ys) > 0


def segmentation_to_rle(path, record, segmentation, height, width, repairs):
    """COCO segmentation -> (compressed RLE dict or None, drop reason or None).

    Mirrors ``COCO.annToRLE`` after the checks of :func:`polygon_parts` (polygons) and
    :func:`~.masks.rle_problem` (RLE: size, well-formed counts covering exactly height x width
    pixels; a bad RLE is a :class:`~.coco.CocoValidationError`, since pycocotools would read it
    without complaint and produce nonsense).
    """
    if segmentation is None or (isinstance(segmentation, (list, dict)) and len(segmentation) == 0):
        return None, "segmentation_missing"
    if isinstance(segmentation, list):
        had_parts = any(isinstance(part, list) and len(part) >= 6 for part in segmentation)
        parts = polygon_parts(path, record, segmentation, height, width, repairs)
        if not had_parts:
            return None, "no_valid_polygon"
        if not any(_covers_image(part, height, width) for part in parts):
            return None, "polygon_outside_image"
        rle = mask_utils.merge(mask_utils.frPyObjects(parts, height, width))
    elif isinstance(segmentation, dict):
        problem = rle_problem(segmentation, height, width)
        if problem is not None:
            raise coco_error(path, record, problem,
                             "encode the mask again at the image size (pycocotools.mask.encode), or remove the annotation")
        if isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            counts = segmentation["counts"]
            rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise coco_error(path, record, f"segmentation must be a polygon list or an RLE object, found {type(segmentation).__name__}", "fix it")
    counts = rle["counts"]
    return {"counts": counts.decode("ascii") if isinstance(counts, bytes) else counts, "size": [height, width]}, None


def _box_iou(a, b) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def clean_annotation(path, annotation, image: CocoImage, box_mask_iou_threshold: float):
    """Validate, repair or drop one annotation.

    Returns ``(object or None, repairs, drop_reason)``. The object holds ``id``, ``category_id``
    (COCO id), ``box`` (xyxy float pixels), ``mask`` (compressed RLE, counts as str), ``area``
    (pixel count of the mask) and ``iscrowd`` (0 or 1).

    Box rules, in this order: a missing box becomes the mask's tight box; a box reaching outside
    the image is clipped; a box of zero (or negative) width or height after clipping is replaced by
    the mask's tight box (never dropped, since the mask is non-empty at that point); otherwise a box
    whose IoU with the mask's tight box is below the threshold drops the annotation.
    """
    record = f"annotation id {annotation['id']} (image id {image.id}, {image.file_name})"
    repairs: list = []
    rle, drop = segmentation_to_rle(path, record, annotation.get("segmentation"), image.height, image.width, repairs)
    if drop is not None:
        return None, repairs, drop
    coco_rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    area = float(mask_utils.area(coco_rle))
    if area <= 0:
        return None, repairs, "empty_mask"
    mx, my, mw, mh = (float(v) for v in mask_utils.toBbox(coco_rle))
    mask_box = [mx, my, mx + mw, my + mh]

    bbox = annotation.get("bbox")
    if bbox is None:
        box = list(mask_box)
        repairs.append("box_missing")
    else:
        x, y, w, h = parse_bbox(path, record, bbox)
        box = [x, y, x + w, y + h]
        if w > 0 and h > 0 and (box[0] < 0 or box[1] < 0 or box[2] > image.width or box[3] > image.height):
            box = [min(max(box[0], 0.0), image.width), min(max(box[1], 0.0), image.height),
                   min(max(box[2], 0.0), image.width), min(max(box[3], 0.0), image.height)]
            repairs.append("box_outside_image")
        if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
            box = list(mask_box)
            repairs.append("box_zero_size")
        elif _box_iou(box, mask_box) < box_mask_iou_threshold:
            return None, repairs, "box_mask_mismatch"
    iscrowd = annotation.get("iscrowd", 0)
    if iscrowd not in (0, 1, True, False):
        raise coco_error(path, record, f'"iscrowd" must be 0 or 1, found {iscrowd!r}', "set iscrowd to 0 or 1")
    return (
        {
            "id": int(annotation["id"]),
            "category_id": int(annotation["category_id"]),
            "box": box,
            "mask": rle,
            "area": area,
            "iscrowd": int(iscrowd),
        },
        repairs,
        None,
    )


def read_split_records(path: str, data: Optional[dict] = None):
    """``(data, categories, images)`` of one COCO file (``data`` when already read)."""
    data = read_coco_json(path) if data is None else data
    return data, parse_categories(path, data), parse_images(path, data)


def iter_annotations(path: str, data: dict, categories, images):
    """Each annotation of ``data`` with its checked references:
    ``(annotation, annotation_id, image_id, category_id, image)``.

    Fatal problems (not an object, missing or duplicate id, unknown image or category) are errors
    naming the file and the record; what is done with a valid annotation is the caller's.
    """
    by_id = {image.id: image for image in images}
    seen: set = set()
    for index, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict):
            raise coco_error(path, f"annotations[{index}]", "an annotation must be an object", "fix the record")
        annotation_id = require_int(path, f"annotations[{index}]", annotation, "id")
        record = f"annotation id {annotation_id}"
        if annotation_id in seen:
            raise coco_error(path, record, "duplicate annotation id", "give every annotation a unique id")
        seen.add(annotation_id)
        image_id = require_int(path, record, annotation, "image_id")
        category_id = require_int(path, record, annotation, "category_id")
        if image_id not in by_id:
            raise coco_error(path, record, f"image_id {image_id} is not in the images list", "add the image record or remove the annotation")
        if category_id not in categories:
            raise coco_error(
                path, record, f"category_id {category_id} is not in the categories list (known: {sorted(categories)})",
                "add the category or correct the annotation's category_id",
            )
        yield annotation, annotation_id, image_id, category_id, by_id[image_id]


def load_coco_split(
    annotations_path: str | os.PathLike,
    images_dir: str | os.PathLike,
    strict: bool = False,
    box_mask_iou_threshold: float = 0.5,
    data: Optional[dict] = None,
) -> CocoSplit:
    """Parse, validate and clean one COCO file. Image files are not opened here."""
    if not 0.0 <= box_mask_iou_threshold <= 1.0:
        raise ValueError(f"box_mask_iou_threshold must be in [0, 1], got {box_mask_iou_threshold}")
    path = str(annotations_path)
    data, categories, images = read_split_records(path, data)
    dropped: dict = {}
    repaired: dict = {}
    for annotation, annotation_id, image_id, _, image in iter_annotations(path, data, categories, images):
        obj, repairs, drop = clean_annotation(path, annotation, image, box_mask_iou_threshold)
        # A dropped annotation is listed under its drop reason only; a kept one under each repair.
        problems = [(drop, DROP_REASONS[drop], "drop")] if drop is not None else [
            (reason, REPAIR_REASONS[reason], "repair") for reason in dict.fromkeys(repairs)
        ]
        if strict and problems:
            reason, text, action = problems[0]
            raise coco_error(
                path, f"annotation id {annotation_id} (image id {image_id}, {image.file_name})", f"{reason}: {text}",
                f"correct the annotation, or convert without --strict to {action} it and have it listed in report.json",
            )
        entry = {"annotation_id": annotation_id, "image_id": image_id, "file_name": image.file_name}
        for reason, _, action in problems:
            (dropped if action == "drop" else repaired).setdefault(reason, []).append(entry)
        if drop is None:
            image.objects.append(obj)
    return CocoSplit(
        annotations_path=path,
        images_dir=str(images_dir),
        categories=categories,
        images=images,
        num_annotations=len(data["annotations"]),
        dropped=dropped,
        repaired=repaired,
    )
