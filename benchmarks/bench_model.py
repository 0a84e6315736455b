"""Model throughput: encoder images/s and decoder queries/s for ViT-T and ViT-S at 1024 input.

    python benchmarks/bench_model.py [--variants vitt vits] [--repeats 2] [--queries 16]

For each variant it measures eager vs sdpa attention and float32 vs bfloat16 autocast, the encoder
forward (images/s) and the decoder forward and forward+backward (queries/s, decoder only, from
precomputed embeddings, as in decoder fine-tuning). Ratios are taken within one run, since shared
machines are noisy. Results go to ``benchmarks/results/model_<device>.json`` and a Markdown table is
printed (paste it into benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from modeling_efficientsam import EfficientSamConfig, EfficientSamModel

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-").lower()
    return "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_variant(variant: str, device: torch.device, repeats: int, queries: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = EfficientSamModel(EfficientSamConfig.from_variant(variant)).to(device).eval()
    size = model.config.image_size
    pixels = torch.randn(batch, 3, size, size, device=device)
    corners = torch.rand(batch, queries, 2, 2, device=device) * (size - 1)
    boxes = torch.cat([corners.min(2).values, corners.max(2).values + 1], dim=-1)
    results = {"variant": variant, "parameters": model.num_parameters(), "batch": batch, "queries_per_image": queries}
    embeddings = {}
    for implementation in ("eager", "sdpa"):
        model.config._attn_implementation = implementation
        for dtype_name, autocast in (("fp32", False), ("bf16", True)):
            key = f"{implementation}_{dtype_name}"
            context = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)  # noqa: E731

            def encode():
                with torch.no_grad(), context():
                    return model.get_image_embeddings(pixels)

            seconds = timed(encode, repeats, device)
            embeddings[key] = encode().float()
            results[f"encoder_images_per_s_{key}"] = batch / seconds

            cached = embeddings[key].detach()

            def decode():
                with torch.no_grad(), context():
                    return model(image_embeddings=cached, input_boxes=boxes)

            def decode_train():
                model.zero_grad(set_to_none=True)
                with context():
                    out = model(image_embeddings=cached, input_boxes=boxes)
                (out.pred_masks.float().mean() + out.iou_scores.float().mean()).backward()

            results[f"decoder_queries_per_s_{key}"] = batch * queries / timed(decode, repeats, device)
            results[f"decoder_train_queries_per_s_{key}"] = batch * queries / timed(decode_train, repeats, device)
            print(f"{variant} {key}: encoder {results[f'encoder_images_per_s_{key}']:.3f} img/s, "
                  f"decoder {results[f'decoder_queries_per_s_{key}']:.1f} q/s, "
                  f"decoder train {results[f'decoder_train_queries_per_s_{key}']:.1f} q/s", flush=True)
    reference = embeddings["eager_fp32"]
    results["max_embedding_difference_vs_eager_fp32"] = {
        key: (value - reference).abs().max().item() for key, value in embeddings.items() if key != "eager_fp32"
    }
    base = results["encoder_images_per_s_eager_fp32"]
    results["encoder_speedup_vs_eager_fp32"] = {
        key: results[f"encoder_images_per_s_{key}"] / base for key in ("sdpa_fp32", "sdpa_bf16", "eager_bf16")
    }
    return results


def markdown(all_results: list[dict], device: str) -> str:
    lines = [
        f"Device: {device}",
        "",
        "| variant | attention | precision | encoder img/s | speed-up vs eager fp32 | decoder q/s | decoder train q/s | max embedding diff vs eager fp32 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in all_results:
        base = result["encoder_images_per_s_eager_fp32"]
        for implementation in ("eager", "sdpa"):
            for precision in ("fp32", "bf16"):
                key = f"{implementation}_{precision}"
                diff = result["max_embedding_difference_vs_eager_fp32"].get(key, 0.0)
                lines.append(
                    f"| {result['variant']} | {implementation} | {precision} | {result[f'encoder_images_per_s_{key}']:.3f} | "
                    f"{result[f'encoder_images_per_s_{key}'] / base:.2f}x | {result[f'decoder_queries_per_s_{key}']:.1f} | "
                    f"{result[f'decoder_train_queries_per_s_{key}']:.1f} | {diff:.2e} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["vitt", "vits"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--queries", type=int, default=16, help="box queries per image for the decoder")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = device_name(device)
    all_results = [bench_variant(v, device, args.repeats, args.queries, args.batch) for v in args.variants]
    record = {
        "device": name,
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "results": all_results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"model_{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(all_results, name))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
