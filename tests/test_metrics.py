import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_efficientsam.metrics import (
    SEGMENTATION_METRIC_PATH,
    aggregate_segmentation_metrics,
    batch_segmentation_statistics,
    boundary_f_score,
    f1,
    load_segmentation_metric,
    mask_boundary,
    mask_iou,
    segmentation_statistics,
    select_by_predicted_iou,
)

REPO = Path(__file__).resolve().parents[1]


def box(size, top, left, bottom, right):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


def hand_case():
    """Four instances on 8 x 8 masks, with hand-computed IoU and F1.

    0: prediction 4x4 (16 px), reference its left 4x2 half (8 px): IoU 8/16 = 0.5, F1 16/24 = 2/3
    1: identical 4x4 squares: IoU 1, F1 1
    2: both empty: IoU 1, F1 1 (convention)
    3: empty prediction, 3x3 reference: IoU 0, F1 0
    """
    pred = torch.stack([box(8, 0, 0, 4, 4), box(8, 2, 2, 6, 6), box(8, 0, 0, 0, 0), box(8, 0, 0, 0, 0)])
    ref = torch.stack([box(8, 0, 0, 4, 2), box(8, 2, 2, 6, 6), box(8, 0, 0, 0, 0), box(8, 4, 4, 7, 7)])
    return pred, ref


# ----------------------------------------------------------------------------- functional API


def test_per_instance_iou_and_f1_hand_values():
    pred, ref = hand_case()
    torch.testing.assert_close(mask_iou(pred, ref), torch.tensor([0.5, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(f1(pred, ref), torch.tensor([2 / 3, 1.0, 1.0, 0.0]))
    # 0/1 integer and float masks are read the same way as bool masks
    torch.testing.assert_close(mask_iou(pred.float(), ref.to(torch.uint8)), mask_iou(pred, ref))


def test_aggregate_mean_and_per_category_iou():
    pred, ref = hand_case()
    stats = segmentation_statistics(pred, ref)
    result = aggregate_segmentation_metrics(stats, category_ids=torch.tensor([1, 2, 2, 2]))
    assert result["num_instances"] == 4
    assert result["mean_iou"] == pytest.approx((0.5 + 1 + 1 + 0) / 4)  # instance-averaged
    assert result["f1"] == pytest.approx((2 / 3 + 1 + 1 + 0) / 4)
    assert result["per_category_iou"] == {1: pytest.approx(0.5), 2: pytest.approx(2 / 3)}
    assert result["mean_category_iou"] == pytest.approx((0.5 + 2 / 3) / 2)
    named = aggregate_segmentation_metrics(stats, category_ids=[1, 2, 2, -1], id2label={1: "resistor", 2: "chip"})
    assert named["per_category_iou"] == {"resistor": pytest.approx(0.5), "chip": pytest.approx(1.0)}
    assert named["num_instances"] == 4  # the uncategorised instance still counts in the instance mean


def test_mask_boundary_conventions():
    square = box(10, 2, 2, 6, 6)
    assert int(mask_boundary(square).sum()) == 12  # 4x4 ring
    assert int(mask_boundary(torch.ones(10, 10, dtype=torch.bool)).sum()) == 0  # image border is no boundary
    left_half = box(10, 0, 0, 10, 5)
    edge = mask_boundary(left_half)
    assert edge[:, 4].all() and int(edge.sum()) == 10  # only the inner edge


def test_boundary_f_score_hand_case():
    ref = box(10, 2, 2, 6, 6)
    pred = box(10, 2, 3, 6, 7)  # shifted one column to the right
    # tolerance 0: of the 12 ring pixels on each side, 6 coincide (top and bottom rows, cols 3..5)
    assert boundary_f_score(pred, ref, tolerance=0).item() == pytest.approx(0.5)
    # tolerance 1: every boundary pixel is within one pixel of the other boundary
    assert boundary_f_score(pred, ref, tolerance=1).item() == pytest.approx(1.0)
    stats = segmentation_statistics(pred, ref, boundary_tolerance=0)
    assert (int(stats["pred_boundary"]), int(stats["pred_boundary_matched"])) == (12, 6)
    assert (int(stats["target_boundary"]), int(stats["target_boundary_matched"])) == (12, 6)
    # far away: nothing matches within 2 pixels
    assert boundary_f_score(box(20, 0, 0, 4, 4), box(20, 12, 12, 16, 16)).item() == 0.0


def test_boundary_f_empty_conventions():
    empty = torch.zeros(8, 8, dtype=torch.bool)
    full = torch.ones(8, 8, dtype=torch.bool)
    square = box(8, 2, 2, 6, 6)
    assert boundary_f_score(empty, empty).item() == 1.0
    assert boundary_f_score(full, full).item() == 1.0
    assert boundary_f_score(empty, square).item() == 0.0
    assert boundary_f_score(square, empty).item() == 0.0


def test_torch_iou_and_count_path_agree_on_random_masks():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(50, 12, 12, generator=g) > 0.7
    ref = torch.rand(50, 12, 12, generator=g) > 0.7
    pred[:5] = False
    ref[:3] = False
    result = aggregate_segmentation_metrics(segmentation_statistics(pred, ref))
    assert result["mean_iou"] == pytest.approx(mask_iou(pred, ref).mean().item(), rel=1e-6)
    inter = (pred & ref).flatten(1).sum(1).double()
    areas = pred.flatten(1).sum(1).double() + ref.flatten(1).sum(1).double()
    dice = torch.where(areas > 0, 2 * inter / areas.clamp_min(1), torch.ones_like(areas))
    assert result["f1"] == pytest.approx(dice.mean().item(), rel=1e-9)


def test_empty_evaluation_set_gives_nan():
    result = aggregate_segmentation_metrics({name: [] for name in segmentation_statistics(box(4, 0, 0, 1, 1), box(4, 0, 0, 1, 1))})
    assert result["num_instances"] == 0 and result["mean_iou"] != result["mean_iou"]


def test_batch_statistics_choose_highest_predicted_iou_and_drop_padding():
    labels = torch.stack([box(8, 0, 0, 4, 4), box(8, 2, 2, 6, 6)]).float().reshape(1, 2, 8, 8)
    good = 10 * (2 * labels - 1)
    # candidate 1 is right for both queries; candidate 0 is inverted, candidate 2 all background
    pred = torch.stack([-good, good, torch.full_like(good, -10)], dim=2)
    scores = torch.tensor([[[0.1, 0.9, 0.3], [0.8, 0.2, 0.1]]])
    chosen = select_by_predicted_iou(pred_masks=pred, iou_scores=scores)
    torch.testing.assert_close(chosen[0, 0], good[0, 0])
    torch.testing.assert_close(chosen[0, 1], -good[0, 1])
    # one image's (Q, M, H, W) logits, as the predictor and the overlay callback pass them
    single, index, score = select_by_predicted_iou(pred_masks=pred[0], iou_scores=scores[0], return_index=True)
    torch.testing.assert_close(single, chosen[0])
    assert index.tolist() == [1, 0] and score.tolist() == pytest.approx([0.9, 0.8])
    with pytest.raises(ValueError, match="do not match"):
        select_by_predicted_iou(pred_masks=pred, iou_scores=scores[..., :2])
    stats = batch_segmentation_statistics(
        pred_masks=pred, iou_scores=scores, labels=labels, query_mask=torch.tensor([[True, False]]),
        category_ids=torch.tensor([[3, -1]]),
    )
    assert stats["intersection"].tolist() == [16] and stats["union"].tolist() == [16]
    assert stats["category_id"].tolist() == [3]
    both = batch_segmentation_statistics(pred_masks=pred, iou_scores=scores, labels=labels)
    assert aggregate_segmentation_metrics(both)["mean_iou"] == pytest.approx(0.5)  # second query picks the inverted mask
    with pytest.raises(ValueError):
        batch_segmentation_statistics(pred_masks=pred, labels=labels)  # several candidates need scores


# ----------------------------------------------------------------------------- evaluate module


@pytest.fixture
def metric(tmp_path):
    return load_segmentation_metric(cache_dir=str(tmp_path), keep_in_memory=True)


def test_evaluate_module_from_masks_matches_functional(metric):
    pred, ref = hand_case()
    metric.add_batch(predictions=pred[:2], references=ref[:2], category_ids=[1, 2])
    metric.add_batch(predictions=pred[2:].float(), references=ref[2:], category_ids=torch.tensor([2, 2]))
    result = metric.compute(id2label={1: "resistor", 2: "chip"})
    assert result["num_instances"] == 4
    assert result["mean_iou"] == pytest.approx(0.625)
    assert result["f1"] == pytest.approx((2 / 3 + 2) / 4)
    assert result["per_category_iou"] == {"resistor": pytest.approx(0.5), "chip": pytest.approx(2 / 3)}
    assert set(result) >= {"mean_iou", "per_category_iou", "f1", "boundary_f1", "num_instances"}


def test_evaluate_module_from_counts_and_logits(metric):
    ref = torch.stack([box(10, 2, 2, 6, 6), box(10, 0, 0, 5, 5)])
    pred = torch.stack([box(10, 2, 3, 6, 7), box(10, 0, 0, 5, 5)])
    stats = segmentation_statistics(pred, ref, boundary_tolerance=0)
    metric.add_batch(**stats, category_id=torch.tensor([0, 0]))
    from_counts = metric.compute()
    logits = 5.0 * (2 * pred.float() - 1)
    from_logits = metric.compute(
        predictions=logits, references=ref, predictions_are_logits=True, boundary_tolerance=0, category_ids=[0, 0]
    )
    assert from_counts == from_logits
    assert from_counts["boundary_f1"] == pytest.approx((0.5 + 1.0) / 2)
    assert from_counts["mean_iou"] == pytest.approx((12 / 20 + 1.0) / 2)  # shifted square: 12 shared of 20


def test_evaluate_module_rejects_half_inputs_and_handles_nothing(metric):
    with pytest.raises(ValueError):
        metric.add_batch(predictions=torch.zeros(1, 4, 4))
    assert metric.compute()["num_instances"] == 0


def test_load_segmentation_metric_offline_in_fresh_process(tmp_path):
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_EVALUATE_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    code = (
        "import json, torch\n"
        "from modeling_efficientsam.metrics import load_segmentation_metric\n"
        "m = load_segmentation_metric()\n"
        "p = torch.zeros(2, 6, 6, dtype=torch.bool); p[0, :3, :3] = True\n"
        "r = torch.zeros(2, 6, 6, dtype=torch.bool); r[0, :3, :2] = True\n"
        "print(json.dumps(m.compute(predictions=p, references=r, category_ids=[4, 4])))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mean_iou"] == pytest.approx((6 / 9 + 1.0) / 2)
    assert result["per_category_iou"] == {"4": pytest.approx((6 / 9 + 1.0) / 2)}
    assert Path(SEGMENTATION_METRIC_PATH).is_file()
