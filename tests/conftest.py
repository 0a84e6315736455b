"""Shared test setup: offline Hugging Face libraries, the ../shared fixtures, small COCO builders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Tests never touch the network (set before datasets / huggingface_hub are imported by any test).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"



def pytest_configure(config):
    # pycocotools' decode trips a numpy 2 deprecation notice on every call; it is not ours to fix.
    config.addinivalue_line(
        "filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    )


SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


def require_shared(path: Path) -> Path:
    """Return ``path`` if it exists; else skip with a printed reason, or fail when CI=true."""
    if path.exists():
        return path
    reason = f"{path} is absent (the shared datasets and fixtures are expected in ../shared beside the checkout)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and a required fixture is missing: {reason}")
    print(f"SKIPPED: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the checkout (skips, or fails under CI=true, when absent)."""
    return require_shared(SHARED_DIR)


@pytest.fixture(scope="session")
def shared_path(shared_dir):
    """Factory: ``shared_path("datasets/wafer_defects")`` -> existing Path (skip/fail like shared_dir)."""
    return lambda relative: require_shared(shared_dir / relative)


def write_coco(directory, images, annotations, categories=None, json_name="annotations.json"):
    """Write a small COCO file and its images.

    ``images``: list of dicts with ``id``, ``file_name`` and ``image`` (a PIL image, saved under
    ``file_name`` with its format taken from the extension unless ``save_kwargs`` says otherwise),
    optionally ``width``/``height`` overriding the JSON size and ``save_kwargs``. Returns the JSON path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for entry in images:
        path = directory / entry["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        if entry.get("image") is not None:
            entry["image"].save(path, **entry.get("save_kwargs", {}))
        width, height = entry["image"].size if entry.get("image") is not None else (entry["width"], entry["height"])
        records.append({"id": entry["id"], "file_name": entry["file_name"],
                        "width": entry.get("width", width), "height": entry.get("height", height)})
    document = {
        "images": records,
        "annotations": annotations,
        "categories": categories if categories is not None else [{"id": 1, "name": "part"}, {"id": 2, "name": "chip"}],
    }
    path = directory / json_name
    path.write_text(json.dumps(document))
    return path


@pytest.fixture(scope="session")
def coco_writer():
    """The :func:`write_coco` helper, as a fixture."""
    return write_coco


@pytest.fixture(scope="session")
def synthetic_pcb_splits(tmp_path_factory):
    """A tiny synthetic PCB COCO dataset (6 train, 2 validation images): {split: (json, images_dir)}."""
    from modeling_efficientsam.data.synthetic_pcb import make_synthetic_pcb

    return make_synthetic_pcb(tmp_path_factory.mktemp("synthetic_pcb"), num_train=6, num_validation=2, seed=3)


@pytest.fixture(scope="session")
def synthetic_pcb_dataset(synthetic_pcb_splits, tmp_path_factory):
    """``synthetic_pcb_splits`` converted with prepare_coco_dataset (a DatasetDict on disk)."""
    from modeling_efficientsam.data import prepare_coco_dataset

    return prepare_coco_dataset(synthetic_pcb_splits, tmp_path_factory.mktemp("synthetic_pcb_prepared") / "dataset")
