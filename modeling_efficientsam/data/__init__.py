"""Data for EfficientSAM fine-tuning: COCO conversion with a validation report, training prompts,
the batch collator, and a synthetic PCB sample dataset. Formats are described in data/README.md."""

from .coco import CocoValidationError, load_box_source, read_coco_json
from .coco_cleaning import DROP_REASONS, REPAIR_REASONS, load_coco_split
from .collator import EfficientSamCollator
from .conversion import (
    category_names,
    coco_features,
    conversion_metadata,
    dataset_categories,
    load_or_prepare,
    prepare_coco_dataset,
    set_conversion_metadata,
)
from .dataset_card import build_dataset_card
from .fingerprint import conversion_fingerprint
from .hub_format import CATEGORIES_FILE, is_saved_dataset_folder, load_prepared_dataset, push_prepared_dataset, save_hub_format
from .masks import decode_rle, encode_mask, mask_coverage, resize_mask
from .prompts import box_query, jitter_box, point_query, sample_negative_points, sample_positive_points
from .report import format_conversion_summary, format_report, read_report, usable_object_count
from .synthetic_pcb import make_synthetic_pcb
from .training_dataset import EfficientSamTrainingDataset, efficientsam_pixel_values

__all__ = [
    "CATEGORIES_FILE",
    "CocoValidationError",
    "DROP_REASONS",
    "EfficientSamCollator",
    "EfficientSamTrainingDataset",
    "REPAIR_REASONS",
    "box_query",
    "build_dataset_card",
    "category_names",
    "coco_features",
    "conversion_fingerprint",
    "conversion_metadata",
    "dataset_categories",
    "decode_rle",
    "efficientsam_pixel_values",
    "encode_mask",
    "format_conversion_summary",
    "format_report",
    "is_saved_dataset_folder",
    "jitter_box",
    "load_box_source",
    "load_coco_split",
    "load_or_prepare",
    "load_prepared_dataset",
    "make_synthetic_pcb",
    "mask_coverage",
    "point_query",
    "prepare_coco_dataset",
    "push_prepared_dataset",
    "read_coco_json",
    "read_report",
    "resize_mask",
    "sample_negative_points",
    "sample_positive_points",
    "save_hub_format",
    "set_conversion_metadata",
    "usable_object_count",
]
