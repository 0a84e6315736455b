"""A prepared dataset in the Hub's format, its upload, and the one loader every tool uses.

A prepared dataset exists in two forms:

* the folder ``prepare_coco_dataset`` writes: ``DatasetDict.save_to_disk`` + ``report.json``;
* the Hub form, written by :func:`save_hub_format` and uploaded in one commit by
  :func:`push_prepared_dataset`::

      data/<split>-00000-of-00001.parquet   the rows, image bytes embedded (the names push_to_hub uses)
      README.md                             dataset card (dataset_card.py); its YAML holds ``configs``
                                            (which files make which split) and ``dataset_info``
                                            (features with the ClassLabel names, split sizes)
      coco_categories.json                  the conversion metadata: COCO category ids, names, fingerprint
      report.json                           the conversion report, without the local folder paths

The ClassLabel names survive Parquet (they are in the Parquet schema and in the card), but
``info.description``, where the conversion keeps the COCO category ids and its fingerprint, does not:
``load_dataset`` returns an empty description. The ids cannot be read back from the rows either, since
categories without any object (such as Roboflow's placeholder id 0) have no row. So they travel in
``coco_categories.json``, and :func:`load_prepared_dataset` puts them back into every split's
description: every tool (``dataset_categories``, the embedding cache's split fingerprint, the
evaluation) then sees the same metadata whichever form the dataset was loaded from.

:func:`load_prepared_dataset` takes a ``save_to_disk`` folder, a local Hub-form folder, or a Hub
dataset id (``load_dataset`` + ``hf_hub_download`` of ``coco_categories.json``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
from typing import Optional, Union

import datasets

from ..file_utils import read_json_or_none, staged_directory, write_json_atomic
from .conversion import category_names, conversion_metadata, set_conversion_metadata
from .report import REPORT_FILE, read_report

logger = logging.getLogger(__name__)

__all__ = [
    "CATEGORIES_FILE",
    "DEFAULT_MAX_SHARD_SIZE",
    "is_saved_dataset_folder",
    "load_prepared_dataset",
    "push_prepared_dataset",
    "save_hub_format",
]

CATEGORIES_FILE = "coco_categories.json"
DATA_DIR = "data"
DEFAULT_MAX_SHARD_SIZE = 500 * 2**20  # bytes of Arrow data per Parquet file, as push_to_hub's "500MB"
_REQUIRED_COLUMNS = ("image", "image_id", "width", "height", "objects")


def is_saved_dataset_folder(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a folder written by ``save_to_disk`` (a DatasetDict or a Dataset)."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def load_prepared_dataset(name_or_path: Union[str, os.PathLike], revision: Optional[str] = None,
                          cache_dir: Optional[str] = None) -> datasets.DatasetDict:
    """The prepared dataset ``name_or_path``, with its conversion metadata, as a ``DatasetDict``.

    Args:
        name_or_path: a folder written by ``prepare_coco_dataset`` (``save_to_disk``), a local folder in
            the Hub form (:func:`save_hub_format`, or a download of a Hub repository), or the id of a
            Hub dataset repository pushed by :func:`push_prepared_dataset`.
        revision: branch, tag or commit of a Hub dataset (not allowed with a local folder).
        cache_dir: where ``load_dataset`` keeps its Arrow copy (default: the datasets cache).

    Every split carries the conversion metadata (``conversion_metadata(split)``: COCO category ids,
    names, fingerprint). A Hub-form dataset without ``coco_categories.json`` (pushed with plain
    ``DatasetDict.push_to_hub``) gets the ids from its objects' ``category_id``; when a category has
    no object its id is unknown and this raises ``ValueError``.

    Raises ``FileNotFoundError`` when ``name_or_path`` is neither a local folder nor a loadable Hub
    dataset, and ``ValueError`` when the data is not a prepared dataset.
    """
    source = os.fspath(name_or_path)
    if os.path.isdir(source):
        if revision is not None:
            raise ValueError(f"revision {revision!r} is for a Hub dataset id; {source} is a local folder")
        if is_saved_dataset_folder(source):
            loaded = datasets.load_from_disk(source)
            if isinstance(loaded, datasets.Dataset):
                loaded = datasets.DatasetDict({str(loaded.split or "train"): loaded})
            return _with_metadata(loaded, None, source, strict=False)
        dataset = datasets.load_dataset(source, cache_dir=cache_dir)
        metadata = read_json_or_none(os.path.join(source, CATEGORIES_FILE))
        return _with_metadata(dataset, metadata, source)
    if os.path.exists(source):
        raise ValueError(f"{source} is a file; expected a prepared dataset folder or a Hub dataset id")
    try:
        dataset = datasets.load_dataset(source, revision=revision, cache_dir=cache_dir)
    except (OSError, ValueError) as error:  # DatasetNotFoundError, ConnectionError offline, an invalid id
        raise FileNotFoundError(
            f"{source}: no such local folder, and it cannot be loaded as a Hub dataset ({type(error).__name__}: {error}). "
            "Fix: give a folder written by data/prepare_dataset.py or the id of a dataset it pushed"
        ) from error
    return _with_metadata(dataset, _download_categories(source, revision), source)


def _download_categories(repo_id: str, revision: Optional[str]) -> Optional[dict]:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = huggingface_hub.hf_hub_download(repo_id, CATEGORIES_FILE, repo_type="dataset", revision=revision)
    except EntryNotFoundError as error:  # not in the repository, or offline and not in the cache
        logger.warning("%s has no readable %s (%s); reading the category ids from the objects", repo_id, CATEGORIES_FILE, error)
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _check_columns(dataset_dict: datasets.DatasetDict, source: str) -> list:
    if not isinstance(dataset_dict, datasets.DatasetDict) or not dataset_dict:
        raise ValueError(f"{source}: expected a dataset with named splits, got {type(dataset_dict).__name__}")
    names = None
    for split_name, split in dataset_dict.items():
        missing = [column for column in _REQUIRED_COLUMNS if column not in split.column_names]
        if missing:
            raise ValueError(f"{source}: split {split_name!r} lacks the columns {missing}; not a dataset prepared by "
                             "data/prepare_dataset.py")
        split_names = category_names(split)
        if names is not None and split_names != names:
            raise ValueError(f"{source}: the splits have different category names ({names} and {split_names})")
        names = split_names
    return names


def _categories_from_objects(dataset_dict: datasets.DatasetDict, names: list, source: str) -> dict:
    """The COCO id of each category index, from the objects' (category, category_id) pairs."""
    import pyarrow.compute as pc

    ids: dict = {}
    for split in dataset_dict.values():
        objects = pc.list_flatten(split.select_columns(["objects"]).with_format("arrow")[:].column("objects"))
        if len(objects) == 0:
            continue
        pairs = zip(pc.struct_field(objects, "category").to_pylist(), pc.struct_field(objects, "category_id").to_pylist())
        for index, category_id in set(pairs):
            if ids.setdefault(index, category_id) != category_id:
                raise ValueError(f"{source}: category {names[index]!r} has the COCO ids {ids[index]} and {category_id}")
    unknown = [names[i] for i in range(len(names)) if i not in ids]
    if unknown:
        raise ValueError(f"{source}: no {CATEGORIES_FILE}, and the categories {unknown} have no object, so their COCO "
                         "ids are unknown. Fix: push the dataset with data/prepare_dataset.py --push_to_hub")
    return {"coco_category_ids": [ids[i] for i in range(len(names))], "category_names": list(names)}


def _with_metadata(dataset_dict, metadata: Optional[dict], source: str, strict: bool = True) -> datasets.DatasetDict:
    """Check the categories and put ``metadata`` into every split. Without any metadata, the ids come
    from the objects; when they cannot, ``strict=False`` (a save_to_disk folder, loaded as before)
    returns the dataset without metadata, with a warning, instead of raising."""
    names = _check_columns(dataset_dict, source)
    if metadata is None:
        try:
            metadata = conversion_metadata(next(iter(dataset_dict.values())))
        except ValueError:
            try:
                metadata = _categories_from_objects(dataset_dict, names, source)
            except ValueError as error:
                if strict:
                    raise
                logger.warning("%s; tools that need the COCO category ids (efficientsam-evaluate) will refuse it", error)
                return dataset_dict
    ids = list(metadata.get("coco_category_ids") or [])
    if list(metadata.get("category_names") or []) != names or len(ids) != len(names):
        raise ValueError(f"{source}: the conversion metadata lists categories {metadata.get('category_names')} with ids "
                         f"{ids}, but the dataset's ClassLabel names are {names}")
    for split in dataset_dict.values():
        set_conversion_metadata(split, metadata)
    return dataset_dict


# ------------------------------------------------------------------------------------------------
# Writing and pushing
# ------------------------------------------------------------------------------------------------
def _portable_report(report: dict) -> dict:
    """The conversion report without the machine's folders (annotation file and images folder by name only)."""
    report = copy.deepcopy(report)
    for split in (report.get("splits") or {}).values():
        for key in ("annotations_file", "images_dir"):
            if split.get(key):
                split[key] = os.path.basename(os.path.normpath(split[key]))
    return report


def _card_metadata(card, dataset_dict: datasets.DatasetDict, shards: dict) -> None:
    """Add ``configs`` and ``dataset_info`` to the card's YAML, as ``DatasetDict.push_to_hub`` writes them."""
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs

    first = next(iter(dataset_dict.values()))
    info = DatasetInfo(config_name="default", features=first.features, splits=datasets.SplitDict(), download_size=0, dataset_size=0)
    for name, split in dataset_dict.items():
        info.splits.add(datasets.SplitInfo(name=name, num_bytes=split.data.nbytes, num_examples=len(split)))
        info.dataset_size += split.data.nbytes
        info.download_size += shards[name]
    info.size_in_bytes = info.download_size + info.dataset_size
    DatasetInfosDict({"default": info}).to_dataset_card_data(card.data)
    data_files = [{"split": name, "path": f"{DATA_DIR}/{name}-*"} for name in dataset_dict]
    MetadataConfigs({"default": {"data_files": data_files}}).to_dataset_card_data(card.data)


def save_hub_format(
    dataset_dict: datasets.DatasetDict,
    folder: Union[str, os.PathLike],
    *,
    report: Optional[dict] = None,
    repo_id: Optional[str] = None,
    license: Optional[str] = None,
    pretty_name: Optional[str] = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> str:
    """Write ``dataset_dict`` (a prepared dataset) to ``folder`` in the Hub form; returns the folder.

    ``report`` (the conversion report, default: read from the folder the dataset was loaded from)
    feeds the card's drop / repair table and is written without local paths; ``repo_id`` names the
    dataset in the card's loading code; ``license`` (a Hub license id such as ``cc-by-4.0``) goes into
    the card's YAML. ``folder`` is replaced as a whole (written beside it, then renamed); it must be
    missing, empty, or an earlier Hub-form folder.
    """
    from .dataset_card import build_dataset_card

    if max_shard_size < 1:
        raise ValueError(f"max_shard_size must be >= 1 byte, got {max_shard_size}")
    names = _check_columns(dataset_dict, "the dataset")
    metadata = conversion_metadata(next(iter(dataset_dict.values())))  # raises for data not written by the conversion
    if list(metadata["category_names"]) != names:
        raise ValueError(f"the conversion metadata names {metadata['category_names']}, the ClassLabel {names}")
    if report is None:
        report = _report_of(dataset_dict)
    folder = os.path.abspath(os.fspath(folder))
    if os.path.isdir(folder) and os.listdir(folder) and not os.path.exists(os.path.join(folder, CATEGORIES_FILE)):
        raise FileExistsError(f"{folder} is not empty and does not hold a Hub-form dataset; choose another folder")

    with staged_directory(folder) as staged:
        shard_bytes = {}
        for name, split in dataset_dict.items():
            num_shards = min(max(1, math.ceil(split.data.nbytes / max_shard_size)), max(1, len(split)))  # no empty shard
            shard_bytes[name] = 0
            for index in range(num_shards):
                path = os.path.join(staged, DATA_DIR, f"{name}-{index:05d}-of-{num_shards:05d}.parquet")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                split.shard(num_shards=num_shards, index=index, contiguous=True).to_parquet(path)
                shard_bytes[name] += os.path.getsize(path)
        write_json_atomic(os.path.join(staged, CATEGORIES_FILE), metadata, indent=2)
        if report is not None:
            write_json_atomic(os.path.join(staged, REPORT_FILE), _portable_report(report), indent=2)
        card = build_dataset_card(dataset_dict, report=report, repo_id=repo_id, license=license, pretty_name=pretty_name)
        _card_metadata(card, dataset_dict, shard_bytes)
        card.save(os.path.join(staged, "README.md"))
    logger.info("wrote the Hub form of the dataset to %s", folder)
    return folder


def _report_of(dataset_dict: datasets.DatasetDict) -> Optional[dict]:
    """``report.json`` of the folder the dataset was loaded from (save_to_disk or Hub form), if any."""
    files = [entry["filename"] for split in dataset_dict.values() for entry in split.cache_files]
    for candidate in {os.path.dirname(os.path.dirname(f)) for f in files}:
        report = read_report(candidate)
        if report is not None:
            return report
    return None


def push_prepared_dataset(
    dataset_dict: datasets.DatasetDict,
    repo_id: str,
    *,
    report: Optional[dict] = None,
    license: Optional[str] = None,
    pretty_name: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    commit_message: str = "Upload a dataset prepared with modeling_efficientsam",
    hub_format_dir: Optional[Union[str, os.PathLike]] = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> str:
    """Write the Hub form of ``dataset_dict`` (:func:`save_hub_format`) and upload it in one commit.

    The repository is created when missing (``private`` applies then). Parquet files of an earlier
    push that this one does not rewrite are deleted in the same commit. ``hub_format_dir`` keeps the
    written folder (default: a temporary folder, removed afterwards). Returns the dataset's URL.
    """
    import huggingface_hub

    api = huggingface_hub.HfApi(token=token)
    repo_id = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory(prefix="efficientsam-hub-") as work:
        folder = os.fspath(hub_format_dir) if hub_format_dir is not None else os.path.join(work, "dataset")
        save_hub_format(dataset_dict, folder, report=report, repo_id=repo_id, license=license, pretty_name=pretty_name,
                        max_shard_size=max_shard_size)
        api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=folder, revision=revision,
                          commit_message=commit_message, delete_patterns=[f"{DATA_DIR}/*"])
    return f"https://huggingface.co/datasets/{repo_id}"
