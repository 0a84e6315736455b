"""Box and point prompted segmentation with a loaded EfficientSAM: one image or many.

Typical use::

    from modeling_efficientsam.inference import EfficientSamPredictor

    predictor = EfficientSamPredictor.from_pretrained("path/or/hub-id")

    # one call: the image and normalized (x1, y1, x2, y2) boxes, as in the original guide
    result = predictor.predict("board.jpg", [(0.1, 0.1, 0.5, 0.8), (0.6, 0.2, 0.9, 0.4)])

    # or: encode once, then ask as many questions as you like
    predictor.set_image("board.jpg")
    result = predictor.predict(boxes=[[120, 40, 380, 300]])          # pixels
    result = predictor.predict(points=[[[200, 150]]], labels=[[1]])    # one positive point
    result.masks        # (N, H, W) bool at the original image size
    result.scores       # (N,) predicted IoU of the chosen candidate

How a single positional argument is read, and how ``normalized=None`` decides between fractions
and pixels: see :mod:`.prompt_checks`.

All coordinate arithmetic (normalized -> pixels -> model frame, xywh -> xyxy, clipping, the empty /
inverted / out-of-range checks) and the resizing of masks back to the image are done by
:class:`~modeling_efficientsam.EfficientSamProcessor`, and the candidate with the highest predicted IoU
is chosen by :func:`modeling_efficientsam.metrics.select_by_predicted_iou`; this module only batches.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional, Sequence, Union

import torch

from ..image_processing_efficientsam import EfficientSamImageProcessor
from ..metrics import select_by_predicted_iou
from ..modeling_efficientsam import EfficientSamModel
from ..processing_efficientsam import EfficientSamProcessor, load_processor
from .loading import load_efficientsam_model
from .prompt_checks import check_prompts, decide_normalized, looks_like_prompts
from .results import EfficientSamPrediction

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

#: Upper bound on the float32 elements of one post-processing step (resized logits of several queries).
_POSTPROCESS_ELEMENTS = 32 * 1024 * 1024


def resolve_dtype(dtype) -> torch.dtype:
    """``None`` / ``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` ... -> a torch floating dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[key]


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------
# predictor
# ----------------------------------------------------------------------------------------------


class EfficientSamPredictor:
    """Runs an :class:`EfficientSamModel` on images with box or point prompts.

    Args:
        model: the model (moved to ``device`` and put in eval mode).
        processor: an :class:`EfficientSamProcessor`; by default one for ``model.config.image_size``.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when available, else CPU.
        dtype: compute dtype (``torch.bfloat16``, ``"bf16"``, ``"fp16"``, ...; default float32). Without
            ``autocast`` the weights are cast to it; with ``autocast=True`` the weights stay float32 and
            the forward runs under ``torch.autocast`` with this dtype. Results are always float32 / bool.
        autocast: see ``dtype``.
        max_queries_per_batch: at most this many prompts go through the mask decoder at once (and
            post-processing is further split by output size), which bounds memory for any number of
            boxes.
    """

    def __init__(
        self,
        model: EfficientSamModel,
        processor: Optional[EfficientSamProcessor] = None,
        device=None,
        dtype=None,
        autocast: bool = False,
        max_queries_per_batch: int = 16,
    ):
        if max_queries_per_batch < 1:
            raise ValueError(f"max_queries_per_batch must be >= 1, got {max_queries_per_batch}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.autocast = bool(autocast)
        if self.autocast and self.dtype == torch.float32:
            raise ValueError("autocast=True needs a lower-precision dtype (bfloat16 or float16)")
        weights_dtype = torch.float32 if self.autocast else self.dtype
        self.model = model.to(device=self.device, dtype=weights_dtype).eval()
        if processor is None:
            processor = EfficientSamProcessor(EfficientSamImageProcessor(size=model.config.image_size))
        if processor.size != model.config.image_size:
            raise ValueError(
                f"the processor resizes to {processor.size} but the model expects {model.config.image_size}"
            )
        self.processor = processor
        self.max_queries_per_batch = int(max_queries_per_batch)
        self.reset_image()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        device=None,
        dtype=None,
        autocast: bool = False,
        max_queries_per_batch: int = 16,
        **kwargs,
    ) -> "EfficientSamPredictor":
        """Load model and processor from a folder or Hub id (``kwargs`` go to both ``from_pretrained``).

        The processor comes from :func:`~modeling_efficientsam.processing_efficientsam.load_processor`:
        the settings saved with the model, or the default processor for the model's image size when the
        folder has none (a processor config that cannot be read is an error). A model that cannot be
        loaded (damaged weights, broken config, missing folder) raises
        :class:`~.loading.ModelLoadError` naming the file and the fix.
        """
        model = load_efficientsam_model(pretrained_model_name_or_path, **kwargs)
        processor = load_processor(pretrained_model_name_or_path, image_size=model.config.image_size, **kwargs)
        return cls(model, processor, device=device, dtype=dtype, autocast=autocast,
                   max_queries_per_batch=max_queries_per_batch)

    # -- running the model --------------------------------------------------------------------
    def _context(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def _pixel_values(self, images: Sequence, first_index: int = 0) -> tuple:
        """Images -> (pixel_values on the device, list of (H, W)); errors name the failing image."""
        tensors, sizes = [], []
        for offset, image in enumerate(images):
            try:
                processed = self.processor.image_processor(image)
            except (ValueError, TypeError, FileNotFoundError) as error:
                label = f"image {first_index + offset}" + (f" ({image})" if isinstance(image, (str, os.PathLike)) else "")
                raise type(error)(f"{label}: {error}") from error
            tensors.append(processed["pixel_values"])
            sizes.append(tuple(int(v) for v in processed["original_sizes"][0].tolist()))
        pixel_values = torch.cat(tensors).to(self.device)
        if not self.autocast:
            pixel_values = pixel_values.to(self.dtype)
        return pixel_values, sizes

    @torch.inference_mode()
    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with self._context():
            return self.model.get_image_embeddings(pixel_values)

    def set_image(self, image) -> "EfficientSamPredictor":
        """Encode one image (path, PIL image, array or tensor) and keep its embedding for `predict`."""
        pixel_values, sizes = self._pixel_values([image])
        self._embedding = self._encode(pixel_values)
        self._original_size = sizes[0]
        return self

    def reset_image(self) -> None:
        self._embedding = None
        self._original_size = None

    @property
    def is_image_set(self) -> bool:
        return self._embedding is not None

    @property
    def original_size(self) -> Optional[tuple]:
        """(H, W) of the image set with `set_image`."""
        return self._original_size

    @property
    def image_embeddings(self) -> Optional[torch.Tensor]:
        """(1, C, h, w) embedding of the image set with `set_image`."""
        return self._embedding

    # -- prompts --------------------------------------------------------------------------------
    def _prepare_prompts(self, size, boxes, points, labels, box_format, normalized) -> tuple:
        """Checked prompts -> model-frame tensors from the processor, plus the normalized decision."""
        boxes, points, labels, num_queries = check_prompts(boxes, points, labels)
        normalized = decide_normalized(boxes, points, labels, normalized)
        if num_queries == 0:
            return {}, 0, normalized
        encoded = self.processor(
            original_sizes=[size],
            input_boxes=None if boxes is None else [boxes],
            input_points=None if points is None else [points],
            input_labels=None if labels is None else [labels],
            box_format=box_format,
            normalized=normalized,
        )
        prompts = {key: encoded[key] for key in ("input_boxes", "input_points", "input_labels") if key in encoded}
        return prompts, num_queries, normalized

    @torch.inference_mode()
    def _decode(self, embedding: torch.Tensor, size, prompts: dict, num_queries: int, multimask_output: bool,
                normalized: bool) -> EfficientSamPrediction:
        height, width = size
        if num_queries == 0:
            candidates = self.model.config.mask_decoder_config.num_multimask_outputs if multimask_output else 1
            return EfficientSamPrediction.empty(size, candidates, self.model.config.image_size // 4, normalized)
        masks, scores, chosen, all_iou, all_logits = [], [], [], [], []
        for start in range(0, num_queries, self.max_queries_per_batch):
            chunk = {
                key: value[:, start : start + self.max_queries_per_batch].to(self.device)
                for key, value in prompts.items()
            }
            with self._context():
                output = self.model(image_embeddings=embedding, multimask_output=multimask_output, **chunk)
            logits = output.pred_masks[0].float()  # (q, M, h, w)
            iou = output.iou_scores[0].float()  # (q, M)
            best_logits, best, best_iou = select_by_predicted_iou(pred_masks=logits, iou_scores=iou, return_index=True)
            # Resize only the chosen candidate, a few queries at a time (the full-size float logits of
            # many queries of a large image would not fit in memory).
            step = max(1, _POSTPROCESS_ELEMENTS // max(1, height * width))
            for offset in range(0, best_logits.shape[0], step):
                resized = self.processor.post_process_masks(
                    best_logits[offset : offset + step, None][None], [size], binarize=True
                )[0]
                masks.append(resized[:, 0].cpu())
            scores.append(best_iou.cpu())
            chosen.append(best.cpu())
            all_iou.append(iou.cpu())
            all_logits.append(logits.cpu())
        return EfficientSamPrediction(
            masks=torch.cat(masks),
            scores=torch.cat(scores),
            candidate_index=torch.cat(chosen),
            iou_scores=torch.cat(all_iou),
            low_res_logits=torch.cat(all_logits),
            original_size=(height, width),
            normalized=normalized,
        )

    # -- public prediction API ----------------------------------------------------------------
    def predict(
        self,
        *args,
        image=None,
        boxes=None,
        points=None,
        labels=None,
        box_format: str = "xyxy",
        normalized: Optional[bool] = None,
        multimask_output: bool = True,
    ) -> EfficientSamPrediction:
        """Segment the prompted objects of one image.

        Call forms: ``predict(image, boxes)`` (sets the image, then predicts) or, after
        :meth:`set_image`, ``predict(boxes)`` / ``predict(boxes=..., points=..., labels=...)``; see
        :mod:`.prompt_checks` for how a single positional argument is read.

        Args:
            image: path, PIL image, numpy array or tensor; replaces the image kept by `set_image`.
            boxes: (N, 4) boxes (a single box may be given as 4 numbers), in `box_format`.
            points, labels: (N, P, 2) points and (N, P) labels (1 positive, 0 negative, -1 padding).
                With boxes too, query i is box i followed by its points.
            box_format: ``"xyxy"`` or ``"xywh"``.
            normalized: True for fractions of the image size, False for pixels, None to decide from
                the values (see :mod:`.prompt_checks`).
            multimask_output: choose among 3 candidates per prompt (True) or use the single output.
        """
        if len(args) > 2:
            raise TypeError(f"predict takes at most 2 positional arguments (image, boxes); got {len(args)}")
        if len(args) == 2:
            if image is not None or boxes is not None:
                raise TypeError("image and boxes were given both positionally and as keywords")
            image, boxes = args
        elif len(args) == 1:
            if looks_like_prompts(args[0]):
                if boxes is not None:
                    raise TypeError("boxes were given both positionally and as a keyword")
                boxes = args[0]
            else:
                if image is not None:
                    raise TypeError("image was given both positionally and as a keyword")
                image = args[0]
        if image is not None:
            self.set_image(image)
        elif not self.is_image_set:
            raise RuntimeError("no image: call set_image(image) first, or predict(image, boxes)")
        prompts, num_queries, normalized = self._prepare_prompts(
            self._original_size, boxes, points, labels, box_format, normalized
        )
        return self._decode(self._embedding, self._original_size, prompts, num_queries, multimask_output, normalized)

    def iter_predict_batch(
        self,
        images: Sequence,
        boxes_per_image: Optional[Sequence] = None,
        points_per_image: Optional[Sequence] = None,
        labels_per_image: Optional[Sequence] = None,
        *,
        box_format: str = "xyxy",
        normalized: Optional[bool] = None,
        multimask_output: bool = True,
        batch_size: int = 4,
    ) -> Iterator[EfficientSamPrediction]:
        """Like :meth:`predict_batch`, but yields one result per image as soon as it is ready.

        Prompts of every image are checked before any image is encoded, so a bad box fails fast.
        The image kept by `set_image` is not touched.
        """
        images = list(images)
        num_images = len(images)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")

        def per_image(values, name):
            if values is None:
                return [None] * num_images
            values = list(values)
            if len(values) != num_images:
                raise ValueError(f"{name} has entries for {len(values)} images but {num_images} images were given")
            return values

        boxes_list = per_image(boxes_per_image, "boxes_per_image")
        points_list = per_image(points_per_image, "points_per_image")
        labels_list = per_image(labels_per_image, "labels_per_image")
        if boxes_per_image is None and points_per_image is None:
            raise ValueError("no prompts: pass boxes_per_image and/or points_per_image with labels_per_image")
        # Shapes and the normalized decision first (sizes are not known before reading the images).
        for index in range(num_images):
            try:
                checked_boxes, checked_points, checked_labels, _ = check_prompts(
                    boxes_list[index], points_list[index], labels_list[index])
                decide_normalized(checked_boxes, checked_points, checked_labels, normalized)
            except ValueError as error:
                raise ValueError(f"image {index}: {error}") from error

        for start in range(0, num_images, batch_size):
            batch = images[start : start + batch_size]
            pixel_values, sizes = self._pixel_values(batch, first_index=start)
            embeddings = self._encode(pixel_values)
            for offset, size in enumerate(sizes):
                index = start + offset
                try:
                    prompts, num_queries, used = self._prepare_prompts(
                        size, boxes_list[index], points_list[index], labels_list[index], box_format, normalized
                    )
                except ValueError as error:
                    raise ValueError(f"image {index}: {error}") from error
                yield self._decode(embeddings[offset : offset + 1], size, prompts, num_queries, multimask_output, used)

    def predict_batch(self, images: Sequence, boxes_per_image: Optional[Sequence] = None, **kwargs) -> list:
        """Segment the prompted objects of many images, encoding `batch_size` images at a time.

        Args:
            images: a sequence of images (paths, PIL images, arrays, tensors); sizes may differ.
            boxes_per_image: one (N_i, 4) box array per image (N_i may be 0).
            points_per_image, labels_per_image: optional point prompts per image, as in `predict`.
            box_format, normalized, multimask_output: as in `predict` (`normalized=None` decides per
                image).
            batch_size: images per image-encoder forward.

        Returns a list of :class:`EfficientSamPrediction`, one per image.
        """
        return list(self.iter_predict_batch(images, boxes_per_image, **kwargs))


__all__ = ["EfficientSamPredictor", "resolve_device", "resolve_dtype"]
