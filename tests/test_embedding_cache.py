"""Embedding cache: exact equality with the live encoder, fingerprint misses, resume and damage repair,
teacher keys, picklable reader, and the command line. Tiny random model (128 px input, 64 x 8 x 8
embeddings) on a 5 + 2 image synthetic dataset."""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_efficientsam import EfficientSamModel
from modeling_efficientsam.data import EfficientSamCollator, EfficientSamTrainingDataset, make_synthetic_pcb, prepare_coco_dataset
from modeling_efficientsam.data.embedding_cache import (
    EmbeddingCache,
    EmbeddingCacheError,
    EmbeddingCacheReader,
    build_embedding_cache,
    open_embedding_cache,
    vision_encoder_fingerprint,
)

REPO = Path(__file__).resolve().parents[1]

from conftest import TINY_128  # noqa: E402
from conftest import tiny_model as shared_tiny_model  # noqa: E402
def tiny_model(seed: int) -> EfficientSamModel:
    """The shared tiny model in its 128-pixel form (64 x 8 x 8 embeddings)."""
    return shared_tiny_model(seed, **TINY_128).eval()


def live_embedding(model, pixel_values) -> torch.Tensor:
    with torch.no_grad():
        return model.get_image_embeddings(pixel_values[None])[0]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedding_cache")
    splits = make_synthetic_pcb(root / "coco", num_train=5, num_validation=2, seed=5, width=96, height=80)
    prepare_coco_dataset(splits, root / "dataset")
    return root / "dataset"


@pytest.fixture(scope="module")
def dataset(dataset_dir):
    import datasets

    return datasets.load_from_disk(str(dataset_dir))


@pytest.fixture(scope="module")
def student():
    return tiny_model(0)


@pytest.fixture(scope="module")
def teacher():
    return tiny_model(1)


def shard_bytes(cache, split="train") -> dict:
    directory = Path(cache.root) / split
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*.safetensors"))}


def test_float32_cache_items_equal_live_encoder(dataset, student, tmp_path):
    # batch_size=1: the live path encodes one item's pixel_values at a time, so the arithmetic is identical.
    cache = build_embedding_cache(dataset, student, dtype="float32", batch_size=1, shard_size=2, cache_root=tmp_path)
    assert cache.build_stats["train"]["computed_shards"] == [0, 1, 2]
    live = EfficientSamTrainingDataset(dataset["train"], image_size=128, mask_size=32, seed=7)
    cached = EfficientSamTrainingDataset(dataset["train"], image_size=128, mask_size=32, seed=7,
                                         embedding_reader=pickle.loads(pickle.dumps(EmbeddingCacheReader(cache, "train"))))
    for index in range(len(live)):
        a, b = live[index], cached[index]
        assert "pixel_values" not in b and b["image_embeddings"].dtype == torch.float32
        assert torch.equal(b["image_embeddings"], live_embedding(student, a["pixel_values"]))
        assert torch.equal(a["input_points"], b["input_points"]) and torch.equal(a["labels"], b["labels"])


def test_batched_build_differs_only_by_batching(dataset, student, tmp_path):
    # On CPU the encoder's float sums depend on the batch size (last bits), so a batch-2 cache equals the
    # encoder run on the same 2-image batches, not necessarily the per-image output.
    cache = build_embedding_cache(dataset, student, dtype="float32", batch_size=2, shard_size=4,
                                  splits=["train"], cache_root=tmp_path)
    reader = EmbeddingCacheReader(cache, "train")
    items = EfficientSamTrainingDataset(dataset["train"], image_size=128)
    pixels = torch.stack([items[i]["pixel_values"] for i in range(len(items))])
    ids = [int(i) for i in dataset["train"]["image_id"]]
    with torch.no_grad():
        expected = torch.cat([student.get_image_embeddings(pixels[s:e]) for s, e in ((0, 2), (2, 4), (4, 5))])
    got = torch.stack([reader.get(i) for i in ids])
    assert torch.equal(got, expected)


def test_bfloat16_storage_is_rounded_live_output(dataset, student, tmp_path):
    cache = build_embedding_cache(dataset, student, splits=["validation"], batch_size=1, cache_root=tmp_path)
    assert cache.dtype == "bfloat16" and cache.bytes_per_image() == 64 * 8 * 8 * 2
    items = EfficientSamTrainingDataset(dataset["validation"], image_size=128)
    raw = EmbeddingCacheReader(cache, "validation", output_dtype=None)
    for index in range(len(items)):
        item = items[index]
        expected = live_embedding(student, item["pixel_values"]).to(torch.bfloat16)
        stored = raw.get(int(item["image_id"]))
        assert stored.dtype == torch.bfloat16 and torch.equal(stored, expected)
        assert torch.equal(EmbeddingCacheReader(cache, "validation").get(int(item["image_id"])), expected.float())
    summary = cache.storage_summary()
    assert "64 x 8 x 8 bfloat16" in summary and "validation: 2 images" in summary and "total: 2 images" in summary
    with pytest.raises(KeyError, match="not in the embedding cache"):
        raw.get(10_000)


def test_changed_encoder_weight_is_a_miss_and_decoder_weight_is_not(dataset, tmp_path):
    model = tiny_model(0)
    original = build_embedding_cache(dataset, model, dtype="float32", batch_size=1, shard_size=8, cache_root=tmp_path)
    old_rows = {i: EmbeddingCacheReader(original, "train").get(i) for i in (1, 2)}

    with torch.no_grad():
        model.mask_decoder.iou_token[0, 0] += 1.0  # not part of the encoder: the cache still applies
    assert open_embedding_cache(dataset, model, dtype="float32", cache_root=tmp_path).root == original.root

    with torch.no_grad():
        model.vision_encoder.neck.conv2.weight[0, 0, 0, 0] += 0.5
    with pytest.raises(EmbeddingCacheError):
        open_embedding_cache(dataset, model, dtype="float32", cache_root=tmp_path)
    with pytest.raises(EmbeddingCacheError, match="another fingerprint"):  # the old directory read with another key
        stale = EmbeddingCache(original.root, {"fingerprint": "0" * 64, "parts": original.parts}, original.metadata)
        EmbeddingCacheReader(stale, "train")
    rebuilt = build_embedding_cache(dataset, model, dtype="float32", batch_size=1, shard_size=8, cache_root=tmp_path)
    assert rebuilt.root != original.root
    assert rebuilt.build_stats["train"]["computed_shards"] == [0] and rebuilt.build_stats["train"]["reused_shards"] == []
    items = EfficientSamTrainingDataset(dataset["train"], image_size=128)
    for index in range(2):
        image_id = int(items[index]["image_id"])
        fresh = EmbeddingCacheReader(rebuilt, "train").get(image_id)
        assert torch.equal(fresh, live_embedding(model, items[index]["pixel_values"]))
        assert not torch.equal(fresh, old_rows[image_id])
    # Other storage dtypes are other caches.
    with pytest.raises(EmbeddingCacheError):
        open_embedding_cache(dataset, model, dtype="float16", cache_root=tmp_path)


def test_changed_split_is_rebuilt_not_reused(dataset, student, tmp_path):
    import datasets

    build_embedding_cache(dataset, student, shard_size=2, cache_root=tmp_path)
    subset = datasets.DatasetDict({"train": dataset["train"].select([0, 2, 4]), "validation": dataset["validation"]})
    with pytest.raises(EmbeddingCacheError, match="split fingerprint"):
        open_embedding_cache(subset, student, cache_root=tmp_path)
    rebuilt = build_embedding_cache(subset, student, shard_size=2, cache_root=tmp_path)
    assert rebuilt.build_stats["train"]["computed_shards"] == [0, 1]
    assert rebuilt.build_stats["validation"]["computed_shards"] == []  # untouched split is reused
    assert len(EmbeddingCacheReader(rebuilt, "train")) == 3 and 2 not in EmbeddingCacheReader(rebuilt, "train")


def test_interrupted_build_resumes_with_missing_shards_only(dataset, student, tmp_path):
    clean = build_embedding_cache(dataset, student, splits=["train"], batch_size=1, shard_size=2, cache_root=tmp_path / "clean")

    class Stop(Exception):
        pass

    def stop_after_two(split, index, total):
        assert total == 3
        if index == 1:
            raise Stop

    with pytest.raises(Stop):
        build_embedding_cache(dataset, student, splits=["train"], batch_size=1, shard_size=2,
                              cache_root=tmp_path / "run", progress_callback=stop_after_two)
    # A half-written shard from a crash mid-write must not count either.
    root = next((tmp_path / "run").iterdir()) / "train"
    (root / "shard-00002.safetensors.tmp-999").write_bytes(b"partial")
    assert not (root / "metadata.json").exists()
    with pytest.raises(EmbeddingCacheError, match="no complete embedding cache"):
        open_embedding_cache(dataset, student, splits=["train"], cache_root=tmp_path / "run")

    resumed = build_embedding_cache(dataset, student, splits=["train"], batch_size=1, shard_size=2, cache_root=tmp_path / "run")
    assert resumed.build_stats["train"]["computed_shards"] == [2]
    assert resumed.build_stats["train"]["reused_shards"] == [0, 1]
    assert shard_bytes(resumed) == shard_bytes(clean)
    assert not list(root.glob("*.tmp-*"))


def test_damaged_shards_are_detected_and_recomputed(dataset, student, tmp_path):
    cache = build_embedding_cache(dataset, student, splits=["train"], batch_size=1, shard_size=2, cache_root=tmp_path)
    clean = shard_bytes(cache)
    directory = Path(cache.root) / "train"
    truncated = directory / "shard-00001.safetensors"
    truncated.write_bytes(clean[truncated.name][:-100])
    with pytest.raises(EmbeddingCacheError, match="size"):  # reading checks sizes up front
        open_embedding_cache(dataset, student, splits=["train"], cache_root=tmp_path)
    flipped = directory / "shard-00000.safetensors"
    data = bytearray(clean[flipped.name])
    data[-5] ^= 0xFF  # same size, valid header, different values: only the checksum can tell
    flipped.write_bytes(bytes(data))

    repaired = build_embedding_cache(dataset, student, splits=["train"], batch_size=1, shard_size=2, cache_root=tmp_path)
    assert repaired.build_stats["train"]["computed_shards"] == [0, 1]
    assert repaired.build_stats["train"]["reused_shards"] == [2]
    assert shard_bytes(repaired) == clean
    (directory / "shard-00002.safetensors").unlink()
    again = build_embedding_cache(dataset, student, splits=["train"], batch_size=1, shard_size=2, cache_root=tmp_path)
    assert again.build_stats["train"]["computed_shards"] == [2] and shard_bytes(again) == clean


def test_student_and_teacher_keys_and_dataloader_workers(dataset, student, teacher, tmp_path):
    assert vision_encoder_fingerprint(student) != vision_encoder_fingerprint(teacher)
    caches = [build_embedding_cache(dataset, model, dtype="float32", splits=["train"], batch_size=1, shard_size=2,
                                    cache_root=tmp_path) for model in (student, teacher)]
    assert caches[0].root != caches[1].root
    reader = EmbeddingCacheReader(caches, "train")
    assert reader.keys == ("image_embeddings", "teacher_image_embeddings")
    items = EfficientSamTrainingDataset(dataset["train"], image_size=128, mask_size=32, embedding_reader=reader)
    live = EfficientSamTrainingDataset(dataset["train"], image_size=128, mask_size=32)
    loader = torch.utils.data.DataLoader(items, batch_size=5, num_workers=2, collate_fn=EfficientSamCollator())
    batch = next(iter(loader))
    assert batch["image_embeddings"].shape == batch["teacher_image_embeddings"].shape == (5, 64, 8, 8)
    for index in range(5):
        pixels = live[index]["pixel_values"]
        assert torch.equal(batch["image_embeddings"][index], live_embedding(student, pixels))
        assert torch.equal(batch["teacher_image_embeddings"][index], live_embedding(teacher, pixels))
    with pytest.raises(ValueError):
        EmbeddingCacheReader(caches * 2, "train")
    with pytest.raises(KeyError, match="not in this cache"):
        EmbeddingCacheReader(caches, "validation")  # built for train only
    with pytest.raises(KeyError, match="teacher_image_embeddings"):
        EmbeddingCacheReader(caches[0], "train").get(1, key="teacher_image_embeddings")


def test_command_line_student_and_teacher(dataset_dir, student, teacher, tmp_path, capsys):
    student.save_pretrained(tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    command = [sys.executable, str(REPO / "data" / "cache_embeddings.py"), "--dataset", str(dataset_dir),
               "--model", str(tmp_path / "student"), "--model", str(tmp_path / "teacher"), "--dtype", "float16",
               "--batch_size", "2", "--shard_size", "4", "--splits", "train", "--device", "cpu",
               "--cache_root", str(tmp_path / "cache")]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "student (image_embeddings)" in result.stdout and "teacher (teacher_image_embeddings)" in result.stdout
    assert result.stdout.count("64 x 8 x 8 float16 = 0.01 MiB per image") == 2
    assert result.stdout.count("computed 2 shards, reused 0") == 2
    assert "total on disk for 2 model(s)" in result.stdout
    assert len(list((tmp_path / "cache").iterdir())) == 2
    # Again, in-process: everything is reused.
    spec = importlib.util.spec_from_file_location("cache_embeddings_cli", REPO / "data" / "cache_embeddings.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(command[2:]) == 0
    assert capsys.readouterr().out.count("computed 0 shards, reused 2") == 2
    with pytest.raises(SystemExit):
        cli.parse_args(command[2:] + ["--model", str(tmp_path / "student")])
    assert "at most twice" in capsys.readouterr().err


def test_compute_dtype_autocast_is_its_own_cache(dataset, student, tmp_path):
    full = build_embedding_cache(dataset, student, dtype="float32", splits=["validation"], batch_size=1, cache_root=tmp_path)
    student.train()  # the build runs in eval mode and gives the model back as it found it
    try:
        mixed = build_embedding_cache(dataset, student, dtype="float32", splits=["validation"], batch_size=1,
                                      cache_root=tmp_path, compute_dtype="bfloat16", device="cpu")
        assert student.training
    finally:
        student.eval()
    assert mixed.root != full.root and mixed.parts["compute_dtype"] == "bfloat16"
    image_id = int(dataset["validation"][0]["image_id"])
    a, b = EmbeddingCacheReader(full, "validation").get(image_id), EmbeddingCacheReader(mixed, "validation").get(image_id)
    from modeling_efficientsam.modeling_efficientsam import cpu_half_precision_is_native

    if cpu_half_precision_is_native(torch.bfloat16):
        assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.1, rtol=0.1)
    else:  # without native bf16 the model falls back to float32 under CPU autocast (see precision.py)
        assert torch.equal(a, b)
    assert next(student.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="compute_dtype"):
        build_embedding_cache(dataset, student, compute_dtype="int8", cache_root=tmp_path)
