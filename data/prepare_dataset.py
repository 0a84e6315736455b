#!/usr/bin/env python
"""Convert COCO instance-segmentation files into a datasets.DatasetDict saved to disk.

Example:
    python data/prepare_dataset.py \
        --train_annotations ../shared/datasets/wafer_defects/train/_annotations.coco.json \
        --train_images ../shared/datasets/wafer_defects/train \
        --validation_annotations ../shared/datasets/wafer_defects/valid/_annotations.coco.json \
        --validation_images ../shared/datasets/wafer_defects/valid \
        --output_dir outputs/wafer_dataset

    # the same, then pushed to a Hub dataset repository with its dataset card
    python data/prepare_dataset.py ... --output_dir outputs/wafer_dataset --push_to_hub me/wafer-defects \
        --license cc-by-4.0 [--private] [--hub_format_dir outputs/wafer_dataset_hub]

The dataset format and report.json are described in data/README.md; the Hub form (Parquet files,
dataset card, coco_categories.json, report.json) in modeling_efficientsam/data/hub_format.py.
`--hub_format_dir DIR` writes the Hub form to DIR (without --push_to_hub: only that, nothing is
uploaded). Exit status 2 with a message naming the file and record when the input cannot be converted.
"""

from __future__ import annotations

import argparse
import sys

from modeling_efficientsam.data import CocoValidationError, format_conversion_summary, load_or_prepare, prepare_coco_dataset, read_report
from modeling_efficientsam.data.hub_format import push_prepared_dataset, save_hub_format

SPLITS = ("train", "validation", "test")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for split in SPLITS:
        required = split == "train"
        parser.add_argument(f"--{split}_annotations", required=required, help=f"COCO JSON of the {split} split")
        parser.add_argument(f"--{split}_images", required=required, help="folder the JSON file_name entries are relative to")
    parser.add_argument("--output_dir", required=True, help="where the DatasetDict and report.json are written")
    parser.add_argument("--strict", action="store_true", help="fail on any annotation that would be repaired or dropped")
    parser.add_argument("--box_mask_iou_threshold", type=float, default=0.5,
                        help="drop annotations whose box has a lower IoU with the tight box of their mask (default 0.5)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep an existing conversion of the same inputs and options instead of converting again")
    parser.add_argument("--push_to_hub", metavar="REPO_ID",
                        help="also push the dataset (Parquet files, dataset card, COCO category ids, report) to this Hub dataset repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--license", help="license of the data for the dataset card, as a Hub license id (e.g. cc-by-4.0); "
                        "without it the card says that no license was declared")
    parser.add_argument("--pretty_name", help="title of the dataset card (default: the repository name)")
    parser.add_argument("--hub_format_dir", metavar="DIR",
                        help="write the Hub form of the dataset to DIR (kept; with --push_to_hub it is what gets uploaded)")
    args = parser.parse_args(argv)
    if args.private and not args.push_to_hub:
        parser.error("--private goes with --push_to_hub")
    for split in SPLITS[1:]:
        if (getattr(args, f"{split}_annotations") is None) != (getattr(args, f"{split}_images") is None):
            parser.error(f"--{split}_annotations and --{split}_images go together")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    splits = {
        split: (getattr(args, f"{split}_annotations"), getattr(args, f"{split}_images"))
        for split in SPLITS
        if getattr(args, f"{split}_annotations") is not None
    }
    convert = load_or_prepare if args.reuse else prepare_coco_dataset
    try:
        dataset = convert(splits, args.output_dir, strict=args.strict, box_mask_iou_threshold=args.box_mask_iou_threshold)
    except (CocoValidationError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_conversion_summary(args.output_dir))
    print(f"saved to {args.output_dir}")
    card = dict(report=read_report(args.output_dir), license=args.license, pretty_name=args.pretty_name)
    if args.push_to_hub:
        if args.license is None:
            print("warning: no --license given; the dataset card will say that no license was declared", file=sys.stderr)
        url = push_prepared_dataset(dataset, args.push_to_hub, private=args.private or None,
                                    hub_format_dir=args.hub_format_dir, **card)
        print(f"pushed to {url}")
    elif args.hub_format_dir:
        save_hub_format(dataset, args.hub_format_dir, **card)
        print(f"wrote the Hub form to {args.hub_format_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
