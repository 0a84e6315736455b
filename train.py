#!/usr/bin/env python
"""Fine-tune EfficientSAM on COCO data with box prompts, optionally distilling a larger EfficientSAM.

    accelerate launch train.py recipes/quickstart.yaml [--key value ...]
    accelerate launch train.py --config my_guide_config.json --output_dir outputs/run   # the original guide's config
    accelerate launch train.py RECIPE --resume_from_checkpoint last                     # continue an interrupted run

Parse the recipe -> check output_dir -> build the student, teacher, processor and datasets -> train
-> evaluate -> save the model, its processor and model card -> push to the Hub when asked. The
builders are in modeling_efficientsam/training/ (model_building.py, dataset_building.py); the
arguments are listed by `python train.py --help` and documented in
modeling_efficientsam/training/arguments.py.

A problem the user fixes (a missing or malformed recipe, an unknown or out-of-range argument, nothing
to resume from, a model that does not load, data without a usable object, an output_dir that is not
writable or holds an earlier run, a full disk) ends the run with one line, `error: ...`, naming the
file or folder and the fix, and exit status 2. The output folder is checked before any expensive work.
"""

from __future__ import annotations

import logging
import os
import sys

import transformers
from transformers.trainer_utils import set_seed

from modeling_efficientsam.data import CocoValidationError
from modeling_efficientsam.demo.space import write_space_app
from modeling_efficientsam.training import EfficientSamTrainer, TensorBoardOverlayCallback, parse_efficientsam_args, save_decoder_only
from modeling_efficientsam.training.argument_parsing import argument_parser
from modeling_efficientsam.training.dataset_building import (
    build_datasets,
    category_names,
    dataset_summary,
    prepare_dataset,
    prepared_dataset_folder,
)
from modeling_efficientsam.training.evaluation import adjust_evaluation_arguments
from modeling_efficientsam.training.model_building import build_processor, build_student, build_teacher
from modeling_efficientsam.training.model_card import card_context
from modeling_efficientsam.training.run_checks import TrainingSetupError, check_output_dir, writing_to

logger = logging.getLogger("train")


# Errors whose message already names the file and the fix: printed as one line, exit status 2.
USER_ERRORS = (TrainingSetupError, CocoValidationError)


def main(argv=None) -> dict:
    """Run train.py's command line; a user error prints `error: ...` on stderr and exits with status 2."""
    try:
        return run(argv)
    except USER_ERRORS as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def run(argv=None) -> dict:
    """Train as the command line says; returns the final evaluation metrics. Raises the errors of ``USER_ERRORS``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        argument_parser().print_help()
        return {}
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    model_args, data_args, training_args = parse_efficientsam_args(argv)
    check_output_dir(training_args)  # before any expensive work: writable, and no earlier run overwritten unasked
    log_level = training_args.get_process_log_level()
    for name in ("train", "modeling_efficientsam"):
        logging.getLogger(name).setLevel(logging.INFO if training_args.should_log else log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info("process %d of %d on %s", training_args.process_index, training_args.world_size, training_args.device)

    # Models and data
    set_seed(training_args.seed)
    student, origin = build_student(model_args, training_args)
    teacher = build_teacher(model_args, training_args)
    processor = build_processor(model_args, student)
    with writing_to(prepared_dataset_folder(data_args, training_args), "prepared_dataset_dir", "preparing the dataset"):
        dataset, dataset_folder = prepare_dataset(data_args, training_args)
    use_cache = model_args.freeze_vision_encoder and data_args.cache_embeddings
    cache_dir = data_args.embedding_cache_dir or os.path.join(dataset_folder or training_args.output_dir, "embeddings")
    with writing_to(cache_dir, "embedding_cache_dir", "caching image embeddings"):
        train_dataset, eval_dataset, _ = build_datasets(dataset, dataset_folder, data_args, training_args, student, teacher, use_cache)
    logger.info("student from %s: %s trainable of %s parameters; training from %s", origin,
                f"{sum(p.numel() for p in student.parameters() if p.requires_grad):,}", f"{student.num_parameters():,}",
                "cached embeddings" if use_cache else "pixels")

    # Trainer
    adjust_evaluation_arguments(training_args, has_validation=eval_dataset is not None)
    trainer = EfficientSamTrainer(
        model=student, args=training_args, teacher_model=teacher, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=processor, id2label=dict(enumerate(category_names(dataset[data_args.train_split]))),
    )
    if eval_dataset is not None and data_args.num_overlay_images > 0 and "tensorboard" in (training_args.report_to or []):
        TensorBoardOverlayCallback(
            dataset[data_args.validation_split], image_size=student.config.image_size,
            mask_size=student.config.low_res_mask_size, num_images=data_args.num_overlay_images,
            max_objects=data_args.eval_max_objects,
        ).attach(trainer)
    trainer.card_context = card_context(model_args, data_args, training_args, dataset_summary(dataset, data_args))

    with writing_to(training_args.output_dir, "output_dir", "training, checkpointing and saving"):
        return _train_and_save(trainer, model_args, training_args, eval_dataset)


def _train_and_save(trainer, model_args, training_args, eval_dataset) -> dict:
    # Train
    if training_args.resume_from_checkpoint:
        logger.info("resuming from %s", training_args.resume_from_checkpoint)
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.card_context["train_runtime"] = train_result.metrics.get("train_runtime")
    trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)

    # Evaluate
    metrics = {}
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    trainer.save_state()

    # Save and push
    if training_args.save_decoder_only and trainer.is_world_process_zero():
        save_decoder_only(trainer.model, os.path.join(training_args.output_dir, "decoder"), base_model=model_args.model_name_or_path)
    trainer.create_model_card()
    if training_args.push_demo_app and trainer.is_world_process_zero():
        write_space_app(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="EfficientSAM fine-tuned with modeling_efficientsam")
    trainer.end()  # closes trackers and tears the process group down
    return metrics


if __name__ == "__main__":
    main()
