"""The dataset card (``README.md``) of a prepared dataset on the Hub.

Built with ``huggingface_hub.DatasetCard`` / ``DatasetCardData``. The YAML says the license (when one
was given; nothing is assumed), the task, tags and size category; :mod:`.hub_format` adds the
``configs`` and ``dataset_info`` that ``load_dataset`` reads. The text gives, per split, the images
and objects (counted in the data itself), the annotations of the COCO file and how many were dropped
or repaired per reason (from the conversion report), the categories with their COCO ids and object
counts, the row format, and the code that loads it.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

__all__ = ["build_dataset_card", "size_category", "split_statistics"]

_SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                    (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))


def size_category(num_rows: int) -> str:
    """The Hub's ``size_categories`` value for ``num_rows`` rows (images)."""
    for limit, name in _SIZE_CATEGORIES:
        if num_rows < limit:
            return name
    return "1B<n<10B"


def split_statistics(split) -> dict:
    """``images``, ``objects``, ``crowd_objects`` and ``objects_per_category`` (index -> count) of a
    prepared split, read through Arrow (no image or mask is decoded)."""
    import pyarrow.compute as pc

    objects = pc.list_flatten(split.select_columns(["objects"]).with_format("arrow")[:].column("objects"))
    categories = pc.struct_field(objects, "category").to_pylist() if len(objects) else []
    crowd = int(pc.sum(pc.struct_field(objects, "iscrowd")).as_py() or 0) if len(objects) else 0
    return {"images": len(split), "objects": len(objects), "crowd_objects": crowd,
            "objects_per_category": dict(Counter(categories))}


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _reason_rows(report: dict) -> list:
    descriptions = {**(report.get("reasons") or {}).get("repaired", {}), **(report.get("reasons") or {}).get("dropped", {})}
    rows = []
    for split_name, split in (report.get("splits") or {}).items():
        for kind in ("dropped", "repaired"):
            for reason, entries in sorted((split.get(kind) or {}).items()):
                rows.append(f"| {_cell(split_name)} | {kind} | `{reason}` | {len(entries)} | {_cell(descriptions.get(reason, ''))} |")
    return rows


def build_dataset_card(dataset_dict, *, report: Optional[dict] = None, repo_id: Optional[str] = None,
                       license: Optional[str] = None, pretty_name: Optional[str] = None):
    """A ``huggingface_hub.DatasetCard`` for a prepared ``DatasetDict`` (and its conversion ``report``)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    from .conversion import dataset_categories

    first = next(iter(dataset_dict.values()))
    category_ids, names = dataset_categories(first)
    statistics = {name: split_statistics(split) for name, split in dataset_dict.items()}
    total_images = sum(s["images"] for s in statistics.values())
    pretty_name = pretty_name or (repo_id.split("/")[-1] if repo_id else "COCO instance segmentation for EfficientSAM")
    data = DatasetCardData(
        license=license,
        pretty_name=pretty_name,
        task_categories=["image-segmentation", "mask-generation"],
        task_ids=["instance-segmentation"],
        size_categories=[size_category(total_images)],
        tags=["coco", "instance-segmentation", "efficientsam", "modeling-efficientsam"],
    )
    splits_report = (report or {}).get("splits") or {}

    lines = [f"# {pretty_name}", "",
             "Instance segmentation data converted from COCO JSON with `modeling_efficientsam` "
             "(`data/prepare_dataset.py`), for fine-tuning EfficientSAM with box prompts: one row per image, "
             "with every kept object's box and mask.", "",
             "## Splits", "",
             "| split | images | objects | usable (non-crowd) | crowd | annotations in the COCO file | dropped | repaired |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, stats in statistics.items():
        source = splits_report.get(name, {})
        lines.append(f"| {_cell(name)} | {stats['images']} | {stats['objects']} | {stats['objects'] - stats['crowd_objects']} "
                     f"| {stats['crowd_objects']} | {source.get('num_annotations', '-')} | {source.get('num_dropped', '-')} "
                     f"| {source.get('num_repaired', '-')} |")
    lines.append("")

    lines += ["## Dropped and repaired annotations", ""]
    if report is None:
        lines += ["No conversion report was given, so the drops and repairs are not known here.", ""]
    else:
        rows = _reason_rows(report)
        if rows:
            lines += ["| split | kind | reason | annotations | what happened |", "| --- | --- | --- | --- | --- |", *rows, ""]
        else:
            lines += ["None: every annotation of the COCO files was kept unchanged.", ""]
        options = ", ".join(f"`{key}={value}`" for key, value in (report.get("options") or {}).items())
        lines += [f"Conversion options: {options or 'the defaults'}. "
                  "`report.json` lists every dropped or repaired annotation with its image.", ""]

    lines += ["## Categories", "",
              "| `category` (index) | `category_id` (COCO id) | name | " + " | ".join(f"objects in {_cell(n)}" for n in statistics) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in statistics) + " |"]
    for index, (category_id, name) in enumerate(zip(category_ids, names)):
        counts = " | ".join(str(s["objects_per_category"].get(index, 0)) for s in statistics.values())
        lines.append(f"| {index} | {category_id} | {_cell(name)} | {counts} |")
    lines += ["", "The index is the position in the `ClassLabel` names (sorted by COCO id, unused ids included); "
              "`coco_categories.json` holds the COCO ids of every category.", ""]

    lines += ["## License", "",
              f"`{license}`, as declared by the uploader." if license else
              "Not stated: the uploader declared no license. Ask them before reusing the data.", ""]

    lines += ["## Format", "",
              "| column | type | meaning |", "| --- | --- | --- |",
              "| `image` | image | 8-bit RGB, oriented as the annotations expect |",
              "| `image_id` | int64 | COCO image id |",
              "| `file_name` | string | as in the COCO JSON |",
              "| `width`, `height` | int32 | image size in pixels |",
              "| `objects` | list | per kept annotation: `id` (COCO annotation id), `category` (ClassLabel), `category_id` "
              "(COCO category id), `box` (x1, y1, x2, y2 pixels), `mask` (COCO compressed RLE: `counts`, `size`), "
              "`area` (mask pixels), `iscrowd` |", ""]

    loading_id = repo_id or "OWNER/NAME"
    lines += ["## Loading", "", "```python",
              "from modeling_efficientsam.data import load_prepared_dataset",
              "",
              f'dataset = load_prepared_dataset("{loading_id}")  # DatasetDict; the COCO category ids come with it',
              "```", "",
              f'`datasets.load_dataset("{loading_id}")` works too; masks decode with '
              "`pycocotools.mask.decode(object[\"mask\"])`. Train on it with `dataset_name: "
              f"{loading_id}` in a `train.py` recipe, evaluate with `efficientsam-evaluate --dataset {loading_id}`.", ""]
    fingerprint = (report or {}).get("fingerprint")
    if fingerprint:
        lines += [f"Conversion fingerprint: `{fingerprint}`.", ""]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
