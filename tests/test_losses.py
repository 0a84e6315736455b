import math

import pytest
import torch

from modeling_efficientsam.training.losses import (
    boundary_band, boundary_loss, dice_loss, iou_head_loss, segmentation_loss, sigmoid_focal_loss, soft_iou_loss,
    step_normalizers,
)
from modeling_efficientsam.training.weighting import (
    DynamicWeightAverage,
    FixedLossWeighting,
    UncertaintyWeighting,
    build_loss_weighting,
)

TERMS = ("focal_loss", "dice_loss", "iou_loss", "boundary_loss", "iou_head_loss", "mask_loss", "loss")


def square_mask(size=16, lo=4, hi=12):
    mask = torch.zeros(size, size)
    mask[lo:hi, lo:hi] = 1.0
    return mask


def perfect_logits(targets, magnitude=30.0):
    return magnitude * (2.0 * targets - 1.0)


def random_batch(batch=2, queries=3, candidates=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(batch, queries, candidates, size, size, generator=g)
    iou = torch.rand(batch, queries, candidates, generator=g)
    labels = (torch.rand(batch, queries, size, size, generator=g) > 0.6).float()
    return pred, iou, labels


# ----------------------------------------------------------------------------- per-mask terms


def test_focal_matches_hand_computation():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    alpha, gamma = 0.25, 2.0

    def pixel(x, t):
        p = 1.0 / (1.0 + math.exp(-x))
        if t == 1:
            return -alpha * (1 - p) ** gamma * math.log(p)
        return -(1 - alpha) * p**gamma * math.log(1 - p)

    expected = sum(pixel(x, t) for x, t in zip(logits.flatten().tolist(), targets.flatten().tolist())) / 4
    value = sigmoid_focal_loss(logits=logits, targets=targets, alpha=alpha, gamma=gamma)
    assert value.shape == ()
    assert value.item() == pytest.approx(expected, rel=1e-6)
    # logit 0 on a foreground pixel alone: 0.25 * 0.5**2 * ln 2
    single = sigmoid_focal_loss(logits=torch.zeros(1, 1), targets=torch.ones(1, 1))
    assert single.item() == pytest.approx(0.25 * 0.25 * math.log(2), rel=1e-6)


def test_focal_gamma_zero_negative_alpha_is_bce():
    logits = torch.randn(3, 5, 5)
    targets = (torch.rand(3, 5, 5) > 0.5).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean((-1, -2))
    value = sigmoid_focal_loss(logits=logits, targets=targets, alpha=-1, gamma=0.0)
    torch.testing.assert_close(value, bce)


def test_dice_and_soft_iou_hand_values():
    logits = torch.zeros(2, 2)  # p = 0.5 everywhere
    targets = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    # dice: 1 - (2 * 1 + 1) / (2 + 2 + 1)
    assert dice_loss(logits=logits, targets=targets).item() == pytest.approx(0.4, rel=1e-6)
    # soft IoU: I = 1, U = 2 + 2 - 1 = 3 -> 1 - (1 + 1) / (3 + 1)
    assert soft_iou_loss(logits=logits, targets=targets).item() == pytest.approx(0.5, rel=1e-6)


def test_perfect_prediction_gives_near_zero_terms():
    targets = torch.stack([square_mask(), torch.zeros(16, 16), torch.ones(16, 16)])
    logits = perfect_logits(targets)
    for fn in (dice_loss, soft_iou_loss, boundary_loss, sigmoid_focal_loss):
        value = fn(logits=logits, targets=targets)
        assert value.shape == (3,)
        assert torch.all(value.abs() < 1e-6), (fn.__name__, value)
    # and a clearly wrong prediction is not near zero
    for fn in (dice_loss, soft_iou_loss, boundary_loss):
        assert fn(logits=-logits[:1], targets=targets[:1]).item() > 0.5


def test_boundary_band_hand_count():
    mask = torch.zeros(8, 8)
    mask[2:6, 2:6] = 1.0
    band = boundary_band(mask, band_width=1)
    # dilated square rows/cols 1..6 (36 px) minus eroded interior rows/cols 3..4 (4 px)
    assert int(band.sum()) == 32
    assert bool(band[1, 1]) and bool(band[2, 2]) and not bool(band[3, 3]) and not bool(band[0, 0])
    assert int(boundary_band(mask, band_width=2).sum()) == 64  # the 4x4 square erodes away and its dilation covers the 8x8 image


def test_boundary_loss_value_and_empty_conventions():
    mask = square_mask()
    # BCE of logit 0 is ln 2 on every pixel, so the band average is ln 2
    value = boundary_loss(logits=torch.zeros(16, 16), targets=mask, band_width=2)
    assert value.item() == pytest.approx(math.log(2), rel=1e-6)
    # empty and full masks have no boundary -> exactly 0, finite gradient
    logits = torch.randn(2, 16, 16, requires_grad=True)
    targets = torch.stack([torch.zeros(16, 16), torch.ones(16, 16)])
    value = boundary_loss(logits=logits, targets=targets, band_width=3)
    assert torch.equal(value, torch.zeros(2))
    value.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0
    # only pixels of the band matter: changing a pixel far from the contour changes nothing
    far = torch.zeros(16, 16)
    far[8, 8] = 50.0  # centre of the square, 4 px from its contour; band_width 2 does not reach it
    assert boundary_loss(logits=far, targets=mask, band_width=2).item() == pytest.approx(math.log(2), rel=1e-6)


def test_iou_head_target_is_hand_computed_iou():
    target = torch.zeros(4, 4)
    target[0, 0:4] = 1.0  # 4 pixels
    pred = torch.full((2, 4, 4), -5.0)
    pred[0, 0, 0:2] = 5.0  # 2 px inside target -> IoU 2/4
    pred[0, 1, 0:2] = 5.0  # 2 px outside -> union 6 -> IoU 2/6
    pred[1, 0, 0:4] = 5.0  # exact -> IoU 1
    pred.requires_grad_(True)
    scores = torch.tensor([0.5, 0.5], requires_grad=True)
    value = iou_head_loss(iou_scores=scores, pred_masks=pred, targets=target)
    expected = torch.tensor([(0.5 - 2 / 6) ** 2, (0.5 - 1.0) ** 2])
    torch.testing.assert_close(value, expected)
    value.sum().backward()
    assert pred.grad is None  # the target IoU is detached and the masks get no gradient from the head
    torch.testing.assert_close(scores.grad, 2 * (scores.detach() - torch.tensor([2 / 6, 1.0])))


def test_iou_head_both_empty_target_is_one():
    value = iou_head_loss(
        iou_scores=torch.tensor([1.0]), pred_masks=torch.full((1, 4, 4), -3.0), targets=torch.zeros(4, 4)
    )
    assert value.item() == 0.0


# ----------------------------------------------------------------------------- segmentation_loss


def test_segmentation_loss_returns_all_terms_and_weighted_total():
    pred, iou, labels = random_batch()
    weights = dict(focal_weight=2.0, dice_weight=0.5, iou_weight=1.5, boundary_weight=0.25, iou_head_weight=3.0)
    out = segmentation_loss(pred_masks=pred, iou_scores=iou, labels=labels, **weights)
    for name in TERMS:
        assert out[name].shape == () and torch.isfinite(out[name])
    mask = (
        2.0 * out["focal_loss"] + 0.5 * out["dice_loss"] + 1.5 * out["iou_loss"] + 0.25 * out["boundary_loss"]
    )
    torch.testing.assert_close(out["mask_loss"], mask)
    torch.testing.assert_close(out["loss"], mask + 3.0 * out["iou_head_loss"])
    assert out["chosen_candidate"].shape == (2, 3) and out["chosen_candidate"].dtype == torch.int64


def test_perfect_batch_has_near_zero_mask_terms():
    labels = torch.stack([square_mask(), square_mask(16, 2, 10)]).reshape(1, 2, 16, 16)
    pred = perfect_logits(labels).unsqueeze(2).repeat(1, 1, 3, 1, 1)
    out = segmentation_loss(pred_masks=pred, iou_scores=torch.ones(1, 2, 3), labels=labels)
    for name in ("dice_loss", "iou_loss", "boundary_loss", "focal_loss", "iou_head_loss"):
        assert out[name].item() < 1e-6, name


def test_min_loss_candidate_is_selected_and_alone_gets_mask_gradient():
    labels = square_mask().reshape(1, 1, 16, 16)
    good = perfect_logits(labels[0, 0])
    pred = torch.stack([-good, torch.zeros(16, 16), good, 0.5 * torch.randn(16, 16)]).reshape(1, 1, 4, 16, 16)
    pred = pred.clone().requires_grad_(True)
    out = segmentation_loss(pred_masks=pred, iou_scores=torch.zeros(1, 1, 4), labels=labels)
    assert out["chosen_candidate"].tolist() == [[2]]
    # shuffling the candidates moves the choice with them
    perm = torch.tensor([3, 2, 0, 1])
    out2 = segmentation_loss(pred_masks=pred.detach()[:, :, perm], iou_scores=torch.zeros(1, 1, 4), labels=labels)
    assert out2["chosen_candidate"].tolist() == [[1]]
    # gradient of the mask terms reaches only the chosen candidate
    out = segmentation_loss(pred_masks=pred, iou_scores=torch.zeros(1, 1, 4), labels=labels, iou_head_weight=0.0)
    out["loss"].backward()
    per_candidate = pred.grad.abs().flatten(3).sum(-1)[0, 0]
    assert per_candidate[2] > 0
    assert torch.all(per_candidate[[0, 1, 3]] == 0)


def test_normalizer_rescales_exactly():
    pred, iou, labels = random_batch()
    qmask = torch.tensor([[True, True, False], [True, False, False]])
    local = segmentation_loss(pred_masks=pred, iou_scores=iou, labels=labels, query_mask=qmask)
    n3 = segmentation_loss(pred_masks=pred, iou_scores=iou, labels=labels, query_mask=qmask, num_queries=3)
    n6 = segmentation_loss(pred_masks=pred, iou_scores=iou, labels=labels, query_mask=qmask, num_queries=6)
    n6t = segmentation_loss(
        pred_masks=pred, iou_scores=iou, labels=labels, query_mask=qmask, num_queries=torch.tensor(6)
    )
    for name in TERMS:
        torch.testing.assert_close(local[name], n3[name])  # local count is 3 real queries
        torch.testing.assert_close(n6[name], n3[name] / 2)
        torch.testing.assert_close(n6t[name], n6[name])


def test_sum_over_micro_batches_equals_full_batch_with_global_normalizer():
    pred, iou, labels = random_batch(batch=4)
    qmask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    full = segmentation_loss(pred_masks=pred, iou_scores=iou, labels=labels, query_mask=qmask)["loss"]
    total = int(qmask.sum())
    parts = sum(
        segmentation_loss(
            pred_masks=pred[i : i + 2], iou_scores=iou[i : i + 2], labels=labels[i : i + 2],
            query_mask=qmask[i : i + 2], num_queries=total,
        )["loss"]
        for i in (0, 2)
    )
    torch.testing.assert_close(parts, full)


def test_padded_queries_change_neither_loss_nor_gradients():
    pred, iou, labels = random_batch(batch=1, queries=2, seed=1)
    pred_a = pred.clone().requires_grad_(True)
    out_a = segmentation_loss(pred_masks=pred_a, iou_scores=iou, labels=labels)
    out_a["loss"].backward()

    # the same two real queries plus two padded queries holding garbage
    g = torch.Generator().manual_seed(5)
    pad_pred = 100 * torch.randn(1, 2, 3, 16, 16, generator=g)
    pred_b = torch.cat([pred, pad_pred], dim=1).requires_grad_(True)
    iou_b = torch.cat([iou, 7 * torch.ones(1, 2, 3)], dim=1)
    labels_b = torch.cat([labels, torch.ones(1, 2, 16, 16)], dim=1)
    qmask = torch.tensor([[True, True, False, False]])
    out_b = segmentation_loss(pred_masks=pred_b, iou_scores=iou_b, labels=labels_b, query_mask=qmask)
    out_b["loss"].backward()
    for name in TERMS:
        torch.testing.assert_close(out_a[name], out_b[name])
    torch.testing.assert_close(pred_b.grad[:, :2], pred_a.grad)
    assert torch.all(pred_b.grad[:, 2:] == 0)


def test_all_padding_batch_is_finite_zero_with_zero_gradients():
    pred, iou, labels = random_batch()
    pred.requires_grad_(True)
    iou.requires_grad_(True)
    out = segmentation_loss(pred_masks=pred, iou_scores=iou, labels=labels, query_mask=torch.zeros(2, 3, dtype=torch.bool))
    for name in TERMS:
        assert out[name].item() == 0.0
    out["loss"].backward()
    assert torch.isfinite(pred.grad).all() and torch.all(pred.grad == 0)
    assert torch.isfinite(iou.grad).all() and torch.all(iou.grad == 0)
    # also with a zero global normalizer
    out = segmentation_loss(
        pred_masks=pred, iou_scores=iou, labels=labels, query_mask=torch.zeros(2, 3, dtype=torch.bool), num_queries=0
    )
    assert out["loss"].item() == 0.0


def test_empty_masks_give_finite_values_and_gradients():
    pred, iou, _ = random_batch()
    pred.requires_grad_(True)
    labels = torch.zeros(2, 3, 16, 16)
    out = segmentation_loss(pred_masks=pred, iou_scores=iou, labels=labels)
    for name in TERMS:
        assert torch.isfinite(out[name])
    assert out["boundary_loss"].item() == 0.0
    out["loss"].backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_shape_errors_are_reported():
    pred, iou, labels = random_batch()
    with pytest.raises(ValueError):
        segmentation_loss(pred_masks=pred, iou_scores=iou, labels=labels[:, :2])
    with pytest.raises(ValueError):
        segmentation_loss(pred_masks=pred[:, :, 0], iou_scores=iou, labels=labels)
    with pytest.raises(TypeError):
        segmentation_loss(pred, iou, labels)  # keyword-only


def test_step_normalizers_count_real_queries_and_images_of_every_micro_batch():
    first = {"query_mask": torch.tensor([[True, True, False], [True, False, False]])}
    second = {"query_mask": torch.tensor([[True, True, True, True]])}
    counts = step_normalizers([first, second])
    assert (int(counts["num_queries"]), int(counts["num_images"])) == (7, 3)
    assert counts["num_queries"].dtype == torch.int64
    doubled = step_normalizers([first, second], all_reduce_sum=lambda t: t * 2)  # two identical processes
    assert (int(doubled["num_queries"]), int(doubled["num_images"])) == (14, 6)


# ----------------------------------------------------------------------------- loss weighting

WEIGHTS = {"focal": 1.0, "dice": 1.0, "boundary": 0.5}


def losses(focal, dice, boundary):
    return {"focal": torch.tensor(focal), "dice": torch.tensor(dice), "boundary": torch.tensor(boundary)}


def test_fixed_returns_configured_weights_and_weighted_sum():
    w = build_loss_weighting("fixed", weights=WEIGHTS)
    assert isinstance(w, FixedLossWeighting)
    for step in range(20):
        w.update(losses(1.0 / (step + 1), 1.0, 2.0))
    assert w.weights == WEIGHTS
    total = w(losses(2.0, 3.0, 4.0))
    assert total.item() == pytest.approx(2.0 + 3.0 + 0.5 * 4.0)
    assert list(w.parameters()) == []


def test_forward_keeps_gradients_and_checks_names():
    w = build_loss_weighting("fixed", weights=WEIGHTS)
    x = torch.tensor(2.0, requires_grad=True)
    w({"focal": x, "dice": x * 2, "boundary": x, "extra": torch.tensor(99.0)}).backward()
    assert x.grad.item() == pytest.approx(1.0 + 2.0 + 0.5)
    with pytest.raises(KeyError):
        w({"focal": x})


def test_forward_scales_each_term_and_the_regularizer():
    # What the trainer calls: alpha / beta per term, and the micro-batch's share of the regularizer.
    scales = {"focal": 0.9, "dice": 0.9, "boundary": 0.1}
    fixed = build_loss_weighting("fixed", weights=WEIGHTS)
    total = fixed(losses(2.0, 3.0, 4.0), scales=scales, regularizer_scale=0.25)
    assert total.item() == pytest.approx(0.9 * 2.0 + 0.9 * 3.0 + 0.1 * 0.5 * 4.0)
    with pytest.raises(KeyError):
        fixed(losses(2.0, 3.0, 4.0), scales={"focal": 1.0})
    uncertainty = UncertaintyWeighting(WEIGHTS)
    with torch.no_grad():
        uncertainty.log_variances.copy_(torch.tensor([0.5, -0.5, 0.0]))
    total = uncertainty(losses(2.0, 3.0, 4.0), scales=scales, regularizer_scale=0.25)
    expected = 0.9 * math.exp(-0.5) * 2.0 + 0.9 * math.exp(0.5) * 3.0 + 0.1 * 0.5 * 4.0 + 0.25 * (0.5 - 0.5 + 0.0)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    # regularizer_scale weights the log-variances' own gradient (1 per term at scale 1).
    uncertainty.zero_grad()
    uncertainty(losses(0.0, 0.0, 0.0), regularizer_scale=0.25).backward()
    torch.testing.assert_close(uncertainty.log_variances.grad, torch.full((3,), 0.25))


def test_dwa_upweights_the_loss_that_decreases_slower():
    w = build_loss_weighting(
        "dwa", names=["slow", "fast"], adaptive_update_freq=5, smoothing_factor=0.5, dwa_temperature=0.5
    )
    assert isinstance(w, DynamicWeightAverage)
    assert w.weights == {"slow": 1.0, "fast": 1.0}
    for step in range(5):
        w.update({"slow": 1.0, "fast": 0.8**step})
    assert w.weights == {"slow": 1.0, "fast": 1.0}  # first refresh only stores the reference averages
    for step in range(5, 30):
        w.update({"slow": 1.0, "fast": 0.8**step})
    factors = w.factors
    assert factors["slow"] > 1.0 > factors["fast"]
    assert sum(factors.values()) == pytest.approx(2.0)  # weights sum to the number of tasks


def test_dwa_hand_computed_factors_and_base_weights():
    w = DynamicWeightAverage({"a": 2.0, "b": 1.0}, update_freq=1, smoothing_factor=0.0, temperature=2.0)
    w.update({"a": 1.0, "b": 1.0})
    w.update({"a": 1.0, "b": 0.5})  # ratios 1.0 and 0.5
    ea, eb = torch.exp(torch.tensor(0.5)), torch.exp(torch.tensor(0.25))
    expected_a = float(2 * ea / (ea + eb))
    assert w.factors["a"] == pytest.approx(expected_a)
    assert w.factors["b"] == pytest.approx(2 - expected_a)
    assert w.weights["a"] == pytest.approx(2.0 * expected_a)  # applied weight = base * factor
    total = w({"a": torch.tensor(1.0), "b": torch.tensor(1.0)})
    assert total.item() == pytest.approx(2.0 * expected_a + (2 - expected_a))


def test_dwa_only_refreshes_every_update_freq_steps():
    w = DynamicWeightAverage({"a": 1.0, "b": 1.0}, update_freq=3, smoothing_factor=0.0)
    history = []
    for step in range(9):
        w.update({"a": 1.0, "b": 0.5**step})
        history.append(w.factors["a"])
    # refreshes at updates 3 (reference only), 6 and 9
    assert history[:6] == [1.0] * 5 + [history[5]] and history[5] > 1.0
    assert history[6] == history[7] == history[5]


def test_dwa_state_round_trip_resumes_exactly():
    def run(w, start, stop):
        for step in range(start, stop):
            w.update({"a": 1.0 + 0.1 * step, "b": 0.9**step})

    config = dict(update_freq=4, smoothing_factor=0.9, temperature=1.0)
    reference = DynamicWeightAverage({"a": 1.0, "b": 0.5}, **config)
    run(reference, 0, 30)
    first = DynamicWeightAverage({"a": 1.0, "b": 0.5}, **config)
    run(first, 0, 13)
    state = first.state_dict()
    resumed = DynamicWeightAverage({"a": 1.0, "b": 0.5}, **config)
    resumed.load_state_dict(state)
    run(resumed, 13, 30)
    assert resumed.weights == reference.weights
    assert torch.equal(resumed.smoothed, reference.smoothed)
    assert int(resumed.num_updates) == 30


def test_dwa_ignores_non_finite_updates():
    w = DynamicWeightAverage({"a": 1.0}, update_freq=1)
    w.update({"a": 1.0})
    w.update({"a": float("nan")})
    assert int(w.num_updates) == 1 and torch.isfinite(w.smoothed).all()


def test_uncertainty_gradients_move_log_variances_the_expected_way():
    w = build_loss_weighting("uncertainty", names=["big", "small"])
    assert isinstance(w, UncertaintyWeighting)
    params = list(w.parameters())
    assert len(params) == 1 and params[0].shape == (2,)
    optimizer = torch.optim.SGD(params, lr=0.01)
    total = w({"big": torch.tensor(10.0), "small": torch.tensor(0.1)})
    # total = exp(-s) L + s at s = 0
    assert total.item() == pytest.approx(10.1)
    total.backward()
    torch.testing.assert_close(w.log_variances.grad, torch.tensor([1 - 10.0, 1 - 0.1]))
    optimizer.step()
    s_big, s_small = w.log_variances.tolist()
    assert s_big > 0 > s_small  # large loss -> larger variance -> smaller weight
    assert w.weights["big"] < 1.0 < w.weights["small"]


def test_uncertainty_converges_to_log_loss():
    w = UncertaintyWeighting({"a": 1.0})
    optimizer = torch.optim.SGD(w.parameters(), lr=0.1)
    for _ in range(300):
        optimizer.zero_grad()
        w({"a": torch.tensor(4.0)}).backward()
        optimizer.step()
    assert w.log_variances.item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=1e-3)


def test_uncertainty_state_round_trip():
    w = UncertaintyWeighting(WEIGHTS)
    with torch.no_grad():
        w.log_variances.copy_(torch.tensor([0.3, -0.2, 1.0]))
    restored = UncertaintyWeighting(WEIGHTS)
    restored.load_state_dict(w.state_dict())
    assert restored.weights == w.weights
    batch = losses(1.0, 2.0, 3.0)
    assert restored(batch).item() == w(batch).item()


def test_fixed_state_round_trip_and_bad_strategy():
    w = FixedLossWeighting(WEIGHTS)
    restored = FixedLossWeighting({"focal": 0.0, "dice": 0.0, "boundary": 0.0})
    restored.load_state_dict(w.state_dict())
    assert restored.weights == WEIGHTS
    with pytest.raises(ValueError):
        build_loss_weighting("gradnorm", weights=WEIGHTS)
    with pytest.raises(ValueError):
        FixedLossWeighting({"a": -1.0})
