"""A small, deterministic synthetic circuit-board dataset in COCO format (PIL ImageDraw + numpy only).

Each image: a green solder-mask board with a smooth texture, copper traces and vias (background,
not annotated), then components drawn one after another: ICs with pins, resistors with colour
bands, capacitors (electrolytic or ceramic), connectors with a row of pins, and pads. Components
are rotated, vary in size, may touch and may partly cover earlier ones; the whole picture is then
lit by a random gradient and hotspot and gets a little sensor grain.

Masks are exact: every component is drawn only with filled polygons, and the same polygons are
drawn with the component's index into a label map. A component's mask is the set of pixels where
it is the topmost drawn component (its visible part), stored as COCO compressed RLE (polygons
could not represent what PIL rasterises, nor the holes left by occlusion). Layout placement
retries until every component keeps at least half of its pixels visible.

Determinism: image ``i`` of split ``s`` uses ``SeedSequence([seed, s, i])``; JSON is written with
fixed separators and no timestamps, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from ..file_utils import save_image_atomic, write_json_atomic
from .masks import encode_mask

CATEGORIES = [
    {"id": 1, "name": "ic", "supercategory": "component"},
    {"id": 2, "name": "resistor", "supercategory": "component"},
    {"id": 3, "name": "capacitor", "supercategory": "component"},
    {"id": 4, "name": "connector", "supercategory": "component"},
    {"id": 5, "name": "pad", "supercategory": "component"},
]
_CATEGORY_WEIGHTS = np.array([0.25, 0.25, 0.2, 0.15, 0.15])
_MIN_VISIBLE_FRACTION = 0.5
_MIN_VISIBLE_PIXELS = 40


@dataclass
class Component:
    category_id: int
    parts: list  # [(polygon [(x, y), ...], (r, g, b)), ...] in drawing order


def _rotate(points, centre, angle):
    cos, sin = math.cos(angle), math.sin(angle)
    cx, cy = centre
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _circle(cx, cy, radius, sides=28):
    return [(cx + radius * math.cos(2 * math.pi * k / sides), cy + radius * math.sin(2 * math.pi * k / sides)) for k in range(sides)]


def _jitter_colour(rng, colour, amount=18):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def _ic(rng, scale):
    w, h = rng.uniform(0.18, 0.32) * scale, rng.uniform(0.12, 0.22) * scale
    pin_len, pin_w = rng.uniform(0.025, 0.04) * scale, max(2.0, 0.012 * scale)
    n_pins = max(3, int(w // (pin_w * 2.2)))
    metal = _jitter_colour(rng, (195, 195, 200), 12)
    parts = []
    for k in range(n_pins):
        x = -w / 2 + (k + 0.5) * w / n_pins
        parts.append((_rect(x - pin_w / 2, -h / 2 - pin_len, x + pin_w / 2, -h / 2 + 1), metal))
        parts.append((_rect(x - pin_w / 2, h / 2 - 1, x + pin_w / 2, h / 2 + pin_len), metal))
    parts.append((_rect(-w / 2, -h / 2, w / 2, h / 2), _jitter_colour(rng, (30, 30, 34), 8)))
    parts.append((_circle(-w / 2 + 0.18 * h, -h / 2 + 0.18 * h, 0.08 * h, 12), (90, 90, 96)))
    return parts, rng.uniform(0, 2 * math.pi)


def _resistor(rng, scale):
    w, h = rng.uniform(0.14, 0.24) * scale, rng.uniform(0.05, 0.08) * scale
    body = _jitter_colour(rng, (214, 184, 140) if rng.random() < 0.6 else (70, 110, 190))
    end = _jitter_colour(rng, (185, 185, 190), 10)
    parts = [(_rect(-w / 2, -h / 2, -w / 2 + 0.2 * w, h / 2), end), (_rect(w / 2 - 0.2 * w, -h / 2, w / 2, h / 2), end),
             (_rect(-0.32 * w, -h / 2, 0.32 * w, h / 2), body)]
    band_colours = [(150, 40, 30), (20, 20, 20), (220, 120, 20), (200, 30, 30), (120, 60, 160)]
    for k in range(3):
        x = -0.2 * w + k * 0.16 * w
        parts.append((_rect(x, -h / 2, x + 0.06 * w, h / 2), band_colours[int(rng.integers(len(band_colours)))]))
    return parts, rng.uniform(0, 2 * math.pi)


def _capacitor(rng, scale):
    if rng.random() < 0.5:  # electrolytic, seen from the top: a can with a polarity band
        r = rng.uniform(0.065, 0.11) * scale
        can = _jitter_colour(rng, (60, 70, 150) if rng.random() < 0.5 else (35, 35, 40), 12)
        band_start = rng.uniform(0, 2 * math.pi)
        band = [(0.0, 0.0)] + [(r * math.cos(band_start + a), r * math.sin(band_start + a)) for a in np.linspace(0, 1.2, 8)]
        return [(_circle(0, 0, r), can), (band, (205, 205, 210)), (_circle(0, 0, 0.25 * r, 12), (120, 120, 130))], 0.0
    w, h = rng.uniform(0.1, 0.15) * scale, rng.uniform(0.06, 0.09) * scale  # ceramic chip
    end = _jitter_colour(rng, (190, 190, 195), 10)
    return [(_rect(-w / 2, -h / 2, -0.3 * w, h / 2), end), (_rect(0.3 * w, -h / 2, w / 2, h / 2), end),
            (_rect(-0.3 * w, -h / 2, 0.3 * w, h / 2), _jitter_colour(rng, (175, 125, 70)))], rng.uniform(0, 2 * math.pi)


def _connector(rng, scale):
    w, h = rng.uniform(0.3, 0.45) * scale, rng.uniform(0.07, 0.1) * scale
    white = rng.random() < 0.6
    parts = [(_rect(-w / 2, -h / 2, w / 2, h / 2), _jitter_colour(rng, (232, 230, 218) if white else (28, 28, 30), 10))]
    n = max(3, int(w // (0.6 * h)))
    hole = 0.22 * h
    for k in range(n):
        x = -w / 2 + (k + 0.5) * w / n
        parts.append((_rect(x - hole, -hole, x + hole, hole), (210, 170, 60) if white else (200, 200, 205)))
    angle = (math.pi / 2 if rng.random() < 0.4 else 0.0) + rng.uniform(-0.25, 0.25)
    return parts, angle


def _pad(rng, scale):
    size = rng.uniform(0.06, 0.1) * scale
    colour = _jitter_colour(rng, (222, 180, 60) if rng.random() < 0.6 else (205, 205, 210), 12)
    shape = _circle(0, 0, size / 2, 20) if rng.random() < 0.4 else _rect(-size / 2, -size / 2, size / 2, size / 2)
    return [(shape, colour)], rng.uniform(0, math.pi / 2)


_MAKERS = {1: _ic, 2: _resistor, 3: _capacitor, 4: _connector, 5: _pad}


def _extent(parts):
    xs = [x for polygon, _ in parts for x, _ in polygon]
    ys = [y for polygon, _ in parts for _, y in polygon]
    return max(map(abs, xs)), max(map(abs, ys))


def make_component(rng, width, height, anchor=None) -> Component:
    """A random component, placed at random or touching the box of ``anchor`` (a Component)."""
    category_id = int(rng.choice([c["id"] for c in CATEGORIES], p=_CATEGORY_WEIGHTS))
    local, angle = _MAKERS[category_id](rng, float(min(width, height)))
    rotated = [(_rotate(polygon, (0.0, 0.0), angle), colour) for polygon, colour in local]
    half_w, half_h = _extent(rotated)
    if anchor is not None:  # place against the side of an existing component
        a_xs = [x for polygon, _ in anchor.parts for x, _ in polygon]
        a_ys = [y for polygon, _ in anchor.parts for _, y in polygon]
        side = int(rng.integers(4))
        cx = rng.uniform(min(a_xs), max(a_xs)) if side < 2 else (min(a_xs) - half_w if side == 2 else max(a_xs) + half_w)
        cy = rng.uniform(min(a_ys), max(a_ys)) if side >= 2 else (min(a_ys) - half_h if side == 0 else max(a_ys) + half_h)
    else:  # may reach a little past the border (partly outside the image)
        cx, cy = rng.uniform(0.05 * width, 0.95 * width), rng.uniform(0.05 * height, 0.95 * height)
    return Component(category_id, [([(x + cx, y + cy) for x, y in polygon], colour) for polygon, colour in rotated])


def component_mask(component: Component, width: int, height: int) -> np.ndarray:
    """Every pixel the component's polygons cover, ignoring other components (bool (H, W))."""
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon, _ in component.parts:
        draw.polygon(polygon, fill=1)
    return np.array(canvas, dtype=bool)


def make_board(rng, width, height) -> Image.Image:
    """Solder-mask green with a smooth texture, copper traces and vias."""
    base = np.array(_jitter_colour(rng, (24, 96, 48), 12), np.float32)
    coarse = Image.fromarray((rng.random((6, 8)) * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    texture = (np.asarray(coarse, np.float32) / 255.0 - 0.5) * 24.0
    board = Image.fromarray(np.clip(base[None, None] + texture[..., None] * np.array([0.6, 1.0, 0.7]), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(board)
    copper = _jitter_colour(rng, (176, 120, 60), 14)
    for _ in range(int(rng.integers(6, 14))):
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        points = [(x, y)]
        for _ in range(int(rng.integers(2, 5))):
            length = float(rng.uniform(0.1, 0.4)) * min(width, height)
            direction = int(rng.integers(8)) * math.pi / 4
            x, y = x + length * math.cos(direction), y + length * math.sin(direction)
            points.append((x, y))
        draw.line(points, fill=copper, width=int(rng.integers(2, 5)), joint="curve")
        radius = float(rng.uniform(2.0, 3.5))
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=copper)
    return board


def _lighting(rng, width, height) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (xs * math.cos(angle) + ys * math.sin(angle)) / max(width, height)
    gain = rng.uniform(0.8, 1.05) + rng.uniform(-0.15, 0.15) * ramp
    hx, hy, spread = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.3, 0.6) * max(width, height)
    gain += rng.uniform(0.0, 0.25) * np.exp(-((xs - hx) ** 2 + (ys - hy) ** 2) / (2 * spread**2))
    return gain


@dataclass
class SyntheticSample:
    image: np.ndarray  # (H, W, 3) uint8, what is saved
    background: np.ndarray  # the same board, lighting and grain without any component
    components: list  # Component, in drawing order
    label_map: np.ndarray  # (H, W) int: 0 board, k = component k - 1 on top


def render_sample(rng, width: int = 320, height: int = 240, num_components=(4, 9)) -> SyntheticSample:
    board = make_board(rng, width, height)
    components, full_masks, label = [], [], np.zeros((height, width), np.int32)
    target = int(rng.integers(num_components[0], num_components[1] + 1))
    for _ in range(target):
        for _attempt in range(20):
            anchor = components[int(rng.integers(len(components)))] if components and rng.random() < 0.35 else None
            candidate = make_component(rng, width, height, anchor)
            full = component_mask(candidate, width, height)
            if full.sum() < 2 * _MIN_VISIBLE_PIXELS:
                continue
            trial = np.where(full, len(components) + 1, label)
            visible = np.bincount(trial.ravel(), minlength=len(components) + 2)[1:]
            totals = [m.sum() for m in full_masks] + [full.sum()]
            if all(v >= _MIN_VISIBLE_PIXELS and v >= _MIN_VISIBLE_FRACTION * t for v, t in zip(visible, totals)):
                components.append(candidate)
                full_masks.append(full)
                label = trial
                break
    picture = board.copy()
    draw = ImageDraw.Draw(picture)
    for component in components:
        for polygon, colour in component.parts:
            draw.polygon(polygon, fill=colour)
    gain = _lighting(rng, width, height)[..., None]
    grain = rng.normal(0.0, 2.5, size=(height, width, 1)).astype(np.float32)

    def finish(image):
        return np.clip(np.asarray(image, np.float32) * gain + grain, 0, 255).round().astype(np.uint8)

    return SyntheticSample(finish(picture), finish(board), components, label)


def _annotations(sample: SyntheticSample, image_id: int, first_annotation_id: int) -> list:
    annotations = []
    for k, component in enumerate(sample.components):
        visible = sample.label_map == k + 1
        rle = encode_mask(visible)
        bbox = [float(v) for v in mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode("ascii")})]
        annotations.append(
            {"id": first_annotation_id + len(annotations), "image_id": image_id, "category_id": component.category_id,
             "segmentation": rle, "area": int(visible.sum()), "bbox": bbox, "iscrowd": 0}
        )
    return annotations


def write_split(directory, split_index: int, num_images: int, seed: int, width: int, height: int) -> str:
    """Render ``num_images`` images into ``directory`` with ``_annotations.coco.json``; returns the JSON path."""
    os.makedirs(directory, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng(np.random.SeedSequence([seed, split_index, index]))
        sample = render_sample(rng, width, height)
        file_name = f"pcb_{index:05d}.png"
        save_image_atomic(os.path.join(directory, file_name), Image.fromarray(sample.image))
        images.append({"id": index + 1, "file_name": file_name, "width": width, "height": height})
        annotations.extend(_annotations(sample, index + 1, len(annotations) + 1))
    document = {
        "info": {"description": f"synthetic PCB components (modeling_efficientsam.data.synthetic_pcb, seed {seed})", "version": "1"},
        "licenses": [],
        "categories": CATEGORIES,
        "images": images,
        "annotations": annotations,
    }
    return write_json_atomic(os.path.join(directory, "_annotations.coco.json"), document, separators=(",", ":"))


def make_synthetic_pcb(output_dir, num_train: int = 40, num_validation: int = 10, seed: int = 0,
                       width: int = 320, height: int = 240) -> dict:
    """Write ``output_dir/{train,validation}/_annotations.coco.json`` plus PNG images.

    Returns ``{split: (annotations_path, images_dir)}``, ready for ``prepare_coco_dataset``.
    """
    if num_train < 1 or num_validation < 0 or width < 64 or height < 64:
        raise ValueError("need num_train >= 1, num_validation >= 0 and images of at least 64 x 64 pixels")
    splits = {}
    for split_index, (name, count) in enumerate((("train", num_train), ("validation", num_validation))):
        if count:
            directory = os.path.join(output_dir, name)
            splits[name] = (write_split(directory, split_index, count, seed, width, height), directory)
    return splits
