"""Box-only data: explicit conversion (normal files keep their validation), has_mask through the
collator and normalizers, ground-truth terms masked out, distillation terms kept, a run that trains."""

from __future__ import annotations

import json

import pytest
import torch

from modeling_efficientsam.data import EfficientSamCollator, prepare_coco_dataset, read_report
from modeling_efficientsam.data.box_only import EfficientSamMixedTrainingDataset
from modeling_efficientsam.data.coco import CocoValidationError
from modeling_efficientsam.data.masks import decode_rle
from modeling_efficientsam.training.losses import step_normalizers

from conftest import make_trainer, tiny_dataset, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def boxes_only_json(synthetic_pcb_splits, tmp_path_factory):
    """The synthetic train file with every segmentation removed (bbox only), beside the same images."""
    annotations, images_dir = synthetic_pcb_splits["train"]
    document = json.loads(open(annotations).read())
    for annotation in document["annotations"]:
        del annotation["segmentation"]
    document["annotations"][0]["bbox"] = [-5.0, -5.0, 30.0, 30.0]  # reaches outside: clipped
    path = tmp_path_factory.mktemp("box_only") / "boxes.json"
    path.write_text(json.dumps(document))
    return path, images_dir, len(document["annotations"])


@pytest.fixture(scope="module")
def mixed_dataset(synthetic_pcb_splits, boxes_only_json, tmp_path_factory):
    path, images_dir, _ = boxes_only_json
    splits = {"train": synthetic_pcb_splits["train"], "box_only": (path, images_dir)}
    return prepare_coco_dataset(splits, tmp_path_factory.mktemp("mixed") / "dataset", box_only_splits=("box_only",))


def test_box_only_split_keeps_every_box_with_an_empty_mask(mixed_dataset, boxes_only_json):
    _, _, count = boxes_only_json
    objects = [obj for row in mixed_dataset["box_only"]["objects"] for obj in row]
    assert len(objects) == count
    assert all(decode_rle(obj["mask"]).sum() == 0 and obj["area"] == 0 for obj in objects)
    assert all(obj["box"][2] > obj["box"][0] and obj["box"][3] > obj["box"][1] for obj in objects)
    first = min(objects, key=lambda obj: obj["id"])
    assert first["box"][:2] == [0.0, 0.0]
    # the labelled split is untouched: real masks
    assert all(decode_rle(obj["mask"]).sum() > 0 for row in mixed_dataset["train"]["objects"] for obj in row)


def test_the_same_file_as_a_normal_split_is_still_validated(boxes_only_json, tmp_path):
    path, images_dir, count = boxes_only_json
    with pytest.raises(CocoValidationError, match="segmentation_missing"):
        prepare_coco_dataset({"train": (path, images_dir)}, tmp_path / "strict", strict=True)
    # without strict: every annotation dropped and counted, never kept with a made-up mask
    dataset = prepare_coco_dataset({"train": (path, images_dir)}, tmp_path / "lenient")
    assert sum(len(o) for o in dataset["train"]["objects"]) == 0
    report = read_report(tmp_path / "lenient")
    assert len(report["splits"]["train"]["dropped"]["segmentation_missing"]) == count
    with pytest.raises(ValueError, match="box_only_splits"):
        prepare_coco_dataset({"train": (path, images_dir)}, tmp_path / "typo", box_only_splits=("boxes",))


def test_box_only_annotation_needs_a_bbox(boxes_only_json, tmp_path):
    path, images_dir, _ = boxes_only_json
    document = json.loads(path.read_text())
    del document["annotations"][1]["bbox"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(document))
    with pytest.raises(CocoValidationError, match='needs a "bbox"'):
        prepare_coco_dataset({"box_only": (broken, images_dir)}, tmp_path / "out", box_only_splits=("box_only",))


def _mixed(mixed_dataset, **kwargs):
    return EfficientSamMixedTrainingDataset(tiny_dataset(mixed_dataset["train"], **kwargs),
                                            tiny_dataset(mixed_dataset["box_only"], **kwargs))


def test_has_mask_reaches_the_batch_and_the_normalizers(mixed_dataset):
    data = _mixed(mixed_dataset)
    labelled, boxed = data[0], data[len(data.labelled)]
    assert labelled["has_mask"].all() and not boxed["has_mask"].any() and boxed["labels"].sum() == 0
    batch = EfficientSamCollator()([labelled, boxed])
    assert batch["has_mask"].dtype == torch.bool and batch["has_mask"].shape == batch["query_mask"].shape
    assert int(batch["has_mask"].sum()) == labelled["labels"].shape[0]
    counts = step_normalizers([batch])
    assert int(counts["num_labelled_queries"]) == labelled["labels"].shape[0]
    assert int(counts["num_queries"]) == labelled["labels"].shape[0] + boxed["labels"].shape[0]
    assert "num_labelled_queries" not in step_normalizers([{"query_mask": batch["query_mask"]}])


def test_ground_truth_terms_ignore_box_only_queries_and_distillation_keeps_them(tmp_path, mixed_dataset):
    data = _mixed(mixed_dataset, box_noise_scale=0.0)
    labelled, boxed = data[0], data[len(data.labelled)]
    trainer = make_trainer(tmp_path, mixed_dataset, model=tiny_model(0), teacher=tiny_model(1).eval(), train=data)
    model = trainer.model.eval()
    mixed = EfficientSamCollator()([labelled, boxed])
    alone = EfficientSamCollator()([labelled, dict(labelled)])
    alone = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in alone.items()}
    with torch.no_grad():
        mixed_terms, _ = trainer.compute_loss_terms(model, mixed, temperature=1.0)
        alone_terms, _ = trainer.compute_loss_terms(model, {k: v for k, v in alone.items() if k != "has_mask"}, temperature=1.0)
        boxed_only = EfficientSamCollator()([boxed])
        boxed_terms, _ = trainer.compute_loss_terms(model, boxed_only, temperature=1.0)
    for name in ("focal_loss", "dice_loss", "iou_loss", "iou_head_loss"):
        # the box-only image changes nothing: same queries, same normalizer (labelled queries only)
        assert mixed_terms[name] == pytest.approx(float(alone_terms[name]), rel=1e-5), name
        assert float(boxed_terms[name]) == 0.0, name
    assert float(boxed_terms["mask_kd_loss"]) > 0 and float(mixed_terms["mask_kd_loss"]) > 0
    # the gradient of a box-only batch comes from the teacher's terms alone, and is not zero
    model.train()
    terms, _ = trainer.compute_loss_terms(model, boxed_only, temperature=1.0)
    trainer.weighted_loss(terms, {"temperature": 1.0, "alpha": 1.0, "beta": 1.0}).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mask_decoder.parameters())


def test_box_only_data_without_a_teacher_is_refused(tmp_path, mixed_dataset):
    with pytest.raises(ValueError, match="teacher"):
        make_trainer(tmp_path, mixed_dataset, train=_mixed(mixed_dataset))


def test_a_mixed_run_trains(tmp_path, mixed_dataset):
    data = _mixed(mixed_dataset)
    trainer = make_trainer(tmp_path, mixed_dataset, model=tiny_model(0), teacher=tiny_model(1).eval(), train=data,
                           max_steps=3)
    result = trainer.train()
    assert result.global_step == 3
    logged = [entry for entry in trainer.state.log_history if "mask_kd_loss" in entry]
    assert logged and all(entry["mask_kd_loss"] > -1e-6 and entry["focal_loss"] > 0 for entry in logged)


def test_recipe_fields_build_the_mixed_dataset(tmp_path, synthetic_pcb_splits, boxes_only_json):
    from modeling_efficientsam.training.arguments import DataArguments
    from modeling_efficientsam.training.dataset_building import build_datasets, prepare_dataset

    from conftest import tiny_args

    boxes, images_dir, count = boxes_only_json
    train, train_images = synthetic_pcb_splits["train"]
    data_args = DataArguments(train_annotations=str(train), train_images=str(train_images), box_only_annotations=str(boxes),
                              box_only_images=str(images_dir), prepared_dataset_dir=str(tmp_path / "prepared"))
    training_args = tiny_args(tmp_path)
    dataset, folder = prepare_dataset(data_args, training_args)
    assert set(dataset) == {"train", "box_only"}
    with pytest.raises(Exception, match="teacher"):
        build_datasets(dataset, folder, data_args, training_args, tiny_model(0))
    train_dataset, _, _ = build_datasets(dataset, folder, data_args, training_args, tiny_model(0), teacher=tiny_model(1))
    assert isinstance(train_dataset, EfficientSamMixedTrainingDataset)
    assert len(train_dataset) == len(dataset["train"]) + len(dataset["box_only"])
    with pytest.raises(ValueError, match="together"):
        DataArguments(train_annotations=str(train), train_images=str(train_images), box_only_annotations=str(boxes))
    with pytest.raises(ValueError, match="prompt_mode must be box"):
        DataArguments(train_annotations=str(train), train_images=str(train_images), box_only_annotations=str(boxes),
                      box_only_images=str(images_dir), prompt_mode="point")
