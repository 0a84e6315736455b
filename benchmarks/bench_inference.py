#!/usr/bin/env python
"""Inference speed on CPU: encoder latency per image, decoder latency per box, and the predict CLI path.

    python benchmarks/bench_inference.py                        # everything, ~2-5 minutes on 2 cores
    python benchmarks/bench_inference.py --variants vitt --cli_images 4

Measured at the released input size (1024 x 1024) with random weights from
``EfficientSamConfig.from_variant`` (speed does not depend on the weight values):

* encoder: ``model.get_image_embeddings`` on one image, seconds per image;
* decoder: ``model(image_embeddings=..., input_boxes=...)`` with ``--boxes`` boxes in one call
  (reported per box) and with a single box (the latency of one interactive query);
* each in float32 and in bfloat16 under ``torch.autocast`` (weights stay float32);
* predict CLI: ``efficientsam-predict`` (in-process ``main``) on the first ``--cli_images`` annotated
  images of the wafer validation split (640 x 640) with their annotation boxes, ViT-T, float32 and
  bf16 autocast: images per second over the whole run (model load, image reading, encoder, decoder,
  resizing masks, RLE encoding, writing results).

Timings are the median of ``--repeats`` runs after one warm-up run. The machine's load average is
recorded before and after because other processes on a shared machine change the numbers.
Results go to benchmarks/results/inference_cpu.json (``--output`` to change).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from modeling_efficientsam import EfficientSamConfig, EfficientSamImageProcessor, EfficientSamModel, EfficientSamProcessor

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results" / "inference_cpu.json"
MODES = {"fp32": None, "bf16_autocast": torch.bfloat16}


def cpu_description() -> dict:
    model_name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    return {
        "cpu": model_name,
        "logical_cpus": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "platform": platform.platform(),
    }


def _median_time(function, repeats: int) -> tuple:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _context(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def random_boxes(count: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(1, count, 2, 2, generator=generator) * size
    low, high = corners.min(dim=2).values, corners.max(dim=2).values
    return torch.cat([low, torch.maximum(high, low + 8)], dim=-1)


@torch.inference_mode()
def bench_latency(variant: str, repeats: int, num_boxes: int) -> list:
    torch.manual_seed(0)
    config = EfficientSamConfig.from_variant(variant)
    model = EfficientSamModel(config).eval()
    size = config.image_size
    pixel_values = torch.randn(1, 3, size, size)
    rows = []
    for mode, dtype in MODES.items():
        with _context(dtype):
            encoder, encoder_runs = _median_time(lambda: model.get_image_embeddings(pixel_values), repeats)
            embeddings = model.get_image_embeddings(pixel_values)
            many = random_boxes(num_boxes, size)
            one = random_boxes(1, size, seed=1)
            decoder_many, many_runs = _median_time(lambda: model(image_embeddings=embeddings, input_boxes=many), repeats)
            decoder_one, one_runs = _median_time(lambda: model(image_embeddings=embeddings, input_boxes=one), repeats)
        row = {
            "variant": variant,
            "precision": mode,
            "parameters": sum(p.numel() for p in model.parameters()),
            "image_size": size,
            "encoder_seconds_per_image": encoder,
            "decoder_ms_per_box": 1000 * decoder_many / num_boxes,
            "decoder_boxes_per_call": num_boxes,
            "decoder_ms_single_box": 1000 * decoder_one,
            "runs_seconds": {"encoder": encoder_runs, "decoder_batch": many_runs, "decoder_single": one_runs},
        }
        rows.append(row)
        print(f"  {variant} {mode:<14} encoder {encoder:6.2f} s/image   decoder {row['decoder_ms_per_box']:7.1f} ms/box "
              f"({num_boxes} per call), {row['decoder_ms_single_box']:7.1f} ms for 1 box", flush=True)
    return rows


def bench_predict_cli(shared: Path, num_images: int, work: Path) -> list:
    from modeling_efficientsam.inference.predict_cli import main as predict_main

    split = shared / "datasets" / "wafer_defects" / "valid"
    annotations = split / "_annotations.coco.json"
    if not annotations.exists():
        print(f"  skipped: {annotations} not found (pass --shared_dir)")
        return []
    document = json.loads(annotations.read_text())
    annotated = {a["image_id"] for a in document["annotations"]}
    images = [record for record in document["images"] if record["id"] in annotated][:num_images]
    keep = {record["id"] for record in images}
    subset = dict(document, images=images, annotations=[a for a in document["annotations"] if a["image_id"] in keep])
    subset_path = work / "subset.json"
    subset_path.write_text(json.dumps(subset))

    model_dir = work / "vitt"
    torch.manual_seed(0)
    config = EfficientSamConfig.from_variant("vitt")
    EfficientSamModel(config).save_pretrained(model_dir)
    EfficientSamProcessor(EfficientSamImageProcessor(size=config.image_size)).save_pretrained(model_dir)

    rows = []
    for mode, extra in (("fp32", []), ("bf16_autocast", ["--dtype", "bfloat16", "--autocast"])):
        out = work / f"out_{mode}"
        with contextlib.redirect_stdout(io.StringIO()):
            status = predict_main(["--model", str(model_dir), "--images", str(split), "--boxes", str(subset_path),
                                   "--output_dir", str(out), "--batch_size", "2", "--no_progress"] + extra)
        if status != 0:
            raise RuntimeError(f"predict CLI failed with status {status}")
        summary = json.loads((out / "summary.json").read_text())
        row = {
            "variant": "vitt",
            "precision": mode,
            "dataset": "wafer_defects/valid",
            "images": summary["images_processed"],
            "boxes": summary["predictions"],
            "image_size": "640x640",
            "batch_size": 2,
            "seconds": summary["seconds"],
            "images_per_second": summary["images_per_second"],
        }
        rows.append(row)
        print(f"  predict CLI vitt {mode:<14} {row['images']} images, {row['boxes']} boxes: "
              f"{row['images_per_second']:.3f} images/s ({row['seconds']:.1f} s)", flush=True)
    return rows


def format_table(latency: list, cli: list) -> str:
    lines = [
        f"{'variant':<8}{'precision':<15}{'encoder s/img':>14}{'decoder ms/box':>16}{'1-box ms':>10}",
    ]
    for row in latency:
        lines.append(f"{row['variant']:<8}{row['precision']:<15}{row['encoder_seconds_per_image']:>14.2f}"
                     f"{row['decoder_ms_per_box']:>16.1f}{row['decoder_ms_single_box']:>10.1f}")
    for row in cli:
        lines.append(f"predict CLI {row['variant']} {row['precision']}: {row['images_per_second']:.3f} images/s "
                     f"({row['images']} wafer images, {row['boxes']} boxes)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["vitt", "vits"], choices=["vitt", "vits"])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up (default 2)")
    parser.add_argument("--boxes", type=int, default=16, help="boxes per decoder call (default 16)")
    parser.add_argument("--cli_images", type=int, default=6, help="wafer images for the predict CLI (0 to skip)")
    parser.add_argument("--shared_dir", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_before[0]:.2f}", flush=True)
    latency = []
    for variant in args.variants:
        latency += bench_latency(variant, args.repeats, args.boxes)
    cli = []
    if args.cli_images > 0:
        with tempfile.TemporaryDirectory(prefix="bench_inference_") as work:
            cli = bench_predict_cli(args.shared_dir, args.cli_images, Path(work))
    result = {
        "device": "cpu",
        "device_description": cpu_description(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "settings": {"repeats": args.repeats, "statistic": "median after 1 warm-up", "boxes_per_decoder_call": args.boxes,
                     "weights": "random (EfficientSamConfig.from_variant)", "attn_implementation": "sdpa",
                     "bf16": "torch.autocast(cpu, bfloat16), float32 weights"},
        "latency": latency,
        "predict_cli": cli,
        "benchmark_seconds": round(time.perf_counter() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    temp = args.output.with_name(f".{args.output.name}.tmp")
    temp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(temp, args.output)
    print()
    print(format_table(latency, cli))
    print(f"\nwrote {args.output} ({result['benchmark_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
