"""Convert an original EfficientSAM checkpoint into a transformers folder, and verify it.

    python -m modeling_efficientsam.convert_efficientsam_to_hf --checkpoint SRC --output_dir DIR \
        [--variant vitt|vits] [--original_config FILE] [--reference_io FILE] [--push_to_hub REPO_ID]

SRC is a local ``.pt`` (or ``.pt.zip``) file, an https URL, or a Hub file written
``owner/repo/path/in/repo.pt`` (for example ``yunyangx/EfficientSAM/efficient_sam_vitt.pt``,
where the released weights live). The checkpoint is read with ``weights_only=True``. The variant is
inferred from the tensor shapes unless given; other architectures take ``--original_config`` with the
original constructor numbers. Every step that is checked prints one ``OK`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Optional

import torch

from .file_utils import atomic_write, staged_directory
from .configuration_efficientsam import VARIANTS, EfficientSamConfig
from .image_processing_efficientsam import EfficientSamImageProcessor
from .modeling_efficientsam import EfficientSamModel
from .parity import compare_with_reference, format_report, reference_failures
from .processing_efficientsam import EfficientSamProcessor

HUB_REPO_OF_RELEASED_WEIGHTS = "yunyangx/EfficientSAM"
RELEASED_FILES = {"vitt": "efficient_sam_vitt.pt", "vits": "efficient_sam_vits.pt"}

# Original key -> transformers key. Applied once to every key: the first matching pattern wins, and a
# key that matches none is an error (nothing is dropped silently).
KEY_MAP: list[tuple[str, str]] = [
    (r"^image_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed."),
    (r"^image_encoder\.pos_embed$", "vision_encoder.pos_embed"),
    (r"^image_encoder\.blocks\.(\d+)\.norm([12])\.", r"vision_encoder.layers.\1.layer_norm\2."),
    (r"^image_encoder\.blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.", r"vision_encoder.layers.\1.\2."),
    (r"^image_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
    (r"^image_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
    (r"^image_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
    (r"^image_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
    (r"^prompt_encoder\.pe_layer\.", "prompt_encoder.shared_embedding."),
    (r"^prompt_encoder\.invalid_points\.weight$", "prompt_encoder.invalid_point_embed"),
    (r"^prompt_encoder\.point_embeddings\.weight$", "prompt_encoder.point_embed"),
    (r"^prompt_encoder\.bbox_top_left_embeddings\.weight$", "prompt_encoder.box_top_left_embed"),
    (r"^prompt_encoder\.bbox_bottom_right_embeddings\.weight$", "prompt_encoder.box_bottom_right_embed"),
    (r"^mask_decoder\.(iou_token|mask_tokens)\.weight$", r"mask_decoder.\1"),
    (r"^mask_decoder\.final_output_upscaling_layers\.0\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.final_output_upscaling_layers\.0\.1\.", "mask_decoder.upscale_norm."),
    (r"^mask_decoder\.final_output_upscaling_layers\.1\.0\.", "mask_decoder.upscale_conv2."),
    (r"^mask_decoder\.(transformer|output_hypernetworks_mlps|iou_prediction_head)\.", r"mask_decoder.\1."),
]
_COMPILED_KEY_MAP = [(re.compile(pattern), replacement) for pattern, replacement in KEY_MAP]


def convert_key(key: str) -> Optional[str]:
    for pattern, replacement in _COMPILED_KEY_MAP:
        if pattern.search(key):
            return pattern.sub(replacement, key, count=1)
    return None


def convert_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every original key; raises listing any key no rule covers."""
    converted, unmapped = {}, []
    for key, tensor in original.items():
        new_key = convert_key(key)
        if new_key is None:
            unmapped.append(key)
        else:
            converted[new_key] = tensor
    if unmapped:
        raise KeyError(f"{len(unmapped)} checkpoint keys have no mapping: {', '.join(sorted(unmapped))}")
    return converted


# ----------------------------------------------------------------------------------------------
# Reading the source
# ----------------------------------------------------------------------------------------------


def resolve_checkpoint(source: str, cache_dir: Optional[str] = None) -> Path:
    """Return a local path for SRC: a file, an https URL (downloaded) or an owner/repo/file Hub path."""
    if source.startswith(("http://", "https://")):
        target_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "efficientsam_downloads")
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / os.path.basename(source.split("?")[0])
        if not target.exists():
            print(f"downloading {source}")

            def download(temporary: str) -> None:
                with urllib.request.urlopen(source) as response, open(temporary, "wb") as handle:
                    shutil.copyfileobj(response, handle)

            atomic_write(target, download)
        return target
    path = Path(source).expanduser()
    if path.exists():
        return path
    parts = source.split("/")
    if len(parts) >= 3 and not source.startswith((".", "/", "~")):
        from huggingface_hub import hf_hub_download

        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        revision = None
        if "@" in repo_id:
            repo_id, revision = repo_id.split("@", 1)
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision, cache_dir=cache_dir))
    raise FileNotFoundError(
        f"checkpoint {source!r} is not a local file, an https URL, or a Hub path 'owner/repo/file.pt' "
        f"(e.g. {HUB_REPO_OF_RELEASED_WEIGHTS}/{RELEASED_FILES['vitt']})"
    )


def load_original_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read ``{"model": state_dict}`` (or a bare state dict) with ``weights_only=True``.

    A ``.zip`` that wraps a ``.pt`` (how the ViT-S weights were published) is unpacked first; a
    plain torch zip checkpoint is read directly.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            is_torch_archive = any(name.endswith("data.pkl") for name in names)
            inner = [name for name in names if name.endswith((".pt", ".pth")) and not name.startswith("__MACOSX")]
            if not is_torch_archive:
                if len(inner) != 1:
                    raise ValueError(f"{path}: expected one .pt file inside the zip archive, found {inner or names}")
                with tempfile.TemporaryDirectory() as tmp:
                    extracted = archive.extract(inner[0], tmp)
                    return load_original_state_dict(Path(extracted))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for bad pickles
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint with weights_only=True: {error}") from error
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: expected {{'model': state_dict}} or a state dict of tensors")
    return state_dict


# The original implementation's constructor numbers (the format of the reference fixtures'
# ``*_config.json``): the released checkpoints share these and differ in width and heads.
ORIGINAL_COMMON: dict = {
    "img_size": 1024, "patch_size": 16, "depth": 12, "mlp_ratio": 4.0, "neck_dims": [256, 256],
    "decoder_max_num_input_points": 6, "decoder_depth": 2, "decoder_num_heads": 8, "decoder_mlp_dim": 2048,
    "iou_head_depth": 3, "iou_head_hidden_dim": 256, "upscaling_layer_dims": [64, 32], "pretrain_img_size": 224,
}
ORIGINAL_VARIANTS: dict = {
    "vitt": {"patch_embed_dim": 192, "num_heads": 3},
    "vits": {"patch_embed_dim": 384, "num_heads": 6},
}
assert set(ORIGINAL_VARIANTS) == set(VARIANTS)


def config_from_original(original: dict, **kwargs) -> EfficientSamConfig:
    """An ``EfficientSamConfig`` from the original implementation's constructor numbers.

    Accepts exactly the keys of ``ORIGINAL_COMMON`` plus ``patch_embed_dim`` and ``num_heads`` (missing
    ones take the ViT-T values); any other key is an error, since silently ignoring an architecture
    number gives a wrong model.
    """
    known = set(ORIGINAL_COMMON) | {"patch_embed_dim", "num_heads"}
    unknown = sorted(set(original) - known)
    if unknown:
        raise ValueError(f"unknown original config keys {unknown}; expected a subset of {sorted(known)}")
    values = {**ORIGINAL_COMMON, **ORIGINAL_VARIANTS["vitt"], **original}
    neck = list(values["neck_dims"])
    return EfficientSamConfig(
        vision_config={
            "image_size": values["img_size"], "patch_size": values["patch_size"],
            "hidden_size": values["patch_embed_dim"], "num_hidden_layers": values["depth"],
            "num_attention_heads": values["num_heads"], "mlp_ratio": values["mlp_ratio"],
            "pretrain_image_size": values["pretrain_img_size"], "neck_hidden_sizes": neck,
        },
        prompt_encoder_config={"max_num_points": values["decoder_max_num_input_points"]},
        mask_decoder_config={
            "hidden_size": neck[-1], "num_hidden_layers": values["decoder_depth"],
            "num_attention_heads": values["decoder_num_heads"], "mlp_dim": values["decoder_mlp_dim"],
            "iou_head_depth": values["iou_head_depth"], "iou_head_hidden_dim": values["iou_head_hidden_dim"],
            "upscaling_dims": list(values["upscaling_layer_dims"]),
        },
        **kwargs,
    )


def infer_variant(state_dict: dict[str, torch.Tensor]) -> str:
    """'vitt' or 'vits' from the encoder width and depth; errors for any other architecture."""
    width = state_dict["image_encoder.patch_embed.proj.weight"].shape[0]
    depth = len({key.split(".")[2] for key in state_dict if key.startswith("image_encoder.blocks.")})
    for name, numbers in ORIGINAL_VARIANTS.items():
        if numbers["patch_embed_dim"] == width and depth == 12:
            return name
    raise ValueError(
        f"the checkpoint's encoder (width {width}, depth {depth}) is neither vitt (192, 12) nor vits (384, 12); "
        "pass --original_config FILE with its constructor numbers"
    )


# ----------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------


def _ok(message: str) -> None:
    print(f"OK  {message}", flush=True)


def _probe_inputs(config: EfficientSamConfig, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    size = config.image_size
    pixels = torch.randn(1, 3, size, size, generator=generator)
    boxes = torch.tensor([[[0.1, 0.2, 0.6, 0.7], [0.3, 0.1, 0.9, 0.5]]]) * size
    return pixels, boxes


def convert(
    checkpoint: str,
    output_dir: str,
    variant: Optional[str] = None,
    original_config: Optional[str] = None,
    reference_io: Optional[str] = None,
    tolerance: float = 1e-4,
    push_to_hub: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> Path:
    path = resolve_checkpoint(checkpoint, cache_dir=cache_dir)
    original = load_original_state_dict(path)
    _ok(f"read {len(original)} tensors from {path} (weights_only=True)")

    if original_config is not None:
        with open(original_config) as handle:
            config = config_from_original(json.load(handle))
        source = f"--original_config {original_config}"
    else:
        inferred = infer_variant(original)
        if variant is not None and variant != inferred:
            raise ValueError(f"--variant {variant} was given but the checkpoint's shapes are those of {inferred}")
        variant = inferred
        config = EfficientSamConfig.from_variant(variant)
        source = f"variant {variant}" + (" (inferred from shapes)" if variant == inferred else "")
    _ok(f"architecture from {source}: width {config.vision_config.hidden_size}, depth "
        f"{config.vision_config.num_hidden_layers}, input {config.image_size}")

    converted = convert_state_dict(original)
    _ok(f"key map renamed all {len(converted)} keys")

    model = EfficientSamModel(config).eval()
    result = model.load_state_dict(converted, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise KeyError(
            "strict loading failed: missing " + (", ".join(result.missing_keys) or "none")
            + "; unexpected (would be dropped) " + (", ".join(result.unexpected_keys) or "none")
        )
    loaded = model.state_dict()
    for old_key, tensor in original.items():
        if not torch.equal(loaded[convert_key(old_key)], tensor.to(loaded[convert_key(old_key)].dtype)):
            raise ValueError(f"{old_key} changed while loading")
    _ok(f"strict load: every model tensor comes from the checkpoint, unchanged ({model.num_parameters():,} parameters)")

    processor = EfficientSamProcessor(EfficientSamImageProcessor(size=config.image_size))
    if reference_io is not None:
        report = compare_with_reference(model, processor, reference_io)
        failures = reference_failures(report, tolerance)
        if failures:
            raise ValueError(f"outputs differ from {reference_io}: {'; '.join(failures)} ({format_report(report)})")
        _ok(f"reproduces {reference_io} ({report['dtype']}): {format_report(report)}")

    output = Path(output_dir)
    with staged_directory(output) as staging:  # the folder appears whole, or not at all
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        reloaded = EfficientSamModel.from_pretrained(staging).eval()
        pixels, boxes = _probe_inputs(config)
        with torch.no_grad():
            before = model(pixel_values=pixels, input_boxes=boxes)
            after = reloaded(pixel_values=pixels, input_boxes=boxes)
        if not (torch.equal(before.pred_masks, after.pred_masks) and torch.equal(before.iou_scores, after.iou_scores)):
            raise ValueError("the saved folder does not reproduce the converted model's outputs")
        _ok("saved folder (config.json, model.safetensors, processor config) reloads with identical outputs")
    _ok(f"wrote {output}")

    if push_to_hub:
        model.push_to_hub(push_to_hub)
        processor.push_to_hub(push_to_hub)
        _ok(f"pushed to https://huggingface.co/{push_to_hub}")
    return output


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="local .pt/.pt.zip, https URL, or owner/repo/file.pt on the Hub")
    parser.add_argument("--output_dir", required=True, help="folder to write (replaced atomically)")
    parser.add_argument("--variant", choices=sorted(ORIGINAL_VARIANTS), help="checked against the tensor shapes")
    parser.add_argument("--original_config", help="JSON with the original constructor numbers (other architectures)")
    parser.add_argument("--reference_io", help="safetensors of reference inputs/outputs to reproduce: a float64 file is checked strictly in "
                        "float64; a float32 file checks the embeddings within --tolerance and the decoder loosely")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference of the image embeddings for a float32 --reference_io")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="also upload the folder to this Hub repo")
    parser.add_argument("--cache_dir", help="where downloads are kept")
    args = parser.parse_args(argv)
    try:
        convert(
            args.checkpoint,
            args.output_dir,
            variant=args.variant,
            original_config=args.original_config,
            reference_io=args.reference_io,
            tolerance=args.tolerance,
            push_to_hub=args.push_to_hub,
            cache_dir=args.cache_dir,
        )
    except (ValueError, KeyError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
