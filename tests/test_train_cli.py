"""The real command line: `accelerate launch train.py RECIPE` in subprocesses, on a tiny model.

* one process and two gloo processes (a CPU-only `--multi_gpu` launch) train to the same weights and
  metrics: the normalization by the global number of real queries makes the split irrelevant
  (tolerance: metrics 1e-3 absolute, weights 1e-4 absolute; observed differences are float rounding);
* a run killed with SIGKILL after a checkpoint and resumed with `--resume_from_checkpoint last` ends
  with the same weights and metrics as the uninterrupted run;
* the saved folder reloads with `from_pretrained` and reproduces its evaluation;
* decoder-only fine-tuning from the embedding cache with a teacher runs end to end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from modeling_efficientsam import EfficientSamModel, EfficientSamProcessor
from conftest import TINY_CONFIG, tiny_dataset

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
METRICS = ("eval_mean_iou", "eval_mean_category_iou", "eval_f1", "eval_boundary_f1", "eval_loss")


def _launch(*launcher_args: str, recipe: Path, output_dir: Path, extra=(), timeout: int = 240, popen: bool = False):
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, str(REPO / "train.py"), str(recipe),
               "--output_dir", str(output_dir), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = open(str(output_dir) + ".log", "w")
    if popen:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    result = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    text = Path(str(output_dir) + ".log").read_text()
    assert result.returncode == 0, text[-4000:]
    return text


def _results(output_dir: Path) -> dict:
    return json.loads((output_dir / "eval_results.json").read_text())


def _weights(output_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(output_dir / "model.safetensors"))


def _train_losses(output_dir: Path) -> list:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from modeling_efficientsam.data import prepare_coco_dataset
    from modeling_efficientsam.data.synthetic_pcb import make_synthetic_pcb

    root = tmp_path_factory.mktemp("cli")
    splits = make_synthetic_pcb(root / "raw", num_train=8, num_validation=4, seed=1, width=160, height=120)
    prepare_coco_dataset(splits, root / "dataset")
    (root / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    recipe = {
        "model_config": str(root / "tiny.json"), "init_from_scratch": True,
        "freeze_vision_encoder": False, "freeze_prompt_encoder": False,
        "dataset_path": str(root / "dataset"), "max_objects": 4, "box_noise_scale": 0.1,
        "num_train_epochs": 8, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 2,
        "learning_rate": 1.0e-2, "scheduler": "cosine", "min_lr": 1.0e-4, "warmup_epochs": 1, "seed": 0,
        "report_to": "none", "save_total_limit": 3, "num_overlay_images": 0, "disable_tqdm": True,
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    return root


@pytest.fixture(scope="module")
def baseline(workspace):
    """The uninterrupted single-process run every other run is compared with."""
    output = workspace / "one_process"
    _launch("--cpu", recipe=workspace / "tiny.yaml", output_dir=output)
    return output


def test_two_processes_match_one(workspace, baseline):
    output = workspace / "two_processes"
    log = _launch("--multi_gpu", "--num_processes", "2", recipe=workspace / "tiny.yaml", output_dir=output,
                  extra=["--per_device_train_batch_size", "2"])
    assert "process 0 of 2" in log  # really two processes (gloo on CPU)
    one, two = _results(baseline), _results(output)
    assert one["eval_num_instances"] == two["eval_num_instances"] > 0
    for key in METRICS:
        assert two[key] == pytest.approx(one[key], abs=1e-3), key
    for key, value in _weights(baseline).items():
        torch.testing.assert_close(_weights(output)[key], value, atol=1e-4, rtol=1e-3)
    losses_one, losses_two = _train_losses(baseline), _train_losses(output)
    assert [s for s, _ in losses_one] == [s for s, _ in losses_two] and len(losses_one) == 16
    for (_, a), (_, b) in zip(losses_one, losses_two):
        assert b == pytest.approx(a, rel=1e-4)
    before = json.loads((baseline / "eval_before_training.json").read_text())
    assert one["eval_mean_iou"] != before["eval_mean_iou"]  # training changed the model


def test_killed_run_resumes_to_the_same_result(workspace, baseline):
    output = workspace / "killed"
    process = _launch("--cpu", recipe=workspace / "tiny.yaml", output_dir=output, popen=True)
    marker = output / "checkpoint-6" / "trainer_state.json"
    deadline = time.time() + 180
    while process.poll() is None and not marker.exists() and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert marker.exists(), Path(str(output) + ".log").read_text()[-3000:]
    assert not (output / "eval_results.json").exists(), "the run finished before it could be killed"
    log = _launch("--cpu", recipe=workspace / "tiny.yaml", output_dir=output, extra=["--resume_from_checkpoint", "last"])
    assert f"resuming from {output / 'checkpoint-'}" in log
    resumed, uninterrupted = _results(output), _results(baseline)
    for key in METRICS:
        assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-6), key
    for key, value in _weights(baseline).items():
        torch.testing.assert_close(_weights(output)[key], value, atol=1e-6, rtol=1e-6)
    assert _train_losses(output)[-1] == pytest.approx(_train_losses(baseline)[-1])


def test_saved_folder_reloads_and_reproduces_its_evaluation(workspace, baseline):
    import datasets

    from modeling_efficientsam.training import EfficientSamTrainer, EfficientSamTrainingArguments

    model = EfficientSamModel.from_pretrained(baseline)
    processor = EfficientSamProcessor.from_pretrained(baseline)
    assert processor.size == TINY_CONFIG["vision_config"]["image_size"]
    dataset = datasets.load_from_disk(str(workspace / "dataset"))
    names = dataset["train"].features["objects"].feature["category"].names
    args = EfficientSamTrainingArguments(output_dir=str(workspace / "reload"), report_to="none", per_device_eval_batch_size=2,
                                         use_cpu=True, disable_tqdm=True)
    trainer = EfficientSamTrainer(model=model, args=args, eval_dataset=tiny_dataset(dataset["validation"], box_noise_scale=0.0,
                                                                                    max_objects=None),
                                  id2label=dict(enumerate(names)))
    metrics = trainer.evaluate()
    saved = _results(baseline)
    for key in METRICS:
        assert metrics[key] == pytest.approx(saved[key], abs=1e-6), key
    card = (baseline / "README.md").read_text()
    assert "| mIoU (instance mean) |" in card and f"{saved['eval_mean_iou']:.4f}" in card


def test_decoder_fine_tuning_from_the_cache_with_a_teacher(workspace, baseline):
    output = workspace / "distilled"
    _launch("--cpu", recipe=workspace / "tiny.yaml", output_dir=output, extra=[
        "--freeze_vision_encoder", "true", "--freeze_prompt_encoder", "true", "--cache_embeddings", "true",
        "--embedding_cache_dir", str(workspace / "cache"), "--teacher_model_name_or_path", str(baseline),
        "--num_train_epochs", "2", "--save_decoder_only", "true", "--embedding_cache_dtype", "float32",
    ])
    caches = [p for p in (workspace / "cache").iterdir() if p.is_dir()]
    assert len(caches) == 2  # one per encoder: the student's and the teacher's
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "mask_kd_loss" in entry]
    assert logged and "distill_temperature" in logged[0] and "embedding_kd_loss" not in logged[0]
    student = EfficientSamModel.from_pretrained(output)
    assert (output / "decoder" / "decoder.safetensors").is_file()
    from modeling_efficientsam.training import load_decoder_on_base

    rebuilt = load_decoder_on_base(str(output), str(output / "decoder"))
    for key, value in student.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


def test_plain_python_run_on_real_coco_files(shared_path, workspace, tmp_path):
    """`python train.py` on real COCO files (labelme's VOC sample): conversion, embedding cache, card."""
    root = shared_path("datasets/voc_labelme")
    output = tmp_path / "voc"
    command = [sys.executable, str(REPO / "train.py"), str(workspace / "tiny.yaml"), "--output_dir", str(output),
               "--dataset_path", "none", "--train_annotations", str(root / "annotations.json"),
               "--train_images", str(root), "--validation_annotations", str(root / "annotations.json"),
               "--validation_images", str(root), "--prepared_dataset_dir", str(tmp_path / "prepared"),
               "--freeze_vision_encoder", "true", "--num_train_epochs", "2", "--per_device_train_batch_size", "2"]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    results = _results(output)
    assert results["eval_num_instances"] > 0 and 0.0 <= results["eval_mean_iou"] <= 1.0
    assert (tmp_path / "prepared" / "report.json").is_file() and (tmp_path / "prepared" / "embeddings").is_dir()
    card = (output / "README.md").read_text()
    assert "voc_labelme" in card and "Before fine-tuning" in card
