"""``EfficientSamTrainer``: box-prompted fine-tuning of EfficientSAM, with optional distillation.

What the trainer adds to ``transformers.Trainer``:

* **Losses** (:func:`~.losses.segmentation_loss`): focal, Dice, soft IoU and boundary terms on the
  lowest-loss of the 3 candidates, the IoU head on all candidates, padded queries excluded.
* **Distillation** from a frozen teacher prepared with ``accelerator.prepare_model(teacher,
  evaluation_mode=True)``. The teacher runs its own encoder on the batch's pixels (or reads its own
  cached ``teacher_image_embeddings``) and its own decoder on exactly the student's prompts. Terms:
  soft-label mask KD (temperature T, T^2 scaled, candidate by candidate) and IoU-score MSE; decoder
  output-token and upscaled-embedding MSE, plus image-embedding MSE when the student's encoder is
  trained; token-to-image attention KL per head and token. Temperature, alpha (ground truth) and
  beta (distillation) follow :class:`~.schedules.DistillationSchedule` at ``state.global_step``.
* **Loss weights**: ``fixed``, ``dwa`` or ``uncertainty`` (:mod:`.weighting`) over the named terms;
  ground-truth terms are multiplied by alpha and distillation terms by beta. Each term, each weight,
  T, alpha and beta are logged at every logging step.
* **Evaluation**: deterministic prompts (no jitter), the candidate with the highest predicted IoU,
  per-instance counts gathered across processes, metrics from the package's ``evaluate`` module:
  ``eval_mean_iou``, ``eval_mean_category_iou``, ``eval_f1``, ``eval_boundary_f1``, ``eval_iou_<category>``.

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

import functools
import inspect
import json
import logging
import math
import os
from collections import defaultdict
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from transformers import Trainer
from transformers.optimization import get_scheduler

from ..data.collator import EfficientSamCollator
from ..metrics import STATISTIC_NAMES, batch_segmentation_statistics, load_segmentation_metric
from .distillation import (
    attention_distillation_loss,
    feature_distillation_loss,
    image_embedding_distillation_loss,
    mask_distillation_loss,
)
from .losses import segmentation_loss
from .schedules import DistillationSchedule
from .weighting import UncertaintyWeighting, build_loss_weighting

logger = logging.getLogger(__name__)

__all__ = [
    "DECODER_INFO_FILE",
    "DECODER_WEIGHTS_FILE",
    "DISTILLATION_TERMS",
    "EfficientSamTrainer",
    "GROUND_TRUTH_TERMS",
    "INITIAL_METRICS_FILE",
    "LOSS_WEIGHTING_FILE",
    "load_decoder_on_base",
    "save_decoder_only",
]

GROUND_TRUTH_TERMS = ("focal_loss", "dice_loss", "iou_loss", "boundary_loss", "iou_head_loss")
DISTILLATION_TERMS = (
    "mask_kd_loss", "iou_kd_loss", "token_feature_loss", "upscaled_feature_loss", "embedding_kd_loss", "attention_kd_loss",
)
LOSS_WEIGHTING_FILE = "loss_weighting.safetensors"
INITIAL_METRICS_FILE = "eval_before_training.json"
# Columns of the per-query statistics returned by prediction_step: the counts, category, real-query flag.
_STAT_COLUMNS = tuple(STATISTIC_NAMES) + ("category_id", "valid")
_BATCH_ONLY_KEYS = ("labels", "query_mask", "category_ids", "original_sizes", "image_ids", "full_resolution_labels")


def _step_lr_factor(step: int, warmup_steps: int, decay_steps: int, gamma: float) -> float:
    """'step' schedule: linear warm-up, then the rate times gamma every decay_steps optimizer steps."""
    warm = min(1.0, (step + 1) / (warmup_steps + 1)) if warmup_steps > 0 else 1.0
    return warm * gamma ** (step // max(1, decay_steps))


class EfficientSamTrainer(Trainer):
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
        kwargs.setdefault("compute_metrics", self._compute_metrics)
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
        self.id2label = dict(id2label) if id2label is not None else None
        self._metric = None
        self._steps_per_epoch: Optional[int] = None
        self.initial_metrics: Optional[Dict[str, float]] = None

        self.teacher = None
        if teacher_model is not None:
            self._check_teacher(teacher_model)
            teacher_model.requires_grad_(False)
            teacher_model.eval()
            self.teacher = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
            self.teacher.eval()

        unwrapped = self.accelerator.unwrap_model(self.model)
        self.student_encoder_trained = any(p.requires_grad for p in unwrapped.vision_encoder.parameters())
        self.loss_weighting = build_loss_weighting(
            self.args.loss_weighting,
            weights=self._base_term_weights(),
            dwa_temperature=self.args.dwa_temperature,
            smoothing_factor=self.args.smoothing_factor,
            adaptive_update_freq=self.args.adaptive_update_freq,
        ).to(self.args.device)
        self._step_terms: Dict[str, torch.Tensor] = {}
        self._log_sums: Dict[str, float] = defaultdict(float)
        self._log_count = 0
        self._zero_weighting_grads = False

        from .callbacks import DatasetEpochCallback

        self.add_callback(DatasetEpochCallback(self))

    # ------------------------------------------------------------------------------------------
    # Set-up helpers
    # ------------------------------------------------------------------------------------------
    def _check_teacher(self, teacher) -> None:
        student = self.accelerator.unwrap_model(self.model).config
        config = teacher.config
        problems = []
        if config.image_size != student.image_size:
            problems.append(f"input size {config.image_size} vs the student's {student.image_size} (prompts are in that frame)")
        if config.low_res_mask_size != student.low_res_mask_size:
            problems.append(f"mask size {config.low_res_mask_size} vs {student.low_res_mask_size}")
        t_dec, s_dec = config.mask_decoder_config, student.mask_decoder_config
        if t_dec.num_multimask_outputs != s_dec.num_multimask_outputs:
            problems.append("a different number of candidate masks")
        if self.args.feature_distillation and (
            t_dec.hidden_size != s_dec.hidden_size or t_dec.upscaling_dims[-1] != s_dec.upscaling_dims[-1]
        ):
            problems.append("decoder widths that differ (feature_distillation needs equal widths; set it false)")
        if self.args.attention_distillation and (
            t_dec.num_hidden_layers != s_dec.num_hidden_layers or t_dec.num_attention_heads != s_dec.num_attention_heads
        ):
            problems.append("decoder depth/heads that differ (attention_distillation needs equal ones; set it false)")
        if problems:
            raise ValueError("the teacher cannot be distilled into this student: " + "; ".join(problems))

    def _base_term_weights(self) -> Dict[str, float]:
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

    @property
    def distillation_schedule(self) -> Optional[DistillationSchedule]:
        """The temperature / alpha / beta schedule of this run (None without a teacher)."""
        if self.teacher is None:
            return None
        total = max(1, int(self.state.max_steps or 0))
        per_epoch = self._steps_per_epoch or max(1, math.ceil(total / max(1.0, float(self.args.num_train_epochs))))
        args = self.args
        return DistillationSchedule(
            total_steps=total, steps_per_epoch=per_epoch, distill_warmup_epochs=args.distill_warmup_epochs,
            max_temperature=args.max_temperature, min_temperature=args.min_temperature,
            alpha_start=args.alpha_start, alpha_end=args.alpha_end, beta_start=args.beta_start, beta_end=args.beta_end,
            decay=args.distill_decay,
        )

    def schedule_state(self, step: Optional[int] = None) -> Dict[str, float]:
        """``temperature``, ``alpha``, ``beta`` at ``step`` (default: the current optimizer step)."""
        schedule = self.distillation_schedule
        if schedule is None:
            return {"temperature": 1.0, "alpha": 1.0, "beta": 0.0}
        return schedule.state_at(self.state.global_step if step is None else step)

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        self._steps_per_epoch = int(values[1])  # num_update_steps_per_epoch
        return values

    # ------------------------------------------------------------------------------------------
    # Optimizer and learning-rate schedule
    # ------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            args = self.args
            if args.optimizer != "trainer":
                adam = {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon, "lr": args.learning_rate}
                choices = {
                    "adamw": (torch.optim.AdamW, adam),
                    "adam": (torch.optim.Adam, adam),
                    "sgd": (torch.optim.SGD, {"lr": args.learning_rate, "momentum": args.momentum}),
                }
                self.optimizer_cls_and_kwargs = choices[args.optimizer]
            super().create_optimizer(model)
            extra = [p for p in self.loss_weighting.parameters() if p.requires_grad]
            if extra:  # uncertainty weighting: learned log-variances, no weight decay
                self.optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        return self.optimizer

    def _warmup_steps(self, num_training_steps: int) -> int:
        if self.args.warmup_epochs > 0:
            per_epoch = self._steps_per_epoch or max(1, round(num_training_steps / max(1e-9, self.args.num_train_epochs)))
            return int(round(self.args.warmup_epochs * per_epoch))
        return self.args.get_warmup_steps(num_training_steps)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        optimizer = self.optimizer if optimizer is None else optimizer
        args = self.args
        warmup = min(self._warmup_steps(num_training_steps), max(0, num_training_steps - 1))
        if args.scheduler == "trainer":
            self.lr_scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=warmup,
                                              num_training_steps=num_training_steps,
                                              scheduler_specific_kwargs=args.lr_scheduler_kwargs)
        elif args.scheduler == "cosine":
            self.lr_scheduler = get_scheduler("cosine_with_min_lr", optimizer=optimizer, num_warmup_steps=warmup,
                                              num_training_steps=num_training_steps,
                                              scheduler_specific_kwargs={"min_lr": args.min_lr})
        elif args.scheduler == "step":
            per_epoch = self._steps_per_epoch or 1
            decay_steps = max(1, int(round(args.lr_decay_epochs * per_epoch)))
            factor = functools.partial(_step_lr_factor, warmup_steps=warmup, decay_steps=decay_steps, gamma=args.lr_decay_gamma)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        elif args.scheduler == "onecycle":
            div_factor = 25.0
            initial = args.learning_rate / div_factor
            final_div = initial / args.min_lr if args.min_lr > 0 else 1e4
            pct = warmup / num_training_steps if warmup > 0 else 0.3
            self.lr_scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=max(2, num_training_steps),
                pct_start=min(max(pct, 1e-6), 0.999), anneal_strategy="cos", div_factor=div_factor,
                final_div_factor=max(final_div, 1.0), cycle_momentum=args.optimizer == "sgd",
            )
        else:  # guarded by the arguments' checks
            raise ValueError(f"unknown scheduler {args.scheduler!r}")
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------------------------------------
    # Normalizers: real queries and images of a whole optimizer step, over all processes
    # ------------------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batch_samples:
            return batch_samples, None
        local = torch.tensor(
            [sum(int(b["query_mask"].sum()) for b in batch_samples), sum(int(b["query_mask"].shape[0]) for b in batch_samples)],
            dtype=torch.int64, device=device,
        )
        if self.accelerator.num_processes > 1:
            local = self.accelerator.reduce(local, reduction="sum")
        return batch_samples, {"num_queries": local[0], "num_images": local[1]}

    # ------------------------------------------------------------------------------------------
    # Forward passes and loss terms
    # ------------------------------------------------------------------------------------------
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
        args = self.args
        result = segmentation_loss(
            pred_masks=outputs.pred_masks, iou_scores=outputs.iou_scores, labels=inputs["labels"],
            query_mask=inputs["query_mask"], num_queries=num_queries,
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

    def compute_loss_terms(self, model, inputs, num_queries=None, num_images=None):
        """Every named loss term of a batch (unweighted) and the student's outputs.

        ``num_queries`` / ``num_images`` are the normalizers (local counts when None).
        """
        hidden, attentions = self._needs()
        outputs = self._run(model, inputs, teacher=False, hidden=hidden, attentions=attentions)
        terms = self._ground_truth_terms(outputs, inputs, num_queries)
        if self.teacher is not None:
            with torch.no_grad():
                teacher_outputs = self._run(self.teacher, inputs, teacher=True, hidden=hidden, attentions=attentions)
            temperature = self.schedule_state()["temperature"]
            terms.update(self._distillation_terms(outputs, teacher_outputs, inputs, num_queries, num_images, temperature))
        return terms, outputs

    def combine_terms(self, terms: Dict[str, torch.Tensor], fraction: float | torch.Tensor = 1.0) -> torch.Tensor:
        """``sum_i group_i * w_i * L_i`` with group = alpha (ground truth) or beta (distillation).

        ``fraction``: this micro-batch's share of the step's real queries, which scales the
        uncertainty-weighting regularizer so that it counts once per optimizer step.
        """
        state = self.schedule_state()
        weights = self.loss_weighting.current_weights()
        total = None
        for index, name in enumerate(self.loss_weighting.names):
            group = state["alpha"] if name in GROUND_TRUTH_TERMS else state["beta"]
            value = group * weights[index].to(terms[name].dtype) * terms[name]
            total = value if total is None else total + value
        if isinstance(self.loss_weighting, UncertaintyWeighting):
            total = total + self.loss_weighting.log_variances.sum().to(total.dtype) * fraction
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        query_mask = inputs["query_mask"]
        if num_items_in_batch is not None:
            num_queries, num_images = num_items_in_batch["num_queries"], num_items_in_batch["num_images"]
            # DDP / DeepSpeed / FSDP average gradients over processes: undo it (see the module docstring).
            scale = self.accelerator.num_processes
        else:
            num_queries, num_images, scale = query_mask.sum(), query_mask.shape[0], 1
        terms, outputs = self.compute_loss_terms(model, inputs, num_queries, num_images)
        fraction = query_mask.sum().float() / torch.as_tensor(num_queries, device=query_mask.device).float().clamp_min(1.0)
        loss = self.combine_terms(terms, fraction) * scale
        if model.training and num_items_in_batch is not None:
            for name, value in terms.items():
                value = value.detach().float()
                self._step_terms[name] = value if name not in self._step_terms else self._step_terms[name] + value
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------------------------------
    # Per-step bookkeeping: adaptive weights, uncertainty gradients, logging
    # ------------------------------------------------------------------------------------------
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

    # ------------------------------------------------------------------------------------------
    # Checkpoints: the loss-weighting state travels with the optimizer state
    # ------------------------------------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            from safetensors.torch import save_file

            state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.loss_weighting.state_dict().items()}
            save_file(state, os.path.join(output_dir, LOSS_WEIGHTING_FILE),
                      metadata={"strategy": self.args.loss_weighting, "names": json.dumps(list(self.loss_weighting.names))})

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, LOSS_WEIGHTING_FILE)
        if not os.path.isfile(path):
            logger.warning("%s has no %s; the loss weighting starts afresh", checkpoint, LOSS_WEIGHTING_FILE)
            return
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as handle:
            names = json.loads(handle.metadata().get("names", "[]"))
        if tuple(names) != tuple(self.loss_weighting.names):
            raise ValueError(f"{path} weights the terms {names}, but this run has {list(self.loss_weighting.names)}")
        state = load_file(path, device=str(self.args.device))
        with torch.no_grad():
            self.loss_weighting.load_state_dict(state)

    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        if self.processor is not None:
            self.processor.save_pretrained(output_dir if output_dir is not None else self.args.output_dir)

    # ------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            with self.compute_loss_context_manager():
                outputs = self._run(model, inputs, teacher=False, hidden=False, attentions=False)
            terms = self._ground_truth_terms(outputs, inputs, None)
            weights = self._base_term_weights()
            loss = sum(weights[name] * terms[name] for name in GROUND_TRUTH_TERMS).detach()
            if prediction_loss_only:
                return loss, None, None
            statistics = self.query_statistics(outputs.pred_masks, outputs.iou_scores, inputs)
        return loss, statistics, inputs["query_mask"].long()

    @staticmethod
    def query_statistics(pred_masks, iou_scores, inputs) -> torch.Tensor:
        """``(B, Q, 10)`` int64: the metric counts of the highest-IoU candidate, category, real-query flag."""
        batch, queries = inputs["query_mask"].shape
        counts = batch_segmentation_statistics(
            pred_masks=pred_masks.float(), iou_scores=iou_scores.float(), labels=inputs["labels"],
            category_ids=inputs["category_ids"],
        )
        columns = [counts[name].reshape(batch, queries).to(torch.int64) for name in STATISTIC_NAMES]
        columns.append(counts["category_id"].reshape(batch, queries))
        columns.append(inputs["query_mask"].to(torch.int64))
        return torch.stack(columns, dim=-1)

    def _compute_metrics(self, eval_prediction) -> Dict[str, float]:
        rows = np.asarray(eval_prediction.predictions).reshape(-1, len(_STAT_COLUMNS))
        rows = rows[rows[:, -1] == 1]  # real queries only (padding and cross-process padding are dropped)
        if self._metric is None:
            self._metric = load_segmentation_metric(keep_in_memory=True)
        counts = {name: rows[:, index].astype(np.int64) for index, name in enumerate(_STAT_COLUMNS[:-1])}
        result = self._metric.compute(id2label=self.id2label, **counts)
        metrics = {key: float(result[key]) for key in ("mean_iou", "mean_category_iou", "f1", "boundary_f1")}
        metrics["num_instances"] = int(result["num_instances"])
        for category, value in result["per_category_iou"].items():
            metrics[f"iou_{category}"] = float(value)
        return metrics

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if self.state.global_step == 0 and eval_dataset is None and metric_key_prefix == "eval" and self.initial_metrics is None:
            self.initial_metrics = dict(metrics)
            if self.args.should_save:
                os.makedirs(self.args.output_dir, exist_ok=True)
                with open(os.path.join(self.args.output_dir, INITIAL_METRICS_FILE), "w", encoding="utf-8") as handle:
                    json.dump(self.initial_metrics, handle, indent=2, sort_keys=True)
        return metrics

    def load_initial_metrics(self) -> Optional[Dict[str, float]]:
        """The metrics of the evaluation before training, from this run or a previous (resumed) one."""
        if self.initial_metrics is None:
            path = os.path.join(self.args.output_dir, INITIAL_METRICS_FILE)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as handle:
                    self.initial_metrics = json.load(handle)
        return self.initial_metrics

    # ------------------------------------------------------------------------------------------
    # Model card
    # ------------------------------------------------------------------------------------------
    def create_model_card(self, model_name: Optional[str] = None, **kwargs) -> None:
        """Write README.md in output_dir (recipe, data, metrics before/after, usage); see model_card.py."""
        if not self.is_world_process_zero():
            return
        from .model_card import write_model_card

        write_model_card(self, model_name=model_name, **{k: v for k, v in kwargs.items() if k in ("tags", "license")})

    def final_metrics(self) -> Optional[Dict[str, float]]:
        """The last evaluation's metrics in the log history (after loading the best model, when known)."""
        evaluations = [entry for entry in self.state.log_history if "eval_mean_iou" in entry]
        if not evaluations:
            return None
        if self.state.best_global_step:
            for entry in evaluations:
                if entry.get("step") == self.state.best_global_step:
                    return entry
        return evaluations[-1]

    def metric_history(self) -> List[Dict[str, float]]:
        return [entry for entry in self.state.log_history if "eval_mean_iou" in entry]


# ----------------------------------------------------------------------------------------------
# Decoder-only checkpoints: the trained mask decoder (+ prompt encoder) without the encoder
# ----------------------------------------------------------------------------------------------
DECODER_WEIGHTS_FILE = "decoder.safetensors"
DECODER_INFO_FILE = "decoder_config.json"
_DECODER_MODULES = ("mask_decoder", "prompt_encoder")


def save_decoder_only(model, directory: str, base_model: Optional[str] = None) -> str:
    """Write the mask decoder and prompt encoder weights of ``model`` to ``directory``.

    Files: ``decoder.safetensors`` (keys as in the full model, e.g. ``mask_decoder.…``) and
    ``decoder_config.json`` naming the base model, the fingerprint of the image encoder the decoder was
    trained on, and the full model config. Load with :func:`load_decoder_on_base`.
    """
    from safetensors.torch import save_file

    from ..data.embedding_cache import vision_encoder_fingerprint

    os.makedirs(directory, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
             if name.split(".", 1)[0] in _DECODER_MODULES}
    save_file(state, os.path.join(directory, DECODER_WEIGHTS_FILE), metadata={"format": "pt"})
    info = {
        "base_model": base_model or getattr(model.config, "_name_or_path", None) or None,
        "modules": list(_DECODER_MODULES),
        "vision_encoder_sha256": vision_encoder_fingerprint(model),
        "config": model.config.to_dict(),
    }
    with open(os.path.join(directory, DECODER_INFO_FILE), "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2, sort_keys=True, default=str)
    return directory


def load_decoder_on_base(base, decoder_dir: str, strict_encoder: bool = False):
    """Put a decoder saved by :func:`save_decoder_only` on a base model and return the model.

    Args:
        base: an ``EfficientSamModel``, or a folder / Hub id for ``EfficientSamModel.from_pretrained``.
        decoder_dir: the folder written by :func:`save_decoder_only`.
        strict_encoder: raise (instead of warning) when the base's image encoder is not the one the
            decoder was trained on.
    """
    from safetensors.torch import load_file

    from ..data.embedding_cache import vision_encoder_fingerprint
    from ..modeling_efficientsam import EfficientSamModel

    with open(os.path.join(decoder_dir, DECODER_INFO_FILE), encoding="utf-8") as handle:
        info = json.load(handle)
    model = EfficientSamModel.from_pretrained(base) if isinstance(base, (str, os.PathLike)) else base
    saved = info["config"]
    for key in ("prompt_encoder_config", "mask_decoder_config"):
        sub_config = getattr(model.config, key)
        fields = [name for name in inspect.signature(type(sub_config).__init__).parameters if name not in ("self", "kwargs")]
        differing = sorted(name for name in fields if getattr(sub_config, name) != saved[key].get(name))
        if differing:
            raise ValueError(f"{decoder_dir} was saved for another {key} (differs in {differing})")
    if vision_encoder_fingerprint(model) != info.get("vision_encoder_sha256"):
        message = (f"the base model's image encoder differs from the one {decoder_dir} was trained on "
                   f"(base_model recorded: {info.get('base_model')})")
        if strict_encoder:
            raise ValueError(message)
        logger.warning(message)
    state = load_file(os.path.join(decoder_dir, DECODER_WEIGHTS_FILE))
    expected = {name for name in model.state_dict() if name.split(".", 1)[0] in _DECODER_MODULES}
    if set(state) != expected:
        raise ValueError(f"{decoder_dir}: missing {sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}")
    model.load_state_dict(state, strict=False)
    return model
