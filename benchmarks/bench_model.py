"""Model speed on the machine it runs on: the decoder training step, the encoder, half precision.

    python benchmarks/bench_model.py                                   # every section (~10-20 min on 2 cores)
    python benchmarks/bench_model.py --sections decoder_train          # one section; the others keep their numbers
    python benchmarks/bench_model.py --sections encoder --variants vitt
    python benchmarks/bench_model.py --device cuda --sections decoder_train encoder --images 8 --queries 64

Sections (results merge into ``benchmarks/results/model_cpu.json``, or ``model_cuda.json`` with
``--device cuda``; every section stores the machine record of :mod:`benchmark_utils`: CPU model,
ATen capability, native bf16, threads, load average, and the GPU when one is used):

* ``decoder_train``: one decoder fine-tuning step from cached embeddings (prompt encoder and mask
  decoder forward, the project's segmentation loss, backward; frozen image and prompt encoders), ViT-T,
  ``--images`` x ``--queries`` box queries (2 x 8). Variants, timed in turn round after round in this
  one process: the decoder before the speed work (``reference_decoder.py``, float32), the current
  one in float32, in bf16 autocast (what it computes in is recorded: float32 without native bf16), and
  under ``torch.compile``. FLOPs per step are counted with ``torch.utils.flop_counter`` for both
  decoders; with the float32 peak of a large matrix product measured in the same run they give the
  fraction of the machine's peak reached (counting the reference's arithmetic, and the executed one).
* ``conditions``: the reference and current float32 steps of ``decoder_train`` again, in two
  subprocesses: one emulating an AVX2-only CPU (as ``precision`` does), one with glibc's allocator
  keeping freed memory (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``). Every decoder_train
  row also records the fresh memory a step touches (minor page faults x 4 KiB).
* ``encoder``: encoder images/s and decoder inference queries/s, eager vs sdpa, fp32 vs bf16 autocast,
  for ``--variants`` at 1024 (batch 1, ``--queries`` boxes), with the largest embedding difference vs
  eager fp32.
* ``precision``: the decoder training step and the ViT-T encoder in a subprocess that emulates a CPU
  without native bf16 (``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``,
  ``MKL_ENABLE_INSTRUCTIONS=AVX2``): float32, bf16 autocast as the model handles it (it falls back
  to float32 there) and bf16 forced (``EFFICIENTSAM_CPU_NATIVE_HALF=1``, what the fallback avoids);
  and the same three on this CPU as it is.

On a GPU (``--device cuda``; default: the GPU when torch sees one) every timed call waits for the
GPU's queued work, the peak is a 8192^3 matrix product, each decoder_train row records the peak GPU
memory of a step instead of fresh host pages, ``encoder`` runs ``--encoder_batch`` images per call
(default 16 there, 1 on a CPU: the cache builder's batches), and ``conditions`` and ``precision``
(CPU matters) are skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from modeling_efficientsam import EfficientSamConfig, EfficientSamModel
from modeling_efficientsam.file_utils import write_json_atomic
from modeling_efficientsam.modeling_efficientsam import CPU_NATIVE_HALF_PRECISION_ENV
from modeling_efficientsam.precision import autocast_dtype

from benchmark_utils import WATCH, interleaved, machine_record, matmul_peak, measure, synchronized  # noqa: E402  (benchmarks/ is on sys.path)
from reference_decoder import ReferenceMaskDecoder, reference_segmentation_loss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"  # model_cpu.json / model_cuda.json
EMULATED_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def _autocast(dtype, device_type: str = "cpu"):
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------
# The decoder training step
# ------------------------------------------------------------------------------------------------
def decoder_models(variant: str = "vitt", seed: int = 0, device="cpu"):
    """(current model, the same weights with the reference decoder), encoders frozen as in decoder
    fine-tuning, on `device`."""
    torch.manual_seed(seed)
    model = EfficientSamModel(EfficientSamConfig.from_variant(variant)).to(device)
    model.vision_encoder.requires_grad_(False)
    model.prompt_encoder.requires_grad_(False)
    reference = copy.deepcopy(model)
    reference.mask_decoder = ReferenceMaskDecoder(model.config.mask_decoder_config)
    reference.mask_decoder.load_state_dict(model.mask_decoder.state_dict())
    return model.train(), reference.to(device).train()


def decoder_batch(config, images: int, queries: int, seed: int = 0, device="cpu") -> dict:
    """Cached-embedding inputs of a training step: embeddings, box prompts and blob-shaped targets
    (drawn on the CPU, so the same on every device, then moved to `device`)."""
    generator = torch.Generator().manual_seed(seed)
    size, grid, mask = config.image_size, config.image_embedding_size, config.low_res_mask_size
    corners = torch.rand(images, queries, 2, 2, generator=generator) * (size - 64)
    boxes = torch.cat([corners.min(2).values, corners.max(2).values + 64], dim=-1)
    ys, xs = torch.meshgrid(torch.arange(mask), torch.arange(mask), indexing="ij")
    scaled = boxes * (mask / size)
    centre_x, centre_y = (scaled[..., 0] + scaled[..., 2]) / 2, (scaled[..., 1] + scaled[..., 3]) / 2
    radius_x, radius_y = (scaled[..., 2] - scaled[..., 0]) / 2, (scaled[..., 3] - scaled[..., 1]) / 2
    labels = (((xs - centre_x[..., None, None]) / radius_x[..., None, None]) ** 2
              + ((ys - centre_y[..., None, None]) / radius_y[..., None, None]) ** 2 <= 1).float()
    batch = {"image_embeddings": torch.randn(images, config.image_embedding_width, grid, grid, generator=generator),
             "input_boxes": boxes, "labels": labels, "query_mask": torch.ones(images, queries, dtype=torch.bool)}
    return {name: value.to(device) for name, value in batch.items()}


def training_step(model, batch: dict, dtype=None):
    """Forward (under ``dtype`` autocast when given), the segmentation loss, backward; returns the loss.

    A model with the reference decoder is trained with the reference loss (both as they were before
    the speed work), the current model with the package's `segmentation_loss`.
    """
    from modeling_efficientsam.training.losses import segmentation_loss

    if isinstance(getattr(model, "mask_decoder", None), ReferenceMaskDecoder):
        segmentation_loss = reference_segmentation_loss  # noqa: F811
    model.zero_grad(set_to_none=True)
    with _autocast(dtype, batch["image_embeddings"].device.type):
        outputs = model(image_embeddings=batch["image_embeddings"], input_boxes=batch["input_boxes"])
    loss = segmentation_loss(pred_masks=outputs.pred_masks.float(), iou_scores=outputs.iou_scores.float(),
                             labels=batch["labels"], query_mask=batch["query_mask"])["loss"]
    loss.backward()
    return loss.detach()


def fresh_pages_per_step(step) -> int:
    """Minor page faults of one call of `step` (after a warm-up call): memory the allocator had to
    take fresh from the kernel, 4 KiB each. glibc returns large freed blocks to the kernel, so a step
    that frees and allocates large tensors pays for touching new pages every time."""
    import resource

    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def step_flops(model, batch: dict) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        training_step(model, batch)
    return int(counter.get_total_flops())


def peak_device_mib_per_step(step, device) -> float:
    """Peak GPU memory allocated during one call of `step` (after a warm-up call), in MiB."""
    step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def bench_decoder_train(args) -> dict:
    device = torch.device(args.device)
    on_cpu = device.type == "cpu"
    model, reference = decoder_models(device=device)
    batch = decoder_batch(model.config, args.images, args.queries, device=device)
    queries = args.images * args.queries
    peak_size = 3072 if on_cpu else 8192
    peak = matmul_peak(peak_size, device=device)
    flops = {"reference": step_flops(reference, batch), "current": step_flops(model, batch)}
    native_bf16 = autocast_dtype(device, torch.bfloat16) == torch.bfloat16
    variants = {
        "reference_fp32": lambda: training_step(reference, batch),
        "current_fp32": lambda: training_step(model, batch),
        "current_bf16_autocast": lambda: training_step(model, batch, torch.bfloat16),
    }
    if not on_cpu:  # mixed precision is the usual setting on a GPU: the reference under it too
        variants["reference_bf16_autocast"] = lambda: training_step(reference, batch, torch.bfloat16)
    compile_seconds = None
    if args.compile:
        compiled = torch.compile(model)
        started = time.perf_counter()
        synchronized(lambda: training_step(compiled, batch), device)()  # compilation (forward and backward graphs)
        compile_seconds = round(time.perf_counter() - started, 1)
        variants["current_fp32_compiled"] = lambda: training_step(compiled, batch)
    variants = {name: synchronized(function, device) for name, function in variants.items()}
    print(f"decoder_train: {queries} queries per step, {args.rounds} rounds; FLOPs per step reference "
          f"{flops['reference'] / 1e9:.1f} G, current {flops['current'] / 1e9:.1f} G; fp32 peak {peak['float32_gflops']} GFLOP/s",
          flush=True)
    timings = interleaved(variants, rounds=args.rounds)
    # the peak again after the runs, the larger counts (a matrix product is disturbed like anything else)
    later = matmul_peak(peak_size, device=device)
    peak = {**later, "float32_gflops": max(peak["float32_gflops"], later["float32_gflops"]),
            "bfloat16_gflops": max(peak["bfloat16_gflops"], later["bfloat16_gflops"])}
    # times from undisturbed runs when every variant has one, else from all runs (then flagged)
    quiet = all(timing["quiet_best"] is not None for timing in timings.values())
    best = {name: timing["quiet_best"] if quiet else timing["best"] for name, timing in timings.items()}
    reference_best = best["reference_fp32"]
    rows = {}
    for name, timing in timings.items():
        seconds = best[name]
        executed = flops["reference" if name.startswith("reference") else "current"]
        rows[name] = {
            "queries_per_s": round(queries / seconds, 3),
            "queries_per_s_median": round(queries / timing["median"], 3),
            "seconds_per_step": round(seconds, 4),
            "speedup_vs_reference_fp32": round(reference_best / seconds, 2),
            "speedup_vs_reference_fp32_median": round(timings["reference_fp32"]["median"] / timing["median"], 2),
            # GFLOP/s counting the reference decoder's arithmetic (the work the step stands for) and
            # the arithmetic this variant executes; as fractions of the measured float32 peak
            "reference_arithmetic_gflops": round(flops["reference"] / seconds / 1e9, 1),
            "executed_gflops": round(executed / seconds / 1e9, 1),
            "fraction_of_fp32_peak": round(flops["reference"] / seconds / 1e9 / peak["float32_gflops"], 3),
            "computes_in": str(autocast_dtype(device, torch.bfloat16)).replace("torch.", "") if "bf16" in name else "float32",
            "quiet_runs": sum(run["other_cores"] <= 0.15 for run in timing["runs"]),
            "runs": timing["runs"],
        }
        if on_cpu:
            rows[name]["fresh_mib_per_step"] = round(fresh_pages_per_step(variants[name]) * 4 / 1024, 1)
        else:
            rows[name]["fraction_of_bf16_peak"] = round(flops["reference"] / seconds / 1e9 / peak["bfloat16_gflops"], 3)
            rows[name]["peak_device_mib_per_step"] = peak_device_mib_per_step(variants[name], device)
        print(f"  {name:<24} {rows[name]['queries_per_s']:7.2f} q/s (median {rows[name]['queries_per_s_median']:.2f}), "
              f"x{rows[name]['speedup_vs_reference_fp32']:.2f} vs reference fp32, "
              f"{rows[name]['fraction_of_fp32_peak']:.1%} of the fp32 peak", flush=True)
    if "reference_bf16_autocast" in rows:
        rows["current_bf16_autocast"]["speedup_vs_reference_bf16_autocast"] = round(
            best["reference_bf16_autocast"] / best["current_bf16_autocast"], 2)
    return {
        "setup": {"variant": "vitt", "device": str(device), "images": args.images, "queries_per_image": args.queries,
                  "rounds": args.rounds,
                  "step": "prompt encoder + mask decoder forward from cached embeddings, segmentation_loss, backward "
                          "(frozen image and prompt encoders; no optimizer step)",
                  "timing": "each variant once per round in turn; the fastest undisturbed run (fastest of all runs "
                            "when some variant had none, see from_undisturbed_runs) and the median over the rounds"
                            + ("" if on_cpu else "; every timed call waits for the GPU to finish")},
        "peak": peak,
        "flops_per_step": flops,
        "flops_per_query_forward_backward": {k: round(v / queries / 1e9, 2) for k, v in flops.items()},
        "native_bf16": native_bf16,
        "from_undisturbed_runs": quiet,
        "compile_seconds": compile_seconds,
        "variants": rows,
    }


# ------------------------------------------------------------------------------------------------
# Encoder and decoder inference (eager vs sdpa, fp32 vs bf16)
# ------------------------------------------------------------------------------------------------
def bench_variant(variant: str, repeats: int, queries: int, batch: int, device="cpu") -> dict:
    device = torch.device(device)
    torch.manual_seed(0)
    model = EfficientSamModel(EfficientSamConfig.from_variant(variant)).to(device).eval()
    size = model.config.image_size
    pixels = torch.randn(batch, 3, size, size).to(device)
    corners = torch.rand(batch, queries, 2, 2) * (size - 1)
    boxes = torch.cat([corners.min(2).values, corners.max(2).values + 1], dim=-1).to(device)
    results = {"variant": variant, "parameters": model.num_parameters(), "batch": batch, "queries_per_image": queries}
    embeddings = {}
    for implementation in ("eager", "sdpa"):
        model.config._attn_implementation = implementation
        for dtype_name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            key = f"{implementation}_{dtype_name}"

            def encode():
                with torch.no_grad(), _autocast(dtype, device.type):
                    return model.get_image_embeddings(pixels)

            encoder = measure(synchronized(encode, device), repeats)
            embeddings[key] = encode().float()
            cached = embeddings[key]

            def decode():
                with torch.no_grad(), _autocast(dtype, device.type):
                    return model(image_embeddings=cached, input_boxes=boxes)

            decoder = measure(synchronized(decode, device), repeats)
            results[f"encoder_images_per_s_{key}"] = round(batch / encoder["seconds"], 3)
            results[f"decoder_queries_per_s_{key}"] = round(batch * queries / decoder["seconds"], 2)
            results[f"undisturbed_{key}"] = encoder["clean"] and decoder["clean"]
            print(f"  {variant} {key}: encoder {results[f'encoder_images_per_s_{key}']:.3f} img/s, "
                  f"decoder {results[f'decoder_queries_per_s_{key}']:.1f} q/s", flush=True)
    reference = embeddings["eager_fp32"]
    results["max_embedding_difference_vs_eager_fp32"] = {
        key: float(f"{(value - reference).abs().max().item():.3g}") for key, value in embeddings.items() if key != "eager_fp32"
    }
    base = results["encoder_images_per_s_eager_fp32"]
    results["encoder_speedup_vs_eager_fp32"] = {
        key: round(results[f"encoder_images_per_s_{key}"] / base, 2) for key in ("sdpa_fp32", "sdpa_bf16", "eager_bf16")
    }
    results["bf16_computes_in"] = str(autocast_dtype(device, torch.bfloat16)).replace("torch.", "")
    return results


def bench_encoder(args) -> dict:
    return {"results": [bench_variant(v, args.repeats, args.queries, args.encoder_batch, args.device) for v in args.variants]}


# ------------------------------------------------------------------------------------------------
# Half precision with and without native support
# ------------------------------------------------------------------------------------------------
def precision_measurements(args) -> dict:
    """fp32, bf16 autocast as the model handles it, bf16 forced: decoder training step and encoder."""
    model, _ = decoder_models()
    batch = decoder_batch(model.config, args.images, args.queries)
    pixels = torch.randn(1, 3, model.config.image_size, model.config.image_size)

    def forced(function):
        def run():
            previous = os.environ.get(CPU_NATIVE_HALF_PRECISION_ENV)
            os.environ[CPU_NATIVE_HALF_PRECISION_ENV] = "1"
            try:
                return function()
            finally:
                if previous is None:
                    del os.environ[CPU_NATIVE_HALF_PRECISION_ENV]
                else:
                    os.environ[CPU_NATIVE_HALF_PRECISION_ENV] = previous
        return run

    def encode(dtype):
        def run():
            with torch.no_grad(), _autocast(dtype):
                return model.get_image_embeddings(pixels)
        return run

    variants = {
        "decoder_train_fp32": lambda: training_step(model, batch),
        "decoder_train_bf16_autocast": lambda: training_step(model, batch, torch.bfloat16),
        "decoder_train_bf16_forced": forced(lambda: training_step(model, batch, torch.bfloat16)),
        "encoder_fp32": encode(None),
        "encoder_bf16_autocast": encode(torch.bfloat16),
        "encoder_bf16_forced": forced(encode(torch.bfloat16)),
    }
    timings = interleaved(variants, rounds=args.precision_rounds)
    rows = {}
    for name, timing in timings.items():
        unit, count = ("queries_per_s", args.images * args.queries) if name.startswith("decoder") else ("images_per_s", 1)
        rows[name] = {unit: round(count / timing["best"], 3), "seconds": round(timing["best"], 3), "runs": timing["runs"]}
    for part in ("decoder_train", "encoder"):
        fp32 = timings[f"{part}_fp32"]["best"]
        for mode in ("bf16_autocast", "bf16_forced"):
            rows[f"{part}_{mode}"]["speed_vs_fp32"] = round(fp32 / timings[f"{part}_{mode}"]["best"], 2)
    return {"machine": machine_record(), "bf16_autocast_computes_in": str(autocast_dtype("cpu", torch.bfloat16)),
            "variants": rows}


def run_worker(worker: str, environment: dict, args, *options: str) -> dict:
    """This script as `--worker worker` in a subprocess with `environment` added; returns its RESULT."""
    env = dict(os.environ, **environment)
    env.pop(CPU_NATIVE_HALF_PRECISION_ENV, None)
    command = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--images", str(args.images),
               "--queries", str(args.queries), *options]
    process = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        raise SystemExit(f"the {worker} worker ({environment}) failed:\n{process.stdout[-2000:]}\n{process.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def bench_precision(args) -> dict:
    """This CPU as it is (in this process) and emulated without native bf16 (in a subprocess)."""
    results = {"this_cpu": precision_measurements(args)}
    results["emulated_avx2"] = run_worker("precision", EMULATED_AVX2, args, "--precision_rounds", str(args.precision_rounds))
    results["emulated_avx2"]["environment"] = EMULATED_AVX2
    for where, result in results.items():
        for name, row in result["variants"].items():
            if "speed_vs_fp32" in row:
                print(f"  {where:<14} {name:<28} {row['speed_vs_fp32']:.2f}x the float32 speed", flush=True)
    return results


# glibc's allocator told to keep freed memory (no return of large blocks to the kernel)
ALLOCATOR_KEEPS_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "2147483647", "MALLOC_TRIM_THRESHOLD_": "4294967295"}


def ratio_measurements(args) -> dict:
    """The reference and current float32 decoder training steps, interleaved (worker of `conditions`)."""
    model, reference = decoder_models()
    batch = decoder_batch(model.config, args.images, args.queries)
    queries = args.images * args.queries
    variants = {"reference_fp32": lambda: training_step(reference, batch), "current_fp32": lambda: training_step(model, batch)}
    timings = interleaved(variants, rounds=args.rounds)
    rows = {name: {"queries_per_s": round(queries / timing["best"], 3),
                   "queries_per_s_median": round(queries / timing["median"], 3),
                   "fresh_mib_per_step": round(fresh_pages_per_step(variants[name]) * 4 / 1024, 1),
                   "runs": timing["runs"]} for name, timing in timings.items()}
    reference, current = timings["reference_fp32"], timings["current_fp32"]
    return {"machine": machine_record(), "variants": rows,
            "speedup_vs_reference_fp32": round(reference["best"] / current["best"], 2),
            "speedup_vs_reference_fp32_median": round(reference["median"] / current["median"], 2)}


def bench_conditions(args) -> dict:
    """The float32 speed-up of decoder_train under other conditions, each in a subprocess, run
    `--condition_runs` times (the ratio moves between runs): a CPU with AVX2 only (emulated, see
    `precision`), and glibc's allocator keeping freed memory (the reference decoder frees and
    allocates far more large tensors per step, so it gains the most)."""
    results = {}
    for name, environment in (("emulated_avx2", EMULATED_AVX2), ("allocator_keeps_memory", ALLOCATOR_KEEPS_MEMORY)):
        runs = []
        for _ in range(args.condition_runs):
            row = run_worker("ratio", environment, args, "--rounds", str(args.rounds))
            runs.append(row)
            print(f"  {name:<24} current fp32 x{row['speedup_vs_reference_fp32']:.2f} vs reference fp32 "
                  f"(median x{row['speedup_vs_reference_fp32_median']:.2f}); fresh memory per step: reference "
                  f"{row['variants']['reference_fp32']['fresh_mib_per_step']} MiB, current "
                  f"{row['variants']['current_fp32']['fresh_mib_per_step']} MiB", flush=True)
        results[name] = {"environment": environment, "runs": runs}
    return results


SECTIONS = {"decoder_train": bench_decoder_train, "conditions": bench_conditions, "encoder": bench_encoder,
            "precision": bench_precision}
# What these sections measure exists on a CPU only (its kernels and its allocator).
CPU_ONLY_SECTIONS = {"conditions": "emulated AVX2 and glibc's allocator are CPU matters",
                     "precision": "native bf16 on a CPU and the float32 fallback without it are CPU matters"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (the GPU when torch sees one)")
    parser.add_argument("--encoder_batch", type=int, default=None,
                        help="encoder section: images per call (default 1 on a CPU, 16 on a GPU)")
    parser.add_argument("--variants", nargs="+", default=["vitt", "vits"], help="encoder section: model sizes")
    parser.add_argument("--repeats", type=int, default=2, help="encoder section: timed runs per measurement")
    parser.add_argument("--images", type=int, default=2, help="decoder training step: images per step")
    parser.add_argument("--queries", type=int, default=8, help="box queries per image")
    parser.add_argument("--rounds", type=int, default=5, help="decoder_train: timed rounds over the variants")
    parser.add_argument("--precision_rounds", type=int, default=2, help="precision: timed rounds over the variants")
    parser.add_argument("--condition_runs", type=int, default=2, help="conditions: subprocess runs per condition")
    parser.add_argument("--no_compile", dest="compile", action="store_false", help="decoder_train: skip torch.compile")
    parser.add_argument("--patience", type=float, default=300.0,
                        help="seconds this run may wait in all for other processes to go quiet before a round")
    parser.add_argument("--output", type=Path, default=None, help="default: results/model_<cpu|cuda>.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: only cpu and cuda are measured here")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA GPU here (torch {torch.__version__})")
    if args.encoder_batch is None:
        args.encoder_batch = 1 if device.type == "cpu" else 16
    if args.output is None:
        args.output = RESULTS / f"model_{device.type}.json"
    WATCH.patience = args.patience
    if args.worker == "precision":
        print("RESULT " + json.dumps(precision_measurements(args)), flush=True)
        return 0
    if args.worker == "ratio":
        print("RESULT " + json.dumps(ratio_measurements(args)), flush=True)
        return 0

    stored = json.loads(args.output.read_text()) if args.output.exists() else {}
    sections = stored.get("sections", {})
    for name in args.sections:
        if device.type != "cpu" and name in CPU_ONLY_SECTIONS:
            print(f"== {name}: skipped on {args.device} ({CPU_ONLY_SECTIONS[name]})", flush=True)
            continue
        machine = machine_record(device)
        print(f"== {name} ({machine['summary']}, load {machine['load_average_1min']})", flush=True)
        started = time.perf_counter()
        result = SECTIONS[name](args)
        result["machine"] = machine
        result["machine_after"] = {"load_average_1min": machine_record(device)["load_average_1min"]}
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["measured"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        sections[name] = result
        write_json_atomic(args.output, {"sections": sections}, indent=1)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
