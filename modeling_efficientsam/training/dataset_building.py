"""The datasets of a training run, from ``DataArguments``.

* :func:`prepare_dataset`: the prepared dataset (a folder, a Hub-format copy or a Hub dataset, all
  through :func:`~modeling_efficientsam.data.load_prepared_dataset`), or the recipe's COCO files
  converted once (and reused while they are unchanged), main process first.
* :func:`build_datasets`: the training dataset (random objects and jittered prompts per epoch) and
  the evaluation dataset (every object, box prompts without jitter), reading cached image embeddings
  (student's and teacher's, see :func:`build_embedding_readers`) when asked.
* :func:`category_names` and :func:`dataset_summary`: the label names and the summary the model card
  shows.

Each time a dataset is prepared or reused, the main process logs its conversion summary (kept,
repaired and dropped annotations per reason, and the path of ``report.json``); a training or
validation split without a single usable object is a :class:`~.run_checks.TrainingSetupError`
before anything is cached or trained.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import logging

from ..data import category_names  # noqa: F401  (re-exported for train.py)
from .run_checks import TrainingSetupError

__all__ = ["build_datasets", "build_embedding_readers", "category_names", "dataset_summary", "prepare_dataset",
           "prepared_dataset_folder"]

logger = logging.getLogger(__name__)


def prepared_dataset_folder(data_args, training_args) -> str:
    """Where the recipe's COCO files are converted: prepared_dataset_dir, else <output_dir>/prepared_dataset."""
    return data_args.prepared_dataset_dir or os.path.join(training_args.output_dir, "prepared_dataset")


def _log_conversion_summary(folder: Optional[str], training_args) -> None:
    """The conversion summary of a prepared folder (main process); a folder without report.json says so."""
    from ..data import format_conversion_summary

    if not training_args.should_log:
        return
    if folder is None:
        logger.info("the dataset was not converted here (a Hub dataset): no conversion report to show")
        return
    try:
        logger.info("conversion summary of %s:\n%s", folder, format_conversion_summary(folder))
    except FileNotFoundError:
        logger.info("%s has no report.json (not written by data/prepare_dataset.py): no conversion summary to show", folder)


def prepare_dataset(data_args, training_args) -> Tuple[object, Optional[str]]:
    """(DatasetDict, its save_to_disk folder or None): ``dataset_name`` / ``dataset_path`` loaded, or the COCO
    files converted (and reused while unchanged). The folder is None for a Hub dataset or a Hub-format copy."""
    from ..data import is_saved_dataset_folder, load_or_prepare, load_prepared_dataset

    source = data_args.dataset_name or data_args.dataset_path
    if source is not None:
        argument = "dataset_name" if data_args.dataset_name else "dataset_path"
        with training_args.main_process_first(desc="loading the dataset"):  # a Hub download happens once
            try:
                dataset = load_prepared_dataset(source, revision=data_args.dataset_revision)
            except (FileNotFoundError, ValueError) as error:
                message = " ".join(str(error).split())
                fix = "" if "Fix:" in message else ". Fix: give a folder written by data/prepare_dataset.py"
                raise TrainingSetupError(f"{argument}: {message}{fix}") from error
        folder = source if os.path.isdir(source) and is_saved_dataset_folder(source) else None
        _log_conversion_summary(source if os.path.isdir(source) else None, training_args)
        return dataset, folder
    splits = {data_args.train_split: (data_args.train_annotations, data_args.train_images)}
    if data_args.validation_annotations is not None:
        splits[data_args.validation_split] = (data_args.validation_annotations, data_args.validation_images)
    box_only = ()
    if getattr(data_args, "box_only_annotations", None) is not None:  # label-efficient distillation (data/box_only.py)
        splits[data_args.box_only_split] = (data_args.box_only_annotations, data_args.box_only_images)
        box_only = (data_args.box_only_split,)
    folder = prepared_dataset_folder(data_args, training_args)
    with training_args.main_process_first(desc="preparing the dataset"):
        try:
            dataset = load_or_prepare(splits, folder, strict=data_args.strict_data,
                                      box_mask_iou_threshold=data_args.box_mask_iou_threshold, box_only_splits=box_only)
        except FileExistsError as error:  # the folder holds something else than a prepared dataset
            raise TrainingSetupError(f"prepared_dataset_dir {folder}: exists and holds something else than a prepared "
                                     "dataset, which the conversion would replace. Fix: empty it, or give another "
                                     "--prepared_dataset_dir") from error
    _log_conversion_summary(folder, training_args)  # prepared now or reused: the same summary
    return dataset, folder


def _first(split, count: Optional[int]):
    return split if count is None else split.select(range(min(count, len(split))))


def _require_usable_objects(split, name: str, data_args, dataset_folder: Optional[str]) -> None:
    """A split without one usable (kept, non-crowd) object is an error naming its file and the fix."""
    from ..data import usable_object_count

    if usable_object_count(split) > 0:
        return
    annotations = {data_args.train_split: data_args.train_annotations,
                   data_args.validation_split: data_args.validation_annotations}.get(name)
    source = annotations or dataset_folder or data_args.dataset_name or data_args.dataset_path
    report = os.path.join(dataset_folder, "report.json") if dataset_folder is not None else None
    details = f"; {report} lists every dropped annotation and why" if report and os.path.isfile(report) else ""
    limit_name = "max_train_samples" if name == data_args.train_split else "max_eval_samples"
    limit = getattr(data_args, limit_name)
    more = f", or raise {limit_name} (now {limit})" if limit is not None else ""
    raise TrainingSetupError(
        f"{source}: the {name} split has no usable object ({len(split)} images; every annotation was dropped or is "
        f"a crowd region{details}), so there is nothing to {'train' if name == data_args.train_split else 'evaluate'} on. "
        "Fix: repair the annotations (see the conversion summary above), or lower box_mask_iou_threshold "
        f"(now {data_args.box_mask_iou_threshold}) if boxes and masks disagree{more}"
    )


def build_embedding_readers(dataset_folder, splits, student, teacher, data_args, training_args) -> Dict[str, object]:
    """{split: reader} over the student's (and teacher's) cached embeddings, built once (main process first).

    ``dataset_folder``: the save_to_disk folder (caches default to ``<folder>/embeddings``), or the
    DatasetDict itself when it has none (a Hub dataset: caches default to ``<output_dir>/embeddings``).
    """
    from ..data.embedding_cache import EmbeddingCacheReader, build_embedding_cache, open_embedding_cache

    cache_root = data_args.embedding_cache_dir
    if cache_root is None and not isinstance(dataset_folder, (str, os.PathLike)):
        cache_root = os.path.join(training_args.output_dir, "embeddings")
    caches = []
    for model in [student] + ([teacher] if teacher is not None else []):
        with training_args.main_process_first(desc="caching image embeddings"):
            kwargs = dict(dtype=data_args.embedding_cache_dtype, splits=splits, cache_root=cache_root)
            if training_args.local_process_index == 0:  # computes (or reuses) the cache; the others then open it
                cache = build_embedding_cache(dataset_folder, model, device=training_args.device,
                                              progress=not training_args.disable_tqdm, **kwargs)
            else:
                cache = open_embedding_cache(dataset_folder, model, **kwargs)
        caches.append(cache)
    return {split: EmbeddingCacheReader(caches, split) for split in splits}


def build_datasets(dataset, dataset_folder, data_args, training_args, student, teacher=None, use_cache=False):
    """(train_dataset, eval_dataset or None, readers or None) for EfficientSamTrainer."""
    from ..data import EfficientSamTrainingDataset

    config = student.config
    if data_args.image_size is not None and data_args.image_size != config.image_size:
        raise TrainingSetupError(f"image_size / target_size {data_args.image_size} differs from the model's input size "
                                 f"{config.image_size}. Fix: leave image_size out; the architecture (config.json) decides it")
    if data_args.train_split not in dataset:
        raise TrainingSetupError(f"the dataset has no split {data_args.train_split!r} (has {list(dataset)}). "
                                 "Fix: set train_split to one of them")
    has_validation = data_args.validation_split in dataset
    splits = [data_args.train_split] + ([data_args.validation_split] if has_validation else [])
    box_only = getattr(data_args, "box_only_annotations", None) is not None
    if box_only:
        if teacher is None:
            raise TrainingSetupError("box_only_annotations: box-only images are supervised by the teacher alone. "
                                     "Fix: give teacher_model_name_or_path, or leave box_only_annotations out")
        splits.append(data_args.box_only_split)
    # Before anything is cached or trained: the (selected) splits must hold something to learn from.
    train_split = _first(dataset[data_args.train_split], data_args.max_train_samples)
    eval_split = _first(dataset[data_args.validation_split], data_args.max_eval_samples) if has_validation else None
    for name, split in ((data_args.train_split, train_split), (data_args.validation_split, eval_split)):
        if split is not None:
            _require_usable_objects(split, name, data_args, dataset_folder)
    source = dataset_folder if dataset_folder is not None else dataset
    readers = build_embedding_readers(source, splits, student, teacher, data_args, training_args) if use_cache else {}

    common = dict(image_size=config.image_size, mask_size=config.low_res_mask_size, seed=training_args.data_seed or training_args.seed)
    train_dataset = EfficientSamTrainingDataset(
        train_split, max_objects=data_args.max_objects, box_noise_scale=data_args.box_noise_scale,
        prompt_mode=data_args.prompt_mode, num_positive_points=data_args.num_positive_points,
        num_negative_points=data_args.num_negative_points, point_probability=data_args.point_probability,
        embedding_reader=readers.get(data_args.train_split), **common,
    )
    if box_only:  # labelled images first, then the box-only ones (has_mask False: distillation terms only)
        from ..data.box_only import EfficientSamMixedTrainingDataset

        train_dataset = EfficientSamMixedTrainingDataset(train_dataset, EfficientSamTrainingDataset(
            dataset[data_args.box_only_split], max_objects=data_args.max_objects, box_noise_scale=data_args.box_noise_scale,
            embedding_reader=readers.get(data_args.box_only_split), **common))
    eval_dataset = None
    if has_validation:
        # Evaluation is deterministic: box prompts without jitter, every object (or the first eval_max_objects).
        eval_dataset = EfficientSamTrainingDataset(
            eval_split, max_objects=data_args.eval_max_objects, box_noise_scale=0.0, prompt_mode="box",
            embedding_reader=readers.get(data_args.validation_split), **common,
        )
    return train_dataset, eval_dataset, readers


def dataset_summary(dataset, data_args) -> dict:
    """Name, per-split image and object counts, categories, evaluation split and, for a Hub dataset, its id
    and revision (``hub_id``, ``revision``) of the run's data (for the model card)."""
    splits = {}
    for name, split in dataset.items():
        splits[name] = {"images": len(split), "instances": int(sum(len(o) for o in split["objects"]))}
    extra = {"evaluation_split": data_args.validation_split} if data_args.validation_split in dataset else {}
    if data_args.dataset_name is not None and not os.path.isdir(data_args.dataset_name):
        return {"name": data_args.dataset_name, "hub_id": data_args.dataset_name, "revision": data_args.dataset_revision,
                "splits": splits, "categories": category_names(dataset[data_args.train_split]), **extra}
    if (data_args.dataset_name or data_args.dataset_path) is not None:
        root = os.path.abspath(data_args.dataset_name or data_args.dataset_path)
    else:  # the folder holding the splits, e.g. data/pcb for data/pcb/{train,valid}/...
        files = [data_args.train_annotations] + ([data_args.validation_annotations] if data_args.validation_annotations else [])
        root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
        if len(files) == 1:
            root = os.path.dirname(root)
    return {"name": os.path.basename(root) or "custom",
            "splits": splits, "categories": category_names(dataset[data_args.train_split]), **extra}
