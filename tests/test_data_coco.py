"""COCO -> DatasetDict conversion: exact masks, fatal errors, repairs and drops, images, EXIF, caching."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from modeling_efficientsam.data import (
    DROP_REASONS,
    REPAIR_REASONS,
    CocoValidationError,
    category_names,
    conversion_metadata,
    dataset_categories,
    decode_rle,
    load_or_prepare,
    prepare_coco_dataset,
    read_report,
)
from modeling_efficientsam.data import conversion

REPO = Path(__file__).resolve().parents[1]


def square(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with a background run, as COCO writes them."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"counts": counts, "size": list(mask.shape)}


def rgb(width, height, colour=(40, 120, 60)):
    return Image.new("RGB", (width, height), colour)


def stored_bytes(split: datasets.Dataset, index: int) -> bytes:
    return split.cast_column("image", datasets.Image(decode=False))[index]["image"]["bytes"]


def stored_array(split: datasets.Dataset, index: int) -> np.ndarray:
    with Image.open(io.BytesIO(stored_bytes(split, index))) as image:
        assert image.mode == "RGB"
        assert image.getexif().get(0x0112) is None, "a stored image must not carry an orientation tag"
        return np.asarray(image)


def assert_masks_match_pycocotools(annotation_file: Path, split: datasets.Dataset) -> int:
    coco = COCO(str(annotation_file))
    checked = 0
    for row in split.select_columns(["image_id", "width", "height", "objects"]):
        for obj in row["objects"]:
            expected = coco.annToMask(coco.anns[obj["id"]]).astype(bool)
            got = decode_rle(obj["mask"])
            assert got.shape == (row["height"], row["width"])
            assert np.array_equal(got, expected), f"annotation {obj['id']} differs from annToMask"
            assert obj["area"] == expected.sum()
            checked += 1
    return checked


# ---------------------------------------------------------------------------------------------
# Real datasets (../shared)


@pytest.fixture(scope="module")
def wafer(shared_path, tmp_path_factory):
    root = shared_path("datasets/wafer_defects")
    splits = {name: (root / folder / "_annotations.coco.json", root / folder)
              for name, folder in (("train", "train"), ("validation", "valid"), ("test", "test"))}
    output = tmp_path_factory.mktemp("wafer") / "prepared"
    return splits, prepare_coco_dataset(splits, output), output


def test_wafer_masks_equal_pycocotools(wafer):
    splits, prepared, _ = wafer
    for name, (annotation_file, _) in splits.items():
        checked = assert_masks_match_pycocotools(annotation_file, prepared[name])
        assert checked == sum(len(objects) for objects in prepared[name]["objects"]) > 0


def test_wafer_objects_plus_drops_equal_annotations(wafer):
    splits, prepared, output = wafer
    report = read_report(output)
    for name, (annotation_file, _) in splits.items():
        document = json.loads(Path(annotation_file).read_text())
        split_report = report["splits"][name]
        kept_ids = {obj["id"] for objects in prepared[name]["objects"] for obj in objects}
        dropped_ids = {entry["annotation_id"] for entries in split_report["dropped"].values() for entry in entries}
        assert len(kept_ids) + len(dropped_ids) == len(document["annotations"])
        assert kept_ids | dropped_ids == {a["id"] for a in document["annotations"]}
        assert split_report["num_objects"] + split_report["num_dropped"] == split_report["num_annotations"]
        # every image stays, including those without annotations, and those are counted
        assert prepared[name].num_rows == len(document["images"])
        annotated = {a["image_id"] for a in document["annotations"]}
        without = sorted(image["id"] for image in document["images"] if image["id"] not in annotated)
        assert report_image_ids(split_report["images_without_usable_objects"]) == without
    assert report["splits"]["train"]["images_without_usable_objects"], "the wafer train split has empty images"


def test_wafer_boxes_are_the_json_boxes_clipped(wafer):
    splits, prepared, output = wafer
    report = read_report(output)
    document = json.loads(Path(splits["train"][0]).read_text())
    annotations = {a["id"]: a for a in document["annotations"]}
    clipped = set(report_ids(report["splits"]["train"]["repaired"].get("box_outside_image", [])))
    for row in prepared["train"].select_columns(["width", "height", "objects"]):
        for obj in row["objects"]:
            x, y, w, h = annotations[obj["id"]]["bbox"]
            expected = [max(x, 0), max(y, 0), min(x + w, row["width"]), min(y + h, row["height"])]
            np.testing.assert_allclose(obj["box"], expected, rtol=0, atol=1e-3)
            outside = x < 0 or y < 0 or x + w > row["width"] or y + h > row["height"]
            assert outside == (obj["id"] in clipped)


def test_wafer_categories_and_metadata(wafer):
    splits, prepared, _ = wafer
    document = json.loads(Path(splits["train"][0]).read_text())
    categories = sorted((c["id"], c["name"]) for c in document["categories"])
    feature = prepared["train"].features["objects"].feature["category"]
    assert feature.names == [name for _, name in categories]
    metadata = conversion_metadata(prepared["train"])
    assert metadata["coco_category_ids"] == [category_id for category_id, _ in categories]
    # the one reader of category names (training's id2label, evaluation's COCO categories)
    assert category_names(prepared["train"]) == [name for _, name in categories]
    assert dataset_categories(prepared["train"]) == ([category_id for category_id, _ in categories],
                                                     [name for _, name in categories])
    annotations = {a["id"]: a for a in document["annotations"]}
    for objects in prepared["train"]["objects"]:
        for obj in objects:
            assert obj["category_id"] == annotations[obj["id"]]["category_id"]
            assert metadata["coco_category_ids"][obj["category"]] == obj["category_id"]


def test_voc_labelme_masks_equal_pycocotools(shared_path, tmp_path):
    root = shared_path("datasets/voc_labelme")
    prepared = prepare_coco_dataset({"train": (root / "annotations.json", root)}, tmp_path / "voc")
    assert all(name.startswith("JPEGImages/") for name in prepared["train"]["file_name"])  # sub-folders kept
    assert assert_masks_match_pycocotools(root / "annotations.json", prepared["train"]) == 12
    image = prepared["train"][0]["image"]
    assert image.mode == "RGB" and image.size == (prepared["train"][0]["width"], prepared["train"][0]["height"])


# ---------------------------------------------------------------------------------------------
# Synthetic files


def test_segmentation_formats_equal_pycocotools(tmp_path, coco_writer):
    height, width = 40, 60
    rle_mask = np.zeros((height, width), bool)
    rle_mask[5:20, 30:50] = True
    rle_mask[25:30, 2:9] = True
    crowd_mask = np.zeros((height, width), bool)
    crowd_mask[30:38, 40:58] = True
    compressed = mask_utils.encode(np.asfortranarray(rle_mask[::-1].astype(np.uint8)))
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [2, 3, 48, 25],
         "segmentation": [square(2, 3, 12, 14), [30.5, 20, 50, 20, 40, 28.2]]},  # two polygon parts
        {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 0, "bbox": [2, 5, 48, 25],
         "segmentation": uncompressed_rle(rle_mask)},
        {"id": 3, "image_id": 1, "category_id": 2, "iscrowd": 0, "bbox": [2, 10, 48, 25],
         "segmentation": {"counts": compressed["counts"].decode(), "size": [height, width]}},
        {"id": 4, "image_id": 1, "category_id": 1, "iscrowd": 1, "bbox": [40, 30, 18, 8],
         "segmentation": uncompressed_rle(crowd_mask)},
    ]
    path = coco_writer(tmp_path / "src", [{"id": 1, "file_name": "a.png", "image": rgb(width, height)}], annotations)
    prepared = prepare_coco_dataset({"train": (path, tmp_path / "src")}, tmp_path / "out")
    assert assert_masks_match_pycocotools(path, prepared["train"]) == 4
    objects = {obj["id"]: obj for obj in prepared["train"][0]["objects"]}
    assert [objects[i]["iscrowd"] for i in (1, 2, 3, 4)] == [0, 0, 0, 1]  # crowd kept, flagged
    assert all(isinstance(obj["mask"]["counts"], str) for obj in objects.values())
    assert decode_rle(objects[1]["mask"])[3:14, 2:12].all()  # both polygon parts rasterised
    assert decode_rle(objects[1]["mask"])[21:26, 38:42].any()


def _base_document(tmp_path, coco_writer):
    images = [{"id": 1, "file_name": "a.png", "image": rgb(30, 20)}, {"id": 2, "file_name": "b.png", "image": rgb(30, 20)}]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [2, 2, 10, 10], "segmentation": [square(2, 2, 12, 12)]},
        {"id": 2, "image_id": 2, "category_id": 2, "iscrowd": 0, "bbox": [5, 5, 10, 10], "segmentation": [square(5, 5, 15, 15)]},
    ]
    path = coco_writer(tmp_path / "src", images, annotations)
    return path, json.loads(path.read_text())


def _set(document, key, index, field, value):
    document[key][index][field] = value
    return document


FATAL_CASES = {
    "unreadable_json": (lambda p, d: p.write_text("{not json"), ["file", "cannot read it as JSON"]),
    "non_coco_top_level": (lambda p, d: p.write_text("[]"), ["top level", "JSON object"]),
    "non_coco_missing_key": (lambda p, d: p.write_text(json.dumps({"images": d["images"]})), ['key "annotations"']),
    "duplicate_image_id": (lambda p, d: p.write_text(json.dumps(_set(d, "images", 1, "id", 1))), ["image id 1", "duplicate image id"]),
    "duplicate_annotation_id": (lambda p, d: p.write_text(json.dumps(_set(d, "annotations", 1, "id", 1))),
                                ["annotation id 1", "duplicate annotation id"]),
    "missing_image_reference": (lambda p, d: p.write_text(json.dumps(_set(d, "annotations", 1, "image_id", 99))),
                                ["annotation id 2", "image_id 99"]),
    "missing_category_reference": (lambda p, d: p.write_text(json.dumps(_set(d, "annotations", 1, "category_id", 42))),
                                   ["annotation id 2", "category_id 42"]),
    "missing_image_file": (lambda p, d: (p.parent / "b.png").unlink(), ["image id 2 (b.png)", "not found"]),
    "unreadable_image_file": (lambda p, d: (p.parent / "b.png").write_bytes(b"definitely not an image"),
                              ["image id 2 (b.png)", "cannot read image"]),
    "truncated_image_file": (lambda p, d: (p.parent / "b.png").write_bytes((p.parent / "b.png").read_bytes()[:60]),
                             ["image id 2 (b.png)"]),
    "size_mismatch": (lambda p, d: p.write_text(json.dumps(_set(d, "images", 1, "width", 31))),
                      ["image id 2 (b.png)", "31x20", "30x20"]),
}


@pytest.mark.parametrize("case", sorted(FATAL_CASES))
def test_fatal_errors_name_file_record_and_fix(case, tmp_path, coco_writer):
    path, document = _base_document(tmp_path, coco_writer)
    damage, expected_fragments = FATAL_CASES[case]
    damage(path, document)
    with pytest.raises(CocoValidationError) as caught:
        prepare_coco_dataset({"train": (path, tmp_path / "src")}, tmp_path / "out")
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert str(path) in message and "Fix:" in message
    for fragment in expected_fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert not (tmp_path / "out").exists(), "nothing may be written when the input is fatally broken"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "temporary directories left behind"


def _repairs_document(tmp_path, coco_writer, folder="src"):
    """One annotation per repair/drop reason, plus an empty image and a crowd-only image."""
    empty_rle = mask_utils.encode(np.zeros((80, 100), np.uint8, order="F"))
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "segmentation": [square(10, 10, 30, 30), [1, 1, 5, 5]]},
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "segmentation": [[1, 1, 5, 5]]},
        {"id": 12, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "segmentation": []},
        {"id": 13, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]},
        {"id": 14, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4],
         "segmentation": {"counts": empty_rle["counts"].decode(), "size": [80, 100]}},
        {"id": 15, "image_id": 1, "category_id": 2, "bbox": [40, 40, 0, 10], "segmentation": [square(40, 40, 50, 50)]},
        {"id": 16, "image_id": 1, "category_id": 2, "bbox": [80, 60, 30, 30], "segmentation": [square(80, 60, 100, 80)]},
        {"id": 17, "image_id": 1, "category_id": 2, "segmentation": [square(60, 5, 70, 25)]},
        {"id": 18, "image_id": 1, "category_id": 1, "bbox": [60, 50, 20, 20], "segmentation": [square(10, 50, 30, 70)]},
        {"id": 19, "image_id": 1, "category_id": 2, "bbox": [35, 5, 10, 10], "segmentation": [square(35, 5, 45, 15)]},
        {"id": 20, "image_id": 3, "category_id": 2, "bbox": [5, 5, 10, 10], "segmentation": [square(5, 5, 15, 15)], "iscrowd": 1},
        {"id": 21, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "segmentation": [square(120, 10, 130, 20)]},
        {"id": 22, "image_id": 1, "category_id": 2, "bbox": [50, 50, 50, 20],
         "segmentation": [[50, 50, 1e12, 50, 1e12, 70, 50, 70]]},  # far past the right edge: clipped
    ]
    for annotation in annotations:
        annotation.setdefault("iscrowd", 0)
    images = [{"id": i, "file_name": f"{i}.png", "image": rgb(100, 80)} for i in (1, 2, 3)]
    return coco_writer(tmp_path / folder, images, annotations)


EXPECTED_DROPS = {"no_valid_polygon": [11], "segmentation_missing": [12, 13], "empty_mask": [14], "box_mask_mismatch": [18],
                  "polygon_outside_image": [21]}
EXPECTED_REPAIRS = {"polygon_part_too_few_points": [10], "box_zero_size": [15], "box_outside_image": [16], "box_missing": [17],
                    "polygon_clipped": [22]}


def report_ids(entries: list) -> list:
    """Annotation ids of a report.json list (each entry also names the image id and file name)."""
    return [entry["annotation_id"] for entry in entries]


def report_image_ids(entries: list) -> list:
    return [entry["image_id"] for entry in entries]


def test_every_repair_and_drop_is_reported(tmp_path, coco_writer):
    path = _repairs_document(tmp_path, coco_writer)
    prepared = prepare_coco_dataset({"train": (path, tmp_path / "src")}, tmp_path / "out")
    report = read_report(tmp_path / "out")
    split = report["splits"]["train"]
    assert {reason: report_ids(entries) for reason, entries in split["dropped"].items()} == EXPECTED_DROPS
    assert {reason: report_ids(entries) for reason, entries in split["repaired"].items()} == EXPECTED_REPAIRS
    assert set(EXPECTED_DROPS) == set(DROP_REASONS) and set(EXPECTED_REPAIRS) == set(REPAIR_REASONS)
    # every listed annotation names its image id and file name
    for entries in list(split["dropped"].values()) + list(split["repaired"].values()):
        assert all(entry["image_id"] == 1 and entry["file_name"] == "1.png" for entry in entries), entries
    assert split["num_objects"] + split["num_dropped"] == split["num_annotations"] == 13
    assert split["images_without_usable_objects"] == [{"image_id": 2, "file_name": "2.png"},
                                                      {"image_id": 3, "file_name": "3.png"}]  # no annotation / crowd only
    assert prepared["train"].num_rows == 3

    objects = {obj["id"]: obj for objs in prepared["train"]["objects"] for obj in objs}
    assert sorted(objects) == [10, 15, 16, 17, 19, 20, 22]
    coco = COCO(str(path))
    repaired_10 = dict(coco.anns[10], segmentation=[square(10, 10, 30, 30)])
    assert np.array_equal(decode_rle(objects[10]["mask"]), coco.annToMask(repaired_10).astype(bool))
    for annotation_id in (15, 17):  # replaced by the mask's tight box
        x, y, w, h = mask_utils.toBbox({"size": objects[annotation_id]["mask"]["size"],
                                        "counts": objects[annotation_id]["mask"]["counts"].encode()})
        np.testing.assert_allclose(objects[annotation_id]["box"], [x, y, x + w, y + h])
    np.testing.assert_allclose(objects[16]["box"], [80, 60, 100, 80])  # clipped to the 100 x 80 image
    np.testing.assert_allclose(objects[19]["box"], [35, 5, 45, 15])  # untouched
    # clipped 1e12 polygon: exactly the mask of the same rectangle ending past the image edge
    clipped_22 = dict(coco.anns[22], segmentation=[[50, 50, 150, 50, 150, 70, 50, 70]])
    assert np.array_equal(decode_rle(objects[22]["mask"]), coco.annToMask(clipped_22).astype(bool))
    np.testing.assert_allclose(objects[22]["box"], [50, 50, 100, 70])


def test_box_mask_iou_threshold_is_applied(tmp_path, coco_writer):
    path = _repairs_document(tmp_path, coco_writer)
    document = json.loads(path.read_text())
    next(a for a in document["annotations"] if a["id"] == 19)["bbox"] = [35, 5, 10, 6]  # IoU 0.6 with its mask box
    path.write_text(json.dumps(document))
    for threshold, expected in ((0.0, []), (0.5, [18]), (0.7, [18, 19])):
        prepare_coco_dataset({"train": (path, tmp_path / "src")}, tmp_path / "out", box_mask_iou_threshold=threshold)
        assert report_ids(read_report(tmp_path / "out")["splits"]["train"]["dropped"].get("box_mask_mismatch", [])) == expected


def test_command_prints_counts_per_reason(tmp_path, coco_writer):
    path = _repairs_document(tmp_path, coco_writer)
    command = [sys.executable, str(REPO / "data" / "prepare_dataset.py"), "--train_annotations", str(path),
               "--train_images", str(tmp_path / "src"), "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    for kind, expected in (("dropped", EXPECTED_DROPS), ("repaired", EXPECTED_REPAIRS)):
        for reason, ids in expected.items():
            assert re.search(rf"{kind}\s+{reason}\s+{len(ids)}\b", result.stdout), (reason, result.stdout)
    assert (tmp_path / "out" / "report.json").exists()

    strict = subprocess.run(command + ["--strict"], capture_output=True, text=True)
    assert strict.returncode == 2
    assert "annotation id 10" in strict.stderr and "polygon_part_too_few_points" in strict.stderr


@pytest.mark.parametrize("annotation_id", sorted(i for ids in {**EXPECTED_DROPS, **EXPECTED_REPAIRS}.values() for i in ids))
def test_strict_turns_each_repair_and_drop_into_an_error(annotation_id, tmp_path, coco_writer):
    path = _repairs_document(tmp_path, coco_writer)
    document = json.loads(path.read_text())
    document["annotations"] = [a for a in document["annotations"] if a["id"] in (annotation_id, 19)]
    path.write_text(json.dumps(document))
    reason = next(r for r, ids in {**EXPECTED_DROPS, **EXPECTED_REPAIRS}.items() if annotation_id in ids)
    with pytest.raises(CocoValidationError) as caught:
        prepare_coco_dataset({"train": (path, tmp_path / "src")}, tmp_path / "out", strict=True)
    message = str(caught.value)
    assert f"annotation id {annotation_id} " in message and reason in message and str(path) in message
    # the same file converts without --strict
    prepare_coco_dataset({"train": (path, tmp_path / "src")}, tmp_path / "out")


def test_strict_accepts_clean_data(synthetic_pcb_splits, tmp_path):
    prepared = prepare_coco_dataset(synthetic_pcb_splits, tmp_path / "out", strict=True)
    report = read_report(tmp_path / "out")
    assert all(s["num_dropped"] == 0 and s["num_repaired"] == 0 for s in report["splits"].values())
    assert set(prepared) == set(synthetic_pcb_splits)


# ---------------------------------------------------------------------------------------------
# Images


def test_image_modes_become_rgb(tmp_path, coco_writer):
    ramp = (np.arange(24 * 16).reshape(16, 24) % 256).astype(np.uint8)
    colour = np.stack([ramp, 255 - ramp, ramp // 2], axis=-1)
    deep = (np.arange(24 * 16).reshape(16, 24) * 170).astype(np.uint16)
    palette_image = Image.fromarray(ramp % 4, mode="L").convert("P")
    palette_image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0] + [0] * 756)
    sources = {
        "gray.png": (Image.fromarray(ramp, mode="L"), np.repeat(ramp[..., None], 3, axis=-1)),
        "rgba.png": (Image.fromarray(np.dstack([colour, np.full_like(ramp, 7)]), mode="RGBA"), colour),
        "palette.png": (palette_image, np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)[ramp % 4]),
        "deep.png": (Image.fromarray(deep), np.repeat((deep / 65535 * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)),
        "colour.png": (Image.fromarray(colour, mode="RGB"), colour),
    }
    assert sources["deep.png"][0].mode.startswith("I;16")
    images = [{"id": i, "file_name": name, "image": image} for i, (name, (image, _)) in enumerate(sources.items(), start=1)]
    annotations = [{"id": i, "image_id": i, "category_id": 1, "iscrowd": 0, "bbox": [1, 1, 5, 5],
                    "segmentation": [square(1, 1, 6, 6)]} for i in range(1, len(images) + 1)]
    path = coco_writer(tmp_path / "src", images, annotations)
    prepared = prepare_coco_dataset({"train": (path, tmp_path / "src")}, tmp_path / "out")["train"]
    for index, name in enumerate(prepared["file_name"]):
        np.testing.assert_array_equal(stored_array(prepared, index), sources[name][1], err_msg=name)
        assert prepared[index]["image"].mode == "RGB"
    colour_index = prepared["file_name"].index("colour.png")
    assert stored_bytes(prepared, colour_index) == (tmp_path / "src" / "colour.png").read_bytes()  # RGB kept as is


def _exif_rotated_jpeg(path: Path) -> None:
    """A 40 x 20 stored JPEG with a red block, tagged orientation 6 (displayed 20 x 40)."""
    pixels = np.full((20, 40, 3), (30, 90, 40), np.uint8)
    pixels[2:10, 4:16] = (230, 20, 20)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, quality=95, exif=exif)


@pytest.mark.parametrize("annotated_on", ["displayed", "stored"])
def test_exif_orientation_follows_the_json_size(annotated_on, tmp_path, coco_writer):
    source = tmp_path / "src"
    source.mkdir()
    _exif_rotated_jpeg(source / "photo.jpg")
    with Image.open(source / "photo.jpg") as handle:
        raw = np.asarray(handle.convert("RGB"))
        displayed = np.asarray(ImageOps.exif_transpose(handle).convert("RGB"))
    expected = displayed if annotated_on == "displayed" else raw
    assert expected.shape[:2] in ((40, 20), (20, 40)) and raw.shape != displayed.shape
    red = (expected[..., 0] > 150) & (expected[..., 1] < 100)
    rows, cols = np.nonzero(red)
    polygon = square(int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    height, width = expected.shape[:2]
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                    "bbox": [polygon[0], polygon[1], polygon[2] - polygon[0], polygon[5] - polygon[1]], "segmentation": [polygon]}]
    path = coco_writer(source, [{"id": 1, "file_name": "photo.jpg", "width": width, "height": height}], annotations)
    prepared = prepare_coco_dataset({"train": (path, source)}, tmp_path / "out")["train"]

    np.testing.assert_array_equal(stored_array(prepared, 0), expected)
    np.testing.assert_array_equal(np.asarray(prepared[0]["image"]), expected)  # datasets decoding agrees
    mask = decode_rle(prepared[0]["objects"][0]["mask"])
    assert expected[mask][:, 0].mean() > 150 and expected[mask][:, 1].mean() < 100  # the annotation lies on the block
    report = read_report(tmp_path / "out")["splits"]["train"]
    assert report_image_ids(report["images_stored_without_exif_rotation"]) == ([] if annotated_on == "displayed" else [1])


def test_exif_size_matching_neither_orientation_is_fatal(tmp_path, coco_writer):
    source = tmp_path / "src"
    source.mkdir()
    _exif_rotated_jpeg(source / "photo.jpg")
    path = coco_writer(source, [{"id": 1, "file_name": "photo.jpg", "width": 25, "height": 25}], [])
    with pytest.raises(CocoValidationError, match=r"25x25.*40x20.*20x40"):
        prepare_coco_dataset({"train": (path, source)}, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Output directory, cache reuse


@pytest.fixture
def counted_prepare(monkeypatch):
    calls = []
    original = conversion.prepare_coco_dataset

    def counting(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(conversion, "prepare_coco_dataset", counting)
    return calls


def test_load_or_prepare_reuses_and_rebuilds(tmp_path, coco_writer, counted_prepare):
    path = _repairs_document(tmp_path, coco_writer)
    splits = {"train": (path, tmp_path / "src")}
    out = tmp_path / "out"

    first = load_or_prepare(splits, out)
    assert len(counted_prepare) == 1
    second = load_or_prepare(splits, out)
    assert len(counted_prepare) == 1, "unchanged inputs must reuse the prepared dataset"
    assert second["train"]["objects"] == first["train"]["objects"]

    document = json.loads(path.read_text())
    document["annotations"] = [a for a in document["annotations"] if a["id"] != 19]
    path.write_text(json.dumps(document))
    third = load_or_prepare(splits, out)
    assert len(counted_prepare) == 2, "an edited annotation file must trigger a rebuild"
    assert 19 not in {o["id"] for objs in third["train"]["objects"] for o in objs}

    image = tmp_path / "src" / "2.png"
    rgb(100, 80, (200, 10, 10)).save(image)
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    fourth = load_or_prepare(splits, out)
    assert len(counted_prepare) == 3, "a replaced image must trigger a rebuild"
    assert np.asarray(fourth["train"][fourth["train"]["image_id"].index(2)]["image"])[0, 0].tolist() == [200, 10, 10]

    load_or_prepare(splits, out, box_mask_iou_threshold=0.3)
    assert len(counted_prepare) == 4, "changed options must trigger a rebuild"
    load_or_prepare(splits, out, box_mask_iou_threshold=0.3)
    assert len(counted_prepare) == 4
    load_or_prepare(splits, out, box_mask_iou_threshold=0.3, force=True)
    assert len(counted_prepare) == 5


def test_failed_conversion_keeps_previous_output(tmp_path, coco_writer):
    path = _repairs_document(tmp_path, coco_writer)
    splits = {"train": (path, tmp_path / "src")}
    prepare_coco_dataset(splits, tmp_path / "out")
    image = tmp_path / "src" / "3.png"
    image.write_bytes(image.read_bytes()[:80])  # header readable, pixel data cut: fails while writing
    with pytest.raises(CocoValidationError, match=r"image id 3 \(3\.png\)"):
        prepare_coco_dataset(splits, tmp_path / "out")
    assert datasets.load_from_disk(str(tmp_path / "out"))["train"].num_rows == 3  # previous result intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary leftovers


def test_refuses_to_replace_an_unrelated_directory(tmp_path, coco_writer):
    path = _repairs_document(tmp_path, coco_writer)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_coco_dataset({"train": (path, tmp_path / "src")}, tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"


def test_conflicting_categories_across_splits_are_fatal(tmp_path, coco_writer):
    train = _repairs_document(tmp_path, coco_writer, "train")
    validation = _repairs_document(tmp_path, coco_writer, "validation")
    document = json.loads(validation.read_text())
    document["categories"][0]["name"] = "something else"
    validation.write_text(json.dumps(document))
    with pytest.raises(CocoValidationError, match="category id 1"):
        prepare_coco_dataset({"train": (train, tmp_path / "train"), "validation": (validation, tmp_path / "validation")},
                             tmp_path / "out")


def test_a_split_without_images_is_fatal(tmp_path, coco_writer):
    path = coco_writer(tmp_path / "src", [], [])
    with pytest.raises(CocoValidationError, match=r"lists no image.*Fix"):
        prepare_coco_dataset({"validation": (path, tmp_path / "src")}, tmp_path / "out")
