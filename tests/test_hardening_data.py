"""Bad inputs against the data and inference tools: each must end in a clear message or a counted
repair / drop, never a crash, a silent change or a file read from outside the images folder."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from modeling_efficientsam.data import (
    CocoValidationError,
    decode_rle,
    format_conversion_summary,
    load_box_source,
    prepare_coco_dataset,
    read_report,
    usable_object_count,
)
from modeling_efficientsam.data.masks import compressed_rle_counts, rle_problem
from modeling_efficientsam.image_utils import to_rgb_array
from modeling_efficientsam.inference.evaluate_cli import main as evaluate_main
from modeling_efficientsam.inference.export_onnx import main as export_main
from modeling_efficientsam.inference.loading import ModelLoadError, load_efficientsam_model
from modeling_efficientsam.inference.predict_cli import main as predict_main
from conftest import tiny_model, tiny_processor

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 64, 48


def _image(seed=0, size=(WIDTH, HEIGHT)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _square(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _one_image_coco(directory, annotations, coco_writer, images=None):
    """A COCO file with one 64 x 48 image ``a.png`` (id 1) and the given annotations."""
    images = images or [{"id": 1, "file_name": "a.png", "image": _image()}]
    for annotation in annotations:
        annotation.setdefault("image_id", 1)
        annotation.setdefault("category_id", 1)
    return coco_writer(directory, images, annotations)


def _prepare_command(annotations, images_dir, output_dir):
    command = [sys.executable, str(REPO / "data" / "prepare_dataset.py"), "--train_annotations", str(annotations),
               "--train_images", str(images_dir), "--output_dir", str(output_dir)]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_model_hardening")
    tiny_model(0).save_pretrained(directory)
    tiny_processor().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def damaged_models(model_dir, tmp_path_factory):
    """Copies of the tiny model with garbage weights, truncated weights and a broken config.json."""
    import shutil

    root = tmp_path_factory.mktemp("damaged_models")
    weights = (model_dir / "model.safetensors").read_bytes()
    models = {}
    for kind in ("garbage", "truncated", "config"):
        target = root / kind
        shutil.copytree(model_dir, target)
        if kind == "garbage":
            (target / "model.safetensors").write_bytes(b"\xff" * 100)
        elif kind == "truncated":
            (target / "model.safetensors").write_bytes(weights[: len(weights) // 2])
        else:
            (target / "config.json").write_text("{not json")
        models[kind] = target
    return models


def _quiet(main, argv):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------------------------------------
# 1. polygons with huge or non-finite coordinates


def test_huge_polygon_is_clipped_not_a_crash(tmp_path, coco_writer):
    annotations = [
        {"id": 5, "segmentation": [[0, 0, 1e12, 0, 1e12, 1e12]]},  # the triangle: used to segfault pycocotools
        {"id": 6, "segmentation": [_square(-1e12, 10, -1e12 + 5, 20)], "bbox": [0, 10, 5, 10]},  # far left, wholly outside
        {"id": 7, "segmentation": [_square(10, 10, 20, 20)], "bbox": [10, 10, 10, 10]},  # fine
    ]
    path = _one_image_coco(tmp_path / "src", annotations, coco_writer)
    result = _prepare_command(path, tmp_path / "src", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]  # a segfault is -11
    split = read_report(tmp_path / "out")["splits"]["train"]
    assert split["repaired"]["polygon_clipped"] == [{"annotation_id": 5, "image_id": 1, "file_name": "a.png"}]
    assert [entry["annotation_id"] for entry in split["dropped"]["polygon_outside_image"]] == [6]
    assert "polygon_outside_image" in result.stdout and "polygon_clipped" in result.stdout
    prepared = prepare_coco_dataset({"train": (path, tmp_path / "src")}, tmp_path / "out2")["train"]
    objects = {obj["id"]: obj for obj in prepared[0]["objects"]}
    # the triangle clipped at one image side past the border covers, inside the image, what the same
    # triangle with a moderate far corner covers (its edges are the image's top edge and the diagonal y = x)
    reference = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[0, 0, 200, 0, 200, 200]], HEIGHT, WIDTH)))
    assert np.array_equal(decode_rle(objects[5]["mask"]), reference.astype(bool))
    x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(reference)))
    np.testing.assert_allclose(objects[5]["box"], [x, y, x + w, y + h])  # box_missing: the mask's tight box


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_polygon_coordinates_are_errors(value, tmp_path, coco_writer):
    path = _one_image_coco(tmp_path / "src", [{"id": 9, "segmentation": [[0, 0, value, 0, 10, 10]]}], coco_writer)
    with pytest.raises(CocoValidationError) as caught:
        prepare_coco_dataset({"train": (path, tmp_path / "src")}, tmp_path / "out")
    message = str(caught.value)
    assert str(path) in message and "annotation id 9" in message and "not a finite number" in message and "Fix:" in message


def test_evaluate_survives_a_huge_polygon(model_dir, tmp_path, coco_writer):
    annotations = [{"id": 5, "segmentation": [[0, 0, 1e12, 0, 1e12, 1e12]]},
                   {"id": 7, "segmentation": [_square(10, 10, 20, 20)], "bbox": [10, 10, 10, 10]}]
    path = _one_image_coco(tmp_path / "src", annotations, coco_writer)
    status, printed, errors = _quiet(evaluate_main, ["--model", str(model_dir), "--dataset", str(path), "--no_progress"])
    assert status == 0, errors
    assert "polygon_clipped" in printed


# ---------------------------------------------------------------------------------------------
# 2. RLE checked at conversion


def test_compressed_rle_parser_matches_pycocotools():
    rng = np.random.default_rng(0)
    for trial in range(200):
        height, width = (int(v) for v in rng.integers(1, 120, 2))
        mask = rng.random((height, width)) < rng.random()
        if trial % 4 == 0:  # long runs (multi-character values, negative differences)
            mask = np.zeros((height, width), bool)
            mask[rng.integers(0, height):, rng.integers(0, width):] = True
        counts = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
        runs = compressed_rle_counts(counts)
        rebuilt = np.repeat(np.arange(len(runs)) % 2, runs).astype(bool).reshape(width, height).T
        assert np.array_equal(rebuilt, mask)
        assert rle_problem({"counts": counts.decode(), "size": [height, width]}, height, width) is None


@pytest.mark.parametrize(
    "segmentation, expected",
    [
        ({"counts": "!!!garbage~~~", "size": [HEIGHT, WIDTH]}, "character '!'"),
        ({"counts": "04", "size": [HEIGHT, WIDTH]}, f"cover 4 pixels, but a {HEIGHT} x {WIDTH} mask has {HEIGHT * WIDTH}"),
        ({"counts": "0`", "size": [HEIGHT, WIDTH]}, "truncated"),
        ({"counts": [10, 20], "size": [HEIGHT, WIDTH]}, "uncompressed RLE counts cover 30 pixels"),
        ({"counts": [HEIGHT * WIDTH + 5, -5], "size": [HEIGHT, WIDTH]}, "negative run length"),
        ({"counts": "PPYo1", "size": [640, 640]}, f"differs from the image size [height, width] = [{HEIGHT}, {WIDTH}]"),
    ],
)
@pytest.mark.parametrize("with_bbox", [False, True])
def test_invalid_rle_is_an_error_naming_the_annotation(segmentation, expected, with_bbox, tmp_path, coco_writer):
    annotation = {"id": 7, "segmentation": segmentation}
    if with_bbox:  # used to be dropped as box_mask_mismatch, without a bbox "repaired" with a 30-million-pixel area
        annotation["bbox"] = [0, 0, 10, 10]
    path = _one_image_coco(tmp_path / "src", [annotation], coco_writer)
    with pytest.raises(CocoValidationError) as caught:
        prepare_coco_dataset({"train": (path, tmp_path / "src")}, tmp_path / "out")
    message = str(caught.value)
    assert f"{path}: annotation id 7 (image id 1, a.png): " in message and expected in message and "Fix:" in message
    assert not (tmp_path / "out").exists()


def test_garbage_rle_command_line_exits_2(tmp_path, coco_writer):
    path = _one_image_coco(tmp_path / "src", [{"id": 6, "segmentation": {"counts": "!!!garbage~~~", "size": [HEIGHT, WIDTH]}}],
                           coco_writer)
    result = _prepare_command(path, tmp_path / "src", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {path}: annotation id 6 ")


# ---------------------------------------------------------------------------------------------
# 3. conversion summary and usable objects


def test_conversion_summary_from_folder_and_report(tmp_path, coco_writer):
    annotations = [
        {"id": 1, "segmentation": [_square(5, 5, 15, 15)]},  # box_missing
        {"id": 2, "segmentation": []},  # segmentation_missing
        {"id": 3, "segmentation": [_square(20, 20, 30, 30)], "bbox": [20, 20, 10, 10]},
    ]
    path = _one_image_coco(tmp_path / "src", annotations, coco_writer)
    prepare_coco_dataset({"train": (path, tmp_path / "src")}, tmp_path / "out")
    summary = format_conversion_summary(tmp_path / "out")
    first = summary.splitlines()[0]
    assert first.startswith("[train] 1 images, 3 annotations -> 2 objects kept (2 usable, 0 crowd), 1 dropped, 1 repaired")
    assert any(line.split() == ["dropped", "segmentation_missing", "1"] for line in summary.splitlines())
    assert any(line.split() == ["repaired", "box_missing", "1"] for line in summary.splitlines())
    assert summary.splitlines()[-1].endswith(str(tmp_path / "out" / "report.json"))
    report = read_report(tmp_path / "out")
    assert format_conversion_summary(report, report_path="R.json").splitlines()[-1].endswith("R.json")
    with pytest.raises(FileNotFoundError, match="report.json"):
        format_conversion_summary(tmp_path / "src")


def test_usable_object_count_and_a_split_without_usable_objects(tmp_path, coco_writer):
    images = [{"id": i, "file_name": f"{i}.png", "image": _image(i)} for i in (1, 2, 3)]
    annotations = [
        {"id": 1, "image_id": 1, "segmentation": [_square(5, 5, 15, 15)], "bbox": [5, 5, 10, 10]},
        {"id": 2, "image_id": 1, "segmentation": [_square(20, 20, 30, 30)], "bbox": [20, 20, 10, 10], "iscrowd": 1},
        {"id": 3, "image_id": 3, "segmentation": [_square(20, 20, 30, 30)], "bbox": [20, 20, 10, 10]},
    ]
    path = _one_image_coco(tmp_path / "src", annotations, coco_writer, images=images)
    crowd_only = _one_image_coco(tmp_path / "crowd", [
        {"id": 1, "segmentation": [_square(5, 5, 15, 15)], "bbox": [5, 5, 10, 10], "iscrowd": 1},
        {"id": 2, "segmentation": []}], coco_writer)
    prepared = prepare_coco_dataset({"train": (path, tmp_path / "src"), "validation": (crowd_only, tmp_path / "crowd")},
                                    tmp_path / "out")
    assert usable_object_count(prepared["train"]) == 2
    assert usable_object_count(prepared["train"].select([2])) == 1  # selections are honoured
    assert usable_object_count(prepared["train"].select([1])) == 0
    assert usable_object_count(prepared["validation"]) == 0
    summary = format_conversion_summary(tmp_path / "out")
    assert "the validation split has no usable (non-crowd) object" in summary
    assert "the train split has no usable" not in summary


# ---------------------------------------------------------------------------------------------
# 4. damaged model files


@pytest.mark.parametrize("kind, named", [("garbage", "model.safetensors"), ("truncated", "model.safetensors"),
                                         ("config", "config.json")])
def test_damaged_model_is_one_error_line_naming_the_file(kind, named, damaged_models, tmp_path, coco_writer):
    model = damaged_models[kind]
    with pytest.raises(ModelLoadError) as caught:
        load_efficientsam_model(model)
    assert str(caught.value).startswith(f"{model / named}: ") and "Fix:" in str(caught.value)

    path = _one_image_coco(tmp_path / "src", [{"id": 1, "segmentation": [_square(5, 5, 15, 15)], "bbox": [5, 5, 10, 10]}],
                           coco_writer)
    commands = {
        "predict": (predict_main, ["--model", str(model), "--images", str(tmp_path / "src"), "--boxes", str(path),
                                   "--output_dir", str(tmp_path / "pred"), "--no_progress"]),
        "evaluate": (evaluate_main, ["--model", str(model), "--dataset", str(path), "--no_progress"]),
        "export": (export_main, ["--model", str(model), "--output_dir", str(tmp_path / "onnx")]),
    }
    for name, (main, argv) in commands.items():
        status, _, errors = _quiet(main, argv)
        assert status == 2, (name, errors)
        last = errors.strip().splitlines()[-1]
        assert last.startswith(f"error: {model / named}: ") and "Fix:" in last, (name, errors)
        assert "Traceback" not in errors, name


def test_cache_embeddings_reports_a_damaged_model(damaged_models, tmp_path, coco_writer):
    path = _one_image_coco(tmp_path / "src", [{"id": 1, "segmentation": [_square(5, 5, 15, 15)], "bbox": [5, 5, 10, 10]}],
                           coco_writer)
    prepare_coco_dataset({"train": (path, tmp_path / "src")}, tmp_path / "out")
    spec = importlib.util.spec_from_file_location("cache_embeddings_script", REPO / "data" / "cache_embeddings.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = damaged_models["garbage"]
    status, _, errors = _quiet(script.main, ["--dataset", str(tmp_path / "out"), "--model", str(model), "--device", "cpu"])
    assert status == 2 and errors.strip().splitlines()[-1].startswith(f"error: {model / 'model.safetensors'}: ")


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=f"^{tmp_path / 'nowhere'}: no such model folder"):
        load_efficientsam_model(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# 5. predict: annotations without bbox


def test_predict_derives_missing_boxes_and_names_annotation_ids(model_dir, tmp_path, coco_writer):
    annotations = [
        {"id": 3, "segmentation": [_square(5, 5, 15, 15)], "bbox": [5, 5, 10, 10]},
        {"id": 7, "segmentation": [_square(20, 10, 40, 30)]},  # no bbox: the mask's tight box
        {"id": 8},  # neither: listed, not fatal
        {"id": 9, "segmentation": [[0, 0, 1e12, 0, 1e12, 1e12]]},  # huge polygon, no bbox: clipped, no crash
    ]
    path = _one_image_coco(tmp_path / "src", annotations, coco_writer)
    status, printed, errors = _quiet(predict_main, ["--model", str(model_dir), "--images", str(tmp_path / "src"),
                                                    "--boxes", str(path), "--output_dir", str(tmp_path / "pred"),
                                                    "--no_progress"])
    assert status == 0, errors
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["counts"]["box_from_segmentation"] == 2
    assert summary["problems"]["no_box"]["count"] == 1
    assert summary["problems"]["no_box"]["items"][0].startswith("annotation 8 (image id 1, a.png): no bbox")
    results = json.loads((tmp_path / "pred" / "segmentation_results.json").read_text())
    triangle = mask_utils.frPyObjects([[0, 0, 200, 0, 200, 200]], HEIGHT, WIDTH)  # the same inside the image
    triangle_box = [float(v) for v in mask_utils.toBbox(mask_utils.merge(triangle))]
    assert [r["prompt_bbox"] for r in results] == [[5, 5, 10, 10], [20.0, 10.0, 20.0, 20.0], triangle_box]

    document = json.loads(path.read_text())
    del document["annotations"][0]["image_id"]
    path.write_text(json.dumps(document))
    with pytest.raises(CocoValidationError, match=r"annotation 3: the record has no \"image_id\""):
        load_box_source(path)


# ---------------------------------------------------------------------------------------------
# 6. written files are readable by others


def test_outputs_are_world_readable(model_dir, tmp_path, coco_writer, umask_022):
    path = _one_image_coco(tmp_path / "src", [{"id": 1, "segmentation": [_square(5, 5, 15, 15)], "bbox": [5, 5, 10, 10]}],
                           coco_writer, images=[{"id": 1, "file_name": "sub/a.png", "image": _image()}])
    status, _, errors = _quiet(predict_main, ["--model", str(model_dir), "--images", str(tmp_path / "src"), "--boxes", str(path),
                                              "--output_dir", str(tmp_path / "pred"), "--overlays", "--no_progress"])
    assert status == 0, errors
    status, _, errors = _quiet(evaluate_main, ["--model", str(model_dir), "--dataset", str(path), "--no_progress",
                                               "--output", str(tmp_path / "eval" / "eval.json")])
    assert status == 0, errors
    prepare_coco_dataset({"train": (path, tmp_path / "src")}, tmp_path / "prepared")
    written = [tmp_path / "pred" / "segmentation_results.json", tmp_path / "pred" / "summary.json",
               tmp_path / "pred" / "overlays" / "sub" / "a.png", tmp_path / "eval" / "eval.json",
               tmp_path / "prepared" / "report.json"]
    for root in (tmp_path / "pred", tmp_path / "eval", tmp_path / "prepared"):
        for directory, folders, files in os.walk(root):
            assert stat.S_IMODE(os.stat(directory).st_mode) == 0o755, directory
            for name in files:
                assert stat.S_IMODE(os.stat(Path(directory) / name).st_mode) == 0o644, Path(directory) / name
    assert all(path.is_file() for path in written)


# ---------------------------------------------------------------------------------------------
# 7. images: empty, non-finite, out of range; file names outside the folder; duplicates


@pytest.mark.parametrize("image", [np.zeros((0, 0, 3), np.uint8), np.zeros((5, 0), np.uint8), torch.zeros(3, 0, 0),
                                   Image.new("RGB", (0, 0))], ids=["array", "zero-width", "tensor", "pil"])
def test_empty_image_is_a_clear_error(image):
    with pytest.raises(ValueError, match=r"has no pixels \(\d+ x \d+, width x height\)"):
        to_rgb_array(image)


def test_predictor_names_the_empty_image(model_dir):
    from modeling_efficientsam.inference import EfficientSamPredictor

    predictor = EfficientSamPredictor.from_pretrained(model_dir, device="cpu")
    with pytest.raises(ValueError, match=r"^image 1: .*has no pixels"):
        predictor.predict_batch([np.zeros((8, 8, 3), np.uint8), np.zeros((0, 0, 3), np.uint8)], [[[0, 0, 4, 4]], [[0, 0, 1, 1]]])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_float_image_is_an_error(value):
    array = np.full((4, 4, 3), 0.5, np.float32)
    array[1, 2, 0] = value
    with pytest.raises(ValueError, match="1 non-finite values"):
        to_rgb_array(array)
    with pytest.raises(ValueError, match="non-finite"):
        to_rgb_array(Image.fromarray(array[..., 0]))  # a 32-bit float ("F") PIL image


@pytest.mark.parametrize("low, high", [(0.0, 255.0), (-0.2, 0.5), (0.0, 1.01)])
def test_float_image_out_of_range_is_an_error_not_clipped(low, high):
    array = np.linspace(low, high, 48, dtype=np.float32).reshape(4, 4, 3)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*Fix: scale the image into \[0, 1\]"):
        to_rgb_array(array)


def test_in_range_images_convert_as_documented():
    floats = np.array([[0.0, 0.5, 1.0, 1.0 + 0.4 / 255]], np.float64)  # within half an 8-bit step of 1
    assert to_rgb_array(floats)[0, :, 0].tolist() == [0, 128, 255, 255]
    assert to_rgb_array(np.array([[0, 7, 255]], np.uint8))[0, :, 0].tolist() == [0, 7, 255]  # uint8: as is
    assert to_rgb_array(np.array([[0, 32768, 65535]], np.uint16))[0, :, 0].tolist() == [0, 128, 255]  # uint16: / 65535
    assert to_rgb_array(Image.fromarray(np.array([[0.0, 200.0]], np.float32)))[0, :, 0].tolist() == [0, 200]  # F, 0..255


@pytest.mark.parametrize("file_name", ["../outside.png", "sub/../../outside.png", "ABSOLUTE"])
def test_file_name_outside_the_images_folder_is_an_error(file_name, model_dir, tmp_path, coco_writer):
    (tmp_path / "src").mkdir()
    _image().save(tmp_path / "outside.png")
    if file_name == "ABSOLUTE":
        file_name = str(tmp_path / "outside.png")
    path = coco_writer(tmp_path / "src", [{"id": 4, "file_name": file_name, "width": WIDTH, "height": HEIGHT}],
                       [{"id": 1, "image_id": 4, "category_id": 1, "segmentation": [_square(5, 5, 15, 15)], "bbox": [5, 5, 10, 10]}])
    with pytest.raises(CocoValidationError) as caught:
        prepare_coco_dataset({"train": (path, tmp_path / "src")}, tmp_path / "out")
    message = str(caught.value)
    assert message.startswith(f"{path}: image id 4 ({file_name}): file_name leads outside the images folder") and "Fix:" in message
    status, _, errors = _quiet(predict_main, ["--model", str(model_dir), "--images", str(tmp_path / "src"), "--boxes", str(path),
                                              "--output_dir", str(tmp_path / "pred"), "--no_progress"])
    assert status == 2 and f"image id 4 ({file_name}): file_name leads outside" in errors


def test_absolute_file_name_inside_the_folder_is_accepted(tmp_path, coco_writer):
    path = _one_image_coco(tmp_path / "src", [{"id": 1, "segmentation": [_square(5, 5, 15, 15)], "bbox": [5, 5, 10, 10]}],
                           coco_writer)
    document = json.loads(path.read_text())
    document["images"][0]["file_name"] = str(tmp_path / "src" / "a.png")
    path.write_text(json.dumps(document))
    prepared = prepare_coco_dataset({"train": (path, tmp_path / "src")}, tmp_path / "out")
    assert prepared["train"].num_rows == 1


def test_two_image_records_for_one_file_are_an_error(tmp_path, coco_writer):
    images = [{"id": 1, "file_name": "a.png", "image": _image()}, {"id": 2, "file_name": "b.png", "image": _image(1)}]
    path = coco_writer(tmp_path / "src", images, [])
    document = json.loads(path.read_text())
    document["images"][1]["file_name"] = "./a.png"
    path.write_text(json.dumps(document))
    with pytest.raises(CocoValidationError) as caught:
        prepare_coco_dataset({"train": (path, tmp_path / "src")}, tmp_path / "out")
    message = str(caught.value)
    assert message.startswith(f"{path}: image id 2 (./a.png): ") and "image id 1" in message and "Fix:" in message
    with pytest.raises(CocoValidationError, match="same file as image id 1"):
        load_box_source(path)
