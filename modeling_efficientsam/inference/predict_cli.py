"""Segment the boxes of a COCO annotations or detections file and write COCO segmentation results.

Usage (console script ``efficientsam-predict``, or ``python -m modeling_efficientsam.inference.predict_cli``)::

    # boxes of the annotations, matched to the images by file_name
    efficientsam-predict --model outputs/vitt-pcb --images data/val --boxes data/val/annotations.json \\
        --output_dir predictions --overlays

    # a detector's boxes (COCO results list); --image_info maps their image_id to file names
    efficientsam-predict --model outputs/vitt-pcb --images data/val --boxes detections.json \\
        --image_info data/val/annotations.json --score_threshold 0.3 --output_dir predictions

Inputs:
    --boxes: a COCO annotations file (object with ``images`` and ``annotations``; crowd annotations
        are skipped; an annotation without ``bbox`` is prompted with the tight box of its
        segmentation, as the dataset conversion does, counted as ``box_from_segmentation``, and one
        without either is listed under ``no_box``) or a COCO detection results file (list of ``{image_id, category_id, bbox (xywh),
        score}``). Detection results name images by id only, so ``--image_info`` (any COCO file with
        an ``images`` list) is required with them; ``--score_threshold`` keeps detections with
        ``score >= S``.
    --images: folders and/or files. In a folder, ``file_name`` is looked up as a relative path (one
        leading out of the folder, with ``..`` or as an absolute path elsewhere, is an error naming the
        record). Listed files are matched by base name. If only files are given, only the records of
        those files are processed (others are counted as ``not_in_images``, not reported missing).
        Two image records naming one file are an error naming both ids.

Outputs (each written under a temporary name, then renamed; see ``modeling_efficientsam/file_utils.py``):
    OUT/segmentation_results.json: a COCO results list that ``COCO.loadRes`` accepts, one record per
        box: ``image_id``, ``category_id``, ``segmentation`` (compressed RLE, counts as str),
        ``score`` (the predicted IoU of the chosen mask), ``bbox`` (tight xywh box of the mask),
        ``prompt_bbox`` (the input box) and, for detections, ``detection_score``.
    OUT/summary.json: counts, timing and every problem: images that are missing or unusable
        (unreadable, or a size that matches neither the JSON nor its EXIF rotation), boxes for
        unknown image ids, invalid boxes, annotations without any box. Problems with single records
        never stop the run; they are listed (by annotation id) and skipped. A file that cannot be
        used at all, or a model that cannot be loaded, ends the run with one ``error: ...`` line
        naming the file and the fix (exit status 2).
    OUT/overlays/<file_name>.png with ``--overlays``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..data.coco import CocoImage, image_file_path, load_box_source
from ..data.image_files import resolve_image
from ..file_utils import save_image_atomic, write_json_atomic
from ..image_utils import load_image
from .cli_options import add_predictor_arguments, build_cli_parser, load_predictor
from .results import result_record

logger = logging.getLogger(__name__)

RESULTS_NAME = "segmentation_results.json"
SUMMARY_NAME = "summary.json"


class ImageLocator:
    """Map a COCO ``file_name`` to a file among the ``--images`` arguments.

    Folders: ``folder / file_name`` (file names may contain sub-folders, but may not lead out of the
    folder: an absolute ``file_name`` or one climbing out with ``..`` is an error naming the record).
    Files: matched by their base name, so a listed file is used whatever folder ``file_name`` names.
    ``only_listed_files`` is true when every argument is a file: then only records for those files
    are wanted.
    """

    def __init__(self, inputs):
        self.folders, self.files = [], {}
        for item in inputs:
            path = Path(item)
            if path.is_dir():
                self.folders.append(path)
            elif path.is_file():
                self.files.setdefault(path.name, path)
            else:
                raise FileNotFoundError(f"--images: {item} is neither a file nor a folder")
        self.only_listed_files = not self.folders
        self.used: set = set()

    def find(self, record: CocoImage, boxes_path: str) -> Optional[Path]:
        """The file of ``record``; a ``file_name`` that leads out of a folder is an error (see ``image_file_path``)."""
        file_name = record.file_name
        for folder in self.folders:
            candidate = Path(image_file_path(boxes_path, folder, record))
            if candidate.is_file():
                return candidate
        match = self.files.get(Path(file_name).name)
        if match is not None:
            self.used.add(match.name)
        return match

    def unused_files(self) -> list:
        return sorted(str(path) for name, path in self.files.items() if name not in self.used)


def build_parser() -> argparse.ArgumentParser:
    parser = build_cli_parser(
        "efficientsam-predict", "Segment the boxes of a COCO annotations or detections file with EfficientSAM.", __doc__
    )
    parser.add_argument("--model", required=True, help="model folder or Hub id")
    parser.add_argument("--images", required=True, nargs="+", help="image folder(s) and/or image file(s)")
    parser.add_argument("--boxes", required=True, help="COCO annotations JSON or COCO detection results JSON")
    parser.add_argument("--image_info", help="COCO JSON whose images list maps detection image_ids to file names")
    parser.add_argument("--output_dir", required=True, help="where results, summary and overlays are written")
    parser.add_argument("--overlays", action="store_true", help="also write overlay PNGs of the masks")
    parser.add_argument("--score_threshold", type=float, help="keep detections with score >= this")
    add_predictor_arguments(parser)
    return parser


def _load(record: CocoImage, path: Path, boxes_path: str) -> np.ndarray:
    """Read the image as the annotations see it (same orientation rule as the dataset conversion)."""
    apply_exif = True
    if record.width is not None and record.height is not None:
        found = dataclasses.replace(record, file_name=path.name, objects=[])
        apply_exif = resolve_image(boxes_path, str(path.parent), found).apply_exif
    # An array carries no orientation tag, so the processor cannot rotate it a second time.
    return np.array(load_image(path, apply_exif=apply_exif))


def _valid_boxes(processor, boxes, size, where: str, problems: dict) -> list:
    """Keep the boxes the processor accepts (xywh pixels); list the others with the reason."""
    kept = []
    for entry in boxes:
        try:
            processor.rescale_boxes(np.array([entry.bbox]), size, "xywh", False)
        except ValueError as error:
            problems.setdefault("invalid_box", []).append(f"{where}: {entry.source}: {error}")
            continue
        kept.append(entry)
    return kept


def run(args) -> dict:
    """Do the work of :func:`main`; returns the summary (also written to ``summary.json``)."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    source = load_box_source(args.boxes, args.image_info, args.score_threshold)
    locator = ImageLocator(args.images)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    problems = source.problems
    counts = dict(source.counts, images_without_boxes=0, not_in_images=0)

    work = []  # (record, path, boxes)
    for image_id, record in source.images.items():
        boxes = source.boxes[image_id]
        path = locator.find(record, args.image_info or args.boxes)
        if path is None and locator.only_listed_files:
            counts["not_in_images"] += 1
            continue
        if not boxes:
            counts["images_without_boxes"] += 1
            continue
        if path is None:
            problems.setdefault("missing_image", []).append(f"{record.file_name} (image id {image_id}, {len(boxes)} boxes)")
            continue
        work.append((record, path, boxes))
    unused = locator.unused_files()
    if unused:
        problems["images_without_record"] = unused

    predictor = load_predictor(args.model, args)
    processor = predictor.processor
    results, processed_images = [], 0
    progress = tqdm(total=len(work), desc="images", unit="img", disable=args.no_progress)
    for start in range(0, len(work), args.batch_size):
        group = []
        for record, path, boxes in work[start : start + args.batch_size]:
            try:
                array = _load(record, path, args.boxes)
            except (OSError, ValueError) as error:  # CocoValidationError is a ValueError
                problems.setdefault("unusable_image", []).append(f"{path}: {error}")
                progress.update(1)
                continue
            kept = _valid_boxes(processor, boxes, array.shape[:2], str(path), problems)
            if kept:
                group.append((record, path, kept, array))
            else:
                progress.update(1)
        if not group:
            continue
        predictions = predictor.predict_batch(
            [item[3] for item in group], [[entry.bbox for entry in item[2]] for item in group],
            box_format="xywh", normalized=False, multimask_output=not args.single_mask, batch_size=args.batch_size,
        )
        for (record, path, kept, array), prediction in zip(group, predictions):
            masks = prediction.masks.numpy()
            for entry, mask, score in zip(kept, masks, prediction.scores.tolist()):
                item = result_record(mask, record.id, entry.category_id, score)
                item["prompt_bbox"] = entry.bbox
                if entry.detection_score is not None:
                    item["detection_score"] = entry.detection_score
                results.append(item)
            if args.overlays:
                from .overlay import draw_overlay

                xyxy = [[x, y, x + w, y + h] for x, y, w, h in (entry.bbox for entry in kept)]
                target = (output_dir / "overlays" / record.file_name).with_suffix(".png")
                save_image_atomic(target, draw_overlay(array, masks, xyxy))
            processed_images += 1
            progress.update(1)
    progress.close()

    seconds = time.perf_counter() - started
    write_json_atomic(output_dir / RESULTS_NAME, results)
    summary = {
        "model": str(args.model),
        "boxes": str(args.boxes),
        "box_source": source.kind,
        "images_processed": processed_images,
        "predictions": len(results),
        "seconds": round(seconds, 3),
        "images_per_second": round(processed_images / seconds, 4) if seconds > 0 else None,
        "counts": counts,
        "problems": {reason: {"count": len(items), "items": items} for reason, items in problems.items()},
        "results_file": RESULTS_NAME,
    }
    write_json_atomic(output_dir / SUMMARY_NAME, summary, indent=2)
    return summary


def format_summary(summary: dict) -> str:
    lines = [
        f"{summary['images_processed']} images, {summary['predictions']} masks in {summary['seconds']:.1f} s "
        f"({summary['images_per_second']} images/s)",
    ]
    lines += [f"  {name}: {value}" for name, value in summary["counts"].items() if value]
    for reason, entry in summary["problems"].items():
        lines.append(f"  {reason}: {entry['count']}")
        lines += [f"    - {item}" for item in entry["items"][:10]]
        if entry["count"] > 10:
            lines.append(f"    ... {entry['count'] - 10} more in {SUMMARY_NAME}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print("error: --batch_size must be >= 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.no_progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    try:
        summary = run(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"wrote {Path(args.output_dir) / RESULTS_NAME} and {Path(args.output_dir) / SUMMARY_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
