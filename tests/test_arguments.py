"""Recipes, argument parsing, range checks and the original guide's config mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from modeling_efficientsam.training.argument_parsing import (
    last_complete_checkpoint,
    load_recipe,
    parse_efficientsam_args,
)
from modeling_efficientsam.training.config_mapping import GUIDE_KEYS, map_original_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes" / "pcb").glob("*.yaml"))
ACCELERATE_CONFIGS = [REPO / "accelerate_config.yaml"] + sorted((REPO / "recipes" / "accelerate_configs").glob("*.yaml"))

# The original guide's full config, every key it documents (defaults from its README).
GUIDE_FULL = {
    "model": {"student_variant": "vitt", "teacher_variant": "vits", "freeze_encoder": True, "freeze_prompt_encoder": True},
    "dataset": {
        "train_root": "data/pcb/train", "train_annotation": "data/pcb/train/_annotations.coco.json",
        "val_root": "data/pcb/valid", "val_annotation": "data/pcb/valid/_annotations.coco.json",
        "target_size": 1024, "max_objects": 10, "iou_threshold": 0.5, "random_box_augmentation": True,
        "box_noise_scale": 0.1,
    },
    "training": {
        "epochs": 50, "batch_size": 4, "learning_rate": 1e-4, "min_lr": 1e-6, "optimizer": "adamw", "scheduler": "cosine",
        "weight_decay": 1e-4, "momentum": 0.9, "lr_decay_step": 20, "lr_decay_gamma": 0.1, "warmup_epochs": 5,
        "grad_clip_norm": 1.0, "num_workers": 4, "pin_memory": True, "prefetch_factor": 2, "print_freq": 10,
        "adaptive_update_freq": 100, "smoothing_factor": 0.95,
    },
    "losses": {"focal_alpha": 0.25, "focal_gamma": 2.0, "focal_weight": 1.0, "dice_weight": 1.0, "iou_weight": 1.0,
               "boundary_weight": 0.5},
    "distillation": {"enabled": True, "temperature": 4.0, "max_temperature": 4.0, "min_temperature": 1.0, "alpha": 0.7,
                     "beta": 0.3, "feature_distillation": True, "attention_distillation": True},
}


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture
def minimal_recipe(tmp_path):
    return _write(tmp_path / "recipe.yaml", yaml.safe_dump({
        "model_variant": "vitt", "init_from_scratch": True, "dataset_path": "somewhere",
        "output_dir": str(tmp_path / "out"), "report_to": "none", "learning_rate": 1e-3,
    }))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_parses_strictly(recipe):
    values = load_recipe(str(recipe))
    model_args, data_args, training_args = parse_efficientsam_args([str(recipe)])
    # Every key of the recipe arrived in one of the dataclasses with the recipe's value.
    merged = {**vars(model_args), **vars(data_args), **{k: getattr(training_args, k) for k in values if hasattr(training_args, k)}}
    for key, value in values.items():
        assert key in merged, key
        if key == "dataloader_pin_memory" and training_args.use_cpu:
            continue  # TrainingArguments turns pinning off on a CPU-only machine
        got = merged[key]
        got = getattr(got, "value", got)
        if isinstance(value, float):
            assert got == pytest.approx(value), key
        elif key != "report_to":
            assert got == value, key


def test_quickstart_recipes_are_offline_and_train_the_encoder():
    quick = load_recipe(str(REPO / "recipes" / "quickstart.yaml"))
    assert quick["init_from_scratch"] and quick["freeze_vision_encoder"] is False
    assert quick["model_config"].startswith("recipes/configs/") and (REPO / quick["model_config"]).is_file()
    distill = load_recipe(str(REPO / "recipes" / "quickstart_distill.yaml"))
    assert distill["teacher_model_name_or_path"] == quick["output_dir"]
    teacher_config = json.loads((REPO / quick["model_config"]).read_text())
    student_config = json.loads((REPO / distill["model_config"]).read_text())
    assert student_config["vision_config"]["hidden_size"] < teacher_config["vision_config"]["hidden_size"]
    for recipe in ("finetune_vitt", "finetune_vitt_light", "distill_vits_to_vitt"):
        values = load_recipe(str(REPO / "recipes" / "pcb" / f"{recipe}.yaml"))
        assert values["model_name_or_path"] == "models/efficientsam-vitt"
    standard = load_recipe(str(REPO / "recipes" / "pcb" / "finetune_vitt.yaml"))
    light = load_recipe(str(REPO / "recipes" / "pcb" / "finetune_vitt_light.yaml"))
    assert (standard["per_device_train_batch_size"], standard["learning_rate"], standard["num_train_epochs"]) == (4, 1e-4, 50)
    assert (light["per_device_train_batch_size"], light["learning_rate"], light["num_train_epochs"]) == (2, 5e-4, 20)


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.num_processes >= 1
    text = (REPO / "recipes" / "README.md").read_text()
    if config.parent.name == "accelerate_configs":
        assert f"recipes/accelerate_configs/{config.name}" in text, f"recipes/README.md lacks the launch command for {config.name}"


def test_command_line_overrides_recipe(minimal_recipe):
    _, data_args, training_args = parse_efficientsam_args([minimal_recipe, "--learning_rate", "3e-4", "--max_objects", "2"])
    assert training_args.learning_rate == pytest.approx(3e-4)
    assert data_args.max_objects == 2


def test_defaults_follow_the_project_conventions(minimal_recipe):
    model_args, _, training_args = parse_efficientsam_args([minimal_recipe])
    assert model_args.freeze_vision_encoder and model_args.freeze_prompt_encoder
    assert training_args.metric_for_best_model == "eval_mean_iou" and training_args.greater_is_better
    assert training_args.load_best_model_at_end and training_args.eval_on_start
    assert training_args.report_to == []  # the recipe said none; the default is tensorboard
    _, _, default_args = parse_efficientsam_args([minimal_recipe, "--report_to", "tensorboard"])
    assert default_args.report_to == ["tensorboard"]


def test_unknown_recipe_key_is_an_error_naming_it(tmp_path, minimal_recipe):
    values = yaml.safe_load(Path(minimal_recipe).read_text())
    values["lerning_rate"] = 1e-3
    bad = _write(tmp_path / "bad.yaml", yaml.safe_dump(values))
    with pytest.raises(ValueError, match="lerning_rate"):
        parse_efficientsam_args([bad])


def test_unknown_flag_is_an_error_naming_it(minimal_recipe):
    with pytest.raises(ValueError, match="--max_objectz"):
        parse_efficientsam_args([minimal_recipe, "--max_objectz", "3"])


def test_nested_recipe_is_refused_with_a_pointer_to_config(tmp_path):
    nested = _write(tmp_path / "nested.yaml", yaml.safe_dump({"training": {"epochs": 3}}))
    with pytest.raises(ValueError, match="--config"):
        parse_efficientsam_args([nested])


def test_recipe_values_are_type_checked(tmp_path, minimal_recipe):
    values = yaml.safe_load(Path(minimal_recipe).read_text())
    values["learning_rate"] = "fast"
    bad = _write(tmp_path / "typed.yaml", yaml.safe_dump(values))
    # argparse's "invalid float value", as one error naming the recipe that set it (no usage dump, no exit)
    with pytest.raises(ValueError, match=f"--learning_rate.*invalid float value: 'fast' \\(set in {bad}\\)"):
        parse_efficientsam_args([bad])


@pytest.mark.parametrize("flag, value, message", [
    ("--min_temperature", "5.0", "min_temperature"),
    ("--focal_gamma", "-1", "focal_gamma"),
    ("--dice_weight", "-0.5", "dice_weight"),
    ("--smoothing_factor", "1.0", "smoothing_factor"),
    ("--loss_weighting", "magic", "loss_weighting"),
    ("--optimizer", "lamb", "optimizer"),
    ("--scheduler", "poly", "scheduler"),
    ("--momentum", "1.5", "momentum"),
    ("--lr_decay_gamma", "0", "lr_decay_gamma"),
    ("--alpha_end", "-0.1", "alpha_end"),
    ("--distill_decay", "exp", "distill_decay"),
    ("--box_noise_scale", "-0.1", "box_noise_scale"),
    ("--max_objects", "0", "max_objects"),
    ("--box_mask_iou_threshold", "1.5", "box_mask_iou_threshold"),
    ("--prompt_mode", "scribble", "prompt_mode"),
    ("--min_lr", "1.0", "min_lr"),
    ("--adaptive_update_freq", "0", "adaptive_update_freq"),
    ("--attn_implementation", "flash", "attn_implementation"),
])
def test_range_checks(minimal_recipe, flag, value, message):
    with pytest.raises(ValueError, match=message):
        parse_efficientsam_args([minimal_recipe, flag, value])


def test_choices_and_checks_are_those_of_the_implementing_modules(minimal_recipe):
    from transformers import HfArgumentParser

    from modeling_efficientsam.training.arguments import ARGUMENT_CLASSES
    from modeling_efficientsam.training.optimization import OPTIMIZERS, SCHEDULERS
    from modeling_efficientsam.training.schedules import DISTILLATION_DECAYS, DistillationSchedule
    from modeling_efficientsam.training.weighting import LOSS_WEIGHTING_STRATEGIES, DynamicWeightAverage

    for flag, choices in (("--optimizer", OPTIMIZERS), ("--scheduler", SCHEDULERS), ("--distill_decay", DISTILLATION_DECAYS),
                          ("--loss_weighting", LOSS_WEIGHTING_STRATEGIES)):
        for choice in choices:  # every choice a module implements is accepted ...
            parse_efficientsam_args([minimal_recipe, flag, choice])
    help_text = " ".join(HfArgumentParser(ARGUMENT_CLASSES).format_help().split())
    for choice in OPTIMIZERS + SCHEDULERS + DISTILLATION_DECAYS + LOSS_WEIGHTING_STRATEGIES:
        assert f"'{choice}'" in help_text, choice  # ... and listed in the help
    # The arguments and the modules refuse the same values with the same message.
    with pytest.raises(ValueError, match="adaptive_update_freq") as from_arguments:
        parse_efficientsam_args([minimal_recipe, "--adaptive_update_freq", "0"])
    with pytest.raises(ValueError, match="adaptive_update_freq") as from_module:
        DynamicWeightAverage({"a": 1.0}, update_freq=0)
    assert str(from_arguments.value).startswith(str(from_module.value))  # plus where it was set and the fix
    with pytest.raises(ValueError, match="beta_start") as from_arguments:
        parse_efficientsam_args([minimal_recipe, "--beta_start", "-1"])
    with pytest.raises(ValueError, match="beta_start") as from_module:
        DistillationSchedule(total_steps=10, steps_per_epoch=2, beta_start=-1.0)
    assert str(from_arguments.value).startswith(str(from_module.value))


def test_model_source_rules(tmp_path):
    base = {"dataset_path": "d", "output_dir": str(tmp_path / "o"), "report_to": "none"}
    no_model = _write(tmp_path / "a.yaml", yaml.safe_dump(base))
    with pytest.raises(ValueError, match="no student model"):
        parse_efficientsam_args([no_model])
    not_confirmed = _write(tmp_path / "b.yaml", yaml.safe_dump({**base, "model_variant": "vits"}))
    with pytest.raises(ValueError, match="init_from_scratch"):
        parse_efficientsam_args([not_confirmed])
    both = _write(tmp_path / "c.yaml", yaml.safe_dump({**base, "model_variant": "vits", "init_from_scratch": True,
                                                        "model_name_or_path": "models/x"}))
    with pytest.raises(ValueError, match="not both"):
        parse_efficientsam_args([both])
    teacher = _write(tmp_path / "d.yaml", yaml.safe_dump({**base, "model_name_or_path": "m", "teacher_model_name_or_path": "t"}))
    model_args, _, _ = parse_efficientsam_args([teacher, "--teacher_model_name_or_path", "none"])
    assert model_args.teacher_model_name_or_path is None


def test_guide_config_maps_every_documented_key(tmp_path):
    flat = map_original_config(GUIDE_FULL)
    assert flat["model_name_or_path"] == "yunyangx/EfficientSAM/efficient_sam_vitt.pt"
    assert flat["teacher_model_name_or_path"] == "yunyangx/EfficientSAM/efficient_sam_vits.pt"
    assert flat["freeze_vision_encoder"] is True
    assert flat["train_images"] == "data/pcb/train" and flat["validation_annotations"].endswith("valid/_annotations.coco.json")
    assert flat["image_size"] == 1024 and flat["box_mask_iou_threshold"] == 0.5
    assert flat["num_train_epochs"] == 50 and flat["per_device_train_batch_size"] == 4
    assert flat["max_grad_norm"] == 1.0 and flat["dataloader_num_workers"] == 4 and flat["logging_steps"] == 10
    assert flat["lr_decay_epochs"] == 20 and flat["warmup_epochs"] == 5 and flat["distill_warmup_epochs"] == 5
    assert flat["loss_weighting"] == "dwa" and flat["adaptive_update_freq"] == 100
    assert flat["max_temperature"] == 4.0 and flat["min_temperature"] == 1.0
    assert flat["alpha_start"] == 0.7 and flat["beta_start"] == 0.3
    # Every documented key has a mapping.
    documented = {section: set(keys) for section, keys in GUIDE_KEYS.items()}
    assert documented == {section: set(keys) for section, keys in GUIDE_FULL.items()}

    path = tmp_path / "guide.json"
    path.write_text(json.dumps(GUIDE_FULL))
    model_args, data_args, training_args = parse_efficientsam_args(
        ["--config", str(path), "--save_dir", str(tmp_path / "out"), "--report_to", "none", "--device", "cpu"])
    assert training_args.output_dir == str(tmp_path / "out") and training_args.use_cpu
    assert data_args.max_objects == 10 and training_args.optimizer == "adamw"
    assert training_args.per_device_eval_batch_size == 4


def test_guide_config_options():
    light = json.loads(json.dumps(GUIDE_FULL))
    light["distillation"]["enabled"] = False
    light["dataset"]["random_box_augmentation"] = False
    flat = map_original_config(light)
    assert flat["teacher_model_name_or_path"] is None
    assert flat["box_noise_scale"] == 0.0  # the switch wins over box_noise_scale
    no_teacher = json.loads(json.dumps(GUIDE_FULL))
    no_teacher["model"]["teacher_variant"] = None
    assert map_original_config(no_teacher)["teacher_model_name_or_path"] is None


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["training"].update(bogus=1), "training.bogus"),
    (lambda c: c.update(scheduler={"type": "cosine"}), "section 'scheduler'"),
    (lambda c: c["distillation"].update(temperature=3.0), "temperature"),
    (lambda c: c["model"].update(student_variant="vitl"), "variant"),
])
def test_guide_config_errors_name_the_problem(mutate, message):
    config = json.loads(json.dumps(GUIDE_FULL))
    mutate(config)
    with pytest.raises(ValueError, match=message):
        map_original_config(config)


def test_resume_last_picks_the_newest_complete_checkpoint(tmp_path, minimal_recipe):
    import torch
    from safetensors.torch import save_file

    out = tmp_path / "out"
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if complete:  # complete: a readable state and readable weights (tests/test_hardening_train.py: the broken kinds)
            (folder / "trainer_state.json").write_text("{}")
            save_file({"weight": torch.zeros(1)}, str(folder / "model.safetensors"))
    assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-4")
    _, _, training_args = parse_efficientsam_args([minimal_recipe, "--resume_from_checkpoint", "last"])
    assert training_args.resume_from_checkpoint == str(out / "checkpoint-4")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        parse_efficientsam_args([minimal_recipe, "--resume_from_checkpoint", "last", "--output_dir", str(tmp_path / "empty")])


def test_a_data_source_given_as_flags_replaces_the_recipes(tmp_path):
    """`train.py recipes/pcb/finetune_vitt.yaml --dataset_name me/pcb` (documented in README.md) trains on the Hub dataset."""
    recipe = _write(tmp_path / "coco.yaml", yaml.safe_dump({
        "model_variant": "vitt", "init_from_scratch": True, "report_to": "none", "output_dir": str(tmp_path / "out"),
        "train_annotations": "data/train.json", "train_images": "data/train", "validation_annotations": "data/valid.json",
        "validation_images": "data/valid",
    }))
    _, data_args, _ = parse_efficientsam_args([recipe, "--dataset_name", "me/pcb"])
    assert data_args.dataset_name == "me/pcb" and data_args.train_annotations is None and data_args.validation_images is None
    _, data_args, _ = parse_efficientsam_args([recipe, "--dataset_path=prepared"])
    assert data_args.dataset_path == "prepared" and data_args.train_images is None
    _, data_args, _ = parse_efficientsam_args([recipe, "--train_annotations", "other.json"])  # same kind: only that value changes
    assert (data_args.train_annotations, data_args.train_images) == ("other.json", "data/train")
    with pytest.raises(ValueError, match="one source of data"):  # two sources on the command line stay an error
        parse_efficientsam_args([recipe, "--dataset_name", "me/pcb", "--dataset_path", "prepared"])
    _, data_args, _ = parse_efficientsam_args([recipe, "--dataset_name", "none"])  # switching nothing on keeps the recipe's
    assert data_args.dataset_name is None and data_args.train_annotations == "data/train.json"
