"""The built-in synthetic PCB sample: determinism, exact visible masks, and a clean conversion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modeling_efficientsam.data import decode_rle, read_report
from modeling_efficientsam.data.synthetic_pcb import CATEGORIES, component_mask, make_synthetic_pcb, render_sample

REPO = Path(__file__).resolve().parents[1]


def test_same_seed_gives_byte_identical_files(tmp_path):
    first = make_synthetic_pcb(tmp_path / "a", num_train=3, num_validation=2, seed=11)
    second = make_synthetic_pcb(tmp_path / "b", num_train=3, num_validation=2, seed=11)
    other = make_synthetic_pcb(tmp_path / "c", num_train=3, num_validation=2, seed=12)
    for split in ("train", "validation"):
        assert Path(first[split][0]).read_bytes() == Path(second[split][0]).read_bytes()
        assert Path(first[split][0]).read_bytes() != Path(other[split][0]).read_bytes()
        for image in sorted(Path(first[split][1]).glob("*.png")):
            assert image.read_bytes() == (Path(second[split][1]) / image.name).read_bytes()


def test_layout_and_contents(synthetic_pcb_splits):
    assert set(synthetic_pcb_splits) == {"train", "validation"}
    for split, (annotations_path, images_dir) in synthetic_pcb_splits.items():
        assert Path(annotations_path) == Path(images_dir) / "_annotations.coco.json"
        document = json.loads(Path(annotations_path).read_text())
        assert document["categories"] == CATEGORIES
        assert len(document["images"]) == {"train": 6, "validation": 2}[split]
        for image in document["images"]:
            assert (Path(images_dir) / image["file_name"]).exists()
            assert (image["width"], image["height"]) == (320, 240)
        for annotation in document["annotations"]:
            assert isinstance(annotation["segmentation"]["counts"], str) and annotation["iscrowd"] == 0
            mask = decode_rle(annotation["segmentation"])
            assert annotation["area"] == mask.sum() >= 40
            rows, cols = np.nonzero(mask)
            assert annotation["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]


def test_every_category_appears_in_a_larger_sample(tmp_path):
    splits = make_synthetic_pcb(tmp_path, num_train=12, num_validation=0, seed=0)
    document = json.loads(Path(splits["train"][0]).read_text())
    assert {a["category_id"] for a in document["annotations"]} == {c["id"] for c in CATEGORIES}
    assert len(document["annotations"]) >= 4 * 12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masks_are_exactly_the_visible_drawn_pixels(seed):
    sample = render_sample(np.random.default_rng(seed))
    height, width = sample.label_map.shape
    full = [component_mask(component, width, height) for component in sample.components]
    assert len(full) >= 2
    union = np.zeros((height, width), bool)
    for k in reversed(range(len(full))):  # drawing order decides visibility: later covers earlier
        visible = sample.label_map == k + 1
        np.testing.assert_array_equal(visible, full[k] & ~union)
        assert visible.sum() >= 0.5 * full[k].sum()  # never mostly hidden
        union |= full[k]
    np.testing.assert_array_equal(sample.label_map > 0, union)
    differs = np.any(sample.image != sample.background, axis=-1)
    assert not differs[~union].any(), "pixels outside every mask must be untouched board"
    for k in range(len(full)):
        visible = sample.label_map == k + 1
        assert differs[visible].mean() > 0.9, "a mask must cover drawn component pixels"


def test_written_masks_match_the_rendered_label_map(tmp_path):
    splits = make_synthetic_pcb(tmp_path, num_train=2, num_validation=0, seed=5)
    document = json.loads(Path(splits["train"][0]).read_text())
    for index, image in enumerate(document["images"]):
        sample = render_sample(np.random.default_rng(np.random.SeedSequence([5, 0, index])))
        annotations = [a for a in document["annotations"] if a["image_id"] == image["id"]]
        assert len(annotations) == len(sample.components)
        for k, (annotation, component) in enumerate(zip(annotations, sample.components)):
            np.testing.assert_array_equal(decode_rle(annotation["segmentation"]), sample.label_map == k + 1)
            assert annotation["category_id"] == component.category_id


def test_converts_without_repairs_and_cli_runs(synthetic_pcb_dataset, synthetic_pcb_splits, tmp_path):
    assert synthetic_pcb_dataset["train"].num_rows == 6
    report_dir = Path(synthetic_pcb_dataset["train"].cache_files[0]["filename"]).parents[1]
    report = read_report(report_dir)
    for split in report["splits"].values():
        assert split["num_dropped"] == 0 and split["num_repaired"] == 0
        assert split["num_objects"] == split["num_annotations"] > 0
    result = subprocess.run(
        [sys.executable, str(REPO / "data" / "make_synthetic_pcb.py"), "--output_dir", str(tmp_path / "cli"),
         "--num_train", "2", "--num_validation", "1", "--seed", "3"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    cli_train = tmp_path / "cli" / "train" / "_annotations.coco.json"
    assert cli_train.exists() and (tmp_path / "cli" / "validation" / "_annotations.coco.json").exists()
    # same seed through the CLI and the function: the first images agree byte for byte
    assert (tmp_path / "cli" / "train" / "pcb_00000.png").read_bytes() == (
        Path(synthetic_pcb_splits["train"][1]) / "pcb_00000.png"
    ).read_bytes()
