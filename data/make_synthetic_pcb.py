#!/usr/bin/env python
"""Write the built-in synthetic circuit-board sample in COCO format.

Example:
    python data/make_synthetic_pcb.py --output_dir outputs/synthetic_pcb --num_train 40 --num_validation 10 --seed 0

Layout: OUTPUT_DIR/{train,validation}/_annotations.coco.json with the PNG images beside it.
"""

from __future__ import annotations

import argparse
import sys
import time

from modeling_efficientsam.data.synthetic_pcb import make_synthetic_pcb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_train", type=int, default=40)
    parser.add_argument("--num_validation", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    splits = make_synthetic_pcb(args.output_dir, args.num_train, args.num_validation, args.seed, args.width, args.height)
    for name, (annotations_path, _) in splits.items():
        print(f"{name}: {annotations_path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
