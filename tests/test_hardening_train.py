"""Bad inputs to train.py: each ends in one `error: ...` line (file and fix, exit status 2), found early.

Covers: a training split whose annotations are all dropped (refused before training, conversion
summary logged on prepare and reuse), half-written checkpoints (`--resume_from_checkpoint last`
falls back to the previous complete one), an embedding cache built with another shard size
(reused), missing / malformed recipes and configs, out-of-range values, abbreviated flags, a model
path that does not exist offline, an unwritable or already used output_dir (checked before any
expensive work), a full disk while preparing or checkpointing, checkpoint rotation that keeps the
best and the newest, and the teacher's placement under every launch configuration.

Most runs call train.py's `main` in this process (fast); one runs it as a real process.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import TINY_CONFIG, tiny_args, tiny_dataset, tiny_model

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Set-up: a tiny prepared dataset, its raw COCO files, a recipe; train.py loaded as a module
# ------------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("restore_logging")  # train.main changes logging levels


@pytest.fixture(scope="module")
def train_script():
    spec = importlib.util.spec_from_file_location("train_script_under_test", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from modeling_efficientsam.data import prepare_coco_dataset
    from modeling_efficientsam.data.synthetic_pcb import make_synthetic_pcb

    root = tmp_path_factory.mktemp("hardening_train")
    splits = make_synthetic_pcb(root / "raw", num_train=4, num_validation=2, seed=1, width=160, height=120)
    prepare_coco_dataset(splits, root / "dataset")
    (root / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    # The training split again, every box far from its mask: the conversion drops every annotation.
    shutil.copytree(root / "raw" / "train", root / "all_dropped")
    document = json.loads((root / "all_dropped" / "_annotations.coco.json").read_text())
    for annotation in document["annotations"]:
        annotation["bbox"] = [0, 0, 2, 2]
    (root / "all_dropped" / "_annotations.coco.json").write_text(json.dumps(document))
    return SimpleNamespace(root=root, splits=splits, dataset=root / "dataset", model_config=root / "tiny.json")


def write_recipe(path: Path, workspace, **changes) -> str:
    recipe = {
        "model_config": str(workspace.model_config), "init_from_scratch": True, "freeze_vision_encoder": False,
        "dataset_path": str(workspace.dataset), "max_objects": 4, "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2, "learning_rate": 1.0e-2, "seed": 0, "report_to": "none",
        "num_overlay_images": 0, "disable_tqdm": True, "dataloader_num_workers": 0,
    }
    recipe.update(changes)
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def coco_recipe(path: Path, workspace, train_dir: Path, **changes) -> str:
    """A recipe that names raw COCO files (train.py converts them) instead of a prepared folder."""
    validation_json, validation_images = workspace.splits["validation"]
    return write_recipe(path, workspace, dataset_path=None, train_annotations=str(train_dir / "_annotations.coco.json"),
                        train_images=str(train_dir), validation_annotations=str(validation_json),
                        validation_images=str(validation_images), **changes)


def run_main(train_script, argv, capsys):
    """(exit status, stdout, stderr) of train.py's main in this process."""
    try:
        train_script.main([str(a) for a in argv])
        status = 0
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def the_error(status, err, *fragments) -> str:
    """The one `error: ...` line of a failed run; checks status 2, no traceback, the fragments and a fix."""
    assert status == 2, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Fix:" in lines[0], lines[0]
    return lines[0]


class Stop(Exception):
    """Raised by a stand-in for an expensive step: reaching it means the checks before it passed."""


def forbid(monkeypatch, train_script, *names):
    """Make the expensive steps of train.py fail the test if they are reached."""
    for name in names:
        monkeypatch.setattr(train_script, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} ran before the check"))


def stop_at(monkeypatch, train_script, name="build_student"):
    def stand_in(*args, **kwargs):
        raise Stop(name)

    monkeypatch.setattr(train_script, name, stand_in)


# ------------------------------------------------------------------------------------------------
# 1. A split without a usable object; the conversion summary on prepare and reuse
# ------------------------------------------------------------------------------------------------
def test_training_split_with_every_annotation_dropped_is_refused_before_training(train_script, workspace, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    recipe = coco_recipe(tmp_path / "recipe.yaml", workspace, workspace.root / "all_dropped")
    output = tmp_path / "out"
    status, _, err = run_main(train_script, [recipe, "--output_dir", output, "--max_steps", "2"], capsys)
    line = the_error(status, err, str(workspace.root / "all_dropped" / "_annotations.coco.json"), "train split has no usable object",
                     "report.json", "box_mask_iou_threshold")
    assert "nothing to train on" in line
    assert not (output / "model.safetensors").exists() and not list(output.glob("checkpoint-*"))
    summary = caplog.text
    assert "conversion summary" in summary and "box_mask_mismatch" in summary and "0 objects kept" in summary
    assert str(output / "prepared_dataset" / "report.json") in summary

    # The second run reuses the conversion: the summary is logged again, the refusal is the same.
    caplog.clear()
    status, _, err = run_main(train_script, [recipe, "--output_dir", output, "--max_steps", "2"], capsys)
    the_error(status, err, "train split has no usable object")
    assert "reusing the prepared dataset" in caplog.text and "conversion summary" in caplog.text
    assert "box_mask_mismatch" in caplog.text


def test_conversion_summary_for_a_prepared_folder_and_one_without_report(workspace, tmp_path, caplog):
    from modeling_efficientsam.training.argument_parsing import parse_efficientsam_args
    from modeling_efficientsam.training.dataset_building import prepare_dataset

    caplog.set_level(logging.INFO)
    _, data_args, training_args = parse_efficientsam_args([write_recipe(tmp_path / "r.yaml", workspace, output_dir=str(tmp_path / "o"))])
    prepare_dataset(data_args, training_args)
    assert "conversion summary" in caplog.text and str(workspace.dataset / "report.json") in caplog.text

    bare = tmp_path / "bare"
    shutil.copytree(workspace.dataset, bare, ignore=shutil.ignore_patterns("report.json", "embeddings"))
    caplog.clear()
    data_args.dataset_path = str(bare)
    prepare_dataset(data_args, training_args)
    assert "has no report.json" in caplog.text


def test_usable_objects_are_counted_after_max_train_samples(workspace, tmp_path):
    import datasets

    from modeling_efficientsam.training.argument_parsing import parse_efficientsam_args
    from modeling_efficientsam.training.dataset_building import build_datasets
    from modeling_efficientsam.training.run_checks import TrainingSetupError

    dataset = datasets.load_from_disk(str(workspace.dataset))
    # The first training image loses its objects; the others keep theirs.
    emptied = dataset["train"].map(lambda row, index: {"objects": [] if index == 0 else row["objects"]}, with_indices=True,
                                   features=dataset["train"].features)
    dataset = datasets.DatasetDict({"train": emptied, "validation": dataset["validation"]})
    model_args, data_args, training_args = parse_efficientsam_args([write_recipe(tmp_path / "r.yaml", workspace,
                                                                                 output_dir=str(tmp_path / "o"))])
    student = tiny_model()
    train, evaluation, _ = build_datasets(dataset, None, data_args, training_args, student)
    assert len(train) == 4 and evaluation is not None
    data_args.max_train_samples = 1
    with pytest.raises(TrainingSetupError, match=r"train split has no usable object.*raise max_train_samples \(now 1\)"):
        build_datasets(dataset, None, data_args, training_args, student)


# ------------------------------------------------------------------------------------------------
# 2. Resuming: only complete checkpoints; nothing to resume from is an error
# ------------------------------------------------------------------------------------------------
def make_checkpoint(folder: Path, state="{}", weights=True):
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
    if weights is True:
        save_file({"weight": torch.zeros(2)}, str(folder / "model.safetensors"))
    elif weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_last_complete_checkpoint_skips_unreadable_ones(tmp_path, caplog):
    from modeling_efficientsam.training.argument_parsing import last_complete_checkpoint
    from modeling_efficientsam.training.checkpoints import checkpoint_problem

    good = make_checkpoint(tmp_path / "checkpoint-2")
    half_state = make_checkpoint(tmp_path / "checkpoint-4", state='{"global_step": 4, "log_hi')
    bad_weights = make_checkpoint(tmp_path / "checkpoint-6", weights=b"\x10\x00\x00\x00\x00\x00\x00\x00{\"weight\": ")
    no_weights = make_checkpoint(tmp_path / "checkpoint-8", weights=None)
    make_checkpoint(tmp_path / "checkpoint-10", state=None)
    assert "trainer_state.json: cannot be read" in checkpoint_problem(str(half_state))
    assert "model.safetensors: the weights cannot be read" in checkpoint_problem(str(bad_weights))
    assert "no model weights" in checkpoint_problem(str(no_weights))
    assert checkpoint_problem(str(good)) is None
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(str(tmp_path)) == str(good)
    for step in (4, 6, 8, 10):
        assert f"checkpoint-{step}" in caplog.text
    shutil.rmtree(good)
    assert last_complete_checkpoint(str(tmp_path)) is None


def test_resume_last_falls_back_past_a_half_written_checkpoint(train_script, workspace, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    recipe = write_recipe(tmp_path / "recipe.yaml", workspace, eval_strategy="no", save_strategy="steps", save_steps=1,
                          load_best_model_at_end=False, eval_on_start=False, save_total_limit=None)
    output = tmp_path / "out"
    status, _, err = run_main(train_script, [recipe, "--output_dir", output, "--max_steps", "2"], capsys)
    assert status == 0, err[-3000:]
    state = output / "checkpoint-2" / "trainer_state.json"
    state.write_text(state.read_text()[:40])  # killed while writing the newest checkpoint's state

    status, _, err = run_main(train_script, [recipe, "--output_dir", output, "--max_steps", "3",
                                             "--resume_from_checkpoint", "last"], capsys)
    assert status == 0, err[-3000:]
    assert f"resuming from {output / 'checkpoint-1'}" in caplog.text
    assert "skipping" in caplog.text and str(state) in caplog.text
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 3


def test_resuming_with_no_checkpoint_or_an_incomplete_one_is_an_error(train_script, workspace, tmp_path, capsys, monkeypatch):
    recipe = write_recipe(tmp_path / "recipe.yaml", workspace)
    forbid(monkeypatch, train_script, "build_student", "prepare_dataset")
    status, _, err = run_main(train_script, [recipe, "--output_dir", tmp_path / "empty", "--resume_from_checkpoint", "last"], capsys)
    the_error(status, err, "--resume_from_checkpoint last", "no complete checkpoint", str(tmp_path / "empty"))
    broken = make_checkpoint(tmp_path / "run" / "checkpoint-3", state='{"glo')
    status, _, err = run_main(train_script, [recipe, "--output_dir", tmp_path / "run", "--resume_from_checkpoint", broken], capsys)
    the_error(status, err, str(broken / "trainer_state.json"), "cannot be read")


# ------------------------------------------------------------------------------------------------
# 3. An embedding cache written with another shard size is reused
# ------------------------------------------------------------------------------------------------
def test_complete_cache_is_reused_whatever_its_shard_size(workspace, tmp_path):
    from modeling_efficientsam.data.embedding_cache import build_embedding_cache

    model = tiny_model(freeze_encoder=True)
    kwargs = dict(dtype="float32", batch_size=2, cache_root=str(tmp_path / "cache"))
    first = build_embedding_cache(str(workspace.dataset), model, shard_size=2, **kwargs)  # like cache_embeddings.py --shard_size 2
    again = build_embedding_cache(str(workspace.dataset), model, **kwargs)  # train.py's default shard size (64)
    assert again.root == first.root
    for split, stats in again.build_stats.items():
        assert stats["computed_shards"] == [] and len(stats["reused_shards"]) == len(first.build_stats[split]["computed_shards"]), split
        assert again.metadata[split]["shard_size"] == 2


# ------------------------------------------------------------------------------------------------
# 4. User errors: one line naming the file and the fix, exit status 2
# ------------------------------------------------------------------------------------------------
def test_missing_recipe(train_script, tmp_path, capsys):
    status, _, err = run_main(train_script, [tmp_path / "nope.yaml"], capsys)
    the_error(status, err, f"recipe {tmp_path / 'nope.yaml'}: no such file")


def test_yaml_syntax_error_names_file_line_and_column(train_script, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("init_from_scratch: true\nlearning_rate: 0.1\n  max_steps: 2\n")  # an indented key
    status, _, err = run_main(train_script, [bad], capsys)
    the_error(status, err, f"recipe {bad}: not valid YAML", "line 3, column 12")


def test_truncated_guide_config_names_the_file(train_script, tmp_path, capsys):
    config = tmp_path / "guide.json"
    config.write_text(json.dumps({"model": {"student_variant": "vitt"}, "training": {"epochs": 2}})[:30])
    status, _, err = run_main(train_script, ["--config", config, "--save_dir", tmp_path / "o"], capsys)
    the_error(status, err, f"--config {config}: not valid JSON", "line 1")


@pytest.mark.parametrize("name", ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"])
def test_zero_batch_size_in_a_recipe_names_the_recipe(train_script, workspace, tmp_path, capsys, name):
    recipe = write_recipe(tmp_path / "recipe.yaml", workspace, **{name: 0})
    status, _, err = run_main(train_script, [recipe, "--output_dir", tmp_path / "o"], capsys)
    the_error(status, err, f"{name} must be >= 1, got 0", f"set in {recipe}")


def test_mistyped_model_path_offline(train_script, workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = write_recipe(tmp_path / "recipe.yaml", workspace, model_config=None, init_from_scratch=False,
                          model_name_or_path="models/efficientsam-vit")
    forbid(monkeypatch, train_script, "prepare_dataset")
    status, _, err = run_main(train_script, [recipe, "--output_dir", tmp_path / "o"], capsys)
    the_error(status, err, "model_name_or_path: models/efficientsam-vit", "cannot load the model")
    status, _, err = run_main(train_script, [recipe, "--output_dir", tmp_path / "o", "--model_name_or_path",
                                             tmp_path / "models" / "missing"], capsys)
    the_error(status, err, f"{tmp_path / 'models' / 'missing'}: no such model folder")


def test_unwritable_output_dir_is_found_before_any_expensive_work(train_script, workspace, tmp_path, capsys, monkeypatch):
    forbid(monkeypatch, train_script, "build_student", "build_teacher", "prepare_dataset", "build_datasets")
    recipe = write_recipe(tmp_path / "recipe.yaml", workspace)
    (tmp_path / "a_file").write_text("not a folder")
    status, _, err = run_main(train_script, [recipe, "--output_dir", tmp_path / "a_file" / "out"], capsys)
    the_error(status, err, f"output_dir {tmp_path / 'a_file' / 'out'}: cannot write there")

    import modeling_efficientsam.training.run_checks as run_checks

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(run_checks.tempfile, "mkstemp", refuse)  # what a read-only folder answers
    status, _, err = run_main(train_script, [recipe, "--output_dir", tmp_path / "read_only"], capsys)
    the_error(status, err, f"output_dir {tmp_path / 'read_only'}: cannot write there (Permission denied)", "--output_dir")


def test_disk_full_while_preparing_names_the_folder(train_script, workspace, tmp_path, capsys, monkeypatch):
    import datasets.arrow_writer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets.arrow_writer.ArrowWriter, "write", full)
    recipe = coco_recipe(tmp_path / "recipe.yaml", workspace, Path(workspace.splits["train"][1]),
                         prepared_dataset_dir=str(tmp_path / "prepared"))
    status, _, err = run_main(train_script, [recipe, "--output_dir", tmp_path / "o"], capsys)
    the_error(status, err, f"{tmp_path / 'prepared'}: no space left on the device while preparing the dataset",
              "--prepared_dataset_dir")


def test_disk_full_while_checkpointing_names_the_folder(train_script, workspace, tmp_path, capsys, monkeypatch):
    from transformers.trainer_callback import TrainerState

    save = TrainerState.save_to_json

    def full_in_checkpoints(self, path):
        if "checkpoint-" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(self, path)

    monkeypatch.setattr(TrainerState, "save_to_json", full_in_checkpoints)
    recipe = write_recipe(tmp_path / "recipe.yaml", workspace, eval_strategy="no", save_strategy="steps", save_steps=1,
                          load_best_model_at_end=False, eval_on_start=False)
    output = tmp_path / "out"
    status, _, err = run_main(train_script, [recipe, "--output_dir", output, "--max_steps", "1"], capsys)
    the_error(status, err, f"{output}: no space left on the device while training, checkpointing and saving",
              str(output / "checkpoint-1" / "trainer_state.json"), "--output_dir")


def test_a_real_process_prints_one_line_and_exits_with_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: [\n")
    result = subprocess.run([sys.executable, str(REPO / "train.py"), str(bad)], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    the_error(result.returncode, result.stderr, f"recipe {bad}: not valid YAML")


# ------------------------------------------------------------------------------------------------
# 5. Abbreviated flags are unknown flags
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--learning_rat", "--output_di", "--overwrite_output"])
def test_abbreviated_flags_are_refused(workspace, tmp_path, flag):
    from modeling_efficientsam.training.argument_parsing import parse_efficientsam_args
    from modeling_efficientsam.training.run_checks import TrainingSetupError

    recipe = write_recipe(tmp_path / "recipe.yaml", workspace, output_dir=str(tmp_path / "o"))
    with pytest.raises(TrainingSetupError, match=f"unknown command-line argument.*'{flag}'.*abbreviations"):
        parse_efficientsam_args([recipe, flag, "1"])


# ------------------------------------------------------------------------------------------------
# 6. An output_dir holding an earlier run
# ------------------------------------------------------------------------------------------------
def finished_run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("config.json", "eval_before_training.json", "eval_results.json"):
        (folder / name).write_text('{"earlier": true}')
    make_checkpoint(folder / "checkpoint-5")
    return folder


def test_new_run_into_a_finished_output_dir_is_refused(train_script, workspace, tmp_path, capsys, monkeypatch):
    output = finished_run(tmp_path / "out")
    forbid(monkeypatch, train_script, "build_student", "prepare_dataset")
    recipe = write_recipe(tmp_path / "recipe.yaml", workspace)
    status, _, err = run_main(train_script, [recipe, "--output_dir", output], capsys)
    the_error(status, err, f"output_dir {output} already holds an earlier run", "config.json", "--overwrite_output_dir true",
              "--resume_from_checkpoint last")
    assert (output / "eval_before_training.json").read_text() == '{"earlier": true}'


def test_overwrite_flag_or_resuming_there_lets_the_run_start(train_script, workspace, tmp_path, capsys, monkeypatch):
    recipe = write_recipe(tmp_path / "recipe.yaml", workspace)
    stop_at(monkeypatch, train_script)
    output = finished_run(tmp_path / "resumed")
    with pytest.raises(Stop):  # resuming from a checkpoint of that folder: no refusal, nothing removed
        train_script.main([recipe, "--output_dir", str(output), "--resume_from_checkpoint", "last"])
    assert (output / "checkpoint-5").is_dir()
    output = finished_run(tmp_path / "replaced")
    with pytest.raises(Stop):  # replacing it: the earlier run's checkpoints go, so none is mistaken for this run's
        train_script.main([recipe, "--output_dir", str(output), "--overwrite_output_dir", "true"])
    assert not (output / "checkpoint-5").exists()
    prepared_only = tmp_path / "prepared_only"
    (prepared_only / "prepared_dataset").mkdir(parents=True)
    with pytest.raises(Stop):  # a prepared dataset (or an embedding cache) alone is no earlier result
        train_script.main([recipe, "--output_dir", str(prepared_only)])


# ------------------------------------------------------------------------------------------------
# 7. Checkpoint rotation keeps the best and the newest
# ------------------------------------------------------------------------------------------------
def test_rotation_keeps_best_and_newest_by_step(tmp_path, monkeypatch):
    from modeling_efficientsam.training.checkpoints import rotate_checkpoints

    for step in (2, 4, 9, 10):
        make_checkpoint(tmp_path / f"checkpoint-{step}")
    monkeypatch.chdir(tmp_path)
    deleted = rotate_checkpoints(str(tmp_path), 1, keep=["./checkpoint-4"])  # best spelled relative, as a resumed state may
    assert sorted(os.path.basename(p) for p in deleted) == ["checkpoint-2", "checkpoint-9"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-4"]
    assert rotate_checkpoints(str(tmp_path), None) == [] and rotate_checkpoints(str(tmp_path), 2) == []


class FallingMetric:
    """compute_metrics stand-in whose mIoU only falls: the first evaluated checkpoint stays the best."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prediction, compute_result=True):
        self.calls += 1
        return {"mean_iou": 1.0 / self.calls}


def test_save_total_limit_one_with_best_model_keeps_best_and_newest(tmp_path, synthetic_pcb_dataset):
    from modeling_efficientsam.training import EfficientSamTrainer

    args = tiny_args(tmp_path, eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True, num_train_epochs=3,
                     save_total_limit=1, metric_for_best_model="eval_mean_iou", greater_is_better=True)
    train = tiny_dataset(synthetic_pcb_dataset["train"].select(range(2)))
    evaluation = tiny_dataset(synthetic_pcb_dataset["validation"].select(range(1)), box_noise_scale=0.0)
    trainer = EfficientSamTrainer(model=tiny_model(), args=args, train_dataset=train, eval_dataset=evaluation,
                                  compute_metrics=FallingMetric())
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-1")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]
    assert args.save_total_limit == 1  # given back after training


# ------------------------------------------------------------------------------------------------
# 8. The teacher's placement under every launch configuration
# ------------------------------------------------------------------------------------------------
class FakeAccelerator:
    """What prepare_teacher reads of an Accelerator, for a launch configuration this machine cannot run."""

    def __init__(self, distributed_type, device="meta", places=False, zero_stage=None, dtype=torch.bfloat16):
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType[distributed_type]
        self.device = torch.device(device)
        self.places = places
        self.prepared = []
        plugin = SimpleNamespace(zero_stage=zero_stage, hf_ds_config=SimpleNamespace(dtype=lambda: dtype),
                                 deepspeed_config={"zero_optimization": {"stage": zero_stage}, "optimizer": {"type": "AdamW"},
                                                   "bf16": {"enabled": True}})
        self.state = SimpleNamespace(deepspeed_plugin=plugin if zero_stage is not None else None)
        self.mixed_precision = "bf16"

    def prepare_model(self, model, device_placement=None, evaluation_mode=False):
        assert evaluation_mode, "the teacher is prepared for evaluation only"
        self.prepared.append(model)
        return model.to(self.device) if self.places else model


def assert_frozen_on(teacher, device, dtype=torch.float32):
    assert not teacher.training and all(not module.training for module in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert {p.device for p in teacher.parameters()} == {torch.device(device)}
    assert {p.dtype for p in teacher.parameters()} == {dtype}


@pytest.mark.parametrize("kind, places", [("FSDP", False), ("MULTI_GPU", True), ("NO", True), ("MULTI_CPU", True)])
def test_teacher_is_moved_where_accelerate_did_not_place_it(kind, places):
    from modeling_efficientsam.training.teacher_placement import prepare_teacher

    accelerator = FakeAccelerator(kind, places=places)
    teacher = prepare_teacher(tiny_model().train(), accelerator)
    assert accelerator.prepared, "prepare_model(evaluation_mode=True) adds the mixed-precision autocast"
    assert_frozen_on(teacher, "meta")


def test_teacher_under_deepspeed_zero2_takes_the_device_and_deepspeeds_dtype():
    from modeling_efficientsam.training.teacher_placement import prepare_teacher

    accelerator = FakeAccelerator("DEEPSPEED", zero_stage=2)
    teacher = prepare_teacher(tiny_model().train(), accelerator)
    assert accelerator.prepared == []  # DeepSpeed adds no autocast: the Trainer casts the inputs to bf16 instead
    assert_frozen_on(teacher, "meta", torch.bfloat16)


def test_teacher_under_deepspeed_zero3_gets_its_own_engine(monkeypatch):
    from modeling_efficientsam.training.teacher_placement import prepare_teacher

    calls = []

    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    def initialize(model=None, config=None):
        calls.append(config)
        return Engine(model), None, None, None

    monkeypatch.setitem(sys.modules, "deepspeed", SimpleNamespace(initialize=initialize))
    accelerator = FakeAccelerator("DEEPSPEED", zero_stage=3)
    engine = prepare_teacher(tiny_model().train(), accelerator)
    (config,) = calls
    assert config["zero_optimization"]["stage"] == 3 and "optimizer" not in config
    assert "optimizer" in accelerator.state.deepspeed_plugin.deepspeed_config  # the student's config is left alone
    assert not engine.training and all(not p.requires_grad for p in engine.parameters())


def test_trainer_keeps_the_teacher_frozen_on_the_training_device(tmp_path, synthetic_pcb_dataset):
    from conftest import make_trainer

    teacher = tiny_model(seed=3).train()
    trainer = make_trainer(tmp_path, synthetic_pcb_dataset, teacher=teacher, max_steps=1)
    assert_frozen_on(trainer.teacher, trainer.args.device)
    trainer.train()
    assert_frozen_on(trainer.teacher, trainer.args.device)
