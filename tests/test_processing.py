"""EfficientSamImageProcessor and EfficientSamProcessor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modeling_efficientsam import EfficientSamImageProcessor, EfficientSamProcessor


from conftest import tiny_model  # noqa: E402


def original_preprocess(image_uint8_chw: torch.Tensor, size: int) -> torch.Tensor:
    """The original model's arithmetic, written out: /255, bilinear stretch, normalize."""
    x = image_uint8_chw[None] / 255.0
    x = F.interpolate(x, (size, size), mode="bilinear")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, size=(30, 50, 3), dtype=np.uint8)


def test_pixels_equal_the_original_preprocessing(rgb):
    processor = EfficientSamImageProcessor(size=64)
    out = processor(rgb)
    expected = original_preprocess(torch.from_numpy(rgb).permute(2, 0, 1), 64)
    assert out["pixel_values"].shape == (1, 3, 64, 64)
    assert torch.equal(out["pixel_values"], expected)
    assert out["original_sizes"].tolist() == [[30, 50]]


def test_pil_numpy_torch_and_chw_inputs_agree(rgb):
    processor = EfficientSamImageProcessor(size=32)
    reference = processor(rgb)["pixel_values"]
    for image in (Image.fromarray(rgb), torch.from_numpy(rgb), np.transpose(rgb, (2, 0, 1)), rgb.astype(np.float32) / 255):
        assert torch.allclose(processor(image)["pixel_values"], reference, atol=1e-6)


def test_image_modes_become_rgb(rgb):
    processor = EfficientSamImageProcessor(size=32)
    gray = Image.fromarray(rgb[..., 0])
    expected_gray = processor(np.repeat(rgb[..., :1], 3, axis=2))["pixel_values"]
    assert torch.equal(processor(gray)["pixel_values"], expected_gray)
    rgba = Image.fromarray(np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=2), "RGBA")
    assert torch.equal(processor(rgba)["pixel_values"], processor(rgb)["pixel_values"])
    palette = Image.fromarray(rgb).convert("P")
    assert torch.equal(processor(palette)["pixel_values"], processor(np.asarray(palette.convert("RGB")))["pixel_values"])
    sixteen = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I;16")
    assert torch.allclose(processor(sixteen)["pixel_values"], expected_gray, atol=1e-6)
    assert torch.allclose(processor(rgb[..., 0].astype(np.uint16) * 257)["pixel_values"], expected_gray, atol=1e-6)


def test_exif_orientation_is_applied(tmp_path, rgb):
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=100)
    out = EfficientSamImageProcessor(size=32)(str(path))
    assert out["original_sizes"].tolist() == [[50, 30]]
    raw = EfficientSamImageProcessor(size=32, apply_exif_orientation=False)(str(path))
    assert raw["original_sizes"].tolist() == [[30, 50]]


def test_unreadable_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        EfficientSamImageProcessor()(str(bad))
    with pytest.raises(ValueError, match="cannot read this image"):
        EfficientSamImageProcessor()(np.zeros((5, 6, 7), np.uint8))


def test_post_process_masks_resizes_bicubically_and_thresholds():
    processor = EfficientSamImageProcessor(size=64)
    logits = torch.randn(2, 3, 3, 16, 16)
    sizes = [[30, 50], [20, 10]]
    masks = processor.post_process_masks(logits, sizes)
    assert [tuple(m.shape) for m in masks] == [(3, 3, 30, 50), (3, 3, 20, 10)]
    assert masks[0].dtype == torch.bool
    raw = processor.post_process_masks(logits, sizes, binarize=False)
    expected = F.interpolate(logits[1].reshape(9, 1, 16, 16), (20, 10), mode="bicubic", align_corners=False)
    assert torch.equal(raw[1], expected.reshape(3, 3, 20, 10))
    assert torch.equal(masks[1], raw[1] > 0)


def test_boxes_are_rescaled_to_the_square_frame():
    processor = EfficientSamProcessor(EfficientSamImageProcessor(size=1024))
    out = processor(original_sizes=[[480, 640]], input_boxes=[[[64, 48, 320, 240]]])
    assert out["input_boxes"].tolist() == [[[102.4000015258789, 102.4000015258789, 512.0, 512.0]]]


def test_normalized_and_pixel_boxes_are_identical():
    processor = EfficientSamProcessor(EfficientSamImageProcessor(size=1024))
    height, width = 375, 500
    normalized = [(0.1, 0.2, 0.5, 0.8), (0.25, 0.3, 0.9, 0.95)]
    pixels = [(x1 * width, y1 * height, x2 * width, y2 * height) for x1, y1, x2, y2 in normalized]
    a = processor(original_sizes=[[height, width]], input_boxes=[normalized], normalized=True)["input_boxes"]
    b = processor(original_sizes=[[height, width]], input_boxes=[pixels])["input_boxes"]
    assert torch.equal(a, b)


def test_xywh_boxes_and_clipping():
    processor = EfficientSamProcessor(EfficientSamImageProcessor(size=100))
    xyxy = processor(original_sizes=[[50, 100]], input_boxes=[[[10, 5, 40, 25]]])["input_boxes"]
    xywh = processor(original_sizes=[[50, 100]], input_boxes=[[[10, 5, 30, 20]]], box_format="xywh")["input_boxes"]
    assert torch.equal(xyxy, xywh)
    clipped = processor(original_sizes=[[50, 100]], input_boxes=[[[-10, -5, 140, 60]]])["input_boxes"]
    assert clipped.tolist() == [[[0.0, 0.0, 100.0, 100.0]]]


@pytest.mark.parametrize(
    "box, message",
    [((40, 5, 10, 25), "empty or inverted"), ((10, 5, 10, 25), "empty or inverted"), ((200, 60, 300, 90), "outside")],
)
def test_empty_inverted_or_outside_boxes_are_errors(box, message):
    processor = EfficientSamProcessor(EfficientSamImageProcessor(size=100))
    with pytest.raises(ValueError, match=message):
        processor(original_sizes=[[50, 100]], input_boxes=[[box]])


def test_normalized_values_outside_unit_range_are_errors():
    processor = EfficientSamProcessor(EfficientSamImageProcessor(size=100))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        processor(original_sizes=[[50, 100]], input_boxes=[[(0.1, 0.1, 1.5, 0.5)]], normalized=True)


@pytest.mark.parametrize("normalized", [False, True])
def test_non_finite_boxes_and_points_are_errors(normalized):
    processor = EfficientSamProcessor(EfficientSamImageProcessor(size=100))
    with pytest.raises(ValueError, match=r"image 1: boxes must be finite numbers; got \[nan\]"):
        processor(original_sizes=[[50, 100], [50, 100]], input_boxes=[[(0.1, 0.1, 0.5, 0.5)], [(0.1, float("nan"), 0.5, 0.5)]],
                  normalized=normalized)
    with pytest.raises(ValueError, match=r"image 0: points must be finite numbers; got \[inf\]"):
        processor(original_sizes=[[50, 100]], input_points=[[[[float("inf"), 0.2]]]], input_labels=[[[1]]],
                  normalized=normalized)
    # padding points' coordinates reach the model too (as in the original), so they are checked as well
    with pytest.raises(ValueError, match=r"image 0: padding points \(label -1\) must have finite coordinates"):
        processor(original_sizes=[[50, 100]], input_points=[[[[0.2, 0.2], [float("nan"), -1]]]],
                  input_labels=[[[1, -1]]], normalized=normalized)


def test_points_rescaled_and_padding_untouched():
    processor = EfficientSamProcessor(EfficientSamImageProcessor(size=100))
    out = processor(original_sizes=[[50, 200]], input_points=[[[[20, 10], [-1, -1]]]], input_labels=[[[1, -1]]])
    assert out["input_points"].tolist() == [[[[10.0, 20.0], [-1.0, -1.0]]]]
    assert out["input_labels"].tolist() == [[[1, -1]]]
    with pytest.raises(ValueError, match="input_labels must be in"):
        processor(original_sizes=[[50, 200]], input_points=[[[[20, 10]]]], input_labels=[[[5]]])


def test_images_with_different_query_counts_are_padded():
    processor = EfficientSamProcessor(EfficientSamImageProcessor(size=100))
    out = processor(original_sizes=[[100, 100], [100, 100]], input_boxes=[[[1, 1, 5, 5], [2, 2, 6, 6]], [[3, 3, 9, 9]]])
    assert out["input_boxes"].shape == (2, 2, 4)
    assert out["input_boxes"][1, 1].tolist() == [-1.0, -1.0, -1.0, -1.0]


def test_processor_feeds_the_model_end_to_end(rgb):
    model = tiny_model().eval()
    processor = EfficientSamProcessor(EfficientSamImageProcessor(size=64))
    inputs = processor(images=[rgb], input_boxes=[[[5, 5, 40, 25]]])
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"])
    masks = processor.post_process_masks(out.pred_masks, inputs["original_sizes"])
    assert masks[0].shape == (1, 3, 30, 50)
