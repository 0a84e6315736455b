"""efficientsam-export: ONNX Runtime reproduces PyTorch, dynamic batch / query / point counts, and the check catches a wrong graph."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from modeling_efficientsam import (  # noqa: E402
    EfficientSamImageProcessor,
    EfficientSamModel,
    EfficientSamProcessor,
)
from modeling_efficientsam.inference.export_onnx import check_with_onnxruntime, export_graphs  # noqa: E402
from modeling_efficientsam.inference.export_onnx import main as export_main  # noqa: E402
from modeling_efficientsam.processing_efficientsam import box_corner_points  # noqa: E402

from conftest import tiny_model  # noqa: E402


def _model(seed):
    return tiny_model(seed, initializer_range=0.1).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny_export_model")
    _model(0).save_pretrained(model_dir)
    EfficientSamProcessor(EfficientSamImageProcessor(size=64)).save_pretrained(model_dir)
    out = tmp_path_factory.mktemp("onnx") / "graphs"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        status = export_main(["--model", str(model_dir), "--output_dir", str(out), "--format", "onnx", "--opset", "17"])
    return model_dir, out, status, printed.getvalue()


def test_export_writes_checked_graphs(exported):
    _, out, status, printed = exported
    assert status == 0, printed
    for name in ("encoder.onnx", "decoder.onnx", "export_info.json", "processor_config.json"):
        assert (out / name).is_file(), name
    info = json.loads((out / "export_info.json").read_text())
    assert info["passed"] and info["opset"] == 17 and info["exporter"] in ("torchscript", "dynamo")
    assert len(info["checks"]) == 6
    for check in info["checks"]:
        assert check["within_tolerance"], check
        assert check["max_abs_diff"] <= 1e-4 + 1e-3 * check["max_abs_reference"]
    assert "max abs diff" in printed and "encoder.onnx" in printed  # measured numbers and the usage example
    # the processor saved beside the graphs restores the model's input size
    assert EfficientSamImageProcessor.from_pretrained(out).size == 64


def test_onnx_runtime_matches_pytorch_end_to_end(exported):
    model_dir, out, _, _ = exported
    model = EfficientSamModel.from_pretrained(model_dir).eval()
    processor = EfficientSamProcessor(EfficientSamImageProcessor.from_pretrained(out))
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    boxes = [[5, 5, 40, 30], [20, 10, 69, 49], [0, 0, 70, 50], [30, 20, 35, 28]]  # 4 queries: not the export's 2
    inputs = processor(images=image, input_boxes=[boxes])
    encoder = ort.InferenceSession(str(out / "encoder.onnx"))
    decoder = ort.InferenceSession(str(out / "decoder.onnx"))
    (embeddings,) = encoder.run(None, {"pixel_values": inputs["pixel_values"].numpy()})
    points, labels = box_corner_points(inputs["input_boxes"].numpy())  # the processor's box -> corner points
    points = points.astype(np.float32)
    assert points.shape == (1, 4, 2, 2) and labels.tolist() == [[[2, 3]] * 4]
    np.testing.assert_array_equal(points.reshape(1, 4, 4), inputs["input_boxes"].numpy())
    iou, logits = decoder.run(None, {"image_embeddings": embeddings, "input_points": points, "input_labels": labels})
    with torch.no_grad():
        reference = model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"])
    assert iou.shape == (1, 4, 3) and logits.shape == (1, 4, 3, 16, 16)
    scale = float(reference.pred_masks.abs().max())
    assert np.abs(logits - reference.pred_masks.numpy()).max() <= 1e-4 + 1e-3 * scale
    assert np.abs(iou - reference.iou_scores.numpy()).max() <= 1e-4 + 1e-3 * float(reference.iou_scores.abs().max())
    # a query of 6 points (the most a query can hold) with padding, positive and negative labels
    points6 = np.array([[[[3, 4], [60, 50], [10, 10], [20, 30], [-1, -1], [-1, -1]]]], dtype=np.float32)
    labels6 = np.array([[[2, 3, 1, 0, -1, -1]]], dtype=np.int64)
    iou6, logits6 = decoder.run(None, {"image_embeddings": embeddings, "input_points": points6, "input_labels": labels6})
    with torch.no_grad():
        reference6 = model(image_embeddings=torch.from_numpy(embeddings), input_points=torch.from_numpy(points6),
                           input_labels=torch.from_numpy(labels6))
    assert np.abs(logits6 - reference6.pred_masks.numpy()).max() <= 1e-4 + 1e-3 * scale


def test_check_fails_for_a_wrong_graph(exported, tmp_path):
    """The parity check is not vacuous: a decoder exported from other weights is rejected."""
    model_dir, out, _, _ = exported
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    export_graphs(_model(1), mixed, opset=17)  # graphs of other weights ...
    shutil.copy(out / "encoder.onnx", mixed / "encoder.onnx")  # ... except the right encoder
    checks = check_with_onnxruntime(EfficientSamModel.from_pretrained(model_dir).eval(), mixed)
    by_output = {}
    for check in checks:
        by_output.setdefault(check["output"], []).append(check["passed"])
    assert all(by_output["image_embeddings"])
    assert not any(by_output["pred_masks"]) and not any(by_output["iou_scores"])


def test_printed_usage_example_runs(exported, tmp_path):
    """The example the command prints (processor, box -> corner points, candidate choice) works as written."""
    from PIL import Image

    from modeling_efficientsam.inference.export_onnx import USAGE_EXAMPLE

    _, out, _, printed = exported
    assert USAGE_EXAMPLE.format(out=out) in printed
    image_path = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(image_path)
    code = USAGE_EXAMPLE.format(out=out).replace("image.jpg", str(image_path)).replace("x1, y1, x2, y2", "5, 5, 40, 30")
    namespace = {}
    exec(code, namespace)
    assert namespace["masks"].shape == (1, 40, 60) and namespace["masks"].dtype == torch.bool
