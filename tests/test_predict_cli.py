"""efficientsam-predict: COCO results that pycocotools accepts, problems reported (not fatal), overlays, detections."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


from modeling_efficientsam.inference.predict_cli import main as predict_main

from conftest import tiny_model, tiny_processor  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_model_64")
    tiny_model(0, initializer_range=0.1).save_pretrained(directory)
    tiny_processor().save_pretrained(directory)
    return directory


def _image(seed, size=(80, 60)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _annotation(annotation_id, image_id, bbox, category_id=1, iscrowd=0):
    x, y, w, h = bbox
    return {"id": annotation_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd,
            "area": w * h, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}


@pytest.fixture
def coco_case(tmp_path, coco_writer):
    """Two good images, one whose file is missing, one corrupt; plus bad records of each kind."""
    images = [
        {"id": 1, "file_name": "a.png", "image": _image(1)},
        {"id": 2, "file_name": "sub/b.jpg", "image": _image(2, (50, 70))},
        {"id": 3, "file_name": "missing.png", "image": None, "width": 40, "height": 40},
        {"id": 4, "file_name": "corrupt.png", "image": None, "width": 40, "height": 40},
        {"id": 5, "file_name": "no_boxes.png", "image": _image(5)},
    ]
    annotations = [
        _annotation(10, 1, [5, 5, 30, 20]),
        _annotation(11, 1, [40, 10, 30, 40], category_id=2),
        _annotation(12, 1, [0, 0, 80, 60], iscrowd=1),  # crowd: a region, not prompted
        _annotation(13, 1, [20, 20, 0, 10]),  # zero width: invalid, reported
        _annotation(20, 2, [10, 10, 20, 40]),
        _annotation(30, 3, [1, 1, 10, 10]),  # image file missing
        _annotation(40, 4, [1, 1, 10, 10]),  # corrupt image file
        _annotation(50, 99, [1, 1, 10, 10]),  # unknown image id
    ]
    path = coco_writer(tmp_path / "data", images, annotations)
    (tmp_path / "data" / "corrupt.png").write_bytes(b"this is not a png")
    return path


def _run(argv):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        status = predict_main(argv + ["--no_progress"])
    return status, out.getvalue()


def test_annotations_file_results_load_in_pycocotools(model_dir, coco_case, tmp_path):
    out_dir = tmp_path / "out"
    status, printed = _run(["--model", str(model_dir), "--images", str(coco_case.parent), "--boxes", str(coco_case),
                            "--output_dir", str(out_dir), "--overlays", "--batch_size", "2"])
    assert status == 0, printed
    results = json.loads((out_dir / "segmentation_results.json").read_text())
    summary = json.loads((out_dir / "summary.json").read_text())
    # 3 valid, non-crowd boxes on the two readable images
    assert [(r["image_id"], r["category_id"]) for r in results] == [(1, 1), (1, 2), (2, 1)]
    assert [r["prompt_bbox"] for r in results] == [[5, 5, 30, 20], [40, 10, 30, 40], [10, 10, 20, 40]]
    for record in results:
        assert isinstance(record["segmentation"]["counts"], str)
        decoded = mask_utils.decode({"size": record["segmentation"]["size"],
                                     "counts": record["segmentation"]["counts"].encode()})
        assert decoded.shape == ((60, 80) if record["image_id"] == 1 else (70, 50))
        assert record["bbox"] == [float(v) for v in mask_utils.toBbox(
            {"size": record["segmentation"]["size"], "counts": record["segmentation"]["counts"].encode()})]
    # score = predicted IoU of the chosen mask, and the mask is the predictor's
    from modeling_efficientsam.inference import EfficientSamPredictor

    expected = EfficientSamPredictor.from_pretrained(model_dir).predict(
        str(coco_case.parent / "a.png"), [[5, 5, 30, 20], [40, 10, 30, 40]], box_format="xywh")
    assert [r["score"] for r in results[:2]] == pytest.approx(expected.scores.tolist(), abs=1e-6)
    for record, mask in zip(results[:2], expected.masks.numpy()):
        decoded = mask_utils.decode({"size": record["segmentation"]["size"], "counts": record["segmentation"]["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), mask)
    assert summary["images_processed"] == 2 and summary["predictions"] == 3
    assert summary["counts"]["crowd_skipped"] == 1 and summary["counts"]["images_without_boxes"] == 1
    problems = summary["problems"]
    assert problems["missing_image"]["count"] == 1 and "missing.png" in problems["missing_image"]["items"][0]
    assert problems["unusable_image"]["count"] == 1 and "corrupt.png" in problems["unusable_image"]["items"][0]
    assert problems["unknown_image"]["count"] == 1 and "99" in problems["unknown_image"]["items"][0]
    assert problems["invalid_box"]["count"] == 1 and "annotation 13" in problems["invalid_box"]["items"][0]
    assert "missing_image: 1" in printed
    assert (out_dir / "overlays" / "a.png").is_file() and (out_dir / "overlays" / "sub" / "b.png").is_file()
    assert Image.open(out_dir / "overlays" / "sub" / "b.png").size == (50, 70)
    assert not [name for name in os.listdir(out_dir) if name.endswith(".tmp")]

    ground_truth = COCO(str(coco_case))
    loaded = ground_truth.loadRes(str(out_dir / "segmentation_results.json"))
    assert len(loaded.getAnnIds()) == 3
    evaluator = COCOeval(ground_truth, loaded, iouType="segm")
    evaluator.params.imgIds = [1, 2]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert len(evaluator.stats) == 12 and all(-1 <= value <= 1 for value in evaluator.stats)


def test_detections_need_image_info_and_are_filtered_by_score(model_dir, coco_case, tmp_path):
    detections = [
        {"image_id": 1, "category_id": 2, "bbox": [5, 5, 30, 20], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [40, 10, 30, 40], "score": 0.2},  # below threshold
        {"image_id": 2, "category_id": 1, "bbox": [10, 10, 20, 40], "score": 0.5},
        {"image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.99},  # unknown image
    ]
    detections_path = tmp_path / "detections.json"
    detections_path.write_text(json.dumps(detections))
    common = ["--model", str(model_dir), "--images", str(coco_case.parent), "--boxes", str(detections_path),
              "--output_dir", str(tmp_path / "out")]

    with contextlib.redirect_stderr(io.StringIO()) as err:
        status, _ = _run(common)
    assert status == 2 and "--image_info" in err.getvalue()

    status, printed = _run(common + ["--image_info", str(coco_case), "--score_threshold", "0.3"])
    assert status == 0, printed
    results = json.loads((tmp_path / "out" / "segmentation_results.json").read_text())
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(r["image_id"], r["category_id"], r["detection_score"]) for r in results] == [(1, 2, 0.9), (2, 1, 0.5)]
    assert summary["counts"]["below_score_threshold"] == 1
    assert summary["problems"]["unknown_image"]["count"] == 1
    COCO(str(coco_case)).loadRes(str(tmp_path / "out" / "segmentation_results.json"))


BAD_BOX_FILES = {
    "broken.json": ("{not json", ["file", "cannot read it as JSON"]),
    "no_score.json": (json.dumps([{"image_id": 1, "bbox": [1, 1, 5, 5]}]), ["detection 0", '"score"']),
    "short_bbox.json": (json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                    "annotations": [{"id": 7, "image_id": 1, "bbox": [1, 2, 3]}]}),
                        ["annotation 7", '"bbox" must be [x, y, width, height]']),
    "duplicate_image.json": (json.dumps({"images": [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}],
                                         "annotations": []}), ["image id 1 (b.png)", "duplicate image id"]),
}


@pytest.mark.parametrize("name", sorted(BAD_BOX_FILES))
def test_unusable_box_files_are_errors_naming_file_record_and_fix(model_dir, coco_case, tmp_path, name):
    text, fragments = BAD_BOX_FILES[name]
    boxes = tmp_path / name
    boxes.write_text(text)
    extra = ["--image_info", str(coco_case)] if name == "no_score.json" else []
    with contextlib.redirect_stderr(io.StringIO()) as err:
        status, _ = _run(["--model", str(model_dir), "--images", str(coco_case.parent), "--boxes", str(boxes),
                          "--output_dir", str(tmp_path / "out")] + extra)
    message = err.getvalue()
    assert status == 2 and str(boxes) in message and "Fix:" in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_listed_files_restrict_the_records(model_dir, coco_case, tmp_path):
    status, printed = _run(["--model", str(model_dir), "--images", str(coco_case.parent / "sub" / "b.jpg"),
                            "--boxes", str(coco_case), "--output_dir", str(tmp_path / "out")])
    assert status == 0, printed
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    results = json.loads((tmp_path / "out" / "segmentation_results.json").read_text())
    assert [r["image_id"] for r in results] == [2]
    assert summary["counts"]["not_in_images"] == 4 and "missing_image" not in summary["problems"]


def test_console_entry_on_wafer_images(model_dir, shared_path, tmp_path):
    """``python -m`` on three real wafer images with their COCO annotations."""
    split = shared_path("datasets/wafer_defects/valid")
    annotations = split / "_annotations.coco.json"
    document = json.loads(annotations.read_text())
    chosen = [record for record in document["images"]
              if any(a["image_id"] == record["id"] for a in document["annotations"])][:3]
    files = [str(split / record["file_name"]) for record in chosen]
    out_dir = tmp_path / "wafer_out"
    completed = subprocess.run(
        [sys.executable, "-m", "modeling_efficientsam.inference.predict_cli", "--model", str(model_dir),
         "--images", *files, "--boxes", str(annotations), "--output_dir", str(out_dir), "--overlays", "--no_progress"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out_dir / "segmentation_results.json").read_text())
    expected = sum(1 for a in document["annotations"] if a["image_id"] in {r["id"] for r in chosen} and not a.get("iscrowd"))
    assert len(results) == expected > 0
    assert len(list((out_dir / "overlays").glob("*.png"))) == 3
    ground_truth = COCO(str(annotations))
    evaluator = COCOeval(ground_truth, ground_truth.loadRes(str(out_dir / "segmentation_results.json")), iouType="segm")
    evaluator.params.imgIds = [record["id"] for record in chosen]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.eval["precision"].shape[0] == 10
