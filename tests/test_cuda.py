"""The model on a CUDA GPU computes what it computes on the CPU.

These run only where torch sees a GPU (`benchmarks/run_gpu.sh` runs them before the GPU benchmarks);
elsewhere they are skipped with that reason. On the GPU the decoder sizes its work differently (one
chunk of queries while autograd records, large mask-head blocks: see `_queries_per_chunk`), its
matrix products run in cuBLAS and its attentions in the fused kernels; the CPU in float64 is the
yardstick. TF32 is off for matrix products and convolutions, so float32 on the GPU is held to float32
rounding.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from modeling_efficientsam import EfficientSamConfig, EfficientSamModel
from modeling_efficientsam.training.losses import segmentation_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU here; these tests run where torch sees one (benchmarks/run_gpu.sh)")


@pytest.fixture(autouse=True)
def float32_without_tf32():
    """Float32 products and convolutions in full float32 (cuDNN allows TF32 for convolutions by
    default, the encoder's patch embedding is one): the comparisons hold float32 to float32 rounding."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def decoder_model(config, seed=0):
    torch.manual_seed(seed)
    model = EfficientSamModel(config)
    model.vision_encoder.requires_grad_(False)
    model.prompt_encoder.requires_grad_(False)
    return model.train()


def box_batch(config, images, queries, seed=1):
    generator = torch.Generator().manual_seed(seed)
    size, grid, mask = config.image_size, config.image_embedding_size, config.low_res_mask_size
    corners = torch.rand(images, queries, 2, 2, generator=generator) * (size * 0.8)
    boxes = torch.cat([corners.min(2).values, corners.max(2).values + size * 0.15], dim=-1)
    ys, xs = torch.meshgrid(torch.arange(mask), torch.arange(mask), indexing="ij")
    scaled = boxes * (mask / size)
    inside = ((xs >= scaled[..., 0, None, None]) & (xs <= scaled[..., 2, None, None])
              & (ys >= scaled[..., 1, None, None]) & (ys <= scaled[..., 3, None, None]))
    return {"image_embeddings": torch.randn(images, config.image_embedding_width, grid, grid, generator=generator),
            "input_boxes": boxes, "labels": inside.float(), "query_mask": torch.ones(images, queries, dtype=torch.bool)}


def training_step(model, batch, device, dtype, autocast=None):
    """Loss, outputs and decoder gradients of one step, computed on `device` in `dtype`."""
    model = model.to(device, dtype)
    model.zero_grad(set_to_none=True)
    inputs = {name: value.to(device) for name, value in batch.items()}
    embeddings = inputs["image_embeddings"].to(dtype)
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        outputs = model(image_embeddings=embeddings, input_boxes=inputs["input_boxes"].to(dtype))
    loss = segmentation_loss(pred_masks=outputs.pred_masks.float(), iou_scores=outputs.iou_scores.float(),
                             labels=inputs["labels"], query_mask=inputs["query_mask"])
    loss["loss"].backward()
    grads = {name: p.grad.detach().double().cpu() for name, p in model.mask_decoder.named_parameters() if p.grad is not None}
    return (loss["loss"].detach().double().cpu(), outputs.pred_masks.detach().double().cpu(),
            outputs.iou_scores.detach().double().cpu(), grads)


def relative_error(got, expected) -> float:
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("variant", ["tiny", "vitt"])
def test_decoder_training_step_on_the_gpu_matches_the_cpu(variant):
    """Loss, masks, IoU scores and every decoder gradient of a float32 step on the GPU against the
    same step in float64 on the CPU (the tiny test model, and ViT-T's decoder at 2 images x 12 boxes:
    one chunk of 12 queries on the GPU, chunks of 3 on the CPU)."""
    config = tiny_config() if variant == "tiny" else EfficientSamConfig.from_variant("vitt")
    model = decoder_model(config)
    batch = box_batch(config, images=2, queries=12)
    cpu = training_step(model, batch, torch.device("cpu"), torch.float64)
    gpu = training_step(model, batch, torch.device("cuda"), torch.float32)
    for name, got, expected in zip(("loss", "masks", "iou_scores"), gpu[:3], cpu[:3]):
        assert relative_error(got, expected) < 1e-4, name
    assert gpu[3].keys() == cpu[3].keys() and len(cpu[3]) > 10
    overall = max(grad.abs().max().item() for grad in cpu[3].values())
    for name, expected in cpu[3].items():
        # gradients that are zero in exact arithmetic (key biases) hold rounding noise: the overall scale
        scale = max(expected.abs().max().item(), 1e-6 * overall)
        assert (gpu[3][name] - expected).abs().max().item() <= 1e-3 * scale, name


def test_bf16_autocast_on_the_gpu_stays_close_to_float32():
    """bf16 autocast (the usual GPU setting): the same loss to bf16 accuracy, the same sign of
    nearly every mask logit, finite gradients."""
    config = EfficientSamConfig.from_variant("vitt")
    model = decoder_model(config)
    batch = box_batch(config, images=2, queries=8)
    device = torch.device("cuda")
    float32 = training_step(model, batch, device, torch.float32)
    bf16 = training_step(model, batch, device, torch.float32, autocast=torch.bfloat16)
    assert abs(bf16[0].item() - float32[0].item()) <= 0.05 * abs(float32[0].item())
    assert ((bf16[1] > 0) == (float32[1] > 0)).double().mean().item() > 0.98
    assert all(torch.isfinite(grad).all() for grad in bf16[3].values())


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_encoder_on_the_gpu_matches_the_cpu(implementation):
    """ViT-T image embeddings of a 1024 x 1024 batch of 2 on the GPU (float32) against the CPU in float64."""
    torch.manual_seed(0)
    model = EfficientSamModel(EfficientSamConfig.from_variant("vitt")).eval()
    model.config._attn_implementation = implementation
    pixels = torch.randn(2, 3, 1024, 1024)
    with torch.no_grad():
        expected = model.double().get_image_embeddings(pixels.double())
        got = model.to("cuda", torch.float32).get_image_embeddings(pixels.to("cuda")).double().cpu()
    assert relative_error(got, expected) < 1e-4


def test_many_prompts_without_autograd_are_decoded_in_bounded_chunks(monkeypatch):
    """Inference over more queries than one GPU chunk holds gives the outputs of one chunk."""
    from modeling_efficientsam import modeling_efficientsam as modeling

    config = EfficientSamConfig.from_variant("vitt")
    model = decoder_model(config).eval().cuda()
    batch = box_batch(config, images=1, queries=10)
    embeddings, boxes = batch["image_embeddings"].cuda(), batch["input_boxes"].cuda()
    with torch.no_grad():
        whole = model(image_embeddings=embeddings, input_boxes=boxes)
        per_query = embeddings[0].numel() * 4
        monkeypatch.setattr(modeling, "_ACCELERATOR_QUERY_CHUNK_BYTES", 3 * per_query)  # chunks of 3: 3 + 3 + 3 + 1
        chunked = model(image_embeddings=embeddings, input_boxes=boxes)
    assert relative_error(chunked.pred_masks, whole.pred_masks) < 1e-5
    assert relative_error(chunked.iou_scores, whole.iou_scores) < 1e-5
