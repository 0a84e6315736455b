#!/usr/bin/env python
"""Fine-tune EfficientSAM on COCO data with box prompts, optionally distilling a larger EfficientSAM.

    accelerate launch train.py recipes/quickstart.yaml [--key value ...]
    accelerate launch train.py --config my_guide_config.json --output_dir outputs/run   # the original guide's config
    accelerate launch train.py RECIPE --resume_from_checkpoint last                     # continue an interrupted run

Parse the recipe -> build the student, teacher, processor and datasets -> train -> evaluate -> save
the model, its processor and model card -> push to the Hub when asked. The builders are in
modeling_efficientsam/training/ (model_building.py, dataset_building.py); the arguments are listed
by `python train.py --help` and documented in modeling_efficientsam/training/arguments.py.
"""

from __future__ import annotations

import logging
import os
import sys

import transformers
from transformers import HfArgumentParser
from transformers.trainer_utils import set_seed

from modeling_efficientsam.training import EfficientSamTrainer, TensorBoardOverlayCallback, parse_efficientsam_args, save_decoder_only
from modeling_efficientsam.training.arguments import ARGUMENT_CLASSES
from modeling_efficientsam.training.dataset_building import build_datasets, category_names, dataset_summary, prepare_dataset
from modeling_efficientsam.training.evaluation import adjust_evaluation_arguments
from modeling_efficientsam.training.model_building import build_processor, build_student, build_teacher
from modeling_efficientsam.training.model_card import card_context

logger = logging.getLogger("train")


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        HfArgumentParser(ARGUMENT_CLASSES).print_help()
        return {}
    model_args, data_args, training_args = parse_efficientsam_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
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
    dataset, dataset_folder = prepare_dataset(data_args, training_args)
    use_cache = model_args.freeze_vision_encoder and data_args.cache_embeddings
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
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="EfficientSAM fine-tuned with modeling_efficientsam")
    trainer.end()  # closes trackers and tears the process group down
    return metrics


if __name__ == "__main__":
    main()
