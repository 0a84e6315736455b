"""The speed paths compute what the plain paths compute.

* the mask decoder (folded attention, fused mask head) against the decoder as it was before the
  speed work (benchmarks/reference_decoder.py): outputs and gradients, float64 and float32;
* the ground-truth loss (chosen candidate only, one pass for the four terms) against the loss as it
  was (same file): values, choices and gradients;
* half precision on CPU only where the CPU has it natively (detection, float32 fallback);
* training targets prepared once (label_cache.py): the same items as computing them per item.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config
from modeling_efficientsam import EfficientSamModel
from modeling_efficientsam import modeling_efficientsam as modeling

REPO = Path(__file__).resolve().parents[1]


def reference_module():
    spec = importlib.util.spec_from_file_location("reference_decoder", REPO / "benchmarks" / "reference_decoder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_decoder_class():
    return reference_module().ReferenceMaskDecoder


# ------------------------------------------------------------------------------------------------
# Ground-truth loss against the reference loss
# ------------------------------------------------------------------------------------------------
def loss_inputs(seed=0, batch=2, queries=3, candidates=3, size=32):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, queries, candidates, size, size, generator=generator) * 4).double()
    labels = torch.zeros(batch, queries, size, size)
    for b in range(batch):
        for q in range(queries):
            y, x = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            labels[b, q, y : y + size // 3 + q, x : x + size // 4 + 2 * b] = 1
    labels[-1, -1] = 0  # an empty target: no boundary band
    iou = torch.rand(batch, queries, candidates, generator=generator).double()
    query_mask = torch.ones(batch, queries, dtype=torch.bool)
    query_mask[0, -1] = False
    return logits, iou, labels, query_mask


@pytest.mark.parametrize("settings", [{}, {"focal_alpha": -1.0, "focal_gamma": 0.0, "boundary_band_width": 1},
                                      {"focal_gamma": 1.5, "boundary_weight": 3.0, "dice_weight": 0.0}])
def test_segmentation_loss_equals_the_reference_loss(settings):
    from modeling_efficientsam.training.losses import segmentation_loss

    reference_loss = reference_module().reference_segmentation_loss
    logits, iou, labels, query_mask = loss_inputs()
    results = []
    for loss_function in (segmentation_loss, reference_loss):
        pred = logits.clone().requires_grad_(True)
        scores = iou.clone().requires_grad_(True)
        out = loss_function(pred_masks=pred, iou_scores=scores, labels=labels, query_mask=query_mask, **settings)
        out["loss"].backward()
        results.append((out, pred.grad, scores.grad))
    (out, grad, iou_grad), (expected, expected_grad, expected_iou_grad) = results
    assert torch.equal(out["chosen_candidate"], expected["chosen_candidate"])
    assert len(set(out["chosen_candidate"].flatten().tolist())) > 1  # the choice really varies
    for name in ("loss", "mask_loss", "focal_loss", "dice_loss", "iou_loss", "boundary_loss", "iou_head_loss"):
        torch.testing.assert_close(out[name], expected[name], rtol=1e-5, atol=1e-9, msg=name)
    assert float(expected["boundary_loss"].detach()) > 0
    # float32 arithmetic inside both: gradients agree to float32 rounding, and the candidates that
    # were not chosen get exactly zero in both
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(iou_grad, expected_iou_grad)
    not_chosen = torch.ones_like(grad, dtype=torch.bool).scatter_(
        2, out["chosen_candidate"][:, :, None, None, None].expand(-1, -1, 1, *grad.shape[-2:]), False)
    assert grad[not_chosen].abs().max() == 0 and grad[~not_chosen].abs().max() > 0


def test_boundary_band_equals_a_square_max_pool():
    generator = torch.Generator().manual_seed(3)
    masks = (torch.rand(4, 2, 40, 37, generator=generator) > 0.7).float()
    masks[0, 0] = 0
    masks[0, 1] = 1
    from modeling_efficientsam.training.losses import boundary_band

    for width in (1, 3, 5):
        flat = masks.reshape(-1, 1, 40, 37)
        kernel = 2 * width + 1
        dilated = torch.nn.functional.max_pool2d(flat, kernel, stride=1, padding=width)
        eroded = -torch.nn.functional.max_pool2d(-flat, kernel, stride=1, padding=width)
        expected = ((dilated - eroded) > 0.5).reshape(masks.shape)
        band = boundary_band(masks, band_width=width)
        assert torch.equal(band, expected)
        assert not band[0].any() and band[1:].any()


# ------------------------------------------------------------------------------------------------
# Mask decoder against the reference decoder
# ------------------------------------------------------------------------------------------------
def decoder_pair(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    config = tiny_config(initializer_range=0.3)  # a wide weight spread: every input changes the outputs visibly
    model = EfficientSamModel(config).to(dtype)
    reference = reference_decoder_class()(config.mask_decoder_config).to(dtype)
    reference.load_state_dict(model.mask_decoder.state_dict())
    return model, reference


# Which of a query's 6 prompt tokens are copies of which (the decoder merges equal tokens): a box
# (2 corners, 4 equal padding tokens), a padded query (6 equal), a point (1 + 5 equal), repeats that
# are not adjacent, and 5 distinct tokens (so no query has 6 and the merge really happens).
REPEATS = [[0, 1, 2, 3, 4, 4], [0, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0],
           [0, 1, 0, 2, 1, 1], [0, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1]]


def decoder_inputs(model, dtype=torch.float64, batch=2, queries=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, 32, 4, 4, generator=generator).to(dtype)
    distinct = torch.randn(batch * queries, 6, 32, generator=generator).to(dtype)
    order = torch.tensor([REPEATS[i % len(REPEATS)] for i in range(batch * queries)])
    prompts = torch.gather(distinct, 1, order[..., None].expand(-1, -1, 32)).reshape(batch, queries, 6, 32)
    image_pe = model.prompt_encoder.dense_positional_embedding().to(dtype).detach()
    return embeddings, image_pe, prompts


def test_repeated_prompt_tokens_are_merged_with_their_multiplicity():
    _, _, prompts = decoder_inputs(decoder_pair()[0])
    merged, log_multiplicity = modeling._merge_repeated_prompt_tokens(prompts)
    assert merged.shape == (2, 3, 5, 32)
    counts = log_multiplicity.exp().round().long()  # exp(-inf) = 0: empty slots
    assert counts.tolist() == [[[1, 1, 1, 1, 2], [1, 1, 4, 0, 0], [6, 0, 0, 0, 0]],
                               [[2, 3, 1, 0, 0], [1, 1, 4, 0, 0], [1, 5, 0, 0, 0]]]
    assert torch.equal(merged[1, 0, :3], prompts[1, 0, [0, 1, 3]])  # first copies, in order
    # no repeats: nothing merged
    distinct = torch.randn(2, 3, 6, 32, dtype=torch.float64)
    assert modeling._merge_repeated_prompt_tokens(distinct)[1] is None


def run_decoder(decoder, embeddings, image_pe, prompts, multimask, attentions, hidden, upstream):
    """Outputs and gradients (parameters and prompt embeddings) of a loss that uses every output."""
    decoder.zero_grad(set_to_none=True)
    prompts = prompts.clone().requires_grad_(True)
    masks, iou, weights, tokens, upscaled = decoder(embeddings, image_pe, prompts, multimask, attentions, hidden)
    loss = (masks * upstream["masks"][:, :, : masks.shape[2]]).sum() + (iou * upstream["iou"][..., : iou.shape[-1]]).sum()
    outputs = {"masks": masks, "iou": iou}
    if hidden:  # the output tokens and upscaled embeddings are returned with the hidden states only
        outputs.update(tokens=tokens, upscaled=upscaled)
        loss = loss + (tokens * upstream["tokens"]).sum() + (upscaled * upstream["upscaled"]).sum()
    if attentions:
        outputs.update({f"attention_{i}": w for i, w in enumerate(weights)})
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in decoder.named_parameters() if p.grad is not None}
    grads["prompt_embeddings"] = prompts.grad.detach().clone()
    return {k: v.detach() for k, v in outputs.items()}, grads


def upstream_gradients(batch=2, queries=3, dtype=torch.float64, seed=2):
    generator = torch.Generator().manual_seed(seed)
    shapes = {"masks": (batch, queries, 3, 16, 16), "iou": (batch, queries, 3), "tokens": (batch, queries, 5, 32),
              "upscaled": (batch, queries, 8, 16, 16)}
    return {k: torch.randn(*s, generator=generator).to(dtype) for k, s in shapes.items()}


def assert_gradients_close(got: dict, expected: dict, tolerance: float):
    """Each gradient within `tolerance` of its own scale; gradients that are zero in exact arithmetic
    (a key bias shifts every score of a softmax row alike) hold only rounding noise, so they are held
    to the scale of all gradients instead."""
    assert got.keys() == expected.keys()
    overall = max(g.abs().max().item() for g in expected.values())
    zero = [name for name, value in expected.items() if value.abs().max().item() <= 1e-9 * overall]
    assert all("k_proj.bias" in name for name in zero), zero  # only key biases are zero in exact arithmetic
    for name, value in expected.items():
        scale = overall if name in zero else value.abs().max().item()
        error = (got[name] - value).abs().max().item()
        assert error <= tolerance * scale, f"{name}: error {error:.3e}, scale {scale:.3e}"


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("attentions, hidden", [(False, False), (True, False), (False, True)])
def test_decoder_equals_the_reference_decoder_in_float64(multimask, attentions, hidden):
    """Same function as the original layout: outputs and every gradient agree to float64 rounding
    (observed ~1e-13 relative; bound 1e-9). `hidden` switches between the fused mask head and the
    plain-operation one (which returns the upscaled embeddings)."""
    model, reference = decoder_pair()
    inputs = decoder_inputs(model)
    upstream = upstream_gradients()
    got, got_grads = run_decoder(model.mask_decoder, *inputs, multimask, attentions, hidden, upstream)
    expected, expected_grads = run_decoder(reference, *inputs, multimask, attentions, hidden, upstream)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        scale = value.abs().max().item()
        assert scale > 1e-3, name  # real outputs, not zeros
        assert (got[name] - value).abs().max().item() <= 1e-9 * scale, name
    assert_gradients_close(got_grads, expected_grads, 1e-9)


def test_decoder_float32_error_is_float32_rounding():
    """In float32 both decoders stay within float32 rounding of the float64 result (observed about
    1e-6 relative for either; bound 1e-4), outputs and gradients alike."""
    model64, reference64 = decoder_pair(torch.float64)
    inputs64 = decoder_inputs(model64)
    upstream64 = upstream_gradients()
    truth, truth_grads = run_decoder(reference64, *inputs64, True, False, False, upstream64)
    model32, reference32 = decoder_pair(torch.float32)
    inputs32 = [t.float() for t in inputs64]
    upstream32 = {k: v.float() for k, v in upstream64.items()}
    for decoder in (model32.mask_decoder, reference32):
        got, grads = run_decoder(decoder, *inputs32, True, False, False, upstream32)
        for name, value in truth.items():
            assert (got[name].double() - value).abs().max().item() <= 1e-4 * value.abs().max().item(), name
        assert_gradients_close({k: v.double() for k, v in grads.items()}, truth_grads, 1e-4)


@pytest.mark.parametrize("rows, blocks", [(4, 96), (12, 36), (128, 3), (256, 2)])
def test_fused_mask_head_in_blocks_equals_the_plain_path(monkeypatch, rows, blocks):
    """Blocks of single pixels, of pixel ranges (the last one shorter), of whole queries (2 each) and
    of uneven query groups (4 + 2) give the same masks and gradients as one block and as the plain
    operations (6 queries of 16 pixels, 64 first-map rows each)."""
    model, _ = decoder_pair()
    inputs = decoder_inputs(model)
    upstream = upstream_gradients()
    whole, whole_grads = run_decoder(model.mask_decoder, *inputs, True, False, False, upstream)
    cpu = torch.device("cpu")
    assert len(modeling._mask_head_blocks(6, 16, cpu)) == 1
    monkeypatch.setattr(modeling, "_MASK_HEAD_BLOCK_ROWS", rows)
    assert len(modeling._mask_head_blocks(6, 16, cpu)) == blocks
    blocked, blocked_grads = run_decoder(model.mask_decoder, *inputs, True, False, False, upstream)
    plain_masks, _ = model.mask_decoder.predict_masks(*fused_inputs(model, inputs), return_upscaled=True)
    for result in (whole, blocked):
        torch.testing.assert_close(result["masks"], plain_masks.reshape(result["masks"].shape), rtol=1e-10, atol=1e-12)
    assert_gradients_close(blocked_grads, whole_grads, 1e-10)


@pytest.mark.parametrize("attentions, hidden", [(False, False), (True, True)])
def test_decoding_queries_in_chunks_changes_nothing(monkeypatch, attentions, hidden):
    """The image stream held in chunks of queries (as large batches are, to keep tensors small) gives
    the same outputs, attention maps, upscaled embeddings and gradients as one chunk of all queries."""
    model, _ = decoder_pair()
    inputs = decoder_inputs(model)
    upstream = upstream_gradients()
    whole, whole_grads = run_decoder(model.mask_decoder, *inputs, True, attentions, hidden, upstream)
    per_query = 32 * 4 * 4 * 4
    monkeypatch.setattr(modeling, "_QUERY_GROUP_BYTES", 2 * 2 * per_query)  # 2 images x 2 queries per chunk: 2 + 1
    grouped, grouped_grads = run_decoder(model.mask_decoder, *inputs, True, attentions, hidden, upstream)
    assert whole.keys() == grouped.keys()
    for name, value in whole.items():
        torch.testing.assert_close(grouped[name], value, rtol=1e-12, atol=1e-12)
    assert_gradients_close(grouped_grads, whole_grads, 1e-10)


def spy_on_chunks(monkeypatch, decoder) -> list:
    """Records (queries, chunk sizes) of every `_decode` call of `decoder`'s class."""
    calls = []
    original_decode = type(decoder)._decode

    def spy_decode(self, image, image_pe, grid, prompt_embeddings, *args):
        calls.append((prompt_embeddings.shape[1], list(args[-2])))
        return original_decode(self, image, image_pe, grid, prompt_embeddings, *args)

    monkeypatch.setattr(type(decoder), "_decode", spy_decode)
    return calls


def test_accelerator_sizing_changes_nothing_but_the_chunks_and_blocks(monkeypatch):
    """On an accelerator (CUDA, ...) the decoder sizes its work for kernel launches, not for a CPU's
    caches: one chunk of queries while autograd records however small the CPU bound is, bounded
    chunks without autograd, and mask-head blocks of many queries (the group-norm statistics then run
    per block of queries too). Sized so on this CPU, outputs and gradients equal the CPU sizing's."""
    model, _ = decoder_pair()
    inputs = decoder_inputs(model)
    upstream = upstream_gradients()
    decoder = model.mask_decoder
    per_query = 32 * 4 * 4 * 4  # one query's float32 image stream over 2 images
    monkeypatch.setattr(modeling, "_QUERY_GROUP_BYTES", 2 * per_query)  # CPU: 1 query per chunk
    monkeypatch.setattr(modeling, "_MASK_HEAD_BLOCK_ROWS", 16)  # CPU: pixel ranges of one query
    calls = spy_on_chunks(monkeypatch, decoder)
    cpu, cpu_grads = run_decoder(decoder, *inputs, True, False, False, upstream)
    assert calls == [(3, [1, 1, 1])]
    with torch.no_grad():
        cpu_inference = decoder(*inputs, True)

    monkeypatch.setattr(modeling, "_sized_for_cpu", lambda device: False)
    monkeypatch.setattr(modeling, "_ACCELERATOR_QUERY_CHUNK_BYTES", 2 * 2 * per_query)  # 2 queries per chunk
    monkeypatch.setattr(modeling, "_ACCELERATOR_MASK_HEAD_BLOCK_ROWS", 4 * 64)  # 4 of the 6 queries per block
    assert modeling._mask_head_blocks(6, 16, torch.device("cpu")) == [(0, 4, 0, 16), (4, 6, 0, 16)]
    calls.clear()
    accelerator, accelerator_grads = run_decoder(decoder, *inputs, True, False, False, upstream)
    assert calls == [(3, [3])]  # autograd records: one chunk
    calls.clear()
    with torch.no_grad():
        accelerator_inference = decoder(*inputs, True)
    assert calls == [(2, [2]), (1, [1])]  # inference: chunks of the accelerator's bound
    for name, value in cpu.items():
        torch.testing.assert_close(accelerator[name], value, rtol=1e-12, atol=1e-12)
    assert_gradients_close(accelerator_grads, cpu_grads, 1e-10)
    for got, expected in zip(accelerator_inference, cpu_inference):
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("attentions, hidden", [(False, False), (True, True)])
def test_without_autograd_chunks_are_decoded_one_at_a_time(monkeypatch, attentions, hidden):
    """Without autograd (inference, evaluation, a frozen teacher) nothing is kept for a backward pass,
    so the decoder decodes one chunk of queries at a time (memory of one chunk, not of all queries),
    with the image's own work done once: same outputs as all queries at once."""
    model, _ = decoder_pair()
    embeddings, image_pe, prompts = decoder_inputs(model)
    decoder = model.mask_decoder
    with torch.no_grad():
        whole = decoder(embeddings, image_pe, prompts, True, attentions, hidden)
        per_query = 32 * 4 * 4 * 4
        monkeypatch.setattr(modeling, "_QUERY_GROUP_BYTES", 2 * 2 * per_query)  # 2 images x 2 queries per chunk: 2 + 1
        calls, shared = [], []
        original_decode = type(decoder)._decode
        original_shared = type(decoder.transformer).shared_image_inputs

        def spy_decode(self, image, image_pe, grid, prompt_embeddings, *args):
            calls.append((prompt_embeddings.shape[1], args[-2]))  # (queries, chunk sizes)
            return original_decode(self, image, image_pe, grid, prompt_embeddings, *args)

        def spy_shared(self, *args):
            shared.append(1)
            return original_shared(self, *args)

        monkeypatch.setattr(type(decoder), "_decode", spy_decode)
        monkeypatch.setattr(type(decoder.transformer), "shared_image_inputs", spy_shared)
        chunked = decoder(embeddings, image_pe, prompts, True, attentions, hidden)
    assert calls == [(2, [2]), (1, [1])] and len(shared) == 1
    for got, expected in zip(chunked, whole):
        if isinstance(expected, tuple):
            for got_layer, expected_layer in zip(got, expected):
                torch.testing.assert_close(got_layer, expected_layer, rtol=1e-12, atol=1e-12)
        elif expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        else:
            assert got is None


def fused_inputs(model, inputs):
    """(image stream, hypernetwork outputs, h, w) that the decoder hands to predict_masks."""
    embeddings, image_pe, prompts = inputs
    decoder = model.mask_decoder
    captured = {}
    original = decoder.predict_masks

    def capture(image, hyper_in, height, width, return_upscaled=False):
        captured["args"] = (image, hyper_in, height, width)
        return original(image, hyper_in, height, width, return_upscaled)

    decoder.predict_masks = capture
    try:
        with torch.no_grad():
            decoder(embeddings, image_pe, prompts, True)
    finally:
        del decoder.predict_masks
    return captured["args"]


def test_fused_mask_head_gradcheck():
    """The hand-written backward of the fused head against finite differences (float64)."""
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    pixels, channels, first, second, candidates = 4, 6, 3, 2, 2
    args = (tensor(2, pixels, channels), tensor(channels, 4 * first), tensor(first), tensor(first), tensor(first),
            1e-5, tensor(first, 4 * second), tensor(4 * second), tensor(2, candidates, second), 2, 2)
    assert torch.autograd.gradcheck(lambda *a: modeling._EfficientSamMaskHead.apply(*a), args, eps=1e-6, atol=1e-6)


def test_fused_image_attention_gradcheck():
    """The hand-written backwards of the two attentions between tokens and a per-query image against
    finite differences (float64); the keys are the image plus a constant, made without autograd, as
    in the decoder, so the image's gradient through the keys comes from the functions themselves."""
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape, grad=True):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=grad)

    groups, tokens, heads, pixels, width = 2, 3, 2, 5, 4
    rows = tokens * heads
    constant = tensor(pixels, width, grad=False)

    def tokens_attend(query_rows, offset, image):
        return modeling._TokensAttendToImage.apply(query_rows, offset, image, (image + constant).detach())

    def image_attends(key_rows, offset, values, image):
        return modeling._ImageAttendsToTokens.apply(key_rows, offset, values, image, (image + constant).detach(), tokens)

    image = tensor(groups, pixels, width)
    assert torch.autograd.gradcheck(tokens_attend, (tensor(groups, rows, width), tensor(groups, rows, 1), image))
    assert torch.autograd.gradcheck(image_attends, (tensor(groups, rows, width), tensor(groups, rows, 1),
                                                    tensor(groups, rows, width), image))


@pytest.fixture
def native_half(monkeypatch):
    monkeypatch.setenv(modeling.CPU_NATIVE_HALF_PRECISION_ENV, "1")


def test_fused_and_plain_mask_heads_agree_under_bfloat16_autocast(native_half):
    """bf16 keeps 8 mantissa bits: both heads round differently; logits within 3% of their scale,
    binary masks agree on 97% of pixels, both returned in bf16."""
    model, _ = decoder_pair(torch.float32)
    inputs = [t.float() for t in decoder_inputs(model)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        image, hyper_in, height, width = fused_inputs(model, inputs)
        fused, _ = model.mask_decoder.predict_masks(image, hyper_in, height, width)
        plain, _ = model.mask_decoder.predict_masks(image, hyper_in, height, width, return_upscaled=True)
    assert fused.dtype == plain.dtype == torch.bfloat16
    scale = plain.float().abs().max()
    assert (fused.float() - plain.float()).abs().max() <= 0.03 * scale
    assert ((fused > 0) == (plain > 0)).float().mean() >= 0.97


# ------------------------------------------------------------------------------------------------
# Half precision on CPU
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "capability, flags, expected",
    [
        ("AVX512", {"avx512f", "avx512_bf16"}, True),
        ("AVX512", {"avx512f", "amx_bf16"}, True),
        ("AVX512", {"avx512f"}, False),  # AVX-512 without the bf16 extension (e.g. Skylake-SP)
        ("AVX2", {"avx2", "avx512_bf16", "amx_bf16"}, False),  # ATen lowered (ATEN_CPU_CAPABILITY=avx2)
        ("AVX2", {"avx2"}, False),
        ("DEFAULT", set(), False),
    ],
)
def test_native_bfloat16_detection(monkeypatch, capability, flags, expected):
    monkeypatch.delenv(modeling.CPU_NATIVE_HALF_PRECISION_ENV, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(modeling, "_cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(modeling.platform, "machine", lambda: "x86_64")
    assert modeling.cpu_half_precision_is_native(torch.bfloat16) is expected
    for override, forced in (("1", True), ("0", False)):
        monkeypatch.setenv(modeling.CPU_NATIVE_HALF_PRECISION_ENV, override)
        assert modeling.cpu_half_precision_is_native(torch.bfloat16) is forced


def test_arm_bfloat16_detection(monkeypatch):
    monkeypatch.delenv(modeling.CPU_NATIVE_HALF_PRECISION_ENV, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.setattr(modeling.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(modeling, "_cpu_flags", lambda: frozenset({"fp", "asimd", "bf16"}))
    assert modeling.cpu_half_precision_is_native(torch.bfloat16)
    monkeypatch.setattr(modeling, "_cpu_flags", lambda: frozenset({"fp", "asimd"}))
    assert not modeling.cpu_half_precision_is_native(torch.bfloat16)


def test_cpu_flags_are_read_from_proc_cpuinfo():
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo on this system")
    flags = modeling._cpu_flags()
    assert flags and all(isinstance(flag, str) and " " not in flag for flag in flags)


def test_autocast_without_native_half_precision_runs_in_float32(monkeypatch, caplog):
    """Without native bf16 the model ignores bf16 autocast (float32 is faster there) and says so once;
    its outputs are then exactly the float32 ones."""
    monkeypatch.setenv(modeling.CPU_NATIVE_HALF_PRECISION_ENV, "0")
    torch.manual_seed(0)
    model = EfficientSamModel(tiny_config()).eval()
    pixels, boxes = torch.randn(1, 3, 64, 64), torch.tensor([[[4.0, 6, 40, 50], [10, 3, 60, 30]]])
    logging.Logger.warning_once.cache_clear()
    with torch.no_grad():
        expected = model(pixel_values=pixels, input_boxes=boxes)
        with caplog.at_level(logging.WARNING, logger=modeling.__name__), torch.autocast("cpu", dtype=torch.bfloat16):
            first = model(pixel_values=pixels.bfloat16(), input_boxes=boxes)
            second = model(image_embeddings=expected.image_embeddings, input_boxes=boxes)
            embeddings = model.get_image_embeddings(pixels)
    assert first.pred_masks.dtype == second.pred_masks.dtype == embeddings.dtype == torch.float32
    with torch.no_grad():  # bf16 pixels are taken as their float32 values
        assert torch.equal(first.pred_masks, model(pixel_values=pixels.bfloat16().float(), input_boxes=boxes).pred_masks)
    assert torch.equal(second.pred_masks, expected.pred_masks)
    assert torch.equal(embeddings, expected.image_embeddings)
    messages = [r.getMessage() for r in caplog.records if "no native bfloat16" in r.getMessage()]
    assert len(messages) == 1 and "float32" in messages[0]


def test_autocast_with_native_half_precision_stays_in_bfloat16(native_half):
    model = EfficientSamModel(tiny_config()).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values=torch.randn(1, 3, 64, 64), input_boxes=torch.tensor([[[4.0, 6, 40, 50]]]))
    assert out.pred_masks.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "native, flags, blocked",
    [
        ("1", {"avx512_bf16"}, True),  # native bf16 without matrix tiles: blocked matrix products pay
        ("1", {"avx512_bf16", "amx_bf16"}, False),  # with AMX tiles PyTorch's fused kernel is faster
        ("0", {"avx512_bf16"}, False),  # no native bf16: the fused kernel (the model runs float32 anyway)
    ],
)
def test_half_precision_attention_path_follows_the_cpu(monkeypatch, native, flags, blocked):
    calls = []
    original = modeling._blocked_attention
    monkeypatch.setattr(modeling, "_blocked_attention", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setenv(modeling.CPU_NATIVE_HALF_PRECISION_ENV, native)
    monkeypatch.setattr(modeling, "_cpu_flags", lambda: frozenset(flags))
    query, key, value = (torch.randn(1, 2, 40, 8).bfloat16() for _ in range(3))
    with torch.no_grad():
        output, _ = modeling._attention(query, key, value, "sdpa")
    assert (len(calls) == 1) is blocked and output.dtype == torch.bfloat16
    expected = torch.nn.functional.scaled_dot_product_attention(query.float(), key.float(), value.float())
    assert (output.float() - expected).abs().max() < 2e-2


# ------------------------------------------------------------------------------------------------
# Training targets prepared once
# ------------------------------------------------------------------------------------------------
def random_masks(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for index in range(count):
        height, width = (int(v) for v in rng.integers(1, 160, 2))
        mask = np.zeros((height, width), bool)
        kind = index % 4
        if kind == 0:
            mask = rng.random((height, width)) < rng.random()
        elif kind == 1:
            top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
            mask[top : top + int(rng.integers(1, 40)), left : left + int(rng.integers(1, 40))] = True
        elif kind == 2:
            mask[int(rng.integers(0, height)), int(rng.integers(0, width))] = True
        yield rng, mask


def test_targets_from_rle_runs_equal_targets_from_decoded_masks():
    """Bit for bit, for up- and downscaling, square and non-square grids, compressed and list RLE,
    empty, single-pixel and random masks."""
    from modeling_efficientsam.data.label_cache import rle_target
    from modeling_efficientsam.data.masks import decode_rle, encode_mask, resize_mask

    for rng, mask in random_masks(160):
        size = int(rng.integers(1, 70)) if rng.random() < 0.5 else (int(rng.integers(1, 70)), int(rng.integers(1, 70)))
        compressed = encode_mask(mask)
        expected = resize_mask(decode_rle(compressed), size)
        assert np.array_equal(rle_target(compressed, size), expected)
        listed = {"size": list(mask.shape), "counts": _runs(mask)}
        assert np.array_equal(decode_rle(listed), mask)
        assert np.array_equal(rle_target(listed, size), expected)


def _runs(mask: np.ndarray) -> list:
    """Uncompressed COCO RLE counts of a mask (column-major runs, starting with background)."""
    flat = mask.reshape(-1, order="F").astype(np.int8)
    edges = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(edges).tolist()
    return [0] + runs if flat[0] else runs


def test_point_windows_draw_the_points_of_the_whole_mask():
    from modeling_efficientsam.data.label_cache import point_window
    from modeling_efficientsam.data.masks import encode_mask
    from modeling_efficientsam.data.prompts import sample_negative_points, sample_positive_points

    for rng, mask in random_masks(120, seed=1):
        height, width = mask.shape
        xs, ys = np.sort(rng.uniform(-4, width + 4, 2)), np.sort(rng.uniform(-4, height + 4, 2))
        box = [float(xs[0]), float(ys[0]), float(xs[1]), float(ys[1])]
        top, left, crop = point_window(encode_mask(mask), box)
        assert crop.sum() == mask.sum()
        for seed in range(3):
            whole, window = np.random.default_rng(seed), np.random.default_rng(seed)
            expected = (sample_positive_points(mask, 3, whole), sample_negative_points(mask, box, 4, whole))
            shifted = (box[0] - left, box[1] - top, box[2] - left, box[3] - top)
            got = (sample_positive_points(crop, 3, window) + (left, top),
                   sample_negative_points(crop, shifted, 4, window) + (left, top))
            assert all(np.array_equal(a, b) for a, b in zip(got, expected))


DATASET_OPTIONS = dict(image_size=64, mask_size=16, num_positive_points=2, num_negative_points=2)


def items(dataset, epochs=(0, 1, 2)):
    for epoch in epochs:
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            yield epoch, index, dataset[index]


@pytest.mark.parametrize("prompt_mode, max_objects, full", [("box", 3, False), ("point", 3, False), ("mixed", None, True)])
def test_dataset_items_are_the_same_with_and_without_the_label_cache(synthetic_pcb_dataset, prompt_mode, max_objects, full):
    from modeling_efficientsam.data import EfficientSamTrainingDataset

    options = dict(DATASET_OPTIONS, prompt_mode=prompt_mode, max_objects=max_objects, return_full_resolution_masks=full)
    split = synthetic_pcb_dataset["train"]
    plain = EfficientSamTrainingDataset(split, label_cache=False, **options)
    cached = EfficientSamTrainingDataset(split, **options)
    assert plain._labels is None and cached._labels is not None
    compared = 0
    for (_, _, a), (epoch, index, b) in zip(items(plain), items(cached)):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (prompt_mode, epoch, index, key)
        compared += len(a["labels"])
    assert compared > 20


def test_cached_items_do_no_full_resolution_mask_work(synthetic_pcb_dataset, monkeypatch, tmp_path):
    from modeling_efficientsam.data import EfficientSamTrainingDataset, training_dataset

    split = synthetic_pcb_dataset["train"]
    datasets_ = [EfficientSamTrainingDataset(split, label_cache=tmp_path, prompt_mode=mode, **DATASET_OPTIONS)
                 for mode in ("box", "point")]

    def forbidden(*args, **kwargs):
        raise AssertionError("full-resolution mask work in a cached epoch")

    monkeypatch.setattr(training_dataset, "decode_rle", forbidden)
    monkeypatch.setattr(training_dataset, "resize_mask", forbidden)
    for dataset in datasets_:
        assert sum(len(item["labels"]) for _, _, item in items(dataset, epochs=(0,))) > 0


def test_label_cache_is_built_once_and_keyed_by_the_split(synthetic_pcb_dataset, monkeypatch, tmp_path):
    from modeling_efficientsam.data import EfficientSamTrainingDataset, label_cache

    split = synthetic_pcb_dataset["train"]
    EfficientSamTrainingDataset(split, label_cache=tmp_path, prompt_mode="point", **DATASET_OPTIONS)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert len(folders) == 1

    def forbidden(*args, **kwargs):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(label_cache, "rle_target", forbidden)
    monkeypatch.setattr(label_cache, "point_window", forbidden)
    reused = EfficientSamTrainingDataset(split, label_cache=tmp_path, prompt_mode="point", **DATASET_OPTIONS)
    assert len(reused[0]["labels"]) > 0
    monkeypatch.undo()

    subset = split.select([2, 0, 1])  # other rows: another key, another folder
    EfficientSamTrainingDataset(subset, label_cache=tmp_path, **DATASET_OPTIONS)
    assert len(list(tmp_path.iterdir())) == 2
    other_size = EfficientSamTrainingDataset(split, label_cache=tmp_path, **dict(DATASET_OPTIONS, mask_size=8))
    assert other_size[0]["labels"].shape[-1] == 8
    assert (tmp_path / folders[0] / "targets-8.npy").exists()

    # an incomplete part (no completion record) is built again
    (tmp_path / folders[0] / "targets-16.json").unlink()
    rebuilt = EfficientSamTrainingDataset(split, label_cache=tmp_path, **DATASET_OPTIONS)
    assert (tmp_path / folders[0] / "targets-16.json").exists() and len(rebuilt[1]["labels"]) > 0


def test_label_cache_defaults_to_the_saved_dataset_folder(synthetic_pcb_dataset):
    from modeling_efficientsam.data import EfficientSamTrainingDataset
    from modeling_efficientsam.data.label_cache import default_label_root

    split = synthetic_pcb_dataset["validation"]
    root = Path(default_label_root(split))
    assert root.name == "labels" and (root.parent / "dataset_dict.json").exists()
    dataset = EfficientSamTrainingDataset(split, **DATASET_OPTIONS)
    assert Path(dataset._labels.directory).parent == root
    in_memory = split.flatten_indices().with_format(None)
    in_memory = type(split).from_dict(in_memory.to_dict(), features=split.features)
    assert default_label_root(in_memory) is None
    assert EfficientSamTrainingDataset(in_memory, **DATASET_OPTIONS)._labels is None


def test_unwritable_label_cache_folder_falls_back_to_per_item_targets(synthetic_pcb_dataset, monkeypatch, caplog):
    from modeling_efficientsam.data import EfficientSamTrainingDataset, label_cache

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(label_cache.LabelCache, "open_or_build", refuse)
    split = synthetic_pcb_dataset["train"]
    with caplog.at_level(logging.WARNING, logger=label_cache.__name__):
        dataset = EfficientSamTrainingDataset(split, **DATASET_OPTIONS)
    assert dataset._labels is None and "computing them for every item" in caplog.text
    plain = EfficientSamTrainingDataset(split, label_cache=False, **DATASET_OPTIONS)
    assert torch.equal(dataset[0]["labels"], plain[0]["labels"]) and len(plain[0]["labels"]) > 0
