"""Reading COCO JSON files: the one reader for the dataset conversion and the command lines.

Everything that opens a COCO file goes through here: instance-segmentation files for the dataset
conversion (:func:`read_coco_json`, then ``coco_cleaning.load_coco_split``) and the box sources of
``efficientsam-predict`` (:func:`load_box_source`: an annotations file or a detection results
list). Problems that make a file unusable raise :class:`CocoValidationError` (a ``ValueError``)
with one message shape: ``FILE: RECORD: PROBLEM. Fix: WHAT TO CHANGE``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional


class CocoValidationError(ValueError):
    """A COCO file (or an image it references) cannot be used as it is.

    The message names the file, the record (image id, annotation id or file name) and the fix.
    """


def coco_error(path, record: str, problem: str, fix: str) -> CocoValidationError:
    """The error for ``record`` of the file ``path``: ``"{path}: {record}: {problem}. Fix: {fix}"``."""
    return CocoValidationError(f"{path}: {record}: {problem}. Fix: {fix}")


@dataclass
class CocoImage:
    """One image record of the JSON (plus, after cleaning, its annotations as ``objects``).

    ``width`` and ``height`` are None only for records read with ``require_size=False``.
    """

    id: int
    file_name: str
    width: Optional[int]
    height: Optional[int]
    objects: list = field(default_factory=list)  # dicts, see coco_cleaning.clean_annotation


def read_json_file(path, what: str = "annotation") -> object:
    """Parse a JSON file; a missing or unreadable file is a :class:`CocoValidationError`."""
    path = str(path)
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise coco_error(path, "file", f"{what} file not found", "pass the path of an existing COCO JSON file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise coco_error(path, "file", f"cannot read it as JSON ({error})", "export the file again as COCO JSON") from error


def read_coco_json(path) -> dict:
    """Load an instance-segmentation file and check its top level (``images``, ``annotations``, ``categories``)."""
    path = str(path)
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise coco_error(path, "top level", f"expected a JSON object, found {type(data).__name__}",
                         "export the annotations as COCO JSON")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            found = "missing" if key not in data else f"a {type(data[key]).__name__}"
            raise coco_error(
                path, f'key "{key}"', f"a COCO instance file needs a list here, found {found}",
                "export instance segmentation annotations in COCO format (images, annotations, categories)",
            )
    return data


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_int(path, record: str, entry: dict, key: str, positive: bool = False) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise coco_error(path, record, f'field "{key}" must be an integer, found {value!r}', f'set "{key}" to an integer')
    if positive and value <= 0:
        raise coco_error(path, record, f'field "{key}" must be positive, found {value!r}', f'set "{key}" to the image size in pixels')
    return int(value)


def parse_bbox(path, record: str, bbox) -> list:
    """A COCO ``bbox`` ``[x, y, width, height]`` as four floats (any finite numbers; checked later)."""
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
        raise coco_error(path, record, f'"bbox" must be [x, y, width, height], found {bbox!r}', "fix or remove the bbox")
    return [float(v) for v in bbox]


def parse_categories(path, data: dict) -> dict:
    """COCO category id -> name; duplicate ids or names are fatal."""
    categories: dict = {}
    names: dict = {}
    for index, entry in enumerate(data["categories"]):
        record = f"categories[{index}]"
        if not isinstance(entry, dict):
            raise coco_error(path, record, "a category must be an object", 'give each category an "id" and a "name"')
        category_id = require_int(path, record, entry, "id")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise coco_error(path, f"category id {category_id}", f'"name" must be a non-empty string, found {name!r}',
                             "name the category")
        if category_id in categories:
            raise coco_error(path, f"category id {category_id}", "duplicate category id", "give every category a unique id")
        if name in names:
            raise coco_error(
                path, f"category id {category_id}", f'name "{name}" is also used by category id {names[name]}',
                "give every category a unique name (or merge the two categories)",
            )
        categories[category_id] = name
        names[name] = category_id
    return categories


def parse_images(path, data: dict, require_size: bool = True) -> list:
    """The ``images`` list as :class:`CocoImage` records (JSON order).

    Fatal: duplicate ids, and two records naming the same file (compared after normalising the path,
    so ``a.png`` and ``./a.png`` are one file): its annotations would be split between two image ids.
    With ``require_size=False`` a record may leave out ``width`` / ``height`` (given ones are checked).
    """
    images, seen, files = [], set(), {}
    for index, entry in enumerate(data["images"]):
        record = f"images[{index}]"
        if not isinstance(entry, dict):
            raise coco_error(path, record, "an image record must be an object", 'give each image "id", "file_name", "width", "height"')
        image_id = require_int(path, record, entry, "id")
        record = f"image id {image_id}"
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise coco_error(path, record, f'"file_name" must be a non-empty string, found {file_name!r}', "set the image file name")
        record = f"image id {image_id} ({file_name})"
        if image_id in seen:
            raise coco_error(path, record, "duplicate image id", "give every image a unique id")
        seen.add(image_id)
        key = os.path.normpath(file_name)
        if key in files:
            raise coco_error(
                path, record, f'file_name "{file_name}" names the same file as image id {files[key]}',
                f"keep one image record per file: remove image id {image_id} or image id {files[key]} and point its "
                "annotations at the other",
            )
        files[key] = image_id
        sizes = [require_int(path, record, entry, key, positive=True)
                 if require_size or entry.get(key) is not None else None for key in ("width", "height")]
        images.append(CocoImage(id=image_id, file_name=file_name, width=sizes[0], height=sizes[1]))
    return images


def image_file_path(path, images_dir, image: CocoImage) -> str:
    """``images_dir / file_name``, refusing a ``file_name`` that leads out of ``images_dir``.

    ``file_name`` is relative to the images folder (sub-folders allowed). One whose ``..`` parts climb
    above the folder, or an absolute path elsewhere, would read a file the user did not point at, so
    it is a :class:`CocoValidationError` naming the record (an absolute path inside the folder is
    accepted; symbolic links inside the folder are followed as usual, since putting a link there is
    an explicit choice).
    """
    file_name, images_dir = image.file_name, os.fspath(images_dir)
    if os.path.isabs(file_name):  # allowed only when it lies inside the images folder anyway
        folder = os.path.abspath(images_dir)
        escapes = os.path.commonpath([folder, os.path.abspath(file_name)]) != folder
    else:
        normalised = os.path.normpath(os.path.splitdrive(file_name)[1])
        escapes = bool(os.path.splitdrive(file_name)[0]) or normalised == os.pardir or normalised.startswith(os.pardir + os.sep)
    if escapes:
        raise coco_error(
            path, f"image id {image.id} ({file_name})", f"file_name leads outside the images folder {images_dir}",
            "make file_name a path relative to the images folder, without leading '..' (move or link the image into the "
            "folder, or pass the folder that holds the images as the images directory)",
        )
    return os.path.join(images_dir, file_name)


# ----------------------------------------------------------------------------------------------
# box sources for prompting: a COCO annotations file or a COCO detection results list
# ----------------------------------------------------------------------------------------------


@dataclass
class BoxEntry:
    """One prompt box: xywh pixels, its category and where it came from."""

    bbox: list
    category_id: int
    source: str  # "annotation 12" / "detection 3"
    detection_score: Optional[float] = None


@dataclass
class BoxSource:
    kind: str  # "annotations" or "detections"
    images: dict  # image id -> CocoImage, in file order
    boxes: dict  # image id -> [BoxEntry]
    problems: dict = field(default_factory=dict)  # reason -> list of descriptions
    counts: dict = field(default_factory=dict)  # reason -> count (for things not worth listing)

    def report(self, reason: str, description: str) -> None:
        self.problems.setdefault(reason, []).append(description)


def _images_of(path, document) -> dict:
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise coco_error(path, 'key "images"', 'expected a COCO file with an "images" list',
                         "give a COCO file whose images list maps image ids to file names")
    return {image.id: image for image in parse_images(path, document, require_size=False)}


def _box_from_segmentation(path, name: str, annotation: dict, image: CocoImage):
    """``([x, y, w, h], None)``: the tight box of the annotation's mask; or ``(None, why not)``."""
    from pycocotools import mask as mask_utils

    from .coco_cleaning import DROP_REASONS, segmentation_to_rle  # coco_cleaning imports this module

    segmentation = annotation.get("segmentation")
    if segmentation is None:
        return None, "no bbox and no segmentation to derive one from"
    if image.width is None or image.height is None:
        return None, "no bbox, and the image record has no width / height to draw its segmentation at"
    try:
        rle, drop = segmentation_to_rle(path, name, segmentation, image.height, image.width, [])
    except CocoValidationError as error:
        return None, f"no bbox, and its segmentation is unusable ({error})"
    if drop is not None:
        return None, f"no bbox, and no box can be derived from its segmentation ({drop}: {DROP_REASONS[drop]})"
    coco_rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    if mask_utils.area(coco_rle) == 0:
        return None, "no bbox, and its segmentation covers no pixel"
    return [float(v) for v in mask_utils.toBbox(coco_rle)], None


def load_box_source(boxes_path: os.PathLike, image_info_path: Optional[os.PathLike] = None,
                    score_threshold: Optional[float] = None) -> BoxSource:
    """Read prompt boxes from a COCO annotations file or a COCO detection results file.

    * Annotations file (a JSON object with ``images`` and ``annotations``): the ``bbox`` of every
      annotation, grouped by image; crowd annotations (``iscrowd: 1``) are regions, not objects,
      and are skipped (counted). ``score_threshold`` does not apply (annotations have no score).
    * Detection results (a JSON list of ``{image_id, category_id, bbox, score}``): boxes with
      ``score >= score_threshold`` (all when None). The image ids are resolved with the ``images`` list
      of ``image_info_path`` (any COCO file with ``images``: the annotations file of the split, or an
      image-info file), which is required for this kind.

    An annotation without ``bbox`` gets the tight box of its segmentation (counted as
    ``box_from_segmentation``), as the dataset conversion does; one whose segmentation gives no box
    either is listed under ``no_box``. Boxes whose image id is not in the images list are not fatal:
    each is listed under ``unknown_image``. Records are named by annotation id (detections, which
    have none, by their position in the list).
    """
    boxes_path = str(boxes_path)
    document = read_json_file(boxes_path, "boxes")
    if isinstance(document, dict) and "annotations" in document:
        kind = "annotations"
        if image_info_path is not None:
            raise coco_error(boxes_path, "file", "an annotations file has its own images list",
                             "leave out the image info file (--image_info), which is for detection results")
        if score_threshold is not None:
            raise coco_error(boxes_path, "file", "an annotations file has no scores to threshold",
                             "leave out the score threshold (--score_threshold), which filters detection results")
        images, entries = _images_of(boxes_path, document), document["annotations"]
        if not isinstance(entries, list):
            raise coco_error(boxes_path, 'key "annotations"', "expected a list", "export the annotations as COCO JSON")
    elif isinstance(document, list):
        kind = "detections"
        if image_info_path is None:
            raise coco_error(
                boxes_path, "file", "a detection results list names images by id only",
                'pass an image info file (--image_info): a COCO file whose "images" list maps those ids to file '
                "names (e.g. the split's annotations file)",
            )
        images, entries = _images_of(str(image_info_path), read_json_file(image_info_path, "image info")), document
    else:
        raise coco_error(
            boxes_path, "top level", "expected a COCO annotations file (an object with \"images\" and \"annotations\") "
            "or a COCO detection results file (a list of {image_id, category_id, bbox, score})",
            "pass one of those two kinds of file",
        )
    source = BoxSource(kind, images, {image_id: [] for image_id in images})
    source.counts = {"crowd_skipped": 0, "below_score_threshold": 0}
    if kind == "annotations":
        source.counts["box_from_segmentation"] = 0
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise coco_error(boxes_path, f"{kind}[{index}]", "a box record must be a JSON object", "fix or remove it")
        if kind == "annotations":
            name = (f"annotation {require_int(boxes_path, f'annotations[{index}]', entry, 'id')}" if "id" in entry
                    else f"annotations[{index}] (no id)")
        else:
            name = f"detection {index}"
        if "image_id" not in entry:
            raise coco_error(boxes_path, name, 'the record has no "image_id"', "give it the id of its image, or remove it")
        image_id = require_int(boxes_path, name, entry, "image_id")
        if kind == "detections" and entry.get("bbox") is None:
            raise coco_error(boxes_path, name, 'a detection needs a "bbox" [x, y, width, height]', "complete or remove it")
        score = None
        if kind == "annotations":
            if int(entry.get("iscrowd", 0)) == 1:
                source.counts["crowd_skipped"] += 1
                continue
        else:
            if not is_number(entry.get("score")):
                raise coco_error(boxes_path, name, f'"score" must be a number, found {entry.get("score")!r}',
                                 "give every detection its score")
            score = float(entry["score"])
            if score_threshold is not None and score < score_threshold:
                source.counts["below_score_threshold"] += 1
                continue
        if image_id not in images:
            source.report("unknown_image", f"{name}: image_id {image_id} is not in the images list")
            continue
        if entry.get("bbox") is None:  # an annotation without a box: the tight box of its mask, as the conversion does
            bbox, problem = _box_from_segmentation(boxes_path, name, entry, images[image_id])
            if bbox is None:
                source.report("no_box", f"{name} (image id {image_id}, {images[image_id].file_name}): {problem}")
                continue
            source.counts["box_from_segmentation"] += 1
        else:
            bbox = parse_bbox(boxes_path, name, entry["bbox"])
        source.boxes[image_id].append(BoxEntry(bbox, int(entry.get("category_id", 1)), name, score))
    return source


__all__ = [
    "BoxEntry",
    "BoxSource",
    "CocoImage",
    "CocoValidationError",
    "coco_error",
    "image_file_path",
    "is_number",
    "load_box_source",
    "parse_bbox",
    "parse_categories",
    "parse_images",
    "read_coco_json",
    "read_json_file",
    "require_int",
]
