"""The conversion report: what was repaired or dropped, per split and reason, and how it adds up.

Written as ``report.json`` beside the saved DatasetDict (format in data/README.md) and printed as a
short table by ``data/prepare_dataset.py``.
"""

from __future__ import annotations

import os
from typing import Optional

from ..file_utils import read_json_or_none, write_json_atomic
from .coco_cleaning import DROP_REASONS, REPAIR_REASONS, CocoSplit

REPORT_FILE = "report.json"


def split_report(split: CocoSplit, orientation: dict) -> dict:
    """Summary of one cleaned split. ``orientation`` maps image id -> True when EXIF was applied."""
    num_objects = sum(len(image.objects) for image in split.images)
    num_dropped = sum(len(ids) for ids in split.dropped.values())
    if num_objects + num_dropped != split.num_annotations:  # the bookkeeping itself is broken
        raise RuntimeError(
            f"{split.annotations_path}: {num_objects} objects + {num_dropped} drops != {split.num_annotations} annotations"
        )
    without_usable = [image.id for image in split.images if not any(not obj["iscrowd"] for obj in image.objects)]
    return {
        "annotations_file": split.annotations_path,
        "images_dir": split.images_dir,
        "num_images": len(split.images),
        "num_annotations": split.num_annotations,
        "num_objects": num_objects,
        "num_crowd_objects": sum(obj["iscrowd"] for image in split.images for obj in image.objects),
        "num_dropped": num_dropped,
        "num_repaired": len({i for ids in split.repaired.values() for i in ids}),
        "dropped": {reason: sorted(ids) for reason, ids in sorted(split.dropped.items())},
        "repaired": {reason: sorted(ids) for reason, ids in sorted(split.repaired.items())},
        "images_without_usable_objects": sorted(without_usable),
        "images_stored_without_exif_rotation": sorted(
            image_id for image_id, applied in orientation.items() if not applied
        ),
    }


def build_report(splits: dict, options: dict, fingerprint: str, categories: dict) -> dict:
    return {
        "format_version": 1,
        "fingerprint": fingerprint,
        "options": options,
        "categories": {str(category_id): name for category_id, name in sorted(categories.items())},
        "reasons": {"repaired": REPAIR_REASONS, "dropped": DROP_REASONS},
        "splits": splits,
    }


def write_report(report: dict, directory: str | os.PathLike) -> str:
    return write_json_atomic(os.path.join(directory, REPORT_FILE), report, indent=2)


def read_report(directory: str | os.PathLike) -> Optional[dict]:
    """The report of a prepared dataset directory, or None when there is none (or it is unreadable)."""
    return read_json_or_none(os.path.join(directory, REPORT_FILE))


def format_report(report: dict) -> str:
    """A plain-text table: per split the totals, then one line per repair/drop reason with its count."""
    lines = []
    for name, split in report["splits"].items():
        lines.append(
            f"[{name}] {split['num_images']} images, {split['num_annotations']} annotations -> "
            f"{split['num_objects']} objects ({split['num_crowd_objects']} crowd), "
            f"{split['num_dropped']} dropped, {split['num_repaired']} repaired, "
            f"{len(split['images_without_usable_objects'])} images without usable objects"
        )
        for kind in ("dropped", "repaired"):
            for reason, ids in split[kind].items():
                lines.append(f"    {kind:<8} {reason:<28} {len(ids):>6}")
        if split["images_stored_without_exif_rotation"]:
            lines.append(
                f"    {len(split['images_stored_without_exif_rotation'])} images kept un-rotated "
                "(JSON size matches the stored pixels, not the EXIF orientation)"
            )
    return "\n".join(lines)
