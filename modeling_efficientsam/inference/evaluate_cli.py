"""Evaluate one or several EfficientSAM models with ground-truth boxes as prompts.

Usage (console script ``efficientsam-evaluate``, or ``python -m modeling_efficientsam.inference.evaluate_cli``)::

    # a dataset prepared with data/prepare_dataset.py (its folder, its Hub-format copy, or its Hub id)
    efficientsam-evaluate --model outputs/vitt-pcb --dataset outputs/pcb_dataset --split validation
    efficientsam-evaluate --model outputs/vitt-pcb --dataset your-name/pcb-components [--dataset_revision main]

    # a COCO annotations file (images beside it, or --images_dir), converted in a temporary folder;
    # released vs fine-tuned vs distilled in one table, with 10% box noise
    efficientsam-evaluate --model released=models/efficientsam-vitt --compare finetuned=outputs/vitt-pcb \\
        distilled=outputs/vitt-pcb-kd --dataset data/val/annotations.json --box_noise_scale 0.1 --seed 0 \\
        --output results/pcb_eval.json

A model is a folder or Hub id, optionally labelled ``LABEL=PATH`` (the label heads its column).
Reported per model: mIoU (instance-averaged), mean category IoU, per-category IoU, F1, boundary F1
(``--boundary_tolerance`` pixels), and COCO mask AP / AP50 / AP75 / APs / APm / APl. The protocol is
in ``modeling_efficientsam/inference/evaluation.py``: every non-crowd object is prompted with its
(optionally jittered, seeded) ground-truth box, identically for every model. ``--output`` gets the
table as JSON (written under a temporary name, then renamed).

Prompt dependence: each object is also prompted with a wrong box (another object's box in the same
image, or its own box moved off it when it is alone); the table shows the mIoU of those answers
against the object's own mask and the gap to the own-box mIoU. A small gap (below
``--min_prompt_gap``) means the model returns the same mask whatever box it gets: a warning says so.
``--no_prompt_check`` skips it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

from ..file_utils import write_json_atomic
from .cli_options import add_predictor_arguments, build_cli_parser, load_predictor

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = build_cli_parser("efficientsam-evaluate", "Evaluate EfficientSAM models with ground-truth boxes as prompts.", __doc__)
    parser.add_argument("--model", required=True, help="model folder or Hub id ([LABEL=]PATH)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="MODEL", help="more models for the same table")
    parser.add_argument("--dataset", required=True,
                        help="prepared dataset (folder, Hub-format copy, or Hub dataset id), or a COCO annotations JSON")
    parser.add_argument("--dataset_revision", help="Hub revision (branch, tag or commit) of a Hub dataset id")
    parser.add_argument("--split", default="validation", help="split of a prepared dataset (default validation)")
    parser.add_argument("--images_dir", help="images folder of a COCO JSON (default: the JSON's folder)")
    parser.add_argument("--box_noise_scale", type=float, default=0.0,
                        help="jitter each box side by up to this fraction of the box size (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the box jitter (default 0)")
    parser.add_argument("--max_images", type=int, help="evaluate only the first N images of the split")
    parser.add_argument("--boundary_tolerance", type=int, default=2, help="boundary F-score tolerance in pixels")
    parser.add_argument("--output", help="write the results as JSON to this file")
    parser.add_argument("--no_prompt_check", action="store_true",
                        help="skip the wrong-box check of prompt dependence (halves the decoder work)")
    parser.add_argument("--min_prompt_gap", type=float, default=0.1,
                        help="warn when own-box mIoU minus wrong-box mIoU is below this (default 0.1)")
    add_predictor_arguments(parser)
    return parser


def model_labels(specs: list) -> list:
    """``[LABEL=]PATH`` strings -> [(label, path)]; unlabelled models are named by their last path part."""
    parsed = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            label, path = None, spec
        parsed.append([label, path])
    names = [Path(path.rstrip("/")).name or path for label, path in parsed]
    for entry, name in zip(parsed, names):
        if entry[0] is None:
            entry[0] = name if names.count(name) == 1 else entry[1]
    labels = [label for label, _ in parsed]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"model labels must be unique; repeated: {duplicates} (use LABEL=PATH)")
    return [tuple(entry) for entry in parsed]


def load_split(dataset: str, split: str, images_dir, stack: contextlib.ExitStack, revision=None):
    """The split to evaluate: a prepared dataset (folder, Hub-format copy or Hub id, through
    ``load_prepared_dataset``) or a COCO JSON converted in a temporary folder."""
    path = Path(dataset)
    if path.is_file():
        from ..data import format_report, prepare_coco_dataset, read_report

        images = Path(images_dir) if images_dir else path.parent
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="efficientsam-eval-"))
        prepared = prepare_coco_dataset({split: (str(path), str(images))}, os.path.join(work, "dataset"))
        report = read_report(os.path.join(work, "dataset"))
        if report is not None:
            print(format_report(report))
        return prepared[split]
    if images_dir:
        raise ValueError("--images_dir is for a COCO JSON; a prepared dataset holds its images")
    from ..data import load_prepared_dataset

    loaded = load_prepared_dataset(dataset, revision=revision)  # FileNotFoundError: neither a folder nor a Hub dataset
    if split not in loaded:
        raise ValueError(f"--split {split!r} is not in {dataset}; it has {sorted(loaded)}")
    return loaded[split]


def _format(value, percent: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{100 * value:.2f}" if percent else f"{value:.3f}"


def table_rows(results: dict) -> list:
    """(row name, [value per model]) in display order; per-category IoU rows follow the summary rows."""
    models = list(results)
    rows = [
        ("mIoU", [results[m]["mean_iou"] for m in models]),
        ("mean category IoU", [results[m]["mean_category_iou"] for m in models]),
        ("F1", [results[m]["f1"] for m in models]),
        ("boundary F1", [results[m]["boundary_f1"] for m in models]),
    ]
    if all("prompt_dependence" in results[m] for m in models):
        rows += [("mIoU, wrong box", [results[m]["prompt_dependence"]["wrong_box_miou"] for m in models]),
                 ("prompt gap", [results[m]["prompt_dependence"]["prompt_gap"] for m in models])]
    rows += [(f"mask {name}", [results[m]["coco"][name] for m in models]) for name in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
    categories = []
    for m in models:
        categories += [c for c in results[m]["per_category_iou"] if c not in categories]
    rows += [(f"IoU {c}", [results[m]["per_category_iou"].get(c) for m in models]) for c in categories]
    rows += [("instances", [results[m]["num_instances"] for m in models]),
             ("images/s", [results[m]["images_per_second"] for m in models])]
    return rows


def format_table(results: dict) -> str:
    """Metrics as rows, one column per model; scores in percent."""
    header = ["metric (%)"] + list(results)
    body = []
    for name, values in table_rows(results):
        percent = name not in ("instances", "images/s")
        body.append([name] + [_format(v, percent) for v in values])
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    line = lambda row: "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(row) for row in body])


def run(args) -> dict:
    from ..data import dataset_categories
    from ..metrics.prompt_dependence import prompt_dependence_warning
    from .evaluation import coco_ground_truth, evaluate_predictor, make_prompts, make_wrong_prompts

    models = model_labels([args.model] + list(args.compare))
    with contextlib.ExitStack() as stack:
        split = load_split(args.dataset, args.split, args.images_dir, stack, revision=args.dataset_revision)
        if args.max_images is not None:
            split = split.select(range(min(args.max_images, len(split))))
        category_ids, category_names = dataset_categories(split)
        prompts = make_prompts(split, args.box_noise_scale, args.seed)
        wrong_prompts = None if getattr(args, "no_prompt_check", False) else make_wrong_prompts(split, prompts)
        coco_gt = coco_ground_truth(split, category_ids, category_names)
        results = {}
        for label, path in models:
            print(f"evaluating {label} ({path}) on {len(split)} images, {sum(len(p.boxes) for p in prompts)} prompts")
            predictor = load_predictor(path, args)
            metrics = evaluate_predictor(
                predictor, split, prompts, coco_gt, category_ids=category_ids, category_names=category_names,
                batch_size=args.batch_size, boundary_tolerance=args.boundary_tolerance,
                multimask_output=not args.single_mask, progress=not args.no_progress,
                wrong_prompts=wrong_prompts, min_prompt_gap=getattr(args, "min_prompt_gap", 0.1),
            )
            if "prompt_dependence" in metrics:
                message = prompt_dependence_warning(metrics["prompt_dependence"], where=f"model {label}")
                if message is not None:
                    print(f"WARNING: {message}", file=sys.stderr)
            results[label] = {"model": path, **metrics}
            del predictor
    return {
        "dataset": str(args.dataset),
        "split": args.split,
        "num_images": len(prompts),
        "num_prompts": sum(len(p.boxes) for p in prompts),
        "box_noise_scale": args.box_noise_scale,
        "seed": args.seed,
        "boundary_tolerance": args.boundary_tolerance,
        "multimask_output": not args.single_mask,
        "dtype": args.dtype,
        "models": results,
    }


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _quiet_progress_bars() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or (args.max_images is not None and args.max_images < 1):
        print("error: --batch_size and --max_images must be >= 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.no_progress:
        _quiet_progress_bars()
    try:
        report = run(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(report["models"]))
    if args.output:
        write_json_atomic(args.output, _json_safe(report), indent=2)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
