"""Comparison of a converted model with saved outputs of the original EfficientSAM.

A reference file (``*_io.safetensors``) holds the original model's inputs (``images_uint8``,
``points``, ``point_labels``) and its outputs. The comparison runs the port in the reference's own
floating type:

- float64 references are the strict test: the same formula in double precision agrees to rounding
  (embeddings ~1e-14, logits ~1e-10), so every tensor must be within `FLOAT64_LIMITS`.
- float32 references carry the original's own float32 rounding, which these weights amplify (up to
  0.8 in ViT-T mask logits, different on every machine). Against such a file only the image
  embeddings are held to a tight limit; the decoder is checked loosely (median, binarized agreement,
  IoU). `float32_error_ratios` gives the fair float32 test when the float64 file is at hand: the
  port's float32 distance to float64 divided by the original's float32 distance to float64.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch

from .modeling_efficientsam import EfficientSamModel
from .processing_efficientsam import EfficientSamProcessor

# Float64 ground truth: largest absolute difference allowed per kind of tensor.
FLOAT64_LIMITS = {"pixel_values": 1e-12, "image_embeddings": 1e-9, "masks": 1e-8, "iou": 1e-9}
# Float32 references: the embeddings are well conditioned; the decoder outputs are not (see above).
FLOAT32_EMBEDDING_LIMIT = 1e-4
DECODER_MEDIAN_TOLERANCE = 1e-3
DECODER_MASK_AGREEMENT = 0.995
DECODER_IOU_TOLERANCE = 0.05

DECODER_OUTPUTS = (
    "low_res_masks", "iou_predictions", "low_res_masks_single", "iou_predictions_single",
    "masks_original_size", "iou_predictions_full",
)


def load_reference(path: str) -> dict:
    from safetensors.torch import load_file

    reference = load_file(path)
    missing = {"images_uint8", "points", "point_labels", "image_embeddings"} - set(reference)
    if missing:
        raise ValueError(f"{path} is not a reference file: it lacks {sorted(missing)}")
    return reference


def reference_dtype(reference: dict) -> torch.dtype:
    return reference["image_embeddings"].dtype


def run_on_reference_inputs(
    model: EfficientSamModel,
    processor: EfficientSamProcessor,
    reference: dict,
    dtype: torch.dtype,
    decoder_embeddings: Optional[torch.Tensor] = None,
) -> dict:
    """The port's outputs for the reference inputs, computed in `dtype` through the public API.

    The decoder is fed `decoder_embeddings` when given (e.g. the reference's own embeddings, to
    judge the decoder alone), otherwise the port's own embeddings (end to end).
    """
    if next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    model.eval()
    images = [image.permute(1, 2, 0).numpy() for image in reference["images_uint8"]]
    inputs = processor(
        images=images, input_points=reference["points"], input_labels=reference["point_labels"], dtype=dtype
    )
    prompts = {"input_points": inputs["input_points"], "input_labels": inputs["input_labels"]}
    with torch.no_grad():
        embeddings = model.get_image_embeddings(inputs["pixel_values"])
        decoder_input = embeddings if decoder_embeddings is None else decoder_embeddings.to(dtype)
        multi = model(image_embeddings=decoder_input, **prompts)
        single = model(image_embeddings=decoder_input, multimask_output=False, **prompts)
        # end to end: the port's own embeddings (the encoder is not run twice for the same pixels)
        full = model(image_embeddings=embeddings, **prompts)
        resized = processor.post_process_masks(full.pred_masks, inputs["original_sizes"], binarize=False)
    return {
        "pixel_values": inputs["pixel_values"],
        "image_embeddings": embeddings,
        "low_res_masks": multi.pred_masks, "iou_predictions": multi.iou_scores,
        "low_res_masks_single": single.pred_masks, "iou_predictions_single": single.iou_scores,
        "masks_original_size": torch.stack(resized), "iou_predictions_full": full.iou_scores,
    }


def difference_report(outputs: dict, reference: dict) -> dict:
    """Per tensor present in both: largest and median absolute difference (in float64), and for
    masks the fraction of pixels on the same side of 0."""
    report = {}
    for name, value in outputs.items():
        if name not in reference:
            continue
        difference = (value.double() - reference[name].double()).abs()
        entry = {"max": difference.max().item(), "median": difference.median().item()}
        if "masks" in name:
            entry["sign_agreement"] = ((value > 0) == (reference[name] > 0)).double().mean().item()
        report[name] = entry
    return report


def compare_with_reference(model: EfficientSamModel, processor: EfficientSamProcessor, reference_path: str) -> dict:
    """Run the reference inputs in the reference's dtype and report the differences per tensor.

    The decoder rows are computed from the reference's own embeddings, so the decoder is judged on
    its own; `masks_original_size` / `iou_predictions_full` run end to end from the pixels.
    """
    reference = load_reference(reference_path)
    dtype = reference_dtype(reference)
    outputs = run_on_reference_inputs(model, processor, reference, dtype, reference["image_embeddings"])
    report = difference_report(outputs, reference)
    report["dtype"] = str(dtype).replace("torch.", "")
    return report


def _kind(name: str) -> str:
    if name in ("pixel_values", "image_embeddings"):
        return name
    return "masks" if "masks" in name else "iou"


def reference_failures(report: dict, embedding_tolerance: float = FLOAT32_EMBEDDING_LIMIT) -> list[str]:
    """The checks of a `compare_with_reference` report that fail (empty when all pass)."""
    failures = []
    strict = report.get("dtype") == "float64"
    for name, entry in report.items():
        if not isinstance(entry, dict):
            continue
        if strict:
            limit = FLOAT64_LIMITS[_kind(name)]
            if entry["max"] > limit:
                failures.append(f"{name}: max difference {entry['max']:.2e} > {limit:g} (float64)")
            continue
        if name == "image_embeddings" and entry["max"] > embedding_tolerance:
            failures.append(f"{name}: max difference {entry['max']:.2e} > {embedding_tolerance}")
        if "masks" in name:
            if entry["median"] > DECODER_MEDIAN_TOLERANCE:
                failures.append(f"{name}: median difference {entry['median']:.2e} > {DECODER_MEDIAN_TOLERANCE}")
            if entry["sign_agreement"] < DECODER_MASK_AGREEMENT:
                failures.append(f"{name}: binary masks agree on {entry['sign_agreement']:.4%} of pixels")
        if "iou" in name and entry["max"] > DECODER_IOU_TOLERANCE:
            failures.append(f"{name}: max difference {entry['max']:.2e} > {DECODER_IOU_TOLERANCE}")
    return failures


def float32_error_ratios(
    model: EfficientSamModel, processor: EfficientSamProcessor, float32_path: str, float64_path: str
) -> dict:
    """How far the port's float32 outputs are from float64 truth, relative to the original's.

    The port runs end to end in float32 (its own embeddings feed its decoder, as in the original's
    float32 run). Returns per decoder tensor ``{"port": max |port32 - truth64|, "original": max
    |original32 - truth64|, "ratio": port / original}`` plus ``image_embeddings`` with the port's
    largest difference to the float64 embeddings.
    """
    truth = load_reference(float64_path)
    original = load_reference(float32_path)
    port = run_on_reference_inputs(model, processor, truth, torch.float32)
    result = {}
    for name in ("image_embeddings",) + DECODER_OUTPUTS:
        if name not in truth:
            continue
        port_error = (port[name].double() - truth[name]).abs().max().item()
        original_error = (original[name].double() - truth[name]).abs().max().item()
        result[name] = {"port": port_error, "original": original_error, "ratio": port_error / original_error}
    return result


def format_report(report: dict) -> str:
    parts = []
    for name, entry in report.items():
        if not isinstance(entry, dict):
            continue
        text = f"{name} max {entry['max']:.2e} median {entry['median']:.1e}"
        if "sign_agreement" in entry:
            text += f" masks agree {entry['sign_agreement']:.3%}"
        parts.append(text)
    return "; ".join(parts)
