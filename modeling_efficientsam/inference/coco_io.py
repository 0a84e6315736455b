"""COCO files for the command lines: box sources, image lookup, results records, atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from pycocotools import mask as mask_utils

from ..data.masks import encode_mask

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------------------------
# atomic output
# ----------------------------------------------------------------------------------------------


def _atomic(path: os.PathLike, write) -> str:
    """Run ``write(temp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(handle)
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    return path


def write_json_atomic(path: os.PathLike, document, indent: Optional[int] = None) -> str:
    """Write JSON under a temporary name and rename it to ``path`` (never a half-written file)."""

    def write(temp):
        with open(temp, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=indent)

    return _atomic(path, write)


def save_image_atomic(path: os.PathLike, image, format: str = "PNG") -> str:
    """Save a PIL image under a temporary name and rename it to ``path``."""
    return _atomic(path, lambda temp: image.save(temp, format=format))


# ----------------------------------------------------------------------------------------------
# results records
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# box sources: a COCO annotations file or a COCO detection results file
# ----------------------------------------------------------------------------------------------


@dataclass
class ImageRecord:
    id: int
    file_name: str
    width: Optional[int] = None
    height: Optional[int] = None


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
    images: dict  # image id -> ImageRecord, in file order
    boxes: dict  # image id -> [BoxEntry]
    categories: list
    problems: dict = field(default_factory=dict)  # reason -> list of descriptions
    counts: dict = field(default_factory=dict)  # reason -> count (for things not worth listing)

    def report(self, reason: str, description: str) -> None:
        self.problems.setdefault(reason, []).append(description)


def _read_json(path: os.PathLike, what: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def _image_records(document: dict, path) -> dict:
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise ValueError(f"{path}: expected a COCO file with an \"images\" list")
    records = {}
    for index, entry in enumerate(document["images"]):
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            raise ValueError(f"{path}: images[{index}] needs an \"id\" and a \"file_name\"")
        image_id = int(entry["id"])
        if image_id in records:
            raise ValueError(f"{path}: image id {image_id} appears twice in the images list")
        records[image_id] = ImageRecord(image_id, entry["file_name"], entry.get("width"), entry.get("height"))
    return records


def _check_bbox(bbox, where: str, path) -> list:
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise ValueError(f"{path}: {where}: \"bbox\" must be [x, y, width, height], found {bbox!r}")
    return [float(v) for v in bbox]


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

    Boxes whose image id is not in the images list are not fatal: each is listed under
    ``unknown_image``.
    """
    document = _read_json(boxes_path, "boxes")
    if isinstance(document, dict) and "annotations" in document:
        kind = "annotations"
        if image_info_path is not None:
            raise ValueError("--image_info is for detection results; an annotations file has its own images list")
        if score_threshold is not None:
            raise ValueError("--score_threshold filters detection scores; an annotations file has no scores")
        images = _image_records(document, boxes_path)
        categories = document.get("categories", [])
        entries = document["annotations"]
    elif isinstance(document, list):
        kind = "detections"
        if image_info_path is None:
            raise ValueError(
                f"{boxes_path} is a detection results list, which names images by id only: pass --image_info with a "
                "COCO file whose \"images\" list maps those ids to file names (e.g. the split's annotations file)"
            )
        info = _read_json(image_info_path, "image info")
        images = _image_records(info, image_info_path)
        categories = info.get("categories", [])
        entries = document
    else:
        raise ValueError(
            f"{boxes_path}: expected a COCO annotations file (an object with \"images\" and \"annotations\") or a "
            "COCO detection results file (a list of {image_id, category_id, bbox, score})"
        )
    source = BoxSource(kind, images, {image_id: [] for image_id in images}, categories)
    source.counts = {"crowd_skipped": 0, "below_score_threshold": 0}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image_id" not in entry or "bbox" not in entry:
            raise ValueError(f"{boxes_path}: record {index} needs \"image_id\" and \"bbox\"")
        name = f"annotation {entry['id']}" if kind == "annotations" and "id" in entry else f"{kind[:-1]} {index}"
        bbox = _check_bbox(entry["bbox"], name, boxes_path)
        image_id = int(entry["image_id"])
        score = None
        if kind == "annotations":
            if int(entry.get("iscrowd", 0)) == 1:
                source.counts["crowd_skipped"] += 1
                continue
        else:
            if "score" not in entry:
                raise ValueError(f"{boxes_path}: {name} has no \"score\"")
            score = float(entry["score"])
            if score_threshold is not None and score < score_threshold:
                source.counts["below_score_threshold"] += 1
                continue
        if image_id not in images:
            source.report("unknown_image", f"{name}: image_id {image_id} is not in the images list")
            continue
        source.boxes[image_id].append(BoxEntry(bbox, int(entry.get("category_id", 1)), name, score))
    return source


# ----------------------------------------------------------------------------------------------
# finding image files
# ----------------------------------------------------------------------------------------------


class ImageLocator:
    """Map a COCO ``file_name`` to a file among the ``--images`` arguments.

    Folders: ``folder / file_name`` (file names may contain sub-folders). Files: matched by their
    base name (or their full path when ``file_name`` is one). ``only_listed_files`` is true when every
    argument is a file: then only records for those files are wanted.
    """

    def __init__(self, inputs):
        self.folders, self.files = [], {}
        for item in inputs:
            path = Path(item)
            if path.is_dir():
                self.folders.append(path)
            elif path.is_file():
                self.files.setdefault(path.name, path)
            else:
                raise FileNotFoundError(f"--images: {item} is neither a file nor a folder")
        self.only_listed_files = not self.folders
        self.used: set = set()

    def find(self, file_name: str) -> Optional[Path]:
        for folder in self.folders:
            candidate = folder / file_name
            if candidate.is_file():
                return candidate
        direct = Path(file_name)
        if direct.is_absolute() and direct.is_file() and direct.name in self.files:
            return direct
        match = self.files.get(Path(file_name).name)
        if match is not None:
            self.used.add(match.name)
        return match

    def unused_files(self) -> list:
        return sorted(str(path) for name, path in self.files.items() if name not in self.used)
