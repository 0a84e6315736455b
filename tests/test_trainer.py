"""EfficientSamTrainer in process: loss normalization, evaluation, optimizers and schedules,
checkpoints of the loss weighting, decoder-only saving, model card, Hub push, TensorBoard output."""

from __future__ import annotations

import copy
import glob
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_efficientsam import EfficientSamConfig, EfficientSamModel, EfficientSamProcessor
from modeling_efficientsam.data import EfficientSamCollator
from modeling_efficientsam.training import (
    EfficientSamTrainer,
    build_model_card,
    load_decoder_on_base,
    save_decoder_only,
)
from modeling_efficientsam.training.dataset_building import build_datasets
from modeling_efficientsam.training.evaluation import (
    adjust_evaluation_arguments,
    final_metrics,
    load_initial_metrics,
    query_statistics,
    save_initial_metrics,
)
from modeling_efficientsam.training.losses import segmentation_loss
from modeling_efficientsam.training.model_building import build_student

from conftest import TINY_CONFIG, make_trainer, tiny_args, tiny_dataset, tiny_model  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Loss normalization
# ------------------------------------------------------------------------------------------------
def test_accumulation_two_by_one_equals_batch_of_two(tmp_path, synthetic_pcb_dataset):
    split = synthetic_pcb_dataset["train"].select([0, 1])
    data = tiny_dataset(split, max_objects=None, box_noise_scale=0.0)
    counts = [data[i]["labels"].shape[0] for i in range(2)]
    assert counts[0] != counts[1], "the test needs images with different numbers of objects"

    base = tiny_model()
    results = {}
    for name, batch, accumulation in (("joint", 2, 1), ("accumulated", 1, 2)):
        model = copy.deepcopy(base)
        trainer = make_trainer(tmp_path / name, synthetic_pcb_dataset, model=model, train=data,
                               per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=1,
                               optimizer="sgd", momentum=0.0, learning_rate=0.5, scheduler="trainer",
                               lr_scheduler_type="constant", max_grad_norm=0.0)
        trainer.train()
        results[name] = (model.state_dict(), trainer.state.log_history[0])
    (joint, joint_log), (accumulated, accumulated_log) = results["joint"], results["accumulated"]
    assert joint_log["loss"] == pytest.approx(accumulated_log["loss"], rel=1e-5)
    assert joint_log["focal_loss"] == pytest.approx(accumulated_log["focal_loss"], rel=1e-5)
    changed = 0
    for key in joint:
        torch.testing.assert_close(joint[key], accumulated[key], atol=2e-6, rtol=1e-5)
        changed += int(not torch.equal(joint[key], base.state_dict()[key]))
    assert changed > 10  # the step did move the weights

    # The naive alternative (mean per micro-batch, averaged over micro-batches) is measurably different.
    model = copy.deepcopy(base)
    collate = EfficientSamCollator()
    with torch.no_grad():
        def mean_loss(items):
            batch = collate(items)
            out = model(pixel_values=batch["pixel_values"], input_points=batch["input_points"], input_labels=batch["input_labels"])
            return segmentation_loss(pred_masks=out.pred_masks, iou_scores=out.iou_scores, labels=batch["labels"],
                                     query_mask=batch["query_mask"])["loss"]
        exact = mean_loss([data[0], data[1]])
        naive = (mean_loss([data[0]]) + mean_loss([data[1]])) / 2
    assert abs(float(exact) - float(naive)) > 1e-4
    assert joint_log["loss"] == pytest.approx(float(exact), rel=1e-5)


def test_a_trainer_that_would_scale_the_loss_again_is_refused(tmp_path, synthetic_pcb_dataset, monkeypatch):
    """transformers before `Trainer.loss_is_scaled_for_ga` divided every loss by the accumulation steps
    itself, which would shrink EfficientSAM's already normalized loss silently: refused, saying why."""
    from transformers import Trainer

    from modeling_efficientsam.hub_usage import MINIMUM_VERSIONS

    monkeypatch.delattr(Trainer, "loss_is_scaled_for_ga")
    floor = re.escape(f"transformers>={MINIMUM_VERSIONS['transformers']}")
    with pytest.raises(ImportError, match=rf"too old for EfficientSamTrainer.*{floor}"):
        make_trainer(tmp_path, synthetic_pcb_dataset, max_steps=1)


def test_padded_queries_do_not_change_the_loss(tmp_path, synthetic_pcb_dataset):
    trainer = make_trainer(tmp_path, synthetic_pcb_dataset)
    data = tiny_dataset(synthetic_pcb_dataset["train"], max_objects=None, box_noise_scale=0.0)
    alone = EfficientSamCollator()([data[0]])
    padded = EfficientSamCollator()([data[0], data[1]])
    if padded["query_mask"][0].all():
        padded = EfficientSamCollator()([data[1], data[0]])
        index = 1
    else:
        index = 0
    assert not padded["query_mask"][index].all()
    model = trainer.model.eval()
    with torch.no_grad():
        terms_alone, _ = trainer.compute_loss_terms(model, alone)
        only_first = {k: (v[index:index + 1] if torch.is_tensor(v) and v.shape[:1] == (2,) else v) for k, v in padded.items()}
        terms_padded, _ = trainer.compute_loss_terms(model, only_first)
    for name in terms_alone:
        assert float(terms_padded[name]) == pytest.approx(float(terms_alone[name]), rel=1e-5, abs=1e-7), name


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
def test_evaluation_metrics_are_deterministic_and_complete(tmp_path, synthetic_pcb_dataset):
    names = synthetic_pcb_dataset["train"].features["objects"].feature["category"].names
    evaluation = tiny_dataset(synthetic_pcb_dataset["validation"], box_noise_scale=0.0, max_objects=None)
    trainer = make_trainer(tmp_path, synthetic_pcb_dataset, evaluation=evaluation, id2label=dict(enumerate(names)))
    first = trainer.evaluate()
    second = trainer.evaluate()
    for key in ("eval_mean_iou", "eval_mean_category_iou", "eval_f1", "eval_boundary_f1", "eval_loss"):
        assert 0.0 <= first[key] <= (1.0 if key != "eval_loss" else 100.0), key
        assert first[key] == second[key], key
    per_category = [k for k in first if k.startswith("eval_iou_")]
    assert per_category and all(k[len("eval_iou_"):] in names for k in per_category)
    expected = sum(len([o for o in row if not o["iscrowd"]]) for row in synthetic_pcb_dataset["validation"]["objects"])
    assert first["eval_num_instances"] == expected
    assert trainer.initial_metrics == first  # evaluated at step 0: the "before" metrics
    assert json.loads((tmp_path / "eval_before_training.json").read_text())["eval_mean_iou"] == first["eval_mean_iou"]


def test_evaluation_keeps_the_candidate_with_the_highest_predicted_iou():
    labels = torch.zeros(1, 1, 8, 8)
    labels[0, 0, 2:6, 2:6] = 1
    masks = torch.full((1, 1, 3, 8, 8), -5.0)
    masks[0, 0, 1] = labels[0, 0] * 10 - 5  # candidate 1 is exact, the others empty
    inputs = {"labels": labels, "query_mask": torch.ones(1, 1, dtype=torch.bool), "category_ids": torch.tensor([[3]])}
    good = query_statistics(masks, torch.tensor([[[0.1, 0.9, 0.2]]]), inputs)
    bad = query_statistics(masks, torch.tensor([[[0.9, 0.1, 0.2]]]), inputs)
    assert good.shape == (1, 1, 10)
    assert good[0, 0, 0] == good[0, 0, 1] == 16  # intersection == union: IoU 1
    assert bad[0, 0, 0] == 0 and bad[0, 0, 1] == 16  # IoU 0
    assert good[0, 0, 8] == 3 and good[0, 0, 9] == 1  # category and real-query flag


def test_evaluation_arguments_follow_the_data_and_the_resume(tmp_path):
    no_validation = tiny_args(tmp_path, eval_strategy="epoch", save_strategy="epoch", eval_on_start=True,
                              load_best_model_at_end=True)
    adjust_evaluation_arguments(no_validation, has_validation=False)
    assert no_validation.eval_strategy == "no" and not no_validation.load_best_model_at_end and not no_validation.eval_on_start

    resumed = tiny_args(tmp_path, eval_on_start=True, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    adjust_evaluation_arguments(resumed, has_validation=True)
    assert resumed.eval_on_start  # the interrupted run never measured the "before" metrics
    assert load_initial_metrics(str(tmp_path)) is None
    save_initial_metrics(str(tmp_path), {"eval_mean_iou": 0.25})
    adjust_evaluation_arguments(resumed, has_validation=True)
    assert not resumed.eval_on_start and load_initial_metrics(str(tmp_path)) == {"eval_mean_iou": 0.25}


def test_build_datasets_evaluates_without_jitter(tmp_path, synthetic_pcb_dataset):
    from modeling_efficientsam.training import parse_efficientsam_args

    config_path = tmp_path / "tiny.json"
    config_path.write_text(json.dumps(TINY_CONFIG))
    model_args, data_args, training_args = parse_efficientsam_args([
        "--model_config", str(config_path), "--init_from_scratch", "true", "--dataset_path", "unused",
        "--output_dir", str(tmp_path / "o"), "--report_to", "none", "--box_noise_scale", "0.3", "--max_objects", "2",
    ])
    student, _ = build_student(model_args, training_args)
    train, evaluation, _ = build_datasets(synthetic_pcb_dataset, None, data_args, training_args, student)
    assert evaluation.box_noise_scale == 0.0 and evaluation.max_objects is None and train.box_noise_scale == 0.3
    row = synthetic_pcb_dataset["validation"][0]
    item = evaluation[0]
    exact = sorted(np.round(np.array(o["box"]) * np.array([64 / row["width"], 64 / row["height"]] * 2), 3).tolist() for o in row["objects"])
    got = sorted(np.round(item["input_points"].reshape(-1, 4).numpy(), 3).tolist())
    np.testing.assert_allclose(np.array(got), np.array(exact), atol=1e-3)
    train.set_epoch(0)
    first = train[0]["input_points"].clone()
    train.set_epoch(1)
    assert not torch.equal(first, train[0]["input_points"])  # training prompts change from epoch to epoch


# ------------------------------------------------------------------------------------------------
# Optimizers and learning-rate schedules
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_optimizer_choice(tmp_path, synthetic_pcb_dataset, name, cls):
    trainer = make_trainer(tmp_path, synthetic_pcb_dataset, optimizer=name, momentum=0.8, weight_decay=0.01)
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is cls
    if name == "sgd":
        assert optimizer.param_groups[0]["momentum"] == 0.8
    else:  # Adam and AdamW run fused on the training device (CPU here)
        assert optimizer.defaults["fused"] is True
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_adam_is_fused_only_on_devices_with_the_fused_kernels():
    from types import SimpleNamespace

    from modeling_efficientsam.training.optimization import optimizer_class_and_kwargs

    args = SimpleNamespace(optimizer="adamw", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, learning_rate=1e-3,
                           momentum=0.9)
    assert optimizer_class_and_kwargs(args, "cuda")[1]["fused"] is True
    assert "fused" not in optimizer_class_and_kwargs(args, "mps")[1]
    assert "fused" not in optimizer_class_and_kwargs(args, None)[1]  # parameters managed elsewhere (FSDP)


def _lrs(trainer, steps):
    trainer.create_optimizer()
    scheduler = trainer.create_scheduler(num_training_steps=steps)
    values = []
    for _ in range(steps):
        values.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        scheduler.step()
    return values


def test_schedulers(tmp_path, synthetic_pcb_dataset):
    lr = 1e-2
    cosine = make_trainer(tmp_path / "c", synthetic_pcb_dataset, scheduler="cosine", learning_rate=lr, min_lr=1e-4, warmup_epochs=1)
    cosine.steps_per_epoch = 5
    values = _lrs(cosine, 50)
    assert values[0] == 0.0 and values[4] < values[5] == pytest.approx(lr)  # 5 warm-up steps, then the peak
    assert 1e-4 <= values[-1] < 1.2e-4 and all(a >= b - 1e-12 for a, b in zip(values[5:], values[6:]))

    step = make_trainer(tmp_path / "s", synthetic_pcb_dataset, scheduler="step", learning_rate=lr, lr_decay_epochs=2, lr_decay_gamma=0.5)
    step.steps_per_epoch = 5
    values = _lrs(step, 30)
    assert values[9] == pytest.approx(lr) and values[10] == pytest.approx(lr / 2) and values[20] == pytest.approx(lr / 4)

    onecycle = make_trainer(tmp_path / "o", synthetic_pcb_dataset, scheduler="onecycle", learning_rate=lr, min_lr=1e-6)
    onecycle.steps_per_epoch = 10
    values = _lrs(onecycle, 40)
    peak = int(np.argmax(values))
    assert values[0] == pytest.approx(lr / 25) and values[peak] == pytest.approx(lr, rel=1e-3) and 5 < peak < 20
    assert values[-1] < 1e-4

    # Epoch-based lengths need the steps per epoch, which only training knows; no guessing before it.
    early = make_trainer(tmp_path / "e", synthetic_pcb_dataset, scheduler="cosine", warmup_epochs=1)
    early.create_optimizer()
    with pytest.raises(ValueError, match="steps per epoch"):
        early.create_scheduler(num_training_steps=10)


@pytest.mark.parametrize("weighting", ["dwa", "uncertainty"])
def test_loss_weighting_state_is_checkpointed_and_resumed(tmp_path, synthetic_pcb_dataset, weighting):
    common = dict(loss_weighting=weighting, adaptive_update_freq=1, smoothing_factor=0.5, max_steps=4,
                  save_strategy="steps", save_steps=2, num_train_epochs=2, learning_rate=5e-2)
    base = tiny_model()
    full = make_trainer(tmp_path / "full", synthetic_pcb_dataset, model=copy.deepcopy(base), **common)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "loss_weighting.safetensors").is_file()
    resumed = make_trainer(tmp_path / "full", synthetic_pcb_dataset, model=copy.deepcopy(base), **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for key, value in full.loss_weighting.state_dict().items():
        torch.testing.assert_close(resumed.loss_weighting.state_dict()[key], value, rtol=1e-5, atol=1e-7)
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    weights = [entry["weight_dice_loss"] for entry in full.state.log_history if "weight_dice_loss" in entry]
    assert len(weights) == 4 and len(set(weights)) > 1  # logged every step, and they adapt
    if weighting == "uncertainty":
        parameters = {id(p) for group in full.optimizer.param_groups for p in group["params"]}
        assert id(full.loss_weighting.log_variances) in parameters
        assert full.loss_weighting.log_variances.abs().sum() > 0  # they were trained


def test_dataset_epoch_follows_the_optimizer_step(tmp_path, synthetic_pcb_dataset):
    from transformers import TrainerControl, TrainerState

    from modeling_efficientsam.training import DatasetEpochCallback

    train = tiny_dataset(synthetic_pcb_dataset["train"])
    trainer = make_trainer(tmp_path, synthetic_pcb_dataset, train=train, num_train_epochs=3)
    # The callback derives the epoch from the step counter, as a resumed run does (3 steps per epoch here).
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, DatasetEpochCallback))
    trainer.steps_per_epoch = 3
    state = TrainerState()
    for step, epoch in ((0, 0), (3, 1), (7, 2), (9, 3)):
        state.global_step = step
        callback.on_epoch_begin(trainer.args, state, TrainerControl())
        assert train.epoch == epoch
    train.set_epoch(0)
    trainer.train()
    assert trainer.steps_per_epoch == 3 and train.epoch == 2


# ------------------------------------------------------------------------------------------------
# Saving: from_pretrained folder, decoder-only weights, model card, Hub push, TensorBoard
# ------------------------------------------------------------------------------------------------
def test_decoder_only_round_trip(tmp_path):
    trained = tiny_model(seed=1)
    with torch.no_grad():
        for parameter in trained.mask_decoder.parameters():
            parameter.add_(0.1)
    save_decoder_only(trained, str(tmp_path / "decoder"), base_model="org/base")
    info = json.loads((tmp_path / "decoder" / "decoder_config.json").read_text())
    assert info["base_model"] == "org/base" and set(info["modules"]) == {"mask_decoder", "prompt_encoder"}
    base = tiny_model(seed=1)  # same encoder as `trained`, original decoder
    assert not torch.equal(base.mask_decoder.iou_token, trained.mask_decoder.iou_token)
    loaded = load_decoder_on_base(base, str(tmp_path / "decoder"))
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    other = tiny_model(seed=2)  # another encoder: refused when strict
    with pytest.raises(ValueError, match="image encoder differs"):
        load_decoder_on_base(other, str(tmp_path / "decoder"), strict_encoder=True)
    wrong = EfficientSamModel(EfficientSamConfig(**{**TINY_CONFIG, "mask_decoder_config": {**TINY_CONFIG["mask_decoder_config"], "mlp_dim": 32}}))
    with pytest.raises(ValueError, match="mask_decoder_config"):
        load_decoder_on_base(wrong, str(tmp_path / "decoder"))


def test_model_card_text():
    from huggingface_hub import ModelCard

    before = {"eval_mean_iou": 0.1234, "eval_f1": 0.2, "eval_iou_pad": 0.05}
    after = {"eval_mean_iou": 0.7654, "eval_f1": 0.8, "eval_iou_pad": 0.55, "eval_num_instances": 12}
    text = build_model_card(model_name="pcb-sam", repo_id="me/pcb-sam", base_model="org/efficientsam-vitt",
                            teacher_model="org/efficientsam-vits", recipe={"learning_rate": 1e-4},
                            dataset_summary={"splits": {"train": {"images": 3, "instances": 9}}, "categories": ["pad"]},
                            metrics_before=before, metrics_after=after, decoder_only=True)
    metadata = ModelCard(text).data  # the YAML front matter parses as Hub model-card metadata
    assert metadata.library_name == "transformers" and metadata.pipeline_tag == "mask-generation"
    assert {(r.metric_type, r.metric_value) for r in metadata.eval_results} == {("mean_iou", 0.7654), ("f1", 0.8), ("iou", 0.55)}
    assert "| mIoU (instance mean) | 0.1234 | 0.7654 |" in text and "| IoU: pad | 0.0500 | 0.5500 |" in text
    assert 'repo_id = "me/pcb-sam"' in text and "post_process_masks" in text and "trust_remote_code=True" in text
    assert "import modeling_efficientsam" not in text and "from modeling_efficientsam import" not in text
    assert "learning_rate: 0.0001" in text and "org/efficientsam-vits" in text and "load_decoder_on_base" in text
    assert "base_model: org/efficientsam-vitt" in text and "train`: 3 images, 9 objects" in text


def test_push_to_hub_uploads_a_loadable_folder_with_its_card(tmp_path, synthetic_pcb_dataset, monkeypatch):
    import transformers.trainer as trainer_module

    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Url", (), {"repo_id": f"me/{repo_id}"})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploads.append((repo_id, folder_path, sorted(os.listdir(folder_path)), (Path(folder_path) / "README.md").read_text()))
            return "commit"

    monkeypatch.setattr(trainer_module, "hf_api", lambda: FakeApi())
    evaluation = tiny_dataset(synthetic_pcb_dataset["validation"], box_noise_scale=0.0, max_objects=None)
    trainer = EfficientSamTrainer(
        model=tiny_model(), args=tiny_args(tmp_path / "pcb-sam", eval_strategy="epoch", eval_on_start=True),
        train_dataset=tiny_dataset(synthetic_pcb_dataset["train"]), eval_dataset=evaluation,
        processing_class=EfficientSamProcessor(), id2label={0: "ic"},
    )
    trainer.processor.image_processor.size = 64
    trainer.train()
    trainer.push_to_hub()
    (repo_id, folder, files, card) = uploads[0]
    assert repo_id == "me/pcb-sam"
    assert {"README.md", "config.json", "model.safetensors", "processor_config.json"} <= set(files)
    assert "Before fine-tuning" in card and f"{trainer.initial_metrics['eval_mean_iou']:.4f}" in card
    assert f"{final_metrics(trainer.state)['eval_mean_iou']:.4f}" in card
    reloaded = EfficientSamModel.from_pretrained(folder)
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert EfficientSamProcessor.from_pretrained(folder).size == 64


def test_tensorboard_gets_every_term_and_overlays(tmp_path, synthetic_pcb_dataset):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from modeling_efficientsam.training import TensorBoardOverlayCallback

    evaluation = tiny_dataset(synthetic_pcb_dataset["validation"], box_noise_scale=0.0, max_objects=None)
    trainer = make_trainer(tmp_path, synthetic_pcb_dataset, evaluation=evaluation, report_to="tensorboard",
                           eval_strategy="epoch")
    overlay = TensorBoardOverlayCallback(synthetic_pcb_dataset["validation"], image_size=64, mask_size=16, num_images=2)
    overlay.attach(trainer)
    trainer.train()
    assert len(overlay.last_images) == 2
    image = overlay.last_images[0]
    row = synthetic_pcb_dataset["validation"][0]
    assert image.shape == (row["height"], 2 * row["width"] + 4, 3) and image.dtype == np.uint8
    runs = glob.glob(str(tmp_path / "runs" / "*"))
    assert len(runs) == 1
    events = EventAccumulator(runs[0], size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for name in ("focal_loss", "dice_loss", "iou_loss", "boundary_loss", "iou_head_loss", "weight_focal_loss", "loss"):
        assert f"train/{name}" in scalars, name
    assert "eval/mean_iou" in scalars
    assert {"eval/overlay_0", "eval/overlay_1"} <= set(events.Tags()["images"])


def test_gradient_checkpointing_and_dataloader_workers_give_the_same_step(tmp_path, synthetic_pcb_dataset):
    base = tiny_model()
    states = {}
    for checkpointing, workers in ((False, 0), (True, 2)):
        model = copy.deepcopy(base)
        trainer = make_trainer(tmp_path / f"gc{checkpointing}", synthetic_pcb_dataset, model=model, max_steps=1,
                               activation_checkpointing=checkpointing, dataloader_num_workers=workers, optimizer="sgd",
                               momentum=0.0, learning_rate=1.0, max_grad_norm=0.0)
        trainer.train()
        assert model.vision_encoder.gradient_checkpointing is checkpointing
        states[checkpointing] = model.state_dict()
    for key, value in states[False].items():
        torch.testing.assert_close(states[True][key], value, atol=1e-6, rtol=1e-5)
    moved = [k for k in states[True] if k.startswith("vision_encoder.layers") and not torch.equal(states[True][k], base.state_dict()[k])]
    assert moved  # the checkpointed encoder still receives gradients
