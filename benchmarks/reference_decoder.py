"""The mask decoder (commit 27f6c06) and the ground-truth loss (commit 2ab928a) as they were before
the speed work, kept as the baseline.

``benchmarks/bench_model.py`` and ``tests/test_speed_paths.py`` compare the current
``EfficientSamMaskDecoder`` against this copy: same parameter names (``load_state_dict`` from a
model's ``mask_decoder``), same inputs, so speed is a ratio measured in one process and outputs and
gradients can be compared number by number. Nothing in the package imports this file.

Usage::

    reference = ReferenceMaskDecoder(model.config.mask_decoder_config)
    reference.load_state_dict(model.mask_decoder.state_dict())
    masks, iou, *_ = reference(image_embeddings, image_pe, prompt_embeddings, multimask_output=True)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from modeling_efficientsam.configuration_efficientsam import EfficientSamMaskDecoderConfig


def _activation(name: str) -> nn.Module:
    if name != "gelu":
        raise ValueError(f"EfficientSAM uses exact GELU; hidden_act={name!r} is not supported")
    return nn.GELU()


# Half-precision attention on CPU: attentions up to this many query-key pairs (the mask decoder's)
# always use two matrix products; larger ones (the encoder's 4096 x 4096) do so at inference only,
# a block of queries at a time; training keeps the fused kernel's memory-saving backward there.
_CPU_MATMUL_ATTENTION_MAX_TRAINING_PAIRS = 1 << 20
_CPU_BLOCKED_ATTENTION_BLOCK_PAIRS = 1 << 21


def _blocked_attention(query, key, value):
    """Softmax attention computed a block of queries at a time (exact; memory bounded by the block).

    On CPUs with fast bfloat16 matrix units, two bf16 matrix products per block beat the fused
    kernel, whose inner loops do not use those units; each block's scores stay small enough for cache.
    """
    scale = query.shape[-1] ** -0.5
    key_t = key.transpose(-2, -1)
    block = max(1, _CPU_BLOCKED_ATTENTION_BLOCK_PAIRS // key.shape[-2])
    outputs = []
    for start in range(0, query.shape[-2], block):
        scores = torch.matmul(query[..., start : start + block, :], key_t) * scale
        outputs.append(torch.matmul(scores.softmax(dim=-1), value))
    return torch.cat(outputs, dim=-2)


def _attention(query, key, value, implementation: Optional[str], return_weights: bool = False):
    """Scaled dot-product attention over (..., heads, tokens, head_dim) tensors.

    The eager branch is the reference arithmetic of the original implementation; the sdpa branch
    is the fused kernel (same result up to float rounding), except for half-precision attention on
    CPU, where `_blocked_attention` is faster (same math; see the thresholds above).
    Attention weights need the eager branch.
    """
    if implementation in (None, "sdpa") and not return_weights:
        if query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16):
            training = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
            if not training or query.shape[-2] * key.shape[-2] <= _CPU_MATMUL_ATTENTION_MAX_TRAINING_PAIRS:
                return _blocked_attention(query, key, value), None
        if torch.compiler.is_compiling():
            # inductor's CPU attention lowering mis-broadcasts inputs expanded with zero strides (the
            # image stream shared by every query): give it dense tensors
            query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        return F.scaled_dot_product_attention(query, key, value), None
    weights = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(query.shape[-1])
    weights = weights.softmax(dim=-1)
    return torch.matmul(weights, value), weights


class ReferenceMlp(nn.Module):
    """`num_layers - 1` (Linear, GELU) blocks followed by a final Linear named `fc`."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, act: str = "gelu"):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(dims[i], dims[i + 1]), _activation(act)) for i in range(num_layers - 1)
        )
        self.fc = nn.Linear(dims[-1], output_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.fc(hidden_states)


class ReferenceDecoderAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections to an internal width."""

    def __init__(self, config: EfficientSamMaskDecoderConfig, downsample_rate: int = 1):
        super().__init__()
        self.config = config  # `_attn_implementation` is read at call time
        hidden_size, num_heads = config.hidden_size, config.num_attention_heads
        internal = hidden_size // downsample_rate
        if internal % num_heads:
            raise ValueError(f"attention width {internal} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, internal)
        self.k_proj = nn.Linear(hidden_size, internal)
        self.v_proj = nn.Linear(hidden_size, internal)
        self.out_proj = nn.Linear(internal, hidden_size)

    def split_heads(self, projected: torch.Tensor) -> torch.Tensor:
        *lead, tokens, width = projected.shape
        return projected.reshape(*lead, tokens, self.num_heads, width // self.num_heads).transpose(-3, -2)

    def attend(self, query, key, value, return_weights: bool = False):
        """Attention over already projected and head-split tensors; returns (output, weights)."""
        attended, weights = _attention(query, key, value, self.config._attn_implementation, return_weights)
        attended = attended.transpose(-3, -2)
        return self.out_proj(attended.reshape(*attended.shape[:-2], -1)), weights

    def forward(self, query, key, value, return_weights: bool = False):
        return self.attend(
            self.split_heads(self.q_proj(query)),
            self.split_heads(self.k_proj(key)),
            self.split_heads(self.v_proj(value)),
            return_weights,
        )


class ReferenceTwoWayLayer(nn.Module):
    def __init__(self, config: EfficientSamMaskDecoderConfig, add_token_pe: bool):
        super().__init__()
        width, rate = config.hidden_size, config.attention_downsample_rate
        self.add_token_pe = add_token_pe
        self.self_attn = ReferenceDecoderAttention(config)
        self.norm1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.cross_attn_token_to_image = ReferenceDecoderAttention(config, rate)
        self.norm2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = ReferenceMlp(width, config.mlp_dim, width, num_layers=2, act=config.hidden_act)
        self.norm3 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.cross_attn_image_to_token = ReferenceDecoderAttention(config, rate)
        self.norm4 = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, tokens, token_pe, image, image_pe, shared_image: bool, return_weights: bool = False):
        """One two-way layer.

        tokens, token_pe: (B, Q, T, C). image: (B, HW, C) when `shared_image` (the image stream is
        still the same for every query of an image, as in the first layer) else (B, Q, HW, C).
        image_pe: (1, HW, C).
        """
        batch, queries, num_tokens, width = tokens.shape
        if self.add_token_pe:
            tokens = tokens + token_pe
        attended, _ = self.self_attn(tokens, tokens, tokens)
        tokens = self.norm1(tokens + attended)

        cross = self.cross_attn_token_to_image
        image_keys = image + image_pe
        query = cross.split_heads(cross.q_proj(tokens + token_pe))  # (B, Q, H, T, d)
        if shared_image:
            # Keys and values depend on the image only: project once per image and let every query of
            # the image attend in one call (rows of a softmax are independent, so this is exact).
            key = cross.split_heads(cross.k_proj(image_keys))  # (B, H, HW, d)
            value = cross.split_heads(cross.v_proj(image))
            heads, head_dim = query.shape[2], query.shape[-1]
            stacked = query.permute(0, 2, 1, 3, 4).reshape(batch, heads, queries * num_tokens, head_dim)
            attended, weights = _attention(stacked, key, value, cross.config._attn_implementation, return_weights)
            attended = attended.reshape(batch, heads, queries, num_tokens, head_dim).permute(0, 2, 3, 1, 4)
            attended = cross.out_proj(attended.reshape(batch, queries, num_tokens, -1))
            if weights is not None:
                weights = weights.reshape(batch, heads, queries, num_tokens, -1).transpose(1, 2)
        else:
            key = cross.split_heads(cross.k_proj(image_keys))
            value = cross.split_heads(cross.v_proj(image))
            attended, weights = cross.attend(query, key, value, return_weights)
        tokens = self.norm2(tokens + attended)
        tokens = self.norm3(tokens + self.mlp(tokens))

        back = self.cross_attn_image_to_token
        token_keys = tokens + token_pe
        key = back.split_heads(back.k_proj(token_keys))  # (B, Q, H, T, d)
        value = back.split_heads(back.v_proj(tokens))
        query = back.split_heads(back.q_proj(image_keys))  # (B, H, HW, d) shared or (B, Q, H, HW, d)
        if shared_image:
            query = query.unsqueeze(1).expand(-1, queries, -1, -1, -1)
            image = image.unsqueeze(1)
        attended, _ = back.attend(query, key, value)
        image = self.norm4(image + attended)
        return tokens, image, weights


class ReferenceTwoWayTransformer(nn.Module):
    def __init__(self, config: EfficientSamMaskDecoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            ReferenceTwoWayLayer(config, add_token_pe=index > 0) for index in range(config.num_hidden_layers)
        )
        self.final_attn_token_to_image = ReferenceDecoderAttention(config, config.attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, tokens, image, image_pe, return_weights: bool = False):
        """tokens: (B, Q, T, C); image: (B, HW, C); image_pe: (1, HW, C)."""
        token_pe = tokens
        all_weights = []
        for index, layer in enumerate(self.layers):
            tokens, image, weights = layer(tokens, token_pe, image, image_pe, index == 0, return_weights)
            all_weights.append(weights)
        if image.dim() == 3:  # no two-way layer: the image stream is still shared
            image = image.unsqueeze(1).expand(-1, tokens.shape[1], -1, -1)
        attended, weights = self.final_attn_token_to_image(
            tokens + token_pe, image + image_pe, image, return_weights
        )
        all_weights.append(weights)
        tokens = self.norm_final_attn(tokens + attended)
        return tokens, image, (tuple(all_weights) if return_weights else None)


class ReferenceMaskDecoder(nn.Module):
    """``EfficientSamMaskDecoder`` of commit 27f6c06, unchanged (see the module docstring)."""

    def __init__(self, config: EfficientSamMaskDecoderConfig):
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.num_mask_tokens = config.num_multimask_outputs + 1
        self.iou_token = nn.Parameter(torch.zeros(1, width))
        self.mask_tokens = nn.Parameter(torch.zeros(self.num_mask_tokens, width))
        self.transformer = ReferenceTwoWayTransformer(config)
        first, second = config.upscaling_dims
        self.upscale_conv1 = nn.ConvTranspose2d(width, first, kernel_size=2, stride=2)
        self.upscale_norm = nn.GroupNorm(1, first, eps=config.layer_norm_eps)
        self.upscale_conv2 = nn.ConvTranspose2d(first, second, kernel_size=2, stride=2)
        self.upscale_act = _activation(config.hidden_act)
        self.output_hypernetworks_mlps = nn.ModuleList(
            ReferenceMlp(width, width, second, num_layers=3, act=config.hidden_act)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = ReferenceMlp(
            width, config.iou_head_hidden_dim, self.num_mask_tokens, config.iou_head_depth, act=config.hidden_act
        )

    def forward(self, image_embeddings, image_pe, prompt_embeddings, multimask_output, output_attentions=False,
                output_hidden_states=False):
        # output_hidden_states is accepted for the current model's call; the upscaled features are always returned
        """image_embeddings (B, C, h, w), image_pe (1, C, h, w), prompt_embeddings (B, Q, P, C)."""
        batch, queries = prompt_embeddings.shape[:2]
        width, height, grid_width = image_embeddings.shape[1:]
        output_tokens = torch.cat([self.iou_token, self.mask_tokens], dim=0).to(prompt_embeddings.dtype)
        output_tokens = output_tokens.expand(batch, queries, -1, -1)
        tokens = torch.cat([output_tokens, prompt_embeddings], dim=2)

        image = image_embeddings.flatten(2).transpose(1, 2)
        image_pe = image_pe.flatten(2).transpose(1, 2).to(image.dtype)
        tokens, image, attentions = self.transformer(tokens, image, image_pe, output_attentions)

        iou_token_out = tokens[:, :, 0]
        mask_tokens_out = tokens[:, :, 1 : 1 + self.num_mask_tokens]
        upscaled = image.transpose(-1, -2).reshape(batch * queries, width, height, grid_width)
        upscaled = self.upscale_act(self.upscale_norm(self.upscale_conv1(upscaled)))
        upscaled = self.upscale_act(self.upscale_conv2(upscaled))
        channels, mask_height, mask_width = upscaled.shape[1:]
        upscaled = upscaled.reshape(batch, queries, channels, mask_height, mask_width)

        # Only the candidates that are returned are computed: tokens 1..3 (multimask) or token 0.
        selected = range(1, self.num_mask_tokens) if multimask_output else range(1)
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[index](mask_tokens_out[:, :, index]) for index in selected], dim=2
        )  # (B, Q, candidates, channels)
        masks = torch.matmul(hyper_in, upscaled.flatten(3)).reshape(batch, queries, -1, mask_height, mask_width)
        iou_pred = self.iou_prediction_head(iou_token_out)[:, :, selected.start : selected.stop]
        output_token_states = tokens[:, :, : 1 + self.num_mask_tokens]
        return masks, iou_pred, attentions, output_token_states, upscaled


__all__ = ["ReferenceMaskDecoder"]


# ------------------------------------------------------------------------------------------------
# The ground-truth loss as it was before the speed work: every term of every candidate computed
# with autograd (the sigmoid recomputed per term) and a 7 x 7 max-pool for the boundary band. The
# baseline training step uses it, so that the measured ratio covers the loss's share of the step.
# ------------------------------------------------------------------------------------------------
def _reference_mask_terms(logits, targets, alpha: float, gamma: float, band_width: int) -> dict:
    logits = logits.float()
    full_targets = targets.to(logits.dtype).expand_as(logits)
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, full_targets, reduction="none")
    p_t = prob * full_targets + (1.0 - prob) * (1.0 - full_targets)
    focal = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        focal = (alpha * full_targets + (1.0 - alpha) * (1.0 - full_targets)) * focal
    terms = {"focal_loss": focal.flatten(-2).mean(-1)}
    for name, union_has_intersection in (("dice_loss", False), ("iou_loss", True)):
        prob = torch.sigmoid(logits).flatten(-2)
        flat_targets = full_targets.flatten(-2)
        intersection = (prob * flat_targets).sum(-1)
        if union_has_intersection:
            terms[name] = 1.0 - (intersection + 1.0) / (prob.sum(-1) + flat_targets.sum(-1) - intersection + 1.0)
        else:
            terms[name] = 1.0 - (2.0 * intersection + 1.0) / (prob.sum(-1) + flat_targets.sum(-1) + 1.0)
    flat = targets.detach().float().reshape(-1, 1, *targets.shape[-2:])
    kernel = 2 * band_width + 1
    dilated = F.max_pool2d(flat, kernel_size=kernel, stride=1, padding=band_width)
    eroded = -F.max_pool2d(-flat, kernel_size=kernel, stride=1, padding=band_width)
    band = ((dilated - eroded) > 0.5).reshape(targets.shape).to(logits.dtype).expand_as(logits).flatten(-2)
    ce = F.binary_cross_entropy_with_logits(logits, full_targets, reduction="none").flatten(-2)
    terms["boundary_loss"] = (ce * band).sum(-1) / band.sum(-1).clamp_min(1.0)
    return terms


def reference_segmentation_loss(*, pred_masks, iou_scores, labels, query_mask, num_queries=None, focal_weight=1.0, dice_weight=1.0,
                                iou_weight=1.0, boundary_weight=0.5, iou_head_weight=1.0, focal_alpha=0.25,
                                focal_gamma=2.0, boundary_band_width=3) -> dict:
    """`segmentation_loss` (same arguments, same values) as computed before the speed work."""
    from modeling_efficientsam.training.losses import iou_head_loss, normalize_over_queries

    per_candidate = _reference_mask_terms(pred_masks, labels.float().unsqueeze(2), focal_alpha, focal_gamma,
                                          boundary_band_width)
    weights = {"focal_loss": focal_weight, "dice_loss": dice_weight, "iou_loss": iou_weight,
               "boundary_loss": boundary_weight}
    combined = sum(weights[name] * value for name, value in per_candidate.items())
    chosen = combined.detach().argmin(dim=-1)

    def pick(value):
        return value.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)

    out = {name: normalize_over_queries(pick(value), query_mask=query_mask, num_queries=num_queries) for name, value in per_candidate.items()}
    out["mask_loss"] = normalize_over_queries(pick(combined), query_mask=query_mask, num_queries=num_queries)
    head = iou_head_loss(iou_scores=iou_scores, pred_masks=pred_masks, targets=labels).mean(-1)
    out["iou_head_loss"] = normalize_over_queries(head, query_mask=query_mask, num_queries=num_queries)
    out["loss"] = out["mask_loss"] + iou_head_weight * out["iou_head_loss"]
    out["chosen_candidate"] = chosen
    return out
