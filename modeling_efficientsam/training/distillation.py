"""Knowledge-distillation losses (teacher -> student), as pure functions.

Every function takes keyword-only arguments, detaches the teacher, computes in float32, and follows
the normalization of :mod:`.losses`: a per-query value is summed over the real queries
(``query_mask`` True) and divided by ``num_queries`` (the number of real queries in the global
batch; the local count when None; clamped to at least 1, so an all-padding batch gives a finite 0).

- :func:`mask_distillation_loss`: soft-label KD on the mask logits. Each pixel of each candidate is
  an independent Bernoulli variable ``sigmoid(logit / T)``; the loss is the Bernoulli
  KL(teacher || student) per pixel, times ``T**2`` (keeps gradient size comparable across
  temperatures, Hinton et al. 2015), averaged over pixels and over the M candidates. (Not a softmax
  over image rows: pixels are not mutually exclusive classes.) Plus the MSE between the IoU scores.
- :func:`feature_distillation_loss`: MSE between per-query decoder features (output tokens,
  upscaled embeddings) of student and teacher.
- :func:`image_embedding_distillation_loss`: MSE between image embeddings, per image (useful when
  the student's encoder is trained).
- :func:`attention_distillation_loss`: KL(teacher || student) between token-to-image attention
  distributions, per head and token.

:data:`DISTILLATION_TERMS` names the terms as the trainer logs and weights them, and
:func:`check_teacher_compatibility` says whether a teacher's outputs can be compared with a
student's by these functions.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .losses import normalize_over_queries

__all__ = [
    "DISTILLATION_TERMS",
    "bernoulli_kl_with_logits",
    "check_teacher_compatibility",
    "mask_distillation_loss",
    "feature_distillation_loss",
    "image_embedding_distillation_loss",
    "attention_distillation_loss",
]

Number = Union[int, float, torch.Tensor]

# Every distillation term, by name: mask_distillation_loss gives the first two, feature_distillation_loss
# the decoder-feature pair, image_embedding_distillation_loss and attention_distillation_loss one each.
DISTILLATION_TERMS = (
    "mask_kd_loss", "iou_kd_loss", "token_feature_loss", "upscaled_feature_loss", "embedding_kd_loss", "attention_kd_loss",
)


def check_teacher_compatibility(student_config, teacher_config, *, feature_distillation: bool,
                                attention_distillation: bool) -> None:
    """Raise ValueError listing every reason why ``teacher_config`` cannot be distilled into ``student_config``.

    Both models see the same prompts, so they need the same input size; the per-candidate losses need
    the same mask size and number of candidates; feature distillation needs equal decoder widths and
    attention distillation equal decoder depth and heads. The image encoders may differ freely.
    """
    problems = []
    if teacher_config.image_size != student_config.image_size:
        problems.append(f"input size {teacher_config.image_size} vs the student's {student_config.image_size} "
                        "(prompts are in that frame)")
    if teacher_config.low_res_mask_size != student_config.low_res_mask_size:
        problems.append(f"mask size {teacher_config.low_res_mask_size} vs {student_config.low_res_mask_size}")
    teacher, student = teacher_config.mask_decoder_config, student_config.mask_decoder_config
    if teacher.num_multimask_outputs != student.num_multimask_outputs:
        problems.append("a different number of candidate masks")
    if feature_distillation and (
        teacher.hidden_size != student.hidden_size or teacher.upscaling_dims[-1] != student.upscaling_dims[-1]
    ):
        problems.append("decoder widths that differ (feature_distillation needs equal widths; set it false)")
    if attention_distillation and (
        teacher.num_hidden_layers != student.num_hidden_layers or teacher.num_attention_heads != student.num_attention_heads
    ):
        problems.append("decoder depth/heads that differ (attention_distillation needs equal ones; set it false)")
    if problems:
        raise ValueError("the teacher cannot be distilled into this student: " + "; ".join(problems))


def _default_query_mask(reference: torch.Tensor, query_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if query_mask is None:
        return torch.ones(reference.shape[:2], dtype=torch.bool, device=reference.device)
    if tuple(query_mask.shape) != tuple(reference.shape[:2]):
        raise ValueError(f"query_mask {tuple(query_mask.shape)} does not match tensor {tuple(reference.shape)}")
    return query_mask.bool()


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"student {what} {tuple(student.shape)} and teacher {what} {tuple(teacher.shape)} differ")


def bernoulli_kl_with_logits(*, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(Bernoulli(sigmoid(teacher)) || Bernoulli(sigmoid(student))), computed stably.

    ``p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q))`` with the logs taken by ``logsigmoid``;
    exactly 0 where the logits are equal.
    """
    p = torch.sigmoid(teacher_logits)
    log_p, log_not_p = F.logsigmoid(teacher_logits), F.logsigmoid(-teacher_logits)
    log_q, log_not_q = F.logsigmoid(student_logits), F.logsigmoid(-student_logits)
    return p * (log_p - log_q) + (1.0 - p) * (log_not_p - log_not_q)


def mask_distillation_loss(
    *,
    student_masks: torch.Tensor,
    teacher_masks: torch.Tensor,
    query_mask: Optional[torch.Tensor] = None,
    num_queries: Optional[Number] = None,
    temperature: float = 1.0,
    student_iou_scores: Optional[torch.Tensor] = None,
    teacher_iou_scores: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """Soft-label distillation of the mask logits (and of the IoU scores when given).

    Args:
        student_masks, teacher_masks: ``(B, Q, M, H, W)`` mask logits (all M candidates are
            distilled, candidate i of the student to candidate i of the teacher).
        query_mask: ``(B, Q)`` bool, False for padded queries.
        num_queries: normalizer (global number of real queries); None = local count.
        temperature: T > 0; both logits are divided by T and the KL is multiplied by T**2.
        student_iou_scores, teacher_iou_scores: optional ``(B, Q, M)`` predicted IoU.

    Returns:
        ``mask_kd_loss`` (scalar) and, when IoU scores are given, ``iou_kd_loss`` (MSE averaged over
        candidates, summed over real queries / num_queries).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_same_shape(student_masks, teacher_masks, "masks")
    query_mask = _default_query_mask(student_masks, query_mask)
    student = student_masks.float() / temperature
    teacher = teacher_masks.detach().float() / temperature
    kl = bernoulli_kl_with_logits(teacher_logits=teacher, student_logits=student)
    per_query = kl.flatten(2).mean(-1) * temperature**2  # mean over candidates and pixels
    out = {"mask_kd_loss": normalize_over_queries(per_query, query_mask=query_mask, num_queries=num_queries)}
    if (student_iou_scores is None) != (teacher_iou_scores is None):
        raise ValueError("give both student_iou_scores and teacher_iou_scores, or neither")
    if student_iou_scores is not None:
        _check_same_shape(student_iou_scores, teacher_iou_scores, "iou_scores")
        squared = (student_iou_scores.float() - teacher_iou_scores.detach().float()) ** 2
        per_query = squared.flatten(2).mean(-1)
        out["iou_kd_loss"] = normalize_over_queries(per_query, query_mask=query_mask, num_queries=num_queries)
    return out


def feature_distillation_loss(
    *,
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    query_mask: Optional[torch.Tensor] = None,
    num_queries: Optional[Number] = None,
) -> torch.Tensor:
    """MSE between per-query features, e.g. decoder output tokens ``(B, Q, T, 256)`` or upscaled
    embeddings ``(B, Q, 32, 256, 256)``.

    The squared error is averaged over all feature elements of a query, summed over real queries and
    divided by ``num_queries``.
    """
    _check_same_shape(student_features, teacher_features, "features")
    query_mask = _default_query_mask(student_features, query_mask)
    squared = (student_features.float() - teacher_features.detach().float()) ** 2
    per_query = squared.flatten(2).mean(-1)
    return normalize_over_queries(per_query, query_mask=query_mask, num_queries=num_queries)


def image_embedding_distillation_loss(
    *,
    student_embeddings: torch.Tensor,
    teacher_embeddings: torch.Tensor,
    num_images: Optional[Number] = None,
) -> torch.Tensor:
    """MSE between image embeddings ``(B, 256, 64, 64)``: averaged per image, summed over images,
    divided by ``num_images`` (global number of images; the local batch size when None).
    """
    _check_same_shape(student_embeddings, teacher_embeddings, "embeddings")
    squared = (student_embeddings.float() - teacher_embeddings.detach().float()) ** 2
    per_image = squared.flatten(1).mean(-1)
    if num_images is None:
        num_images = per_image.shape[0]
    divisor = torch.as_tensor(num_images, dtype=per_image.dtype, device=per_image.device).clamp_min(1.0)
    return per_image.sum() / divisor


def attention_distillation_loss(
    *,
    student_attentions: Union[torch.Tensor, Sequence[torch.Tensor]],
    teacher_attentions: Union[torch.Tensor, Sequence[torch.Tensor]],
    query_mask: Optional[torch.Tensor] = None,
    num_queries: Optional[Number] = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """KL(teacher || student) between attention distributions over image positions.

    Args:
        student_attentions, teacher_attentions: ``(B, Q, heads, tokens, HW)`` attention
            probabilities (each row sums to 1 over the last dim), or sequences of such tensors (one
            per decoder layer; the per-query loss is then averaged over layers).
        query_mask: ``(B, Q)`` bool, False for padded queries.
        num_queries: normalizer (global number of real queries); None = local count.
        eps: floor on the probabilities inside the logs (avoids log 0).

    Returns:
        Scalar: KL summed over image positions, averaged over heads and tokens (and layers), summed
        over real queries / num_queries. Exactly 0 when the maps are equal.
    """
    if isinstance(student_attentions, torch.Tensor):
        student_attentions, teacher_attentions = [student_attentions], [teacher_attentions]
    if len(student_attentions) != len(teacher_attentions) or len(student_attentions) == 0:
        raise ValueError("student and teacher must give the same, non-zero number of attention maps")
    per_query = None
    for student, teacher in zip(student_attentions, teacher_attentions):
        _check_same_shape(student, teacher, "attentions")
        student = student.float()
        teacher = teacher.detach().float()
        kl = teacher * (teacher.clamp_min(eps).log() - student.clamp_min(eps).log())
        layer = kl.sum(-1).flatten(2).mean(-1)  # (B, Q)
        per_query = layer if per_query is None else per_query + layer
    per_query = per_query / len(student_attentions)
    query_mask = _default_query_mask(per_query, query_mask)
    return normalize_over_queries(per_query, query_mask=query_mask, num_queries=num_queries)
