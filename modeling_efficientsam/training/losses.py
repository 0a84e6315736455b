"""Ground-truth losses for box-prompted mask prediction.

All functions are pure, take keyword-only arguments and compute in float32 (inputs under autocast
are upcast).

Per-mask terms (:func:`sigmoid_focal_loss`, :func:`dice_loss`, :func:`soft_iou_loss`,
:func:`boundary_loss`) take mask logits of shape ``(..., H, W)`` and binary targets broadcastable
to it, and return one value per mask, shape ``(...)`` -- e.g. ``(B, Q, M)`` for the model's
candidates. They never reduce over queries; :func:`segmentation_loss` does that, with an explicit
normalizer.

Normalization (:func:`segmentation_loss`): every term is a SUM over real (non-padded) queries
divided by ``num_queries``. Pass as ``num_queries`` the number of real queries in the whole
optimizer step -- across gradient-accumulation micro-batches and across processes -- and the summed
gradient of the micro-batches equals the gradient of the mean over every query of the step, however
the queries happen to be split. Left as None, the local count of real queries is used (right for a
single process without accumulation). Under DDP, whose all-reduce *averages* gradients over
processes, the trainer must additionally multiply the loss by the number of processes (what
``transformers.Trainer`` does when it passes ``num_items_in_batch``). The normalizer is clamped to
at least 1, so a batch of padding only yields a finite zero loss with zero gradients.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..metrics.functional import mask_iou

__all__ = [
    "GROUND_TRUTH_TERMS",
    "sigmoid_focal_loss",
    "dice_loss",
    "soft_iou_loss",
    "boundary_band",
    "boundary_loss",
    "iou_head_loss",
    "normalize_over_queries",
    "segmentation_loss",
    "step_normalizers",
]


# The ground-truth terms returned by segmentation_loss, by name, as the trainer logs and weights them.
GROUND_TRUTH_TERMS = ("focal_loss", "dice_loss", "iou_loss", "boundary_loss", "iou_head_loss")


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """Flatten the two trailing spatial dimensions."""
    return x.flatten(-2)


def sigmoid_focal_loss(
    *, logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017), averaged over the pixels of each mask.

    Per pixel, with ``p = sigmoid(logit)`` and ``p_t = p`` on foreground, ``1 - p`` on background:
    ``alpha_t * (1 - p_t) ** gamma * BCE(logit, target)``, where ``alpha_t = alpha`` on foreground
    and ``1 - alpha`` on background (``alpha < 0`` disables the class weighting).

    Args:
        logits: mask logits ``(..., H, W)``.
        targets: binary targets broadcastable to ``logits``.
        alpha: foreground weight in [0, 1], or negative for none.
        gamma: focusing exponent (>= 0); 0 gives plain (alpha-weighted) BCE.

    Returns:
        ``(...)``: the mean over the H x W pixels of each mask.
    """
    logits = logits.float()
    targets = targets.to(logits.dtype).expand_as(logits)
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1.0 - prob) * (1.0 - targets)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss
    return _pixels(loss).mean(-1)


def dice_loss(*, logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per mask: ``1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)``, ``p = sigmoid``.

    ``smooth`` (pixels) keeps empty targets well defined: an empty target predicted empty gives 0.

    Returns:
        ``(...)`` for logits ``(..., H, W)``.
    """
    logits = logits.float()
    prob = _pixels(torch.sigmoid(logits))
    targets = _pixels(targets.to(prob.dtype).expand_as(logits))
    numerator = 2.0 * (prob * targets).sum(-1) + smooth
    denominator = prob.sum(-1) + targets.sum(-1) + smooth
    return 1.0 - numerator / denominator


def soft_iou_loss(*, logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft IoU (Jaccard) loss per mask: ``1 - (I + smooth) / (U + smooth)``.

    ``I = sum(p t)`` and ``U = sum(p) + sum(t) - I`` with ``p = sigmoid(logits)``.

    Returns:
        ``(...)`` for logits ``(..., H, W)``.
    """
    logits = logits.float()
    prob = _pixels(torch.sigmoid(logits))
    targets = _pixels(targets.to(prob.dtype).expand_as(logits))
    intersection = (prob * targets).sum(-1)
    union = prob.sum(-1) + targets.sum(-1) - intersection
    return 1.0 - (intersection + smooth) / (union + smooth)


def boundary_band(targets: torch.Tensor, *, band_width: int = 3) -> torch.Tensor:
    """Boolean band of pixels around the boundary of binary masks ``(..., H, W)``.

    A pixel is in the band when its ``(2w+1) x (2w+1)`` neighbourhood (``w = band_width``) holds both
    foreground and background pixels, i.e. band = dilation(target) minus erosion(target). Pixels
    outside the image are ignored (the image border is no boundary). The band is therefore about
    ``2 w`` pixels wide, centred on the object's contour; an empty or full mask has an empty band.

    Computed from window sums (cumulative sums along rows, then columns; exact, the counts are small
    integers): a pixel is in the band when its window holds at least one foreground pixel and fewer
    foreground pixels than the window has inside the image.
    """
    if band_width < 1:
        raise ValueError(f"band_width must be >= 1, got {band_width}")
    with torch.no_grad():
        foreground = (targets.detach() > 0.5).float()
        inside = torch.ones(foreground.shape[-2:], dtype=foreground.dtype, device=foreground.device)
        counts = _window_sums(foreground, band_width)
        return (counts > 0.5) & (counts < _window_sums(inside, band_width) - 0.5)


def _window_sums(maps: torch.Tensor, radius: int) -> torch.Tensor:
    """Sum over the (2r+1) x (2r+1) window of every pixel of maps (..., H, W), pixels outside counting 0."""
    width = 2 * radius + 1
    rows = F.pad(maps, (radius + 1, radius)).cumsum(-1)
    rows = rows[..., width:] - rows[..., :-width]
    columns = F.pad(rows, (0, 0, radius + 1, radius)).cumsum(-2)
    return columns[..., width:, :] - columns[..., :-width, :]


def boundary_loss(*, logits: torch.Tensor, targets: torch.Tensor, band_width: int = 3) -> torch.Tensor:
    """Binary cross-entropy restricted to a band around the ground-truth boundary.

    The band is :func:`boundary_band` of the target (``band_width`` pixels on each side of the
    contour). The loss of a mask is the BCE summed over its band pixels divided by the number of band
    pixels. A target without boundary (empty, or covering the whole image) has an empty band and
    contributes exactly 0 (finite, zero gradient).

    Returns:
        ``(...)`` for logits ``(..., H, W)``; targets may have fewer leading dims (broadcast).
    """
    logits = logits.float()
    targets = targets.to(logits.dtype)
    band = boundary_band(targets, band_width=band_width).to(logits.dtype).expand_as(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets.expand_as(logits), reduction="none")
    band = _pixels(band)
    return (_pixels(ce) * band).sum(-1) / band.sum(-1).clamp_min(1.0)


class _ChosenCandidateSums(torch.autograd.Function):
    """The pixel sums behind the four mask terms, for every candidate, and the choice among them.

    Inputs: logits ``(B, Q, M, N)`` (N pixels), binary targets and boundary band ``(B, Q, 1, N)``
    (float 0/1), the term weights (focal, dice, iou, boundary), focal alpha and gamma. With
    ``p = sigmoid(x)``, ``u = -x`` on foreground and ``x`` on background (so that the per-pixel
    cross-entropy is ``softplus(u)`` and ``1 - p_t = sigmoid(u)``), the sums per candidate are

    * ``focal``: sum of ``alpha_t * sigmoid(u)^gamma * softplus(u)``,
    * ``prob``: sum of ``p``; ``overlap``: sum of ``p * t``,
    * ``band``: sum of ``band * softplus(u)``,

    from which :func:`_terms_from_sums` gives the terms. The forward computes them for all M
    candidates in one pass (products with the targets and band as matrix-vector products, nothing
    saved but the inputs), chooses each query's candidate with the lowest weighted loss, and returns
    the chosen candidate's sums ``(B, Q)`` each, the choice ``(B, Q)`` (no gradient), and the share
    of predicted-foreground pixels that is in the target, for the IoU head (no gradient). The
    backward is written out and runs on the chosen candidates' pixels only: the other candidates
    get exactly zero gradient, as their terms are not in the loss.
    """

    @staticmethod
    def forward(ctx, logits, targets, band, weights, alpha, gamma):
        flip = 1.0 - 2.0 * targets  # -1 on foreground, +1 on background
        weight_t = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) if alpha >= 0 else torch.ones_like(targets)
        sums = _candidate_sums(logits, flip, targets, band, weight_t, gamma)
        terms = _terms_from_sums(*sums, target_sum=targets.sum(-1), band_sum=band.sum(-1), pixels=logits.shape[-1])
        chosen = sum(weight * term for weight, term in zip(weights, terms)).argmin(dim=-1)  # (B, Q)
        index = chosen.unsqueeze(-1)
        picked = [value.gather(-1, index).squeeze(-1) for value in sums]
        predicted = (logits > 0).to(logits.dtype)  # (a forward pass runs without autograd)
        overlap = torch.matmul(predicted, targets.transpose(-1, -2)).squeeze(-1)  # (B, Q, M)
        union = predicted.sum(-1) + targets.sum(-1) - overlap
        actual_iou = torch.where(union > 0, overlap / union.clamp_min(1.0), torch.ones_like(union))
        ctx.save_for_backward(logits, flip, targets, band, weight_t, chosen)
        ctx.gamma = gamma
        ctx.mark_non_differentiable(chosen, actual_iou)
        return (*picked, chosen, actual_iou)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_focal, grad_prob, grad_overlap, grad_band, _chosen, _iou):
        logits, flip, targets, band, weight_t, chosen = ctx.saved_tensors
        gamma = ctx.gamma
        index = chosen[:, :, None, None].expand(-1, -1, 1, logits.shape[-1])
        x = logits.gather(2, index)  # (B, Q, 1, N): the chosen candidates
        u = x * flip
        q = torch.sigmoid(u)  # 1 - p_t
        ce = F.softplus(u)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)

        def per_query(grad):
            return (grad if grad is not None else zero).reshape(*chosen.shape, 1, 1).to(x.dtype)

        # d/du of the focal term: alpha_t q^gamma (gamma (1 - q) ce + q); of the band term: band q
        focal = torch.add(q, (1.0 - q).mul_(ce), alpha=gamma)
        grad_u = focal.mul_(q.pow(gamma)).mul_(weight_t).mul_(per_query(grad_focal))
        grad_u.addcmul_(band * q, per_query(grad_band))
        # d/dx of sum p and sum p t: p (1 - p) = q (1 - q), times (g_prob + g_overlap t); du/dx = flip
        grad_x = grad_u.mul_(flip)
        slope = q * (1.0 - q)
        grad_x.addcmul_(slope, per_query(grad_prob) + per_query(grad_overlap) * targets)
        grad_logits = torch.zeros_like(logits).scatter_(2, index, grad_x)
        return grad_logits, None, None, None, None, None


def _candidate_sums(logits, flip, targets, band, weight_t, gamma):
    """(focal, prob, overlap, band) pixel sums ``(..., M)`` of `_ChosenCandidateSums`."""
    u = logits * flip
    q = torch.sigmoid(u)
    ce = F.softplus(u)
    focal = q.pow_(gamma).mul_(ce)
    prob = torch.sigmoid(logits)

    def pixel_sum(values, weights):  # sum over pixels of values * weights, as a matrix-vector product
        return torch.matmul(values, weights.transpose(-1, -2)).squeeze(-1)

    return pixel_sum(focal, weight_t), prob.sum(-1), pixel_sum(prob, targets), pixel_sum(ce, band)


def _terms_from_sums(focal, prob, overlap, band, *, target_sum, band_sum, pixels):
    """(focal, dice, iou, boundary) terms from the pixel sums (see `_ChosenCandidateSums`); ``smooth`` 1."""
    return (
        focal / pixels,
        1.0 - (2.0 * overlap + 1.0) / (prob + target_sum + 1.0),
        1.0 - (overlap + 1.0) / (prob + target_sum - overlap + 1.0),
        band / band_sum.clamp_min(1.0),
    )


def iou_head_loss(*, iou_scores: torch.Tensor, pred_masks: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared error between the predicted IoU and the actual IoU of each candidate mask.

    The actual IoU is that of the binarized candidate (``logits > 0``) with the target, with the
    metric's convention (both empty -> 1); it is a detached regression target.

    Args:
        iou_scores: ``(..., M)`` predicted IoU per candidate.
        pred_masks: ``(..., M, H, W)`` candidate logits.
        targets: ``(..., H, W)`` binary targets (or broadcastable to ``pred_masks``).

    Returns:
        ``(..., M)`` squared errors.
    """
    if targets.ndim == pred_masks.ndim - 1:
        targets = targets.unsqueeze(-3)
    with torch.no_grad():
        actual = mask_iou(pred_masks > 0, (targets > 0.5).expand_as(pred_masks)).float()
    return (iou_scores.float() - actual.detach()) ** 2


def normalize_over_queries(
    per_query: torch.Tensor, *, query_mask: torch.Tensor, num_queries: Optional[Union[int, float, torch.Tensor]] = None
) -> torch.Tensor:
    """Sum ``per_query`` over real queries and divide by ``num_queries`` (local count when None).

    Padded queries are removed with ``torch.where``, so even non-finite values there cannot leak in.
    The divisor is clamped to at least 1.
    """
    query_mask = query_mask.bool()
    if per_query.shape != query_mask.shape:
        raise ValueError(f"per-query values {tuple(per_query.shape)} do not match query_mask {tuple(query_mask.shape)}")
    kept = torch.where(query_mask, per_query, torch.zeros((), dtype=per_query.dtype, device=per_query.device))
    if num_queries is None:
        num_queries = query_mask.sum()
    divisor = torch.as_tensor(num_queries, dtype=per_query.dtype, device=per_query.device).clamp_min(1.0)
    return kept.sum() / divisor


def step_normalizers(
    batches: Sequence[Mapping[str, torch.Tensor]], *, device=None,
    all_reduce_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    """The normalizers of one optimizer step: its real queries and its images, over all micro-batches.

    Args:
        batches: the collated micro-batches of the step, each with a ``(B, Q)`` ``query_mask``.
        device: where the counts go.
        all_reduce_sum: sums a tensor over processes (None for a single process).

    Returns:
        ``{"num_queries": N_q, "num_images": N_img}``, int64 scalars: the ``num_queries`` (and
        ``num_images``) to give every loss of the step (see the module docstring). When a batch
        carries ``has_mask`` (box-only data), also ``num_labelled_queries``: the real queries with a
        ground-truth mask, the normalizer of the ground-truth terms.
    """
    labelled = any("has_mask" in batch for batch in batches)
    values = [sum(int(batch["query_mask"].sum()) for batch in batches), sum(int(batch["query_mask"].shape[0]) for batch in batches)]
    if labelled:
        values.append(sum(int((batch["query_mask"] & batch["has_mask"]).sum()) if "has_mask" in batch
                          else int(batch["query_mask"].sum()) for batch in batches))
    counts = torch.tensor(values, dtype=torch.int64, device=device)
    if all_reduce_sum is not None:
        counts = all_reduce_sum(counts)
    out = {"num_queries": counts[0], "num_images": counts[1]}
    if labelled:
        out["num_labelled_queries"] = counts[2]
    return out


def segmentation_loss(
    *,
    pred_masks: torch.Tensor,
    iou_scores: torch.Tensor,
    labels: torch.Tensor,
    query_mask: Optional[torch.Tensor] = None,
    num_queries: Optional[Union[int, float, torch.Tensor]] = None,
    # term weights
    focal_weight: float = 1.0, dice_weight: float = 1.0, iou_weight: float = 1.0, boundary_weight: float = 0.5,
    iou_head_weight: float = 1.0,
    # term parameters
    focal_alpha: float = 0.25, focal_gamma: float = 2.0, boundary_band_width: int = 3,
) -> Dict[str, torch.Tensor]:
    """Full ground-truth loss of a batch, with the minimum-loss candidate per query.

    For each query, every candidate gets the weighted mask loss
    ``focal_weight*focal + dice_weight*dice + iou_weight*soft_iou + boundary_weight*boundary``;
    the candidate with the lowest value is chosen (an ``argmin`` taken without gradient) and only its
    terms train the mask. The IoU head is trained on all candidates (mean squared error over the M
    candidates of a query). Each term is then summed over the real queries and divided by
    ``num_queries`` (see the module docstring). The terms are those of :func:`sigmoid_focal_loss`,
    :func:`dice_loss`, :func:`soft_iou_loss`, :func:`boundary_loss` and :func:`iou_head_loss`,
    computed in one pass by ``_ChosenCandidateSums``, which differentiates the chosen candidate only.

    Args:
        pred_masks: ``(B, Q, M, H, W)`` mask logits.
        iou_scores: ``(B, Q, M)`` predicted IoU.
        labels: ``(B, Q, H, W)`` binary targets (values above 0.5 are foreground).
        query_mask: ``(B, Q)`` bool, False for padded queries (they contribute nothing). None: all real.
        num_queries: normalizer -- the number of real queries in the global batch. None: local count.
        focal_weight, dice_weight, iou_weight, boundary_weight, iou_head_weight: term weights.
        focal_alpha, focal_gamma: focal-loss parameters.
        boundary_band_width: half-width in pixels of the boundary band.

    Returns:
        A dict of scalars ``loss`` (the weighted total), ``mask_loss`` (weighted sum of the four mask
        terms), ``focal_loss``, ``dice_loss``, ``iou_loss``, ``boundary_loss``, ``iou_head_loss``
        (unweighted, each normalized), and ``chosen_candidate``: ``(B, Q)`` int64 index of the
        candidate used for the mask loss (meaningless for padded queries).
    """
    if pred_masks.ndim != 5:
        raise ValueError(f"pred_masks must be (B, Q, M, H, W), got {tuple(pred_masks.shape)}")
    batch, queries, _, height, width = pred_masks.shape
    if labels.shape != (batch, queries, height, width):
        raise ValueError(f"labels {tuple(labels.shape)} do not match pred_masks {tuple(pred_masks.shape)}")
    if iou_scores.shape != pred_masks.shape[:3]:
        raise ValueError(f"iou_scores {tuple(iou_scores.shape)} do not match pred_masks {tuple(pred_masks.shape)}")
    if query_mask is None:
        query_mask = torch.ones((batch, queries), dtype=torch.bool, device=pred_masks.device)

    # Pixels flattened; targets and band once per query, broadcast over the candidates. Every
    # candidate's terms are needed only to choose one, and only the chosen candidate's terms carry
    # gradient: `_ChosenCandidateSums` makes the choice in its forward pass and differentiates the
    # chosen candidate only.
    pixels = height * width
    targets = (labels > 0.5).to(torch.float32).reshape(batch, queries, 1, pixels)
    band = boundary_band(labels, band_width=boundary_band_width).to(torch.float32).reshape(batch, queries, 1, pixels)
    weights = (focal_weight, dice_weight, iou_weight, boundary_weight)
    *sums, chosen, actual_iou = _ChosenCandidateSums.apply(
        pred_masks.float().reshape(batch, queries, -1, pixels), targets, band, weights, focal_alpha, focal_gamma)
    terms = _terms_from_sums(*sums, target_sum=targets.sum(-1).squeeze(-1), band_sum=band.sum(-1).squeeze(-1),
                             pixels=pixels)
    per_query = dict(zip(("focal_loss", "dice_loss", "iou_loss", "boundary_loss"), terms))  # (B, Q) each
    combined = sum(weight * value for weight, value in zip(weights, terms))

    out: Dict[str, torch.Tensor] = {}
    for name, value in per_query.items():
        out[name] = normalize_over_queries(value, query_mask=query_mask, num_queries=num_queries)
    out["mask_loss"] = normalize_over_queries(combined, query_mask=query_mask, num_queries=num_queries)
    # the IoU head against the actual IoU of each binarized candidate (computed in the same pass)
    head = ((iou_scores.float() - actual_iou) ** 2).mean(-1)  # (B, Q), as iou_head_loss
    out["iou_head_loss"] = normalize_over_queries(head, query_mask=query_mask, num_queries=num_queries)
    out["loss"] = out["mask_loss"] + iou_head_weight * out["iou_head_loss"]
    out["chosen_candidate"] = chosen
    return out
