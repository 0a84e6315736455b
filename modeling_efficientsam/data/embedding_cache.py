"""Image embeddings computed once per (image, encoder) and memory-mapped at training time.

With a frozen image encoder the embedding of an image is a pure function of the image pixels, the
preprocessing and the encoder weights, so an epoch does not need to run the encoder at all.

Layout (see data/README.md for the full description)::

    <dataset dir>/embeddings/<key>/<split>/
        manifest.json                 progress: one entry per finished shard (rows, bytes, sha256)
        shard-00000.safetensors       "embeddings" (n, C, h, w) in the storage dtype, "image_ids" (n,)
        ...
        metadata.json                 written last; its presence means the split is complete

``<key>`` is a digest of the cache fingerprint: the vision-encoder weights and architecture, the
preprocessing (image size, mean/std, resize rule, EXIF rule), the compute dtype and the storage
dtype. Each split additionally records a split fingerprint (conversion fingerprint, split name and
image ids); a cache whose fingerprint or split fingerprint differs from the requested one is never
read: ``build_embedding_cache`` recomputes it and ``open_embedding_cache`` raises.

Shards are written to a temporary name and renamed when complete, and the manifest is updated
after each rename, so an interrupted build resumes with the first missing shard. On resume every
recorded shard is checked (size, header shape/dtype and, by default, SHA-256); a shard that fails
is computed again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import time
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..image_utils import to_rgb_array
from .training_dataset import IMAGE_MEAN, IMAGE_STD, efficientsam_pixel_values

logger = logging.getLogger(__name__)

EMBEDDING_CACHE_FORMAT_VERSION = 1
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
COMPUTE_DTYPES = STORAGE_DTYPES
# Reader keys by model position: the student's embeddings first, the teacher's second.
EMBEDDING_KEYS = ("image_embeddings", "teacher_image_embeddings")
_METADATA = "metadata.json"
_MANIFEST = "manifest.json"


class EmbeddingCacheError(RuntimeError):
    """A cache was asked for that is missing, incomplete, stale (other fingerprint) or damaged."""


# ----------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------


def _digest(document) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def vision_encoder_fingerprint(model) -> str:
    """SHA-256 over the vision encoder's architecture fields and the raw bytes of its state dict.

    Only the encoder determines the embeddings, so prompt-encoder or mask-decoder changes (the parts
    that are trained on a frozen encoder) leave this fingerprint, and the cache, untouched. Tensors
    are hashed straight from their memory (no copy for contiguous CPU tensors); the name, dtype and
    shape of each go in too.
    """
    config = model.config.vision_config
    fields = [name for name in inspect.signature(type(config).__init__).parameters if name not in ("self", "kwargs")]
    digest = hashlib.sha256()
    digest.update(json.dumps({name: getattr(config, name, None) for name in fields}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.vision_encoder.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def preprocessing_spec(image_size: int, image_processor=None) -> dict:
    """Everything about pixels that changes an embedding, as stored in the fingerprint."""
    mean = IMAGE_MEAN if image_processor is None else image_processor.image_mean
    std = IMAGE_STD if image_processor is None else image_processor.image_std
    if image_processor is not None and int(image_processor.size) != int(image_size):
        raise ValueError(f"image_processor.size ({image_processor.size}) differs from the model's image_size ({image_size})")
    return {
        "image_size": int(image_size),
        "image_mean": [float(v) for v in mean],
        "image_std": [float(v) for v in std],
        "rescale": "uint8 RGB / 255",
        "resize": "bilinear stretch to a square, align_corners=False, antialias=False",
        "exif": "orientation applied once at conversion (images stored upright), not applied again",
    }


def split_fingerprint(split, name: str) -> str:
    """Identity of a converted split: its conversion fingerprint (else datasets' own), name and image ids."""
    from .conversion import conversion_metadata

    try:
        source = conversion_metadata(split)["fingerprint"]
    except (ValueError, KeyError):
        source = getattr(split, "_fingerprint", None)
    ids = np.asarray(list(split["image_id"]), dtype=np.int64)
    return _digest({"source": source, "split": name, "num_rows": len(split),
                    "image_ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest()})


def cache_fingerprint(model, dtype: str = "bfloat16", compute_dtype: str = "float32", image_processor=None) -> dict:
    """The parts that key a cache directory, and their digest under ``"fingerprint"``."""
    _check_dtype(dtype, compute_dtype)
    parts = {
        "format_version": EMBEDDING_CACHE_FORMAT_VERSION,
        "vision_encoder_sha256": vision_encoder_fingerprint(model),
        "preprocessing": preprocessing_spec(model.config.vision_config.image_size, image_processor),
        "compute_dtype": compute_dtype,
        "dtype": dtype,
    }
    return {"fingerprint": _digest(parts), "parts": parts}


def _check_dtype(dtype: str, compute_dtype: str) -> None:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {compute_dtype!r}")


# ----------------------------------------------------------------------------------------------
# Small file helpers
# ----------------------------------------------------------------------------------------------


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        logger.warning("ignoring unreadable %s (%s)", path, error)
        return None


def _write_atomic(path: str, data: bytes) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _write_json(path: str, document: dict) -> None:
    _write_atomic(path, json.dumps(document, indent=1, sort_keys=True).encode("utf-8"))


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _shard_problem(path: str, entry: dict, shape: Optional[list], dtype: str, checksum: bool) -> Optional[str]:
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
    expected_dtype = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[dtype]
    if found_dtype != expected_dtype or ids.numel() != rows:
        return f"dtype {found_dtype} / {ids.numel()} ids"
    if checksum:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
        if digest.hexdigest() != entry["sha256"]:
            return "checksum mismatch"
    return None


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


class EmbeddingCacheReader:
    """``reader(image_id) -> {key: (C, h, w) tensor}`` for one split of one cache.

    Shards are opened lazily with ``safetensors.safe_open`` (memory-mapped) in the process that
    reads them; pickling drops open handles, so the reader can go to DataLoader workers. Rows are
    returned as ``output_dtype`` (float32 by default, exact for every storage dtype; None keeps the
    storage dtype).
    """

    def __init__(self, split_dir: str, key: str = "image_embeddings", output_dtype: Optional[torch.dtype] = torch.float32,
                 expected_fingerprint: Optional[str] = None, expected_split_fingerprint: Optional[str] = None):
        metadata = _read_json(os.path.join(split_dir, _METADATA))
        if metadata is None:
            raise EmbeddingCacheError(f"{split_dir} holds no complete embedding cache (no {_METADATA})")
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
        self.split_dir, self.key, self.output_dtype = split_dir, key, output_dtype
        self.metadata = metadata
        self.shape = tuple(metadata["shape"])
        self._shard_size = int(metadata["shard_size"])
        self._files = [entry["file"] for entry in metadata["shards"]]
        self._rows = {int(image_id): int(row) for image_id, row in metadata["rows"].items()}
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

    def _slice(self, shard: int):
        if self._pid != os.getpid():  # first use in this process (or a forked worker): open anew
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            from safetensors import safe_open

            handle = safe_open(os.path.join(self.split_dir, self._files[shard]), framework="pt")
            self._handles[shard] = (handle, handle.get_slice("embeddings"))
        return self._handles[shard][1]

    def get(self, image_id) -> torch.Tensor:
        """The (C, h, w) embedding of ``image_id``."""
        try:
            row = self._rows[int(image_id)]
        except KeyError:
            raise KeyError(f"image_id {image_id} is not in the embedding cache {self.split_dir}") from None
        offset = row % self._shard_size
        tensor = self._slice(row // self._shard_size)[offset:offset + 1][0]
        return tensor if self.output_dtype is None else tensor.to(self.output_dtype)

    def __call__(self, image_id) -> dict:
        return {self.key: self.get(image_id)}


class EmbeddingReader:
    """Several cache readers behind one ``embedding_reader(image_id) -> dict`` (e.g. student and teacher)."""

    def __init__(self, readers: Sequence[EmbeddingCacheReader]):
        keys = [reader.key for reader in readers]
        if not readers or len(set(keys)) != len(keys):
            raise ValueError(f"need at least one reader and distinct keys, got {keys}")
        self.readers = list(readers)

    def __call__(self, image_id) -> dict:
        return {reader.key: reader.get(image_id) for reader in self.readers}


class EmbeddingCache:
    """A complete cache of one encoder over some splits of a dataset.

    Attributes: ``root`` (``<cache_root>/<key>``), ``fingerprint`` and ``parts`` (what it is keyed
    by), ``dtype``, ``metadata`` (split -> metadata.json contents) and ``build_stats`` (split ->
    ``computed_shards`` / ``reused_shards`` / ``seconds`` of the build that returned it, if any).
    """

    def __init__(self, root: str, fingerprint: dict, metadata: dict, build_stats: Optional[dict] = None):
        self.root = root
        self.fingerprint, self.parts = fingerprint["fingerprint"], fingerprint["parts"]
        self.dtype = self.parts["dtype"]
        self.metadata = metadata
        self.build_stats = build_stats or {}

    @property
    def splits(self) -> list:
        return list(self.metadata)

    def reader(self, split: str, key: str = "image_embeddings", output_dtype: Optional[torch.dtype] = torch.float32):
        if split not in self.metadata:
            raise KeyError(f"split {split!r} is not in this cache (has {self.splits})")
        return EmbeddingCacheReader(os.path.join(self.root, split), key, output_dtype, self.fingerprint,
                                    self.metadata[split]["split_fingerprint"])

    def bytes_per_image(self) -> int:
        shape = next(iter(self.metadata.values()))["shape"]
        return int(np.prod(shape)) * torch.empty((), dtype=STORAGE_DTYPES[self.dtype]).element_size()

    def storage_summary(self) -> str:
        """One line per split and a total: values per image, bytes per image, bytes on disk."""
        per_image = self.bytes_per_image()
        shape = " x ".join(str(v) for v in next(iter(self.metadata.values()))["shape"])
        lines = [f"{self.metadata[next(iter(self.metadata))]['model_name']} [{self.fingerprint[:12]}]: {shape} {self.dtype} "
                 f"= {per_image / 2**20:.2f} MiB per image"]
        total_images = total_bytes = 0
        for split, metadata in self.metadata.items():
            on_disk = sum(entry["bytes"] for entry in metadata["shards"])
            total_images, total_bytes = total_images + metadata["count"], total_bytes + on_disk
            lines.append(f"  {split}: {metadata['count']} images, {on_disk / 2**20:.1f} MiB")
        lines.append(f"  total: {total_images} images, {total_bytes / 2**20:.1f} MiB")
        return "\n".join(lines)


def embedding_reader(caches: Sequence[EmbeddingCache], split: str, output_dtype: Optional[torch.dtype] = torch.float32):
    """One reader for ``EfficientSamTrainingDataset(embedding_reader=...)`` over student [and teacher] caches.

    The first cache fills ``"image_embeddings"``, the second ``"teacher_image_embeddings"``.
    """
    if isinstance(caches, EmbeddingCache):
        caches = [caches]
    if not 1 <= len(caches) <= len(EMBEDDING_KEYS):
        raise ValueError(f"give one (student) or two (student, teacher) caches, got {len(caches)}")
    return EmbeddingReader([cache.reader(split, key, output_dtype) for cache, key in zip(caches, EMBEDDING_KEYS)])


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------


def _resolve_dataset(dataset, cache_root):
    import datasets

    if isinstance(dataset, (str, os.PathLike)):
        directory = os.fspath(dataset)
        return datasets.load_from_disk(directory), cache_root or os.path.join(directory, "embeddings")
    if not isinstance(dataset, datasets.DatasetDict):
        raise TypeError(f"expected a dataset directory or a datasets.DatasetDict, got {type(dataset).__name__}")
    if cache_root is None:
        files = [entry["filename"] for split in dataset.values() for entry in split.cache_files]
        directory = os.path.dirname(os.path.dirname(files[0])) if files else None
        if directory is None or not os.path.exists(os.path.join(directory, "dataset_dict.json")):
            raise ValueError("this DatasetDict was not loaded from a saved folder; pass cache_root=")
        cache_root = os.path.join(directory, "embeddings")
    return dataset, cache_root


def _resolve_model(model):
    if isinstance(model, (str, os.PathLike)):
        from ..modeling_efficientsam import EfficientSamModel

        return EfficientSamModel.from_pretrained(os.fspath(model)), os.fspath(model)
    return model, getattr(model.config, "_name_or_path", "") or type(model).__name__


def _pixel_values(image, image_size: int, image_processor) -> torch.Tensor:
    # Same arithmetic as EfficientSamTrainingDataset._pixel_values, so cached and live inputs agree.
    array = to_rgb_array(image, apply_exif=False)
    if image_processor is None:
        return efficientsam_pixel_values(array, image_size)
    from PIL import Image

    return image_processor(Image.fromarray(array), return_tensors="pt")["pixel_values"][0]


@torch.no_grad()
def _encode_rows(model, images, rows: range, batch_size: int, image_processor, device, compute_dtype, storage_dtype):
    image_size = model.config.vision_config.image_size
    outputs = []
    for start in range(rows.start, rows.stop, batch_size):
        stop = min(start + batch_size, rows.stop)
        pixels = torch.stack([_pixel_values(image, image_size, image_processor) for image in images[start:stop]["image"]])
        pixels = pixels.to(device)
        if compute_dtype == "float32":
            embeddings = model.get_image_embeddings(pixels)
        else:
            with torch.autocast(device_type=torch.device(device).type, dtype=COMPUTE_DTYPES[compute_dtype]):
                embeddings = model.get_image_embeddings(pixels)
        outputs.append(embeddings.to(device="cpu", dtype=storage_dtype))
    return torch.cat(outputs)


def _build_split(model, split, name, directory, fingerprint, split_fp, model_name, options, progress_callback):
    from safetensors.torch import save

    count, shard_size, dtype = len(split), options["shard_size"], options["dtype"]
    image_ids = [int(i) for i in split["image_id"]]
    if len(set(image_ids)) != count:
        raise ValueError(f"split {name!r} has repeated image_id values; the cache is keyed by image_id")
    num_shards = -(-count // shard_size)
    identity = {"format_version": EMBEDDING_CACHE_FORMAT_VERSION, "fingerprint": fingerprint["fingerprint"],
                "split_fingerprint": split_fp, "shard_size": shard_size, "count": count, "dtype": dtype}

    manifest = _read_json(os.path.join(directory, _MANIFEST))
    if manifest is None or {k: manifest.get(k) for k in identity} != identity:
        if os.path.isdir(directory) and os.listdir(directory):
            logger.warning("%s holds a cache of other inputs (or no manifest); discarding it", directory)
        shutil.rmtree(directory, ignore_errors=True)
        manifest = None
    os.makedirs(directory, exist_ok=True)
    for leftover in os.listdir(directory):  # temporary files of an interrupted write
        if ".tmp-" in leftover:
            os.remove(os.path.join(directory, leftover))
    # (C, h, w) as the model's forward expects image_embeddings; checked against what the encoder returns.
    shape = [model.config.mask_decoder_config.hidden_size, model.config.image_embedding_size, model.config.image_embedding_size]
    if manifest is None:
        manifest = {**identity, "shape": shape, "shards": {}}

    stats = {"computed_shards": [], "reused_shards": [], "seconds": 0.0}
    for key, entry in sorted(manifest["shards"].items(), key=lambda item: int(item[0])):
        problem = _shard_problem(os.path.join(directory, entry["file"]), entry, shape, dtype, options["verify"] == "checksum")
        if problem is None:
            stats["reused_shards"].append(int(key))
        else:
            logger.warning("%s: shard %s is damaged (%s); computing it again", directory, entry["file"], problem)
            del manifest["shards"][key]
    if len(stats["reused_shards"]) < num_shards:
        metadata_path = os.path.join(directory, _METADATA)
        if os.path.exists(metadata_path):
            os.remove(metadata_path)  # the split is incomplete until every shard is back

    images = split.select_columns(["image"])
    started = time.perf_counter()
    for index in range(num_shards):
        if str(index) in manifest["shards"]:
            continue
        rows = range(index * shard_size, min((index + 1) * shard_size, count))
        embeddings = _encode_rows(model, images, rows, options["batch_size"], options["image_processor"],
                                  options["device"], options["compute_dtype"], STORAGE_DTYPES[dtype])
        if list(embeddings.shape[1:]) != shape:
            raise RuntimeError(f"the encoder returned embeddings of shape {tuple(embeddings.shape[1:])}, expected {tuple(shape)}")
        data = save({"embeddings": embeddings.contiguous(), "image_ids": torch.tensor(image_ids[rows.start:rows.stop])},
                    # One key only: safetensors orders metadata keys arbitrarily, and shard bytes must be reproducible.
                    metadata={"efficientsam_embedding_cache": json.dumps(
                        {"fingerprint": fingerprint["fingerprint"], "split": name, "start": rows.start}, sort_keys=True)})
        _write_atomic(os.path.join(directory, _shard_name(index)), data)
        manifest["shards"][str(index)] = {"file": _shard_name(index), "start": rows.start, "stop": rows.stop,
                                          "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        _write_json(os.path.join(directory, _MANIFEST), manifest)
        stats["computed_shards"].append(index)
        if progress_callback is not None:
            progress_callback(name, index, num_shards)
    stats["seconds"] = time.perf_counter() - started

    metadata = _read_json(os.path.join(directory, _METADATA))
    if metadata is None:
        metadata = {
            **identity, "shape": shape, "model_name": model_name, "fingerprint_parts": fingerprint["parts"],
            "split": name, "bytes_per_image": int(np.prod(shape)) * torch.empty((), dtype=STORAGE_DTYPES[dtype]).element_size(),
            "shards": [manifest["shards"][str(i)] for i in range(num_shards)],
            "rows": {str(image_id): row for row, image_id in enumerate(image_ids)},
        }
        _write_json(os.path.join(directory, _METADATA), metadata)
    return metadata, stats


def build_embedding_cache(
    dataset,
    model,
    dtype: str = "bfloat16",
    splits: Optional[Sequence[str]] = None,
    batch_size: int = 8,
    cache_root: Optional[str] = None,
    shard_size: int = 64,
    compute_dtype: str = "float32",
    device: Optional[Union[str, torch.device]] = None,
    image_processor=None,
    verify: str = "checksum",
    progress_callback: Optional[Callable[[str, int, int], None]] = None,
) -> EmbeddingCache:
    """Compute (or finish, or reuse) the embedding cache of ``model`` over ``splits`` of ``dataset``.

    Args:
        dataset: a folder written by ``prepare_coco_dataset``, or a DatasetDict loaded from one (an
            in-memory DatasetDict needs ``cache_root``).
        model: an ``EfficientSamModel`` or a folder / name for ``EfficientSamModel.from_pretrained``.
        dtype: storage dtype, "bfloat16" (default), "float16" or "float32" (float32 reproduces the
            live encoder output bit for bit).
        splits: split names (default: all).
        batch_size: images per encoder call. On CPU, results can differ in the last bits between
            batch sizes; use the batch size of the live path (1 per item) for a bitwise match.
        cache_root: default ``<dataset folder>/embeddings``.
        shard_size: images per shard file (the unit of resuming).
        compute_dtype: "float32" (default), or "bfloat16" / "float16" for autocast on ``device``.
        device: where the encoder runs (default: where the model is; moved back afterwards).
        image_processor: an ``EfficientSamImageProcessor`` to use instead of the built-in
            normalisation, as given to ``EfficientSamTrainingDataset``.
        verify: how existing shards are checked before reuse, "checksum" (SHA-256, default) or "size"
            (size and header only).
        progress_callback: called as ``(split, shard_index, num_shards)`` after each written shard.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    if verify not in ("checksum", "size"):
        raise ValueError(f"verify must be 'checksum' or 'size', got {verify!r}")
    dataset, cache_root = _resolve_dataset(dataset, cache_root)
    model, model_name = _resolve_model(model)
    splits = list(dataset) if splits is None else list(splits)
    unknown = [s for s in splits if s not in dataset]
    if unknown:
        raise KeyError(f"splits {unknown} are not in the dataset (has {list(dataset)})")
    fingerprint = cache_fingerprint(model, dtype, compute_dtype, image_processor)
    root = os.path.join(cache_root, fingerprint["fingerprint"][:24])

    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    model.to(device)
    options = {"dtype": dtype, "shard_size": shard_size, "batch_size": batch_size, "compute_dtype": compute_dtype,
               "device": device, "image_processor": image_processor, "verify": verify}
    metadata, stats = {}, {}
    try:
        for name in splits:
            metadata[name], stats[name] = _build_split(
                model, dataset[name], name, os.path.join(root, name), fingerprint,
                split_fingerprint(dataset[name], name), model_name, options, progress_callback,
            )
            logger.info("%s/%s: computed %d shards, reused %d", root, name, len(stats[name]["computed_shards"]),
                        len(stats[name]["reused_shards"]))
    finally:
        model.to(home)
        model.train(was_training)
    return EmbeddingCache(root, fingerprint, metadata, stats)


def open_embedding_cache(
    dataset,
    model,
    dtype: str = "bfloat16",
    splits: Optional[Sequence[str]] = None,
    cache_root: Optional[str] = None,
    compute_dtype: str = "float32",
    image_processor=None,
) -> EmbeddingCache:
    """Open an existing, complete cache of ``model`` (same arguments as :func:`build_embedding_cache`).

    Raises :class:`EmbeddingCacheError` when there is no complete cache for exactly this encoder,
    preprocessing, dtype and dataset split; stale data is never returned. Shard sizes are checked;
    checksums are checked by ``build_embedding_cache``.
    """
    dataset, cache_root = _resolve_dataset(dataset, cache_root)
    model, _ = _resolve_model(model)
    fingerprint = cache_fingerprint(model, dtype, compute_dtype, image_processor)
    root = os.path.join(cache_root, fingerprint["fingerprint"][:24])
    metadata = {}
    for name in (list(dataset) if splits is None else list(splits)):
        reader = EmbeddingCacheReader(os.path.join(root, name), expected_fingerprint=fingerprint["fingerprint"],
                                      expected_split_fingerprint=split_fingerprint(dataset[name], name))
        metadata[name] = reader.metadata
    return EmbeddingCache(root, fingerprint, metadata)


__all__ = [
    "EMBEDDING_KEYS",
    "EmbeddingCache",
    "EmbeddingCacheError",
    "EmbeddingCacheReader",
    "EmbeddingReader",
    "build_embedding_cache",
    "cache_fingerprint",
    "embedding_reader",
    "open_embedding_cache",
    "preprocessing_spec",
    "split_fingerprint",
    "vision_encoder_fingerprint",
]
