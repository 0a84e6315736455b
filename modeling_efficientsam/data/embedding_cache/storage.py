"""The embedding cache on disk: file names, shard files, the manifest and metadata, their checks.

One split of one cache is a folder::

    manifest.json                 progress: identity + one entry per finished shard (rows, bytes, sha256)
    shard-00000.safetensors       "embeddings" (n, C, h, w) in the storage dtype, "image_ids" (n,) int64
    ...
    metadata.json                 written last; its presence means the split is complete

Every file is written with :mod:`modeling_efficientsam.file_utils` (temporary name, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np
import torch

from ...file_utils import file_sha256, read_json_or_none, write_bytes_atomic, write_json_atomic

FORMAT_VERSION = 1
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
COMPUTE_DTYPES = STORAGE_DTYPES
METADATA_FILE = "metadata.json"
MANIFEST_FILE = "manifest.json"
_SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


class EmbeddingCacheError(RuntimeError):
    """A cache was asked for that is missing, incomplete, stale (other fingerprint) or damaged."""


def check_dtypes(dtype: str, compute_dtype: str) -> None:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {compute_dtype!r}")


def bytes_per_image(shape, dtype: str) -> int:
    return int(np.prod(shape)) * torch.empty((), dtype=STORAGE_DTYPES[dtype]).element_size()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def read_json(directory: str, name: str) -> Optional[dict]:
    """``manifest.json`` / ``metadata.json`` of a split folder, or None when missing or unreadable."""
    return read_json_or_none(os.path.join(directory, name))


def write_json(directory: str, name: str, document: dict) -> None:
    write_json_atomic(os.path.join(directory, name), document, indent=1, sort_keys=True)


def write_shard(directory: str, index: int, embeddings: torch.Tensor, image_ids: list, fingerprint: str,
                split: str, start: int) -> dict:
    """Write shard ``index`` (rows from ``start``) and return its manifest entry.

    The bytes depend only on the inputs (a single metadata key, since safetensors orders several
    keys arbitrarily), so a resumed cache is byte-for-byte an uninterrupted one.
    """
    from safetensors.torch import save

    data = save({"embeddings": embeddings.contiguous(), "image_ids": torch.tensor(image_ids, dtype=torch.int64)},
                metadata={"efficientsam_embedding_cache": json.dumps(
                    {"fingerprint": fingerprint, "split": split, "start": start}, sort_keys=True)})
    write_bytes_atomic(os.path.join(directory, shard_name(index)), data)
    return {"file": shard_name(index), "start": start, "stop": start + len(image_ids), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def shard_problem(path: str, entry: dict, shape: Optional[list], dtype: str, checksum: bool) -> Optional[str]:
    """Why the shard at ``path`` does not match its manifest ``entry``, or None when it does."""
    from safetensors import safe_open

    try:
        size = os.path.getsize(path)
    except OSError:
        return "missing"
    if size != entry["bytes"]:
        return f"size {size} != {entry['bytes']}"
    try:
        with safe_open(path, framework="pt") as handle:
            sliced = handle.get_slice("embeddings")
            found_shape, found_dtype = list(sliced.get_shape()), sliced.get_dtype()
            ids = handle.get_tensor("image_ids")
    except Exception as error:  # safetensors raises its own error types for damaged headers
        return f"unreadable ({error})"
    rows = entry["stop"] - entry["start"]
    if found_shape[0] != rows or (shape is not None and found_shape[1:] != list(shape)):
        return f"shape {found_shape} does not hold {rows} rows of {shape}"
    if found_dtype != _SAFETENSORS_DTYPES[dtype] or ids.numel() != rows:
        return f"dtype {found_dtype} / {ids.numel()} ids"
    if checksum and file_sha256(path, chunk_size=1 << 24) != entry["sha256"]:
        return "checksum mismatch"
    return None


def read_split_metadata(split_dir: str, expected_fingerprint: Optional[str] = None,
                        expected_split_fingerprint: Optional[str] = None) -> dict:
    """``metadata.json`` of a complete split whose identity and shard sizes check out.

    Raises :class:`EmbeddingCacheError` for a missing or incomplete split, another cache or split
    fingerprint than expected, or a shard of the wrong size (checksums are checked by the builder).
    """
    metadata = read_json(split_dir, METADATA_FILE)
    if metadata is None:
        raise EmbeddingCacheError(f"{split_dir} holds no complete embedding cache (no {METADATA_FILE})")
    for name, expected in (("fingerprint", expected_fingerprint), ("split_fingerprint", expected_split_fingerprint)):
        if expected is not None and metadata.get(name) != expected:
            raise EmbeddingCacheError(
                f"{split_dir} was built for another {name.replace('_', ' ')} ({str(metadata.get(name))[:12]}, "
                f"wanted {expected[:12]}); build the cache for this model and dataset"
            )
    for entry in metadata["shards"]:
        path = os.path.join(split_dir, entry["file"])
        size = os.path.getsize(path) if os.path.exists(path) else None
        if size != entry["bytes"]:
            raise EmbeddingCacheError(f"{path}: size {size}, expected {entry['bytes']}; rebuild the cache")
    return metadata


class EmbeddingCache:
    """A complete cache of one encoder over some splits of a dataset (read it with ``EmbeddingCacheReader``).

    Attributes: ``root`` (``<cache_root>/<key>``), ``fingerprint`` and ``parts`` (what it is keyed
    by), ``dtype``, ``metadata`` (split -> metadata.json contents) and ``build_stats`` (split ->
    ``computed_shards`` / ``reused_shards`` / ``seconds`` of the build that returned it, if any).
    """

    def __init__(self, root: str, fingerprint: dict, metadata: dict, build_stats: Optional[dict] = None):
        self.root = root
        self.fingerprint = fingerprint["fingerprint"]
        self.parts = fingerprint["parts"]
        self.dtype = self.parts["dtype"]
        self.metadata = metadata
        self.build_stats = build_stats or {}

    @property
    def splits(self) -> list:
        return list(self.metadata)

    def split_dir(self, split: str) -> str:
        if split not in self.metadata:
            raise KeyError(f"split {split!r} is not in this cache (has {self.splits})")
        return os.path.join(self.root, split)

    def bytes_per_image(self) -> int:
        return bytes_per_image(next(iter(self.metadata.values()))["shape"], self.dtype)

    def storage_summary(self) -> str:
        """One line per split and a total: values per image, bytes per image, bytes on disk."""
        per_image = self.bytes_per_image()
        first = next(iter(self.metadata.values()))
        shape = " x ".join(str(v) for v in first["shape"])
        lines = [f"{first['model_name']} [{self.fingerprint[:12]}]: {shape} {self.dtype} = {per_image / 2**20:.2f} MiB per image"]
        total_images = total_bytes = 0
        for split, metadata in self.metadata.items():
            on_disk = sum(entry["bytes"] for entry in metadata["shards"])
            total_images, total_bytes = total_images + metadata["count"], total_bytes + on_disk
            lines.append(f"  {split}: {metadata['count']} images, {on_disk / 2**20:.1f} MiB")
        lines.append(f"  total: {total_images} images, {total_bytes / 2**20:.1f} MiB")
        return "\n".join(lines)
