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


SECTIONS = {
    "conversion": bench_conversion,
    "synthetic_generation": bench_synthetic_generation,
    "input_pipeline": bench_input_pipeline,
    "embedding_cache": bench_embedding_cache,
}


def environment() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "device": f"CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "datasets": datasets.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def print_table(name: str, result: dict) -> None:
    print(f"\n== {name}")
    width = max(len(key) for key in result)
    for key, value in result.items():
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
        # a busy shared machine slows every number down; keep how busy it was next to them
        result.setdefault("load_average_1min_at_start", round(load, 2))
        result["measured"] = env["date"]
        sections[name] = result
        print_table(name, result)
    write_json_atomic(args.output, {**env, "sections": sections}, indent=2)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
