"""COCO JSON + image folders -> a ``datasets.DatasetDict`` saved to disk, with its report.

``prepare_coco_dataset`` always converts; ``load_or_prepare`` reuses a saved conversion whose inputs
fingerprint (see fingerprint.py) still matches and converts otherwise. Both write into a temporary
sibling directory and move it into place at the end, so an interrupted run never leaves a
half-written dataset where a complete one is expected.

Schema of every split (also in data/README.md):

* ``image``: ``datasets.Image()``, 8-bit RGB, no orientation tag, oriented as the annotations expect
* ``image_id`` (int64), ``file_name`` (string, relative to the images directory, may hold folders)
* ``width``, ``height`` (int32): size of the stored image, equal to the JSON's
* ``objects``: list of {``id`` (int64, COCO annotation id), ``category`` (ClassLabel index),
  ``category_id`` (int64, original COCO category id), ``box`` (4 x float32, x1 y1 x2 y2 pixels),
  ``mask`` ({``counts``: compressed RLE string, ``size``: [height, width]}), ``area`` (float32,
  mask pixel count), ``iscrowd`` (int8, 0 or 1)}

The ClassLabel names are the categories of all splits sorted by COCO id; the id list is stored
per object (``category_id``) and in ``dataset.info.description`` (JSON, read it with
:func:`conversion_metadata`). The description does not survive the Hub's Parquet format; there the
same metadata travels as ``coco_categories.json`` beside the data and
:func:`~modeling_efficientsam.data.hub_format.load_prepared_dataset` puts it back (see hub_format.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile

import datasets

from ..file_utils import staged_directory
from .coco import CocoValidationError, coco_error, read_coco_json
from .box_only import load_box_only_split
from .coco_cleaning import load_coco_split
from .fingerprint import CACHE_FORMAT_VERSION, conversion_fingerprint
from .image_files import encode_for_storage, resolve_image
from .report import build_report, read_report, split_report, write_report

logger = logging.getLogger(__name__)

_METADATA_KEY = "efficientsam_coco"


def coco_features(category_names: list) -> datasets.Features:
    """The features of a converted split, given the ClassLabel names (sorted by COCO category id)."""
    return datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "file_name": datasets.Value("string"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": datasets.List(
                {
                    "id": datasets.Value("int64"),
                    "category": datasets.ClassLabel(names=list(category_names)),
                    "category_id": datasets.Value("int64"),
                    "box": datasets.List(datasets.Value("float32"), length=4),
                    "mask": {"counts": datasets.Value("string"), "size": datasets.List(datasets.Value("int32"), length=2)},
                    "area": datasets.Value("float32"),
                    "iscrowd": datasets.Value("int8"),
                }
            ),
        }
    )


def conversion_metadata(dataset: datasets.Dataset) -> dict:
    """The metadata written by the conversion: ``coco_category_ids``, ``category_names``, ``fingerprint``."""
    try:
        return json.loads(dataset.info.description or "{}")[_METADATA_KEY]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError("this dataset was not written by modeling_efficientsam.data (no conversion metadata in its description)") from None


def set_conversion_metadata(dataset: datasets.Dataset, metadata: dict) -> None:
    """Store ``metadata`` (the dict :func:`conversion_metadata` returns) in ``dataset.info.description``."""
    dataset.info.description = json.dumps({_METADATA_KEY: dict(metadata)})


def category_names(split: datasets.Dataset) -> list:
    """Category names in ``category`` index order: the names of the split's ``ClassLabel`` feature.

    The one place category names are read from (the copy in the conversion metadata is not used).
    """
    inner = split.features["objects"]
    inner = getattr(inner, "feature", inner)  # datasets.List / Sequence of a dict
    if isinstance(inner, (list, tuple)):
        inner = inner[0]
    return list(inner["category"].names)


def dataset_categories(split: datasets.Dataset) -> tuple:
    """``(COCO category ids, names)`` in ``category`` index order, for a split written by the conversion."""
    category_ids = list(conversion_metadata(split)["coco_category_ids"])
    names = category_names(split)
    if len(category_ids) != len(names):
        raise ValueError(f"the conversion metadata lists {len(category_ids)} category ids for {len(names)} category names")
    return category_ids, names


def _normalise_splits(splits: dict) -> dict:
    if not splits:
        raise ValueError("no split given: pass at least {'train': (annotations_path, images_dir)}")
    normalised = {}
    for name, pair in splits.items():
        if not isinstance(name, str) or not re.fullmatch(r"\w+(\.\w+)*", name):
            raise ValueError(f"invalid split name {name!r}: use letters, digits and underscores (e.g. train, validation)")
        if pair is None or len(pair) != 2:
            raise ValueError(f"split {name!r}: expected (annotations_path, images_dir), got {pair!r}")
        normalised[name] = (os.fspath(pair[0]), os.fspath(pair[1]))
    return normalised


def _merge_categories(parsed: dict) -> dict:
    merged: dict = {}
    origin: dict = {}
    for name, split in parsed.items():
        for category_id, category_name in split.categories.items():
            if category_id in merged and merged[category_id] != category_name:
                raise coco_error(split.annotations_path, f"category id {category_id}",
                                 f"named {category_name!r} here but {merged[category_id]!r} in {origin[category_id]}",
                                 "use the same categories in every split")
            merged[category_id] = category_name
            origin[category_id] = split.annotations_path
    names = list(merged.values())
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise coco_error(
            ", ".join(split.annotations_path for split in parsed.values()), "categories",
            f"category name(s) {sorted(duplicates)} used with different ids across splits "
            f"({ {cid: n for cid, n in merged.items() if n in duplicates} })", "use the same categories in every split",
        )
    return dict(sorted(merged.items()))


def _examples(split, resolved: dict, class_index: dict):
    for image in split.images:
        yield {
            "image": {"bytes": encode_for_storage(split.annotations_path, image, resolved[image.id]), "path": image.file_name},
            "image_id": image.id,
            "file_name": image.file_name,
            "width": image.width,
            "height": image.height,
            "objects": [{**obj, "category": class_index[obj["category_id"]]} for obj in image.objects],
        }


def _generate_split(name, split, resolved, class_index, features, cache_dir, fingerprint) -> datasets.Dataset:
    """Write one split through a generator (one decoded image in memory at a time) into ``cache_dir``."""
    try:
        return datasets.Dataset.from_generator(
            _examples,
            features=features,
            cache_dir=cache_dir,
            gen_kwargs={"split": split, "resolved": resolved, "class_index": class_index},
            split=datasets.NamedSplit(name),
            fingerprint=fingerprint,
        )
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, CocoValidationError):
            raise error.__cause__ from None
        raise


def _check_replaceable(target: str) -> None:
    """Only a missing path, an empty directory or a saved DatasetDict may be (re)placed."""
    if not os.path.lexists(target):
        return
    if not os.path.isdir(target):
        raise FileExistsError(f"output path {target} exists and is not a directory")
    if os.listdir(target) and not os.path.exists(os.path.join(target, "dataset_dict.json")):
        raise FileExistsError(
            f"output directory {target} is not empty and does not hold a prepared dataset; "
            "choose another --output_dir or empty it"
        )


def _options(strict, box_mask_iou_threshold, box_only_splits, splits) -> dict:
    """The conversion options (part of the fingerprint); ``box_only_splits`` only when there are some."""
    options = {"strict": bool(strict), "box_mask_iou_threshold": float(box_mask_iou_threshold)}
    box_only = sorted(set(box_only_splits or ()))
    unknown = [name for name in box_only if name not in splits]
    if unknown:
        raise ValueError(f"box_only_splits {unknown} are not among the splits {sorted(splits)}")
    if box_only:
        options["box_only_splits"] = box_only
    return options


def prepare_coco_dataset(
    splits: dict,
    output_dir: str | os.PathLike,
    strict: bool = False,
    box_mask_iou_threshold: float = 0.5,
    box_only_splits: tuple = (),
) -> datasets.DatasetDict:
    """Convert COCO splits and save them, with ``report.json``, to ``output_dir``.

    Args:
        splits: split name -> ``(annotations_path, images_dir)``; ``file_name`` in the JSON is
            relative to ``images_dir``.
        output_dir: where the DatasetDict is saved (replaced if it holds an earlier conversion).
        strict: turn every repair or drop into a :class:`CocoValidationError`.
        box_mask_iou_threshold: annotations whose box has a lower IoU with the mask's tight box are
            dropped (the original guide's ``iou_threshold``).
        box_only_splits: names of splits read for their boxes only (objects get empty masks; see
            :func:`~.box_only.load_box_only_split`), for teacher-supervised distillation. Every other
            split is validated in full.

    Returns the saved DatasetDict, memory-mapped from ``output_dir``. Fatal problems raise
    :class:`CocoValidationError` before anything is written.
    """
    splits = _normalise_splits(splits)
    output_dir = os.path.abspath(os.fspath(output_dir))
    _check_replaceable(output_dir)  # fail before converting, not after
    options = _options(strict, box_mask_iou_threshold, box_only_splits, splits)

    loaded = {name: read_coco_json(annotations) for name, (annotations, _) in splits.items()}
    parsed = {
        name: load_box_only_split(annotations, images_dir, data=loaded[name]) if name in options.get("box_only_splits", ())
        else load_coco_split(annotations, images_dir, strict, box_mask_iou_threshold, data=loaded[name])
        for name, (annotations, images_dir) in splits.items()
    }
    for name, split in parsed.items():
        if not split.images:  # a saved DatasetDict cannot hold an empty split
            raise coco_error(split.annotations_path, "images", f"the {name} split lists no image",
                             "add images or leave the split out")
    categories = _merge_categories(parsed)
    class_index = {category_id: index for index, category_id in enumerate(categories)}
    resolved = {
        name: {image.id: resolve_image(split.annotations_path, split.images_dir, image) for image in split.images}
        for name, split in parsed.items()
    }
    fingerprint = conversion_fingerprint(splits, options, loaded=loaded)
    del loaded
    report = build_report(
        {name: split_report(split, {i: r.apply_exif for i, r in resolved[name].items()}) for name, split in parsed.items()},
        options, fingerprint, categories,
    )
    features = coco_features(list(categories.values()))
    metadata = {"format_version": CACHE_FORMAT_VERSION, "coco_category_ids": list(categories),
                "category_names": list(categories.values()), "fingerprint": fingerprint}

    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{os.path.basename(output_dir)}.generator-", dir=parent) as work, \
            staged_directory(output_dir) as staged:
        built = {}
        for name, split in parsed.items():
            dataset = _generate_split(name, split, resolved[name], class_index, features, work, f"{fingerprint}-{name}")
            set_conversion_metadata(dataset, metadata)
            built[name] = dataset
        datasets.DatasetDict(built).save_to_disk(str(staged))
        write_report(report, staged)
        del built
        _check_replaceable(output_dir)  # again, right before the staged folder replaces it
    logger.info("prepared %s (fingerprint %s)", output_dir, fingerprint[:12])
    return datasets.load_from_disk(output_dir)


def load_or_prepare(
    splits: dict,
    output_dir: str | os.PathLike,
    strict: bool = False,
    box_mask_iou_threshold: float = 0.5,
    force: bool = False,
    box_only_splits: tuple = (),
) -> datasets.DatasetDict:
    """Load ``output_dir`` if it holds a conversion of exactly these inputs and options, else convert.

    Reuse requires the fingerprint in ``output_dir/report.json`` to equal the fingerprint of the
    current inputs (annotation file contents, image file names/sizes/mtimes, options, split names).
    ``force=True`` always converts. With several processes (distributed training), call it on the
    main process first (``accelerator.main_process_first()``) so only one of them converts.
    """
    splits = _normalise_splits(splits)
    options = _options(strict, box_mask_iou_threshold, box_only_splits, splits)
    report = None if force else read_report(output_dir)
    if report is not None:
        current = conversion_fingerprint(splits, options)
        if report.get("fingerprint") == current:
            try:
                dataset = datasets.load_from_disk(os.fspath(output_dir))
            except (FileNotFoundError, ValueError, OSError) as error:
                logger.warning("cannot load the prepared dataset in %s (%s); converting again", output_dir, error)
            else:
                logger.info("reusing the prepared dataset in %s (fingerprint %s)", output_dir, current[:12])
                return dataset
        else:
            logger.info("inputs changed since %s was prepared; converting again", output_dir)
    return prepare_coco_dataset(splits, output_dir, strict=strict, box_mask_iou_threshold=box_mask_iou_threshold,
                                box_only_splits=box_only_splits)

