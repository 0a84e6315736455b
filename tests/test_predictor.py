"""EfficientSamPredictor: same numbers as model + processor by hand, coordinate forms, batching, errors, dtypes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_efficientsam import EfficientSamImageProcessor, EfficientSamModel, EfficientSamProcessor
from modeling_efficientsam.inference import EfficientSamPrediction, EfficientSamPredictor

from conftest import TINY_128, run_by_hand  # noqa: E402
from conftest import tiny_model as shared_tiny_model  # noqa: E402


def tiny_model(seed: int = 0) -> EfficientSamModel:
    """The shared tiny model in its 128-pixel form, whose random outputs depend visibly on the prompts
    (init std 0.1)."""
    return shared_tiny_model(seed, initializer_range=0.1, **TINY_128).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_model")
    tiny_model().save_pretrained(directory)
    EfficientSamProcessor(EfficientSamImageProcessor(size=128)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def predictor(model_dir):
    return EfficientSamPredictor.from_pretrained(model_dir, device="cpu", max_queries_per_batch=2)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)  # H=90, W=120: not square on purpose


PIXEL_BOXES = np.array([[10, 5, 60, 70], [30, 20, 110, 85], [0, 0, 120, 90], [50, 40, 58, 52], [70.5, 10.25, 100, 44]])


def by_hand(model_dir, image, boxes):
    """The reference: processor -> model -> post_process_masks -> highest predicted IoU."""
    output, resized = run_by_hand(model_dir, image, boxes)
    best = output.iou_scores[0].argmax(-1)
    chosen = resized[torch.arange(len(best)), best]
    return output, chosen, best


def assert_masks_match(masks, logits, tolerance=1e-4):
    """Masks equal ``logits > 0`` except where a logit is within ``tolerance`` of the threshold."""
    expected = logits > 0
    differ = masks != expected
    assert not (differ & (logits.abs() > tolerance)).any(), f"{int(differ.sum())} mask pixels differ"
    assert differ.float().mean() < 1e-3


def test_predictor_reproduces_model_and_processor(predictor, model_dir, image):
    output, chosen_logits, best = by_hand(model_dir, image, PIXEL_BOXES)
    result = predictor.predict(image, PIXEL_BOXES)  # 5 boxes decoded in chunks of 2
    assert isinstance(result, EfficientSamPrediction)
    assert result.masks.dtype == torch.bool and result.masks.shape == (5, 90, 120)
    assert result.original_size == (90, 120) and not result.normalized
    torch.testing.assert_close(result.iou_scores, output.iou_scores[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.low_res_logits, output.pred_masks[0], atol=1e-5, rtol=1e-4)
    assert torch.equal(result.candidate_index, best)
    torch.testing.assert_close(result.scores, output.iou_scores[0].max(-1).values, atol=1e-5, rtol=1e-4)
    assert_masks_match(result.masks, chosen_logits)
    # the prompts matter: different boxes give different masks
    assert not torch.equal(result.masks[0], result.masks[1])


def test_normalized_and_pixel_boxes_give_identical_masks(predictor, image):
    height, width = image.shape[:2]
    normalized = PIXEL_BOXES / np.array([width, height, width, height])
    predictor.set_image(image)
    pixel = predictor.predict(boxes=PIXEL_BOXES, normalized=False)
    explicit = predictor.predict(boxes=normalized, normalized=True)
    detected = predictor.predict(normalized)  # auto-detected: every value in [0, 1]
    xywh = np.concatenate([normalized[:, :2], normalized[:, 2:] - normalized[:, :2]], axis=1)
    as_xywh = predictor.predict(boxes=xywh, box_format="xywh")
    assert explicit.normalized and detected.normalized and not pixel.normalized
    for other in (explicit, detected, as_xywh):
        torch.testing.assert_close(other.low_res_logits, pixel.low_res_logits, atol=1e-6, rtol=1e-5)
        assert torch.equal(other.masks, pixel.masks)


def test_one_call_form_matches_set_image_then_predict(model_dir, image, tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(image).save(path)
    boxes = [(0.1, 0.1, 0.5, 0.8), (0.3, 0.2, 0.9, 0.95)]  # as in the original guide
    one_call = EfficientSamPredictor.from_pretrained(model_dir).predict(str(path), boxes)
    two_step = EfficientSamPredictor.from_pretrained(model_dir).set_image(image).predict(boxes=boxes)
    assert one_call.normalized
    assert torch.equal(one_call.masks, two_step.masks)
    torch.testing.assert_close(one_call.scores, two_step.scores)


def test_predict_batch_matches_single_image_calls(predictor, image):
    images = [image, image[:64, :100].copy(), np.ascontiguousarray(image[::-1])]
    boxes = [PIXEL_BOXES[:3], np.array([[5, 5, 40, 60]]), np.zeros((0, 4))]
    results = predictor.predict_batch(images, boxes, batch_size=2, normalized=False)
    assert [r.masks.shape for r in results] == [(3, 90, 120), (1, 64, 100), (0, 90, 120)]
    for img, box, batched in zip(images[:2], boxes[:2], results[:2]):
        single = predictor.predict(img, box)
        torch.testing.assert_close(batched.low_res_logits, single.low_res_logits, atol=1e-5, rtol=1e-4)
        assert_masks_match(batched.masks, single.masks.float() - 0.5, tolerance=0.6)
        assert (batched.masks != single.masks).float().mean() < 1e-3


def test_point_prompts_match_model(predictor, model_dir, image):
    model = EfficientSamModel.from_pretrained(model_dir).eval()
    processor = EfficientSamProcessor(EfficientSamImageProcessor(size=128))
    points = [[[30.0, 40.0]], [[80.0, 20.0]]]
    labels = [[1], [1]]
    inputs = processor(images=image, input_points=[points], input_labels=[labels])
    with torch.no_grad():
        output = model(pixel_values=inputs["pixel_values"], input_points=inputs["input_points"],
                       input_labels=inputs["input_labels"])
    result = predictor.predict(image=image, points=points, labels=labels, normalized=False)
    torch.testing.assert_close(result.low_res_logits, output.pred_masks[0], atol=1e-5, rtol=1e-4)


def test_single_mask_output(predictor, image):
    result = predictor.predict(image, PIXEL_BOXES[:2], multimask_output=False)
    assert result.iou_scores.shape == (2, 1) and result.low_res_logits.shape == (2, 1, 32, 32)
    assert torch.equal(result.candidate_index, torch.zeros(2, dtype=torch.long))


def test_clear_errors(predictor, image, tmp_path):
    predictor.set_image(image)
    with pytest.raises(ValueError, match=r"normalized boxes must lie in \[0, 1\]"):
        predictor.predict(boxes=[(0.1, 0.1, 1.5, 0.5)], normalized=True)
    with pytest.raises(ValueError, match="empty or inverted"):
        predictor.predict(boxes=[(50, 50, 20, 80)])
    with pytest.raises(ValueError, match="empty or inverted"):
        predictor.predict(boxes=[(20, 30, 20, 80)])  # zero width
    with pytest.raises(ValueError, match="outside"):
        predictor.predict(boxes=[(200, 200, 300, 300)])
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        predictor.predict(boxes=[(1, 2, 3)])
    with pytest.raises(ValueError, match="cannot tell whether the prompts are normalized"):
        predictor.predict(boxes=[(0.1, 0.1, 0.5, 0.8), (10, 10, 50, 60)])
    with pytest.raises(ValueError, match="NaN"):
        predictor.predict(boxes=[(0.1, float("nan"), 0.5, 0.8)])
    with pytest.raises(ValueError, match="together"):
        predictor.predict(points=[[[1.0, 2.0]]])
    with pytest.raises(ValueError, match="no prompts"):
        predictor.predict(image)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        predictor.predict(str(broken), [(1, 2, 30, 40)])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        predictor.predict(str(tmp_path / "missing.png"), [(1, 2, 30, 40)])
    with pytest.raises(ValueError, match=r"image 1 .*cannot read"):
        predictor.predict_batch([image, str(broken)], [[(1, 2, 30, 40)], [(1, 2, 30, 40)]])
    with pytest.raises(ValueError, match="image 1: .*empty or inverted"):
        predictor.predict_batch([image, image], [[(1, 2, 30, 40)], [(30, 2, 1, 40)]])


def test_predict_needs_an_image(model_dir):
    fresh = EfficientSamPredictor.from_pretrained(model_dir)
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict(boxes=[(1, 2, 30, 40)])


@pytest.mark.parametrize("autocast", [False, True])
def test_bfloat16_on_cpu(model_dir, image, autocast):
    reference = EfficientSamPredictor.from_pretrained(model_dir).predict(image, PIXEL_BOXES)
    low = EfficientSamPredictor.from_pretrained(model_dir, dtype="bf16", autocast=autocast)
    expected_weights = torch.float32 if autocast else torch.bfloat16
    assert next(low.model.parameters()).dtype == expected_weights
    result = low.predict(image, PIXEL_BOXES)
    assert result.low_res_logits.dtype == torch.float32 and result.masks.dtype == torch.bool
    scale = reference.low_res_logits.abs().max()
    error = (result.low_res_logits - reference.low_res_logits).abs().max()
    assert error < 0.1 * scale, f"bf16 logits differ by {error:.3g} (scale {scale:.3g})"
    agreement = (result.masks == reference.masks).float().mean()
    assert agreement > 0.9, f"bf16 masks agree on {agreement:.1%} of pixels"


def test_model_without_saved_processor_gets_default(tmp_path, image, caplog):
    tiny_model().save_pretrained(tmp_path)  # no processor config in the folder
    with caplog.at_level("INFO", logger="modeling_efficientsam.processing_efficientsam"):
        predictor = EfficientSamPredictor.from_pretrained(tmp_path)
    assert predictor.processor.size == 128
    assert "has no processor config" in caplog.text and str(tmp_path) in caplog.text
    assert predictor.predict(image, PIXEL_BOXES[:1]).masks.shape == (1, 90, 120)


@pytest.mark.parametrize("name", ["processor_config.json", "preprocessor_config.json"])
def test_malformed_processor_config_is_an_error_naming_the_file(tmp_path, name):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / name).write_text('{"image_processor": {"size": 64,')  # truncated
    with pytest.raises(ValueError, match="not valid JSON") as caught:
        EfficientSamPredictor.from_pretrained(tmp_path)
    assert str(tmp_path / name) in str(caught.value) and "Fix:" in str(caught.value)


def test_processor_saved_under_the_older_file_name_is_used(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    EfficientSamImageProcessor(size=128, mask_threshold=0.25).save_pretrained(tmp_path)  # preprocessor_config.json
    assert (tmp_path / "preprocessor_config.json").is_file()
    assert EfficientSamPredictor.from_pretrained(tmp_path).processor.image_processor.mask_threshold == 0.25


def test_reference_fixture_loads(shared_path, tmp_path):
    """The converted tiny reference checkpoint runs through the predictor (numbers are checked elsewhere)."""
    from modeling_efficientsam.convert_efficientsam_to_hf import main as convert

    fixtures = shared_path("fixtures/efficientsam_reference")
    config = json.loads((fixtures / "reference_tiny_config.json").read_text())
    assert config["img_size"] == 128
    try:
        convert(["--checkpoint", str(fixtures / "reference_tiny.pt"), "--original_config",
                 str(fixtures / "reference_tiny_config.json"), "--output_dir", str(tmp_path / "converted")])
    except SystemExit as exit_status:
        assert not exit_status.code
    predictor = EfficientSamPredictor.from_pretrained(tmp_path / "converted")
    result = predictor.predict(np.zeros((96, 160, 3), np.uint8), [(0.1, 0.1, 0.6, 0.9)])
    assert result.masks.shape == (1, 96, 160)
    assert torch.isfinite(result.low_res_logits).all()
