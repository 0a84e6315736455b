"""Training prompts, targets and batches: EfficientSamTrainingDataset, prompt helpers, the collator."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from modeling_efficientsam.data import (
    EfficientSamCollator,
    EfficientSamTrainingDataset,
    box_query,
    decode_rle,
    efficientsam_pixel_values,
    jitter_box,
    mask_coverage,
    point_query,
    prepare_coco_dataset,
    resize_mask,
)
from modeling_efficientsam.data.prompts import pad_queries
from modeling_efficientsam.image_processing_efficientsam import EfficientSamImageProcessor
from modeling_efficientsam.processing_efficientsam import EfficientSamProcessor

S, M = 64, 16  # small model frame and target size keep the tests fast


def triangle(x, y, size):
    return [x, y, x + size, y, x, y + size]


@pytest.fixture(scope="module")
def split(tmp_path_factory, coco_writer):
    """Image 1: 12 triangles; image 2: 2 objects + 1 crowd; image 3: crowd only; image 4: nothing."""
    root = tmp_path_factory.mktemp("prompts")
    rng = np.random.default_rng(0)
    images = [
        {"id": i, "file_name": f"{i}.png", "image": Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))}
        for i, (w, h) in {1: (200, 100), 2: (120, 90), 3: (80, 60), 4: (50, 40)}.items()
    ]
    annotations = []
    for k in range(12):
        x, y = 5 + 32 * (k % 6), 10 + 45 * (k // 6)
        annotations.append({"id": 100 + k, "image_id": 1, "category_id": 1 + k % 2, "iscrowd": 0,
                            "bbox": [x, y, 20, 20], "segmentation": [triangle(x, y, 20)]})
    annotations += [
        {"id": 200, "image_id": 2, "category_id": 1, "iscrowd": 0, "bbox": [10, 10, 30, 40], "segmentation": [triangle(10, 10, 30)]},
        {"id": 201, "image_id": 2, "category_id": 2, "iscrowd": 0, "bbox": [60, 20, 40, 40], "segmentation": [triangle(60, 20, 40)]},
        {"id": 202, "image_id": 2, "category_id": 2, "iscrowd": 1, "bbox": [20, 60, 60, 25],
         "segmentation": [[20, 60, 80, 60, 80, 85, 20, 85]]},
        {"id": 300, "image_id": 3, "category_id": 1, "iscrowd": 1, "bbox": [5, 5, 30, 30], "segmentation": [triangle(5, 5, 30)]},
    ]
    path = coco_writer(root / "src", images, annotations)
    return prepare_coco_dataset({"train": (path, root / "src")}, root / "out")["train"]


def row_of(split, image_id):
    return split.select_columns(["image_id", "width", "height", "objects"])[split["image_id"].index(image_id)]


def index_of(split, image_id):
    return split["image_id"].index(image_id)


def match_objects(item, row, mask_size=M):
    """For each query, the object whose low-resolution target equals the query's labels."""
    targets = {obj["id"]: resize_mask(decode_rle(obj["mask"]), mask_size) for obj in row["objects"]}
    matched = []
    for labels in item["labels"].numpy():
        hits = [obj for obj in row["objects"] if np.array_equal(targets[obj["id"]], labels)]
        assert len(hits) == 1
        matched.append(hits[0])
    return matched


def make_dataset(split, **kwargs):
    kwargs = {"image_size": S, "mask_size": M, **kwargs}
    return EfficientSamTrainingDataset(split, **kwargs)


# ---------------------------------------------------------------------------------------------
# Box jitter


def test_jitter_never_inverts_or_leaves_the_image():
    rng = np.random.default_rng(1)
    width, height = 120, 80
    for _ in range(3000):
        x1, y1 = rng.uniform(-20, width), rng.uniform(-20, height)
        box = [x1, y1, x1 + rng.uniform(0.01, 60), y1 + rng.uniform(0.01, 40)]
        scale = rng.choice([0.0, 0.1, 0.5, 2.0])
        out = jitter_box(box, width, height, scale, rng)
        assert 0 <= out[0] and out[2] <= width and 0 <= out[1] and out[3] <= height
        assert out[2] - out[0] >= 1.0 - 1e-9 and out[3] - out[1] >= 1.0 - 1e-9


def test_jitter_scales_with_box_width_and_height():
    rng = np.random.default_rng(2)
    scale = 0.1
    for box_w, box_h in ((10.0, 200.0), (200.0, 10.0), (100.0, 100.0)):
        box = np.array([5000.0, 5000.0, 5000.0 + box_w, 5000.0 + box_h])
        shifts = np.array([jitter_box(box, 10000, 10000, scale, rng) - box for _ in range(4000)])
        x_shift, y_shift = np.abs(shifts[:, [0, 2]]), np.abs(shifts[:, [1, 3]])
        assert x_shift.max() <= scale * box_w + 1e-9 and y_shift.max() <= scale * box_h + 1e-9
        # uniform in [-s, s] * side: mean |shift| = s * side / 2
        np.testing.assert_allclose(x_shift.mean(), scale * box_w / 2, rtol=0.06)
        np.testing.assert_allclose(y_shift.mean(), scale * box_h / 2, rtol=0.06)
        assert shifts[:, 1].std() > 0 and not np.allclose(shifts[:, 1], shifts[:, 2])  # y1 and x2 move independently


def test_jitter_zero_noise_clips_only_and_stays_in_pixels():
    rng = np.random.default_rng(3)
    np.testing.assert_array_equal(jitter_box([300, 200, 400, 260], 640, 480, 0.0, rng), [300, 200, 400, 260])
    np.testing.assert_array_equal(jitter_box([-5, 470, 100, 500], 640, 480, 0.0, rng), [0, 470, 100, 480])
    jittered = jitter_box([300, 200, 400, 260], 640, 480, 0.1, rng)
    assert jittered.min() > 100  # pixel coordinates, never squeezed into [0, 1]


# ---------------------------------------------------------------------------------------------
# Prompt encoding


def test_box_and_point_query_encoding():
    points, labels = box_query([1, 2, 3, 4])
    np.testing.assert_array_equal(points, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(labels, [2, 3])
    points, labels = point_query(np.array([[5, 6], [7, 8]]), np.array([[9, 10]]))
    np.testing.assert_array_equal(labels, [1, 1, 0])
    np.testing.assert_array_equal(points, [[5, 6], [7, 8], [9, 10]])
    with pytest.raises(ValueError, match="at most 6"):
        point_query(np.zeros((5, 2)), np.zeros((2, 2)))
    padded_points, padded_labels = pad_queries([box_query([1, 2, 3, 4]), point_query(np.array([[5, 6]]), np.zeros((0, 2)))], 3)
    np.testing.assert_array_equal(padded_labels, [[2, 3, -1], [1, -1, -1]])
    np.testing.assert_array_equal(padded_points[1, 1:], -1)


def test_box_prompts_are_corners_labelled_2_and_3_in_the_model_frame(split):
    dataset = make_dataset(split, box_noise_scale=0.0, max_objects=None)
    index = index_of(split, 1)
    item, row = dataset[index], row_of(split, 1)
    assert item["input_labels"].shape == (12, 2)
    assert (item["input_labels"] == torch.tensor([2, 3])).all()
    frame = np.array([S / row["width"], S / row["height"]])
    processor = EfficientSamProcessor(EfficientSamImageProcessor(size=S))
    for query_points, obj in zip(item["input_points"].numpy(), match_objects(item, row)):
        expected = np.array(obj["box"]).reshape(2, 2) * frame
        np.testing.assert_allclose(query_points, expected, rtol=1e-6)
        # the same numbers as the processor's (the owner of pixel -> model-frame scaling) for that box
        by_processor = processor(original_sizes=[(row["height"], row["width"])], input_boxes=[[obj["box"]]])["input_boxes"]
        assert np.array_equal(query_points.reshape(4), by_processor.numpy().reshape(4))


def test_point_prompts_lie_inside_the_mask_and_negatives_inside_box_outside_mask(split):
    dataset = make_dataset(split, prompt_mode="point", num_positive_points=3, num_negative_points=3, max_objects=None)
    for image_id in (1, 2):
        index, row = index_of(split, image_id), row_of(split, image_id)
        for epoch in range(3):
            dataset.set_epoch(epoch)
            item = dataset[index]
            back = np.array([row["width"] / S, row["height"] / S])
            for points, labels, obj in zip(item["input_points"].numpy(), item["input_labels"].numpy(), match_objects(item, row)):
                mask = decode_rle(obj["mask"])
                pixels = np.rint(points * back).astype(int)
                x1, y1, x2, y2 = obj["box"]
                assert (labels == 1).sum() == 3 and (labels == 0).sum() == 3
                for (x, y), label in zip(pixels, labels):
                    if label == 1:
                        assert mask[y, x]
                    elif label == 0:
                        assert not mask[y, x] and x1 <= x + 0.5 <= x2 and y1 <= y + 0.5 <= y2


def test_mixed_mode_follows_point_probability(split):
    index = index_of(split, 1)
    all_boxes = make_dataset(split, prompt_mode="mixed", point_probability=0.0)[index]["input_labels"]
    all_points = make_dataset(split, prompt_mode="mixed", point_probability=1.0)[index]["input_labels"]
    assert (all_boxes[:, 0] == 2).all() and (all_points[:, 0] == 1).all()
    first_labels = torch.cat([
        make_dataset(split, prompt_mode="mixed", point_probability=0.5, max_objects=None, seed=seed)[index]["input_labels"][:, 0]
        for seed in range(5)
    ])
    assert (first_labels == 1).any() and (first_labels == 2).any()


# ---------------------------------------------------------------------------------------------
# Targets


def test_mask_coverage_is_exact_area_average():
    rng = np.random.default_rng(4)
    for height, width, size in ((37, 53, 16), (10, 7, 4), (5, 3, 8), (64, 48, 16)):
        mask = rng.random((height, width)) < 0.4
        # brute force: split every pixel into size x size sub-pixels, then average blocks
        fine = np.repeat(np.repeat(mask, size, axis=0), size, axis=1).astype(np.float64)
        expected = fine.reshape(size, height, size, width).mean(axis=(1, 3))
        np.testing.assert_allclose(mask_coverage(mask, size), expected, atol=1e-12)
    mask = rng.random((64, 64)) < 0.5
    np.testing.assert_allclose(mask_coverage(mask, 16), mask.reshape(16, 4, 16, 4).mean(axis=(1, 3)), atol=1e-12)


def test_resize_mask_thresholds_at_half_and_keeps_small_objects():
    mask = np.zeros((8, 8), bool)
    mask[0:2, 0:1] = True  # half of the 2 x 2 cell at (0, 0)
    mask[4:5, 4:5] = True  # a quarter of the cell at (2, 2)
    out = resize_mask(mask, 4)
    assert out.dtype == np.float32 and set(np.unique(out)) <= {0.0, 1.0}
    assert out[0, 0] == 1 and out.sum() == 1
    tiny = np.zeros((100, 100), bool)
    tiny[50, 50] = True
    assert resize_mask(tiny, 10).sum() == 1  # a non-empty mask never vanishes
    assert resize_mask(np.zeros((9, 9), bool), 4).sum() == 0


def test_targets_are_low_resolution_masks_and_full_resolution_on_request(split):
    dataset = make_dataset(split, return_full_resolution_masks=True, max_objects=None)
    index, row = index_of(split, 2), row_of(split, 2)
    item = dataset[index]
    assert item["labels"].shape == (2, M, M) and item["labels"].dtype == torch.float32
    assert set(item["labels"].unique().tolist()) == {0.0, 1.0}
    full = item["full_resolution_labels"]
    assert full.shape == (2, row["height"], row["width"]) and full.dtype == torch.bool
    for q, obj in enumerate(match_objects(item, row)):
        mask = decode_rle(obj["mask"])
        assert torch.equal(full[q], torch.from_numpy(mask))
        np.testing.assert_array_equal(item["labels"][q].numpy(), resize_mask(mask, M))
    assert item["original_size"].tolist() == [row["height"], row["width"]] and int(item["image_id"]) == 2


# ---------------------------------------------------------------------------------------------
# Sampling


def test_sampling_is_reproducible_per_seed_and_changes_per_epoch(split):
    index = index_of(split, 1)
    dataset = make_dataset(split, seed=7)
    first = dataset[index]
    again = make_dataset(split, seed=7)[index]
    for key in ("input_points", "input_labels", "labels", "category_ids", "pixel_values"):
        assert torch.equal(first[key], again[key])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[index]["input_points"], first["input_points"])
    dataset.set_epoch(0)
    assert torch.equal(dataset[index]["input_points"], first["input_points"])
    assert not torch.equal(make_dataset(split, seed=8)[index]["input_points"], first["input_points"])


def test_items_do_not_depend_on_dataloader_workers(split):
    dataset = make_dataset(split, seed=3)
    dataset.set_epoch(2)
    collator = EfficientSamCollator()
    batches = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers, collate_fn=collator)
        batches[workers] = list(loader)
    for a, b in zip(batches[0], batches[2]):
        for key in ("input_points", "input_labels", "labels", "query_mask", "pixel_values", "image_ids"):
            assert torch.equal(a[key], b[key])


def test_set_epoch_reaches_persistent_workers(split):
    dataset = make_dataset(split, seed=5)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, persistent_workers=True,
                                         collate_fn=EfficientSamCollator())
    epoch0 = next(iter(loader))["input_points"]
    dataset.set_epoch(1)
    epoch1 = next(iter(loader))["input_points"]
    expected = EfficientSamCollator()([dataset[i] for i in range(4)])["input_points"]
    assert torch.equal(epoch1, expected) and not torch.equal(epoch0, epoch1)


def test_up_to_max_objects_without_replacement(split):
    index, row = index_of(split, 1), row_of(split, 1)
    for max_objects, expected in ((10, 10), (None, 12), (20, 12), (1, 1)):
        dataset = make_dataset(split, max_objects=max_objects, box_noise_scale=0.0)
        for epoch in range(3):
            dataset.set_epoch(epoch)
            item = dataset[index]
            ids = [obj["id"] for obj in match_objects(item, row)]
            assert len(ids) == expected == len(set(ids))
    dataset = make_dataset(split, max_objects=3)
    chosen = set()
    for epoch in range(10):
        dataset.set_epoch(epoch)
        chosen |= {obj["id"] for obj in match_objects(dataset[index], row)}
    assert len(chosen) > 3  # a different subset per epoch


def test_crowd_annotations_never_become_queries(split):
    dataset = make_dataset(split, max_objects=None, prompt_mode="mixed")
    row = row_of(split, 2)
    crowd = next(obj for obj in row["objects"] if obj["iscrowd"])
    crowd_target = torch.from_numpy(resize_mask(decode_rle(crowd["mask"]), M))
    for epoch in range(5):
        dataset.set_epoch(epoch)
        item = dataset[index_of(split, 2)]
        assert item["labels"].shape[0] == 2
        assert not any(torch.equal(target, crowd_target) for target in item["labels"])
    crowd_only = dataset[index_of(split, 3)]
    assert crowd_only["labels"].shape[0] == 0 and crowd_only["input_points"].shape[0] == 0


# ---------------------------------------------------------------------------------------------
# Collator


def test_collator_pads_queries_and_points(split):
    dataset = make_dataset(split, prompt_mode="point", num_positive_points=2, num_negative_points=1, max_objects=None)
    indices = [index_of(split, i) for i in (1, 2, 3, 4)]
    items = [dataset[i] for i in indices]
    batch = EfficientSamCollator()(items)
    assert batch["input_points"].shape == (4, 12, 3, 2) and batch["input_points"].dtype == torch.float32
    assert batch["input_labels"].shape == (4, 12, 3) and batch["input_labels"].dtype == torch.int64
    assert batch["labels"].shape == (4, 12, M, M) and batch["labels"].dtype == torch.float32
    assert batch["pixel_values"].shape == (4, 3, S, S)
    assert batch["query_mask"].tolist() == [[True] * 12, [True] * 2 + [False] * 10, [False] * 12, [False] * 12]
    padded = ~batch["query_mask"]
    assert (batch["labels"][padded] == 0).all() and (batch["category_ids"][padded] == -1).all()
    assert (batch["input_labels"][padded] == -1).all() and (batch["input_points"][padded] == -1).all()
    assert (batch["category_ids"][batch["query_mask"]] >= 0).all()
    assert batch["image_ids"].tolist() == [1, 2, 3, 4]
    assert batch["original_sizes"].tolist() == [[100, 200], [90, 120], [60, 80], [40, 50]]
    for b, item in enumerate(items):
        q, p = item["input_points"].shape[:2]
        assert torch.equal(batch["input_points"][b, :q, :p], item["input_points"])
        assert (batch["input_labels"][b, :q, p:] == -1).all()
        assert torch.equal(batch["labels"][b, :q], item["labels"])


def test_collator_batch_without_any_query_and_mixed_point_counts(split):
    dataset = make_dataset(split)
    batch = EfficientSamCollator()([dataset[index_of(split, 3)], dataset[index_of(split, 4)]])
    assert batch["query_mask"].shape == (2, 1) and not batch["query_mask"].any()
    assert batch["labels"].shape == (2, 1, M, M) and batch["input_labels"].shape[1] == 1
    boxes = make_dataset(split)[index_of(split, 2)]
    points = make_dataset(split, prompt_mode="point", num_positive_points=4)[index_of(split, 1)]
    batch = EfficientSamCollator()([boxes, points])
    assert batch["input_labels"].shape == (2, 10, 4)
    assert (batch["input_labels"][0, :2, 2:] == -1).all() and (batch["input_labels"][0, :2, :2] == torch.tensor([2, 3])).all()


def test_collator_full_resolution_labels_are_a_list(split):
    dataset = make_dataset(split, return_full_resolution_masks=True)
    batch = EfficientSamCollator()([dataset[index_of(split, 1)], dataset[index_of(split, 2)]])
    assert isinstance(batch["full_resolution_labels"], list)
    assert [tuple(t.shape) for t in batch["full_resolution_labels"]] == [(10, 100, 200), (2, 90, 120)]


# ---------------------------------------------------------------------------------------------
# Pixels and embeddings


def test_embedding_reader_replaces_pixels_and_never_decodes_the_image(split):
    broken = split.cast_column("image", datasets.Image(decode=False)).map(
        lambda row: {"image": {"bytes": b"not an image at all", "path": None}}
    ).cast_column("image", datasets.Image())
    with pytest.raises(Exception):
        make_dataset(broken)[0]  # proves the image bytes are unusable

    def reader(image_id):
        return {"image_embeddings": torch.full((8, 4, 4), float(image_id)),
                "teacher_image_embeddings": torch.full((8, 4, 4), -float(image_id))}

    dataset = make_dataset(broken, embedding_reader=reader)
    items = [dataset[index_of(split, i)] for i in (1, 2)]
    assert "pixel_values" not in items[0]
    batch = EfficientSamCollator()(items)
    assert "pixel_values" not in batch
    assert batch["image_embeddings"].shape == (2, 8, 4, 4) and batch["image_embeddings"][:, 0, 0, 0].tolist() == [1.0, 2.0]
    assert batch["teacher_image_embeddings"][:, 0, 0, 0].tolist() == [-1.0, -2.0]
    without_images = make_dataset(split.remove_columns("image"), embedding_reader=reader)
    assert torch.equal(without_images[index_of(split, 1)]["labels"], items[0]["labels"])


def test_pixel_values_normalisation():
    colour = np.array([200, 100, 30], np.uint8)
    image = np.broadcast_to(colour, (37, 53, 3)).copy()
    expected = (torch.tensor(colour / 255.0) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    out = efficientsam_pixel_values(image, 32)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected.float().view(3, 1, 1).expand(3, 32, 32), atol=1e-6, rtol=0)
    rng = np.random.default_rng(5)
    square = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # same size: the resize is the identity
    manual = (torch.from_numpy(square).permute(2, 0, 1).float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(efficientsam_pixel_values(square, 16), manual, atol=1e-6, rtol=0)


def test_pixel_values_agree_with_the_image_processor(split):
    module = pytest.importorskip(
        "modeling_efficientsam.image_processing_efficientsam",
        reason="EfficientSamImageProcessor is not available in this checkout; cannot compare pixel arithmetic",
    )
    processor = module.EfficientSamImageProcessor(size=S)
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    reference = processor(Image.fromarray(image), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(efficientsam_pixel_values(image, S), reference, atol=1e-5, rtol=0)
    index = index_of(split, 2)
    with_processor = make_dataset(split, image_processor=processor)[index]["pixel_values"]
    torch.testing.assert_close(with_processor, make_dataset(split)[index]["pixel_values"], atol=1e-5, rtol=0)


def test_invalid_arguments_are_rejected(split):
    for kwargs in ({"prompt_mode": "scribble"}, {"prompt_mode": "point", "num_positive_points": 4, "num_negative_points": 3},
                   {"max_objects": 0}, {"box_noise_scale": -0.1}, {"point_probability": 1.5}):
        with pytest.raises(ValueError):
            make_dataset(split, **kwargs)
    with pytest.raises(ValueError, match="lacks columns"):
        make_dataset(split.remove_columns("image"))
