"""efficientsam-evaluate: hand-computed mIoU / F1 / AP on a hand-made case, seeded prompts, the CLI table and JSON."""

from __future__ import annotations

import contextlib
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils


from modeling_efficientsam.data import dataset_categories, prepare_coco_dataset
from modeling_efficientsam.inference.evaluate_cli import main as evaluate_main
from modeling_efficientsam.inference.evaluate_cli import model_labels
from modeling_efficientsam.inference.evaluation import coco_ground_truth, evaluate_predictor, make_prompts
from modeling_efficientsam.metrics import boundary_f_score

from conftest import tiny_model, tiny_processor  # noqa: E402


def _rect(height, width, rows, cols):
    mask = np.zeros((height, width), dtype=bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def _rle(mask):
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(encoded["size"]), "counts": encoded["counts"].decode("ascii")}


# Ground truth (rows / cols are half-open pixel ranges):
#   image 1 (40 x 30): A cat 1 rows 5-15 cols 5-15 (100 px); B cat 2 rows 20-25 cols 20-30 (50 px)
#   image 2 (30 x 30): C cat 1 rows 2-12 cols 2-12 (100 px); D cat 1 crowd rows 15-30 (not prompted)
GT = {
    "A": (1, 1, _rect(30, 40, (5, 15), (5, 15)), [5, 5, 10, 10], 0),
    "B": (1, 2, _rect(30, 40, (20, 25), (20, 30)), [20, 20, 10, 5], 0),
    "C": (2, 1, _rect(30, 30, (2, 12), (2, 12)), [2, 2, 10, 10], 0),
    "D": (2, 1, _rect(30, 30, (15, 30), (0, 30)), [0, 15, 30, 15], 1),
}


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory, coco_writer):
    from PIL import Image

    directory = tmp_path_factory.mktemp("hand_made")
    images = [
        {"id": 1, "file_name": "one.png", "image": Image.new("RGB", (40, 30), (90, 90, 90))},
        {"id": 2, "file_name": "two.png", "image": Image.new("RGB", (30, 30), (30, 120, 60))},
    ]
    annotations = [
        {"id": index + 1, "image_id": image_id, "category_id": category, "bbox": bbox, "iscrowd": crowd,
         "area": int(mask.sum()), "segmentation": _rle(mask)}
        for index, (image_id, category, mask, bbox, crowd) in enumerate(GT.values())
    ]
    json_path = coco_writer(directory / "coco", images, annotations)
    dataset = prepare_coco_dataset({"validation": (json_path, json_path.parent)}, directory / "prepared")
    return json_path, directory / "prepared", dataset["validation"]


class FakePredictor:
    """Returns a fixed mask for each expected prompt box (keyed by the xyxy box); fails on any other box."""

    def __init__(self, masks_by_box, scores_by_box):
        self.masks_by_box, self.scores_by_box = masks_by_box, scores_by_box
        self.calls = []

    def predict_batch(self, images, boxes_per_image, **kwargs):
        assert kwargs["normalized"] is False and kwargs["box_format"] == "xyxy"
        results = []
        for image, boxes in zip(images, boxes_per_image):
            keys = [tuple(int(round(v)) for v in box) for box in boxes]
            self.calls.append(keys)
            masks = np.stack([self.masks_by_box[key] for key in keys])
            assert masks.shape[1:] == image.shape[:2]
            results.append(SimpleNamespace(masks=torch.from_numpy(masks),
                                           scores=torch.tensor([self.scores_by_box[key] for key in keys])))
        return results


def _xyxy(bbox):
    x, y, w, h = bbox
    return (x, y, x + w, y + h)


def _evaluate(split, predictor, **kwargs):
    category_ids, category_names = dataset_categories(split)
    prompts = make_prompts(split, **kwargs)
    coco = coco_ground_truth(split, category_ids, category_names)
    return evaluate_predictor(predictor, split, prompts, coco, category_ids=category_ids,
                              category_names=category_names, progress=False)


def test_hand_computed_metrics(hand_made):
    _, _, split = hand_made
    prediction_a = _rect(30, 40, (5, 15), (10, 20))  # half of A, plus as much outside: IoU 50 / 150
    predictions = {
        _xyxy(GT["A"][3]): prediction_a,
        _xyxy(GT["B"][3]): GT["B"][2],  # exact
        _xyxy(GT["C"][3]): np.zeros((30, 30), bool),  # empty
    }
    fake = FakePredictor(predictions, {key: score for key, score in zip(predictions, (0.9, 0.8, 0.7))})
    metrics = _evaluate(split, fake)
    assert sorted(key for call in fake.calls for key in call) == sorted(predictions)  # crowd D never prompted
    assert metrics["num_instances"] == 3
    assert metrics["mean_iou"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert metrics["per_category_iou"] == pytest.approx({"part": (1 / 3 + 0) / 2, "chip": 1.0})
    assert metrics["mean_category_iou"] == pytest.approx(((1 / 3 + 0) / 2 + 1) / 2)
    assert metrics["f1"] == pytest.approx((2 * 50 / 200 + 1 + 0) / 3)
    boundary_a = float(boundary_f_score(torch.from_numpy(prediction_a), torch.from_numpy(GT["A"][2]), tolerance=2))
    assert 0 < boundary_a < 1
    assert metrics["boundary_f1"] == pytest.approx((boundary_a + 1 + 0) / 3, abs=1e-6)
    # COCO: category "part" has no match at IoU >= 0.5 (AP 0), "chip" one exact match (AP 1); all objects are small
    coco = metrics["coco"]
    assert coco["AP"] == pytest.approx(0.5) and coco["AP50"] == pytest.approx(0.5) and coco["AP75"] == pytest.approx(0.5)
    assert coco["APs"] == pytest.approx(0.5) and coco["APm"] is None and coco["APl"] is None


def test_perfect_predictions_score_one(hand_made):
    _, _, split = hand_made
    predictions = {_xyxy(bbox): mask for _, _, mask, bbox, crowd in GT.values() if not crowd}
    fake = FakePredictor(predictions, {key: 0.5 for key in predictions})
    metrics = _evaluate(split, fake)
    assert metrics["mean_iou"] == 1.0 and metrics["f1"] == 1.0 and metrics["boundary_f1"] == 1.0
    assert metrics["coco"]["AP"] == pytest.approx(1.0)


def test_box_noise_is_seeded_and_model_independent(hand_made):
    _, _, split = hand_made
    clean = make_prompts(split, box_noise_scale=0.0)
    assert [p.boxes.round().astype(int).tolist() for p in clean] == [
        [list(_xyxy(GT["A"][3])), list(_xyxy(GT["B"][3]))], [list(_xyxy(GT["C"][3]))]]
    first = make_prompts(split, box_noise_scale=0.2, seed=1)
    again = make_prompts(split, box_noise_scale=0.2, seed=1)
    other = make_prompts(split, box_noise_scale=0.2, seed=2)
    assert all(np.array_equal(a.boxes, b.boxes) for a, b in zip(first, again))
    assert not all(np.array_equal(a.boxes, b.boxes) for a, b in zip(first, other))
    assert not all(np.array_equal(a.boxes, b.boxes) for a, b in zip(first, clean))
    for prompts, width in zip(first, (40, 30)):
        assert (prompts.boxes[:, 2] > prompts.boxes[:, 0]).all() and (prompts.boxes[:, 3] > prompts.boxes[:, 1]).all()
        assert prompts.boxes.min() >= 0 and prompts.boxes[:, 2].max() <= width
    with pytest.raises(ValueError, match="box_noise_scale"):
        make_prompts(split, box_noise_scale=-0.1)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    directories = []
    for seed in (0, 1):
        directory = tmp_path_factory.mktemp(f"tiny_eval_{seed}")
        tiny_model(seed, initializer_range=0.1).save_pretrained(directory)
        tiny_processor().save_pretrained(directory)
        directories.append(directory)
    return directories


def _cli(argv):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        status = evaluate_main(argv + ["--no_progress"])
    return status, out.getvalue(), err.getvalue()


def test_cli_compares_models_on_a_coco_json(hand_made, model_dirs, tmp_path):
    json_path, _, _ = hand_made
    output = tmp_path / "eval.json"
    status, printed, errors = _cli([
        "--model", f"first={model_dirs[0]}", "--compare", f"second={model_dirs[1]}", "--dataset", str(json_path),
        "--box_noise_scale", "0.1", "--seed", "3", "--output", str(output),
    ])
    assert status == 0, errors
    report = json.loads(output.read_text())
    assert list(report["models"]) == ["first", "second"]
    assert report["num_prompts"] == 3 and report["box_noise_scale"] == 0.1 and report["seed"] == 3
    for metrics in report["models"].values():
        assert metrics["num_instances"] == 3
        assert 0 <= metrics["mean_iou"] <= 1 and set(metrics["per_category_iou"]) == {"part", "chip"}
        assert set(metrics["coco"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert report["models"]["first"]["mean_iou"] != report["models"]["second"]["mean_iou"]
    header = next(line for line in printed.splitlines() if line.startswith("metric"))
    assert header.split()[-2:] == ["first", "second"]
    assert any(line.startswith("mask AP50") for line in printed.splitlines())
    assert any(line.startswith("IoU chip") for line in printed.splitlines())


def test_cli_on_a_prepared_dataset_folder(synthetic_pcb_dataset, model_dirs, tmp_path):
    folder = synthetic_pcb_dataset.cache_files["validation"][0]["filename"].rsplit("/validation/", 1)[0]
    status, printed, errors = _cli(["--model", str(model_dirs[0]), "--dataset", folder, "--split", "validation",
                                    "--max_images", "1", "--output", str(tmp_path / "eval.json")])
    assert status == 0, errors
    report = json.loads((tmp_path / "eval.json").read_text())
    expected = sum(1 for obj in synthetic_pcb_dataset["validation"][0]["objects"] if not obj["iscrowd"])
    assert report["num_images"] == 1 and report["num_prompts"] == expected > 0
    status, _, errors = _cli(["--model", str(model_dirs[0]), "--dataset", folder, "--split", "nope"])
    assert status == 2 and "'nope'" in errors and "validation" in errors


def test_model_labels():
    assert model_labels(["out/a", "x=out/b", "hub-user/model"]) == [("a", "out/a"), ("x", "out/b"), ("model", "hub-user/model")]
    assert model_labels(["one/model", "two/model"]) == [("one/model", "one/model"), ("two/model", "two/model")]
    with pytest.raises(ValueError, match="unique"):
        model_labels(["a=x", "a=y"])
