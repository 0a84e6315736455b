"""Export EfficientSAM to two ONNX graphs (image encoder, prompt encoder + mask decoder), checked with ONNX Runtime.

Usage (console script ``efficientsam-export``, or ``python -m modeling_efficientsam.inference.export_onnx``)::

    efficientsam-export --model outputs/vitt-pcb --output_dir outputs/vitt-pcb-onnx --format onnx [--opset 17]

Writes ``encoder.onnx``, ``decoder.onnx``, the processor settings (``processor_config.json``, to
prepare images and prompts exactly as in PyTorch) and ``export_info.json`` (inputs, outputs,
exporter, opset and the measured differences). The graphs:

* ``encoder.onnx``: ``pixel_values`` (B, 3, S, S) float32 -> ``image_embeddings`` (B, C, h, w)
  (S = 1024, C = 256, h = w = 64 for the released models). Dynamic batch.
* ``decoder.onnx``: ``image_embeddings`` (B, C, h, w), ``input_points`` (B, Q, P, 2) float32 in the
  S x S model frame, ``input_labels`` (B, Q, P) int64 -> ``iou_scores`` (B, Q, 3) and ``pred_masks``
  (B, Q, 3, 4h, 4w) logits (the three multimask candidates). B, Q (number of queries) and P (points
  per query, at most 6) are dynamic. A box is two points labelled 2 (top-left) and 3 (bottom-right);
  1 / 0 are positive / negative points, -1 padding.

The export is checked: ONNX Runtime runs both graphs on sample inputs (two batch sizes for the
encoder, two query / point counts for the decoder) and every output must satisfy
``max|onnx - torch| <= atol + rtol * max|torch|`` (defaults ``atol=1e-4``, ``rtol=1e-3``). The measured
maximum absolute differences are printed and stored in ``export_info.json``. For an ill-conditioned
model, where PyTorch's own float32 result already differs from float64 by more than that (the
shared reference fixtures, random weights scaled to be sensitive, move their mask logits by ~0.2),
an output that misses the direct tolerance still passes if its distance from a float64 PyTorch run
is at most 10x PyTorch float32's distance from it (plus ``atol``): the same rounding level, not a
wrong graph. Both distances are printed then.

Running the graphs: the command prints an example (``USAGE_EXAMPLE`` below, with the output
folder filled in). The processor prepares the image and the boxes (model frame) and turns the boxes
into the decoder's corner points (``box_corner_points``); the candidate with the highest predicted
IoU is taken, as ``modeling_efficientsam.metrics.select_by_predicted_iou`` does in PyTorch.

The TorchScript exporter (``dynamo=False``) is tried first; if it fails, the dynamo exporter.
If the sdpa attention does not export, the model is switched to eager attention (the same
arithmetic) and exported again.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from ..file_utils import staged_directory, write_json_atomic
from ..modeling_efficientsam import LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT, EfficientSamModel

logger = logging.getLogger(__name__)

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
INFO_FILE = "export_info.json"
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
ROUNDING_FACTOR = 10.0


class EfficientSamEncoderForExport(torch.nn.Module):
    """``pixel_values -> image_embeddings``."""

    def __init__(self, model: EfficientSamModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_embeddings(pixel_values)


class EfficientSamDecoderForExport(torch.nn.Module):
    """``(image_embeddings, input_points, input_labels) -> (iou_scores, pred_masks)`` with 3 candidates."""

    def __init__(self, model: EfficientSamModel, multimask_output: bool = True):
        super().__init__()
        self.model = model
        self.multimask_output = multimask_output

    def forward(self, image_embeddings, input_points, input_labels):
        output = self.model(
            image_embeddings=image_embeddings, input_points=input_points, input_labels=input_labels,
            multimask_output=self.multimask_output,
        )
        return output.iou_scores, output.pred_masks


def sample_inputs(model: EfficientSamModel, batch: int, queries: int, points: int, seed: int = 0) -> dict:
    """Random but valid inputs: normalized-looking pixels, points inside the frame, box-then-point labels."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    size = config.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=generator)
    coordinates = torch.rand(batch, queries, points, 2, generator=generator) * (size - 1)
    labels = torch.ones(batch, queries, points, dtype=torch.long)
    if points >= 2:  # a box (sorted corners) followed by positive / negative points
        corners = coordinates[:, :, :2].sort(dim=2).values
        coordinates = torch.cat([corners, coordinates[:, :, 2:]], dim=2)
        labels[:, :, 0], labels[:, :, 1] = LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT
        labels[:, :, 2:] = torch.randint(0, 2, (batch, queries, points - 2), generator=generator)  # negative / positive
    return {"pixel_values": pixel_values, "input_points": coordinates, "input_labels": labels}


def _export(module, args, path, input_names, output_names, dynamic_axes, opset, exporter):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side input checks
        if exporter == "torchscript":
            torch.onnx.export(module, args, path, input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)
        else:
            dims = {}
            for name, axes in dynamic_axes.items():
                if name in input_names:
                    dims[name] = {axis: torch.export.Dim.AUTO for axis in axes}
            torch.onnx.export(module, args, path, input_names=input_names, output_names=output_names,
                              dynamic_shapes=dims, opset_version=opset, dynamo=True, external_data=False)


def export_graphs(model: EfficientSamModel, output_dir: Path, opset: int, exporter: str = "auto") -> dict:
    """Write encoder.onnx and decoder.onnx; returns {"exporter": ..., "attn_implementation": ...}."""
    sample = sample_inputs(model, batch=1, queries=2, points=2)
    with torch.no_grad():
        embeddings = model.get_image_embeddings(sample["pixel_values"])
    graphs = [
        (EfficientSamEncoderForExport(model), (sample["pixel_values"],), output_dir / ENCODER_FILE,
         ["pixel_values"], ["image_embeddings"],
         {"pixel_values": {0: "batch"}, "image_embeddings": {0: "batch"}}),
        (EfficientSamDecoderForExport(model), (embeddings, sample["input_points"], sample["input_labels"]),
         output_dir / DECODER_FILE, ["image_embeddings", "input_points", "input_labels"], ["iou_scores", "pred_masks"],
         {"image_embeddings": {0: "batch"}, "input_points": {0: "batch", 1: "queries", 2: "points"},
          "input_labels": {0: "batch", 1: "queries", 2: "points"}, "iou_scores": {0: "batch", 1: "queries"},
          "pred_masks": {0: "batch", 1: "queries"}}),
    ]
    exporters = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    attentions = [model.config._attn_implementation or "sdpa"]
    if attentions[0] != "eager":
        attentions.append("eager")
    errors = []
    for attention in attentions:
        model.config._attn_implementation = attention
        for name in exporters:
            try:
                for module, args, path, inputs, outputs, axes in graphs:
                    _export(module.eval(), args, str(path), inputs, outputs, axes, opset, name)
                return {"exporter": name, "attn_implementation": attention}
            except Exception as error:  # noqa: BLE001 - any exporter failure means: try the next option
                logger.warning("export with %s exporter and %s attention failed: %s", name, attention, error)
                errors.append(f"{name}/{attention}: {type(error).__name__}: {error}")
    raise RuntimeError("ONNX export failed with every exporter:\n" + "\n".join(errors))


def _max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max(initial=0.0))


def check_with_onnxruntime(model: EfficientSamModel, output_dir: Path, atol: float = DEFAULT_ATOL,
                           rtol: float = DEFAULT_RTOL, rounding_factor: float = ROUNDING_FACTOR) -> list:
    """Run both graphs with ONNX Runtime and PyTorch on sample inputs; returns one record per output.

    Each record has ``max_abs_diff`` (ONNX Runtime vs PyTorch float32), ``max_abs_reference``
    (max |PyTorch|), ``within_tolerance`` (``max_abs_diff <= atol + rtol * max_abs_reference``) and
    ``passed``. When the direct check fails, a float64 PyTorch run is the referee: ``torch_fp32_error``
    and ``onnx_error`` are the distances of PyTorch float32 and of ONNX Runtime from it, and the output
    passes if ``onnx_error <= rounding_factor * torch_fp32_error + atol``, i.e. the ONNX graph is as
    accurate as PyTorch's own float32 arithmetic on an ill-conditioned model (random test weights
    scaled to be sensitive, for instance, whose float32 outputs already move by tenths).
    """
    import copy

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    encoder = ort.InferenceSession(str(output_dir / ENCODER_FILE), options, providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(output_dir / DECODER_FILE), options, providers=["CPUExecutionProvider"])
    model64 = None
    checks = []
    for case, (batch, queries, points) in enumerate([(1, 3, 2), (2, 5, 4)]):
        sample = sample_inputs(model, batch, queries, points, seed=case + 1)
        with torch.no_grad():
            embeddings = model.get_image_embeddings(sample["pixel_values"])
            output = model(image_embeddings=embeddings, input_points=sample["input_points"],
                           input_labels=sample["input_labels"], multimask_output=True)
        (onnx_embeddings,) = encoder.run(None, {"pixel_values": sample["pixel_values"].numpy()})
        # The decoder is checked on the PyTorch embeddings so that its own difference is measured.
        onnx_iou, onnx_masks = decoder.run(None, {
            "image_embeddings": embeddings.numpy(),
            "input_points": sample["input_points"].numpy().astype(np.float32),
            "input_labels": sample["input_labels"].numpy().astype(np.int64),
        })
        shape = f"B={batch}, Q={queries}, P={points}"
        outputs = {
            "image_embeddings": (embeddings.numpy(), onnx_embeddings),
            "iou_scores": (output.iou_scores.numpy(), onnx_iou),
            "pred_masks": (output.pred_masks.numpy(), onnx_masks),
        }
        records = {}
        for name, (reference, candidate) in outputs.items():
            if reference.shape != candidate.shape:
                raise RuntimeError(f"{name} ({shape}): ONNX shape {candidate.shape} != PyTorch {reference.shape}")
            difference = _max_abs(reference, candidate)
            scale = float(np.abs(reference).max(initial=0.0))
            within = difference <= atol + rtol * scale
            records[name] = {"output": name, "case": shape, "max_abs_diff": difference, "max_abs_reference": scale,
                             "within_tolerance": within, "passed": within}
        if not all(record["passed"] for record in records.values()):
            if model64 is None:
                model64 = copy.deepcopy(model).double()
            with torch.no_grad():
                exact = {"image_embeddings": model64.get_image_embeddings(sample["pixel_values"].double())}
                output64 = model64(image_embeddings=embeddings.double(), input_points=sample["input_points"].double(),
                                   input_labels=sample["input_labels"], multimask_output=True)
            exact["iou_scores"], exact["pred_masks"] = output64.iou_scores, output64.pred_masks
            for name, record in records.items():
                if record["passed"]:
                    continue
                reference, candidate = outputs[name]
                record["torch_fp32_error"] = _max_abs(reference, exact[name].numpy())
                record["onnx_error"] = _max_abs(candidate, exact[name].numpy())
                record["passed"] = record["onnx_error"] <= rounding_factor * record["torch_fp32_error"] + atol
        checks.extend(records.values())
    return checks


def export_onnx(model_path: str, output_dir, opset: int = 17, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                exporter: str = "auto") -> dict:
    """Export, check and save; returns the ``export_info.json`` content. Raises if the check fails.

    Everything is built in a folder beside ``output_dir`` and its files are moved in at the end, so
    ``output_dir`` never holds graphs from two exports; other files in ``output_dir`` are kept.
    """
    from ..processing_efficientsam import load_processor

    from .loading import load_efficientsam_model

    model = load_efficientsam_model(model_path, dtype=torch.float32).eval()
    processor = load_processor(model_path, image_size=model.config.image_size)
    with staged_directory(output_dir, merge=True) as staging:
        used = export_graphs(model, staging, opset, exporter)
        checks = check_with_onnxruntime(model, staging, atol, rtol)
        processor.save_pretrained(staging)
        info = {
            "model": str(model_path),
            "opset": opset,
            **used,
            "torch_version": torch.__version__,
            "image_size": model.config.image_size,
            "encoder": {"file": ENCODER_FILE, "inputs": {"pixel_values": "(batch, 3, S, S) float32"},
                        "outputs": {"image_embeddings": "(batch, C, h, w) float32"}},
            "decoder": {"file": DECODER_FILE,
                        "inputs": {"image_embeddings": "(batch, C, h, w) float32",
                                   "input_points": "(batch, queries, points<=6, 2) float32, model frame",
                                   "input_labels": "(batch, queries, points) int64: 2/3 box corners, 1/0 points, -1 pad"},
                        "outputs": {"iou_scores": "(batch, queries, 3) float32",
                                    "pred_masks": "(batch, queries, 3, 4h, 4w) float32 logits"}},
            "tolerance": {
                "atol": atol, "rtol": rtol, "rounding_factor": ROUNDING_FACTOR,
                "rule": "max|onnx - torch| <= atol + rtol * max|torch| per output; otherwise, against a float64 "
                        "PyTorch run, max|onnx - fp64| <= rounding_factor * max|torch_fp32 - fp64| + atol",
            },
            "checks": checks,
            "passed": all(check["passed"] for check in checks),
        }
        write_json_atomic(staging / INFO_FILE, info, indent=2)
    return info


USAGE_EXAMPLE = '''import numpy as np, onnxruntime as ort, torch
from modeling_efficientsam.metrics import select_by_predicted_iou
from modeling_efficientsam.processing_efficientsam import box_corner_points, load_processor
processor = load_processor("{out}")
inputs = processor(images="image.jpg", input_boxes=[[[x1, y1, x2, y2]]])  # pixel boxes, xyxy
encoder = ort.InferenceSession("{out}/encoder.onnx"); decoder = ort.InferenceSession("{out}/decoder.onnx")
(embeddings,) = encoder.run(None, {{"pixel_values": inputs["pixel_values"].numpy()}})
points, labels = box_corner_points(inputs["input_boxes"].numpy())  # (1, Q, 2, 2) model frame, (1, Q, 2) labels 2 / 3
points = points.astype(np.float32)
iou, logits = decoder.run(None, {{"image_embeddings": embeddings, "input_points": points, "input_labels": labels}})
chosen = select_by_predicted_iou(pred_masks=torch.from_numpy(logits), iou_scores=torch.from_numpy(iou))  # (1, Q, h, w)
masks = processor.post_process_masks(chosen[:, :, None], inputs["original_sizes"])[0][:, 0]  # (Q, H, W) bool'''


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="efficientsam-export", description="Export EfficientSAM to ONNX (encoder + decoder) and check it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="model folder or Hub id")
    parser.add_argument("--output_dir", required=True, help="where encoder.onnx, decoder.onnx and export_info.json go")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format (onnx)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--exporter", default="auto", choices=["auto", "torchscript", "dynamo"],
                        help="auto: TorchScript exporter first, dynamo if it fails")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"check tolerance, absolute (default {DEFAULT_ATOL})")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help=f"check tolerance, relative (default {DEFAULT_RTOL})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        info = export_onnx(args.model, args.output_dir, args.opset, args.atol, args.rtol, args.exporter)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported with the {info['exporter']} exporter, opset {info['opset']}, "
          f"{info['attn_implementation']} attention, to {args.output_dir}")
    print(f"ONNX Runtime vs PyTorch float32 (pass if max|diff| <= {args.atol:g} + {args.rtol:g} * max|torch|):")
    for check in info["checks"]:
        line = (f"  {check['output']:<17} {check['case']:<16} max abs diff {check['max_abs_diff']:.3e} "
                f"(max |torch| {check['max_abs_reference']:.3g})  ")
        if check["within_tolerance"]:
            line += "ok"
        else:
            line += (f"outside; vs float64: onnx {check['onnx_error']:.3e}, torch fp32 {check['torch_fp32_error']:.3e} "
                     f"-> {'ok (same rounding level)' if check['passed'] else 'FAIL'}")
        print(line)
    print("\nRun the graphs:\n" + USAGE_EXAMPLE.format(out=args.output_dir))
    if not info["passed"]:
        print("error: ONNX Runtime does not reproduce PyTorch within the tolerance (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
