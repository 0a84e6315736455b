"""The model card's metadata: huggingface_hub ModelCardData / EvalResult that parse back with every metric."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard

from modeling_efficientsam.training.model_card import (
    LOCAL_DATASET_TYPE,
    build_model_card,
    hub_base_model,
    write_model_card,
)

BEFORE = {"eval_mean_iou": 0.1234, "eval_mean_category_iou": 0.1111, "eval_f1": 0.2, "eval_boundary_f1": 0.3,
          "eval_iou_pad": 0.05, "eval_iou_chip": 0.25}
AFTER = {"eval_mean_iou": 0.765432, "eval_mean_category_iou": 0.701, "eval_f1": 0.812, "eval_boundary_f1": 0.9251,
         "eval_iou_pad": 0.55, "eval_iou_chip": 0.875, "eval_num_instances": 12, "eval_loss": 1.5, "eval_runtime": 0.3}
SUMMARY = {"name": "me/pcb-parts", "hub_id": "me/pcb-parts", "revision": "v2", "evaluation_split": "valid",
           "splits": {"train": {"images": 3, "instances": 9}, "valid": {"images": 1, "instances": 12}},
           "categories": ["chip", "pad"]}


def _card(**overrides):
    arguments = dict(model_name="pcb-sam", repo_id="me/pcb-sam", base_model="org/efficientsam-vitt",
                     dataset_summary=SUMMARY, metrics_before=BEFORE, metrics_after=AFTER)
    arguments.update(overrides)
    text = build_model_card(**arguments)
    return text, ModelCard(text).data


def test_every_reported_metric_parses_back_with_its_value_task_and_dataset():
    text, data = _card()
    results = {(r.metric_type, r.metric_config): r for r in data.eval_results}
    expected = {("mean_iou", None): 0.765432, ("mean_category_iou", None): 0.701, ("f1", None): 0.812,
                ("boundary_f1", None): 0.9251, ("iou", "pad"): 0.55, ("iou", "chip"): 0.875}
    assert {key: r.metric_value for key, r in results.items()} == expected  # loss, runtime, counts stay out
    for result in data.eval_results:
        assert result.task_type == "mask-generation" and "Box-prompted" in result.task_name
        assert (result.dataset_type, result.dataset_name) == ("me/pcb-parts", "me/pcb-parts")
        assert (result.dataset_split, result.dataset_revision) == ("valid", "v2")
    assert results[("iou", "chip")].metric_name == "IoU (chip)"
    assert data.datasets == ["me/pcb-parts"] and data.base_model == "org/efficientsam-vitt"
    assert data.pipeline_tag == "mask-generation" and data.library_name == "transformers" and data.license == "apache-2.0"
    assert data.model_name == "pcb-sam"
    # the human-readable parts stay: before/after table on the evaluation split, data source, usage code
    assert "| Metric (valid) | Before fine-tuning | After fine-tuning |" in text
    assert "| mIoU (instance mean) | 0.1234 | 0.7654 |" in text and "| IoU: chip | 0.2500 | 0.8750 |" in text
    assert "https://huggingface.co/datasets/me/pcb-parts) at revision `v2`" in text
    assert 'repo_id = "me/pcb-sam"' in text and 'pipeline("mask-generation"' in text


def test_local_data_is_named_honestly_and_unmeasured_metrics_are_left_out():
    local = {"name": "pcb_sample", "splits": {"train": {"images": 3, "instances": 9}}, "categories": ["pad"]}
    after = {**AFTER, "eval_boundary_f1": float("nan"), "eval_ap": 0.42, "eval_ap50": 0.61}
    text, data = _card(dataset_summary=local, metrics_after=after, license=None)
    results = {(r.metric_type, r.metric_config): r.metric_value for r in data.eval_results}
    assert ("boundary_f1", None) not in results  # NaN: not a result
    assert results[("mask_ap", None)] == 0.42 and results[("mask_ap50", None)] == 0.61
    assert {(r.dataset_type, r.dataset_name, r.dataset_split) for r in data.eval_results} == {(LOCAL_DATASET_TYPE, "pcb_sample", "validation")}
    assert data.datasets is None and data.license is None
    assert "| mask AP | - | 0.4200 |" in text and "| Boundary F-score | 0.3000 | nan |" in text
    assert "mask AP75" not in text  # optional rows appear only when measured


def test_no_model_index_without_metrics_and_base_model_only_for_hub_ids(tmp_path, monkeypatch):
    _, data = _card(metrics_after=None, metrics_before=None)
    assert data.eval_results is None and "model-index" not in data.to_dict()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "efficientsam-vitt").mkdir(parents=True)
    _, data = _card(base_model="models/efficientsam-vitt")  # an existing local folder is no Hub id
    assert data.base_model is None
    _, data = _card(base_model="yunyangx/EfficientSAM/efficient_sam_vitt.pt")  # an original checkpoint on the Hub
    assert data.base_model == "yunyangx/EfficientSAM"
    _, data = _card(base_model=None)
    assert data.base_model is None
    assert [hub_base_model(name) for name in ("org/model", "/abs/model", "./model", "https://host/a/b", "a/b/c", "one")] == \
        ["org/model", None, None, None, None, None]


def test_write_model_card_reads_the_run(tmp_path):
    """write_model_card (what Trainer.create_model_card calls) puts the log history's last evaluation in the metadata."""
    history = [{"eval_mean_iou": 0.2, "step": 0}, {"loss": 1.0, "step": 1}, {**AFTER, "step": 2}]
    trainer = SimpleNamespace(
        args=SimpleNamespace(output_dir=str(tmp_path / "run"), hub_model_id="me/pcb-sam", save_decoder_only=False),
        state=SimpleNamespace(log_history=history, global_step=2, epoch=1.0, best_global_step=2),
        model=SimpleNamespace(config=SimpleNamespace(low_res_mask_size=16)),
        initial_metrics=BEFORE, hub_model_id=None,
        card_context={"base_model": "org/efficientsam-vitt", "recipe": {"learning_rate": 0.01}, "dataset_summary": SUMMARY},
    )
    path = write_model_card(trainer)
    data = ModelCard.load(path).data
    values = {(r.metric_type, r.metric_config): r.metric_value for r in data.eval_results}
    assert math.isclose(values[("mean_iou", None)], AFTER["eval_mean_iou"]) and values[("iou", "pad")] == 0.55
    assert data.datasets == ["me/pcb-parts"] and data.model_name == "pcb-sam"
    text = open(path, encoding="utf-8").read()
    assert "learning_rate: 0.01" in text
    # the versions a user needs to load it without this package (setup.cfg's floors, see test_demo.py)
    assert "transformers (>= 5.23), torch (>= 2.6)" in text


@pytest.mark.parametrize("name", ["me/pcb-sam", "pcb-sam"])
def test_card_parses_for_any_model_name(name):
    _, data = _card(model_name=name)
    assert data.model_name == name and len(data.eval_results) == 6
