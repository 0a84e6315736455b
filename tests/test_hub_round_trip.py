"""A saved folder is usable where this package is not: transformers Auto classes with trust_remote_code.

The checks that matter run in a subprocess whose import system refuses `modeling_efficientsam` (and
whose working directory is elsewhere), so only the code files that `save_pretrained` copied next to
the weights can serve the classes.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import Trainer, TrainingArguments

from modeling_efficientsam import (
    EfficientSamImageProcessor,
    EfficientSamModel,
    EfficientSamProcessor,
)
from modeling_efficientsam.hub_usage import USAGE_SNIPPET, usage_snippet

from conftest import run_without_package, sample_image, tiny_config, tiny_model  # noqa: E402

BOXES = [[[10, 12, 70, 50], [60, 40, 150, 110]]]  # one image, two boxes (xyxy pixels)
CODE_FILES = {
    "configuration_efficientsam.py", "modeling_efficientsam.py", "image_processing_efficientsam.py",
    "image_utils.py", "mask_generation_efficientsam.py", "processing_efficientsam.py",
}

def save_small_model(folder: Path) -> tuple[EfficientSamModel, EfficientSamProcessor]:
    model = tiny_model(seed=0, initializer_range=0.3).eval()
    processor = EfficientSamProcessor(EfficientSamImageProcessor(size=64))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("efficientsam_hub") / "model"
    model, processor = save_small_model(folder)
    return folder, model, processor


def relative_imports(path: Path) -> set[str]:
    return set(re.findall(r"^\s*from\s+\.(\w+)\s+import", path.read_text(), flags=re.MULTILINE))


def test_saved_folder_maps_every_auto_class_and_holds_the_code(saved):
    folder, _, _ = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_efficientsam.EfficientSamConfig",
        "AutoModel": "modeling_efficientsam.EfficientSamModel",
        "AutoModelForMaskGeneration": "modeling_efficientsam.EfficientSamModel",
    }
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_efficientsam.EfficientSamProcessor"}
    assert processor_config["image_processor"]["auto_map"]["AutoImageProcessor"] == (
        "image_processing_efficientsam.EfficientSamImageProcessor"
    )
    assert processor_config["image_processor"]["size"] == 64  # saved as a plain integer
    present = {path.name for path in folder.glob("*.py")}
    assert CODE_FILES <= present
    for name in present:  # every relative import of a copied file is copied too
        missing = {f"{module}.py" for module in relative_imports(folder / name)} - present
        assert not missing, f"{name} imports {missing}, which save_pretrained did not copy"
        assert not re.search(r"^\s*(from|import)\s+modeling_efficientsam\b", (folder / name).read_text(), re.MULTILINE)


def test_trainer_save_model_writes_a_remote_code_folder(tmp_path):
    """Training saves with Trainer.save_model + processor.save_pretrained; that folder must carry the code too."""
    torch.manual_seed(0)
    model = EfficientSamModel(tiny_config(initializer_range=0.3))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    Trainer(model=model, args=args).save_model()
    EfficientSamProcessor(EfficientSamImageProcessor(size=64)).save_pretrained(tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {"AutoConfig", "AutoModel", "AutoModelForMaskGeneration"} <= set(config["auto_map"])
    assert "AutoProcessor" in json.loads((tmp_path / "run" / "processor_config.json").read_text())["auto_map"]
    assert CODE_FILES <= {path.name for path in (tmp_path / "run").glob("*.py")}


def test_blocked_process_loads_every_auto_class_and_matches(saved, tmp_path):
    folder, model, processor = saved
    image = sample_image()
    image.save(tmp_path / "image.png")
    inputs = processor(images=image, input_boxes=BOXES)
    with torch.no_grad():
        expected = model(**inputs)
    expected_masks = processor.post_process_masks(expected.pred_masks, inputs["original_sizes"], binarize=False)[0]

    code = textwrap.dedent(
        f"""
        import json, sys
        import torch
        from PIL import Image
        from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForMaskGeneration,
                                  AutoProcessor)

        folder, resaved = {str(folder)!r}, "resaved"
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        for_masks = AutoModelForMaskGeneration.from_pretrained(folder, trust_remote_code=True).eval()
        image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        classes = {{name: type(obj).__module__ + "." + type(obj).__name__ for name, obj in
                   [("config", config), ("model", model), ("for_masks", for_masks),
                    ("image_processor", image_processor), ("processor", processor)]}}

        image = Image.open("image.png")
        inputs = processor(images=image, input_boxes={BOXES!r})
        with torch.no_grad():
            outputs = model(**inputs)
            outputs_for_masks = for_masks(**inputs)
        logits = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"], binarize=False)[0]
        binary = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"])[0]
        pixel_values = image_processor(image)["pixel_values"]

        # a model and processor loaded from remote code save a folder that loads the same way
        for_masks.save_pretrained(resaved)
        processor.save_pretrained(resaved)
        again = AutoModelForMaskGeneration.from_pretrained(resaved, trust_remote_code=True).eval()
        again_processor = AutoProcessor.from_pretrained(resaved, trust_remote_code=True)
        with torch.no_grad():
            again_outputs = again(**again_processor(images=image, input_boxes={BOXES!r}))
        torch.save({{"classes": classes, "image_size": config.image_size, "iou_scores": outputs.iou_scores,
                    "pred_masks": outputs.pred_masks, "iou_scores_for_masks": outputs_for_masks.iou_scores,
                    "logits": logits, "binary": binary, "pixel_values": pixel_values,
                    "input_boxes": inputs["input_boxes"], "again_iou_scores": again_outputs.iou_scores,
                    "resaved_auto_map": json.load(open(resaved + "/config.json"))["auto_map"]}}, "result.pt")
        """
    )
    run_without_package(code, tmp_path)
    result = torch.load(tmp_path / "result.pt", weights_only=False)

    for name, qualified in result["classes"].items():
        assert qualified.startswith("transformers_modules."), f"{name} came from {qualified}, not from the folder's code"
    assert result["classes"]["model"].endswith(".modeling_efficientsam.EfficientSamModel")
    assert result["classes"]["for_masks"].endswith(".modeling_efficientsam.EfficientSamModel")
    assert result["classes"]["image_processor"].endswith(".EfficientSamImageProcessor")
    assert result["classes"]["processor"].endswith(".processing_efficientsam.EfficientSamProcessor")
    assert result["image_size"] == 64
    assert "AutoModelForMaskGeneration" in result["resaved_auto_map"]

    torch.testing.assert_close(result["pixel_values"], inputs["pixel_values"])
    torch.testing.assert_close(result["input_boxes"], inputs["input_boxes"])
    torch.testing.assert_close(result["iou_scores"], expected.iou_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result["iou_scores_for_masks"], expected.iou_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result["again_iou_scores"], expected.iou_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result["pred_masks"], expected.pred_masks, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(result["logits"], expected_masks, atol=1e-4, rtol=1e-5)
    assert result["binary"].shape == (2, 3, 120, 160) and result["binary"].dtype == torch.bool
    decided = expected_masks.abs() > 1e-3  # pixels whose sign no rounding can flip
    assert torch.equal(result["binary"][decided], (expected_masks > 0)[decided])
    assert result["binary"].any() and not result["binary"].all()


def test_usage_snippet_runs_as_written_without_the_package(saved, tmp_path):
    folder, model, processor = saved
    assert "{repo_id}" in USAGE_SNIPPET and "modeling_efficientsam" not in USAGE_SNIPPET
    assert "trust_remote_code=True" in USAGE_SNIPPET
    snippet = usage_snippet(str(folder))
    assert f'repo_id = "{folder}"' in snippet
    with pytest.raises(ValueError):
        usage_snippet('bad"name')
    sample_image().save(tmp_path / "image.jpg")  # the file name the snippet opens
    (tmp_path / "snippet.py").write_text(snippet)
    checks = textwrap.dedent(
        """
        import runpy, torch
        names = runpy.run_path("snippet.py", run_name="__main__")
        torch.save({"object_masks": names["object_masks"], "best": names["best"],
                    "count": len(names["result"]["masks"]), "scores": names["result"]["scores"],
                    "shapes": sorted({tuple(mask.shape) for mask in names["result"]["masks"]}),
                    "model_module": type(names["model"]).__module__}, "snippet_result.pt")
        """
    )
    completed = run_without_package(checks, tmp_path)
    result = torch.load(tmp_path / "snippet_result.pt", weights_only=False)
    assert result["model_module"].startswith("transformers_modules.")
    assert f"{result['count']} masks" in completed.stdout
    assert result["object_masks"].shape == (1, 120, 160) and result["object_masks"].dtype == torch.bool

    # the same prompt in this process, with the package
    image = Image.open(tmp_path / "image.jpg").convert("RGB")
    inputs = processor(images=image, input_boxes=[[[40, 30, 120, 90]]], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    logits = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"], binarize=False)[0]
    best = outputs.iou_scores[0].argmax(-1)
    assert torch.equal(result["best"], best)
    expected = logits[0, best[0]]
    decided = expected.abs() > 1e-3
    assert torch.equal(result["object_masks"][0][decided], (expected > 0)[decided])
    assert all(shape == (120, 160) for shape in result["shapes"])
    assert len(result["scores"]) == result["count"]
    assert bool((result["scores"] > 0.88).all())


def test_readme_shows_the_tested_snippet():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert usage_snippet("your-name/efficientsam-pcb") in readme
