"""A torch Dataset over a converted split that draws fresh prompts for every image at every epoch.

Randomness: item ``index`` at epoch ``e`` uses a generator seeded from ``(seed, e, index)``, so a
run is reproducible for a seed, prompts change from epoch to epoch, and the result does not depend
on which DataLoader worker (or how many) produced the item. The epoch lives in a one-element
shared-memory tensor, so ``set_epoch`` also reaches workers that outlive an epoch
(``persistent_workers=True``).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from ..image_processing_efficientsam import EfficientSamImageProcessor
from ..image_utils import to_rgb_array
from ..processing_efficientsam import to_model_frame
from .label_cache import open_label_cache
from .masks import decode_rle, resize_mask
from .prompts import (
    MAX_POINTS_PER_QUERY,
    box_query,
    jitter_box,
    pad_queries,
    point_query,
    sample_negative_points,
    sample_positive_points,
)

PROMPT_MODES = ("box", "point", "mixed")
_METADATA_COLUMNS = ["image_id", "width", "height", "objects"]


def efficientsam_pixel_values(image: np.ndarray, image_size: int = 1024) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, S, S) float32, the model's input normalisation.

    uint8 / 255, bilinear resize to S x S (align_corners=False, no antialiasing; the aspect ratio is
    not kept), then (x - mean) / std per channel. Delegates to EfficientSamImageProcessor, the one definition of it.
    """
    pixels = torch.from_numpy(np.require(image, np.uint8, ["C", "W"])).permute(2, 0, 1)[None]
    return EfficientSamImageProcessor(size=image_size).normalize_tensor(pixels)[0]


def stored_image_pixel_values(image, image_size: int, image_processor=None) -> torch.Tensor:
    """An image of a converted split -> (3, S, S) ``pixel_values``, for training and for the embedding cache.

    Stored images are upright already (EXIF is not applied again). Without ``image_processor`` the
    normalisation is :func:`efficientsam_pixel_values`; with one, its output must be S x S.
    """
    array = to_rgb_array(image, apply_exif=False)
    if image_processor is None:
        return efficientsam_pixel_values(array, image_size)
    pixel_values = image_processor(Image.fromarray(array), return_tensors="pt")["pixel_values"][0]
    if tuple(pixel_values.shape) != (3, image_size, image_size):
        raise ValueError(
            f"image_processor produced pixel_values of shape {tuple(pixel_values.shape)}, expected "
            f"(3, {image_size}, {image_size}); make its size match image_size"
        )
    return pixel_values


class EfficientSamTrainingDataset(torch.utils.data.Dataset):
    """Items for :class:`EfficientSamCollator` from a split written by ``prepare_coco_dataset``.

    Per image and call: up to ``max_objects`` non-crowd objects are drawn without replacement, and
    each becomes one query:

    * ``prompt_mode="box"``: the annotation box jittered by ``box_noise_scale`` (see
      :func:`~modeling_efficientsam.data.prompts.jitter_box`), as corners labelled 2 and 3;
    * ``"point"``: ``num_positive_points`` points inside the mask (label 1) and up to
      ``num_negative_points`` inside the box but outside the mask (label 0);
    * ``"mixed"``: points with probability ``point_probability``, else a box, per query.

    Item keys: ``pixel_values`` (3, S, S) float32, or instead the tensors returned by
    ``embedding_reader(image_id)`` (the image is then never decoded); ``input_points`` (Q, P, 2)
    float32 in the S x S frame; ``input_labels`` (Q, P) int64; ``labels`` (Q, m, m) float32 targets
    (masks stretched like the image, area coverage >= 0.5, see masks.py); ``category_ids`` (Q,)
    int64 ClassLabel indices; ``original_size`` (2,) int64 (H, W); ``image_id`` int64 scalar;
    and with ``return_full_resolution_masks`` ``full_resolution_labels`` (Q, H, W) bool.

    Targets (and, for point prompts, each object's mask cut to its window) are prepared once per
    split and mask size and read from disk afterwards (``label_cache``, see label_cache.py: "auto"
    keeps them in ``labels/`` of the saved dataset folder; a folder; or False to compute them for
    every item). Items are the same either way.
    """

    def __init__(
        self,
        hf_split,
        image_size: int = 1024,
        mask_size: int = 256,
        max_objects: Optional[int] = 10,
        box_noise_scale: float = 0.1,
        prompt_mode: str = "box",
        num_positive_points: int = 1,
        num_negative_points: int = 0,
        point_probability: float = 0.5,
        seed: int = 0,
        return_full_resolution_masks: bool = False,
        image_processor=None,
        embedding_reader: Optional[Callable[[int], dict]] = None,
        label_cache="auto",
    ):
        if prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
        if image_size <= 0 or mask_size <= 0:
            raise ValueError(f"image_size and mask_size must be positive, got {image_size} and {mask_size}")
        if max_objects is not None and max_objects < 1:
            raise ValueError(f"max_objects must be at least 1 (or None for all), got {max_objects}")
        if box_noise_scale < 0:
            raise ValueError(f"box_noise_scale must be >= 0, got {box_noise_scale}")
        if not 0.0 <= point_probability <= 1.0:
            raise ValueError(f"point_probability must be in [0, 1], got {point_probability}")
        if prompt_mode != "box":
            if num_positive_points < 1 or num_negative_points < 0:
                raise ValueError("point prompts need num_positive_points >= 1 and num_negative_points >= 0")
            if num_positive_points + num_negative_points > MAX_POINTS_PER_QUERY:
                raise ValueError(
                    f"num_positive_points + num_negative_points must be at most {MAX_POINTS_PER_QUERY}, "
                    f"got {num_positive_points} + {num_negative_points}"
                )
        missing = [c for c in _METADATA_COLUMNS if c not in hf_split.column_names]
        if missing or (embedding_reader is None and "image" not in hf_split.column_names):
            raise ValueError(
                f"the split lacks columns {missing or ['image']}; build it with modeling_efficientsam.data.prepare_coco_dataset"
            )
        self.image_size, self.mask_size, self.max_objects = image_size, mask_size, max_objects
        self.box_noise_scale, self.prompt_mode = box_noise_scale, prompt_mode
        self.num_positive_points, self.num_negative_points = num_positive_points, num_negative_points
        self.point_probability, self.seed = point_probability, seed
        self.return_full_resolution_masks = return_full_resolution_masks
        self.image_processor, self.embedding_reader = image_processor, embedding_reader
        # Two column views: metadata alone never touches the image bytes.
        self._metadata = hf_split.select_columns(_METADATA_COLUMNS)
        self._images = hf_split.select_columns(["image"]) if embedding_reader is None else None
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._labels = open_label_cache(hf_split, mask_size, label_cache, points=prompt_mode != "box")

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def __len__(self) -> int:
        return len(self._metadata)

    def _generator(self, index: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.epoch, index])))

    def _query(self, obj: dict, window: Callable[[], tuple], width: int, height: int, rng: np.random.Generator):
        """``window()``: (row, column, mask) of the object's mask cut to a window that holds the object and
        its box's pixels (the whole mask at (0, 0) without the label cache); points are drawn in it and
        shifted back, which draws exactly what drawing in the whole mask would."""
        use_points = self.prompt_mode == "point" or (self.prompt_mode == "mixed" and rng.random() < self.point_probability)
        if use_points:
            top, left, mask = window()
            x1, y1, x2, y2 = (float(v) for v in obj["box"])
            positive = sample_positive_points(mask, self.num_positive_points, rng) + (left, top)
            negative = sample_negative_points(mask, (x1 - left, y1 - top, x2 - left, y2 - top), self.num_negative_points,
                                              rng) + (left, top)
            points, labels = point_query(positive, negative)
        else:
            points, labels = box_query(jitter_box(obj["box"], width, height, self.box_noise_scale, rng))
        return to_model_frame(points, (height, width), self.image_size), labels

    def __getitem__(self, index: int) -> dict:
        row = self._metadata[int(index)]
        width, height = int(row["width"]), int(row["height"])
        rng = self._generator(int(index))
        objects = row["objects"]
        candidates = [position for position, obj in enumerate(objects) if not obj["iscrowd"]]
        count = len(candidates) if self.max_objects is None else min(self.max_objects, len(candidates))
        picked = [candidates[i] for i in rng.choice(len(candidates), size=count, replace=False)] if count else []
        chosen = [objects[position] for position in picked]

        queries, targets, full_masks = [], [], []
        for position, obj in zip(picked, chosen):
            mask = decode_rle(obj["mask"]) if self._labels is None or self.return_full_resolution_masks else None
            if self._labels is None:
                queries.append(self._query(obj, lambda: (0, 0, mask), width, height, rng))
                targets.append(resize_mask(mask, self.mask_size))
            else:  # prepared once (label_cache.py): no full-resolution mask work
                window = lambda: self._labels.window(int(index), position, len(objects))  # noqa: E731
                queries.append(self._query(obj, window, width, height, rng))
                targets.append(self._labels.target(int(index), position, len(objects)))
            if self.return_full_resolution_masks:
                full_masks.append(mask)
        num_points = max([len(labels) for _, labels in queries], default=1)
        input_points, input_labels = pad_queries(queries, num_points)

        item = {
            "input_points": torch.from_numpy(input_points),
            "input_labels": torch.from_numpy(input_labels),
            "labels": torch.from_numpy(np.stack(targets) if targets else np.zeros((0, self.mask_size, self.mask_size), np.float32)),
            "category_ids": torch.tensor([obj["category"] for obj in chosen], dtype=torch.int64),
            "original_size": torch.tensor([height, width], dtype=torch.int64),
            "image_id": torch.tensor(int(row["image_id"]), dtype=torch.int64),
        }
        if self.return_full_resolution_masks:
            item["full_resolution_labels"] = torch.from_numpy(
                np.stack(full_masks) if full_masks else np.zeros((0, height, width), bool)
            )
        if self.embedding_reader is None:
            item["pixel_values"] = stored_image_pixel_values(self._images[int(index)]["image"], self.image_size,
                                                             self.image_processor)
        else:
            embeddings = self.embedding_reader(int(row["image_id"]))
            if not isinstance(embeddings, dict) or not all(isinstance(v, torch.Tensor) for v in embeddings.values()):
                raise TypeError("embedding_reader(image_id) must return a dict of torch tensors")
            clashes = set(embeddings) & set(item)
            if clashes:
                raise ValueError(f"embedding_reader returned reserved keys {sorted(clashes)}")
            item.update(embeddings)
        return item
