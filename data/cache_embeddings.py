#!/usr/bin/env python
"""Compute the image embeddings of a prepared dataset once per encoder and store them for training.

Example (student, then teacher):
    python data/cache_embeddings.py --dataset outputs/wafer_dataset \
        --model outputs/efficientsam_vitt --model outputs/efficientsam_vits --dtype bfloat16

Embeddings go to <dataset>/embeddings/<fingerprint>/<split>/ (format in data/README.md). Running it
again reuses what is complete and valid, finishes an interrupted run, and recomputes damaged
shards. With two models, the training reader returns the first as "image_embeddings" and the
second as "teacher_image_embeddings".
"""

from __future__ import annotations

import argparse
import logging
import sys

from modeling_efficientsam.data.embedding_cache import COMPUTE_DTYPES, EMBEDDING_KEYS, STORAGE_DTYPES, build_embedding_cache
from modeling_efficientsam.inference.loading import ModelLoadError
from modeling_efficientsam.inference.predictor import resolve_device


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="folder written by data/prepare_dataset.py")
    parser.add_argument("--model", action="append", required=True,
                        help="EfficientSAM folder or Hub name; give it twice for student then teacher")
    parser.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default="bfloat16", help="storage dtype (default bfloat16)")
    parser.add_argument("--compute_dtype", choices=sorted(COMPUTE_DTYPES), default="float32",
                        help="encoder arithmetic; anything but float32 runs under autocast (default float32)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per encoder call (default 8)")
    parser.add_argument("--shard_size", type=int, default=64, help="images per shard file, the unit of resuming (default 64)")
    parser.add_argument("--splits", nargs="+", help="splits to cache (default: all)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--cache_root", default=None, help="where caches go (default <dataset>/embeddings)")
    parser.add_argument("--verify", choices=("checksum", "size"), default="checksum",
                        help="how existing shards are checked before reuse (default checksum)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (images done and images/s) on stderr")
    args = parser.parse_args(argv)
    if len(args.model) > 2:
        parser.error("--model may be given at most twice (student, then teacher)")
    if args.batch_size < 1 or args.shard_size < 1:
        parser.error("--batch_size and --shard_size must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)  # default: cuda when available
    total = 0
    for role, key, model in zip(("student", "teacher"), EMBEDDING_KEYS, args.model):
        try:
            cache = build_embedding_cache(
                args.dataset, model, dtype=args.dtype, splits=args.splits, batch_size=args.batch_size,
                cache_root=args.cache_root, shard_size=args.shard_size, compute_dtype=args.compute_dtype,
                device=device, verify=args.verify, progress=not args.no_progress,
            )
        except ModelLoadError as error:  # a damaged or missing model: one line naming the file and the fix
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"{role} ({key}) -> {cache.root}")
        print(cache.storage_summary())
        for split, stats in cache.build_stats.items():
            print(f"  {split}: computed {len(stats['computed_shards'])} shards, reused {len(stats['reused_shards'])} "
                  f"({stats['seconds']:.1f} s)")
        total += sum(entry["bytes"] for metadata in cache.metadata.values() for entry in metadata["shards"])
    print(f"total on disk for {len(args.model)} model(s): {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
