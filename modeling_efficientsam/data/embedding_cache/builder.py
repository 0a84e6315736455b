"""Building (or finishing, or reusing) an embedding cache, and opening a complete one.

``build_embedding_cache`` writes each shard under a temporary name and renames it when complete,
then updates the manifest, so an interrupted build resumes with the first missing shard. On resume
every recorded shard is checked (size, header shape / dtype and, by default, SHA-256); a shard that
fails is computed again. ``open_embedding_cache`` only opens, and raises when no complete cache of
exactly this encoder, preprocessing, dtype and dataset split exists.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Callable, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from ...file_utils import remove_partial_writes
from ..training_dataset import stored_image_pixel_values
from .fingerprint import cache_fingerprint, split_fingerprint
from .storage import (
    COMPUTE_DTYPES,
    FORMAT_VERSION,
    MANIFEST_FILE,
    METADATA_FILE,
    STORAGE_DTYPES,
    EmbeddingCache,
    bytes_per_image,
    read_json,
    read_split_metadata,
    shard_problem,
    write_json,
    write_shard,
)

logger = logging.getLogger(__name__)


def _locate(dataset, model, dtype, compute_dtype, image_processor, cache_root):
    """-> (DatasetDict, model, model name, cache fingerprint, cache folder) for build / open."""
    import datasets

    if isinstance(dataset, (str, os.PathLike)):
        directory = os.fspath(dataset)
        dataset, cache_root = datasets.load_from_disk(directory), cache_root or os.path.join(directory, "embeddings")
    elif not isinstance(dataset, datasets.DatasetDict):
        raise TypeError(f"expected a dataset directory or a datasets.DatasetDict, got {type(dataset).__name__}")
    elif cache_root is None:
        files = [entry["filename"] for split in dataset.values() for entry in split.cache_files]
        directory = os.path.dirname(os.path.dirname(files[0])) if files else None
        if directory is None or not os.path.exists(os.path.join(directory, "dataset_dict.json")):
            raise ValueError("this DatasetDict was not loaded from a saved folder; pass cache_root=")
        cache_root = os.path.join(directory, "embeddings")
    if isinstance(model, (str, os.PathLike)):
        from ...inference.loading import load_efficientsam_model

        model, model_name = load_efficientsam_model(model), os.fspath(model)
    else:
        model_name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    fingerprint = cache_fingerprint(model, dtype, compute_dtype, image_processor)
    return dataset, model, model_name, fingerprint, os.path.join(cache_root, fingerprint["fingerprint"][:24])


@torch.no_grad()
def _encode_rows(model, images, rows: range, options: dict, bar=None) -> torch.Tensor:
    image_size, device = model.config.vision_config.image_size, options["device"]
    outputs = []
    for start in range(rows.start, rows.stop, options["batch_size"]):
        stop = min(start + options["batch_size"], rows.stop)
        pixels = torch.stack([stored_image_pixel_values(image, image_size, options["image_processor"])
                              for image in images[start:stop]["image"]]).to(device)
        if options["compute_dtype"] == "float32":
            embeddings = model.get_image_embeddings(pixels)
        else:
            with torch.autocast(device_type=torch.device(device).type, dtype=COMPUTE_DTYPES[options["compute_dtype"]]):
                embeddings = model.get_image_embeddings(pixels)
        outputs.append(embeddings.to(device="cpu", dtype=STORAGE_DTYPES[options["dtype"]]))
        if bar is not None:
            bar.update(stop - start)
    return torch.cat(outputs)


def _resume(directory: str, identity: dict, shape: list, num_shards: int, checksum: bool) -> tuple:
    """The manifest to continue from (shards that check out only) and the indices of those shards."""
    manifest = read_json(directory, MANIFEST_FILE)
    if manifest is None or {k: manifest.get(k) for k in identity} != identity:
        if os.path.isdir(directory) and os.listdir(directory):
            logger.warning("%s holds a cache of other inputs (or no manifest); discarding it", directory)
        shutil.rmtree(directory, ignore_errors=True)
        manifest = {**identity, "shape": shape, "shards": {}}
    os.makedirs(directory, exist_ok=True)
    remove_partial_writes(directory)
    reused = []
    for key, entry in sorted(manifest["shards"].items(), key=lambda item: int(item[0])):
        problem = shard_problem(os.path.join(directory, entry["file"]), entry, shape, identity["dtype"], checksum)
        if problem is None:
            reused.append(int(key))
        else:
            logger.warning("%s: shard %s is damaged (%s); computing it again", directory, entry["file"], problem)
            del manifest["shards"][key]
    if len(reused) < num_shards and os.path.exists(os.path.join(directory, METADATA_FILE)):
        os.remove(os.path.join(directory, METADATA_FILE))  # the split is incomplete until every shard is back
    return manifest, reused


def _build_split(model, split, name, directory, fingerprint, model_name, options, progress_callback):
    count, shard_size, dtype = len(split), options["shard_size"], options["dtype"]
    image_ids = [int(i) for i in split["image_id"]]
    if len(set(image_ids)) != count:
        raise ValueError(f"split {name!r} has repeated image_id values; the cache is keyed by image_id")
    identity = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint["fingerprint"],
                "split_fingerprint": split_fingerprint(split, name), "shard_size": shard_size, "count": count, "dtype": dtype}
    # The shard size cuts a cache into files; it is not part of what the cache holds. A cache of these
    # inputs written with another shard size (cache_embeddings.py --shard_size 4, then train.py's 64)
    # is reused, or finished, with its own.
    existing = read_json(directory, MANIFEST_FILE)
    if existing is not None and all(existing.get(key) == value for key, value in identity.items() if key != "shard_size") \
            and isinstance(existing.get("shard_size"), int) and existing["shard_size"] >= 1:
        shard_size = identity["shard_size"] = existing["shard_size"]
    num_shards = -(-count // shard_size)
    # (C, h, w) as the model's forward expects image_embeddings; checked against what the encoder returns.
    shape = [model.config.mask_decoder_config.hidden_size, model.config.image_embedding_size, model.config.image_embedding_size]
    manifest, reused = _resume(directory, identity, shape, num_shards, options["verify"] == "checksum")

    stats = {"computed_shards": [], "reused_shards": reused, "seconds": 0.0}
    images = split.select_columns(["image"])
    started = time.perf_counter()
    done = sum(min(shard_size, count - index * shard_size) for index in reused)
    # Images per second of the encoder, on stderr like the other long steps; nothing when all is reused.
    bar = tqdm(total=count, initial=done, desc=f"embedding cache [{name}]", unit="img", dynamic_ncols=True,
               disable=not options.get("progress", True) or done == count)
    for index in range(num_shards):
        if str(index) in manifest["shards"]:
            continue
        rows = range(index * shard_size, min((index + 1) * shard_size, count))
        embeddings = _encode_rows(model, images, rows, options, bar)
        if list(embeddings.shape[1:]) != shape:
            raise RuntimeError(f"the encoder returned embeddings of shape {tuple(embeddings.shape[1:])}, expected {tuple(shape)}")
        manifest["shards"][str(index)] = write_shard(directory, index, embeddings, image_ids[rows.start:rows.stop],
                                                     fingerprint["fingerprint"], name, rows.start)
        write_json(directory, MANIFEST_FILE, manifest)
        stats["computed_shards"].append(index)
        if progress_callback is not None:
            progress_callback(name, index, num_shards)
    bar.close()
    stats["seconds"] = time.perf_counter() - started

    metadata = read_json(directory, METADATA_FILE)
    if metadata is None:
        metadata = {
            **identity, "shape": shape, "model_name": model_name, "fingerprint_parts": fingerprint["parts"],
            "split": name, "bytes_per_image": bytes_per_image(shape, dtype),
            "shards": [manifest["shards"][str(i)] for i in range(num_shards)],
            "rows": {str(image_id): row for row, image_id in enumerate(image_ids)},
        }
        write_json(directory, METADATA_FILE, metadata)
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
    progress: bool = True,
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
        progress: show a progress bar per split on stderr (images done and images/s) while images are
            encoded; False for none.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    if verify not in ("checksum", "size"):
        raise ValueError(f"verify must be 'checksum' or 'size', got {verify!r}")
    dataset, model, model_name, fingerprint, root = _locate(dataset, model, dtype, compute_dtype, image_processor, cache_root)
    splits = list(dataset) if splits is None else list(splits)
    unknown = [s for s in splits if s not in dataset]
    if unknown:
        raise KeyError(f"splits {unknown} are not in the dataset (has {list(dataset)})")

    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    model.to(device)
    options = {"dtype": dtype, "shard_size": shard_size, "batch_size": batch_size, "compute_dtype": compute_dtype,
               "device": device, "image_processor": image_processor, "verify": verify, "progress": progress}
    metadata, stats = {}, {}
    try:
        for name in splits:
            metadata[name], stats[name] = _build_split(model, dataset[name], name, os.path.join(root, name), fingerprint,
                                                       model_name, options, progress_callback)
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
    dataset, _, _, fingerprint, root = _locate(dataset, model, dtype, compute_dtype, image_processor, cache_root)
    metadata = {
        name: read_split_metadata(os.path.join(root, name), fingerprint["fingerprint"], split_fingerprint(dataset[name], name))
        for name in (list(dataset) if splits is None else list(splits))
    }
    return EmbeddingCache(root, fingerprint, metadata)
