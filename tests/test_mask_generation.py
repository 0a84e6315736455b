"""Automatic mask generation: transformers' `mask-generation` pipeline on EfficientSAM.

The helpers are checked on hand-made masks and boxes; the pipeline runs on a random model of the
quickstart architecture (recipes/configs/quickstart_model.json, 256 px input), in this process and from
a saved folder in a process where this package cannot be imported.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from modeling_efficientsam import EfficientSamConfig, EfficientSamImageProcessor, EfficientSamModel, EfficientSamProcessor
from modeling_efficientsam.mask_generation_efficientsam import (
    box_iou,
    greedy_box_nms,
    layered_crop_boxes,
    masks_to_boxes,
    masks_to_rle,
    point_grid,
    rle_to_mask,
    stability_scores,
)
from modeling_efficientsam.processing_efficientsam import to_model_frame
from conftest import run_without_package
from conftest import sample_image as shared_sample_image

QUICKSTART_MODEL = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "quickstart_model.json"
HEIGHT, WIDTH = 96, 128
SIDE = 5  # points per side of the grid: 25 point prompts, 75 candidate masks
NO_FILTERS = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "crops_nms_thresh": 1.0}


# -- helpers on known values -------------------------------------------------------------------------
def test_point_grid_is_cell_centres_row_by_row():
    grid = point_grid(2)
    torch.testing.assert_close(grid, torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]],
                                                  dtype=torch.float64))
    with pytest.raises(ValueError):
        point_grid(0)


def test_layered_crop_boxes_tile_the_image_with_overlap():
    boxes, layers = layered_crop_boxes(100, 200, crop_n_layers=1, overlap_ratio=0.2)
    assert boxes[0] == [0, 0, 200, 100] and layers == [0, 1, 1, 1, 1]
    covered = np.zeros((100, 200), dtype=int)
    for left, top, right, bottom in boxes[1:]:
        assert 0 <= left < right <= 200 and 0 <= top < bottom <= 100
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1 and covered.max() == 4  # every pixel covered; the centre by all four tiles
    assert layered_crop_boxes(100, 200, 0, 0.2) == ([[0, 0, 200, 100]], [0])


def test_stability_score_is_the_iou_of_two_thresholds():
    logits = torch.tensor([[[3.0, 0.5, -0.5, -3.0]], [[-5.0, -5.0, -5.0, -5.0]]])  # (2, 1, 4)
    scores = stability_scores(logits, mask_threshold=0.0, offset=1.0)
    # mask 0: above +1 -> 1 pixel, above -1 -> 3 pixels; mask 1: both empty -> 0 (not NaN)
    torch.testing.assert_close(scores, torch.tensor([1 / 3, 0.0], dtype=torch.float64))


def test_masks_to_boxes_uses_inclusive_pixel_indices():
    masks = torch.zeros(2, 6, 8, dtype=torch.bool)
    masks[0, 1:4, 2:7] = True
    assert masks_to_boxes(masks).tolist() == [[2, 1, 6, 3], [0, 0, 0, 0]]
    assert masks_to_boxes(masks[:0]).shape == (0, 4)


def test_run_length_codes_round_trip_in_coco_order():
    mask = torch.tensor([[[False, True], [True, True]], [[True, True], [True, True]]])
    codes = masks_to_rle(mask)
    assert codes[0] == {"size": [2, 2], "counts": [1, 3]}  # column-major: 0, 1, 1, 1
    assert codes[1] == {"size": [2, 2], "counts": [0, 4]}  # starts with an empty run of zeros
    rng = np.random.default_rng(0)
    random_masks = torch.from_numpy(rng.random((3, 7, 5)) > 0.5)
    for code, expected in zip(masks_to_rle(random_masks, as_lists=False), random_masks):
        assert isinstance(code["counts"], torch.Tensor)
        np.testing.assert_array_equal(rle_to_mask(code), expected.numpy())
    with pytest.raises(ValueError):
        rle_to_mask({"size": [2, 2], "counts": [1, 2]})


def test_greedy_nms_keeps_the_best_of_overlapping_boxes():
    boxes = torch.tensor([[0, 0, 9, 9], [1, 1, 10, 10], [20, 20, 29, 29], [0, 0, 9, 9]])
    scores = torch.tensor([0.5, 0.9, 0.7, 0.5])
    torch.testing.assert_close(box_iou(boxes[0], boxes[1:]), torch.tensor([81 / 119, 0.0, 1.0], dtype=torch.float64))
    assert greedy_box_nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert greedy_box_nms(boxes, scores, 0.7).tolist() == [1, 2, 0]  # 0 and 3 are the same box: one stays
    assert greedy_box_nms(boxes, scores, 1.0).tolist() == [1, 2, 0, 3]


# -- image-processor methods ---------------------------------------------------------------------
def test_generate_crop_boxes_puts_points_in_the_stretched_model_frame():
    processor = EfficientSamImageProcessor(size=256)
    image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    crop_boxes, points, crops, labels = processor.generate_crop_boxes(image, 256, crop_n_layers=1, points_per_crop=3)
    assert crop_boxes.shape == (5, 4) and crop_boxes[0].tolist() == [0, 0, WIDTH, HEIGHT]
    assert points.shape == (1, 9, 5, 2) and labels.shape == (1, 9, 5)
    assert labels.dtype == torch.int64 and bool((labels == 1).all())
    for index, (left, top, right, bottom) in enumerate(crop_boxes.int().tolist()):
        assert crops[index].shape == (bottom - top, right - left, 3)
        pixels = point_grid(3).numpy() * [right - left, bottom - top]  # the grid on the crop, in its pixels
        expected = to_model_frame(pixels, (bottom - top, right - left), 256)  # the processor's mapping
        np.testing.assert_allclose(points[0, :, index].numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="target_size"):
        processor.generate_crop_boxes(image, 1024)
    with pytest.raises(ValueError, match="same number of points"):
        processor.generate_crop_boxes(image, 256, crop_n_layers=1, points_per_crop=4, crop_n_points_downscale_factor=2)


def test_size_answers_the_pipeline_lookups_and_stays_an_int():
    processor = EfficientSamImageProcessor(size=256)
    assert processor.size == 256 and processor.size.get("longest_edge") == 256 and processor.size["height"] == 256
    assert processor.size.get("unknown", "default") == "default"
    processor.size = 128
    assert processor.size.get("height") == 128
    assert json.loads(processor.to_json_string())["size"] == 128


def test_filter_masks_applies_each_threshold_and_moves_masks_into_the_image():
    processor = EfficientSamImageProcessor(size=64)
    logits = torch.full((2, 2, 60, 80), -10.0)  # (queries, candidates, h, w) of the crop [100, 50, 180, 110]
    logits[0, 0, 25:35, 30:45] = 10.0  # a confident, stable mask well inside the crop
    logits[0, 1, 25:35, 30:45] = 0.5  # the same shape, unstable (all its pixels within the offset)
    logits[1, 0, 25:35, 50:55] = 10.0  # stable but with a low predicted IoU
    logits[1, 1, 25:35, 65:80] = 10.0  # touches the crop's right side, which is not the image's
    scores = torch.tensor([[0.95, 0.95], [0.5, 0.95]])
    crop = torch.tensor([100.0, 50.0, 180.0, 110.0])
    codes, kept, boxes = processor.filter_masks(logits, scores, (200, 300), crop, pred_iou_thresh=0.88,
                                                stability_score_thresh=0.9)
    assert len(codes) == 1 and kept.tolist() == pytest.approx([0.95])
    assert boxes.tolist() == [[130, 75, 144, 84]]  # in full-image pixels
    full = rle_to_mask(codes[0])
    assert full.shape == (200, 300) and full.sum() == 150 and full[75:85, 130:145].all()
    # with the thresholds off, the unstable and the low-IoU masks stay; the mask cut by the crop side does not
    codes, kept, _ = processor.filter_masks(logits, scores, (200, 300), crop, pred_iou_thresh=0.0,
                                            stability_score_thresh=0.0)
    assert len(codes) == 3
    # empty masks never come out
    codes, _, _ = processor.filter_masks(torch.full((1, 1, 8, 8), -1.0), torch.ones(1, 1), (8, 8),
                                         torch.tensor([0.0, 0.0, 8.0, 8.0]), 0.0, 0.0)
    assert codes == []


def test_post_process_for_mask_generation_removes_duplicates_best_first():
    processor = EfficientSamImageProcessor(size=64)
    masks = torch.zeros(3, 10, 10, dtype=torch.bool)
    masks[0, 0:5, 0:5] = True
    masks[1, 0:5, 0:6] = True  # nearly the same as mask 0
    masks[2, 6:9, 6:9] = True
    codes = masks_to_rle(masks, as_lists=False)
    scores = torch.tensor([0.8, 0.9, 0.7])
    out_masks, out_scores, out_codes, out_boxes = processor.post_process_for_mask_generation(
        codes, scores, masks_to_boxes(masks), 0.7)
    assert out_scores.tolist() == pytest.approx([0.9, 0.7])
    np.testing.assert_array_equal(out_masks[0], masks[1].numpy())
    assert out_masks[1].dtype == bool and out_boxes.tolist() == [[0, 0, 5, 4], [6, 6, 8, 8]]
    assert isinstance(out_codes[0]["counts"], list)


# -- the pipeline on the quickstart architecture -----------------------------------------------------
def sample_image() -> Image.Image:
    return shared_sample_image(HEIGHT, WIDTH)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """A random model of the quickstart architecture saved with its processor; the pipeline on it."""
    folder = tmp_path_factory.mktemp("amg") / "quickstart"
    config = EfficientSamConfig(**json.loads(QUICKSTART_MODEL.read_text()), initializer_range=0.3)
    torch.manual_seed(0)
    model = EfficientSamModel(config).eval()
    processor = EfficientSamProcessor(EfficientSamImageProcessor(size=config.image_size))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    generator = pipeline("mask-generation", model=str(folder), device="cpu")
    unfiltered = generator(sample_image(), points_per_crop=SIDE, points_per_batch=16, **NO_FILTERS)
    return folder, model, processor, generator, unfiltered


def reference_candidates(model, processor):
    """Logits (25 * 3, H, W) and IoU scores of the grid's point prompts, through the processor's own path."""
    centres = (np.arange(SIDE) + 0.5) / SIDE
    points = np.array([[x * WIDTH, y * HEIGHT] for y in centres for x in centres])[None, :, None, :]  # (1, Q, 1, 2)
    inputs = processor(images=sample_image(), input_points=points, input_labels=np.ones(points.shape[:-1]))
    with torch.no_grad():
        outputs = model(**inputs)
    logits = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"], binarize=False)[0]
    return logits.flatten(0, 1), outputs.iou_scores[0].flatten()


def test_pipeline_without_filters_returns_every_candidate_mask(quickstart):
    folder, model, processor, generator, out = quickstart
    assert type(generator.model) is EfficientSamModel and type(generator.image_processor) is EfficientSamImageProcessor
    logits, scores = reference_candidates(model, processor)
    nonempty = (logits > 0).flatten(1).any(-1)
    order = torch.argsort(scores[nonempty], descending=True)
    expected_scores, expected_logits = scores[nonempty][order], logits[nonempty][order]
    assert 10 < len(out["masks"]) == len(expected_scores) <= 3 * SIDE * SIDE
    torch.testing.assert_close(out["scores"], expected_scores, atol=1e-4, rtol=1e-4)
    for mask, expected in zip(out["masks"], expected_logits):
        assert isinstance(mask, np.ndarray) and mask.dtype == bool and mask.shape == (HEIGHT, WIDTH)
        decided = (expected.abs() > 1e-3).numpy()
        np.testing.assert_array_equal(mask[decided], (expected > 0).numpy()[decided])


def test_pipeline_thresholds_filter_as_documented(quickstart):
    _, _, _, generator, unfiltered = quickstart
    image, base = sample_image(), {**NO_FILTERS, "points_per_crop": SIDE, "points_per_batch": 16}
    ranked = unfiltered["scores"].sort().values
    gaps = ranked[1:] - ranked[:-1]
    middle = len(ranked) // 2
    position = middle - 3 + int(torch.argmax(gaps[middle - 3 : middle + 3]))  # a clear gap near the median
    threshold = float(ranked[position] + ranked[position + 1]) / 2
    by_iou = generator(image, **{**base, "pred_iou_thresh": threshold})
    assert len(by_iou["masks"]) == int((unfiltered["scores"] > threshold).sum()) == len(ranked) - position - 1
    assert bool((by_iou["scores"] > threshold).all())

    stable = generator(image, **{**base, "stability_score_thresh": 0.9})
    assert 1 <= len(stable["masks"]) < len(unfiltered["masks"])
    assert set(stable["scores"].tolist()) <= set(unfiltered["scores"].tolist())  # a subset, nothing new

    deduplicated = generator(image, **{**base, "crops_nms_thresh": 0.7}, output_bboxes_mask=True)
    boxes = deduplicated["bounding_boxes"]
    assert 1 <= len(deduplicated["masks"]) < len(unfiltered["masks"]) and len(boxes) == len(deduplicated["masks"])
    for index in range(len(boxes) - 1):
        assert bool((box_iou(boxes[index], boxes[index + 1 :]) <= 0.7).all())


def test_pipeline_result_does_not_depend_on_the_batching(quickstart):
    _, _, _, generator, unfiltered = quickstart
    at_once = generator(sample_image(), points_per_crop=SIDE, points_per_batch=None, **NO_FILTERS)
    assert len(at_once["masks"]) == len(unfiltered["masks"])
    torch.testing.assert_close(at_once["scores"], unfiltered["scores"], atol=1e-4, rtol=1e-4)
    disagreement = np.mean([np.mean(a != b) for a, b in zip(at_once["masks"], unfiltered["masks"])])
    assert disagreement < 1e-3


def test_pipeline_with_crop_layers_returns_full_size_masks(quickstart):
    _, _, _, generator, _ = quickstart
    out = generator(sample_image(), points_per_crop=2, crops_n_layers=1, points_per_batch=8, output_rle_mask=True,
                    output_bboxes_mask=True, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert len(out["masks"]) >= 1
    assert all(mask.shape == (HEIGHT, WIDTH) for mask in out["masks"])
    for mask, code, box in zip(out["masks"], out["rle_mask"], out["bounding_boxes"].tolist()):
        np.testing.assert_array_equal(rle_to_mask(code), mask)
        assert 0 <= box[0] <= box[2] < WIDTH and 0 <= box[1] <= box[3] < HEIGHT


def test_pipeline_from_the_saved_folder_without_the_package(quickstart, tmp_path):
    folder, _, _, _, unfiltered = quickstart
    sample_image().save(tmp_path / "image.png")
    code = textwrap.dedent(
        f"""
        import numpy as np, torch
        from transformers import pipeline
        generator = pipeline("mask-generation", model={str(folder)!r}, trust_remote_code=True, device="cpu")
        out = generator("image.png", points_per_crop={SIDE}, points_per_batch=16, **{NO_FILTERS!r})
        torch.save({{"masks": np.stack(out["masks"]), "scores": out["scores"],
                    "model": type(generator.model).__module__, "processor": type(generator.image_processor).__module__}},
                   "amg.pt")
        """
    )
    completed = run_without_package(code, tmp_path)
    assert "not supported for mask-generation" not in completed.stderr
    result = torch.load(tmp_path / "amg.pt", weights_only=False)
    assert result["model"].startswith("transformers_modules.") and result["processor"].startswith("transformers_modules.")
    assert result["masks"].shape == (len(unfiltered["masks"]), HEIGHT, WIDTH) and result["masks"].dtype == bool
    torch.testing.assert_close(result["scores"], unfiltered["scores"], atol=1e-4, rtol=1e-4)
    assert np.mean(result["masks"] != np.stack(unfiltered["masks"])) < 1e-3
