"""What the demo does, without any web framework: one image, its objects, their masks, the downloads.

A :class:`DemoSession` belongs to one person looking at one image. It keeps, for every model it
compares, its own :class:`~modeling_efficientsam.inference.EfficientSamPredictor` (sharing the loaded
weights), so the image is encoded once per upload and per model, and every new object afterwards
only runs the mask decoder. Decoded objects are remembered, so adding a box decodes that box alone.

An *object* (:class:`DemoPrompt`) is one query of the model: a box, clicked points, or a box refined
by points. Objects are written as text, one per line, which is also what the web page's text box
holds (see :func:`parse_prompts`)::

    120,40,380,300                  a box x0,y0,x1,y1 in image pixels
    120,40,380,300 +200,150 -250,160  the same box with an included and an excluded point
    +200,150 +210,170               two included points, no box

The gradio page (``app.py``) calls nothing but this module, so the tests drive the same code
without a server.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..file_utils import save_image_atomic, write_json_atomic
from ..inference.overlay import PALETTE, draw_overlay
from ..inference.predictor import EfficientSamPredictor
from ..inference.results import EfficientSamPrediction, result_record
from .prompts import NEGATIVE, POSITIVE, DemoPrompt, format_prompts, parse_candidate, parse_prompts  # noqa: F401  (re-exported)

@dataclass
class MaskSelection:
    """One model's masks for the objects of the session, one candidate per object.

    Attributes:
        masks (`np.ndarray` of shape `(N, H, W)`, bool): the selected mask of every object.
        scores (`np.ndarray` of shape `(N,)`): predicted IoU of the selected candidate.
        candidate_index (`np.ndarray` of shape `(N,)`): which candidate was selected (0-based).
        iou_scores (`np.ndarray` of shape `(N, M)`): predicted IoU of every candidate.
    """

    masks: np.ndarray
    scores: np.ndarray
    candidate_index: np.ndarray
    iou_scores: np.ndarray


def _own_predictor(template: EfficientSamPredictor) -> EfficientSamPredictor:
    """A predictor with its own image state that shares the template's model and processor."""
    return EfficientSamPredictor(
        template.model, template.processor, device=template.device, dtype=template.dtype,
        autocast=template.autocast, max_queries_per_batch=template.max_queries_per_batch,
    )


class DemoSession:
    """One image, its objects and every model's masks for them.

    Args:
        predictors: ``{label: EfficientSamPredictor}``, one or more models to compare (in display
            order). The session makes its own predictors from them, sharing the weights, so sessions
            of several people never overwrite each other's image.
    """

    def __init__(self, predictors: Mapping[str, EfficientSamPredictor]):
        if not predictors:
            raise ValueError("give at least one model")
        self.predictors = {str(name): _own_predictor(predictor) for name, predictor in predictors.items()}
        first = next(iter(self.predictors.values())).model.config
        self.num_candidates = int(first.mask_decoder_config.num_multimask_outputs)
        self.max_slots = min(
            int(p.model.config.prompt_encoder_config.max_num_points) for p in self.predictors.values()
        )
        self.image: Optional[np.ndarray] = None
        self.prompts: list = []
        self.pending_corner: Optional[tuple] = None
        # name -> {DemoPrompt: (iou (M,), logits (M, h, w), the predictor's chosen candidate)}
        self._decoded: dict = {name: {} for name in self.predictors}
        self._full_masks: dict = {}  # (name, prompt, candidate) -> (H, W) bool
        self.encode_calls = 0
        self.decode_calls = 0

    # -- the image ----------------------------------------------------------------------------
    @property
    def model_names(self) -> list:
        return list(self.predictors)

    @property
    def image_size(self) -> tuple:
        """(H, W) of the current image."""
        self._require_image()
        return tuple(self.image.shape[:2])

    def _require_image(self) -> None:
        if self.image is None:
            raise RuntimeError("no image yet: upload or pick one first")

    def set_image(self, image) -> "DemoSession":
        """Read the image (path, PIL image, array), encode it once per model, and forget every object."""
        first = next(iter(self.predictors.values()))
        array = first.processor.image_processor.to_rgb(image)  # EXIF orientation applied here, once
        for predictor in self.predictors.values():
            predictor.set_image(array)
        self.encode_calls += 1
        self.image = array
        self._decoded = {name: {} for name in self.predictors}
        self._full_masks = {}
        self.clear_prompts()
        return self

    # -- objects --------------------------------------------------------------------------------
    def clear_prompts(self) -> None:
        self.prompts = []
        self.pending_corner = None
        self._forget_unused()

    def _forget_unused(self) -> None:
        """Drop the decoded results of objects that are gone, so memory follows the current objects."""
        current = set(self.prompts)
        for results in self._decoded.values():
            for prompt in [prompt for prompt in results if prompt not in current]:
                del results[prompt]
        self._full_masks = {key: mask for key, mask in self._full_masks.items() if key[1] in current}

    def _check_prompt(self, prompt: DemoPrompt) -> DemoPrompt:
        height, width = self.image_size
        if prompt.num_slots > self.max_slots:
            raise ValueError(
                f"an object takes at most {self.max_slots} points, and a box counts as 2; this one has "
                f"{len(prompt.points)} point(s){' and a box' if prompt.box is not None else ''}"
            )
        if prompt.box is not None:
            x0, y0, x1, y1 = prompt.box
            if not (x1 > x0 and y1 > y0):
                raise ValueError(f"box {prompt.to_text()} is empty or inverted: x1 must exceed x0 and y1 exceed y0")
            if x0 >= width or y0 >= height or x1 <= 0 or y1 <= 0:
                raise ValueError(f"box {prompt.to_text()} lies outside the {width} x {height} image")
        for x, y in prompt.points:
            if not (0 <= x <= width and 0 <= y <= height):
                raise ValueError(f"point ({x:g}, {y:g}) lies outside the {width} x {height} image")
        return prompt

    def set_prompts(self, prompts: Sequence[DemoPrompt]) -> None:
        """Replace the objects (already decoded ones are kept, not decoded again)."""
        self._require_image()
        self.prompts = [self._check_prompt(prompt) for prompt in prompts]
        self._forget_unused()

    def set_prompts_text(self, text: str) -> None:
        self.set_prompts(parse_prompts(text))

    def add_box(self, box) -> int:
        """Add an (x0, y0, x1, y1) pixel box as a new object; returns its index."""
        self._require_image()
        self.prompts.append(self._check_prompt(DemoPrompt(box=tuple(box))))
        return len(self.prompts) - 1

    def add_point(self, x: float, y: float, positive: bool = True, new_object: bool = False) -> int:
        """Add a point to the last object (or start an object with it); returns the object's index."""
        self._require_image()
        label = POSITIVE if positive else NEGATIVE
        if self.prompts and not new_object:
            self.prompts[-1] = self._check_prompt(self.prompts[-1].with_point(x, y, label))
        else:
            self.prompts.append(self._check_prompt(DemoPrompt(points=((x, y),), labels=(label,))))
        return len(self.prompts) - 1

    def click(self, x: float, y: float, mode: str = "box") -> str:
        """A click at pixel (x, y). ``mode`` ``"box"``: the first click is a corner, the second closes
        the box; ``"include"`` / ``"exclude"``: a point on the last object. Returns a short message."""
        self._require_image()
        if mode == "box":
            if self.pending_corner is None:
                self.pending_corner = (float(x), float(y))
                return f"corner at ({x:g}, {y:g}); click the opposite corner"
            (x0, y0), self.pending_corner = self.pending_corner, None
            box = (min(x0, x), min(y0, y), max(x0, x), max(y0, y))
            index = self.add_box(box)
            return f"object {index + 1}: box {self.prompts[index].to_text()}"
        if mode in ("include", "exclude"):
            index = self.add_point(x, y, positive=mode == "include")
            return f"object {index + 1}: {mode} point ({x:g}, {y:g})"
        raise ValueError(f"unknown click mode {mode!r}; use 'box', 'include' or 'exclude'")

    # -- the model ------------------------------------------------------------------------------
    def decode(self) -> int:
        """Run the mask decoder for the objects not decoded yet, for every model; returns how many
        objects were decoded. The image encoder never runs here."""
        self._require_image()
        todo = [prompt for prompt in dict.fromkeys(self.prompts) if prompt not in self._decoded[self.model_names[0]]]
        if not todo:
            return 0
        # Objects with and without a box cannot share one decoder call (the processor takes boxes for
        # all queries or none); within a group, shorter point lists are padded with label -1.
        groups = [[p for p in todo if p.box is not None], [p for p in todo if p.box is None]]
        for name, predictor in self.predictors.items():
            for group in groups:
                if group:
                    self._decode_group(name, predictor, group)
        self.decode_calls += 1
        return len(todo)

    def _decode_group(self, name: str, predictor: EfficientSamPredictor, group: list) -> None:
        boxes = np.array([prompt.box for prompt in group], dtype=np.float64) if group[0].box is not None else None
        most = max(len(prompt.points) for prompt in group)
        points = labels = None
        if most:
            points = np.full((len(group), most, 2), -1.0)
            labels = np.full((len(group), most), -1, dtype=np.int64)
            for row, prompt in enumerate(group):
                if prompt.points:
                    points[row, : len(prompt.points)] = prompt.points
                    labels[row, : len(prompt.labels)] = prompt.labels
        result: EfficientSamPrediction = predictor.predict(
            boxes=boxes, points=points, labels=labels, normalized=False, multimask_output=True
        )
        for row, prompt in enumerate(group):
            best = int(result.candidate_index[row])  # the package's one selection rule, applied by the predictor
            self._decoded[name][prompt] = (result.iou_scores[row].numpy(), result.low_res_logits[row], best)
            # the predictor already resized its chosen candidate: keep it rather than resizing it again
            self._full_masks[(name, prompt, best)] = result.masks[row].numpy()

    def _mask(self, name: str, prompt: DemoPrompt, candidate: int) -> np.ndarray:
        key = (name, prompt, candidate)
        if key not in self._full_masks:
            logits = self._decoded[name][prompt][1][candidate]
            processor = self.predictors[name].processor
            resized = processor.post_process_masks(logits[None, None, None], [self.image_size])[0]
            self._full_masks[key] = resized[0, 0].numpy()
        return self._full_masks[key]

    def selection(self, name: str, candidate: Optional[int] = None) -> MaskSelection:
        """Model ``name``'s masks for the current objects: candidate ``candidate`` (0-based) of every
        object, or each object's highest predicted IoU when None. Decodes what is missing first."""
        if name not in self.predictors:
            raise KeyError(f"unknown model {name!r}; the session has {self.model_names}")
        if candidate is not None and not 0 <= candidate < self.num_candidates:
            raise ValueError(f"candidate must be in 0..{self.num_candidates - 1}; got {candidate}")
        self.decode()
        height, width = self.image_size
        count = len(self.prompts)
        iou = np.zeros((count, self.num_candidates), dtype=np.float32)
        chosen = np.full(count, -1 if candidate is None else candidate, dtype=np.int64)
        for row, prompt in enumerate(self.prompts):
            iou[row], _, best = self._decoded[name][prompt]
            if candidate is None:
                chosen[row] = best
        masks = np.zeros((count, height, width), dtype=bool)
        for row, prompt in enumerate(self.prompts):
            masks[row] = self._mask(name, prompt, int(chosen[row]))
        return MaskSelection(masks, iou[np.arange(count), chosen], chosen, iou)

    # -- pictures and tables ----------------------------------------------------------------------
    def render_overlay(self, name: str, candidate: Optional[int] = None) -> Image.Image:
        """The image with model ``name``'s masks tinted, boxes outlined, points and a pending corner
        marked, and each object's number and predicted IoU written at its top-left corner."""
        self._require_image()
        selection = self.selection(name, candidate)
        # draw_overlay colours mask k and box k alike; a point-only object gets a box off the canvas
        off_canvas = (-100.0, -100.0, -90.0, -90.0)
        boxes = [prompt.box if prompt.box is not None else off_canvas for prompt in self.prompts]
        picture = draw_overlay(self.image, selection.masks, boxes if boxes else None)
        _annotate(picture, self.prompts, selection, self.pending_corner)
        return picture

    def iou_table(self, candidate: Optional[int] = None) -> tuple:
        """(headers, rows): one row per object with its prompt and, per model, the selected candidate
        (1-based) and its predicted IoU, and the predicted IoU of all candidates."""
        headers = iou_table_headers(self.model_names)
        if self.image is None or not self.prompts:
            return headers, []
        selections = [self.selection(name, candidate) for name in self.model_names]
        rows = []
        for row, prompt in enumerate(self.prompts):
            values = [row + 1, prompt.to_text()]
            for selection in selections:
                values += [
                    int(selection.candidate_index[row]) + 1,
                    round(float(selection.scores[row]), 3),
                    " / ".join(f"{value:.3f}" for value in selection.iou_scores[row]),
                ]
            rows.append(values)
        return headers, rows

    # -- downloads --------------------------------------------------------------------------------
    def export_png(self, directory: os.PathLike, candidate: Optional[int] = None,
                   names: Optional[Sequence[str]] = None) -> list:
        """Write one black-and-white PNG per object and model (white = the mask) into ``directory``;
        returns the paths. Files are named ``<model>_object<k>.png`` (k from 1)."""
        self._require_image()
        paths = []
        for name in names or self.model_names:
            selection = self.selection(name, candidate)
            for row, mask in enumerate(selection.masks):
                path = Path(directory) / f"{_safe(name)}_object{row + 1}.png"
                save_image_atomic(path, Image.fromarray(mask.astype(np.uint8) * 255, mode="L"))
                paths.append(path)
        return paths

    def coco_records(self, candidate: Optional[int] = None, image_id: int = 0, category_id: int = 1) -> list:
        """COCO segmentation results (compressed RLE, score = predicted IoU) for every model and object,
        each with the ``model``, ``object`` (from 1), ``candidate`` (from 1) and ``prompt`` it came from."""
        self._require_image()
        records = []
        for name in self.model_names:
            selection = self.selection(name, candidate)
            for row, prompt in enumerate(self.prompts):
                record = result_record(selection.masks[row], image_id, category_id, float(selection.scores[row]))
                record.update({
                    "model": name,
                    "object": row + 1,
                    "candidate": int(selection.candidate_index[row]) + 1,
                    "prompt": {"box_xyxy": list(prompt.box) if prompt.box is not None else None,
                               "points": [list(point) for point in prompt.points], "labels": list(prompt.labels)},
                })
                records.append(record)
        return records

    def export_coco_rle(self, path: os.PathLike, candidate: Optional[int] = None, image_id: int = 0) -> Path:
        """Write :meth:`coco_records` as a JSON list (what ``COCO.loadRes`` reads); returns the path."""
        write_json_atomic(path, self.coco_records(candidate, image_id=image_id), indent=1)
        return Path(path)


def iou_table_headers(model_names: Sequence[str]) -> list:
    """Column names of :meth:`DemoSession.iou_table`."""
    headers = ["object", "prompt"]
    for name in model_names:
        headers += [f"{name}: candidate", f"{name}: predicted IoU", f"{name}: all candidates"]
    return headers


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _annotate(picture: Image.Image, prompts, selection: MaskSelection, pending_corner) -> None:
    """Points, the pending corner and the `k: IoU` labels (what draw_overlay does not draw)."""
    draw = ImageDraw.Draw(picture)
    width, height = picture.size
    radius = max(3, round(min(width, height) / 120))
    font = ImageFont.load_default(size=max(10, round(min(width, height) / 24)))
    for row, prompt in enumerate(prompts):
        for (x, y), label in zip(prompt.points, prompt.labels):
            fill = (40, 200, 60) if label == POSITIVE else (230, 40, 40)
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill, outline=(255, 255, 255))
        anchor = prompt.box[:2] if prompt.box is not None else prompt.points[0]
        text = f"{row + 1}: IoU {selection.scores[row]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = min(max(0.0, anchor[0]), max(0.0, width - (right - left) - 4))
        y = max(0.0, anchor[1] - (bottom - top) - 6)
        draw.rectangle([x, y, x + (right - left) + 4, y + (bottom - top) + 4], fill=(0, 0, 0))
        colour = tuple(int(v) for v in PALETTE[row % len(PALETTE)])
        draw.text((x + 2 - left, y + 2 - top), text, fill=colour, font=font)
    if pending_corner is not None:
        x, y = pending_corner
        size = radius * 3
        draw.line([x - size, y, x + size, y], fill=(255, 255, 255), width=2)
        draw.line([x, y - size, x, y + size], fill=(255, 255, 255), width=2)


__all__ = [
    "DemoPrompt", "DemoSession", "MaskSelection", "format_prompts", "iou_table_headers", "parse_candidate",
    "parse_prompts",
]
