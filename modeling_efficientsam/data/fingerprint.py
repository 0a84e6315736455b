"""Fingerprint of a conversion's inputs, to know when a prepared dataset can be reused.

What goes in (SHA-256 over a canonical JSON document):

* the cache format version (bumped when the conversion itself changes);
* the conversion options (strict, box_mask_iou_threshold);
* per split name: the SHA-256 of the annotation file's bytes, and for every image the JSON refers to
  its file name, size in bytes and modification time in nanoseconds (a file that is missing gets a
  marker, so adding it later changes the fingerprint).

Image contents are not hashed: size + mtime + name catches replaced or edited files at a tiny cost
(hashing gigabytes of photos on every start would not). Editing a file in place while keeping its
size and forcing the old mtime back would go unnoticed; pass ``force=True`` to rebuild then.
The images directory path itself is not part of it, so a moved dataset is still recognised.
"""

from __future__ import annotations

import os
from typing import Optional

from ..file_utils import file_sha256, json_sha256
from .coco import read_coco_json

# 2: polygons far outside the image are clipped, compressed RLE is checked, report.json names file names
# (a dataset prepared before may hold an unchecked RLE, so it is converted again).
CACHE_FORMAT_VERSION = 2


def _image_stamp(path: str) -> list:
    try:
        stat = os.stat(path)
    except OSError:
        return [None, None]
    return [stat.st_size, stat.st_mtime_ns]


def conversion_fingerprint(splits: dict, options: dict, loaded: Optional[dict] = None) -> str:
    """``splits``: split name -> (annotations_path, images_dir); ``loaded``: split name -> parsed JSON, if at hand."""
    document = {"format_version": CACHE_FORMAT_VERSION, "options": options, "splits": {}}
    for name in sorted(splits):
        annotations_path, images_dir = (str(p) for p in splits[name])
        data = (loaded or {}).get(name) or read_coco_json(annotations_path)  # raises CocoValidationError on unreadable JSON
        files = sorted(
            {entry["file_name"] for entry in data["images"] if isinstance(entry, dict) and isinstance(entry.get("file_name"), str)}
        )
        document["splits"][name] = {
            "annotations_sha256": file_sha256(annotations_path),
            "images": [[file_name, *_image_stamp(os.path.join(images_dir, file_name))] for file_name in files],
        }
    return json_sha256(document)
