"""Shared test setup: offline Hugging Face libraries, the ../shared fixtures, small COCO builders."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional

import pytest

# Tests never touch the network (set before datasets / huggingface_hub are imported by any test).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"



def pytest_configure(config):
    # pycocotools' decode trips a numpy 2 deprecation notice on every call; it is not ours to fix.
    config.addinivalue_line(
        "filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    )


# ------------------------------------------------------------------------------------------------
# The tiny model every test uses: 64 px input, 4 x 4 token grid, 16 x 16 masks; trains in milliseconds.
# ------------------------------------------------------------------------------------------------
TINY_CONFIG = {
    "vision_config": {"image_size": 64, "patch_size": 16, "hidden_size": 32, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "pretrain_image_size": 64, "neck_hidden_sizes": [32, 32]},
    "mask_decoder_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_dim": 64,
                            "iou_head_hidden_dim": 32, "upscaling_dims": [16, 8]},
}


# The architecture of ../shared's reference_tiny fixture (128 px input, 8 x 8 grid, 64-channel
# embeddings), as changes to TINY_CONFIG, for tests that need a larger grid or were tuned on it.
TINY_128 = {
    "image_size": 128, "encoder_width": 48,
    "vision_config": {"num_hidden_layers": 2, "num_attention_heads": 3, "pretrain_image_size": 224,
                      "neck_hidden_sizes": [64, 64]},
    "mask_decoder_config": {"hidden_size": 64, "num_attention_heads": 8, "mlp_dim": 128, "iou_head_hidden_dim": 64},
}


def tiny_config_dict(image_size: Optional[int] = None, encoder_width: Optional[int] = None, **overrides) -> dict:
    """``TINY_CONFIG`` (a fresh copy) with changes: ``image_size`` (input side, a multiple of 16),
    ``encoder_width`` (ViT width), sub-config dicts merged key by key, other keys set as given."""
    config = copy.deepcopy(TINY_CONFIG)
    if image_size is not None:
        config["vision_config"].update(image_size=image_size, pretrain_image_size=image_size)
    if encoder_width is not None:
        config["vision_config"]["hidden_size"] = encoder_width
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


def tiny_config(**changes):
    """The tiny ``EfficientSamConfig`` (see :func:`tiny_config_dict` for the changes it takes)."""
    from modeling_efficientsam import EfficientSamConfig

    return EfficientSamConfig(**tiny_config_dict(**changes))


def tiny_model(seed: int = 0, freeze_encoder: bool = False, **changes):
    """A tiny ``EfficientSamModel`` with weights drawn from ``seed`` (in train mode, like from_pretrained
    would not be: call ``.eval()`` for inference). ``initializer_range=0.1`` or more makes random
    outputs react visibly to the prompts."""
    import torch

    from modeling_efficientsam import EfficientSamModel

    torch.manual_seed(seed)
    model = EfficientSamModel(tiny_config(**changes))
    model.vision_encoder.requires_grad_(not freeze_encoder)
    return model


def tiny_processor(image_size: int = 64):
    from modeling_efficientsam import EfficientSamImageProcessor, EfficientSamProcessor

    return EfficientSamProcessor(EfficientSamImageProcessor(size=image_size))


@pytest.fixture
def umask_022():
    """The usual umask for the test's duration (so file modes can be checked)."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def run_by_hand(model_dir, image, boxes):
    """The reference path for one image: processor -> model -> post_process_masks, without the
    predictor. Returns the model output and the (boxes, candidates, H, W) resized logits."""
    import torch

    from modeling_efficientsam import EfficientSamImageProcessor, EfficientSamModel, EfficientSamProcessor

    model = EfficientSamModel.from_pretrained(model_dir).eval()
    processor = EfficientSamProcessor(EfficientSamImageProcessor.from_pretrained(model_dir))
    inputs = processor(images=image, input_boxes=[boxes])
    with torch.no_grad():
        output = model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"])
    return output, processor.post_process_masks(output.pred_masks, inputs["original_sizes"], binarize=False)[0]


@pytest.fixture
def restore_logging():
    """train.main sets transformers' verbosity and the package's logger levels; put them back afterwards."""
    import logging

    import transformers

    verbosity = transformers.utils.logging.get_verbosity()
    levels = {name: logging.getLogger(name).level for name in ("train", "modeling_efficientsam")}
    yield
    transformers.utils.logging.set_verbosity(verbosity)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def sample_image(height: int = 120, width: int = 160):
    """A dark noisy picture with two overlapping bright rectangles (yellow and blue)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    pixels[height // 6 : height // 2, width // 8 : width // 2] = (220, 200, 40)
    pixels[height * 5 // 12 : height * 5 // 6, width * 7 // 16 : width * 7 // 8] = (30, 90, 210)
    return Image.fromarray(pixels)


# ------------------------------------------------------------------------------------------------
# A process where this package cannot be imported (what a Hub user without it has).
# ------------------------------------------------------------------------------------------------
# Prepended to every subprocess: the package cannot be imported, whatever sys.path or the editable install say.
BLOCK_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, sys

    class _RefuseEfficientSamPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_efficientsam" or name.startswith("modeling_efficientsam."):
                raise ImportError(name + " is blocked in this process")
            return None

    sys.meta_path.insert(0, _RefuseEfficientSamPackage())
    try:
        import modeling_efficientsam
    except ImportError:
        pass
    else:
        raise SystemExit("modeling_efficientsam was importable; the test would prove nothing")
    """
)


def run_without_package(code: str, cwd: Path, timeout: int = 300):
    """Run ``code`` in a fresh interpreter (same virtualenv) where ``import modeling_efficientsam`` fails."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "hf_modules"),
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-c", BLOCK_PACKAGE + "\n" + code], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-6000:]}"
    return result


# ------------------------------------------------------------------------------------------------
# Training helpers shared by the trainer, distillation and command-line tests.
# ------------------------------------------------------------------------------------------------
def tiny_dataset(split, box_noise_scale: float = 0.1, max_objects=4, seed: int = 0, **kwargs):
    from modeling_efficientsam.data import EfficientSamTrainingDataset

    return EfficientSamTrainingDataset(split, image_size=64, mask_size=16, max_objects=max_objects,
                                       box_noise_scale=box_noise_scale, seed=seed, **kwargs)


def tiny_args(output_dir, **overrides):
    from modeling_efficientsam.training import EfficientSamTrainingArguments

    values = dict(
        output_dir=str(output_dir), report_to="none", per_device_train_batch_size=2, per_device_eval_batch_size=2,
        num_train_epochs=1, learning_rate=1e-2, eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
        eval_on_start=False, logging_steps=1, seed=0, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )
    values.update(overrides)
    return EfficientSamTrainingArguments(**values)


def make_trainer(output_dir, dataset, model=None, teacher=None, train=None, evaluation=None, id2label=None, **overrides):
    from modeling_efficientsam.training import EfficientSamTrainer

    model = model if model is not None else tiny_model()
    train = train if train is not None else tiny_dataset(dataset["train"])
    return EfficientSamTrainer(model=model, args=tiny_args(output_dir, **overrides), teacher_model=teacher,
                               train_dataset=train, eval_dataset=evaluation, id2label=id2label)


def first_batch(dataset, indices=(0, 1), **kwargs):
    from modeling_efficientsam.data import EfficientSamCollator

    data = tiny_dataset(dataset["train"], **kwargs)
    return EfficientSamCollator()([data[i] for i in indices])


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
