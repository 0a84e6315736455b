"""``EfficientSamTrainer``: the training step of box-prompted EfficientSAM fine-tuning, with optional distillation.

What the trainer adds to ``transformers.Trainer``:

* **Loss terms**: the ground-truth terms of :func:`~.losses.segmentation_loss` and, with a frozen
  teacher (placed for the launch configuration by :func:`~.teacher_placement.prepare_teacher`:
  ``accelerator.prepare_model(teacher, evaluation_mode=True)``, then moved to the device where
  Accelerate does not place it, or DeepSpeed's dtype / ZeRO-3 engine), the terms of
  :mod:`.distillation`. The teacher runs its own encoder on the batch's pixels (or reads its own
  cached ``teacher_image_embeddings``) and its own decoder on exactly the student's prompts.
  Temperature, alpha (ground truth) and beta (distillation) follow one
  :class:`~.schedules.DistillationSchedule`, built when training starts, at ``state.global_step``.
* **Combination**: the loss-weighting module (:mod:`.weighting`: ``fixed``, ``dwa`` or
  ``uncertainty``) sums the named terms, ground-truth terms scaled by alpha and distillation terms
  by beta. Each term, each weight, T, alpha and beta are logged at every logging step.
* **Prediction step**: deterministic prompts, the ground-truth loss at the configured weights, and
  per-query statistics for :mod:`.evaluation`, which computes the metrics.

Optimizers and learning-rate schedules come from :mod:`.optimization`, the checkpointed loss-weighting
state from :mod:`.weighting_checkpoint`, the model card from :mod:`.model_card`.

Normalization (exact under gradient accumulation and data parallelism)
-----------------------------------------------------------------------
``get_batch_samples`` fetches the micro-batches of one optimizer step and counts their real
queries (``query_mask``) and images; the counts are summed over processes with an all-reduce, giving
``N_q`` and ``N_img`` for the whole step. Every per-query term of a micro-batch is the SUM over its
real queries divided by ``N_q`` (the image-embedding term: sum over images / ``N_img``), so the
micro-batch losses of one process add up to that process's share of the step's global mean. DDP
(and DeepSpeed, FSDP) *average* gradients over the P processes, so the loss handed to ``backward``
is multiplied by P; the averaged gradient is then exactly the gradient of the global mean over all
real queries of the step, however they are split into micro-batches and processes
(``loss_is_scaled_for_ga = True``: the Trainer must not divide by the accumulation steps again).
The learned log-variances of ``uncertainty`` weighting live outside the DDP module: their
regularizer is added in proportion to the micro-batch's share of the step's queries and their
gradients are averaged across processes by hand before the optimizer step.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any, Dict, Optional

import torch
import transformers
from transformers import Trainer

from ..data.collator import EfficientSamCollator
from ..hub_usage import MINIMUM_VERSIONS
from .checkpoints import BestAndNewestRotation
from .distillation import (
    attention_distillation_loss,
    check_teacher_compatibility,
    feature_distillation_loss,
    image_embedding_distillation_loss,
    mask_distillation_loss,
)
from .evaluation import PromptDependenceCallback, SegmentationMetrics, query_statistics, save_initial_metrics, wrong_box_points
from .losses import GROUND_TRUTH_TERMS, segmentation_loss, step_normalizers
from .optimization import add_loss_weighting_parameters, create_lr_scheduler, optimizer_class_and_kwargs
from .schedules import DistillationSchedule
from .teacher_placement import prepare_teacher
from .weighting import FixedLossWeighting, build_loss_weighting
from .weighting_checkpoint import load_loss_weighting_state, save_loss_weighting_state

__all__ = ["EfficientSamTrainer"]

# Temperature, alpha and beta of a run without a teacher: ground-truth terms only.
NO_DISTILLATION = {"temperature": 1.0, "alpha": 1.0, "beta": 0.0}


def check_trainer_support() -> None:
    """Raise if this transformers' Trainer would not take `compute_loss`'s normalization as it is.

    Before `Trainer.loss_is_scaled_for_ga` existed (transformers 5.19), the Trainer divided every
    loss by the gradient accumulation steps itself: with accumulation, EfficientSAM's loss (already
    a mean over the step's queries) would be divided twice and training would silently use gradients
    that are too small. setup.cfg asks for a newer transformers (`MINIMUM_VERSIONS`); this guards
    installs that went around it.
    """
    if not hasattr(Trainer, "loss_is_scaled_for_ga"):
        raise ImportError(
            f"transformers {transformers.__version__} is too old for EfficientSamTrainer: its Trainer would divide the "
            "loss by the gradient accumulation steps a second time. "
            f"Upgrade: pip install -U 'transformers>={MINIMUM_VERSIONS['transformers']}'"
        )


class EfficientSamTrainer(BestAndNewestRotation, Trainer):
    """Trainer for EfficientSAM with box prompts and optional knowledge distillation.

    Args:
        model: the student ``EfficientSamModel`` (frozen parts already have ``requires_grad=False``).
        args: ``EfficientSamTrainingArguments``.
        teacher_model: optional frozen teacher ``EfficientSamModel``.
        id2label: category index -> name, for the per-category metrics.
        data_collator: defaults to :class:`EfficientSamCollator`.
        Other keyword arguments go to ``transformers.Trainer``.
    """

    # compute_loss normalizes by the step's global query count itself (see the module docstring).
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args=None, teacher_model=None, id2label: Optional[Dict[int, str]] = None,
                 data_collator=None, **kwargs):
        check_trainer_support()
        kwargs.setdefault("compute_metrics", SegmentationMetrics(id2label))
        # Trainer treats any ProcessorMixin as holding a tokenizer; hand it the image processor and save
        # the full processor ourselves (see _save).
        self.processor = None
        processing_class = kwargs.get("processing_class")
        if processing_class is not None and hasattr(processing_class, "image_processor") and not hasattr(processing_class, "tokenizer"):
            self.processor = processing_class
            kwargs["processing_class"] = processing_class.image_processor
        super().__init__(model=model, args=args, data_collator=data_collator or EfficientSamCollator(), **kwargs)
        # The model's forward takes no loss arguments: never hand it num_items_in_batch.
        self.model_accepts_loss_kwargs = False
        self.initial_metrics: Optional[Dict[str, float]] = None
        # Every evaluation also asks each question with a wrong box; warns when the model ignores its prompts.
        self.prompt_dependence = PromptDependenceCallback()
        self.add_callback(self.prompt_dependence)
        # Optimizer steps per epoch: Trainer.set_initial_training_values computes it when training starts.
        self.steps_per_epoch: Optional[int] = None

        self.teacher = None
        student = self.accelerator.unwrap_model(self.model)
        if teacher_model is not None:
            check_teacher_compatibility(student.config, teacher_model.config,
                                        feature_distillation=self.args.feature_distillation,
                                        attention_distillation=self.args.attention_distillation)
            self.teacher = prepare_teacher(teacher_model, self.accelerator)  # frozen, eval mode, on the device
        if self.teacher is None and getattr(self.train_dataset, "box_only", None) is not None:
            raise ValueError("box-only training data (no masks) is supervised by the teacher alone: give a teacher "
                             "(teacher_model_name_or_path) or leave the box-only data out")
        # Until training starts and the run's length is known, the schedule of a one-step run.
        self.distillation_schedule = self._build_distillation_schedule(total_steps=1, steps_per_epoch=1)

        self.student_encoder_trained = any(p.requires_grad for p in student.vision_encoder.parameters())
        weights = self.configured_term_weights()
        self.loss_weighting = build_loss_weighting(
            self.args.loss_weighting, weights=weights, dwa_temperature=self.args.dwa_temperature,
            smoothing_factor=self.args.smoothing_factor, adaptive_update_freq=self.args.adaptive_update_freq,
        ).to(self.args.device)
        # The evaluation loss: ground-truth terms at their configured weights (no adaptation, no alpha).
        self.evaluation_weighting = FixedLossWeighting(
            {name: weights[name] for name in GROUND_TRUTH_TERMS}).to(self.args.device)
        self._step_terms: Dict[str, torch.Tensor] = {}
        self._log_sums: Dict[str, float] = defaultdict(float)
        self._log_count = 0
        self._zero_weighting_grads = False

        from .callbacks import DatasetEpochCallback

        self.add_callback(DatasetEpochCallback(self))

    # ---- Set-up: term weights, run length, distillation schedule
    def configured_term_weights(self) -> Dict[str, float]:
        """The weight the arguments give each loss term of this run (the terms the run computes)."""
        args = self.args
        weights = {
            "focal_loss": args.focal_weight, "dice_loss": args.dice_weight, "iou_loss": args.iou_weight,
            "boundary_loss": args.boundary_weight, "iou_head_loss": args.iou_head_weight,
        }
        if self.teacher is not None:
            weights.update(mask_kd_loss=args.mask_kd_weight, iou_kd_loss=args.iou_kd_weight)
            if args.feature_distillation:
                weights.update(token_feature_loss=args.feature_distillation_weight,
                               upscaled_feature_loss=args.feature_distillation_weight)
                if self.student_encoder_trained:
                    weights["embedding_kd_loss"] = args.embedding_distillation_weight
            if args.attention_distillation:
                weights["attention_kd_loss"] = args.attention_distillation_weight
        return weights

    def _build_distillation_schedule(self, total_steps: int, steps_per_epoch: int) -> Optional[DistillationSchedule]:
        if self.teacher is None:
            return None
        return DistillationSchedule.from_training_arguments(
            self.args, total_steps=max(1, int(total_steps)), steps_per_epoch=max(1, int(steps_per_epoch)))

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        # The one place where the run's length is read: (epochs, steps per epoch, ..., max_steps).
        self.steps_per_epoch = int(values[1])
        self.distillation_schedule = self._build_distillation_schedule(total_steps=values[-1],
                                                                       steps_per_epoch=self.steps_per_epoch)
        return values

    def schedule_state(self, step: Optional[int] = None) -> Dict[str, float]:
        """``temperature``, ``alpha``, ``beta`` at ``step`` (default: the current optimizer step)."""
        if self.distillation_schedule is None:
            return dict(NO_DISTILLATION)
        return self.distillation_schedule.state_at(self.state.global_step if step is None else step)

    # ---- Optimizer and learning-rate schedule (built by .optimization)
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            # fused Adam on the training device, unless FSDP manages the parameters (its sharded
            # parameters are left to the default implementation)
            device_type = None if self.is_fsdp_enabled else self.args.device.type
            choice = optimizer_class_and_kwargs(self.args, device_type)
            if choice is not None:
                self.optimizer_cls_and_kwargs = choice
            super().create_optimizer(model)
            add_loss_weighting_parameters(self.optimizer, self.loss_weighting)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = create_lr_scheduler(
                self.optimizer if optimizer is None else optimizer, self.args,
                num_training_steps=num_training_steps, steps_per_epoch=self.steps_per_epoch,
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    # ---- Normalizers: real queries and images of a whole optimizer step, over all processes (.losses)
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples = list(itertools.islice(epoch_iterator, num_batches))
        if not batch_samples:
            return batch_samples, None
        reduce = (lambda counts: self.accelerator.reduce(counts, reduction="sum")) if self.accelerator.num_processes > 1 else None
        return batch_samples, step_normalizers(batch_samples, device=device, all_reduce_sum=reduce)

    # ---- Forward passes and loss terms
    def _needs(self):
        distil = self.teacher is not None
        hidden = distil and self.args.feature_distillation
        attentions = distil and self.args.attention_distillation
        return hidden, attentions

    @staticmethod
    def _image_inputs(inputs: Dict[str, Any], teacher: bool) -> Dict[str, torch.Tensor]:
        if teacher and "teacher_image_embeddings" in inputs:
            return {"image_embeddings": inputs["teacher_image_embeddings"]}
        if "pixel_values" in inputs:
            return {"pixel_values": inputs["pixel_values"]}
        if teacher:
            raise ValueError("the batch has neither pixel_values nor teacher_image_embeddings for the teacher")
        if "image_embeddings" not in inputs:
            raise ValueError("the batch has neither pixel_values nor image_embeddings")
        return {"image_embeddings": inputs["image_embeddings"]}

    def _run(self, model, inputs, teacher: bool, hidden: bool, attentions: bool):
        return model(
            **self._image_inputs(inputs, teacher),
            input_points=inputs["input_points"],
            input_labels=inputs["input_labels"],
            multimask_output=True,
            output_attentions=attentions,
            output_hidden_states=hidden,
        )

    def _ground_truth_terms(self, outputs, inputs, num_queries) -> Dict[str, torch.Tensor]:
        """The ground-truth terms over the queries with a mask (box-only queries, ``has_mask`` False, are
        left out); ``num_queries``: the normalizer, the number of such queries (local count when None)."""
        args = self.args
        query_mask = inputs["query_mask"] & inputs["has_mask"] if "has_mask" in inputs else inputs["query_mask"]
        result = segmentation_loss(
            pred_masks=outputs.pred_masks, iou_scores=outputs.iou_scores, labels=inputs["labels"],
            query_mask=query_mask, num_queries=num_queries,
            focal_weight=args.focal_weight, dice_weight=args.dice_weight, iou_weight=args.iou_weight,
            boundary_weight=args.boundary_weight, iou_head_weight=args.iou_head_weight,
            focal_alpha=args.focal_alpha, focal_gamma=args.focal_gamma, boundary_band_width=args.boundary_band_width,
        )
        return {name: result[name] for name in GROUND_TRUTH_TERMS}

    def _distillation_terms(self, student, teacher, inputs, num_queries, num_images, temperature) -> Dict[str, torch.Tensor]:
        query_mask = inputs["query_mask"]
        terms = mask_distillation_loss(
            student_masks=student.pred_masks, teacher_masks=teacher.pred_masks, query_mask=query_mask,
            num_queries=num_queries, temperature=temperature,
            student_iou_scores=student.iou_scores, teacher_iou_scores=teacher.iou_scores,
        )
        if self.args.feature_distillation:
            terms["token_feature_loss"] = feature_distillation_loss(
                student_features=student.mask_decoder_output_tokens, teacher_features=teacher.mask_decoder_output_tokens,
                query_mask=query_mask, num_queries=num_queries)
            terms["upscaled_feature_loss"] = feature_distillation_loss(
                student_features=student.upscaled_embeddings, teacher_features=teacher.upscaled_embeddings,
                query_mask=query_mask, num_queries=num_queries)
            if self.student_encoder_trained:
                terms["embedding_kd_loss"] = image_embedding_distillation_loss(
                    student_embeddings=student.image_embeddings, teacher_embeddings=teacher.image_embeddings,
                    num_images=num_images)
        if self.args.attention_distillation:
            terms["attention_kd_loss"] = attention_distillation_loss(
                student_attentions=student.mask_decoder_attentions, teacher_attentions=teacher.mask_decoder_attentions,
                query_mask=query_mask, num_queries=num_queries)
        return terms

    def compute_loss_terms(self, model, inputs, num_queries=None, num_images=None, temperature: Optional[float] = None,
                           num_labelled_queries=None):
        """Every named loss term of a batch (unweighted) and the student's outputs.

        ``num_queries`` / ``num_images`` are the normalizers (local counts when None); ``temperature``
        that of the mask KD (the schedule's current one when None). With box-only data (``has_mask``
        in the batch) the ground-truth terms are normalized by ``num_labelled_queries`` (local count
        when None), the distillation terms by ``num_queries``.
        """
        hidden, attentions = self._needs()
        outputs = self._run(model, inputs, teacher=False, hidden=hidden, attentions=attentions)
        if "has_mask" not in inputs:
            num_labelled_queries = num_queries
        terms = self._ground_truth_terms(outputs, inputs, num_labelled_queries)
        if self.teacher is not None:
            with torch.no_grad():
                teacher_outputs = self._run(self.teacher, inputs, teacher=True, hidden=hidden, attentions=attentions)
            if temperature is None:
                temperature = self.schedule_state()["temperature"]
            terms.update(self._distillation_terms(outputs, teacher_outputs, inputs, num_queries, num_images, temperature))
        return terms, outputs

    def weighted_loss(self, terms: Dict[str, torch.Tensor], state: Optional[Dict[str, float]] = None,
                      fraction: float | torch.Tensor = 1.0) -> torch.Tensor:
        """The loss weighting's total of ``terms``: ground-truth terms times alpha, distillation terms times beta.

        ``state``: the schedule's values (the current ones when None). ``fraction``: this micro-batch's
        share of the step's real queries, which scales the uncertainty-weighting regularizer so that
        it counts once per optimizer step.
        """
        state = self.schedule_state() if state is None else state
        scales = {name: state["alpha"] if name in GROUND_TRUTH_TERMS else state["beta"] for name in self.loss_weighting.names}
        return self.loss_weighting(terms, scales=scales, regularizer_scale=fraction)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        query_mask = inputs["query_mask"]
        num_labelled = None
        if num_items_in_batch is not None:
            num_queries, num_images = num_items_in_batch["num_queries"], num_items_in_batch["num_images"]
            num_labelled = num_items_in_batch.get("num_labelled_queries")
            # DDP / DeepSpeed / FSDP average gradients over processes: undo it (see the module docstring).
            scale = self.accelerator.num_processes
        else:
            num_queries, num_images, scale = query_mask.sum(), query_mask.shape[0], 1
        state = self.schedule_state()
        terms, outputs = self.compute_loss_terms(model, inputs, num_queries, num_images, temperature=state["temperature"],
                                                 num_labelled_queries=num_labelled)
        fraction = query_mask.sum().float() / torch.as_tensor(num_queries, device=query_mask.device).float().clamp_min(1.0)
        loss = self.weighted_loss(terms, state, fraction) * scale
        if model.training and num_items_in_batch is not None:
            for name, value in terms.items():
                value = value.detach().float()
                self._step_terms[name] = value if name not in self._step_terms else self._step_terms[name] + value
        return (loss, outputs) if return_outputs else loss

    # ---- Per-step bookkeeping: adaptive weights, uncertainty gradients, logging
    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._zero_weighting_grads:
            for parameter in self.loss_weighting.parameters():
                parameter.grad = None
            self._zero_weighting_grads = False
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            self._finish_optimizer_step()
        return loss

    def _finish_optimizer_step(self) -> None:
        """Runs once per optimizer step, after the last backward and before optimizer.step()."""
        names = sorted(self._step_terms)
        step_values: Dict[str, float] = {}
        if names:
            stacked = torch.stack([self._step_terms[name] for name in names])
            if self.accelerator.num_processes > 1:
                stacked = self.accelerator.reduce(stacked, reduction="sum")
            step_values = dict(zip(names, stacked.tolist()))
        self._step_terms = {}
        parameters = [p for p in self.loss_weighting.parameters() if p.grad is not None]
        if parameters and self.accelerator.num_processes > 1:
            for parameter in parameters:
                parameter.grad = self.accelerator.reduce(parameter.grad, reduction="mean")
        self._zero_weighting_grads = True

        used_weights = self.loss_weighting.weights
        if step_values and all(name in step_values for name in self.loss_weighting.names):
            self.loss_weighting.update({name: step_values[name] for name in self.loss_weighting.names})
        for name, value in step_values.items():
            self._log_sums[name] += value
        for name, value in used_weights.items():
            self._log_sums[f"weight_{name}"] += value
        if self.teacher is not None:
            for name, value in self.schedule_state().items():
                self._log_sums[f"distill_{name}"] += value
        self._log_count += 1

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._log_count:
            logs.update({name: total / self._log_count for name, total in sorted(self._log_sums.items())})
            self._log_sums = defaultdict(float)
            self._log_count = 0
        super().log(logs, start_time)

    # ---- Saving: the loss-weighting state travels with the optimizer state; the full processor
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_loss_weighting_state(self.loss_weighting, output_dir, self.args.loss_weighting)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            load_loss_weighting_state(self.loss_weighting, checkpoint, self.args.device)

    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        if self.processor is not None:
            self.processor.save_pretrained(output_dir if output_dir is not None else self.args.output_dir)

    # ---- Evaluation (metrics: .evaluation) and the model card (.model_card)
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            with self.compute_loss_context_manager():
                outputs = self._run(model, inputs, teacher=False, hidden=False, attentions=False)
            loss = self.evaluation_weighting(self._ground_truth_terms(outputs, inputs, None)).detach()
            if prediction_loss_only:
                return loss, None, None
            statistics = query_statistics(outputs.pred_masks, outputs.iou_scores, inputs,
                                          *self._wrong_box_answers(model, outputs, inputs))
        return loss, statistics, inputs["query_mask"].long()

    def _wrong_box_answers(self, model, outputs, inputs):
        """(pred_masks, iou_scores, wrong_valid) of the same queries asked with wrong boxes (.evaluation)."""
        points, valid = wrong_box_points(inputs, image_size=self.accelerator.unwrap_model(model).config.image_size)
        with self.compute_loss_context_manager():
            wrong = model(image_embeddings=outputs.image_embeddings, input_points=points,
                          input_labels=inputs["input_labels"], multimask_output=True)
        return wrong.pred_masks, wrong.iou_scores, valid

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if self.state.global_step == 0 and eval_dataset is None and metric_key_prefix == "eval" and self.initial_metrics is None:
            self.initial_metrics = dict(metrics)  # the "before fine-tuning" metrics
            if self.args.should_save:
                save_initial_metrics(self.args.output_dir, self.initial_metrics)
        return metrics

    def create_model_card(self, model_name: Optional[str] = None, **kwargs) -> None:
        """Write README.md in output_dir (recipe, data, metrics before/after, usage); see model_card.py."""
        if not self.is_world_process_zero():
            return
        from .model_card import write_model_card

        write_model_card(self, model_name=model_name, **{k: v for k, v in kwargs.items() if k in ("tags", "license")})
