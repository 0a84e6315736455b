"""Reading cached embeddings at training time: ``EmbeddingCacheReader``, the one reader.

``EmbeddingCacheReader(caches, split)`` reads one split of a student cache, or of a student and a
teacher cache, and is what ``EfficientSamTrainingDataset(embedding_reader=...)`` takes:
``reader(image_id)`` returns ``{"image_embeddings": (C, h, w)[, "teacher_image_embeddings": ...]}``.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch

from .storage import EmbeddingCache, read_split_metadata

# Reader keys by cache position: the student's embeddings first, the teacher's second.
EMBEDDING_KEYS = ("image_embeddings", "teacher_image_embeddings")


class EmbeddingCacheReader:
    """``reader(image_id) -> {key: (C, h, w) tensor}`` over one split of one or two caches.

    Args:
        caches: an :class:`EmbeddingCache`, or ``[student, teacher]``; the first fills
            ``"image_embeddings"``, the second ``"teacher_image_embeddings"``.
        split: the split to read (the caches must hold it, complete, for the same image ids).
        output_dtype: rows are returned in this dtype (float32 by default, exact for every storage
            dtype); None keeps the storage dtype.

    Opening checks each cache's identity and shard sizes. Shards are opened lazily with
    ``safetensors.safe_open`` (memory-mapped) in the process that reads them; pickling drops open
    handles, so the reader can go to DataLoader workers.
    """

    def __init__(self, caches: Union[EmbeddingCache, Sequence[EmbeddingCache]], split: str,
                 output_dtype: Optional[torch.dtype] = torch.float32):
        caches = [caches] if isinstance(caches, EmbeddingCache) else list(caches)
        if not 1 <= len(caches) <= len(EMBEDDING_KEYS):
            raise ValueError(f"give one (student) or two (student, teacher) caches, got {len(caches)}")
        self.split, self.output_dtype = split, output_dtype
        self.keys = EMBEDDING_KEYS[: len(caches)]
        self._dirs, self._files, self._shard_sizes, self.shapes = [], [], [], []
        self._rows: Optional[dict] = None
        for cache in caches:
            directory = cache.split_dir(split)
            metadata = read_split_metadata(directory, cache.fingerprint, cache.metadata[split]["split_fingerprint"])
            rows = {int(image_id): int(row) for image_id, row in metadata["rows"].items()}
            if self._rows is not None and rows != self._rows:
                raise ValueError(f"the caches hold different images for split {split!r}; build them on the same dataset")
            self._rows = rows
            self._dirs.append(directory)
            self._files.append([entry["file"] for entry in metadata["shards"]])
            self._shard_sizes.append(int(metadata["shard_size"]))
            self.shapes.append(tuple(metadata["shape"]))
        self._handles: dict = {}
        self._pid = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, None
        return state

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, image_id) -> bool:
        return int(image_id) in self._rows

    def _slice(self, cache: int, shard: int):
        if self._pid != os.getpid():  # first use in this process (or a forked worker): open anew
            self._handles, self._pid = {}, os.getpid()
        if (cache, shard) not in self._handles:
            from safetensors import safe_open

            handle = safe_open(os.path.join(self._dirs[cache], self._files[cache][shard]), framework="pt")
            self._handles[cache, shard] = (handle, handle.get_slice("embeddings"))
        return self._handles[cache, shard][1]

    def get(self, image_id, key: str = "image_embeddings") -> torch.Tensor:
        """The (C, h, w) embedding of ``image_id`` under ``key``."""
        if key not in self.keys:
            raise KeyError(f"this reader holds {list(self.keys)}, not {key!r}")
        cache = self.keys.index(key)
        try:
            row = self._rows[int(image_id)]
        except KeyError:
            raise KeyError(f"image_id {image_id} is not in the embedding cache {self._dirs[cache]}") from None
        shard_size = self._shard_sizes[cache]
        offset = row % shard_size
        tensor = self._slice(cache, row // shard_size)[offset:offset + 1][0]
        return tensor if self.output_dtype is None else tensor.to(self.output_dtype)

    def __call__(self, image_id) -> dict:
        return {key: self.get(image_id, key) for key in self.keys}


__all__ = ["EMBEDDING_KEYS", "EmbeddingCacheReader"]
