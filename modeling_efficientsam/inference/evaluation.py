"""Evaluate promptable segmentation with ground-truth boxes as prompts: mIoU family and COCO mask AP.

Protocol (the same for every model of one run, so their numbers compare):

* Every non-crowd object of an image is one prompt: its ground-truth box (xyxy pixels from the
  prepared dataset), optionally jittered with :func:`modeling_efficientsam.data.prompts.jitter_box`
  (each side moves by up to ``box_noise_scale`` times the box size). The random draws come from
  ``numpy.random.default_rng([seed, image_index])``, so the prompts depend on the seed and the image
  only, never on the model or the batch size. Crowd objects are not prompted; they stay in the COCO
  ground truth as regions that COCOeval ignores.
* The predicted mask of a prompt is the candidate with the highest predicted IoU, resized to the
  image (the predictor's output); its score is that predicted IoU.
* mIoU, per-category IoU, F1 and boundary F-score are computed with
  :mod:`modeling_efficientsam.metrics` (the definitions training uses) between each predicted mask
  and the ground-truth mask of the prompted object, at the original image resolution; see
  ``metrics/functional.py`` for the exact definitions (instance-averaged, boundary tolerance in pixels).
* COCO mask AP / AP50 / AP75 / APs / APm / APl come from ``pycocotools`` COCOeval (``iouType="segm"``)
  on the same predictions, labelled with the prompted object's category. ``maxDets`` is raised to
  the largest number of prompts in an image so no prediction is cut off. Ground-truth annotation ids
  are renumbered from 1 for COCOeval, which treats id 0 as "unmatched".
* Prompt dependence (:mod:`modeling_efficientsam.metrics.prompt_dependence`): with
  ``wrong_prompts`` (:func:`make_wrong_prompts`), every object is also prompted with a wrong box
  (another object's ground-truth box in the same image, or its own box moved off it when it is the
  image's only object), in the same predictor call as its own box (one encoder pass per image). The
  answer is scored against the object's own mask: ``prompt_dependence`` holds ``own_box_miou``,
  ``wrong_box_miou``, ``prompt_gap`` and ``ignores_prompt`` (gap below the threshold). The other
  metrics use the own-box answers only.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..data.masks import decode_rle
from ..data.prompts import jitter_box
from ..metrics import STATISTIC_NAMES, aggregate_segmentation_metrics, instance_metrics_from_statistics, segmentation_statistics
from ..metrics.prompt_dependence import DEFAULT_MIN_PROMPT_GAP, prompt_dependence_summary, wrong_boxes
from .results import result_record

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass
class ImagePrompts:
    """Prompts of one image: indices into its ``objects`` list and the (jittered) xyxy boxes."""

    object_indices: list
    boxes: np.ndarray  # (n, 4)


def make_prompts(split, box_noise_scale: float = 0.0, seed: int = 0) -> list:
    """One :class:`ImagePrompts` per row of ``split`` (see the module docstring for the protocol)."""
    if box_noise_scale < 0:
        raise ValueError(f"box_noise_scale must be >= 0, got {box_noise_scale}")
    columns = split.select_columns(["objects", "width", "height"])
    prompts = []
    for index, row in enumerate(columns):
        rng = np.random.default_rng([int(seed), index])
        indices, boxes = [], []
        for position, obj in enumerate(row["objects"]):
            if obj["iscrowd"]:
                continue
            indices.append(position)
            boxes.append(jitter_box(obj["box"], row["width"], row["height"], box_noise_scale, rng))
        prompts.append(ImagePrompts(indices, np.array(boxes, dtype=np.float64).reshape(-1, 4)))
    return prompts


def make_wrong_prompts(split, prompts: list) -> list:
    """The wrong box of every prompt of :func:`make_prompts` (see
    :func:`~modeling_efficientsam.metrics.prompt_dependence.wrong_boxes`), from the ground-truth
    boxes of the same image; same object indices, so the answers are scored against the same masks."""
    columns = split.select_columns(["objects", "width", "height"])
    wrong = []
    for row, image_prompts in zip(columns, prompts):
        truth = np.array([row["objects"][i]["box"] for i in image_prompts.object_indices], dtype=np.float64).reshape(-1, 4)
        wrong.append(ImagePrompts(list(image_prompts.object_indices), wrong_boxes(truth, row["width"], row["height"])))
    return wrong


def coco_ground_truth(split, category_ids: list, category_names: list):
    """A ``pycocotools`` COCO object holding every object of ``split`` (crowd ones included).

    Annotation ids are 1, 2, 3, ... in dataset order (COCOeval reads id 0 as "no match").
    """
    from pycocotools.coco import COCO

    images, annotations = [], []
    next_id = 1
    for row in split.select_columns(["image_id", "file_name", "width", "height", "objects"]):
        images.append({"id": int(row["image_id"]), "file_name": row["file_name"],
                       "width": int(row["width"]), "height": int(row["height"])})
        for obj in row["objects"]:
            x1, y1, x2, y2 = (float(v) for v in obj["box"])
            annotations.append({
                "id": next_id,
                "image_id": int(row["image_id"]),
                "category_id": int(obj["category_id"]),
                "segmentation": {"size": list(obj["mask"]["size"]), "counts": obj["mask"]["counts"]},
                "area": float(obj["area"]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "iscrowd": int(obj["iscrowd"]),
            })
            next_id += 1
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": int(i), "name": n} for i, n in zip(category_ids, category_names)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_mask_ap(coco_gt, results: list, max_detections: int = 100) -> dict:
    """AP, AP50, AP75, APs, APm, APl (COCOeval ``segm``) of COCO results against ``coco_gt``.

    Values are floats in [0, 1]; ``None`` where COCOeval has nothing to average (e.g. APs without
    small objects, reported by COCOeval as -1).
    """
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in COCO_STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.params.maxDets = [1, 10, max(100, int(max_detections))]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (None if value < 0 else float(value)) for name, value in zip(COCO_STAT_NAMES, evaluator.stats[:6])}


def evaluate_predictor(
    predictor,
    split,
    prompts: list,
    coco_gt,
    *,
    category_ids: list,
    category_names: list,
    batch_size: int = 2,
    boundary_tolerance: int = 2,
    multimask_output: bool = True,
    progress: bool = True,
    wrong_prompts: list = None,
    min_prompt_gap: float = DEFAULT_MIN_PROMPT_GAP,
) -> dict:
    """Run ``predictor`` on every row of ``split`` with ``prompts`` and compute all metrics.

    ``predictor`` needs ``predict_batch(images, boxes_per_image, box_format=, normalized=,
    multimask_output=, batch_size=)`` returning, per image, an object with ``masks`` ((n, H, W) bool)
    and ``scores`` ((n,)), like :class:`~modeling_efficientsam.inference.EfficientSamPredictor`.
    With ``wrong_prompts`` (:func:`make_wrong_prompts`) the result also has ``prompt_dependence``.
    """
    from tqdm.auto import tqdm

    if len(prompts) != len(split):
        raise ValueError(f"{len(prompts)} prompt lists for {len(split)} images")
    if wrong_prompts is not None and [len(p.boxes) for p in wrong_prompts] != [len(p.boxes) for p in prompts]:
        raise ValueError("wrong_prompts must hold one wrong box per prompt (see make_wrong_prompts)")
    wrong_iou = []
    id2label = dict(zip(category_ids, category_names))
    counts = {name: [] for name in STATISTIC_NAMES}
    categories, results = [], []
    started = time.perf_counter()
    bar = tqdm(total=len(split), desc="images", unit="img", disable=not progress)
    for start in range(0, len(split), batch_size):
        rows = split[start : start + batch_size]
        wanted = [offset for offset in range(len(rows["image_id"])) if len(prompts[start + offset].boxes)]
        predictions = []
        if wanted:
            predictions = predictor.predict_batch(
                [np.array(rows["image"][offset].convert("RGB")) for offset in wanted],
                [prompts[start + offset].boxes if wrong_prompts is None
                 else np.concatenate([prompts[start + offset].boxes, wrong_prompts[start + offset].boxes])
                 for offset in wanted],
                box_format="xyxy", normalized=False, multimask_output=multimask_output, batch_size=batch_size,
            )
        for offset, prediction in zip(wanted, predictions):
            objects = rows["objects"][offset]
            image_prompts = prompts[start + offset]
            chosen = [objects[position] for position in image_prompts.object_indices]
            height, width = int(rows["height"][offset]), int(rows["width"][offset])
            pred = torch.as_tensor(prediction.masks).bool()
            scores = torch.as_tensor(prediction.scores).tolist()
            target = torch.from_numpy(np.stack([decode_rle(obj["mask"]) for obj in chosen]))
            if wrong_prompts is not None:
                pred, wrong_pred, scores = pred[: len(chosen)], pred[len(chosen):], scores[: len(chosen)]
                if tuple(wrong_pred.shape) != tuple(target.shape):
                    raise ValueError(f"image id {rows['image_id'][offset]}: predicted wrong-box masks "
                                     f"{tuple(wrong_pred.shape)}, expected {tuple(target.shape)}")
                wrong_stats = segmentation_statistics(wrong_pred, target, boundary_tolerance=0)
                wrong_iou.append(instance_metrics_from_statistics(wrong_stats)["iou"])
            if tuple(pred.shape) != (len(chosen), height, width):
                raise ValueError(
                    f"image id {rows['image_id'][offset]}: predicted masks {tuple(pred.shape)}, expected "
                    f"{(len(chosen), height, width)}"
                )
            stats = segmentation_statistics(pred, target, boundary_tolerance=boundary_tolerance)
            for name in STATISTIC_NAMES:
                counts[name].append(stats[name])
            for obj, mask, score in zip(chosen, pred.numpy(), scores):
                categories.append(int(obj["category_id"]))
                results.append(result_record(mask, rows["image_id"][offset], obj["category_id"], score, with_bbox=False))
        bar.update(len(rows["image_id"]))
    bar.close()
    seconds = time.perf_counter() - started
    counts = {name: torch.cat(values) if values else torch.zeros(0, dtype=torch.int64) for name, values in counts.items()}
    metrics = aggregate_segmentation_metrics(counts, category_ids=categories, id2label=id2label)
    max_per_image = max((len(p.boxes) for p in prompts), default=0)
    metrics["coco"] = coco_mask_ap(coco_gt, results, max_detections=max_per_image)
    if wrong_prompts is not None:
        wrong_miou = float(np.mean(np.concatenate(wrong_iou))) if wrong_iou else float("nan")
        metrics["prompt_dependence"] = prompt_dependence_summary(metrics["mean_iou"], wrong_miou, min_prompt_gap)
    metrics["num_images"] = len(split)
    metrics["seconds"] = round(seconds, 3)
    metrics["images_per_second"] = round(len(split) / seconds, 4) if seconds > 0 else None
    return metrics


__all__ = [
    "COCO_STAT_NAMES",
    "ImagePrompts",
    "coco_ground_truth",
    "coco_mask_ap",
    "evaluate_predictor",
    "make_prompts",
    "make_wrong_prompts",
]
