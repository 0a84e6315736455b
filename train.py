#!/usr/bin/env python
"""Fine-tune EfficientSAM on COCO data with box prompts, optionally distilling a larger EfficientSAM.

    accelerate launch train.py recipes/quickstart.yaml [--key value ...]
    accelerate launch train.py --config my_guide_config.json --output_dir outputs/run   # the original guide's config
    accelerate launch train.py RECIPE --resume_from_checkpoint last                     # continue an interrupted run

Steps: parse the recipe -> load (or convert) the student and teacher -> prepare the COCO data (and
the embedding cache when the encoder is frozen) -> EfficientSamTrainer -> save a from_pretrained
folder with its processor and model card -> push to the Hub when asked. Arguments: see
modeling_efficientsam/training/arguments.py or `python train.py --help`.
"""

from __future__ import annotations

import json
import logging
import os
import sys

logger = logging.getLogger("train")

ORIGINAL_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pt.zip")


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
def resolve_model_source(source: str, converted_models_dir: str, training_args) -> str:
    """A transformers folder / Hub id as is; an original .pt checkpoint converted once (main process first)."""
    if not source.endswith(ORIGINAL_CHECKPOINT_SUFFIXES):
        return source
    from modeling_efficientsam.convert_efficientsam_to_hf import convert

    name = os.path.basename(source)
    for suffix in ORIGINAL_CHECKPOINT_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    # efficient_sam_vitt.pt -> <converted_models_dir>/efficientsam-vitt (the folder the recipes name)
    target = os.path.join(converted_models_dir, name.replace("efficient_sam", "efficientsam").replace("_", "-"))
    with training_args.main_process_first(desc=f"converting {source}"):
        if not os.path.isfile(os.path.join(target, "config.json")):
            logger.info("converting the original checkpoint %s into %s", source, target)
            convert(source, target)
    return target


def load_pretrained(source: str, revision: str = "main", attn_implementation=None):
    from modeling_efficientsam import EfficientSamModel

    kwargs = {"revision": revision}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return EfficientSamModel.from_pretrained(source, **kwargs)


def build_student(model_args, training_args):
    """The student model (frozen parts set) and a short description of where it came from."""
    from modeling_efficientsam import EfficientSamConfig, EfficientSamModel

    if model_args.model_name_or_path is not None:
        source = resolve_model_source(model_args.model_name_or_path, model_args.converted_models_dir, training_args)
        model = load_pretrained(source, model_args.model_revision, model_args.attn_implementation)
        origin = model_args.model_name_or_path
    else:
        if model_args.model_variant is not None:
            config = EfficientSamConfig.from_variant(model_args.model_variant)
            origin = f"random initialization ({model_args.model_variant})"
        else:
            spec = model_args.model_config
            if isinstance(spec, str):
                with open(spec, encoding="utf-8") as handle:
                    spec = json.load(handle)
            config = EfficientSamConfig(**{k: v for k, v in spec.items() if k not in ("model_type", "architectures", "auto_map")})
            origin = "random initialization (custom config)"
        kwargs = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
        model = EfficientSamModel._from_config(config, **kwargs)
    model.vision_encoder.requires_grad_(not model_args.freeze_vision_encoder)
    model.prompt_encoder.requires_grad_(not model_args.freeze_prompt_encoder)
    return model, origin


def build_teacher(model_args, training_args):
    if model_args.teacher_model_name_or_path is None:
        return None
    source = resolve_model_source(model_args.teacher_model_name_or_path, model_args.converted_models_dir, training_args)
    teacher = load_pretrained(source, model_args.teacher_revision, model_args.attn_implementation)
    teacher.requires_grad_(False)
    return teacher.eval()


def build_processor(model_args, model):
    from modeling_efficientsam import EfficientSamImageProcessor, EfficientSamProcessor

    source = model_args.model_name_or_path
    if source is not None and os.path.isdir(source):
        try:
            return EfficientSamProcessor.from_pretrained(source)
        except (OSError, ValueError):
            logger.info("%s has no processor config; using the default one for size %d", source, model.config.image_size)
    return EfficientSamProcessor(EfficientSamImageProcessor(size=model.config.image_size))


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def prepare_dataset(data_args, training_args):
    """(DatasetDict, its folder): the prepared folder, or the COCO files converted (and reused while unchanged)."""
    import datasets

    from modeling_efficientsam.data import load_or_prepare

    if data_args.dataset_path is not None:
        return datasets.load_from_disk(data_args.dataset_path), data_args.dataset_path
    splits = {data_args.train_split: (data_args.train_annotations, data_args.train_images)}
    if data_args.validation_annotations is not None:
        splits[data_args.validation_split] = (data_args.validation_annotations, data_args.validation_images)
    folder = data_args.prepared_dataset_dir or os.path.join(training_args.output_dir, "prepared_dataset")
    with training_args.main_process_first(desc="preparing the dataset"):
        dataset = load_or_prepare(splits, folder, strict=data_args.strict_data,
                                  box_mask_iou_threshold=data_args.box_mask_iou_threshold)
    return dataset, folder


def category_names(split) -> list:
    objects = split.features["objects"]
    inner = getattr(objects, "feature", objects)
    if isinstance(inner, (list, tuple)):
        inner = inner[0]
    return list(inner["category"].names)


def build_embedding_readers(dataset_folder, splits, student, teacher, data_args, training_args):
    """{split: reader} over the student's (and teacher's) cached embeddings, built once (main process first)."""
    from modeling_efficientsam.data.embedding_cache import build_embedding_cache, embedding_reader, open_embedding_cache

    caches = []
    for model in [student] + ([teacher] if teacher is not None else []):
        with training_args.main_process_first(desc="caching image embeddings"):
            kwargs = dict(dtype=data_args.embedding_cache_dtype, splits=splits, cache_root=data_args.embedding_cache_dir)
            if training_args.local_process_index == 0:  # computes (or reuses) the cache; the others then open it
                cache = build_embedding_cache(dataset_folder, model, device=training_args.device, **kwargs)
            else:
                cache = open_embedding_cache(dataset_folder, model, **kwargs)
        caches.append(cache)
    return {split: embedding_reader(caches, split) for split in splits}


def build_datasets(dataset, dataset_folder, data_args, training_args, student, teacher=None, use_cache=False):
    """(train_dataset, eval_dataset or None, readers or None) for EfficientSamTrainer."""
    from modeling_efficientsam.data import EfficientSamTrainingDataset

    config = student.config
    if data_args.image_size is not None and data_args.image_size != config.image_size:
        raise ValueError(f"image_size / target_size {data_args.image_size} differs from the model's input size "
                         f"{config.image_size}; the architecture (config.json) decides it")
    if data_args.train_split not in dataset:
        raise ValueError(f"the dataset has no split {data_args.train_split!r} (has {list(dataset)})")
    has_validation = data_args.validation_split in dataset
    splits = [data_args.train_split] + ([data_args.validation_split] if has_validation else [])
    readers = build_embedding_readers(dataset_folder, splits, student, teacher, data_args, training_args) if use_cache else {}

    train_split = dataset[data_args.train_split]
    if data_args.max_train_samples is not None:
        train_split = train_split.select(range(min(data_args.max_train_samples, len(train_split))))
    common = dict(image_size=config.image_size, mask_size=config.low_res_mask_size, seed=training_args.data_seed or training_args.seed)
    train_dataset = EfficientSamTrainingDataset(
        train_split, max_objects=data_args.max_objects, box_noise_scale=data_args.box_noise_scale,
        prompt_mode=data_args.prompt_mode, num_positive_points=data_args.num_positive_points,
        num_negative_points=data_args.num_negative_points, point_probability=data_args.point_probability,
        embedding_reader=readers.get(data_args.train_split), **common,
    )
    eval_dataset = None
    if has_validation:
        eval_split = dataset[data_args.validation_split]
        if data_args.max_eval_samples is not None:
            eval_split = eval_split.select(range(min(data_args.max_eval_samples, len(eval_split))))
        # Evaluation is deterministic: box prompts without jitter, every object (or the first eval_max_objects).
        eval_dataset = EfficientSamTrainingDataset(
            eval_split, max_objects=data_args.eval_max_objects, box_noise_scale=0.0, prompt_mode="box",
            embedding_reader=readers.get(data_args.validation_split), **common,
        )
    return train_dataset, eval_dataset, readers


def dataset_summary(dataset, data_args) -> dict:
    splits = {}
    for name, split in dataset.items():
        splits[name] = {"images": len(split), "instances": int(sum(len(o) for o in split["objects"]))}
    if data_args.dataset_path is not None:
        root = os.path.abspath(data_args.dataset_path)
    else:  # the folder holding the splits, e.g. data/pcb for data/pcb/{train,valid}/...
        files = [data_args.train_annotations] + ([data_args.validation_annotations] if data_args.validation_annotations else [])
        root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
        if len(files) == 1:
            root = os.path.dirname(root)
    return {"name": os.path.basename(root) or "custom",
            "splits": splits, "categories": category_names(dataset[data_args.train_split])}


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    import transformers
    from transformers.trainer_utils import set_seed

    from modeling_efficientsam.training import (
        EfficientSamTrainer,
        TensorBoardOverlayCallback,
        non_default_arguments,
        parse_efficientsam_args,
        save_decoder_only,
    )
    from modeling_efficientsam.training.trainer import INITIAL_METRICS_FILE

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        from transformers import HfArgumentParser

        from modeling_efficientsam.training.arguments import ARGUMENT_CLASSES

        HfArgumentParser(ARGUMENT_CLASSES).print_help()
        return {}
    model_args, data_args, training_args = parse_efficientsam_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(logging.INFO if training_args.should_log else log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info("process %d of %d on %s", training_args.process_index, training_args.world_size, training_args.device)

    set_seed(training_args.seed)
    student, origin = build_student(model_args, training_args)
    teacher = build_teacher(model_args, training_args)
    processor = build_processor(model_args, student)
    dataset, dataset_folder = prepare_dataset(data_args, training_args)
    use_cache = model_args.freeze_vision_encoder and data_args.cache_embeddings
    train_dataset, eval_dataset, _ = build_datasets(dataset, dataset_folder, data_args, training_args, student, teacher, use_cache)
    id2label = dict(enumerate(category_names(dataset[data_args.train_split])))
    logger.info("student from %s: %s trainable of %s parameters; training from %s", origin,
                f"{sum(p.numel() for p in student.parameters() if p.requires_grad):,}", f"{student.num_parameters():,}",
                "cached embeddings" if use_cache else "pixels")

    if eval_dataset is None:
        training_args.eval_strategy = "no"
        training_args.load_best_model_at_end = False
        training_args.eval_on_start = False
    resume = training_args.resume_from_checkpoint
    if resume and os.path.isfile(os.path.join(training_args.output_dir, INITIAL_METRICS_FILE)):
        training_args.eval_on_start = False  # the "before" metrics were measured by the interrupted run

    trainer = EfficientSamTrainer(
        model=student, args=training_args, teacher_model=teacher, train_dataset=train_dataset,
        eval_dataset=eval_dataset, processing_class=processor, id2label=id2label,
    )
    report_to = training_args.report_to or []
    if eval_dataset is not None and data_args.num_overlay_images > 0 and "tensorboard" in report_to:
        TensorBoardOverlayCallback(
            dataset[data_args.validation_split], image_size=student.config.image_size,
            mask_size=student.config.low_res_mask_size, num_images=data_args.num_overlay_images,
            max_objects=data_args.eval_max_objects,
        ).attach(trainer)
    trainer.card_context = {
        "base_model": model_args.model_name_or_path,
        "teacher_model": model_args.teacher_model_name_or_path,
        "model_args": model_args, "data_args": data_args,
        "recipe": non_default_arguments(model_args, data_args, training_args),
        "dataset_summary": dataset_summary(dataset, data_args),
    }

    if resume:
        logger.info("resuming from %s", resume)
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.card_context["train_runtime"] = train_result.metrics.get("train_runtime")
    trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    metrics = {}
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    trainer.save_state()
    if training_args.save_decoder_only and trainer.is_world_process_zero():
        save_decoder_only(trainer.model, os.path.join(training_args.output_dir, "decoder"), base_model=model_args.model_name_or_path)
    trainer.create_model_card()
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="EfficientSAM fine-tuned with modeling_efficientsam")
    trainer.end()  # closes trackers and tears the process group down
    return metrics


if __name__ == "__main__":
    main()
