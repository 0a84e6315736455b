"""The wrong-box check: a model that uses its box is told apart from one that ignores it, in the
trainer's evaluation and in efficientsam-evaluate, and only the second gets the warning."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from modeling_efficientsam.data import dataset_categories
from modeling_efficientsam.inference import evaluate_cli
from modeling_efficientsam.inference.evaluation import coco_ground_truth, evaluate_predictor, make_prompts, make_wrong_prompts
from modeling_efficientsam.metrics.prompt_dependence import (
    box_iou_matrix,
    displaced_box,
    prompt_dependence_summary,
    prompt_dependence_warning,
    wrong_boxes,
)
from modeling_efficientsam.training.evaluation import wrong_box_points

from conftest import make_trainer, tiny_dataset, tiny_model  # noqa: E402


# ---- the wrong boxes
def test_wrong_box_is_the_least_overlapping_other_box():
    boxes = np.array([[0, 0, 10, 10], [2, 2, 12, 12], [50, 50, 60, 60]], float)
    wrong = wrong_boxes(boxes, 100, 100)
    assert wrong[0].tolist() == boxes[2].tolist()  # not the overlapping box 1
    assert wrong[1].tolist() == boxes[2].tolist()
    assert wrong[2].tolist() in (boxes[0].tolist(), boxes[1].tolist())
    assert (box_iou_matrix(np.concatenate([boxes, wrong]))[np.arange(3), np.arange(3) + 3] < 0.2).all()


def test_a_lone_box_is_moved_off_itself_inside_the_image():
    box = np.array([10.0, 20.0, 40.0, 50.0])
    (moved,) = wrong_boxes(box[None], 100, 80)
    assert box_iou_matrix(np.stack([box, moved]))[0, 1] == 0.0
    assert moved[0] >= 0 and moved[1] >= 0 and moved[2] <= 100 and moved[3] <= 80
    assert moved[2] > moved[0] and moved[3] > moved[1]
    # A box filling the frame has nowhere to go: a quarter-size corner box
    whole = displaced_box([0, 0, 100, 80], 100, 80)
    assert (whole[2] - whole[0], whole[3] - whole[1]) == (25.0, 20.0)


def test_summary_and_warning():
    uses = prompt_dependence_summary(0.62, 0.03)
    ignores = prompt_dependence_summary(0.70, 0.69)
    assert not uses["ignores_prompt"] and uses["prompt_gap"] == pytest.approx(0.59)
    assert ignores["ignores_prompt"] and prompt_dependence_warning(uses) is None
    message = prompt_dependence_warning(ignores, "here")
    assert message.startswith("here: ") and "ignore its box prompts" in message and "Try" in message


def test_wrong_box_points_replace_only_real_box_queries():
    points = torch.tensor([[[[0.0, 0.0], [10.0, 10.0]], [[30.0, 30.0], [40.0, 40.0]], [[-1.0, -1.0], [-1.0, -1.0]]]])
    labels = torch.tensor([[[2, 3], [2, 3], [-1, -1]]])
    inputs = {"input_points": points, "input_labels": labels, "query_mask": torch.tensor([[True, True, False]])}
    wrong, valid = wrong_box_points(inputs, image_size=64)
    assert valid.tolist() == [[True, True, False]]
    assert wrong[0, 0].tolist() == points[0, 1].tolist() and wrong[0, 1].tolist() == points[0, 0].tolist()
    assert wrong[0, 2].tolist() == points[0, 2].tolist()
    point_query = dict(inputs, input_labels=torch.tensor([[[1, -1], [2, 3], [-1, -1]]]))
    assert wrong_box_points(point_query, image_size=64)[1].tolist() == [[False, True, False]]


# ---- two models for the trainer: an oracle that answers with its box, one blind to its prompt
def box_oracle(model, fixed_box=None):
    """``model`` whose masks are its box prompt, filled (+10 inside, -10 outside): uses its prompt and nothing
    else. With ``fixed_box`` (xyxy in the model frame) it answers that box whatever it is asked."""
    forward = model.forward
    size, mask_size = model.config.image_size, model.config.low_res_mask_size

    def oracle_forward(**kwargs):
        out = forward(**kwargs)
        points = kwargs["input_points"]
        if fixed_box is not None:
            points = torch.tensor(fixed_box, dtype=torch.float32).reshape(2, 2).expand_as(points[..., :2, :])
        points = points * (mask_size / size)  # (B, Q, P, 2) in the mask frame
        centres = torch.arange(mask_size, dtype=torch.float32) + 0.5
        inside_x = (centres >= points[..., 0, 0, None]) & (centres < points[..., 1, 0, None])  # (B, Q, m)
        inside_y = (centres >= points[..., 0, 1, None]) & (centres < points[..., 1, 1, None])
        mask = (inside_y[..., :, None] & inside_x[..., None, :]).float() * 20 - 10  # (B, Q, m, m)
        out.pred_masks = mask[:, :, None].expand_as(out.pred_masks).contiguous() + 0 * out.pred_masks
        return out

    model.forward = oracle_forward
    return model


def prompt_blind(model):
    """``model`` whose prompt encoder returns the same embedding whatever the prompt (a fixed box)."""
    encoder_forward = model.prompt_encoder.forward

    def same_prompt(points, labels):
        fixed = torch.zeros_like(points)
        fixed[..., 1, :] = model.config.image_size / 2
        return encoder_forward(fixed, labels)

    model.prompt_encoder.forward = same_prompt
    return model


def _evaluate(tmp_path, synthetic_pcb_dataset, model, step=0):
    evaluation = tiny_dataset(synthetic_pcb_dataset["validation"], box_noise_scale=0.0, max_objects=None)
    trainer = make_trainer(tmp_path, synthetic_pcb_dataset, model=model, evaluation=evaluation)
    trainer.state.global_step = step
    return trainer, trainer.evaluate()


def test_trainer_evaluation_separates_a_prompt_user_from_a_prompt_ignorer(tmp_path, synthetic_pcb_dataset):
    user, uses = _evaluate(tmp_path / "oracle", synthetic_pcb_dataset, box_oracle(tiny_model(initializer_range=0.1)), step=3)
    blind, ignores = _evaluate(tmp_path / "blind", synthetic_pcb_dataset, prompt_blind(tiny_model(initializer_range=0.1)), step=3)
    for metrics in (uses, ignores):
        assert {"eval_own_box_mean_iou", "eval_wrong_box_mean_iou", "eval_prompt_gap"} <= set(metrics)
        assert metrics["eval_own_box_mean_iou"] == pytest.approx(metrics["eval_mean_iou"])  # every eval query is a box
    assert uses["eval_mean_iou"] > 0.4 and uses["eval_wrong_box_mean_iou"] < 0.15 and uses["eval_prompt_gap"] > 0.3
    assert ignores["eval_prompt_gap"] == pytest.approx(0.0, abs=1e-9)  # the same answer whatever the box
    assert user.prompt_dependence.warnings == []
    # the random prompt-blind model barely segments: it is told so, not called a good model that ignores prompts
    assert len(blind.prompt_dependence.warnings) == 1 and "barely segments" in blind.prompt_dependence.warnings[0]


@pytest.fixture(scope="module")
def one_big_object(tmp_path_factory, coco_writer):
    """Three 64 x 64 images, each with one object covering most of the frame (the case of fact (a))."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    from modeling_efficientsam.data import prepare_coco_dataset

    directory = tmp_path_factory.mktemp("one_big_object")
    images, annotations = [], []
    for index, (x1, y1, x2, y2) in enumerate([(8, 8, 56, 56), (4, 10, 60, 58), (10, 4, 54, 60)]):
        mask = np.zeros((64, 64), np.uint8)
        mask[y1:y2, x1:x2] = 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        images.append({"id": index + 1, "file_name": f"{index}.png", "image": Image.new("RGB", (64, 64), (40 * index, 90, 90))})
        annotations.append({"id": index + 1, "image_id": index + 1, "category_id": 1, "iscrowd": 0, "area": int(mask.sum()),
                            "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "segmentation": {"size": [64, 64], "counts": rle["counts"].decode("ascii")}})
    path = coco_writer(directory / "coco", images, annotations)
    return prepare_coco_dataset({"train": (path, path.parent), "validation": (path, path.parent)}, directory / "prepared")


def test_a_model_that_answers_the_big_object_whatever_the_box_is_flagged(tmp_path, one_big_object, caplog):
    with caplog.at_level(logging.WARNING, logger="modeling_efficientsam"):
        user, uses = _evaluate(tmp_path / "user", one_big_object, box_oracle(tiny_model()), step=5)
        blind, ignores = _evaluate(tmp_path / "blind", one_big_object, box_oracle(tiny_model(), fixed_box=(8, 8, 56, 56)), step=5)
    # both score well with their own boxes; only the prompt user notices the box moved off the object
    assert uses["eval_mean_iou"] > 0.8 and ignores["eval_mean_iou"] > 0.6
    assert uses["eval_prompt_gap"] > 0.5 and ignores["eval_prompt_gap"] == pytest.approx(0.0, abs=1e-9)
    assert user.prompt_dependence.warnings == []
    assert len(blind.prompt_dependence.warnings) == 1 and "ignore its box prompts" in blind.prompt_dependence.warnings[0]
    assert sum("ignore its box prompts" in record.getMessage() for record in caplog.records) == 1


def test_no_warning_before_training(tmp_path, synthetic_pcb_dataset):
    blind, metrics = _evaluate(tmp_path, synthetic_pcb_dataset, prompt_blind(tiny_model()), step=0)
    assert metrics["eval_prompt_gap"] == pytest.approx(0.0, abs=1e-9) and blind.prompt_dependence.warnings == []


# ---- efficientsam-evaluate: fake predictors with the same two behaviours
class BoxPredictor:
    """Answers each box with the box itself, filled (``blind``: always the first box of the image)."""

    def __init__(self, blind=False):
        self.blind = blind

    def predict_batch(self, images, boxes_per_image, **kwargs):
        results = []
        for image, boxes in zip(images, boxes_per_image):
            masks = np.zeros((len(boxes),) + image.shape[:2], bool)
            for index, box in enumerate(boxes):
                x1, y1, x2, y2 = np.round(boxes[0] if self.blind else box).astype(int)
                masks[index, y1:y2, x1:x2] = True
            results.append(SimpleNamespace(masks=torch.from_numpy(masks), scores=torch.ones(len(boxes))))
        return results


def test_evaluate_predictor_reports_prompt_dependence(synthetic_pcb_dataset):
    split = synthetic_pcb_dataset["validation"]
    category_ids, category_names = dataset_categories(split)
    prompts = make_prompts(split)
    coco = coco_ground_truth(split, category_ids, category_names)
    results = {}
    for name, predictor in (("user", BoxPredictor()), ("blind", BoxPredictor(blind=True))):
        results[name] = evaluate_predictor(predictor, split, prompts, coco, category_ids=category_ids,
                                           category_names=category_names, progress=False,
                                           wrong_prompts=make_wrong_prompts(split, prompts))
    user, blind = results["user"]["prompt_dependence"], results["blind"]["prompt_dependence"]
    assert user["own_box_miou"] == pytest.approx(results["user"]["mean_iou"])
    assert user["own_box_miou"] > 0.6
    assert user["wrong_box_miou"] < 0.1 and not user["ignores_prompt"]
    assert blind["prompt_gap"] == pytest.approx(0.0) and blind["ignores_prompt"]


def test_cli_shows_the_gap_and_warns_only_for_the_blind_model(synthetic_pcb_dataset, tmp_path, monkeypatch):
    folder = synthetic_pcb_dataset.cache_files["validation"][0]["filename"].rsplit("/validation/", 1)[0]
    monkeypatch.setattr(evaluate_cli, "load_predictor", lambda path, args: BoxPredictor(blind=path == "blind"))
    output = tmp_path / "eval.json"
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        status = evaluate_cli.main(["--model", "user", "--compare", "blind", "--dataset", folder, "--no_progress",
                                    "--output", str(output)])
    assert status == 0, err.getvalue()
    report = json.loads(output.read_text())
    assert report["models"]["blind"]["prompt_dependence"]["ignores_prompt"] is True
    assert report["models"]["user"]["prompt_dependence"]["ignores_prompt"] is False
    assert any(line.startswith("prompt gap") for line in out.getvalue().splitlines())
    warnings = [line for line in err.getvalue().splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "model blind" in warnings[0]


def test_model_card_reports_the_wrong_box_check():
    from modeling_efficientsam.training.model_card import build_model_card

    common = dict(model_name="m", metrics_before={"eval_mean_iou": 0.1})
    uses = build_model_card(metrics_after={"eval_mean_iou": 0.62, "eval_own_box_mean_iou": 0.62,
                                           "eval_wrong_box_mean_iou": 0.03}, **common)
    ignores = build_model_card(metrics_after={"eval_mean_iou": 0.7, "eval_own_box_mean_iou": 0.7,
                                              "eval_wrong_box_mean_iou": 0.69}, **common)
    assert "gap 0.590" in uses and "follow the prompt" in uses and "Warning" not in uses
    assert "gap 0.010" in ignores and "ignore its box prompts" in ignores
    assert "Does it use its box" not in build_model_card(metrics_after={"eval_mean_iou": 0.7}, **common)
