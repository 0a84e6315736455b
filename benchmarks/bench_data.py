#!/usr/bin/env python
"""Data-pipeline speed on CPU: COCO conversion, synthetic sample generation, training-input throughput.

    python benchmarks/bench_data.py                       # every section
    python benchmarks/bench_data.py --sections conversion input_pipeline

Prints a table per section and merges the results into benchmarks/results/data_cpu.json (sections not
run keep their previous numbers). Each section is one function ``bench_<name>(args) -> dict``
registered in SECTIONS; add a section by writing such a function and registering it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch

from modeling_efficientsam.data import (
    EfficientSamCollator,
    EfficientSamTrainingDataset,
    load_coco_split,
    prepare_coco_dataset,
    read_coco_json,
)
from modeling_efficientsam.data.synthetic_pcb import make_synthetic_pcb
from modeling_efficientsam.file_utils import write_json_atomic

from benchmark_utils import machine_record, measure  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results" / "data_cpu.json"


def wafer_splits(shared: Path) -> dict:
    root = shared / "datasets" / "wafer_defects"
    if not root.exists():
        raise SystemExit(f"{root} not found: pass --shared_dir pointing at the shared datasets")
    return {name: (root / folder / "_annotations.coco.json", root / folder)
            for name, folder in (("train", "train"), ("validation", "valid"), ("test", "test"))}


def _timed(function, repeats: int) -> list:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def bench_conversion(args) -> dict:
    """Wafer dataset, all splits: validation alone, and the full conversion written to disk."""
    splits = wafer_splits(args.shared_dir)
    num_annotations = sum(len(read_coco_json(a)["annotations"]) for a, _ in splits.values())
    num_images = sum(len(read_coco_json(a)["images"]) for a, _ in splits.values())
    validate = _timed(lambda: [load_coco_split(a, d) for a, d in splits.values()], args.repeats)
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        convert = _timed(lambda: prepare_coco_dataset(splits, work / "out"), args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    validate_s, convert_s = statistics.median(validate), statistics.median(convert)
    return {
        "dataset": "wafer_defects (train+valid+test)",
        "images": num_images,
        "annotations": num_annotations,
        "repeats": args.repeats,
        "validate_seconds_median": round(validate_s, 4),
        "validate_annotations_per_s": round(num_annotations / validate_s, 1),
        "convert_seconds_median": round(convert_s, 3),
        "convert_annotations_per_s": round(num_annotations / convert_s, 1),
        "convert_images_per_s": round(num_images / convert_s, 1),
    }


def bench_synthetic_generation(args) -> dict:
    """make_synthetic_pcb with the quickstart's sizes (40 train + 10 validation, 320 x 240), one process."""
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        times = _timed(lambda: make_synthetic_pcb(work / "pcb", num_train=40, num_validation=10, seed=0), args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = statistics.median(times)
    return {"images": 50, "image_size": "320x240", "repeats": args.repeats, "seconds_median": round(seconds, 3),
            "ms_per_image": round(1000 * seconds / 50, 1)}


def _input_split(args, work: Path):
    if args.input_data == "wafer":
        return prepare_coco_dataset({"train": wafer_splits(args.shared_dir)["train"]}, work / "wafer")["train"], "wafer_defects train (640x640 JPEG)"
    splits = make_synthetic_pcb(work / "pcb", num_train=40, num_validation=0, seed=0)
    return prepare_coco_dataset(splits, work / "pcb_prepared")["train"], "synthetic_pcb train (320x240 PNG)"


def bench_input_pipeline(args) -> dict:
    """Batches/s of pixel_values + prompts + targets from stored images (decode, resize, masks, collate)."""
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        split, description = _input_split(args, work)
        dataset = EfficientSamTrainingDataset(split, image_size=args.image_size, mask_size=args.image_size // 4,
                                              max_objects=10, prompt_mode="box")
        results = {"data": description, "batch_size": args.batch_size, "image_size": args.image_size,
                   "mask_size": args.image_size // 4, "batches_measured": args.batches}
        for workers in (0, 2):
            loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                                 collate_fn=EfficientSamCollator(), generator=torch.Generator().manual_seed(0))
            iterator = iter(loader)
            next(iterator)  # worker start-up and first decode are not part of the steady state
            start = time.perf_counter()
            for _ in range(args.batches):
                try:
                    next(iterator)
                except StopIteration:
                    iterator = iter(loader)
                    next(iterator)
            seconds = time.perf_counter() - start
            results[f"workers_{workers}_batches_per_s"] = round(args.batches / seconds, 2)
            results[f"workers_{workers}_images_per_s"] = round(args.batches * args.batch_size / seconds, 1)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_embedding_cache(args) -> dict:
    """Embedding cache on a wafer subset with a ViT-T-sized random model at 1024: build rate and size,
    then training-input batches/s read from the cache vs decoded images + the encoder run live."""
    from modeling_efficientsam import EfficientSamConfig, EfficientSamModel
    from modeling_efficientsam.data.embedding_cache import EmbeddingCacheReader, build_embedding_cache

    num_images, shard_size = args.cache_images, 4
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        train = prepare_coco_dataset({"train": wafer_splits(args.shared_dir)["train"]}, work / "wafer")["train"]
        subset = datasets.DatasetDict({"train": train.select(range(num_images))})
        torch.manual_seed(0)
        model = EfficientSamModel(EfficientSamConfig.from_variant("vitt")).eval()  # random weights, ViT-T shapes
        image_size = model.config.vision_config.image_size

        start = time.perf_counter()
        cache = build_embedding_cache(subset, model, dtype="bfloat16", batch_size=args.batch_size, shard_size=shard_size,
                                      cache_root=work / "embeddings", device="cpu")
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        build_embedding_cache(subset, model, dtype="bfloat16", batch_size=args.batch_size, shard_size=shard_size,
                              cache_root=work / "embeddings", device="cpu")  # everything reused after SHA-256 checks
        reuse_s = time.perf_counter() - start
        on_disk = sum(entry["bytes"] for entry in cache.metadata["train"]["shards"])

        def batches_per_s(dataset, batches, encode):
            loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0,
                                                 collate_fn=EfficientSamCollator(), generator=torch.Generator().manual_seed(0))
            iterator = iter(loader)
            next(iterator)  # first batch: file opening, allocator warm-up
            start = time.perf_counter()
            for _ in range(batches):
                try:
                    batch = next(iterator)
                except StopIteration:
                    iterator = iter(loader)
                    batch = next(iterator)
                if encode:
                    with torch.no_grad():
                        model.get_image_embeddings(batch["pixel_values"])
            return batches / (time.perf_counter() - start)

        options = dict(image_size=image_size, mask_size=image_size // 4, max_objects=10, prompt_mode="box")
        cached = EfficientSamTrainingDataset(subset["train"], embedding_reader=EmbeddingCacheReader(cache, "train"), **options)
        live = EfficientSamTrainingDataset(subset["train"], **options)
        cached_bps = batches_per_s(cached, args.batches, encode=False)
        live_bps = batches_per_s(live, args.live_encoder_batches, encode=True)
        return {
            "data": f"first {num_images} images of wafer_defects train (640x640 JPEG)",
            "load_average_1min_at_start": round(load, 2),  # a busy shared machine slows every number
            "model": "EfficientSAM ViT-T architecture, random weights, float32 on CPU",
            "image_size": image_size,
            "embedding_shape": list(cache.metadata["train"]["shape"]),
            "storage_dtype": "bfloat16",
            "batch_size": args.batch_size,
            "shard_size": shard_size,
            "build_seconds": round(build_s, 2),
            "build_images_per_s": round(num_images / build_s, 3),
            "reuse_check_seconds": round(reuse_s, 3),
            "mib_per_image": round(cache.bytes_per_image() / 2**20, 3),
            "cache_mib_on_disk": round(on_disk / 2**20, 2),
            "full_train_split_mib_estimate": round(len(train) * cache.bytes_per_image() / 2**20, 1),
            "cached_batches_measured": args.batches,
            "cached_batches_per_s": round(cached_bps, 2),
            "live_encoder_batches_measured": args.live_encoder_batches,
            "live_encoder_batches_per_s": round(live_bps, 4),
            "cached_over_live_speedup": round(cached_bps / live_bps, 1),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Big photos: 6000 x 4000 images, 10 objects each
# ------------------------------------------------------------------------------------------------
def _big_photo_coco(folder: Path, count: int, width: int, height: int, objects: int, seed: int = 0) -> tuple:
    """A COCO folder of ``count`` synthetic photos (a smooth board-like background as JPEG) with
    ``objects`` components each (rotated rectangles and ellipses of 150-1500 px), masks as RLE."""
    import math

    import numpy as np
    from PIL import Image, ImageDraw

    from modeling_efficientsam.data.masks import encode_mask

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        small = rng.integers(40, 200, (height // 200 + 1, width // 200 + 1, 3), dtype=np.uint8)
        photo = Image.fromarray(small).resize((width, height), Image.BILINEAR)
        draw = ImageDraw.Draw(photo)
        for number in range(objects):
            size_x, size_y = rng.uniform(150, 1500, 2)
            centre_x, centre_y = rng.uniform(size_x, width - size_x), rng.uniform(size_y, height - size_y)
            angle = rng.uniform(0, math.pi)
            if number % 2:
                corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
            else:
                corners = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
            polygon = [(centre_x + size_x / 2 * x * math.cos(angle) - size_y / 2 * y * math.sin(angle),
                        centre_y + size_x / 2 * x * math.sin(angle) + size_y / 2 * y * math.cos(angle)) for x, y in corners]
            canvas = Image.new("L", (width, height))
            ImageDraw.Draw(canvas).polygon(polygon, fill=1)
            mask = np.asarray(canvas, dtype=bool)
            draw.polygon(polygon, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            box = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": 1 + number % 3,
                                "bbox": box, "area": int(mask.sum()), "iscrowd": 0, "segmentation": encode_mask(mask)})
        name = f"photo_{index:03d}.jpg"
        photo.save(folder / name, quality=90)
        images.append({"id": index + 1, "file_name": name, "width": width, "height": height})
    categories = [{"id": i, "name": name} for i, name in ((1, "ic"), (2, "resistor"), (3, "capacitor"))]
    annotation_file = folder / "_annotations.coco.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return annotation_file, folder


def _per_item_seconds(dataset, passes: int) -> dict:
    """Seconds per ``dataset[i]`` over every item (one untimed warm-up item first), via :func:`measure`."""
    dataset[0]

    def one_pass():
        for index in range(len(dataset)):
            dataset[index]

    timing = measure(one_pass, passes)
    return {"seconds_per_item": round(timing["seconds"] / len(dataset), 4), "undisturbed": timing["clean"],
            "runs": timing["runs"]}


def bench_big_photo(args) -> dict:
    """Big photos (``--photo_count`` synthetic 6000 x 4000 JPEGs, 10 objects each): the per-item input cost
    before (labels computed per item) and with the label and embedding caches, against one decoder
    training step on the same image's queries, measured in this one run."""
    from modeling_efficientsam import EfficientSamConfig, EfficientSamModel
    from modeling_efficientsam.data.embedding_cache import EmbeddingCacheReader, build_embedding_cache
    from modeling_efficientsam.data.training_dataset import stored_image_pixel_values
    from modeling_efficientsam.precision import autocast_dtype
    from modeling_efficientsam.training.losses import segmentation_loss

    width, height, objects = 6000, 4000, 10
    work = Path(tempfile.mkdtemp(prefix="bench_big_photo_"))
    try:
        started = time.perf_counter()
        coco = _big_photo_coco(work / "coco", args.photo_count, width, height, objects)
        generate_s = time.perf_counter() - started
        split = prepare_coco_dataset({"train": coco}, work / "dataset")["train"]
        torch.manual_seed(0)
        model = EfficientSamModel(EfficientSamConfig.from_variant("vitt"))  # random weights, ViT-T shapes
        model.vision_encoder.requires_grad_(False)
        model.prompt_encoder.requires_grad_(False)
        image_size, mask_size = model.config.image_size, model.config.low_res_mask_size
        options = dict(image_size=image_size, mask_size=mask_size, max_objects=objects, box_noise_scale=0.1)
        result = {"photos": args.photo_count, "size": f"{width}x{height}", "objects_per_photo": objects,
                  "generate_seconds": round(generate_s, 1)}

        # before: every item decodes each chosen object's RLE at full resolution and resizes it
        zeros = {"image_embeddings": torch.zeros(model.config.image_embedding_width, 64, 64)}
        result["before_labels_per_item"] = _per_item_seconds(
            EfficientSamTrainingDataset(split, label_cache=False, embedding_reader=lambda _: dict(zeros), **options), 1)
        result["before_pixels_and_labels_per_item"] = _per_item_seconds(
            EfficientSamTrainingDataset(split, label_cache=False, **options), 1)
        started = time.perf_counter()
        pixels = stored_image_pixel_values(split.select([0])[0]["image"], image_size)
        result["pixel_conversion_seconds_per_photo"] = round(time.perf_counter() - started, 3)

        # once per dataset: training targets (and point windows) and the embedding cache
        started = time.perf_counter()
        EfficientSamTrainingDataset(split, label_cache=work / "labels", embedding_reader=lambda _: dict(zeros),
                                    prompt_mode="mixed", **options)
        result["label_cache_build_seconds_per_photo"] = round((time.perf_counter() - started) / len(split), 3)
        labels_bytes = sum(f.stat().st_size for f in (work / "labels").rglob("*.npy"))
        result["label_cache_kib_per_photo"] = round(labels_bytes / len(split) / 1024, 1)
        started = time.perf_counter()
        with torch.no_grad():
            cache = build_embedding_cache(datasets.DatasetDict({"train": split}), model, dtype="bfloat16", batch_size=1,
                                          cache_root=work / "embeddings", device="cpu", progress=False)
        result["embedding_cache_build_seconds_per_photo"] = round((time.perf_counter() - started) / len(split), 2)

        # every epoch: embeddings, targets and prompts read from the caches
        reader = EmbeddingCacheReader(cache, "train")
        collate = EfficientSamCollator()
        inputs = {}
        for mode in ("box", "point"):
            cached = EfficientSamTrainingDataset(split, label_cache=work / "labels", embedding_reader=reader,
                                                 prompt_mode=mode, num_positive_points=1, num_negative_points=1, **options)
            cached[0]
            timing = measure(lambda: [collate([cached[i]]) for i in range(len(cached))], args.repeats)
            inputs[mode] = {"seconds_per_image": round(timing["seconds"] / len(cached), 5), "undisturbed": timing["clean"],
                            "runs": timing["runs"]}
            if mode == "box":
                batch = collate([cached[0]])
        result["cached_input_per_image"] = inputs

        # one decoder training step on the same image's queries (forward, loss, backward)
        model.train()

        def step(dtype=None):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                out = model(image_embeddings=batch["image_embeddings"], input_points=batch["input_points"],
                            input_labels=batch["input_labels"])
            segmentation_loss(pred_masks=out.pred_masks.float(), iou_scores=out.iou_scores.float(), labels=batch["labels"],
                              query_mask=batch["query_mask"])["loss"].backward()

        steps = {"fp32": measure(step, args.repeats)}
        if autocast_dtype("cpu", torch.bfloat16) == torch.bfloat16:
            steps["bf16_autocast"] = measure(lambda: step(torch.bfloat16), args.repeats)
        result["decoder_step"] = {name: {"seconds": round(t["seconds"], 3), "queries": int(batch["query_mask"].sum()),
                                         "undisturbed": t["clean"], "runs": t["runs"]} for name, t in steps.items()}
        fastest = min(t["seconds"] for t in steps.values())
        result["input_over_step"] = {
            mode: round(inputs[mode]["seconds_per_image"] / fastest, 4) for mode in inputs
        }
        result["input_over_step_target"] = "at most 0.2 (input preparation at most 1/5 of the step)"
        result["before_over_step"] = round(result["before_labels_per_item"]["seconds_per_item"] / fastest, 2)
        del pixels
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


SECTIONS = {
    "conversion": bench_conversion,
    "synthetic_generation": bench_synthetic_generation,
    "input_pipeline": bench_input_pipeline,
    "embedding_cache": bench_embedding_cache,
    "big_photo": bench_big_photo,
}


def environment() -> dict:
    machine = machine_record()
    return {
        "device": f"CPU: {machine['summary']}, {machine['logical_cpus']} logical cores",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "datasets": datasets.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _without_runs(value):
    if isinstance(value, dict):
        return {k: _without_runs(v) for k, v in value.items() if k != "runs"}
    return value


def print_table(name: str, result: dict) -> None:
    print(f"\n== {name}")
    width = max(len(key) for key in result)
    for key, value in result.items():
        value = value["summary"] if key == "machine" else _without_runs(value)
        print(f"  {key:<{width}}  {value}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=sorted(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--shared_dir", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--input_data", choices=["wafer", "synthetic"], default="wafer")
    parser.add_argument("--image_size", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--cache_images", type=int, default=8, help="embedding_cache: wafer images encoded")
    parser.add_argument("--live_encoder_batches", type=int, default=2, help="embedding_cache: batches through the live encoder")
    parser.add_argument("--photo_count", type=int, default=3, help="big_photo: synthetic 6000 x 4000 photos")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()

    stored = json.loads(args.output.read_text()) if args.output.exists() else {}
    sections = stored.get("sections", {})
    env = environment()
    print(env["device"], "| torch", env["torch"], "| datasets", env["datasets"])
    for name in args.sections:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        result = SECTIONS[name](args)
        # a busy shared machine slows every number down; keep how busy it was next to them, and the CPU
        result.setdefault("load_average_1min_at_start", round(load, 2))
        result["machine"] = machine_record()
        result["measured"] = env["date"]
        sections[name] = result
        print_table(name, result)
    write_json_atomic(args.output, {**env, "sections": sections}, indent=2)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
