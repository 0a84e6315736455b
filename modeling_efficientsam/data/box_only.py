"""Box-only data: images whose objects have boxes but no masks, supervised by the teacher alone.

Label-efficient distillation: a user with a few masked images and many boxed ones trains the student
on both; on the boxed images only the distillation terms apply (the teacher's answer to the same
box is the target), the ground-truth terms are masked out.

Box-only data is always explicit: a separate annotations file given as a box-only split (e.g.
``box_only_annotations`` / ``box_only_images`` in a recipe). A normal split keeps its full validation;
an annotation without a usable segmentation there is still dropped (``segmentation_missing``) or,
with ``strict``, an error.

* :func:`load_box_only_split`: a COCO file read for its boxes. Every annotation needs a ``bbox``
  (``[x, y, w, h]``, positive size after clipping to the image); a ``segmentation``, if present, is
  ignored. Objects get an empty mask (RLE of zeros) and ``area`` 0, so the split has the schema of
  any converted split; boxes reaching outside the image are clipped (repair ``box_outside_image``),
  boxes of zero size are dropped (``box_zero_size_no_mask``).
* :class:`EfficientSamMixedTrainingDataset`: a labelled training dataset followed by a box-only one
  (both :class:`~.training_dataset.EfficientSamTrainingDataset`, box prompts); every item carries
  ``has_mask`` ``(Q,)`` bool (True for the labelled part), which the collator pads with False and
  the trainer uses to mask the ground-truth terms.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from .coco import coco_error, parse_bbox

__all__ = ["BOX_ONLY_DROP_REASONS", "EfficientSamMixedTrainingDataset", "empty_rle", "load_box_only_split"]

#: Reasons a box-only annotation is dropped (counted in report.json like the normal ones).
BOX_ONLY_DROP_REASONS = {"box_zero_size_no_mask": "the box has no area inside the image and there is no mask to repair it from"}


def empty_rle(height: int, width: int) -> dict:
    """The compressed COCO RLE of an all-zero ``height`` x ``width`` mask (counts as str)."""
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
    return {"size": [int(height), int(width)], "counts": encoded["counts"].decode("ascii")}


def load_box_only_split(annotations_path, images_dir, data: Optional[dict] = None):
    """Parse a COCO file for its boxes only (see the module docstring); returns a ``CocoSplit``."""
    from .coco_cleaning import CocoSplit, iter_annotations, read_split_records

    path = str(annotations_path)
    data, categories, images = read_split_records(path, data)
    dropped: dict = {}
    repaired: dict = {}
    for annotation, annotation_id, image_id, category_id, image in iter_annotations(path, data, categories, images):
        record = f"annotation id {annotation_id} (image id {image_id}, {image.file_name})"
        if annotation.get("bbox") is None:
            raise coco_error(path, record, 'a box-only annotation needs a "bbox"',
                             "add the box [x, y, width, height], or remove the annotation")
        x, y, w, h = parse_bbox(path, record, annotation["bbox"])
        box = [min(max(x, 0.0), image.width), min(max(y, 0.0), image.height),
               min(max(x + w, 0.0), image.width), min(max(y + h, 0.0), image.height)]
        entry = {"annotation_id": annotation_id, "image_id": image_id, "file_name": image.file_name}
        if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
            dropped.setdefault("box_zero_size_no_mask", []).append(entry)
            continue
        if box != [x, y, x + w, y + h]:
            repaired.setdefault("box_outside_image", []).append(entry)
        iscrowd = annotation.get("iscrowd", 0)
        if iscrowd not in (0, 1, True, False):
            raise coco_error(path, record, f'"iscrowd" must be 0 or 1, found {iscrowd!r}', "set iscrowd to 0 or 1")
        image.objects.append({"id": annotation_id, "category_id": category_id, "box": box,
                              "mask": empty_rle(image.height, image.width), "area": 0.0, "iscrowd": int(iscrowd)})
    return CocoSplit(annotations_path=path, images_dir=os.fspath(images_dir), categories=categories, images=images,
                     num_annotations=len(data["annotations"]), dropped=dropped, repaired=repaired)


class EfficientSamMixedTrainingDataset(torch.utils.data.Dataset):
    """``labelled`` items (``has_mask`` True), then ``box_only`` items (``has_mask`` False).

    Both are :class:`~.training_dataset.EfficientSamTrainingDataset` with box prompts (a box-only
    object has no mask to sample points from). ``set_epoch`` reaches both.
    """

    def __init__(self, labelled, box_only):
        for name, part in (("labelled", labelled), ("box_only", box_only)):
            if getattr(part, "prompt_mode", "box") != "box":
                raise ValueError(f"the {name} dataset must use box prompts with box-only data, got {part.prompt_mode!r}")
        self.labelled, self.box_only = labelled, box_only

    def set_epoch(self, epoch: int) -> None:
        for part in (self.labelled, self.box_only):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.labelled) + len(self.box_only)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        labelled = index < len(self.labelled)
        item = self.labelled[index] if labelled else self.box_only[index - len(self.labelled)]
        item["has_mask"] = torch.full((item["labels"].shape[0],), labelled, dtype=torch.bool)
        return item
