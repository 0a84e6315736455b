"""Batch items of :class:`EfficientSamTrainingDataset` into the tensors the trainer consumes.

Batch contract (names are fixed; the trainer relies on them). B images, Q = the largest number of
queries of an image in the batch (at least 1), P = the largest number of points of a query (at
least 1, at most 6):

* ``pixel_values`` (B, 3, S, S) float32, when the items carry it
* ``image_embeddings`` / ``teacher_image_embeddings`` (B, C, h, w), when the items carry them (any
  other per-image tensor an embedding reader returns is stacked the same way)
* ``input_points`` (B, Q, P, 2) float32 in the S x S frame, padding -1
* ``input_labels`` (B, Q, P) int64, padding -1
* ``query_mask`` (B, Q) bool, True for real queries
* ``labels`` (B, Q, m, m) float32 in {0, 1}, zeros for padded queries
* ``category_ids`` (B, Q) int64 ClassLabel index, -1 for padded queries
* ``original_sizes`` (B, 2) int64 (H, W)
* ``image_ids`` (B,) int64
* ``full_resolution_labels``: list of B bool tensors (Q_i, H_i, W_i), only when items carry them
* ``has_mask`` (B, Q) bool, only when items carry it (box-only data): False for queries without a
  ground-truth mask (their ground-truth loss terms are masked out) and for padding
"""

from __future__ import annotations

import torch

from ..modeling_efficientsam import LABEL_PADDING

_PER_QUERY = ("input_points", "input_labels", "labels", "category_ids")
_HANDLED = set(_PER_QUERY) | {"original_size", "image_id", "full_resolution_labels", "has_mask"}


class EfficientSamCollator:
    """Callable on a list of items; pads queries and points, stacks per-image tensors."""

    def __call__(self, items: list) -> dict:
        if not items:
            raise ValueError("cannot collate an empty list of items")
        keys = set(items[0])
        for item in items[1:]:
            if set(item) != keys:
                raise ValueError(f"items carry different keys: {sorted(keys)} vs {sorted(item)}")
        batch_size = len(items)
        num_queries = max(1, max(item["labels"].shape[0] for item in items))
        num_points = max(1, max(item["input_points"].shape[1] for item in items))
        mask_size = items[0]["labels"].shape[-2:]

        input_points = torch.full((batch_size, num_queries, num_points, 2), -1.0, dtype=torch.float32)
        input_labels = torch.full((batch_size, num_queries, num_points), LABEL_PADDING, dtype=torch.int64)
        labels = torch.zeros((batch_size, num_queries, *mask_size), dtype=torch.float32)
        category_ids = torch.full((batch_size, num_queries), -1, dtype=torch.int64)
        query_mask = torch.zeros((batch_size, num_queries), dtype=torch.bool)
        for b, item in enumerate(items):
            q, p = item["input_points"].shape[:2]
            input_points[b, :q, :p] = item["input_points"]
            input_labels[b, :q, :p] = item["input_labels"]
            labels[b, :q] = item["labels"]
            category_ids[b, :q] = item["category_ids"]
            query_mask[b, :q] = True

        batch = {
            "input_points": input_points,
            "input_labels": input_labels,
            "query_mask": query_mask,
            "labels": labels,
            "category_ids": category_ids,
            "original_sizes": torch.stack([item["original_size"] for item in items]).to(torch.int64),
            "image_ids": torch.stack([item["image_id"] for item in items]).to(torch.int64),
        }
        if "has_mask" in keys:  # box-only data (data/box_only.py): False where a query has no ground-truth mask
            has_mask = torch.zeros((batch_size, num_queries), dtype=torch.bool)
            for b, item in enumerate(items):
                has_mask[b, : item["has_mask"].shape[0]] = item["has_mask"]
            batch["has_mask"] = has_mask
        for key in sorted(keys - _HANDLED):  # pixel_values, image_embeddings, teacher_image_embeddings, ...
            batch[key] = torch.stack([item[key] for item in items])
        if "full_resolution_labels" in keys:
            batch["full_resolution_labels"] = [item["full_resolution_labels"] for item in items]
        return batch
