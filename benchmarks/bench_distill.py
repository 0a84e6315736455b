#!/usr/bin/env python
"""Does our distillation help? A rerunnable study on the synthetic PCB data, offline, on CPU.

    python benchmarks/bench_distill.py                       # the full study (3 seeds, 300 student steps)
    python benchmarks/bench_distill.py --student_steps 120 --teacher_steps 600 --threads 1   # reduced (busy machine)

What it does (everything under --work_dir; the teacher and the data are reused when present):

1. Data: the synthetic PCB generator (``data/make_synthetic_pcb.py``), --num_train training and
   --num_validation validation images, converted once. The same training file with every
   ``segmentation`` removed is converted as a box-only split (``box_only_splits``), for part 3.
2. Teacher: ``recipes/study/teacher.json`` (the quickstart model at 128 px input: encoder width 96, 4 blocks) trained
   from random weights for --teacher_steps on all training images. It must be clearly stronger than the
   student alone; the table shows both.
3. Students: ``recipes/study/student.json`` (the quickstart student at 128 px: width 48, 2 blocks, same decoder), from random weights,
   encoder trained, --student_steps each, the same data order per seed, for each setting:
   ``alone``; ``soft_label`` (mask KD + IoU KD), ``feature`` (decoder features + image embedding),
   ``attention`` (decoder attention), each alone with our schedule; ``all_ours`` (every term, our
   schedule: alpha 1, beta 0.5, T 4 -> 1); ``all_guide`` (every term, the original guide's schedule:
   alpha 0.9 -> 0.5, beta 0.1 -> 0.5, T 4 held for the first 10% of the run, then down to 1).
4. Label-efficient distillation: ``few_alone`` (the first --num_labelled training images, masks,
   no teacher), ``few_distilled`` (the same + the teacher), ``few_plus_boxes`` (the same + the next
   --num_boxed training images as box-only data, supervised by the teacher alone); equal steps.
5. Gradients: for the student at random initialization and after the ``alone`` run (seed 0), the
   gradient norm of each weighted term on the student's parameters and its cosine with the gradient
   of the ground-truth terms, averaged over a few batches.

Every student is evaluated on the validation split with the trainer's protocol (each object's own
box, no jitter): mIoU, and the wrong-box mIoU / prompt gap of ``metrics/prompt_dependence.py``.
Results: ``benchmarks/results/distill_study.json`` and ``.md`` (mean, standard deviation and min-max
over the seeds) and ``distill_study.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from datetime import date

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
RESULTS = os.path.join(REPO, "benchmarks", "results")
STUDY_CONFIGS = os.path.join(REPO, "recipes", "study")

OURS = dict(alpha_start=1.0, alpha_end=1.0, beta_start=0.5, beta_end=0.5, max_temperature=4.0, min_temperature=1.0)
GUIDE = dict(alpha_start=0.9, alpha_end=0.5, beta_start=0.1, beta_end=0.5, max_temperature=4.0, min_temperature=1.0)
NO_KD = dict(mask_kd_weight=0.0, iou_kd_weight=0.0)

# name -> (description, teacher?, data ("all" / "few" / "few+boxes"), training-argument changes, warm-up fraction)
SETTINGS = {
    "alone": ("student alone (no teacher)", False, "all", {}, 0.0),
    "soft_label": ("+ soft-label KD only (mask KL + IoU MSE), our schedule", True, "all",
                   dict(OURS, feature_distillation=False, attention_distillation=False), 1 / 6),
    "feature": ("+ feature KD only (decoder tokens, upscaled embedding, image embedding), our schedule", True, "all",
                dict(OURS, **NO_KD, feature_distillation=True, attention_distillation=False), 1 / 6),
    "attention": ("+ attention KD only, our schedule", True, "all",
                  dict(OURS, **NO_KD, feature_distillation=False, attention_distillation=True), 1 / 6),
    "all_ours": ("+ every KD term, our schedule (alpha 1, beta 0.5)", True, "all",
                 dict(OURS, feature_distillation=True, attention_distillation=True), 1 / 6),
    "all_guide": ("+ every KD term, the guide's schedule (alpha 0.9->0.5, beta 0.1->0.5)", True, "all",
                  dict(GUIDE, feature_distillation=True, attention_distillation=True), 0.1),
    "few_alone": ("few labelled images alone", False, "few", {}, 0.0),
    "few_distilled": ("few labelled images + teacher (every term, ours)", True, "few",
                      dict(OURS, feature_distillation=True, attention_distillation=True), 1 / 6),
    "few_plus_boxes": ("few labelled + box-only images, teacher (every term, ours)", True, "few+boxes",
                       dict(OURS, feature_distillation=True, attention_distillation=True), 1 / 6),
}
MAIN = ["alone", "soft_label", "feature", "attention", "all_ours", "all_guide"]
LABEL_EFFICIENT = ["few_alone", "few_distilled", "few_plus_boxes"]

logger = logging.getLogger("bench_distill")


# ------------------------------------------------------------------------------------------------
# data and models
# ------------------------------------------------------------------------------------------------
def prepare_data(work_dir: str, num_train: int, num_validation: int):
    from modeling_efficientsam.data import load_or_prepare
    from modeling_efficientsam.data.synthetic_pcb import make_synthetic_pcb

    raw = os.path.join(work_dir, f"pcb_{num_train}_{num_validation}")
    marker = os.path.join(raw, "splits.json")
    if os.path.isfile(marker):
        splits = {k: tuple(v) for k, v in json.load(open(marker)).items()}
    else:
        splits = make_synthetic_pcb(raw, num_train=num_train, num_validation=num_validation, seed=0)
        document = json.load(open(splits["train"][0]))
        for annotation in document["annotations"]:
            annotation.pop("segmentation", None)
        boxes = os.path.join(raw, "train", "_boxes_only.coco.json")
        with open(boxes, "w") as handle:
            json.dump(document, handle)
        splits["box_only"] = (boxes, splits["train"][1])
        with open(marker, "w") as handle:
            json.dump(splits, handle)
    return load_or_prepare(splits, os.path.join(raw, "prepared"), box_only_splits=("box_only",))


def load_config(name: str):
    from modeling_efficientsam import EfficientSamConfig

    with open(os.path.join(STUDY_CONFIGS, name)) as handle:
        return EfficientSamConfig(**json.load(handle))


def new_model(config_name: str, seed: int):
    import torch

    from modeling_efficientsam import EfficientSamModel

    torch.manual_seed(seed)
    return EfficientSamModel(load_config(config_name))


def datasets_for(dataset, data: str, seed: int, config, args):
    from modeling_efficientsam.data import EfficientSamTrainingDataset
    from modeling_efficientsam.data.box_only import EfficientSamMixedTrainingDataset

    common = dict(image_size=config.image_size, mask_size=config.low_res_mask_size, seed=seed)
    train = dataset["train"]
    if data == "all":
        labelled = train.select(range(min(args.num_train, len(train))))
    else:
        labelled = train.select(range(args.num_labelled))
    train_dataset = EfficientSamTrainingDataset(labelled, max_objects=10, box_noise_scale=0.1, **common)
    if data == "few+boxes":
        boxed = dataset["box_only"].select(range(args.num_labelled, min(args.num_labelled + args.num_boxed, len(train))))
        train_dataset = EfficientSamMixedTrainingDataset(
            train_dataset, EfficientSamTrainingDataset(boxed, max_objects=10, box_noise_scale=0.1, **common))
    evaluation = EfficientSamTrainingDataset(dataset["validation"], max_objects=None, box_noise_scale=0.0, **common)
    return train_dataset, evaluation


def training_arguments(output_dir: str, steps: int, seed: int, steps_per_epoch: int, changes: dict, warmup_fraction: float,
                       batch_size: int):
    from modeling_efficientsam.training import EfficientSamTrainingArguments

    epochs = steps / steps_per_epoch
    values = dict(
        output_dir=output_dir, report_to="none", per_device_train_batch_size=batch_size, per_device_eval_batch_size=8,
        max_steps=steps, learning_rate=2e-3, min_lr=1e-5, weight_decay=1e-4, optimizer="adamw", scheduler="cosine",
        warmup_epochs=min(1.0, epochs / 10), max_grad_norm=1.0, eval_strategy="no", save_strategy="no",
        load_best_model_at_end=False, eval_on_start=False, logging_steps=max(1, steps // 10), seed=seed, data_seed=seed,
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, distill_warmup_epochs=warmup_fraction * epochs,
    )
    values.update(changes)
    return EfficientSamTrainingArguments(**values)


def train_one(name, model, teacher, dataset, data, seed, steps, args, changes, warmup_fraction, output_dir):
    from modeling_efficientsam.training import EfficientSamTrainer

    train_dataset, evaluation = datasets_for(dataset, data, seed, model.config, args)
    steps_per_epoch = math.ceil(len(train_dataset) / args.batch_size)
    training_args = training_arguments(output_dir, steps, seed, steps_per_epoch, changes, warmup_fraction, args.batch_size)
    trainer = EfficientSamTrainer(model=model, args=training_args, teacher_model=teacher, train_dataset=train_dataset,
                                  eval_dataset=evaluation)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    metrics = trainer.evaluate()
    result = {
        "setting": name, "seed": seed, "steps": steps, "train_seconds": round(seconds, 1),
        "train_images": len(train_dataset),
        "mean_iou": metrics["eval_mean_iou"], "wrong_box_mean_iou": metrics.get("eval_wrong_box_mean_iou"),
        "prompt_gap": metrics.get("eval_prompt_gap"),
    }
    logger.info("%s seed %d: mIoU %.3f (wrong box %.3f) in %.0f s", name, seed, result["mean_iou"],
                result["wrong_box_mean_iou"] or float("nan"), seconds)
    return result, trainer


def get_teacher(dataset, args):
    """The teacher, trained once per (steps, data size) and saved under work_dir."""
    from modeling_efficientsam import EfficientSamModel

    folder = os.path.join(args.work_dir, f"teacher_{args.teacher_steps}_{args.num_train}")
    info_path = os.path.join(folder, "study_teacher.json")
    if os.path.isfile(info_path):
        return EfficientSamModel.from_pretrained(folder).eval(), json.load(open(info_path))
    model = new_model("teacher.json", seed=1000)
    result, trainer = train_one("teacher", model, None, dataset, "all", 1000, args.teacher_steps, args, {}, 0.0,
                                os.path.join(args.work_dir, "teacher_run"))
    model.save_pretrained(folder)
    result["parameters"] = model.num_parameters()
    with open(info_path, "w") as handle:
        json.dump(result, handle, indent=2)
    return model.eval(), result


# ------------------------------------------------------------------------------------------------
# gradient diagnostics
# ------------------------------------------------------------------------------------------------
def gradient_report(student, teacher, dataset, args, num_batches: int = 4) -> dict:
    """Norm of each weighted term's gradient on the student and its cosine with the ground-truth gradient."""
    import torch

    from modeling_efficientsam.data import EfficientSamCollator
    from modeling_efficientsam.training import EfficientSamTrainer
    from modeling_efficientsam.training.losses import GROUND_TRUTH_TERMS

    train_dataset, _ = datasets_for(dataset, "all", 0, student.config, args)
    changes = dict(OURS, feature_distillation=True, attention_distillation=True)
    training_args = training_arguments(os.path.join(args.work_dir, "gradients"), 1, 0, 1, changes, 0.0, args.batch_size)
    trainer = EfficientSamTrainer(model=student, args=training_args, teacher_model=teacher, train_dataset=train_dataset)
    student.train()
    parameters = [p for p in student.parameters() if p.requires_grad]
    collate = EfficientSamCollator()
    sums: dict = {}
    for temperature in (4.0, 1.0):
        for batch_index in range(num_batches):
            items = [train_dataset[(batch_index * args.batch_size + i) % len(train_dataset)] for i in range(args.batch_size)]
            batch = collate(items)
            terms, _ = trainer.compute_loss_terms(student, batch, temperature=temperature)
            weights = trainer.loss_weighting.weights
            ground_truth = sum(weights[n] * terms[n] for n in terms if n in GROUND_TRUTH_TERMS)
            grads = {"ground_truth": torch.autograd.grad(ground_truth, parameters, retain_graph=True, allow_unused=True)}
            for name in terms:
                if name in GROUND_TRUTH_TERMS:
                    continue
                grads[name] = torch.autograd.grad(weights[name] * terms[name], parameters, retain_graph=True, allow_unused=True)
            flat = {name: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, parameters)])
                    for name, gs in grads.items()}
            reference = flat["ground_truth"]
            for name, vector in flat.items():
                key = f"T={temperature:g}/{name}"
                entry = sums.setdefault(key, {"grad_norm": 0.0, "cosine_with_ground_truth": 0.0, "value": 0.0})
                entry["grad_norm"] += float(vector.norm()) / num_batches
                cosine = float(torch.nn.functional.cosine_similarity(vector, reference, dim=0)) if vector.norm() > 0 else 0.0
                entry["cosine_with_ground_truth"] += cosine / num_batches
                value = float(ground_truth.detach()) if name == "ground_truth" else float(weights[name] * terms[name].detach())
                entry["value"] += value / num_batches
    return {key: {k: float(f"{v:.4g}") for k, v in entry.items()} for key, entry in sums.items()}


# ------------------------------------------------------------------------------------------------
# summary, table, plot
# ------------------------------------------------------------------------------------------------
def summarize(runs: list) -> dict:
    import numpy as np

    summary = {}
    for name in SETTINGS:
        values = [r["mean_iou"] for r in runs if r["setting"] == name]
        if not values:
            continue
        gaps = [r["prompt_gap"] for r in runs if r["setting"] == name and r["prompt_gap"] is not None]
        summary[name] = {
            "description": SETTINGS[name][0], "seeds": len(values), "mean_iou": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "min": float(min(values)),
            "max": float(max(values)), "per_seed": values,
            "prompt_gap": float(np.mean(gaps)) if gaps else None,
            "train_seconds": float(np.mean([r["train_seconds"] for r in runs if r["setting"] == name])),
        }
    for reference, names in (("alone", MAIN[1:]), ("few_alone", LABEL_EFFICIENT[1:])):
        for name in names:
            if name in summary and reference in summary:
                a, b = summary[name], summary[reference]
                diff = a["mean_iou"] - b["mean_iou"]
                spread = math.sqrt(a["std"] ** 2 / a["seeds"] + b["std"] ** 2 / b["seeds"])
                summary[name]["vs_" + reference] = diff
                summary[name]["vs_" + reference + "_standard_error"] = spread
                summary[name]["verdict"] = ("helps" if diff > 2 * spread and diff > 0 else
                                            "hurts" if diff < -2 * spread and diff < 0 else "no clear effect")
    return summary


def markdown(report: dict) -> str:
    teacher = report["teacher"]
    lines = [
        "# Distillation study (synthetic PCB, CPU)",
        "",
        f"Generated by `python benchmarks/bench_distill.py {report['command_line']}` on {report['date']} "
        f"({report['machine']}). Student: {report['student_steps']} steps, batch {report['batch_size']}, "
        f"seeds {report['seeds']}. Teacher: {teacher['steps']} steps, validation mIoU {teacher['mean_iou']:.3f} "
        f"(prompt gap {teacher['prompt_gap']:.3f}).",
        "",
        "| setting | what | seeds | mIoU mean | std | min-max | vs reference | verdict | prompt gap | s/run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in report["summary"].items():
        versus = next((row[k] for k in row if k.startswith("vs_") and not k.endswith("_error")), None)
        error = next((row[k] for k in row if k.endswith("_standard_error")), None)
        lines.append(
            f"| {name} | {row['description']} | {row['seeds']} | {row['mean_iou']:.3f} | {row['std']:.3f} | "
            f"{row['min']:.3f}-{row['max']:.3f} | "
            f"{'' if versus is None else f'{versus:+.3f} ± {error:.3f}'} | {row.get('verdict', '')} | "
            f"{'' if row['prompt_gap'] is None else format(row['prompt_gap'], '.3f')} | {row['train_seconds']:.0f} |"
        )
    lines += ["", "verdict: 'helps' / 'hurts' when the difference of means exceeds twice its standard error, else "
              "'no clear effect'. References: `alone` for the main settings, `few_alone` for the label-efficient ones.", ""]
    if report.get("gradients"):
        lines += ["## Gradients of each weighted term on the student (mean over batches)", "",
                  "| student | term | value | grad norm | cosine with ground-truth gradient |", "| --- | --- | --- | --- | --- |"]
        for student, table in report["gradients"].items():
            for key, entry in table.items():
                lines.append(f"| {student} | {key} | {entry['value']:.4g} | {entry['grad_norm']:.4g} | "
                             f"{entry['cosine_with_ground_truth']:+.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["summary"])
    means = [report["summary"][n]["mean_iou"] for n in names]
    stds = [report["summary"][n]["std"] for n in names]
    fig, ax = plt.subplots(figsize=(9, 4))
    colours = ["#888888" if n in ("alone", "few_alone") else "#3a7dc9" for n in names]
    ax.bar(range(len(names)), means, yerr=stds, color=colours, capsize=4)
    for i, n in enumerate(names):
        ax.scatter([i] * len(report["summary"][n]["per_seed"]), report["summary"][n]["per_seed"], color="black", s=10, zorder=3)
    ax.axhline(report["teacher"]["mean_iou"], color="#c94a3a", linestyle="--", label="teacher")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=25, ha="right")
    ax.set_ylabel("validation mIoU (own box)")
    ax.set_title(f"Student {report['student_steps']} steps, mean ± std over {len(report['seeds'])} seeds (dots: seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__)
    parser.add_argument("--work_dir", default=os.path.join(REPO, "outputs", "bench_distill"))
    parser.add_argument("--num_train", type=int, default=220)
    parser.add_argument("--num_validation", type=int, default=30)
    parser.add_argument("--num_labelled", type=int, default=20)
    parser.add_argument("--num_boxed", type=int, default=200)
    parser.add_argument("--teacher_steps", type=int, default=1000)
    parser.add_argument("--student_steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--no_gradients", action="store_true", help="skip the gradient diagnostics")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
    parser.add_argument("--output_prefix", default=os.path.join(RESULTS, "distill_study"))
    args = parser.parse_args(argv)

    import datasets
    import torch
    import transformers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("modeling_efficientsam").setLevel(logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads or max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))

    os.makedirs(args.work_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    dataset = prepare_data(args.work_dir, args.num_train, args.num_validation)
    teacher, teacher_info = get_teacher(dataset, args)
    logger.info("teacher: mIoU %.3f", teacher_info["mean_iou"])
    partial_path = args.output_prefix + "_runs.jsonl"
    done = {}
    if os.path.isfile(partial_path):  # resume an interrupted study with the same configuration
        for line in open(partial_path):
            run = json.loads(line)
            if run["steps"] == args.student_steps:
                done[(run["setting"], run["seed"])] = run
    runs, gradients = [], {}
    for seed in args.seeds:
        for name in args.settings:
            if (name, seed) in done:
                runs.append(done[(name, seed)])
                continue
            _, uses_teacher, data, changes, warmup = SETTINGS[name]
            model = new_model("student.json", seed)
            if not args.no_gradients and name == "alone" and seed == args.seeds[0]:
                gradients["student at initialization"] = gradient_report(new_model("student.json", seed), teacher, dataset, args)
            result, trainer = train_one(name, model, teacher if uses_teacher else None, dataset, data, seed,
                                        args.student_steps, args, changes, warmup,
                                        os.path.join(args.work_dir, "runs", f"{name}_{seed}"))
            if not args.no_gradients and name == "alone" and seed == args.seeds[0]:
                gradients["student trained alone"] = gradient_report(model, teacher, dataset, args)
                result["gradients"] = gradients
            runs.append(result)
            with open(partial_path, "a") as handle:
                handle.write(json.dumps(result) + "\n")
            del trainer, model
    if not gradients:
        gradients = next((r["gradients"] for r in runs if "gradients" in r), {})
    report = {
        "command_line": " ".join(argv if argv is not None else sys.argv[1:]),
        "date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                                                     f"torch {torch.__version__}",
        "student_steps": args.student_steps, "batch_size": args.batch_size, "seeds": args.seeds,
        "num_train": args.num_train, "num_validation": args.num_validation, "num_labelled": args.num_labelled,
        "num_boxed": args.num_boxed,
        "teacher": {"steps": args.teacher_steps, **{k: teacher_info[k] for k in ("mean_iou", "prompt_gap", "train_seconds")}},
        "summary": summarize(runs), "gradients": gradients,
        "runs": [{k: v for k, v in r.items() if k != "gradients"} for r in runs],
    }
    os.makedirs(os.path.dirname(args.output_prefix), exist_ok=True)
    with open(args.output_prefix + ".json", "w") as handle:
        json.dump(report, handle, indent=2)
    with open(args.output_prefix + ".md", "w") as handle:
        handle.write(markdown(report))
    plot(report, args.output_prefix + ".png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
