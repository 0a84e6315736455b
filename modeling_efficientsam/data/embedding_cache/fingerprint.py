"""What keys an embedding cache: the encoder, the preprocessing, the dtypes, and the dataset split.

The cache fingerprint (its folder name) is a digest of: the format version; the vision encoder's
architecture fields and every state-dict tensor (name, dtype, shape, raw bytes); the preprocessing
(image size, mean / std, rescale, resize and EXIF rules); the compute dtype; the storage dtype. A
split fingerprint adds the dataset's identity: the conversion fingerprint (else datasets' own), the
split name, the row count and the image ids in order.
"""

from __future__ import annotations

import hashlib
import inspect
import json

import numpy as np
import torch

from ...file_utils import json_sha256
from ...image_processing_efficientsam import IMAGENET_MEAN, IMAGENET_STD
from .storage import FORMAT_VERSION, check_dtypes


def vision_encoder_fingerprint(model) -> str:
    """SHA-256 over the vision encoder's architecture fields and the raw bytes of its state dict.

    Only the encoder determines the embeddings, so prompt-encoder or mask-decoder changes (the parts
    that are trained on a frozen encoder) leave this fingerprint, and the cache, untouched. Tensors
    are hashed straight from their memory (no copy for contiguous CPU tensors); the name, dtype and
    shape of each go in too.
    """
    config = model.config.vision_config
    fields = [name for name in inspect.signature(type(config).__init__).parameters if name not in ("self", "kwargs")]
    digest = hashlib.sha256()
    digest.update(json.dumps({name: getattr(config, name, None) for name in fields}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.vision_encoder.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def preprocessing_spec(image_size: int, image_processor=None) -> dict:
    """Everything about pixels that changes an embedding, as stored in the fingerprint."""
    mean = IMAGENET_MEAN if image_processor is None else image_processor.image_mean
    std = IMAGENET_STD if image_processor is None else image_processor.image_std
    if image_processor is not None and int(image_processor.size) != int(image_size):
        raise ValueError(f"image_processor.size ({image_processor.size}) differs from the model's image_size ({image_size})")
    return {
        "image_size": int(image_size),
        "image_mean": [float(v) for v in mean],
        "image_std": [float(v) for v in std],
        "rescale": "uint8 RGB / 255",
        "resize": "bilinear stretch to a square, align_corners=False, antialias=False",
        "exif": "orientation applied once at conversion (images stored upright), not applied again",
    }


def split_fingerprint(split, name: str) -> str:
    """Identity of a converted split: its conversion fingerprint (else datasets' own), name and image ids."""
    from ..conversion import conversion_metadata

    try:
        source = conversion_metadata(split)["fingerprint"]
    except (ValueError, KeyError):
        source = getattr(split, "_fingerprint", None)
    ids = np.asarray(list(split["image_id"]), dtype=np.int64)
    return json_sha256({"source": source, "split": name, "num_rows": len(split),
                        "image_ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest()})


def cache_fingerprint(model, dtype: str = "bfloat16", compute_dtype: str = "float32", image_processor=None) -> dict:
    """The parts that key a cache directory, and their digest under ``"fingerprint"``."""
    check_dtypes(dtype, compute_dtype)
    parts = {
        "format_version": FORMAT_VERSION,
        "vision_encoder_sha256": vision_encoder_fingerprint(model),
        "preprocessing": preprocessing_spec(model.config.vision_config.image_size, image_processor),
        "compute_dtype": compute_dtype,
        "dtype": dtype,
    }
    return {"fingerprint": json_sha256(parts), "parts": parts}
