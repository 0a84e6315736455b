"""EfficientSAM as a transformers ``PreTrainedModel``.

Computes exactly what the original EfficientSAM computes (see the reference fixtures), organised for
speed in ways that change only float rounding:

* fused scaled-dot-product attention in the encoder (``attn_implementation="sdpa"``, the default);
* in the mask decoder, work shared by all queries of an image is done once per image (the first
  layer's image keys and values, and the first token-to-image attention runs all queries of an
  image as one attention);
* the decoder's attentions between a query's few tokens and the image positions are folded: the
  projections are applied on the token side (``EfficientSamDecoderAttention.tokens_attend_to_image``
  / ``image_attends_to_tokens``), so no image-sized projection, head split or head merge is formed,
  and the final attention runs only for the output tokens;
* the upscaling and hypernetwork product run as one blocked operation with its own backward
  (``_EfficientSamMaskHead``): kernel-2, stride-2 transposed convolutions are matrix products on
  channels-last pixels, and the large second upscaled map is never stored;
* the per-query image stream is held in chunks of queries, on a CPU small enough for the C
  allocator to reuse their memory (on an accelerator one chunk while training, see
  ``_queries_per_chunk``); in training the token-side work runs once for all queries
  (``_split_queries``), without autograd the chunks are decoded one at a time;
* half precision on CPU is used only where the CPU computes it natively
  (``cpu_half_precision_is_native``); elsewhere autocast falls back to float32, which is faster there.
  Half-precision attention uses PyTorch's fused kernel on CPUs with AMX tiles and blocked matrix
  products on those without (``_cpu_blocked_half_attention_pays``).

``benchmarks/reference_decoder.py`` keeps the decoder as it was before this organisation; the tests
compare the two (outputs and gradients).

This file imports only torch, transformers and the configuration file, so ``save_pretrained`` can
ship it for ``trust_remote_code`` loading where this package is not installed.
"""

from __future__ import annotations

import functools
import math
import os
import platform
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput, logging

from .configuration_efficientsam import (  # noqa: F401  (MAX_POINTS_PER_QUERY is re-exported with the labels)
    MAX_POINTS_PER_QUERY,
    EfficientSamConfig,
    EfficientSamMaskDecoderConfig,
    EfficientSamVisionConfig,
)

logger = logging.get_logger(__name__)

# Point labels understood by the prompt encoder.
LABEL_PADDING = -1
LABEL_NEGATIVE = 0
LABEL_POSITIVE = 1
LABEL_BOX_TOP_LEFT = 2
LABEL_BOX_BOTTOM_RIGHT = 3
VALID_LABELS = (LABEL_PADDING, LABEL_NEGATIVE, LABEL_POSITIVE, LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT)


@dataclass
class EfficientSamImageSegmentationOutput(ModelOutput):
    """Output of [`EfficientSamModel`].

    B is the batch size, Q the number of queries per image, M the candidates per query (3 with
    multimask output, else 1), C the embedding width (256), h x w the embedding grid (64 x 64 at 1024
    input) and 4h x 4w the low-resolution mask size (256 x 256).

    Args:
        iou_scores (`torch.FloatTensor` of shape `(B, Q, M)`): predicted IoU of each candidate mask.
        pred_masks (`torch.FloatTensor` of shape `(B, Q, M, 4h, 4w)`): mask logits (threshold 0).
        image_embeddings (`torch.FloatTensor` of shape `(B, C, h, w)`): the image encoder output (or the
            embeddings that were passed in).
        vision_hidden_states (`tuple(torch.FloatTensor)`, with `output_hidden_states`): encoder token
            states of shape `(B, h, w, D)`: after the position embedding, then after each block.
        mask_decoder_attentions (`tuple(torch.FloatTensor)`, with `output_attentions`): token-to-image
            attention probabilities of the decoder, one per two-way layer plus the final attention, each
            `(B, Q, heads, T, h * w)` with T = 5 + max points (11) tokens per query.
        mask_decoder_output_tokens (`torch.FloatTensor` of shape `(B, Q, 5, C)`, with
            `output_hidden_states`): the IoU token and the 4 mask tokens after the two-way transformer.
        upscaled_embeddings (`torch.FloatTensor` of shape `(B, Q, C', 4h, 4w)`, with
            `output_hidden_states`): the upscaled per-query image features that the hypernetworks read
            (C' = 32).
    """

    iou_scores: Optional[torch.FloatTensor] = None
    pred_masks: Optional[torch.FloatTensor] = None
    image_embeddings: Optional[torch.FloatTensor] = None
    vision_hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    mask_decoder_attentions: Optional[tuple[torch.FloatTensor, ...]] = None
    mask_decoder_output_tokens: Optional[torch.FloatTensor] = None
    upscaled_embeddings: Optional[torch.FloatTensor] = None


# ----------------------------------------------------------------------------------------------
# Half precision on CPU: used only where the CPU computes it natively
# ----------------------------------------------------------------------------------------------
#: Environment variable: "1" / "0" declares that the CPU does / does not compute bfloat16 and float16
#: natively, instead of detecting it (for machines the detection gets wrong, and for tests).
CPU_NATIVE_HALF_PRECISION_ENV = "EFFICIENTSAM_CPU_NATIVE_HALF"
# /proc/cpuinfo flags of hardware half-precision arithmetic, per dtype: x86 (flags) and ARM (Features).
_X86_HALF_PRECISION_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}
_ARM_HALF_PRECISION_FLAGS = {torch.bfloat16: ("bf16",), torch.float16: ("asimdhp",)}
# Matrix tiles (AMX): PyTorch's fused CPU attention packs half-precision work onto them when present.
_X86_HALF_PRECISION_TILE_FLAGS = {torch.bfloat16: ("amx_bf16",), torch.float16: ("amx_fp16",)}


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    """The CPU feature flags of /proc/cpuinfo ("flags" on x86, "Features" on ARM); empty where unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_half_precision_is_native(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether PyTorch computes `dtype` (bfloat16 or float16) with hardware support on this CPU.

    x86: ATen's kernel level (`torch.backends.cpu.get_cpu_capability()`, which `ATEN_CPU_CAPABILITY`
    can lower) is AVX512 and /proc/cpuinfo lists avx512_bf16 or amx_bf16 (avx512_fp16 or amx_fp16 for
    float16). ARM Linux: the bf16 (asimdhp) feature. Anywhere else, or without /proc/cpuinfo: False.
    `EFFICIENTSAM_CPU_NATIVE_HALF=1` (or `0`) overrides the detection.
    """
    override = os.environ.get(CPU_NATIVE_HALF_PRECISION_ENV, "").strip()
    if override in ("0", "1"):
        return override == "1"
    if dtype not in _X86_HALF_PRECISION_FLAGS:
        return False
    flags = _cpu_flags()
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return any(flag in flags for flag in _X86_HALF_PRECISION_FLAGS[dtype])
    if platform.machine().lower() in ("aarch64", "arm64"):
        return any(flag in flags for flag in _ARM_HALF_PRECISION_FLAGS[dtype])
    return False


def _cpu_blocked_half_attention_pays(dtype: torch.dtype) -> bool:
    """Whether half-precision attention on this CPU is faster as blocked matrix products
    (`_blocked_attention`) than in PyTorch's fused kernel: with native half precision but no matrix
    tiles. With AMX tiles the fused kernel uses them and is the faster one (ViT-T encoder in bf16 on
    a Xeon with AMX: 0.39 s fused, 1.24 s blocked, 1.03 s float32); without native support neither
    pays and the model runs float32 (see `_cpu_autocast_without_native_support`)."""
    if not cpu_half_precision_is_native(dtype):
        return False
    return not any(flag in _cpu_flags() for flag in _X86_HALF_PRECISION_TILE_FLAGS.get(dtype, ()))


def _cpu_autocast_without_native_support(device: torch.device) -> bool:
    """True (and one log line) when CPU autocast asks for a half precision this CPU emulates: the
    model then runs in float32, which is faster there (bf16 without hardware support is several times
    slower than float32)."""
    if device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return False
    dtype = torch.get_autocast_dtype("cpu")
    if dtype == torch.float32 or cpu_half_precision_is_native(dtype):
        return False
    name = str(dtype).replace("torch.", "")
    logger.warning_once(
        f"This CPU has no native {name} arithmetic (ATen capability {torch.backends.cpu.get_cpu_capability()}): "
        f"EfficientSAM runs in float32 instead of {name} autocast, which is faster here "
        f"(set {CPU_NATIVE_HALF_PRECISION_ENV}=1 to force half precision)."
    )
    return True


def _activation(name: str) -> nn.Module:
    if name != "gelu":
        raise ValueError(f"EfficientSAM uses exact GELU; hidden_act={name!r} is not supported")
    return nn.GELU()


# Half-precision attention on a CPU where blocked matrix products pay (native half precision without
# matrix tiles, see `_cpu_blocked_half_attention_pays`): attentions up to this many query-key pairs
# (the mask decoder's) always use two matrix products; larger ones (the encoder's 4096 x 4096) do so
# at inference only, a block of queries at a time; training keeps the fused kernel's memory-saving
# backward there.
_CPU_MATMUL_ATTENTION_MAX_TRAINING_PAIRS = 1 << 20
_CPU_BLOCKED_ATTENTION_BLOCK_PAIRS = 1 << 21


def _blocked_attention(query, key, value, key_bias=None):
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
        if key_bias is not None:
            scores = scores + key_bias
        outputs.append(torch.matmul(scores.softmax(dim=-1), value))
    return torch.cat(outputs, dim=-2)


def _attention(query, key, value, implementation: Optional[str], return_weights: bool = False, key_bias=None):
    """Scaled dot-product attention over (..., heads, tokens, head_dim) tensors.

    The eager branch is the reference arithmetic of the original implementation; the sdpa branch
    is the fused kernel (same result up to float rounding), except for half-precision attention on
    a CPU with native half precision but no matrix tiles, where `_blocked_attention` is faster (same
    math; see the thresholds above). Attention weights need the eager branch.

    `key_bias` (broadcastable to (..., 1, keys)) is added to the scaled scores of every query: the
    log-multiplicity of merged repeated tokens (see `_merge_repeated_prompt_tokens`), or None.
    """
    if key_bias is not None:
        key_bias = key_bias.to(query.dtype)
    if implementation in (None, "sdpa") and not return_weights:
        if (query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16)
                and _cpu_blocked_half_attention_pays(query.dtype)):
            training = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
            if not training or query.shape[-2] * key.shape[-2] <= _CPU_MATMUL_ATTENTION_MAX_TRAINING_PAIRS:
                return _blocked_attention(query, key, value, key_bias), None
        if torch.compiler.is_compiling():
            # inductor's CPU attention lowering mis-broadcasts inputs expanded with zero strides (the
            # image stream shared by every query): give it dense tensors
            query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        return F.scaled_dot_product_attention(query, key, value, attn_mask=key_bias), None
    weights = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(query.shape[-1])
    if key_bias is not None:
        weights = weights + key_bias
    weights = weights.softmax(dim=-1)
    return torch.matmul(weights, value), weights


def _merge_repeated_prompt_tokens(prompts: torch.Tensor):
    """Merge the prompt tokens of a query that are exactly equal: (prompts (B, Q, U, C), log_multiplicity (B, Q, U)).

    A box query is 2 corner tokens and 4 identical padding tokens (a lone point: 1 and 5). The mask
    decoder treats a query's tokens symmetrically and token by token (self-attention, MLP and norms
    per token, attention over the image per token), so equal tokens stay equal through every layer;
    where they are attended to (self-attention, the image attending to the tokens), m equal keys
    with equal values weigh as one key whose score is raised by log m. The merged decoder computes
    the same function with fewer tokens (for boxes 8 instead of 11 with the 5 output tokens): the
    image-sized attention products shrink in proportion.

    U is the largest count of distinct tokens over the queries; a query with fewer has empty slots
    (a copy of one of its tokens with log-multiplicity -inf, so never attended to). The gradient that
    reaches a merged token is shared equally by its m copies, as the unmerged decoder gives it (equal
    tokens get equal gradients by symmetry). Returns (prompts, None) when no token repeats.
    """
    count = prompts.shape[2]
    same = (prompts.unsqueeze(3) == prompts.unsqueeze(2)).all(-1)  # (B, Q, P, P)
    first = ~torch.tril(same, diagonal=-1).any(-1)  # (B, Q, P): not equal to an earlier token
    distinct = first.sum(-1)
    slots = int(distinct.max())
    if slots == count:
        return prompts, None
    positions = torch.arange(count, device=prompts.device)
    # the positions of each query's distinct tokens in order, then (empty slots) any of its tokens
    order = torch.where(first, positions, positions + count).argsort(dim=-1)[..., :slots]  # (B, Q, U)
    valid = torch.arange(slots, device=prompts.device) < distinct.unsqueeze(-1)
    members = torch.gather(same, 2, order.unsqueeze(-1).expand(-1, -1, -1, count)) & valid.unsqueeze(-1)  # (B, Q, U, P)
    multiplicity = members.sum(-1)
    # in the prompts' dtype (float64 for a float64 model: log 4 rounded to float32 would show)
    log_multiplicity = multiplicity.to(prompts.dtype).log().masked_fill(~valid, float("-inf"))
    merged = torch.gather(prompts, 2, order.unsqueeze(-1).expand(-1, -1, -1, prompts.shape[-1]))
    if prompts.requires_grad:
        # forward: the gathered token exactly; backward: each copy gets 1/m of the merged token's gradient
        share = members.to(prompts.dtype) / multiplicity.clamp_min(1).unsqueeze(-1).to(prompts.dtype)
        averaged = torch.matmul(share, prompts)
        merged = merged.detach() + (averaged - averaged.detach())
    return merged, log_multiplicity


def _as_float32(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Half-precision floating tensors as float32 (for the float32 fallback); anything else unchanged."""
    if tensor is not None and tensor.dtype in (torch.bfloat16, torch.float16):
        return tensor.float()
    return tensor


class EfficientSamLayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) map."""

    def __init__(self, num_channels: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mean = hidden_states.mean(1, keepdim=True)
        variance = (hidden_states - mean).pow(2).mean(1, keepdim=True)
        hidden_states = (hidden_states - mean) / torch.sqrt(variance + self.eps)
        return self.weight[:, None, None] * hidden_states + self.bias[:, None, None]


# ----------------------------------------------------------------------------------------------
# Image encoder
# ----------------------------------------------------------------------------------------------


class EfficientSamVisionAttention(nn.Module):
    def __init__(self, config: EfficientSamVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        if config.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not divisible by {self.num_heads} heads")
        self.config = config  # `_attn_implementation` is read at call time, as transformers' models do
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended, _ = _attention(query, key, value, self.config._attn_implementation)
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, width))


class EfficientSamVisionMlp(nn.Module):
    def __init__(self, config: EfficientSamVisionConfig):
        super().__init__()
        hidden = int(config.hidden_size * config.mlp_ratio)
        self.fc1 = nn.Linear(config.hidden_size, hidden)
        self.act = _activation(config.hidden_act)
        self.fc2 = nn.Linear(hidden, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class EfficientSamVisionLayer(nn.Module):
    """Pre-norm transformer block with global attention."""

    def __init__(self, config: EfficientSamVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = EfficientSamVisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = EfficientSamVisionMlp(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.layer_norm1(hidden_states))
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class EfficientSamVisionNeck(nn.Module):
    def __init__(self, config: EfficientSamVisionConfig):
        super().__init__()
        first, second = config.neck_hidden_sizes
        self.conv1 = nn.Conv2d(config.hidden_size, first, kernel_size=1, bias=False)
        self.layer_norm1 = EfficientSamLayerNorm2d(first, eps=config.layer_norm_eps)
        self.conv2 = nn.Conv2d(first, second, kernel_size=3, padding=1, bias=False)
        self.layer_norm2 = EfficientSamLayerNorm2d(second, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layer_norm2(self.conv2(self.layer_norm1(self.conv1(hidden_states))))


class EfficientSamVisionEncoder(nn.Module):
    def __init__(self, config: EfficientSamVisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        pretrain_grid = config.pretrain_image_size // config.patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid * pretrain_grid, config.hidden_size))
        self.layers = nn.ModuleList(EfficientSamVisionLayer(config) for _ in range(config.num_hidden_layers))
        self.neck = EfficientSamVisionNeck(config)
        self.gradient_checkpointing = False

    def resized_position_embedding(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """The stored (pre-training grid) position embedding resized bicubically to the token grid."""
        positions = self.pos_embed[:, 1:]
        side = int(math.isqrt(positions.shape[1]))
        grid = positions.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if (side, side) != (grid_height, grid_width):
            grid = F.interpolate(grid, size=(grid_height, grid_width), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
        hidden_states = self.patch_embed(pixel_values).permute(0, 2, 3, 1)
        batch, grid_height, grid_width, width = hidden_states.shape
        hidden_states = hidden_states + self.resized_position_embedding(grid_height, grid_width)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        hidden_states = hidden_states.reshape(batch, grid_height * grid_width, width)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states = self._gradient_checkpointing_func(layer.__call__, hidden_states)
            else:
                hidden_states = layer(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states.reshape(batch, grid_height, grid_width, width),)
        hidden_states = hidden_states.reshape(batch, grid_height, grid_width, width).permute(0, 3, 1, 2)
        return self.neck(hidden_states), all_hidden_states


# ----------------------------------------------------------------------------------------------
# Prompt encoder
# ----------------------------------------------------------------------------------------------


class EfficientSamPositionalEmbedding(nn.Module):
    """Random Fourier features of normalized (x, y) coordinates: [sin, cos] of 2 pi (2c - 1) G."""

    def __init__(self, num_features: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_features))

    def forward(self, coordinates: torch.Tensor) -> torch.Tensor:
        coordinates = 2 * coordinates - 1
        coordinates = coordinates.to(self.positional_encoding_gaussian_matrix.dtype)
        coordinates = 2 * math.pi * (coordinates @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(coordinates), torch.cos(coordinates)], dim=-1)


class EfficientSamPromptEncoder(nn.Module):
    def __init__(self, config: EfficientSamConfig):
        super().__init__()
        self.image_size = config.image_size
        self.image_embedding_size = config.image_embedding_size
        width = config.image_embedding_width
        self.shared_embedding = EfficientSamPositionalEmbedding(width // 2)
        self.invalid_point_embed = nn.Parameter(torch.zeros(1, width))
        self.point_embed = nn.Parameter(torch.zeros(1, width))
        self.box_top_left_embed = nn.Parameter(torch.zeros(1, width))
        self.box_bottom_right_embed = nn.Parameter(torch.zeros(1, width))

    @property
    def coordinate_dtype(self) -> torch.dtype:
        """Prompt coordinates are encoded in float64 for a float64 model and in float32 otherwise
        (a half-precision model still takes its coordinates in float32 before the Fourier features)."""
        matrix_dtype = self.shared_embedding.positional_encoding_gaussian_matrix.dtype
        return torch.float64 if matrix_dtype == torch.float64 else torch.float32

    def dense_positional_embedding(self) -> torch.Tensor:
        """(1, C, h, w) encoding of the centres of the image-embedding grid cells."""
        size = self.image_embedding_size
        device = self.shared_embedding.positional_encoding_gaussian_matrix.device
        centres = (torch.arange(size, device=device, dtype=self.coordinate_dtype) + 0.5) / size
        grid = torch.stack(
            [centres[None, :].expand(size, size), centres[:, None].expand(size, size)], dim=-1
        )  # (h, w, 2) as (x, y)
        return self.shared_embedding(grid).permute(2, 0, 1).unsqueeze(0)

    def forward(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Embed (..., P, 2) points in the model input frame with (..., P) labels into (..., P, C)."""
        coordinates = (points + 0.5) / self.image_size
        embeddings = self.shared_embedding(coordinates)
        labels = labels[..., None]
        embeddings = embeddings + self.invalid_point_embed * (labels == LABEL_PADDING)
        embeddings = embeddings + self.point_embed * (labels == LABEL_POSITIVE)
        embeddings = embeddings + self.box_top_left_embed * (labels == LABEL_BOX_TOP_LEFT)
        embeddings = embeddings + self.box_bottom_right_embed * (labels == LABEL_BOX_BOTTOM_RIGHT)
        return embeddings


# ----------------------------------------------------------------------------------------------
# Mask decoder
# ----------------------------------------------------------------------------------------------


class EfficientSamMlp(nn.Module):
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


def _tracing() -> bool:
    """torch.compile / TorchScript / ONNX tracing: such tracers get the plain operations."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype products run in: autocast's when it is on, else the tensor's."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


class _ImageScores(torch.autograd.Function):
    """`offset + rows @ image^T`: (G, R, C) rows against a (G, HW, C) image -> (G, R, HW) scores.

    A batched product with a custom backward only so that the image's gradient is produced in the
    image's own (HW, C) layout: autograd's would arrive transposed, and adding a transposed gradient
    to the image stream's other gradients is a slow strided pass over an image-sized tensor.
    """

    @staticmethod
    def forward(ctx, rows, image, offset):
        ctx.save_for_backward(rows, image)
        return torch.baddbmm(offset, rows, image.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        rows, image = ctx.saved_tensors
        grad_rows = torch.bmm(grad, image) if ctx.needs_input_grad[0] else None
        grad_image = torch.bmm(grad.transpose(1, 2), rows) if ctx.needs_input_grad[1] else None
        grad_offset = grad.sum(-1, keepdim=True) if ctx.needs_input_grad[2] else None
        return grad_rows, grad_image, grad_offset


def _image_scores(rows: torch.Tensor, image: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """`_ImageScores` in the autocast dtype when autocast is on (as a plain baddbmm would be)."""
    dtype = _compute_dtype(image)
    with torch.autocast(image.device.type, enabled=False):
        return _ImageScores.apply(rows.to(dtype), image.to(dtype), offset.to(dtype))


class _TokensAttendToImage(torch.autograd.Function):
    """Per-query rows attend to a per-query image: `softmax(offset + rows @ keys^T) @ image`.

    rows (G, R, C), offset (G, R, 1), image and keys (G, HW, C) -> (pooled (G, R, C), image). `keys`
    is the image plus a constant (the positional encoding), passed without autograd history: its
    gradient is the image's. The image is returned as a second output for the image's next user
    (the next attention, or the mask head), so that its gradient arrives here: the backward then
    gives the image its whole gradient (that one, plus through the scores and the weighted sum) in
    one fused multiply-add, `dnext + [dscores; probabilities]^T @ [rows; dpooled]`, instead of two
    image-sized products and two image-sized sums.
    """

    @staticmethod
    def forward(ctx, rows, offset, image, keys):
        ctx.set_materialize_grads(False)
        probabilities = torch.baddbmm(offset, rows, keys.transpose(1, 2)).softmax(dim=-1)
        ctx.save_for_backward(rows, image, keys, probabilities)
        return torch.bmm(probabilities, image), image.view_as(image)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_pooled, grad_next):
        rows, image, keys, probabilities = ctx.saved_tensors
        if grad_pooled is None:
            return None, None, grad_next, None
        grad_pooled = grad_pooled.to(image.dtype)
        grad_probabilities = torch.bmm(grad_pooled, image.transpose(1, 2))
        grad_scores = torch._softmax_backward_data(grad_probabilities, probabilities, -1, probabilities.dtype)
        grad_rows = torch.bmm(grad_scores, keys) if ctx.needs_input_grad[0] else None
        grad_offset = grad_scores.sum(-1, keepdim=True) if ctx.needs_input_grad[1] else None
        grad_image = None
        if ctx.needs_input_grad[2]:
            left = torch.cat([grad_scores, probabilities], dim=1).transpose(1, 2)
            right = torch.cat([rows, grad_pooled], dim=1)
            if grad_next is None:
                grad_image = torch.bmm(left, right)
            elif grad_next.dtype == left.dtype and grad_next.is_contiguous():
                # in place: the image's next users in the decoder (the next attention's function, the
                # mask head) hand over a gradient tensor of their own that nothing else holds
                grad_image = grad_next.baddbmm_(left, right)
            elif grad_next.dtype == left.dtype:
                grad_image = torch.baddbmm(grad_next, left, right)
            else:
                grad_image = torch.bmm(left, right).to(grad_next.dtype).add_(grad_next)
        return grad_rows, grad_offset, grad_image, None


class _ImageAttendsToTokens(torch.autograd.Function):
    """Each pixel of a per-query image attends to the query's tokens, with the residual:
    `image + P^T @ values`, P the softmax over the T tokens (per head) of `offset + rows @ keys^T`.

    rows (G, T * heads, C) token-major, offset (G, T * heads, 1), values (G, T * heads, C), image and
    keys (G, HW, C) -> (G, HW, C). `keys` as in `_TokensAttendToImage`. The backward gives the image
    its gradient (residual plus scores) in one fused multiply-add, `baddbmm(dnew, dscores^T, rows)`.
    The image may be in a wider dtype than the products (float32 under bf16 autocast): the residual
    is then added in the image's dtype.
    """

    @staticmethod
    def forward(ctx, rows, offset, values, image, keys, num_tokens):
        groups, num_rows = rows.shape[:2]
        scores = torch.baddbmm(offset, rows, keys.transpose(1, 2))
        probabilities = scores.view(groups, num_tokens, -1).softmax(dim=1).view(groups, num_rows, -1)
        ctx.save_for_backward(rows, values, keys, probabilities)
        ctx.num_tokens = num_tokens
        if image.dtype == values.dtype:
            return torch.baddbmm(image, probabilities.transpose(1, 2), values)
        return torch.bmm(probabilities.transpose(1, 2), values).to(image.dtype).add_(image)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_image):
        rows, values, keys, probabilities = ctx.saved_tensors
        groups, num_rows = rows.shape[:2]
        grad = grad_image.to(keys.dtype)
        grad_values = torch.bmm(probabilities, grad) if ctx.needs_input_grad[2] else None
        grad_probabilities = torch.bmm(values, grad.transpose(1, 2))
        grad_scores = torch._softmax_backward_data(
            grad_probabilities.view(groups, ctx.num_tokens, -1), probabilities.view(groups, ctx.num_tokens, -1), 1,
            probabilities.dtype,
        ).view(groups, num_rows, -1)
        grad_rows = torch.bmm(grad_scores, keys) if ctx.needs_input_grad[0] else None
        grad_offset = grad_scores.sum(-1, keepdim=True) if ctx.needs_input_grad[1] else None
        grad_input = None
        if ctx.needs_input_grad[3]:
            if grad_image.dtype == rows.dtype and grad_image.is_contiguous():
                # in place (after its last read above): the layer norm that follows hands over its own
                grad_input = grad_image.baddbmm_(grad_scores.transpose(1, 2), rows)
            elif grad_image.dtype == rows.dtype:
                grad_input = torch.baddbmm(grad_image, grad_scores.transpose(1, 2), rows)
            else:
                grad_input = torch.bmm(grad_scores.transpose(1, 2), rows).to(grad_image.dtype).add_(grad_image)
        return grad_rows, grad_offset, grad_values, grad_input, None, None


class EfficientSamDecoderAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections to an internal width.

    Attention between the few tokens of a query and the h * w image positions also has two folded
    forms, used by the mask decoder (see `EfficientSamTwoWayLayer`): `tokens_attend_to_image` and
    `image_attends_to_tokens`. They compute the same function as `forward` with the projections
    applied on the token side, so no image-sized projection, head split or head merge is made.
    """

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

    def attend(self, query, key, value, return_weights: bool = False, key_bias=None):
        """Attention over already projected and head-split tensors; returns (output, weights)."""
        attended, weights = _attention(query, key, value, self.config._attn_implementation, return_weights, key_bias)
        attended = attended.transpose(-3, -2)
        return self.out_proj(attended.reshape(*attended.shape[:-2], -1)), weights

    def forward(self, query, key, value, return_weights: bool = False, key_bias=None):
        """`key_bias` (..., keys): added to every head's scores of each key (see `_attention`)."""
        if key_bias is not None:
            key_bias = key_bias.unsqueeze(-2).unsqueeze(-3)  # over heads and queries
        return self.attend(
            self.split_heads(self.q_proj(query)),
            self.split_heads(self.k_proj(key)),
            self.split_heads(self.v_proj(value)),
            return_weights,
            key_bias,
        )

    def _head_weights(self, projection: nn.Linear) -> tuple:
        """A projection's weight as (heads, head_dim, in) and bias as (heads, head_dim)."""
        heads = self.num_heads
        weight, bias = projection.weight, projection.bias
        return weight.reshape(heads, -1, weight.shape[-1]), bias.reshape(heads, -1)

    def tokens_attend_to_image(self, query_tokens, image_keys, image, fused: bool = False,
                               compute_dtype_image: bool = False):
        """Per-query tokens attend to a per-query image stream: `forward(query_tokens, image_keys, image)`.

        query_tokens (B, Q, T, C); image_keys, image (B, Q, HW, C), or lists of such chunks that split
        the Q queries in order (see `_split_queries`). Returns the output (B, Q, T, C), the attention
        probabilities (B, Q, heads, T, HW), and the image for its next user, chunked as it came. The
        token-side work runs once for all queries, the image-sized work chunk by chunk. With `fused`,
        `image_keys` is the image plus the positional encoding made without autograd,
        `_TokensAttendToImage` computes the attention (its backward gives the image the keys'
        gradient too), no probabilities are returned (None), and the returned image is the function's
        pass-through output: the image's later users must take that one (see `_TokensAttendToImage`).
        Under autocast the pass-through is the image in the compute dtype; it is returned only with
        `compute_dtype_image` (for a next user that computes in that dtype anyway, the mask head),
        else the image stream is returned as it came.

        Folded: a head's scores q_h . (W_k,h x + b_k,h) are (q_h W_k,h) . x + q_h . b_k,h, so each head's
        queries are mapped back to the C input channels (heads * T rows) and multiplied with the image
        keys directly; since the probabilities of a row sum to one, the values' projection is applied
        after the weighted sum: sum_j p_j (W_v x_j + b_v) = W_v (sum_j p_j x_j) + b_v. The image-sized
        key and value projections (and their copies into heads) are never formed.
        """
        chunked = isinstance(image, (list, tuple))
        images, all_keys = (list(image), list(image_keys)) if chunked else ([image], [image_keys])
        sizes = [part.shape[1] for part in images]
        batch, queries, num_tokens, width = query_tokens.shape
        heads = self.num_heads
        key_weight, key_bias = self._head_weights(self.k_proj)
        value_weight, value_bias = self._head_weights(self.v_proj)
        scale = key_weight.shape[1] ** -0.5
        query = self.q_proj(query_tokens).reshape(batch, queries, num_tokens, heads, -1) * scale
        folded = torch.einsum("bqthd,hdc->bqhtc", query, key_weight.to(query.dtype))
        offset = torch.einsum("bqthd,hd->bqht", query, key_bias.to(query.dtype))
        rows = heads * num_tokens
        pooled, probabilities, passed_on = [], [], []
        for folded_part, offset_part, keys, part in zip(_split_queries(folded, sizes), _split_queries(offset, sizes),
                                                        all_keys, images):
            groups = batch * part.shape[1]
            keys = keys.reshape(groups, -1, width)
            if fused:
                dtype = _compute_dtype(part)
                with torch.autocast(part.device.type, enabled=False):
                    pooled_part, passed = _TokensAttendToImage.apply(
                        folded_part.reshape(groups, rows, width).to(dtype), offset_part.reshape(groups, rows, 1).to(dtype),
                        part.reshape(groups, -1, width).to(dtype), keys.to(dtype))
                if passed.dtype == part.dtype or compute_dtype_image:
                    part = passed.reshape(part.shape)
            else:
                scores = _image_scores(folded_part.reshape(groups, rows, width), keys, offset_part.reshape(groups, rows, 1))
                weights = scores.softmax(dim=-1)
                pooled_part = torch.bmm(weights.to(part.dtype), part.reshape(groups, -1, width))
                probabilities.append(weights.reshape(batch, -1, heads, num_tokens, weights.shape[-1]))
            pooled.append(pooled_part.reshape(batch, -1, heads, num_tokens, width))
            passed_on.append(part)
        pooled = _join_queries(pooled)
        probabilities = _join_queries(probabilities) if probabilities else None
        values = torch.einsum("bqhtc,hdc->bqthd", pooled, value_weight.to(pooled.dtype)) + value_bias.to(pooled.dtype)
        output = self.out_proj(values.reshape(batch, queries, num_tokens, -1))
        return output, probabilities, (passed_on if chunked else passed_on[0])

    def image_attends_to_tokens(self, image_keys, token_keys, tokens, image, token_bias=None, fused: bool = False,
                                chunk_sizes: Optional[list] = None):
        """The image attends to each query's tokens, with the residual: `image + forward(image_keys, token_keys, tokens)`.

        image_keys, image: (B, HW, C) shared by the Q queries of an image, or (B, Q, HW, C), or lists of
        (B, Q_i, HW, C) chunks that split the queries in order (see `_split_queries`).
        token_keys, tokens: (B, Q, T, C); token_bias: None or (B, Q, T), added to the scores of each
        token (see `_attention`). Returns the new image stream (B, Q, HW, C), before the norm, chunked as
        the image came; a shared image's result is split into chunks of `chunk_sizes` queries when
        given. The token-side work runs once for all queries, the image-sized work chunk by chunk.
        With `fused` (a per-query image only), `image_keys` is made without autograd and
        `_ImageAttendsToTokens` computes the attention (see `tokens_attend_to_image`).

        Folded: a head's scores (W_q,h x + b_q,h) . k_h are x . (W_q,h^T k_h) + b_q,h . k_h, so every
        query's keys become (heads * T) vectors over the C input channels that multiply the image keys
        in one matrix product per image; the output projection is folded into the values
        (sum_t p_t v_t) W_o,h = sum_t p_t (v_t W_o,h), and the output bias into them too (each head's
        probabilities sum to one). The image-sized query projection, head split and head merge are
        never formed, and the softmax runs over the T tokens with the image positions innermost.
        """
        batch, queries, num_tokens, width = tokens.shape
        chunked = isinstance(image, (list, tuple))
        shared = not chunked and image.dim() == 3
        if chunked:
            images, all_keys, sizes = list(image), list(image_keys), [part.shape[1] for part in image]
        elif shared:
            sizes = list(chunk_sizes) if chunk_sizes is not None else [queries]
            images, all_keys = [image] * len(sizes), [image_keys] * len(sizes)
        else:
            images, all_keys, sizes = [image], [image_keys], [queries]
        heads = self.num_heads
        query_weight, query_bias = self._head_weights(self.q_proj)
        scale = query_weight.shape[1] ** -0.5
        keys = self.k_proj(token_keys).reshape(batch, queries, num_tokens, heads, -1) * scale
        values = self.v_proj(tokens).reshape(batch, queries, num_tokens, heads, -1)
        folded = torch.einsum("bqthd,hdc->bqthc", keys, query_weight.to(keys.dtype))
        offset = torch.einsum("bqthd,hd->bqth", keys, query_bias.to(keys.dtype))
        if token_bias is not None:
            offset = offset + token_bias.unsqueeze(-1).to(offset.dtype)
        out_weight = self.out_proj.weight.reshape(width, heads, -1).to(values.dtype)
        projected = torch.einsum("bqthd,chd->bqthc", values, out_weight) + self.out_proj.bias.to(values.dtype) / heads
        rows = num_tokens * heads
        updated = [
            self._image_attends_to_chunk(*parts, shared, fused, rows, num_tokens)
            for parts in zip(_split_queries(folded, sizes), _split_queries(offset, sizes),
                             _split_queries(projected, sizes), all_keys, images)
        ]
        return updated if chunked or (shared and chunk_sizes is not None) else updated[0]

    @staticmethod
    def _image_attends_to_chunk(folded, offset, projected, image_keys, image, shared: bool, fused: bool, rows: int,
                                num_tokens: int):
        """`image_attends_to_tokens` for one chunk of queries: folded, projected (B, q, T, heads, C),
        offset (B, q, T, heads); image_keys, image (B, HW, C) when shared, else (B, q, HW, C)."""
        batch, queries, width = folded.shape[0], folded.shape[1], folded.shape[-1]
        if fused and not shared:
            dtype = _compute_dtype(image)
            groups = batch * queries
            with torch.autocast(image.device.type, enabled=False):
                updated = _ImageAttendsToTokens.apply(
                    folded.reshape(groups, rows, width).to(dtype), offset.reshape(groups, rows, 1).to(dtype),
                    projected.reshape(groups, rows, width).to(dtype), image.reshape(groups, -1, width),
                    image_keys.reshape(groups, -1, width).to(dtype), num_tokens)
            return updated.reshape(batch, queries, -1, width)
        groups = batch if shared else batch * queries
        scores = _image_scores(folded.reshape(groups, -1, width), image_keys.reshape(groups, -1, width),
                               offset.reshape(groups, -1, 1))  # (groups, [q] * T * heads, HW)
        probabilities = scores.reshape(batch * queries, num_tokens, -1).softmax(dim=1)
        probabilities = probabilities.reshape(batch * queries, rows, -1).transpose(1, 2)
        projected = projected.reshape(batch * queries, rows, width).to(probabilities.dtype)
        # The residual is added in place, in the image stream's dtype (under autocast the product is
        # in half precision, the stream is not): a broadcasting add would allocate another image-sized
        # result. torch.matmul's batched result is not a view, so autograd need not copy it.
        if shared:
            probabilities = probabilities.reshape(batch, queries, -1, rows)
            attended = torch.matmul(probabilities, projected.reshape(batch, queries, rows, width))
            return attended.to(image.dtype).add_(image.unsqueeze(1))
        image = image.reshape(batch * queries, -1, width)
        if probabilities.dtype == image.dtype:
            return torch.baddbmm(image, probabilities, projected).reshape(batch, queries, -1, width)
        return torch.bmm(probabilities, projected).to(image.dtype).add_(image).reshape(batch, queries, -1, width)


def _split_queries(tensor: torch.Tensor, sizes: list) -> tuple:
    """`tensor` (B, Q, ...) as chunks of `sizes` queries along dim 1 (itself when there is one chunk).

    The mask decoder keeps a per-query image stream (B, Q, HW, C) as such chunks: each chunk's
    image-sized tensors stay under the device's bound (`_queries_per_chunk`), while the token-side
    work (small tensors) runs once for all Q queries."""
    return (tensor,) if len(sizes) == 1 else tensor.split(sizes, dim=1)


def _join_queries(parts: list) -> torch.Tensor:
    """Inverse of `_split_queries`: chunks (B, Q_i, ...) -> (B, Q, ...)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _fused_image_attention(image_pe: torch.Tensor, return_weights: bool) -> bool:
    """Whether attention between tokens and a per-query image runs as `_TokensAttendToImage` /
    `_ImageAttendsToTokens`: not when attention maps are returned (the fused forms do not keep
    them), under tracers (they trace plain operations), or for a positional encoding that needs a
    gradient (the fused forms give it none; the model's is a buffer)."""
    return not return_weights and not _tracing() and not image_pe.requires_grad


def _image_keys(image: torch.Tensor, image_pe: torch.Tensor, fused: bool) -> torch.Tensor:
    """`image + image_pe`, the keys of the attentions on the image; for the fused functions without
    autograd (they give the image the keys' gradient themselves) and in the dtype they compute in,
    so that under autocast the keys are converted once for the layer's two attentions."""
    if not fused:
        return image + image_pe
    with torch.no_grad():
        return (image + image_pe).to(_compute_dtype(image))


class EfficientSamTwoWayLayer(nn.Module):
    def __init__(self, config: EfficientSamMaskDecoderConfig, add_token_pe: bool):
        super().__init__()
        width, rate = config.hidden_size, config.attention_downsample_rate
        self.add_token_pe = add_token_pe
        self.self_attn = EfficientSamDecoderAttention(config)
        self.norm1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.cross_attn_token_to_image = EfficientSamDecoderAttention(config, rate)
        self.norm2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = EfficientSamMlp(width, config.mlp_dim, width, num_layers=2, act=config.hidden_act)
        self.norm3 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.cross_attn_image_to_token = EfficientSamDecoderAttention(config, rate)
        self.norm4 = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def shared_image_inputs(self, image, image_pe) -> tuple:
        """What the layer computes from an image stream shared by all queries of an image (the first
        layer's): the keys `image + image_pe` and the token-to-image attention's projected keys and
        values, head-split. Made once per call of the decoder, not once per chunk decoded on its own."""
        cross = self.cross_attn_token_to_image
        image_keys = image + image_pe
        return image_keys, cross.split_heads(cross.k_proj(image_keys)), cross.split_heads(cross.v_proj(image))

    def forward(self, tokens, token_pe, image, image_pe, shared_image: bool, return_weights: bool = False,
                token_bias=None, chunk_sizes: Optional[list] = None, shared_inputs: Optional[tuple] = None):
        """One two-way layer.

        tokens, token_pe: (B, Q, T, C). image: (B, HW, C) when `shared_image` (the image stream is
        still the same for every query of an image, as in the first layer) else the per-query stream
        as a list of (B, Q_i, HW, C) chunks that split the queries in order. image_pe: (1, HW, C).
        token_bias: None or (B, Q, T), the log-multiplicity of merged tokens wherever tokens are
        attended to (see `_merge_repeated_prompt_tokens`). chunk_sizes: the queries per chunk of the
        per-query stream that a shared image becomes (None: one chunk). shared_inputs: the
        `shared_image_inputs` of a shared image, when already made. Returns tokens (B, Q, T, C),
        the image stream as a list of chunks and, with `return_weights`, the token-to-image attention
        probabilities (B, Q, heads, T, HW).
        """
        batch, queries, num_tokens, width = tokens.shape
        if self.add_token_pe:
            tokens = tokens + token_pe
        attended, _ = self.self_attn(tokens, tokens, tokens, key_bias=token_bias)
        tokens = self.norm1(tokens + attended)

        cross = self.cross_attn_token_to_image
        fused = not shared_image and _fused_image_attention(image_pe, return_weights)
        if shared_image:
            # Keys and values depend on the image only: project once per image and let every query of
            # the image attend in one call (rows of a softmax are independent, so this is exact).
            image_keys, key, value = shared_inputs or self.shared_image_inputs(image, image_pe)  # key, value (B, H, HW, d)
            query = cross.split_heads(cross.q_proj(tokens + token_pe))  # (B, Q, H, T, d)
            heads, head_dim = query.shape[2], query.shape[-1]
            stacked = query.permute(0, 2, 1, 3, 4).reshape(batch, heads, queries * num_tokens, head_dim)
            attended, weights = _attention(stacked, key, value, cross.config._attn_implementation, return_weights)
            attended = attended.reshape(batch, heads, queries, num_tokens, head_dim).permute(0, 2, 3, 1, 4)
            attended = cross.out_proj(attended.reshape(batch, queries, num_tokens, -1))
            if weights is not None:
                weights = weights.reshape(batch, heads, queries, num_tokens, -1).transpose(1, 2)
        else:
            image_keys = [_image_keys(part, image_pe, fused) for part in image]
            attended, weights, image = cross.tokens_attend_to_image(tokens + token_pe, image_keys, image, fused)
        tokens = self.norm2(tokens + attended)
        tokens = self.norm3(tokens + self.mlp(tokens))

        image = self.cross_attn_image_to_token.image_attends_to_tokens(
            image_keys, tokens + token_pe, tokens, image, token_bias, fused,
            chunk_sizes=(chunk_sizes or [queries]) if shared_image else None)
        image = [self.norm4(part) for part in image]
        return tokens, image, (weights if return_weights else None)


class EfficientSamTwoWayTransformer(nn.Module):
    def __init__(self, config: EfficientSamMaskDecoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            EfficientSamTwoWayLayer(config, add_token_pe=index > 0) for index in range(config.num_hidden_layers)
        )
        self.final_attn_token_to_image = EfficientSamDecoderAttention(config, config.attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def shared_image_inputs(self, image, image_pe) -> Optional[tuple]:
        """The first layer's per-image work (see `EfficientSamTwoWayLayer.shared_image_inputs`), or None."""
        return self.layers[0].shared_image_inputs(image, image_pe) if len(self.layers) else None

    def forward(self, tokens, image, image_pe, return_weights: bool = False, output_tokens: Optional[list] = None,
                token_bias=None, chunk_sizes: Optional[list] = None, shared_inputs: Optional[tuple] = None):
        """tokens: (B, Q, T, C); image: (B, HW, C); image_pe: (1, HW, C); token_bias: None or (B, Q, T),
        see `EfficientSamTwoWayLayer`; chunk_sizes: queries per chunk of the per-query image stream
        (None: one chunk of all Q); shared_inputs: `shared_image_inputs(image, image_pe)` if made.

        Returns tokens, the image stream as a list of (B, Q_i, HW, C) chunks (in the compute dtype
        under autocast when the attentions are fused) and the attention probabilities (with
        `return_weights`). Only the tokens at the positions `output_tokens` go through the final
        attention and are returned, in that order (all T when None or with `return_weights`): the
        decoder reads only the output tokens it needs from there on, and each token's row of that
        attention is independent.
        """
        sizes = list(chunk_sizes) if chunk_sizes is not None else [tokens.shape[1]]
        token_pe = tokens
        all_weights = []
        for index, layer in enumerate(self.layers):
            tokens, image, weights = layer(tokens, token_pe, image, image_pe, index == 0, return_weights, token_bias, sizes,
                                           shared_inputs if index == 0 else None)
            all_weights.append(weights)
        if not isinstance(image, list):  # no two-way layer: the image stream is still shared
            image = [image.unsqueeze(1).expand(-1, size, -1, -1) for size in sizes]
        if output_tokens is not None and not return_weights:
            if list(output_tokens) == list(range(output_tokens[0], output_tokens[-1] + 1)):
                kept = slice(output_tokens[0], output_tokens[-1] + 1)
            else:
                kept = torch.tensor(output_tokens, device=tokens.device)
            tokens, token_pe = tokens[:, :, kept], token_pe[:, :, kept]
        fused = _fused_image_attention(image_pe, return_weights)
        image_keys = [_image_keys(part, image_pe, fused) for part in image]
        # the image's next user is the mask head, which computes in the autocast dtype
        attended, weights, image = self.final_attn_token_to_image.tokens_attend_to_image(
            tokens + token_pe, image_keys, image, fused, compute_dtype_image=True)
        all_weights.append(weights)
        tokens = self.norm_final_attn(tokens + attended)
        return tokens, image, (tuple(all_weights) if return_weights else None)


def _sub_pixel_to_raster(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 16 h w, K) maps in the decoder's sub-pixel order -> (N, K, 4 h, 4 w) in raster order.

    Sub-pixel order: row (y, x, dy1, dx1, dy2, dx2) of the two upscaling steps holds the output
    pixel (4y + 2 dy1 + dy2, 4x + 2 dx1 + dx2).
    """
    channels = maps.shape[-1]
    maps = maps.reshape(-1, height, width, 2, 2, 2, 2, channels)
    return maps.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(-1, channels, 4 * height, 4 * width)


def _raster_to_sub_pixel(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `_sub_pixel_to_raster`: (N, K, 4 h, 4 w) -> (N, 16 h w, K)."""
    channels = maps.shape[1]
    maps = maps.reshape(-1, channels, height, 2, 2, width, 2, 2)
    return maps.permute(0, 2, 5, 3, 6, 4, 7, 1).reshape(-1, 16 * height * width, channels)


def _pixel_convolution_weights(convolution: nn.ConvTranspose2d, dtype: torch.dtype) -> tuple:
    """A kernel-2, stride-2 transposed convolution as a matrix product on channels-last pixels.

    Such a convolution maps every input pixel on its own to a 2 x 2 block of output pixels, so it is
    `pixels (P, C_in) @ weight (C_in, 4 C_out) + bias`: the output row of a pixel holds its 4
    sub-pixels (dy, dx order), each with its C_out channels contiguous. Returns (weight, bias).
    """
    weight = convolution.weight  # (C_in, C_out, 2, 2)
    weight = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], 4 * weight.shape[1])
    return weight.to(dtype), convolution.bias.repeat(4).to(dtype)


# How the mask decoder bounds its image-sized work depends on the device.
#
# On a CPU, the per-query image stream is held in chunks of queries whose image-sized tensors (the
# stream, its gradients, the first upscaled map) take at most _QUERY_GROUP_BYTES each; the token-side
# work runs once for all queries (see `_split_queries`). glibc's allocator serves larger blocks from
# freshly mapped pages every time, and first touching them costs more than the arithmetic on them;
# blocks below its 32 MiB mapping threshold are reused. The fused mask head works on blocks of
# _MASK_HEAD_BLOCK_ROWS rows of the first upscaled map (C1 channels each): enough for efficient
# matrix products and few operator calls, few enough that a block's intermediates (twice as many
# rows of the second map) stay in cache.
_QUERY_GROUP_BYTES = 24 << 20
_MASK_HEAD_BLOCK_ROWS = 16384

# On an accelerator (CUDA, MPS, XPU, ...) the framework's caching allocator reuses freed blocks of any
# size, and what small blocks cost is one kernel launch each, not cache misses. While autograd records,
# the stream is one chunk (every chunk's tensors are kept for the backward pass anyway); without
# autograd, chunks of at most _ACCELERATOR_QUERY_CHUNK_BYTES bound the memory of inference over many
# prompts. The mask head's blocks hold up to _ACCELERATOR_MASK_HEAD_BLOCK_ROWS first-map rows (64
# queries of a 64 x 64 embedding grid): their temporaries stay near 1 GiB in float32.
_ACCELERATOR_QUERY_CHUNK_BYTES = 512 << 20
_ACCELERATOR_MASK_HEAD_BLOCK_ROWS = 1 << 20


def _sized_for_cpu(device: torch.device) -> bool:
    """Whether the decoder sizes its chunks and blocks for a CPU's caches and allocator (see above)."""
    return device.type == "cpu"


def _queries_per_chunk(device: torch.device, queries: int, bytes_per_query: int, records: bool) -> int:
    """Queries per chunk of the per-query image stream; `bytes_per_query`: one query's float32
    stream over the whole batch; `records`: whether autograd records the decoder."""
    if _tracing():
        return queries
    if _sized_for_cpu(device):
        limit = _QUERY_GROUP_BYTES
    elif records:
        return max(1, queries)
    else:
        limit = _ACCELERATOR_QUERY_CHUNK_BYTES
    return max(1, limit // max(1, bytes_per_query))


def _mask_head_blocks(batch: int, pixels: int, device: torch.device) -> list:
    """Blocks (n0, n1, p0, p1) of about the device's block rows (_MASK_HEAD_BLOCK_ROWS on a CPU)
    of first-map rows: whole queries n0..n1 when a query's 4 * pixels rows fit, else pixel ranges
    p0..p1 of one query. Either way a block is one contiguous slice of a (N, pixels, ...) tensor."""
    rows = _MASK_HEAD_BLOCK_ROWS if _sized_for_cpu(device) else _ACCELERATOR_MASK_HEAD_BLOCK_ROWS
    if 4 * pixels <= rows:
        step = rows // (4 * pixels)
        return [(n, min(n + step, batch), 0, pixels) for n in range(0, batch, step)]
    step = max(1, rows // 4)
    return [(n, n + 1, p, min(p + step, pixels)) for n in range(batch) for p in range(0, pixels, step)]


def _gelu_(tensor: torch.Tensor) -> torch.Tensor:
    """Exact GELU in place (returns the tensor)."""
    return torch.ops.aten.gelu_(tensor)


def _normalization(gamma, beta, mean, rstd) -> tuple:
    """GroupNorm (one group) and its affine as per-query, per-channel scale and shift, (N, 1, C1) each."""
    scale = gamma.to(mean.dtype) * rstd[:, None, None]
    return scale, beta.to(mean.dtype) - mean[:, None, None] * scale


class _EfficientSamMaskHead(torch.autograd.Function):
    """Upscaling and hypernetwork product of the mask decoder, a block of pixels at a time.

    Computes, per query n, `hyper[n] @ gelu(conv2(gelu(groupnorm(conv1(image[n])))))^T`, the same
    function as `EfficientSamMaskDecoder.upscale` followed by the product, in plain operations. Only
    the first upscaled map (4 HW x C1 per query, needed for the group-norm statistics) is stored; the
    second (twice as large) and both activations are computed one block of pixels at a time (see
    `_mask_head_blocks`) and never stored: the backward pass recomputes them block by block. Most of
    the memory traffic then stays in cache.

    Inputs: image (N, HW, C) in the compute dtype; weight1, weight2, bias2 from
    `_pixel_convolution_weights` in the compute dtype, and bias1, conv1's own bias (C1); gamma, beta
    (C1) and eps of the GroupNorm; hyper (N, K, C2); the embedding grid (height, width). Returns
    mask logits (N, K, 4h, 4w). Statistics and the normalization run in float32 (float64 for
    float64 inputs). The first map is stored without conv1's bias, which goes into the statistics
    and the normalization's shift, and in the backward into the products' constant terms (one
    image-sized pass fewer each way).
    """

    @staticmethod
    def forward(ctx, image, weight1, bias1, gamma, beta, eps, weight2, bias2, hyper, height, width):
        batch, pixels, channels = image.shape
        channels1, channels2 = gamma.numel(), hyper.shape[-1]
        dtype = image.dtype
        stat = torch.float64 if dtype == torch.float64 else torch.float32
        with torch.autocast(image.device.type, enabled=False):
            first = torch.mm(image.reshape(-1, channels), weight1).view(batch, pixels, 4 * channels1)  # + bias1
            # GroupNorm statistics of first + bias1 in two passes (mean, then the centred sum of
            # squares): as exact as Welford's, and several times faster than torch.var_mean on CPU
            bias = bias1.to(stat)  # the same for the 4 sub-pixels of a pixel
            count = first[0].numel()
            mean = (first.view(batch, -1).sum(1, dtype=stat) + 4 * pixels * bias.sum()) / count
            pixel_bias = bias.repeat(4)
            blocks = _mask_head_blocks(batch, pixels, image.device)
            groups = sorted({(n0, n1) for n0, n1, _, _ in blocks})  # whole queries, as many as a block holds
            variance = torch.cat([
                (first[n0:n1].to(stat) + (pixel_bias - mean[n0:n1, None, None])).square_().sum((1, 2)) for n0, n1 in groups
            ]) / count
            rstd = torch.rsqrt(variance + eps)
            scale, shift = _normalization(gamma, beta, mean, rstd)
            shift = torch.addcmul(shift, bias, scale)
            logits = torch.empty(batch, 16 * pixels, hyper.shape[1], dtype=dtype, device=image.device)
            hyper_t = hyper.transpose(1, 2)
            for n0, n1, p0, p1 in blocks:
                rows = first[n0:n1, p0:p1].view(n1 - n0, -1, channels1)
                # GELUs in place: a block's temporaries are large, fresh ones cost more than the arithmetic
                activated = _gelu_(torch.addcmul(shift[n0:n1], rows, scale[n0:n1])).to(dtype).view(-1, channels1)
                second = _gelu_(torch.addmm(bias2, activated, weight2)).view(n1 - n0, -1, channels2)
                torch.bmm(second, hyper_t[n0:n1], out=logits[n0:n1, 16 * p0 : 16 * p1])
        ctx.save_for_backward(image, first, mean, rstd, weight1, bias1, gamma, beta, weight2, bias2, hyper)
        ctx.grid = (height, width)
        return _sub_pixel_to_raster(logits, height, width)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logits):
        image, first, mean, rstd, weight1, bias1, gamma, beta, weight2, bias2, hyper = ctx.saved_tensors
        dtype, stat, device = image.dtype, mean.dtype, image.device
        batch, pixels, channels = image.shape
        channels1, channels2 = gamma.numel(), hyper.shape[-1]
        with torch.autocast(device.type, enabled=False):
            grad_logits = _raster_to_sub_pixel(grad_logits.to(dtype), *ctx.grid)
            bias = bias1.to(stat)
            scale, shift = _normalization(gamma, beta, mean, rstd)
            shift = torch.addcmul(shift, bias, scale)
            grad_hyper = torch.zeros(hyper.shape, dtype=stat, device=device)
            grad_weight2 = torch.zeros(weight2.shape, dtype=stat, device=device)
            grad_bias2 = torch.zeros(bias2.shape, dtype=stat, device=device)
            # g = dL/dy * gamma * rstd at the GroupNorm output (y after its affine), written block by
            # block, and the sums per query and channel of dL/dy and dL/dy * first
            grad_first = torch.empty(first.shape, dtype=stat, device=device)
            sum_grad = torch.zeros(batch, channels1, dtype=stat, device=device)
            sum_grad_first = torch.zeros(batch, channels1, dtype=stat, device=device)
            for n0, n1, p0, p1 in _mask_head_blocks(batch, pixels, device):
                first_block = first[n0:n1, p0:p1].view(n1 - n0, -1, channels1)
                normalized = torch.addcmul(shift[n0:n1], first_block, scale[n0:n1])
                activated = F.gelu(normalized).to(dtype).view(-1, channels1)
                before = torch.addmm(bias2, activated, weight2).view(n1 - n0, -1, channels2)
                block_grad = grad_logits[n0:n1, 16 * p0 : 16 * p1]
                grad_before = torch.bmm(block_grad, hyper[n0:n1])
                torch.ops.aten.gelu_backward.grad_input(grad_before, before, grad_input=grad_before)  # in place
                grad_hyper[n0:n1] += torch.bmm(block_grad.transpose(1, 2), _gelu_(before))  # before is not needed after
                grad_before = grad_before.view(-1, 4 * channels2)
                grad_weight2 += torch.mm(activated.t(), grad_before)
                grad_bias2 += grad_before.sum(0)
                grad = grad_first[n0:n1, p0:p1].view(n1 - n0, -1, channels1)
                torch.ops.aten.gelu_backward.grad_input(
                    torch.mm(grad_before, weight2.t()).to(stat).view_as(normalized), normalized, grad_input=grad)
                sum_grad[n0:n1] += grad.sum(1)
                sum_grad_first[n0:n1] += (grad * first_block).sum(1)
                grad.mul_(scale[n0:n1])
            sum_grad_first += bias * sum_grad  # first_block lacked conv1's bias
            # GroupNorm backward (one group): with x_hat = (x - mean) rstd and g = dL/dy * gamma,
            # dL/dx = rstd (g - mean(g) - x_hat mean(g x_hat)), means over all elements of a query;
            # x = first + bias. The terms that do not depend on the pixel (per query and channel)
            # are left out of grad_first and added to the products below.
            count = first[0].numel()
            gamma_ = gamma.to(stat)
            grad_gamma = rstd[:, None] * (sum_grad_first - mean[:, None] * sum_grad)  # per query
            mean_g = (sum_grad * gamma_).sum(1) / count
            mean_g_x_hat = (grad_gamma * gamma_).sum(1) / count
            first_coefficient = (-rstd * rstd * mean_g_x_hat)[:, None, None]
            constant = (-rstd * mean_g + mean * rstd * rstd * mean_g_x_hat)[:, None, None]
            constant = torch.addcmul(constant, bias.repeat(4), first_coefficient)  # (N, 1, 4 C1): for first + bias
            grad_first = grad_first.addcmul_(first.to(stat), first_coefficient).to(dtype)  # (N, P, 4 C1)
            constant = constant.to(dtype)
            grad_image = None
            if ctx.needs_input_grad[0]:
                # + the constant row of each query, through conv1's weight
                grad_image = torch.baddbmm(torch.matmul(constant, weight1.t()), grad_first,
                                           weight1.t().expand(batch, -1, -1))
            grad_first = grad_first.view(-1, 4 * channels1)
            grad_weight1 = torch.mm(image.reshape(-1, channels).t(), grad_first)
            grad_weight1 += image.sum(1).transpose(0, 1) @ constant.squeeze(1)  # sum_n (column sums)^T constant_n
            grad_bias1 = grad_first.view(-1, channels1).sum(0) + pixels * constant.view(batch, 4, channels1).sum((0, 1))
        return (
            grad_image, grad_weight1.to(weight1.dtype), grad_bias1.to(weight1.dtype),
            grad_gamma.sum(0).to(gamma.dtype), sum_grad.sum(0).to(beta.dtype), None,
            grad_weight2.to(weight2.dtype), grad_bias2.to(bias2.dtype), grad_hyper.to(hyper.dtype), None, None,
        )


class EfficientSamMaskDecoder(nn.Module):
    def __init__(self, config: EfficientSamMaskDecoderConfig):
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.num_mask_tokens = config.num_multimask_outputs + 1
        self.iou_token = nn.Parameter(torch.zeros(1, width))
        self.mask_tokens = nn.Parameter(torch.zeros(self.num_mask_tokens, width))
        self.transformer = EfficientSamTwoWayTransformer(config)
        first, second = config.upscaling_dims
        self.upscale_conv1 = nn.ConvTranspose2d(width, first, kernel_size=2, stride=2)
        self.upscale_norm = nn.GroupNorm(1, first, eps=config.layer_norm_eps)
        self.upscale_conv2 = nn.ConvTranspose2d(first, second, kernel_size=2, stride=2)
        self.upscale_act = _activation(config.hidden_act)
        self.output_hypernetworks_mlps = nn.ModuleList(
            EfficientSamMlp(width, width, second, num_layers=3, act=config.hidden_act)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = EfficientSamMlp(
            width, config.iou_head_hidden_dim, self.num_mask_tokens, config.iou_head_depth, act=config.hidden_act
        )

    def upscale(self, image: torch.Tensor) -> torch.Tensor:
        """(N, HW, C) image stream -> (N, 16 HW, C') upscaled features in sub-pixel order (see
        `_sub_pixel_to_raster`): conv1, GroupNorm(1 group), GELU, conv2, GELU, in plain operations."""
        dtype = _compute_dtype(image)
        stat = torch.float64 if dtype == torch.float64 else torch.float32
        weight1, bias1 = _pixel_convolution_weights(self.upscale_conv1, dtype)
        weight2, bias2 = _pixel_convolution_weights(self.upscale_conv2, dtype)
        norm = self.upscale_norm
        batch = image.shape[0]
        with torch.autocast(image.device.type, enabled=False):
            first = torch.addmm(bias1, image.reshape(-1, image.shape[-1]).to(dtype), weight1).reshape(batch, 1, -1)
            # one group: normalize over every channel and pixel of a query, then the per-channel affine
            normalized = F.group_norm(first.to(stat), 1, eps=norm.eps).reshape(batch, -1, norm.num_channels)
            normalized = torch.addcmul(norm.bias.to(stat), normalized, norm.weight.to(stat))
            second = torch.addmm(bias2, F.gelu(normalized).to(dtype).reshape(-1, norm.num_channels), weight2)
        return F.gelu(second).reshape(batch, -1, weight2.shape[1] // 4)

    def predict_masks(self, image, hyper_in, height: int, width: int, return_upscaled: bool = False):
        """Mask logits (N, K, 4h, 4w) from the image stream (N, HW, C) and hypernetwork outputs (N, K, C').

        Training and inference use the fused `_EfficientSamMaskHead`; the plain-operation path is used
        when the upscaled embeddings are returned (`return_upscaled`, then the second value, as
        (N, C', 4h, 4w)), under torch.compile / export (which trace plain operations), and as the
        fused head's reference in the tests.
        """
        dtype = _compute_dtype(image)
        if return_upscaled or _tracing():
            upscaled = self.upscale(image)
            with torch.autocast(image.device.type, enabled=False):
                logits = torch.bmm(upscaled, hyper_in.to(dtype).transpose(1, 2))
            masks = _sub_pixel_to_raster(logits, height, width)
            return masks, (_sub_pixel_to_raster(upscaled, height, width) if return_upscaled else None)
        weight1, _ = _pixel_convolution_weights(self.upscale_conv1, dtype)
        weight2, bias2 = _pixel_convolution_weights(self.upscale_conv2, dtype)
        norm = self.upscale_norm
        masks = _EfficientSamMaskHead.apply(
            image.to(dtype), weight1, self.upscale_conv1.bias, norm.weight, norm.bias, norm.eps, weight2, bias2,
            hyper_in.to(dtype),
            height, width,
        )
        return masks, None

    def forward(self, image_embeddings, image_pe, prompt_embeddings, multimask_output, output_attentions=False,
                output_hidden_states=False):
        """image_embeddings (B, C, h, w), image_pe (1, C, h, w), prompt_embeddings (B, Q, P, C).

        Returns masks (B, Q, M, 4h, 4w), IoU predictions (B, Q, M), the attention probabilities (with
        `output_attentions`), with `output_hidden_states` the output tokens (B, Q, 5, C) and the
        upscaled embeddings (B, Q, C', 4h, 4w) (else None).

        The per-query image stream is kept as chunks of queries whose image-sized tensors stay below
        the device's bound (`_queries_per_chunk`: 24 MiB on a CPU; one chunk on an accelerator while
        autograd records); the token-side work runs once for all queries, the image-sized work chunk
        by chunk. When autograd records, every chunk's tensors are kept for
        the backward pass anyway, so all chunks are decoded together; when it does not (inference,
        evaluation, a frozen teacher), the queries are decoded one chunk at a time, so that memory is
        that of one chunk however many queries there are. The work that depends on the image only
        is done once either way. Each query's outputs are the same in every case.
        """
        batch, queries = prompt_embeddings.shape[:2]
        height, width = image_embeddings.shape[-2:]
        image = image_embeddings.flatten(2).transpose(1, 2).contiguous()  # (B, HW, C), copied once
        image_pe = image_pe.flatten(2).transpose(1, 2).to(image.dtype)
        records = torch.is_grad_enabled() and (
            prompt_embeddings.requires_grad or image.requires_grad or any(p.requires_grad for p in self.parameters()))
        chunk = _queries_per_chunk(image.device, queries, image.numel() * 4, records)  # float32 bytes of one query
        chunk_sizes = [min(chunk, queries - start) for start in range(0, queries, chunk)] or [0]
        grid = (height, width)
        if len(chunk_sizes) == 1 or records:
            return self._decode(image, image_pe, grid, prompt_embeddings, multimask_output, output_attentions,
                                output_hidden_states, chunk_sizes, None)
        shared = self.transformer.shared_image_inputs(image, image_pe)
        parts, start = [], 0
        for size in chunk_sizes:
            parts.append(self._decode(image, image_pe, grid, prompt_embeddings[:, start : start + size], multimask_output,
                                      output_attentions, output_hidden_states, [size], shared))
            start += size
        masks, iou_pred, tokens, upscaled = (
            _join_queries([part[index] for part in parts]) if parts[0][index] is not None else None
            for index in (0, 1, 3, 4)
        )
        attentions = None
        if output_attentions:
            attentions = tuple(_join_queries([part[2][layer] for part in parts]) for layer in range(len(parts[0][2])))
        return masks, iou_pred, attentions, tokens, upscaled

    def _decode(self, image, image_pe, grid, prompt_embeddings, multimask_output, output_attentions,
                output_hidden_states, chunk_sizes, shared):
        """Queries with the image stream in chunks of `chunk_sizes` queries: image (B, HW, C), image_pe
        (1, HW, C), grid (h, w), prompt_embeddings (B, Q, P, C), shared: the transformer's
        `shared_image_inputs` or None. Returns `forward`'s outputs."""
        batch, queries = prompt_embeddings.shape[:2]
        height, width = grid
        output_tokens = torch.cat([self.iou_token, self.mask_tokens], dim=0).to(prompt_embeddings.dtype)
        output_tokens = output_tokens.expand(batch, queries, -1, -1)
        token_bias = None
        # not when attention maps are returned (they cover every prompt token), nor under tracers (the
        # merged layout depends on the values of the prompts, a traced graph would fix it)
        if not output_attentions and not _tracing():
            prompt_embeddings, log_multiplicity = _merge_repeated_prompt_tokens(prompt_embeddings)
            if log_multiplicity is not None:
                token_bias = F.pad(log_multiplicity, (output_tokens.shape[2], 0))  # output tokens: once each
        tokens = torch.cat([output_tokens, prompt_embeddings], dim=2)

        num_outputs = 1 + self.num_mask_tokens
        # Only the candidates that are returned are computed: mask tokens 1..3 (multimask) or token 0.
        # The final attention runs for them and the IoU token only, unless every output token is
        # returned (`output_hidden_states`).
        selected = range(1, self.num_mask_tokens) if multimask_output else range(1)
        kept = list(range(num_outputs)) if output_hidden_states else [0] + [1 + index for index in selected]
        tokens, image, attentions = self.transformer(tokens, image, image_pe, output_attentions, kept, token_bias,
                                                     chunk_sizes, shared)

        iou_token_out = tokens[:, :, 0]
        if output_hidden_states or output_attentions:  # every token came back, in order
            mask_tokens_out = tokens[:, :, [1 + index for index in selected]]
        else:
            mask_tokens_out = tokens[:, :, 1:]
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[index](mask_tokens_out[:, :, position]) for position, index in enumerate(selected)],
            dim=2,
        )  # (B, Q, candidates, channels)
        masks, upscaled = [], []
        for part, hyper_part in zip(image, _split_queries(hyper_in, chunk_sizes)):
            size = part.shape[1]
            masks_part, upscaled_part = self.predict_masks(
                part.reshape(batch * size, -1, part.shape[-1]), hyper_part.reshape(batch * size, len(selected), -1),
                height, width, return_upscaled=output_hidden_states,
            )
            masks.append(masks_part.reshape(batch, size, len(selected), 4 * height, 4 * width))
            if upscaled_part is not None:
                upscaled.append(upscaled_part.reshape(batch, size, -1, 4 * height, 4 * width))
        masks, upscaled = _join_queries(masks), (_join_queries(upscaled) if upscaled else None)
        iou_pred = self.iou_prediction_head(iou_token_out)[:, :, selected.start : selected.stop]
        return masks, iou_pred, attentions, (tokens[:, :, :num_outputs] if output_hidden_states else None), upscaled


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class EfficientSamPreTrainedModel(PreTrainedModel):
    config_class = EfficientSamConfig
    base_model_prefix = "efficientsam"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["EfficientSamVisionLayer", "EfficientSamTwoWayLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, EfficientSamLayerNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, EfficientSamVisionEncoder):
            nn.init.trunc_normal_(module.pos_embed, std=std)
        elif isinstance(module, EfficientSamPromptEncoder):
            for parameter in (module.invalid_point_embed, module.point_embed, module.box_top_left_embed,
                              module.box_bottom_right_embed):
                nn.init.normal_(parameter, std=1.0)
        elif isinstance(module, EfficientSamPositionalEmbedding):
            module.positional_encoding_gaussian_matrix.normal_()
        elif isinstance(module, EfficientSamMaskDecoder):
            nn.init.normal_(module.iou_token, std=1.0)
            nn.init.normal_(module.mask_tokens, std=1.0)


class EfficientSamModel(EfficientSamPreTrainedModel):
    """EfficientSAM: image encoder, prompt encoder and mask decoder; prompts are points and boxes.

    Prompts are in the model input frame (`config.image_size` square, 1024 for the released models);
    `EfficientSamProcessor` rescales prompts given in original-image pixels or in [0, 1].

    Queries and padding: every image has Q queries. A query is up to `max_num_points` (6) points with
    labels (1 positive, 0 negative, 2 box top-left, 3 box bottom-right, -1 padding point); a box in
    `input_boxes` becomes two corner points labelled 2 and 3 and goes before the query's points.
    A padded query (for images with fewer than Q queries) is one whose labels are all -1, or whose box
    is all negative (e.g. (-1, -1, -1, -1)) when only boxes are given. Queries are decoded
    independently, so a padded query cannot change any real query's output; its own outputs are
    meaningless and must be ignored (the training collator's `query_mask` does that).
    """

    def __init__(self, config: EfficientSamConfig):
        super().__init__(config)
        self.vision_encoder = EfficientSamVisionEncoder(config.vision_config)
        self.prompt_encoder = EfficientSamPromptEncoder(config)
        self.mask_decoder = EfficientSamMaskDecoder(config.mask_decoder_config)
        self.post_init()

    #: Auto classes written into `config.auto_map` next to the one `register_for_auto_class` names
    #: (transformers keeps a single `_auto_class` per model class).
    extra_auto_classes = ("AutoModelForMaskGeneration",)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, also mapping `extra_auto_classes` to this class in `auto_map`
        when the class is registered for remote code, so that `pipeline("mask-generation", folder,
        trust_remote_code=True)` finds the model without this package."""
        if self._auto_class is not None:
            name = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.update({auto_class: name for auto_class in self.extra_auto_classes})
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalized pixels -> (B, C, h, w) image embeddings."""
        self._check_pixel_values(pixel_values)
        if _cpu_autocast_without_native_support(pixel_values.device):
            with torch.autocast("cpu", enabled=False):
                return self.vision_encoder(_as_float32(pixel_values))[0]
        return self.vision_encoder(pixel_values)[0]

    # -- input checks -----------------------------------------------------------------------
    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        size = self.config.vision_config.image_size
        channels = self.config.vision_config.num_channels
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (channels, size, size):
            raise ValueError(
                f"pixel_values must have shape (batch, {channels}, {size}, {size}); got {tuple(pixel_values.shape)}. "
                "Use EfficientSamImageProcessor to resize and normalize images."
            )

    def _prompts_to_points(self, input_points, input_labels, input_boxes, batch_size):
        """Validate prompts and return (points (B, Q, P, 2), labels (B, Q, P)) padded to max_num_points."""
        max_points = self.config.prompt_encoder_config.max_num_points
        coordinate_dtype = self.prompt_encoder.coordinate_dtype
        if input_points is None and input_boxes is None:
            raise ValueError("give at least one prompt: input_points (with input_labels) or input_boxes")
        if input_labels is not None and input_points is None:
            raise ValueError("input_labels were given without input_points")
        if input_points is not None and input_labels is None and input_points.dim() == 4:
            # as in SAM: points without labels are positive clicks
            input_labels = torch.full(input_points.shape[:-1], LABEL_POSITIVE, device=input_points.device)
        parts_points, parts_labels = [], []
        if input_boxes is not None:
            if input_boxes.dim() != 3 or input_boxes.shape[-1] != 4:
                raise ValueError(
                    f"input_boxes must have shape (batch, queries, 4) as x1, y1, x2, y2; got {tuple(input_boxes.shape)}"
                )
            boxes = input_boxes.to(coordinate_dtype)
            corners = boxes.reshape(*boxes.shape[:2], 2, 2)
            padded = (boxes < 0).all(dim=-1, keepdim=True)
            labels = torch.tensor([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT], device=boxes.device)
            labels = labels.expand(*boxes.shape[:2], 2).masked_fill(padded, LABEL_PADDING)
            corners = corners.masked_fill(padded[..., None], -1.0)
            parts_points.append(corners)
            parts_labels.append(labels)
        if input_points is not None:
            if input_points.dim() != 4 or input_points.shape[-1] != 2:
                raise ValueError(
                    f"input_points must have shape (batch, queries, points, 2) as x, y; got {tuple(input_points.shape)}"
                )
            if input_labels.shape != input_points.shape[:-1]:
                raise ValueError(
                    f"input_labels must have shape {tuple(input_points.shape[:-1])} (one label per point); "
                    f"got {tuple(input_labels.shape)}"
                )
            labels = input_labels.to(torch.long)
            bad = ~torch.isin(labels, torch.tensor(VALID_LABELS, device=labels.device))
            if bad.any():
                raise ValueError(
                    f"input_labels must be in {VALID_LABELS} (-1 padding, 0 negative, 1 positive, 2 box top-left, "
                    f"3 box bottom-right); got {sorted(set(labels[bad].tolist()))}"
                )
            parts_points.append(input_points.to(coordinate_dtype))
            parts_labels.append(labels)
        if len(parts_points) == 2 and parts_points[0].shape[:2] != parts_points[1].shape[:2]:
            raise ValueError(
                f"input_boxes {tuple(input_boxes.shape)} and input_points {tuple(input_points.shape)} must have the "
                "same batch and query dimensions when combined (the box goes first in each query)"
            )
        points = torch.cat(parts_points, dim=2)
        labels = torch.cat(parts_labels, dim=2)
        if points.shape[0] != batch_size:
            raise ValueError(f"prompts are for {points.shape[0]} images but {batch_size} images were given")
        if points.shape[1] == 0:
            raise ValueError(
                f"the prompts hold no query (shape {tuple(points.shape[:2])} as (batch, queries)): give at least one "
                "box or point per image (pad other images' queries with -1 boxes / -1 labels)"
            )
        if points.shape[2] > max_points:
            raise ValueError(
                f"a query has at most {max_points} points (a box counts as 2); got {points.shape[2]} per query"
            )
        missing = max_points - points.shape[2]
        if missing:
            points = F.pad(points, (0, 0, 0, missing), value=-1.0)
            labels = F.pad(labels, (0, missing), value=LABEL_PADDING)
        return points, labels

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: Optional[torch.FloatTensor] = None,
        image_embeddings: Optional[torch.FloatTensor] = None,
        input_points: Optional[torch.FloatTensor] = None,
        input_labels: Optional[torch.LongTensor] = None,
        input_boxes: Optional[torch.FloatTensor] = None,
        multimask_output: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        original_sizes: Optional[torch.LongTensor] = None,
    ):
        r"""Segment the prompted objects.

        Args:
            pixel_values (`(B, 3, S, S)`): normalized images from `EfficientSamImageProcessor`.
            image_embeddings (`(B, C, h, w)`): precomputed `get_image_embeddings` output, used instead
                of `pixel_values` (give exactly one of the two).
            input_points (`(B, Q, P, 2)`): point prompts (x, y) in the S x S input frame, P <= 6.
            input_labels (`(B, Q, P)`): 1 positive, 0 negative, 2 / 3 box corners, -1 padding; when
                omitted, every point is positive.
            input_boxes (`(B, Q, 4)`): boxes (x1, y1, x2, y2) in the input frame; all-negative rows
                are padded queries.
            multimask_output (`bool`): 3 candidates per query (True) or the single-mask output.
            output_attentions (`bool`): also return the decoder's token-to-image attention maps.
            output_hidden_states (`bool`): also return encoder hidden states and the decoder's output
                tokens and upscaled embeddings.
            original_sizes (`(B, 2)`): accepted and unused, so that the processor's output can be passed
                as is (`model(**processor(images, input_boxes=...))`); the masks stay in the model frame
                until `processor.post_process_masks` resizes them.
        """
        if (pixel_values is None) == (image_embeddings is None):
            raise ValueError(
                "give exactly one of pixel_values (B, 3, S, S) or image_embeddings (B, C, h, w); got "
                + ("both" if pixel_values is not None else "neither")
            )
        if _cpu_autocast_without_native_support((pixel_values if pixel_values is not None else image_embeddings).device):
            with torch.autocast("cpu", enabled=False):
                return self.forward(
                    pixel_values=_as_float32(pixel_values), image_embeddings=_as_float32(image_embeddings),
                    input_points=input_points, input_labels=input_labels, input_boxes=input_boxes,
                    multimask_output=multimask_output, output_attentions=output_attentions,
                    output_hidden_states=output_hidden_states, return_dict=return_dict,
                )
        vision_hidden_states = None
        if pixel_values is not None:
            self._check_pixel_values(pixel_values)
            image_embeddings, vision_hidden_states = self.vision_encoder(pixel_values, output_hidden_states)
        else:
            width = self.config.mask_decoder_config.hidden_size
            grid = self.config.image_embedding_size
            if image_embeddings.dim() != 4 or tuple(image_embeddings.shape[1:]) != (width, grid, grid):
                raise ValueError(
                    f"image_embeddings must have shape (batch, {width}, {grid}, {grid}); "
                    f"got {tuple(image_embeddings.shape)}"
                )
        points, labels = self._prompts_to_points(input_points, input_labels, input_boxes, image_embeddings.shape[0])
        prompt_embeddings = self.prompt_encoder(points, labels)
        if torch.is_autocast_enabled(prompt_embeddings.device.type):
            prompt_embeddings = prompt_embeddings.to(torch.get_autocast_dtype(prompt_embeddings.device.type))
        else:
            prompt_embeddings = prompt_embeddings.to(image_embeddings.dtype)
        image_pe = self.prompt_encoder.dense_positional_embedding()
        masks, iou_scores, attentions, token_states, upscaled = self.mask_decoder(
            image_embeddings, image_pe, prompt_embeddings, multimask_output, output_attentions, output_hidden_states
        )
        output = EfficientSamImageSegmentationOutput(
            iou_scores=iou_scores,
            pred_masks=masks,
            image_embeddings=image_embeddings,
            vision_hidden_states=vision_hidden_states,
            mask_decoder_attentions=attentions,
            mask_decoder_output_tokens=token_states if output_hidden_states else None,
            upscaled_embeddings=upscaled if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["EfficientSamImageSegmentationOutput", "EfficientSamModel", "EfficientSamPreTrainedModel"]
