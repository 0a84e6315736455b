"""Distillation inside EfficientSamTrainer: every term acts, the teacher is really used and left alone,
and the schedules reach the logs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from modeling_efficientsam.training import DistillationSchedule
from modeling_efficientsam.training.distillation import DISTILLATION_TERMS
from conftest import first_batch, make_trainer, tiny_dataset, tiny_model

KD_TERMS_PIXELS = ("mask_kd_loss", "iou_kd_loss", "token_feature_loss", "upscaled_feature_loss", "embedding_kd_loss",
                   "attention_kd_loss")


def distinct_teacher(seed: int = 5):
    """A tiny teacher (wider encoder) whose masks and IoU scores are far from a fresh student's.

    Freshly initialized models predict logits near 0 everywhere, so their soft masks nearly agree;
    scaling the last layers of the mask and IoU heads gives the teacher confident, different outputs.
    """
    teacher = tiny_model(seed=seed, encoder_width=48)
    with torch.no_grad():
        for mlp in list(teacher.mask_decoder.output_hypernetworks_mlps) + [teacher.mask_decoder.iou_prediction_head]:
            last = [m for m in mlp.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.weight.mul_(50.0)
            last.bias.add_(0.5)
    return teacher


def _spy(module):
    """Record the keyword arguments of every forward call of ``module``."""
    calls = []
    handle = module.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)
    return calls, handle


def test_distillation_terms_vanish_for_an_identical_teacher_and_not_otherwise(tmp_path, synthetic_pcb_dataset):
    student = tiny_model(seed=0)
    batch = first_batch(synthetic_pcb_dataset)
    same = make_trainer(tmp_path / "same", synthetic_pcb_dataset, model=student, teacher=copy.deepcopy(student))
    assert set(same.loss_weighting.names) >= set(KD_TERMS_PIXELS)  # encoder trained: embedding KD is on too
    with torch.no_grad():
        terms, _ = same.compute_loss_terms(student, batch)
    for name in KD_TERMS_PIXELS:
        assert abs(float(terms[name])) < 1e-6, name

    other = make_trainer(tmp_path / "other", synthetic_pcb_dataset, model=student, teacher=distinct_teacher(5))
    with torch.no_grad():
        terms, _ = other.compute_loss_terms(student, batch)
    for name in KD_TERMS_PIXELS:
        assert float(terms[name]) > 1e-4, name


def test_frozen_encoder_has_no_embedding_term(tmp_path, synthetic_pcb_dataset):
    trainer = make_trainer(tmp_path, synthetic_pcb_dataset, model=tiny_model(freeze_encoder=True), teacher=tiny_model(seed=3))
    assert "embedding_kd_loss" not in trainer.loss_weighting.names
    assert {"mask_kd_loss", "attention_kd_loss", "token_feature_loss"} <= set(trainer.loss_weighting.names)
    off = make_trainer(tmp_path / "off", synthetic_pcb_dataset, teacher=tiny_model(seed=3), feature_distillation=False,
                       attention_distillation=False)
    assert set(off.loss_weighting.names) & set(DISTILLATION_TERMS) == {"mask_kd_loss", "iou_kd_loss"}


@pytest.mark.parametrize("term", KD_TERMS_PIXELS)
def test_each_distillation_term_changes_the_student_gradient(tmp_path, synthetic_pcb_dataset, term):
    student = tiny_model(seed=0)
    trainer = make_trainer(tmp_path, synthetic_pcb_dataset, model=student, teacher=distinct_teacher(5),
                           alpha_start=0.5, alpha_end=0.5, beta_start=0.5, beta_end=0.5)
    batch = first_batch(synthetic_pcb_dataset)
    names = trainer.loss_weighting.names
    base = trainer.loss_weighting.base_weights

    def gradient(weight: float) -> torch.Tensor:
        with torch.no_grad():
            for index, name in enumerate(names):
                if name in DISTILLATION_TERMS:
                    base[index] = weight if name == term else 0.0
        student.zero_grad()
        trainer.compute_loss(student, batch).backward()
        return torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])

    without, with_term = gradient(0.0), gradient(1.0)
    assert without.shape == with_term.shape
    assert (with_term - without).norm() > 1e-6 * max(1.0, float(without.norm()))


def test_teacher_runs_its_own_encoder_on_the_students_prompts(tmp_path, synthetic_pcb_dataset):
    student, teacher = tiny_model(seed=0), distinct_teacher(7)
    trainer = make_trainer(tmp_path, synthetic_pcb_dataset, model=student, teacher=teacher)
    batch = first_batch(synthetic_pcb_dataset, box_noise_scale=0.3)
    teacher_calls, teacher_hook = _spy(trainer.teacher)
    student_calls, student_hook = _spy(student)
    with torch.no_grad():
        trainer.compute_loss_terms(student, batch)
    teacher_hook.remove(), student_hook.remove()
    (seen,), (student_seen,) = teacher_calls, student_calls
    # Pixels of the image, its own encoder (not the student's embeddings), and exactly the student's
    # (jittered) prompts.
    assert seen.get("image_embeddings") is None and torch.equal(seen["pixel_values"], batch["pixel_values"])
    assert torch.equal(seen["input_points"], student_seen["input_points"]) and torch.equal(seen["input_labels"], batch["input_labels"])
    exact = first_batch(synthetic_pcb_dataset, box_noise_scale=0.0)["input_points"]
    assert not torch.allclose(seen["input_points"], exact)  # jitter included
    with torch.no_grad():
        own = teacher.get_image_embeddings(batch["pixel_values"])
        out = teacher(pixel_values=batch["pixel_values"], input_points=batch["input_points"], input_labels=batch["input_labels"])
        students = student.get_image_embeddings(batch["pixel_values"])
    torch.testing.assert_close(out.image_embeddings, own)
    assert not torch.allclose(own, students)


def test_teacher_reads_its_own_cached_embeddings(tmp_path, synthetic_pcb_dataset):
    from modeling_efficientsam.data.embedding_cache import EmbeddingCacheReader, build_embedding_cache

    student, teacher = tiny_model(seed=0, freeze_encoder=True), distinct_teacher(7)
    caches = [build_embedding_cache(synthetic_pcb_dataset, model, dtype="float32", splits=["train"],
                                    cache_root=str(tmp_path / "cache")) for model in (student, teacher)]
    train = tiny_dataset(synthetic_pcb_dataset["train"], embedding_reader=EmbeddingCacheReader(caches, "train"))
    trainer = make_trainer(tmp_path, synthetic_pcb_dataset, model=student, teacher=teacher, train=train)
    from modeling_efficientsam.data import EfficientSamCollator

    batch = EfficientSamCollator()([train[0], train[1]])
    assert "pixel_values" not in batch and not torch.allclose(batch["image_embeddings"], batch["teacher_image_embeddings"])
    teacher_calls, teacher_hook = _spy(trainer.teacher)
    student_calls, student_hook = _spy(student)
    with torch.no_grad():
        terms, _ = trainer.compute_loss_terms(student, batch)
    teacher_hook.remove(), student_hook.remove()
    assert torch.equal(teacher_calls[0]["image_embeddings"], batch["teacher_image_embeddings"])
    assert torch.equal(student_calls[0]["image_embeddings"], batch["image_embeddings"])
    assert torch.equal(teacher_calls[0]["input_points"], student_calls[0]["input_points"])
    with torch.no_grad():  # the cache holds what the teacher's encoder computes
        pixels = tiny_dataset(synthetic_pcb_dataset["train"])[0]["pixel_values"][None]
        torch.testing.assert_close(teacher.get_image_embeddings(pixels)[0], batch["teacher_image_embeddings"][0])
    assert float(terms["mask_kd_loss"]) > 0


def test_training_leaves_the_teacher_untouched(tmp_path, synthetic_pcb_dataset):
    student, teacher = tiny_model(seed=0), distinct_teacher(7)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = make_trainer(tmp_path, synthetic_pcb_dataset, model=student, teacher=teacher, max_steps=3, learning_rate=5e-2)
    trainer.train()
    assert not trainer.teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_logged_temperature_alpha_beta_follow_the_schedule(tmp_path, synthetic_pcb_dataset):
    # 6 training images, batch 2: 3 optimizer steps per epoch; 3 epochs; hold for 1 epoch, then decay.
    trainer = make_trainer(tmp_path, synthetic_pcb_dataset, teacher=distinct_teacher(7), num_train_epochs=3,
                           distill_warmup_epochs=1, max_temperature=4.0, min_temperature=1.0, alpha_start=0.9,
                           alpha_end=0.5, beta_start=0.1, beta_end=0.5, loss_weighting="dwa", adaptive_update_freq=2)
    trainer.train()
    schedule = DistillationSchedule(total_steps=9, steps_per_epoch=3, distill_warmup_epochs=1)
    logs = [entry for entry in trainer.state.log_history if "distill_temperature" in entry]
    assert [entry["step"] for entry in logs] == list(range(1, 10))
    for entry in logs:
        expected = schedule.state_at(entry["step"] - 1)  # the step's value, logged after the update
        assert entry["distill_temperature"] == pytest.approx(expected["temperature"])
        assert entry["distill_alpha"] == pytest.approx(expected["alpha"])
        assert entry["distill_beta"] == pytest.approx(expected["beta"])
        for name in trainer.loss_weighting.names:
            assert name in entry and f"weight_{name}" in entry
    temperatures = [entry["distill_temperature"] for entry in logs]
    assert temperatures[:3] == [4.0] * 3 and temperatures[-1] == pytest.approx(1.0) and temperatures[4] < 4.0
    weights = [entry["weight_mask_kd_loss"] for entry in logs]
    assert len(set(weights)) > 1  # DWA adapted the weights during the run


def test_incompatible_teacher_is_refused(tmp_path, synthetic_pcb_dataset):
    import json

    from modeling_efficientsam import EfficientSamConfig, EfficientSamModel
    from conftest import TINY_CONFIG

    config = json.loads(json.dumps(TINY_CONFIG))
    config["mask_decoder_config"]["num_attention_heads"] = 4
    teacher = EfficientSamModel(EfficientSamConfig(**config))
    with pytest.raises(ValueError, match="attention_distillation"):
        make_trainer(tmp_path, synthetic_pcb_dataset, teacher=teacher)
    trainer = make_trainer(tmp_path, synthetic_pcb_dataset, teacher=teacher, attention_distillation=False)
    assert "attention_kd_loss" not in trainer.loss_weighting.names


def test_training_loss_is_the_weighting_modules_total(tmp_path, synthetic_pcb_dataset):
    student = tiny_model(seed=0)
    trainer = make_trainer(tmp_path, synthetic_pcb_dataset, model=student, teacher=distinct_teacher(5),
                           loss_weighting="uncertainty", alpha_start=0.7, beta_start=0.2)
    names = trainer.loss_weighting.names
    with torch.no_grad():
        trainer.loss_weighting.log_variances.copy_(torch.linspace(-0.5, 0.5, len(names)))
    batch = first_batch(synthetic_pcb_dataset)
    with torch.no_grad():
        loss = trainer.compute_loss(student, batch)
        terms, _ = trainer.compute_loss_terms(student, batch)
    state = trainer.schedule_state()
    assert (state["alpha"], state["beta"]) == pytest.approx((0.7, 0.2))
    expected = 0.0
    for index, name in enumerate(names):
        s = float(trainer.loss_weighting.log_variances[index].detach())
        group = state["beta"] if name in DISTILLATION_TERMS else state["alpha"]
        expected += group * np.exp(-s) * float(trainer.loss_weighting.base_weights[index]) * float(terms[name]) + s
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert any(name in DISTILLATION_TERMS for name in names) and any(name not in DISTILLATION_TERMS for name in names)


def test_run_length_and_distillation_schedule_are_computed_once(tmp_path, synthetic_pcb_dataset, monkeypatch):
    built = []
    original = DistillationSchedule.from_training_arguments.__func__

    def counting(cls, args, **kwargs):
        built.append(kwargs)
        return original(cls, args, **kwargs)

    monkeypatch.setattr(DistillationSchedule, "from_training_arguments", classmethod(counting))
    trainer = make_trainer(tmp_path, synthetic_pcb_dataset, teacher=distinct_teacher(7), num_train_epochs=2,
                           gradient_accumulation_steps=2, per_device_train_batch_size=1)
    assert built == [{"total_steps": 1, "steps_per_epoch": 1}]  # placeholder until training starts
    trainer.train()
    # 6 images, batch 1, accumulation 2: 3 optimizer steps per epoch, 6 in all; one schedule for 12 micro-batches.
    assert built[1:] == [{"total_steps": 6, "steps_per_epoch": 3}]
    assert trainer.steps_per_epoch == 3 and trainer.distillation_schedule.total_steps == 6


# ------------------------------------------------------------------------------------------------
# Checkpoints of the loss weighting, and exact in-process resume
# ------------------------------------------------------------------------------------------------
