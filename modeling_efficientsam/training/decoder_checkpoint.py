"""Decoder-only checkpoints: the trained mask decoder and prompt encoder, without the image encoder.

With a frozen image encoder only the decoder side changes during fine-tuning, so it can be shipped
alone (a few MB) and put back on the base model it was trained with. :func:`save_decoder_only` writes
``decoder.safetensors`` (keys as in the full model, e.g. ``mask_decoder.…``) and
``decoder_config.json`` (the base model's name, a fingerprint of the image encoder the decoder was
trained on, and the full model config); :func:`load_decoder_on_base` checks the decoder's
configuration and the encoder fingerprint, then loads the weights onto the base.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Optional
from ..file_utils import write_json_atomic

__all__ = ["DECODER_INFO_FILE", "DECODER_WEIGHTS_FILE", "load_decoder_on_base", "save_decoder_only"]

logger = logging.getLogger(__name__)

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
    write_json_atomic(os.path.join(directory, DECODER_INFO_FILE), info, indent=2, sort_keys=True, default=str)
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
