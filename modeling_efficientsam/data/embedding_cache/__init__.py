"""Image embeddings computed once per (image, encoder) and memory-mapped at training time.

With a frozen image encoder the embedding of an image is a pure function of the image pixels, the
preprocessing and the encoder weights, so an epoch does not need to run the encoder at all::

    student = build_embedding_cache("outputs/dataset", student_model, dtype="bfloat16")  # or open_embedding_cache
    teacher = build_embedding_cache("outputs/dataset", teacher_model, dtype="bfloat16")
    reader = EmbeddingCacheReader([student, teacher], "train")
    train = EfficientSamTrainingDataset(dataset["train"], embedding_reader=reader)

Modules: ``fingerprint`` (what keys a cache), ``storage`` (files on disk, :class:`EmbeddingCache`),
``reader`` (:class:`EmbeddingCacheReader`), ``builder`` (build / open). Layout, by default under the
dataset folder, ``embeddings/<first 24 hex digits of the cache fingerprint>/<split>/``; the format is
described in data/README.md.
"""

from .builder import build_embedding_cache, open_embedding_cache
from .fingerprint import cache_fingerprint, preprocessing_spec, split_fingerprint, vision_encoder_fingerprint
from .reader import EMBEDDING_KEYS, EmbeddingCacheReader
from .storage import COMPUTE_DTYPES, STORAGE_DTYPES, EmbeddingCache, EmbeddingCacheError

__all__ = [
    "COMPUTE_DTYPES",
    "EMBEDDING_KEYS",
    "STORAGE_DTYPES",
    "EmbeddingCache",
    "EmbeddingCacheError",
    "EmbeddingCacheReader",
    "build_embedding_cache",
    "cache_fingerprint",
    "open_embedding_cache",
    "preprocessing_spec",
    "split_fingerprint",
    "vision_encoder_fingerprint",
]
