"""Prepared datasets through the Hub format, offline: the Parquet folder that prepare_dataset.py pushes
(with its dataset card and coco_categories.json), the one loader, and the tools that take a Hub dataset
(efficientsam-evaluate, train.py's dataset_name). The Hub is a local folder: HfApi.create_repo /
upload_folder write into it, hf_hub_download and load_dataset of a repo id read from it."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import datasets
import huggingface_hub
import pytest
import yaml
from huggingface_hub import DatasetCard, ModelCard

from modeling_efficientsam.data import (
    CATEGORIES_FILE,
    conversion_metadata,
    dataset_categories,
    format_conversion_summary,
    load_prepared_dataset,
    save_hub_format,
)

from conftest import TINY_CONFIG, tiny_args, tiny_model, tiny_processor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_REAL_LOAD_DATASET = datasets.load_dataset


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """load_dataset's Arrow copies go to the test's folder, not the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """HfApi.create_repo / upload_folder write to ``hub.root / repo_id``; a repo id loads from there."""
    hub = SimpleNamespace(root=tmp_path / "hub", created=[], commits=[], downloads=[], loads=[])

    def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, **kwargs):
        hub.created.append({"repo_id": repo_id, "repo_type": repo_type, "private": private, "exist_ok": exist_ok})
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, delete_patterns=None, **kwargs):
        target = hub.root / repo_id
        for pattern in delete_patterns or []:
            for stale in target.glob(pattern):
                stale.unlink()
        shutil.copytree(folder_path, target, dirs_exist_ok=True)
        hub.commits.append({"repo_id": repo_id, "repo_type": repo_type, "files": sorted(
            str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())})
        return "commit"

    def hf_hub_download(repo_id, filename, *, repo_type=None, revision=None, **kwargs):
        hub.downloads.append((repo_id, filename, repo_type, revision))
        path = hub.root / repo_id / filename
        if not path.exists():
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    def load_dataset(path, *args, revision=None, **kwargs):
        if not os.path.isdir(path):
            hub.loads.append((path, revision))
            if not (hub.root / path).is_dir():
                raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")
            path = str(hub.root / path)
        return _REAL_LOAD_DATASET(path, *args, **kwargs)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return hub


@pytest.fixture(scope="module")
def parts_coco(tmp_path_factory, coco_writer):
    """Two images, three annotations: one dropped (no segmentation), one repaired (box past the image side);
    category id 0 (a placeholder, as Roboflow exports have) has no object."""
    from PIL import Image

    directory = tmp_path_factory.mktemp("parts_coco")
    images = [{"id": 1, "file_name": "a.png", "image": Image.new("RGB", (40, 30), (90, 90, 90))},
              {"id": 2, "file_name": "b.png", "image": Image.new("RGB", (40, 30), (20, 120, 60))}]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10], "iscrowd": 0, "area": 100,
         "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 5, 5, 5], "iscrowd": 0, "area": 25, "segmentation": []},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [20, 10, 25, 10], "iscrowd": 0, "area": 200,
         "segmentation": [[20, 10, 40, 10, 40, 20, 20, 20]]},
    ]
    categories = [{"id": 0, "name": "placeholder"}, {"id": 1, "name": "part"}, {"id": 2, "name": "chip"}]
    return coco_writer(directory, images, annotations, categories=categories)


@pytest.fixture(scope="module")
def pcb_hub_folder(synthetic_pcb_dataset, tmp_path_factory):
    return Path(save_hub_format(synthetic_pcb_dataset, tmp_path_factory.mktemp("pcb_hub") / "pcb", repo_id="me/pcb"))


def _prepare_main(argv):
    spec = importlib.util.spec_from_file_location("prepare_dataset_cli", REPO / "data" / "prepare_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        status = module.main(argv)
    return status, out.getvalue(), err.getvalue()


def _rows(split):
    """Every column, images as their stored bytes."""
    return split.cast_column("image", datasets.Image(decode=False)).to_list()


# ------------------------------------------------------------------------------------------------
# The Hub form and the loader
# ------------------------------------------------------------------------------------------------
def test_hub_form_round_trip_keeps_rows_and_metadata(synthetic_pcb_dataset, pcb_hub_folder, tmp_path):
    assert sorted(p.name for p in pcb_hub_folder.iterdir()) == ["README.md", CATEGORIES_FILE, "data", "report.json"]
    assert sorted(p.name for p in (pcb_hub_folder / "data").iterdir()) == [
        "train-00000-of-00001.parquet", "validation-00000-of-00001.parquet"]
    # What plain load_dataset keeps: the rows and the ClassLabel names, but not the description that held the ids.
    plain = _REAL_LOAD_DATASET(str(pcb_hub_folder))
    assert plain["train"].features == synthetic_pcb_dataset["train"].features
    with pytest.raises(ValueError, match="no conversion metadata"):
        conversion_metadata(plain["train"])

    loaded = load_prepared_dataset(pcb_hub_folder)
    assert list(loaded) == ["train", "validation"]
    for name in loaded:
        assert conversion_metadata(loaded[name]) == conversion_metadata(synthetic_pcb_dataset[name])
        assert _rows(loaded[name]) == _rows(synthetic_pcb_dataset[name])
    assert dataset_categories(loaded["validation"].select([1])) == ([1, 2, 3, 4, 5], ["ic", "resistor", "capacitor", "connector", "pad"])
    # the report travels without the machine's folders, and reads like the local one
    report = json.loads((pcb_hub_folder / "report.json").read_text())
    assert report["splits"]["train"]["annotations_file"] == "_annotations.coco.json"
    assert report["splits"]["train"]["images_dir"] == "train"
    assert "[train] 6 images" in format_conversion_summary(pcb_hub_folder)
    # the save_to_disk folder loads through the same function, unchanged
    folder = Path(synthetic_pcb_dataset["train"].cache_files[0]["filename"]).parents[1]
    assert _rows(load_prepared_dataset(folder)["validation"]) == _rows(synthetic_pcb_dataset["validation"])


def test_several_parquet_shards_per_split(synthetic_pcb_dataset, tmp_path):
    folder = Path(save_hub_format(synthetic_pcb_dataset, tmp_path / "sharded", max_shard_size=1))
    assert len(list((folder / "data").glob("train-*-of-00006.parquet"))) == 6  # one image per shard
    assert _rows(load_prepared_dataset(folder)["train"]) == _rows(synthetic_pcb_dataset["train"])


def test_without_the_categories_file_ids_come_from_the_objects_or_the_load_fails(pcb_hub_folder, parts_coco, tmp_path):
    from modeling_efficientsam.data import prepare_coco_dataset

    copy = tmp_path / "no_sidecar"
    shutil.copytree(pcb_hub_folder, copy)
    (copy / CATEGORIES_FILE).unlink()
    loaded = load_prepared_dataset(copy)  # every category has objects: the ids are known
    assert dataset_categories(loaded["train"])[0] == [1, 2, 3, 4, 5]
    assert "fingerprint" not in conversion_metadata(loaded["train"])

    parts = prepare_coco_dataset({"train": (parts_coco, parts_coco.parent)}, tmp_path / "parts")
    folder = Path(save_hub_format(parts, tmp_path / "parts_hub"))
    assert dataset_categories(load_prepared_dataset(folder)["train"]) == ([0, 1, 2], ["placeholder", "part", "chip"])
    (folder / CATEGORIES_FILE).unlink()
    with pytest.raises(ValueError, match=r"'placeholder'\] have no object"):
        load_prepared_dataset(folder)


def test_loader_errors(pcb_hub_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such local folder"):
        load_prepared_dataset(tmp_path / "missing" / "dataset")  # offline: no Hub either
    with pytest.raises(ValueError, match="is a file"):
        load_prepared_dataset(pcb_hub_folder / "README.md")
    with pytest.raises(ValueError, match="revision"):
        load_prepared_dataset(pcb_hub_folder, revision="main")
    wrong = tmp_path / "wrong_names"
    shutil.copytree(pcb_hub_folder, wrong)
    metadata = json.loads((wrong / CATEGORIES_FILE).read_text())
    (wrong / CATEGORIES_FILE).write_text(json.dumps({**metadata, "category_names": metadata["category_names"][::-1]}))
    with pytest.raises(ValueError, match="ClassLabel names"):
        load_prepared_dataset(wrong)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):  # a folder that is not a Hub form is never replaced
        save_hub_format(load_prepared_dataset(pcb_hub_folder), occupied)
    assert (occupied / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------
# prepare_dataset.py --push_to_hub, then loading by Hub id
# ------------------------------------------------------------------------------------------------
def test_prepare_dataset_pushes_data_card_and_ids_that_load_back(parts_coco, fake_hub, tmp_path):
    output = tmp_path / "parts_dataset"
    status, printed, errors = _prepare_main([
        "--train_annotations", str(parts_coco), "--train_images", str(parts_coco.parent),
        "--validation_annotations", str(parts_coco), "--validation_images", str(parts_coco.parent),
        "--output_dir", str(output), "--push_to_hub", "me/parts", "--private", "--license", "cc-by-4.0",
    ])
    assert status == 0, errors
    assert "pushed to https://huggingface.co/datasets/me/parts" in printed
    assert fake_hub.created == [{"repo_id": "me/parts", "repo_type": "dataset", "private": True, "exist_ok": True}]
    assert fake_hub.commits[0]["repo_type"] == "dataset" and fake_hub.commits[0]["files"] == [
        "README.md", CATEGORIES_FILE, "data/train-00000-of-00001.parquet", "data/validation-00000-of-00001.parquet",
        "report.json"]

    hub = fake_hub.root / "me" / "parts"
    card = DatasetCard.load(hub / "README.md")
    metadata = card.data.to_dict()
    assert metadata["license"] == "cc-by-4.0" and metadata["size_categories"] == ["n<1K"]
    assert metadata["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*"},
                                                    {"split": "validation", "path": "data/validation-*"}]
    assert [s["num_examples"] for s in metadata["dataset_info"]["splits"]] == [2, 2]
    text = card.text
    # per split: images, objects, usable, crowd, annotations in the JSON, dropped, repaired
    assert "| train | 2 | 2 | 2 | 0 | 3 | 1 | 1 |" in text and "| validation | 2 | 2 | 2 | 0 | 3 | 1 | 1 |" in text
    assert "| train | dropped | `segmentation_missing` | 1 |" in text and "| validation | repaired | `box_outside_image` | 1 |" in text
    assert "| 0 | 0 | placeholder | 0 | 0 |" in text and "| 2 | 2 | chip | 1 | 1 |" in text
    assert 'load_prepared_dataset("me/parts")' in text and "`cc-by-4.0`" in text
    assert str(tmp_path) not in (hub / "report.json").read_text() + text  # no local path leaves the machine

    # by Hub id (load_dataset + hf_hub_download of the ids), at a revision
    local = datasets.load_from_disk(str(output))
    loaded = load_prepared_dataset("me/parts", revision="v1")
    assert fake_hub.loads == [("me/parts", "v1")]
    assert fake_hub.downloads == [("me/parts", CATEGORIES_FILE, "dataset", "v1")]
    assert conversion_metadata(loaded["validation"]) == conversion_metadata(local["validation"])
    assert dataset_categories(loaded["train"]) == ([0, 1, 2], ["placeholder", "part", "chip"])
    assert _rows(loaded["train"]) == _rows(local["train"])
    with pytest.raises(FileNotFoundError, match="me/nothing"):
        load_prepared_dataset("me/nothing")


def test_prepare_dataset_hub_form_without_push_and_option_checks(parts_coco, fake_hub, tmp_path):
    base = ["--train_annotations", str(parts_coco), "--train_images", str(parts_coco.parent), "--output_dir", str(tmp_path / "out")]
    status, printed, errors = _prepare_main(base + ["--hub_format_dir", str(tmp_path / "hub_form")])
    assert status == 0, errors
    assert fake_hub.created == [] and fake_hub.commits == []  # nothing uploaded
    card = DatasetCard.load(tmp_path / "hub_form" / "README.md")
    assert "license" not in card.data.to_dict() and "declared no license" in card.text
    assert dataset_categories(load_prepared_dataset(tmp_path / "hub_form")["train"])[0] == [0, 1, 2]
    with pytest.raises(SystemExit):
        _prepare_main(base + ["--private"])  # --private without --push_to_hub


# ------------------------------------------------------------------------------------------------
# The tools: efficientsam-evaluate and training take a Hub dataset
# ------------------------------------------------------------------------------------------------
def _evaluate(argv):
    from modeling_efficientsam.inference.evaluate_cli import main

    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        status = main(argv + ["--no_progress"])
    return status, out.getvalue(), err.getvalue()


def test_evaluate_takes_a_hub_form_folder_and_a_hub_id(synthetic_pcb_dataset, pcb_hub_folder, fake_hub, tmp_path):
    model = tmp_path / "model"
    tiny_model(0, initializer_range=0.1).save_pretrained(model)
    tiny_processor().save_pretrained(model)
    shutil.copytree(pcb_hub_folder, fake_hub.root / "me" / "pcb")
    folder = Path(synthetic_pcb_dataset["train"].cache_files[0]["filename"]).parents[1]
    reports = {}
    for name, dataset in (("saved", folder), ("hub_form", pcb_hub_folder), ("hub_id", "me/pcb")):
        status, _, errors = _evaluate(["--model", str(model), "--dataset", str(dataset), "--max_images", "1",
                                       "--output", str(tmp_path / f"{name}.json")])
        assert status == 0, errors
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert fake_hub.loads == [("me/pcb", None)]
    metrics = [next(iter(r["models"].values())) for r in reports.values()]
    assert metrics[0]["num_instances"] > 0
    for other in metrics[1:]:  # the same data, hence the same numbers
        for key in ("mean_iou", "f1", "boundary_f1", "num_instances", "coco", "per_category_iou"):
            assert other[key] == metrics[0][key], key
    status, _, errors = _evaluate(["--model", str(model), "--dataset", "me/nothing"])
    assert status == 2 and "me/nothing" in errors


def test_data_arguments_take_one_source():
    from modeling_efficientsam.training import DataArguments

    assert DataArguments(dataset_name="me/pcb", dataset_revision="v1").dataset_name == "me/pcb"
    with pytest.raises(ValueError, match="one source of data"):
        DataArguments(dataset_name="me/pcb", dataset_path="outputs/pcb")
    with pytest.raises(ValueError, match="one source of data"):
        DataArguments(dataset_name="me/pcb", train_annotations="a.json", train_images="images")
    with pytest.raises(ValueError, match="dataset_revision goes with dataset_name"):
        DataArguments(dataset_path="outputs/pcb", dataset_revision="v1")
    assert DataArguments(dataset_name="none", dataset_path="outputs/pcb").dataset_name is None  # a recipe's source switched off


def test_training_builds_its_datasets_and_cache_from_a_hub_dataset(pcb_hub_folder, fake_hub, tmp_path):
    from modeling_efficientsam.training import DataArguments
    from modeling_efficientsam.training.dataset_building import build_datasets, dataset_summary, prepare_dataset

    shutil.copytree(pcb_hub_folder, fake_hub.root / "me" / "pcb")
    data_args = DataArguments(dataset_name="me/pcb", dataset_revision="v1", max_objects=4)
    training_args = tiny_args(tmp_path / "run")
    dataset, folder = prepare_dataset(data_args, training_args)
    assert folder is None and fake_hub.loads == [("me/pcb", "v1")]
    student = tiny_model(freeze_encoder=True)
    train, evaluation, readers = build_datasets(dataset, folder, data_args, training_args, student, use_cache=True)
    caches = list((tmp_path / "run" / "embeddings").glob("*/train/metadata.json"))
    assert len(caches) == 1  # the cache of a Hub dataset lives in the run's folder
    assert tuple(train[0]["image_embeddings"].shape) == (32, 4, 4) and "pixel_values" not in evaluation[0]
    summary = dataset_summary(dataset, data_args)
    assert (summary["hub_id"], summary["revision"], summary["evaluation_split"]) == ("me/pcb", "v1", "validation")
    assert summary["splits"]["train"]["images"] == 6


def test_train_py_runs_on_a_hub_dataset_id_and_names_it_in_the_card(pcb_hub_folder, fake_hub, tmp_path, restore_logging):
    shutil.copytree(pcb_hub_folder, fake_hub.root / "me" / "pcb")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "init_from_scratch": True, "model_config": TINY_CONFIG, "dataset_name": "me/pcb", "output_dir": str(tmp_path / "run"),
        "max_steps": 2, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, "learning_rate": 1e-3,
        "save_strategy": "no", "load_best_model_at_end": False, "eval_on_start": False, "report_to": "none",
        "use_cpu": True, "disable_tqdm": True, "dataloader_num_workers": 0, "num_overlay_images": 0,
        "freeze_vision_encoder": False, "push_demo_app": True,
    }))
    spec = importlib.util.spec_from_file_location("train_script", REPO / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    metrics = train.main([str(recipe)])
    assert "eval_mean_iou" in metrics
    data = ModelCard.load(tmp_path / "run" / "README.md").data
    assert data.datasets == ["me/pcb"]
    assert {r.dataset_type for r in data.eval_results} == {"me/pcb"}
    mean_iou = next(r.metric_value for r in data.eval_results if r.metric_type == "mean_iou")
    assert mean_iou == pytest.approx(metrics["eval_mean_iou"])
    # push_demo_app: the Space app lands beside the model, so push_to_hub uploads it too
    app = tmp_path / "run" / "app.py"
    compile(app.read_text(), str(app), "exec")
    assert "trust_remote_code=True" in app.read_text() and "gradio" in (tmp_path / "run" / "requirements.txt").read_text()
