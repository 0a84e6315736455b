import math

import pytest
import torch

from modeling_efficientsam.training.distillation import (
    attention_distillation_loss,
    bernoulli_kl_with_logits,
    feature_distillation_loss,
    image_embedding_distillation_loss,
    mask_distillation_loss,
)


def masks(batch=2, queries=3, candidates=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(batch, queries, candidates, size, size, generator=g)


def attention(batch=2, queries=3, heads=2, tokens=4, positions=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(batch, queries, heads, tokens, positions, generator=g), dim=-1)


QMASK = torch.tensor([[True, True, False], [True, False, False]])


# ----------------------------------------------------------------------------- soft-label KD


def test_mask_kd_is_exactly_zero_for_identical_logits_and_positive_otherwise():
    teacher = masks()
    scores = torch.rand(2, 3, 3)
    for temperature in (1.0, 2.5, 4.0):
        same = mask_distillation_loss(
            student_masks=teacher.clone(), teacher_masks=teacher, query_mask=QMASK, temperature=temperature,
            student_iou_scores=scores.clone(), teacher_iou_scores=scores,
        )
        assert same["mask_kd_loss"].item() == 0.0
        assert same["iou_kd_loss"].item() == 0.0
        diff = mask_distillation_loss(
            student_masks=teacher + 0.1 * torch.randn_like(teacher), teacher_masks=teacher, query_mask=QMASK,
            temperature=temperature, student_iou_scores=scores + 0.1, teacher_iou_scores=scores,
        )
        assert diff["mask_kd_loss"].item() > 0
        assert diff["iou_kd_loss"].item() == pytest.approx(0.01, rel=1e-5)


def test_mask_kd_hand_value_with_temperature():
    # teacher p = 0.5, student q = 0.75 after dividing by T: KL = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.5 ln(4/3)
    kl = 0.5 * math.log(4 / 3)
    for temperature in (1.0, 2.0):
        student = torch.full((1, 1, 3, 2, 2), temperature * math.log(3.0))
        teacher = torch.zeros(1, 1, 3, 2, 2)
        out = mask_distillation_loss(student_masks=student, teacher_masks=teacher, temperature=temperature)
        assert out["mask_kd_loss"].item() == pytest.approx(temperature**2 * kl, rel=1e-5)
    elementwise = bernoulli_kl_with_logits(teacher_logits=torch.zeros(1), student_logits=torch.tensor([math.log(3)]))
    assert elementwise.item() == pytest.approx(kl, rel=1e-6)


def test_mask_kd_is_per_pixel_not_a_softmax_over_rows():
    # A row-softmax KD cannot see a constant shift of a whole row; a per-pixel Bernoulli KD must.
    teacher = masks(batch=1, queries=1)
    student = teacher.clone()
    student[..., 3, :] += 2.0
    out = mask_distillation_loss(student_masks=student, teacher_masks=teacher)
    assert out["mask_kd_loss"].item() > 1e-3


def test_mask_kd_distills_every_candidate():
    teacher = masks(batch=1, queries=1)
    for candidate in range(3):
        student = teacher.clone()
        student[:, :, candidate] += 1.0
        assert mask_distillation_loss(student_masks=student, teacher_masks=teacher)["mask_kd_loss"].item() > 0


def test_mask_kd_gradient_reaches_student_only():
    teacher = masks().requires_grad_(True)
    student = masks(seed=1).requires_grad_(True)
    out = mask_distillation_loss(student_masks=student, teacher_masks=teacher, temperature=2.0)
    out["mask_kd_loss"].backward()
    assert teacher.grad is None
    assert student.grad.abs().sum() > 0


def test_mask_kd_padding_normalizer_and_all_padding():
    teacher, student = masks(), masks(seed=1)
    base = mask_distillation_loss(student_masks=student, teacher_masks=teacher, query_mask=QMASK)["mask_kd_loss"]
    # garbage in padded queries changes nothing
    student2 = student.clone()
    student2[~QMASK] = 1e4
    same = mask_distillation_loss(student_masks=student2, teacher_masks=teacher, query_mask=QMASK)["mask_kd_loss"]
    torch.testing.assert_close(same, base)
    # normalizer: 3 real queries locally; doubling it halves the loss
    doubled = mask_distillation_loss(student_masks=student, teacher_masks=teacher, query_mask=QMASK, num_queries=6)
    torch.testing.assert_close(doubled["mask_kd_loss"], base / 2)
    # all padding: finite zero, zero gradients
    student.requires_grad_(True)
    out = mask_distillation_loss(
        student_masks=student, teacher_masks=teacher, query_mask=torch.zeros(2, 3, dtype=torch.bool),
        student_iou_scores=torch.rand(2, 3, 3), teacher_iou_scores=torch.rand(2, 3, 3),
    )
    assert out["mask_kd_loss"].item() == 0.0 and out["iou_kd_loss"].item() == 0.0
    out["mask_kd_loss"].backward()
    assert torch.isfinite(student.grad).all() and torch.all(student.grad == 0)


def test_mask_kd_argument_checks():
    teacher = masks()
    with pytest.raises(ValueError):
        mask_distillation_loss(student_masks=teacher, teacher_masks=teacher, temperature=0.0)
    with pytest.raises(ValueError):
        mask_distillation_loss(student_masks=teacher[:, :2], teacher_masks=teacher)
    with pytest.raises(ValueError):
        mask_distillation_loss(student_masks=teacher, teacher_masks=teacher, student_iou_scores=torch.rand(2, 3, 3))
    with pytest.raises(TypeError):
        mask_distillation_loss(teacher, teacher)


# ----------------------------------------------------------------------------- feature KD


def test_feature_distillation_hand_value_masking_and_zero():
    teacher = torch.ones(2, 3, 5, 4)
    student = torch.zeros(2, 3, 5, 4)
    student[1, 2] = 1e6  # padded query: ignored
    value = feature_distillation_loss(student_features=student, teacher_features=teacher, query_mask=QMASK)
    assert value.item() == pytest.approx(1.0)  # each real query: mean((0 - 1)^2) = 1; 3 queries / 3
    assert feature_distillation_loss(
        student_features=student, teacher_features=teacher, query_mask=QMASK, num_queries=12
    ).item() == pytest.approx(0.25)
    assert feature_distillation_loss(student_features=teacher.clone(), teacher_features=teacher, query_mask=QMASK).item() == 0.0
    empty = feature_distillation_loss(
        student_features=student, teacher_features=teacher, query_mask=torch.zeros(2, 3, dtype=torch.bool)
    )
    assert empty.item() == 0.0


def test_feature_distillation_on_upscaled_embeddings_shape():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(1, 2, 4, 16, 16, generator=g)
    student = (teacher + 0.5).requires_grad_(True)
    value = feature_distillation_loss(student_features=student, teacher_features=teacher)
    assert value.item() == pytest.approx(0.25, rel=1e-5)
    value.backward()
    assert student.grad.abs().sum() > 0


def test_image_embedding_distillation():
    teacher = torch.zeros(2, 4, 3, 3)
    student = torch.zeros(2, 4, 3, 3)
    student[0] = 2.0  # image 0: MSE 4, image 1: MSE 0
    assert image_embedding_distillation_loss(student_embeddings=student, teacher_embeddings=teacher).item() == pytest.approx(2.0)
    assert image_embedding_distillation_loss(
        student_embeddings=student, teacher_embeddings=teacher, num_images=4
    ).item() == pytest.approx(1.0)
    assert image_embedding_distillation_loss(student_embeddings=teacher, teacher_embeddings=teacher).item() == 0.0


# ----------------------------------------------------------------------------- attention KD


def test_attention_kd_hand_value():
    teacher = torch.tensor([0.5, 0.5]).reshape(1, 1, 1, 1, 2)
    student = torch.tensor([0.25, 0.75]).reshape(1, 1, 1, 1, 2)
    value = attention_distillation_loss(student_attentions=student, teacher_attentions=teacher)
    assert value.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)
    # direction: KL(teacher || student), not the reverse
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert value.item() != pytest.approx(reverse, rel=1e-3)


def test_attention_kd_zero_positive_masking_and_layers():
    teacher = attention()
    same = attention_distillation_loss(student_attentions=teacher.clone(), teacher_attentions=teacher, query_mask=QMASK)
    assert same.item() == 0.0
    student = attention(seed=1)
    value = attention_distillation_loss(student_attentions=student, teacher_attentions=teacher, query_mask=QMASK)
    assert value.item() > 0
    # padded queries do not count
    student2 = student.clone()
    student2[~QMASK] = attention(seed=9)[~QMASK]
    torch.testing.assert_close(
        attention_distillation_loss(student_attentions=student2, teacher_attentions=teacher, query_mask=QMASK), value
    )
    # several layers: average of the per-layer losses
    layered = attention_distillation_loss(
        student_attentions=[student, teacher], teacher_attentions=[teacher, teacher], query_mask=QMASK
    )
    torch.testing.assert_close(layered, value / 2)
    # all padding: finite zero with zero gradient
    student.requires_grad_(True)
    empty = attention_distillation_loss(
        student_attentions=student, teacher_attentions=teacher, query_mask=torch.zeros(2, 3, dtype=torch.bool)
    )
    assert empty.item() == 0.0
    empty.backward()
    assert torch.isfinite(student.grad).all() and torch.all(student.grad == 0)


def test_attention_kd_survives_zero_probabilities():
    teacher = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 1, 2)
    student = torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 1, 2).requires_grad_(True)
    value = attention_distillation_loss(student_attentions=student, teacher_attentions=teacher)
    assert torch.isfinite(value) and value.item() > 0
    value.backward()
    assert torch.isfinite(student.grad).all()
