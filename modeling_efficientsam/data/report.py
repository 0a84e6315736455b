"""The conversion report: what was repaired or dropped, per split and reason, and how it adds up.

Written as ``report.json`` beside the saved DatasetDict (format in data/README.md). Its short form,
:func:`format_conversion_summary`, is what ``data/prepare_dataset.py`` prints and what training
prints each time it prepares or reuses a dataset; :func:`usable_object_count` tells whether a split
holds anything to train or evaluate on.
"""

from __future__ import annotations

import os
from typing import Optional, Union

from ..file_utils import read_json_or_none, write_json_atomic
from .coco_cleaning import DROP_REASONS, REPAIR_REASONS, CocoSplit

REPORT_FILE = "report.json"
REPORT_FORMAT_VERSION = 2  # 2: every listed annotation / image carries its image id and file name


def _image_entries(split: CocoSplit, image_ids) -> list:
    names = {image.id: image.file_name for image in split.images}
    return [{"image_id": image_id, "file_name": names[image_id]} for image_id in sorted(image_ids)]


def split_report(split: CocoSplit, orientation: dict) -> dict:
    """Summary of one cleaned split. ``orientation`` maps image id -> True when EXIF was applied."""
    num_objects = sum(len(image.objects) for image in split.images)
    num_dropped = sum(len(entries) for entries in split.dropped.values())
    if num_objects + num_dropped != split.num_annotations:  # the bookkeeping itself is broken
        raise RuntimeError(
            f"{split.annotations_path}: {num_objects} objects + {num_dropped} drops != {split.num_annotations} annotations"
        )
    without_usable = [image.id for image in split.images if not any(not obj["iscrowd"] for obj in image.objects)]
    by_annotation = lambda entries: sorted(entries, key=lambda entry: entry["annotation_id"])  # noqa: E731
    return {
        "annotations_file": split.annotations_path,
        "images_dir": split.images_dir,
        "num_images": len(split.images),
        "num_annotations": split.num_annotations,
        "num_objects": num_objects,
        "num_crowd_objects": sum(obj["iscrowd"] for image in split.images for obj in image.objects),
        "num_dropped": num_dropped,
        "num_repaired": len({entry["annotation_id"] for entries in split.repaired.values() for entry in entries}),
        "dropped": {reason: by_annotation(entries) for reason, entries in sorted(split.dropped.items())},
        "repaired": {reason: by_annotation(entries) for reason, entries in sorted(split.repaired.items())},
        "images_without_usable_objects": _image_entries(split, without_usable),
        "images_stored_without_exif_rotation": _image_entries(
            split, [image_id for image_id, applied in orientation.items() if not applied]
        ),
    }


def build_report(splits: dict, options: dict, fingerprint: str, categories: dict) -> dict:
    return {
        "format_version": REPORT_FORMAT_VERSION,
        "fingerprint": fingerprint,
        "options": options,
        "categories": {str(category_id): name for category_id, name in sorted(categories.items())},
        "reasons": {"repaired": REPAIR_REASONS, "dropped": DROP_REASONS},
        "splits": splits,
    }


def write_report(report: dict, directory: Union[str, os.PathLike]) -> str:
    return write_json_atomic(os.path.join(directory, REPORT_FILE), report, indent=2)


def read_report(directory: Union[str, os.PathLike]) -> Optional[dict]:
    """The report of a prepared dataset directory, or None when there is none (or it is unreadable)."""
    return read_json_or_none(os.path.join(directory, REPORT_FILE))


def format_report(report: dict) -> str:
    """A plain-text table: per split the totals, then one line per repair/drop reason with its count.

    ``usable`` objects are the kept non-crowd ones, the only ones used as prompts and positives; a
    split without any is flagged.
    """
    lines = []
    for name, split in report["splits"].items():
        usable = split["num_objects"] - split["num_crowd_objects"]
        lines.append(
            f"[{name}] {split['num_images']} images, {split['num_annotations']} annotations -> "
            f"{split['num_objects']} objects kept ({usable} usable, {split['num_crowd_objects']} crowd), "
            f"{split['num_dropped']} dropped, {split['num_repaired']} repaired, "
            f"{len(split['images_without_usable_objects'])} images without usable objects"
        )
        for kind in ("dropped", "repaired"):
            for reason, entries in split[kind].items():
                lines.append(f"    {kind:<8} {reason:<28} {len(entries):>6}")
        if split["images_stored_without_exif_rotation"]:
            lines.append(
                f"    {len(split['images_stored_without_exif_rotation'])} images kept un-rotated "
                "(JSON size matches the stored pixels, not the EXIF orientation)"
            )
        if usable == 0:
            lines.append(f"    the {name} split has no usable (non-crowd) object: nothing to train or evaluate on")
    return "\n".join(lines)


def format_conversion_summary(source: Union[dict, str, os.PathLike], report_path: Optional[str] = None) -> str:
    """The conversion summary to print whenever a dataset is prepared or reused.

    Per split: images, annotations, objects kept (usable and crowd), dropped and repaired, one line
    per drop / repair reason with its count, a warning for a split without usable objects, and a
    last line with the path of ``report.json`` (which lists every affected annotation id with its
    image id and file name).

    Args:
        source: a prepared dataset folder (its ``report.json`` is read) or a report already loaded.
        report_path: where the report lives, for the last line when ``source`` is a dict.

    Raises ``FileNotFoundError`` when the folder has no readable ``report.json``.
    """
    if isinstance(source, dict):
        report = source
    else:
        report_path = os.path.join(os.fspath(source), REPORT_FILE)
        report = read_report(source)
        if report is None:
            raise FileNotFoundError(
                f"{report_path}: no readable conversion report. Fix: prepare the dataset with data/prepare_dataset.py "
                "(or load_or_prepare), which writes it"
            )
    text = format_report(report)
    if report_path is not None:
        text += f"\nfull lists of dropped and repaired annotations (ids, images, file names): {report_path}"
    return text


def usable_object_count(split) -> int:
    """Number of usable objects (kept and not crowd) in a converted split (a ``datasets.Dataset``).

    Reads only the ``iscrowd`` field through Arrow (no image or mask is decoded) and honours a
    ``select`` / ``shuffle`` of the split. A split for which this is 0 has nothing to prompt: no
    training target and no evaluation prompt.
    """
    import pyarrow.compute as pc

    table = split.select_columns(["objects"]).with_format("arrow")[:]
    objects = pc.list_flatten(table.column("objects"))
    if len(objects) == 0:
        return 0
    return int(pc.sum(pc.equal(pc.struct_field(objects, "iscrowd"), 0)).as_py() or 0)
