"""Command-line options shared by ``efficientsam-predict`` and ``efficientsam-evaluate``."""

from __future__ import annotations

import argparse


def build_cli_parser(prog: str, description: str, module_doc: str) -> argparse.ArgumentParser:
    """A parser whose ``--help`` ends with the module docstring after its first paragraph (usage, formats)."""
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=module_doc.split("\n\n", 1)[1],
    )


def add_predictor_arguments(parser: argparse.ArgumentParser) -> None:
    """How the predictor runs: batching, candidates, device and precision, progress bar."""
    parser.add_argument("--batch_size", type=int, default=2, help="images per image-encoder forward (default 2)")
    parser.add_argument("--max_queries_per_batch", type=int, default=16,
                        help="boxes per mask-decoder forward (default 16)")
    parser.add_argument("--single_mask", action="store_true",
                        help="use the single-mask output instead of the best of 3 candidates")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--autocast", action="store_true", help="keep float32 weights and autocast to --dtype")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")


def load_predictor(model: str, args: argparse.Namespace):
    """The predictor of ``model`` (folder or Hub id) configured by :func:`add_predictor_arguments`' options."""
    from .predictor import EfficientSamPredictor

    return EfficientSamPredictor.from_pretrained(
        model, device=args.device, dtype=args.dtype, autocast=args.autocast,
        max_queries_per_batch=args.max_queries_per_batch,
    )


__all__ = ["add_predictor_arguments", "build_cli_parser", "load_predictor"]
