"""Trainer callbacks: per-epoch prompt sampling and TensorBoard mask overlays.

* :class:`DatasetEpochCallback` tells the training dataset which epoch starts, so the prompts drawn
  for an image (object subset, box jitter) depend on (seed, epoch, index) only. The epoch is
  computed from ``state.global_step`` exactly as the Trainer computes where a resumed run starts,
  so a resumed run draws the same prompts as an uninterrupted one. (Accelerate's dataloader does
  not forward ``set_epoch`` to the dataset when it shards batches over several processes, hence an
  explicit callback.)
* :class:`TensorBoardOverlayCallback` draws, at every evaluation, a few validation images with the
  box prompts, the true masks (left) and the predicted masks (right) into TensorBoard. It reads the
  images itself, so it works when training reads cached embeddings. The pictures come from the
  package's one overlay renderer (``inference/overlay.py``); the candidate is chosen with
  ``metrics.select_by_predicted_iou`` and resized with the image processor, as in evaluation.
"""

from __future__ import annotations

import logging
from typing import List, Optional

import numpy as np
import torch
from transformers import TrainerCallback

from ..image_processing_efficientsam import EfficientSamImageProcessor
from ..image_utils import to_rgb_array
from ..inference.overlay import render_overlay
from ..metrics import select_by_predicted_iou
from ..processing_efficientsam import to_original_frame

logger = logging.getLogger(__name__)

# render_overlay is re-exported for modeling_efficientsam.training's public names; it lives in inference/overlay.py.
__all__ = ["DatasetEpochCallback", "TensorBoardOverlayCallback", "render_overlay"]


class DatasetEpochCallback(TrainerCallback):
    """Calls ``train_dataset.set_epoch(epoch)`` at the start of every epoch (see the module docstring)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        dataset = self.trainer.train_dataset
        per_epoch = getattr(self.trainer, "steps_per_epoch", None)
        if dataset is None or not hasattr(dataset, "set_epoch") or not per_epoch:
            return
        dataset.set_epoch(int(state.global_step // per_epoch))


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
        self.image_processor = EfficientSamImageProcessor(size=image_size)  # resizes the predicted logits
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
                logits = select_by_predicted_iou(pred_masks=outputs.pred_masks.float(), iou_scores=outputs.iou_scores.float())
                pred = self.image_processor.post_process_masks(logits[:, :, None], [(height, width)])[0][:, 0]
                pred = pred.cpu().numpy()
                corners = to_original_frame(item["input_points"][:, :2].numpy(), (height, width), self.dataset.image_size)
                boxes = corners.reshape(-1, 4)
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
