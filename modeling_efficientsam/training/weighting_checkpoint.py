"""The loss-weighting state inside a Trainer checkpoint folder.

DWA keeps running averages and its current factors as buffers, uncertainty weighting its learned
log-variances as parameters: both must come back on resume for the run to continue exactly. The
trainer writes them next to the optimizer state (``checkpoint-*/loss_weighting.safetensors``) and
reads them back with it. The file records the strategy and the ordered term names, and a checkpoint
whose terms differ from the run's is refused rather than loaded into the wrong slots.
"""

from __future__ import annotations

import json
import logging
import os

import torch

__all__ = ["LOSS_WEIGHTING_FILE", "load_loss_weighting_state", "save_loss_weighting_state"]

logger = logging.getLogger(__name__)

LOSS_WEIGHTING_FILE = "loss_weighting.safetensors"


def save_loss_weighting_state(weighting, checkpoint_dir: str, strategy: str) -> str:
    """Write the state dict of ``weighting`` into ``checkpoint_dir``; returns the file's path."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().cpu().contiguous() for name, tensor in weighting.state_dict().items()}
    path = os.path.join(checkpoint_dir, LOSS_WEIGHTING_FILE)
    save_file(state, path, metadata={"strategy": strategy, "names": json.dumps(list(weighting.names))})
    return path


def load_loss_weighting_state(weighting, checkpoint_dir: str, device) -> bool:
    """Restore ``weighting`` from ``checkpoint_dir`` (in place); False when the folder has no such file.

    Raises ValueError when the checkpoint weights other terms than ``weighting``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.path.join(checkpoint_dir, LOSS_WEIGHTING_FILE)
    if not os.path.isfile(path):
        logger.warning("%s has no %s; the loss weighting starts afresh", checkpoint_dir, LOSS_WEIGHTING_FILE)
        return False
    with safe_open(path, framework="pt") as handle:
        names = json.loads(handle.metadata().get("names", "[]"))
    if tuple(names) != tuple(weighting.names):
        raise ValueError(f"{path} weights the terms {names}, but this run has {list(weighting.names)}")
    state = load_file(path, device=str(device))
    with torch.no_grad():
        weighting.load_state_dict(state)
    return True
