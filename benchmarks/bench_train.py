#!/usr/bin/env python
"""Training throughput and peak memory of EfficientSamTrainer, and the quickstart's metric curve.

    python benchmarks/bench_train.py                          # all configurations, CPU results file
    python benchmarks/bench_train.py --variants vitt --steps 3
    python benchmarks/bench_train.py --curve_only --quickstart_dir outputs/quickstart
    python benchmarks/bench_train.py --variants vitt --modes cache --precisions bf16 --batch_images 16 --max_objects 16   # a GPU

Every configuration runs in a fresh subprocess (so its peak resident memory is its own): a student
(released ViT-T or ViT-S architecture, 1024 px, random weights -- the numbers do not depend on the
weights) fine-tuned decoder-only (frozen encoders, the guide's default) either
* from pixels, re-encoding every image at every step ("pixels"), or
* from the embedding cache ("cache"; the cache is built once beforehand and not timed),
with or without a ViT-S teacher (which then runs its own encoder, or reads its own cache), in fp32
or bf16 autocast (bf16 computes in float32 on a CPU without native bf16: the model falls back). The
ViT-T decoder fine-tuning from the cache also runs with the decoder, the loss and the optimizer as
they were before the speed work (``reference_decoder.py``, AdamW not fused; ``decoder_speedups`` in
the results). Every result records the CPU
(ATen capability, native bf16, threads). Batch: 1 image per step with up to --max_objects box queries. The first
--warmup_steps optimizer steps are not timed. Reported: images/s and queries/s over the timed
steps (from the median step time), seconds per step, peak RSS (and peak CUDA memory on a GPU), and
the 1-minute load average (CPU timings on a shared machine are only as good as its quietness).
Where torch sees a GPU the Trainer trains on it (the cache is then built there too), the results
name the GPU and go to ``results/train_cuda.json`` by default, and ``--batch_images`` images per
step keep it busy (the default, 1, is a CPU's).

The quickstart curve (validation mIoU per epoch and training loss per step) is drawn from the
``trainer_state.json`` of a quickstart run (``--quickstart_dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# One configuration (runs in its own process)
# ------------------------------------------------------------------------------------------------
def run_configuration(config: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    from modeling_efficientsam import EfficientSamConfig, EfficientSamModel
    from modeling_efficientsam.data import EfficientSamCollator, EfficientSamTrainingDataset
    from modeling_efficientsam.data.embedding_cache import EmbeddingCacheReader, build_embedding_cache
    from modeling_efficientsam.training import EfficientSamTrainer, EfficientSamTrainingArguments

    import datasets

    def released(variant: str, seed: int):
        torch.manual_seed(seed)
        model = EfficientSamModel(EfficientSamConfig.from_variant(variant))
        model.vision_encoder.requires_grad_(False)
        model.prompt_encoder.requires_grad_(False)
        return model

    student = released(config["student"], seed=0)
    if config.get("decoder") == "reference":  # the decoder before the speed work, same weights
        sys.path.insert(0, os.path.join(REPO, "benchmarks"))
        from reference_decoder import ReferenceMaskDecoder, reference_segmentation_loss

        from modeling_efficientsam.training import optimization as optimization_module
        from modeling_efficientsam.training import trainer as trainer_module

        reference = ReferenceMaskDecoder(student.config.mask_decoder_config)
        reference.load_state_dict(student.mask_decoder.state_dict())
        student.mask_decoder = reference
        trainer_module.segmentation_loss = reference_segmentation_loss  # and the loss before the speed work (own process)
        optimization_module.FUSED_ADAM_DEVICES = ()  # and AdamW's default per-parameter loop, as before
    teacher = released("vits", seed=1) if config["teacher"] else None
    dataset = datasets.load_from_disk(config["dataset"])
    reader = None
    if config["mode"] == "cache":
        started = time.perf_counter()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        caches = [build_embedding_cache(config["dataset"], model, dtype="bfloat16", splits=["train"],
                                        batch_size=config["batch_images"], device=device, cache_root=config["cache_root"])
                  for model in [student] + ([teacher] if teacher else [])]
        config["cache_seconds"] = round(time.perf_counter() - started, 2)
        reader = EmbeddingCacheReader(caches, "train")
    train = EfficientSamTrainingDataset(dataset["train"], image_size=1024, mask_size=256, max_objects=config["max_objects"],
                                        box_noise_scale=0.1, embedding_reader=reader)

    queries = []

    class CountingCollator(EfficientSamCollator):
        def __call__(self, items):
            batch = super().__call__(items)
            queries.append(int(batch["query_mask"].sum()))
            return batch

    step_ends = []

    class Timer(TrainerCallback):
        # From the end of one optimizer step to the end of the next: data loading, forward, backward,
        # optimizer and logging, i.e. what a training run actually spends per step.
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    steps = config["warmup_steps"] + config["steps"]
    args = EfficientSamTrainingArguments(
        output_dir=os.path.join(config["workdir"], "out"), report_to="none", per_device_train_batch_size=config["batch_images"],
        max_steps=steps, eval_strategy="no", save_strategy="no", load_best_model_at_end=False, eval_on_start=False,
        logging_steps=1, bf16=config["precision"] == "bf16", disable_tqdm=True, dataloader_num_workers=0, seed=0,
        learning_rate=1e-4,
    )
    trainer = EfficientSamTrainer(model=student, args=args, teacher_model=teacher, train_dataset=train,
                                  data_collator=CountingCollator(), callbacks=[Timer()])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = [b - a for a, b in zip(step_ends[config["warmup_steps"] - 1:], step_ends[config["warmup_steps"]:])]
    # Batch i belongs to step i (one batch per step). The median step time resists a passing load
    # spike on a shared machine better than the mean; the load average is recorded beside it.
    timed_queries = sum(queries[config["warmup_steps"]:steps])
    median = sorted(timed)[len(timed) // 2] if len(timed) % 2 else sum(sorted(timed)[len(timed) // 2 - 1:len(timed) // 2 + 1]) / 2
    seconds = median * len(timed)
    images = len(timed) * config["batch_images"]
    result = dict(config)
    for key in ("dataset", "cache_root", "workdir"):
        result.pop(key)
    result.update(
        seconds_per_step=round(median, 3),
        images_per_s=round(images / seconds, 4),
        queries_per_s=round(timed_queries / seconds, 3),
        queries_per_step=round(timed_queries / len(timed), 2),
        step_seconds=[round(t, 3) for t in timed],
        peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        load_average_1min=round(os.getloadavg()[0], 2),
    )
    if torch.cuda.is_available():
        result["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def configurations(variants, steps, warmup_steps, max_objects, precisions, reference_decoder=True,
                   modes=("pixels", "cache"), batch_images=1, with_teacher=True):
    for student in variants:
        # the distillation pair is ViT-S -> ViT-T
        teachers = (False, True) if student == "vitt" and with_teacher else (False,)
        for teacher in teachers:
            for mode in modes:
                for precision in precisions:
                    common = {"student": student, "teacher": teacher, "mode": mode, "precision": precision, "steps": steps,
                              "warmup_steps": warmup_steps, "max_objects": max_objects, "batch_images": batch_images}
                    yield {**common, "decoder": "current"}
                    # decoder fine-tuning from the cache is where the decoder is the step: compare with the old one
                    if reference_decoder and student == "vitt" and not teacher and mode == "cache":
                        yield {**common, "decoder": "reference"}


def prepare_data(workdir: str, num_images: int) -> str:
    from modeling_efficientsam.data import prepare_coco_dataset
    from modeling_efficientsam.data.synthetic_pcb import make_synthetic_pcb

    splits = make_synthetic_pcb(os.path.join(workdir, "raw"), num_train=num_images, num_validation=1, seed=0)
    folder = os.path.join(workdir, "dataset")
    prepare_coco_dataset({"train": splits["train"]}, folder)
    return folder


def speedups(results: list) -> list:
    rows = []
    for entry in results:
        if entry["mode"] != "cache":
            continue
        for other in results:
            if other["mode"] == "pixels" and all(other.get(k) == entry.get(k) for k in ("student", "teacher", "precision", "decoder")):
                rows.append({"student": entry["student"], "teacher": entry["teacher"], "precision": entry["precision"],
                             "cache_vs_pixels_speedup": round(entry["queries_per_s"] / other["queries_per_s"], 2)})
    return rows


def decoder_speedups(results: list) -> list:
    """Current decoder against the reference decoder in the same configuration (each its own process)."""
    rows = []
    for entry in results:
        if entry.get("decoder") != "reference":
            continue
        for other in results:
            if other.get("decoder") == "current" and all(other[k] == entry[k] for k in ("student", "teacher", "mode", "precision")):
                rows.append({"student": entry["student"], "teacher": entry["teacher"], "mode": entry["mode"],
                             "precision": entry["precision"], "reference_queries_per_s": entry["queries_per_s"],
                             "current_queries_per_s": other["queries_per_s"],
                             "current_vs_reference_decoder": round(other["queries_per_s"] / entry["queries_per_s"], 2)})
    return rows


def draw_curve(quickstart_dir: str, path: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(quickstart_dir, "trainer_state.json"), encoding="utf-8") as handle:
        state = json.load(handle)
    history = state["log_history"]
    evals = [(e.get("epoch", 0.0), e["eval_mean_iou"], e.get("eval_f1")) for e in history if "eval_mean_iou" in e]
    # The last entry may repeat the best epoch (the final evaluation after loading it): keep one per epoch.
    seen, curve = set(), []
    for epoch, miou, f1 in evals:
        if epoch not in seen:
            seen.add(epoch)
            curve.append((epoch, miou, f1))
    losses = [(e["step"], e["loss"]) for e in history if "loss" in e and "eval_loss" not in e]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", label="mIoU")
    left.plot([c[0] for c in curve], [c[2] for c in curve], marker=".", label="F1 (Dice)")
    left.set_xlabel("epoch")
    left.set_ylabel("validation")
    left.set_ylim(0, 1)
    left.grid(alpha=0.3)
    left.legend()
    left.set_title("quickstart: validation metrics")
    right.plot([s for s, _ in losses], [v for _, v in losses], linewidth=0.8)
    right.set_xlabel("optimizer step")
    right.set_ylabel("training loss")
    right.grid(alpha=0.3)
    right.set_title("quickstart: training loss")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    runtime = next((e.get("train_runtime") for e in history if "train_runtime" in e), None)
    return {"source": os.path.relpath(quickstart_dir, REPO) if quickstart_dir.startswith(REPO) else quickstart_dir,
            "mean_iou_per_epoch": [[round(e, 2), round(m, 4)] for e, m, _ in curve],
            "mean_iou_before": round(curve[0][1], 4), "best_mean_iou": round(float(state["best_metric"]), 4),
            "optimizer_steps": state["global_step"], "train_runtime_s": runtime}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help="default: benchmarks/results/train_<cpu|cuda>.json")
    parser.add_argument("--variants", nargs="+", default=["vitt", "vits"], choices=["vitt", "vits"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup_steps", type=int, default=1, help="untimed optimizer steps first (at least 1)")
    parser.add_argument("--max_objects", type=int, default=4, help="box queries per image")
    parser.add_argument("--batch_images", type=int, default=1, help="images per optimizer step")
    parser.add_argument("--without_teacher", action="store_true", help="skip the ViT-S -> ViT-T distillation runs")
    parser.add_argument("--modes", nargs="+", default=["pixels", "cache"], choices=["pixels", "cache"],
                        help="input modes to run (pixels: live encoder; cache: embedding cache)")
    parser.add_argument("--quickstart_dir", default=os.path.join(REPO, "outputs", "quickstart"),
                        help="a quickstart output folder (its trainer_state.json gives the curve)")
    parser.add_argument("--curve", default=os.path.join(REPO, "benchmarks", "results", "quickstart_curve.png"))
    parser.add_argument("--curve_only", action="store_true", help="only draw the quickstart curve")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.warmup_steps < 1:
        parser.error("--warmup_steps must be at least 1 (steps are timed from the end of the previous one)")
    if args.worker:
        print("RESULT " + json.dumps(run_configuration(json.loads(args.worker))), flush=True)
        return 0

    import torch

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from benchmark_utils import machine_record

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.output is None:
        args.output = os.path.join(REPO, "benchmarks", "results", f"train_{device}.json")

    report = {}
    if os.path.isfile(args.output):
        with open(args.output, encoding="utf-8") as handle:
            report = json.load(handle)
    if os.path.isfile(os.path.join(args.quickstart_dir, "trainer_state.json")):
        report["quickstart"] = draw_curve(args.quickstart_dir, args.curve)
        print(f"quickstart curve -> {args.curve}: {report['quickstart']['mean_iou_before']} -> {report['quickstart']['best_mean_iou']}")
    elif args.curve_only:
        print(f"no trainer_state.json in {args.quickstart_dir}; run the quickstart first", file=sys.stderr)
        return 1
    if not args.curve_only:
        results = []
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bench_train_") as workdir:
            dataset = prepare_data(workdir, num_images=(args.warmup_steps + args.steps) * args.batch_images)
            for config in configurations(args.variants, args.steps, args.warmup_steps, args.max_objects, args.precisions,
                                         modes=args.modes, batch_images=args.batch_images,
                                         with_teacher=not args.without_teacher):
                config.update(dataset=dataset, cache_root=os.path.join(workdir, "cache"), workdir=workdir)
                env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
                process = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(config)],
                                         capture_output=True, text=True, env=env, cwd=REPO)
                lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
                if process.returncode != 0 or not lines:
                    print(process.stdout[-2000:], process.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"configuration {config} failed")
                result = json.loads(lines[-1][len("RESULT "):])
                results.append(result)
                print(json.dumps(result), flush=True)
        report.update({
            "device": device,
            "cpu": platform.processor() or platform.machine(),
            "machine": machine_record(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "date": str(date.today()),
            "setup": {"image_size": 1024, "batch_images": args.batch_images, "max_objects": args.max_objects, "timed_steps": args.steps,
                      "warmup_steps": args.warmup_steps, "trained": "mask decoder (frozen image and prompt encoders)",
                      "teacher": "ViT-S architecture", "weights": "random (throughput does not depend on them)"},
            "results": results,
            "speedups": speedups(results),
            "decoder_speedups": decoder_speedups(results),
            "total_seconds": round(time.perf_counter() - started, 1),
        })
        for row in report["speedups"] + report["decoder_speedups"]:
            print(row)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
