"""Trainer callbacks: per-epoch prompt sampling and TensorBoard mask overlays.

* :class:`DatasetEpochCallback` tells the training dataset which epoch starts, so the prompts drawn
  for an image (object subset, box jitter) depend on (seed, epoch, index) only. The epoch is
  computed from ``state.global_step`` exactly as the Trainer computes where a resumed run starts,
  so a resumed run draws the same prompts as an uninterrupted one. (Accelerate's dataloader does
  not forward ``set_epoch`` to the dataset when it shards batches over several processes, hence an
  explicit callback.)
* :class:`TensorBoardOverlayCallback` draws, at every evaluation, a few validation images with the
  box prompts, the true masks (left) and the predicted masks (right) into TensorBoard. It reads the
  images itself, so it works when training reads cached embeddings.
"""

from __future__ import annotations

import logging
from typing import List, Optional

import numpy as np
import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

__all__ = ["DatasetEpochCallback", "TensorBoardOverlayCallback", "render_overlay"]

_PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255]],
    dtype=np.float32,
)


class DatasetEpochCallback(TrainerCallback):
    """Calls ``train_dataset.set_epoch(epoch)`` at the start of every epoch (see the module docstring)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        dataset = self.trainer.train_dataset
        per_epoch = getattr(self.trainer, "_steps_per_epoch", None)
        if dataset is None or not hasattr(dataset, "set_epoch") or not per_epoch:
            return
        dataset.set_epoch(int(state.global_step // per_epoch))


def render_overlay(image: np.ndarray, boxes: np.ndarray, true_masks: np.ndarray, pred_masks: np.ndarray,
                   alpha: float = 0.45) -> np.ndarray:
    """Two panels side by side: true masks (left) and predicted masks (right), boxes on both.

    Args:
        image: (H, W, 3) uint8.
        boxes: (Q, 4) x1, y1, x2, y2 in pixels of ``image``.
        true_masks, pred_masks: (Q, H, W) bool.

    Returns:
        (H, 2W + 4, 3) uint8; query q has colour ``q`` of a fixed palette in both panels.
    """
    from PIL import Image, ImageDraw

    panels = []
    for masks in (true_masks, pred_masks):
        canvas = image.astype(np.float32).copy()
        for query, mask in enumerate(masks):
            colour = _PALETTE[query % len(_PALETTE)]
            canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colour
        panel = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(panel)
        for query, box in enumerate(boxes):
            colour = tuple(int(c) for c in _PALETTE[query % len(_PALETTE)])
            draw.rectangle([float(v) for v in box], outline=colour, width=2)
        panels.append(np.asarray(panel))
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    return np.concatenate([panels[0], gap, panels[1]], axis=1)


class TensorBoardOverlayCallback(TrainerCallback):
    """Writes ``eval/overlay_<i>`` images (truth | prediction) to TensorBoard at every evaluation.

    Args:
        split: the converted validation split (a ``datasets.Dataset`` with images).
        image_size, mask_size: the model's input and low-resolution mask sizes.
        num_images: how many of the split's first images to draw.
        max_objects: queries per image (None for all).
        tb_writer: a ``SummaryWriter``; by default the one of the Trainer's TensorBoardCallback.
    """

    def __init__(self, split, image_size: int, mask_size: int, num_images: int = 4, max_objects: Optional[int] = None,
                 tb_writer=None):
        from ..data.training_dataset import EfficientSamTrainingDataset

        count = min(num_images, len(split))
        subset = split.select(range(count))
        self.dataset = EfficientSamTrainingDataset(
            subset, image_size=image_size, mask_size=mask_size, max_objects=max_objects, box_noise_scale=0.0,
            return_full_resolution_masks=True,
        )
        self.images = subset.select_columns(["image"])
        self.tb_writer = tb_writer
        self.callback_handler = None
        self.last_images: List[np.ndarray] = []

    def _writer(self):
        if self.tb_writer is not None:
            return self.tb_writer
        from transformers.integrations import TensorBoardCallback

        for callback in getattr(self.callback_handler, "callbacks", []):
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                return callback.tb_writer
        return None

    def attach(self, trainer) -> "TensorBoardOverlayCallback":
        """Register with ``trainer`` (and find its TensorBoard writer through its callback handler)."""
        self.callback_handler = trainer.callback_handler
        trainer.add_callback(self)
        return self

    @torch.no_grad()
    def render(self, model) -> List[np.ndarray]:
        """The overlay of every selected image, predicted with ``model`` (eval mode, no jitter)."""
        import torch.nn.functional as F

        from ..image_utils import to_rgb_array

        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        overlays = []
        try:
            for index in range(len(self.dataset)):
                item = self.dataset[index]
                if item["labels"].shape[0] == 0:
                    continue
                image = to_rgb_array(self.images[index]["image"], apply_exif=False)
                height, width = image.shape[:2]
                outputs = model(
                    pixel_values=item["pixel_values"][None].to(device),
                    input_points=item["input_points"][None].to(device),
                    input_labels=item["input_labels"][None].to(device),
                    multimask_output=True,
                )
                best = outputs.iou_scores[0].float().argmax(-1)  # (Q,)
                logits = outputs.pred_masks[0].float()[torch.arange(best.shape[0]), best]  # (Q, m, m)
                logits = F.interpolate(logits[:, None], size=(height, width), mode="bicubic", align_corners=False)[:, 0]
                pred = (logits > 0).cpu().numpy()
                scale = np.array([width, height, width, height], dtype=np.float32) / float(self.dataset.image_size)
                boxes = item["input_points"][:, :2].reshape(-1, 4).numpy() * scale
                overlays.append(render_overlay(image, boxes, item["full_resolution_labels"].numpy(), pred))
        finally:
            model.train(was_training)
        return overlays

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        writer = self._writer()
        if writer is None:
            return
        self.last_images = self.render(model)
        for index, overlay in enumerate(self.last_images):
            writer.add_image(f"eval/overlay_{index}", overlay, state.global_step, dataformats="HWC")
        writer.flush()
