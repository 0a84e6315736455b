"""Putting the frozen teacher where the student's batches are, under every launch configuration.

``accelerator.prepare_model(teacher, evaluation_mode=True)`` adds mixed-precision autocast and moves
the model to ``accelerator.device``, but not always:

* under FSDP, Accelerate leaves placement to FSDP's wrapping, which evaluation mode skips, so the
  teacher would stay on the CPU while the batches are on the GPU;
* under DeepSpeed, Accelerate adds no autocast (DeepSpeed owns mixed precision) and the Trainer casts
  every floating-point input to DeepSpeed's dtype (bf16 / fp16), which a float32 teacher cannot take.

:func:`prepare_teacher` handles the three cases the way TRL prepares its reference and teacher
models: DeepSpeed ZeRO-3 shards the teacher through its own ``deepspeed.initialize`` engine (as the
student is sharded); any other DeepSpeed stage puts a full copy on the device in DeepSpeed's dtype;
everything else (CPU, DDP on one or several machines, FSDP) goes through ``prepare_model`` with
evaluation mode and is then moved to ``accelerator.device`` when Accelerate did not place it. In
every case the teacher ends in eval mode with ``requires_grad=False`` on all its parameters, and is
never wrapped for training (no DDP, no FSDP sharding of a model that gets no gradients).
"""

from __future__ import annotations

import copy
import logging

import torch

__all__ = ["prepare_teacher"]

logger = logging.getLogger(__name__)


def _distributed_type(accelerator) -> str:
    value = getattr(accelerator, "distributed_type", "NO")
    return str(getattr(value, "value", value)).upper()


def _deepspeed_dtype(accelerator) -> torch.dtype:
    """The dtype the Trainer casts inputs to under DeepSpeed (the same call), else from mixed_precision."""
    plugin = accelerator.state.deepspeed_plugin
    hf_config = getattr(plugin, "hf_ds_config", None)
    if hf_config is not None and hasattr(hf_config, "dtype"):
        return hf_config.dtype()
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(getattr(accelerator, "mixed_precision", "no")), torch.float32)


def _deepspeed_zero3_engine(teacher, accelerator):
    """The teacher sharded by its own DeepSpeed engine, with the student's ZeRO-3 configuration (no optimizer)."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    hidden = teacher.config.mask_decoder_config.hidden_size
    zero = config.setdefault("zero_optimization", {})
    for key, value in (("reduce_bucket_size", hidden * hidden), ("stage3_param_persistence_threshold", 10 * hidden),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))):
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    return engine


def _parameter_devices(model):
    return {parameter.device for parameter in model.parameters()} | {buffer.device for buffer in model.buffers()}


def prepare_teacher(teacher, accelerator):
    """The frozen ``teacher`` placed for ``accelerator``'s launch configuration (see the module docstring)."""
    teacher.requires_grad_(False)
    teacher.eval()
    kind = _distributed_type(accelerator)
    if kind == "DEEPSPEED":
        stage = getattr(accelerator.state.deepspeed_plugin, "zero_stage", None)
        if stage == 3:
            prepared = _deepspeed_zero3_engine(teacher, accelerator)
        else:  # ZeRO 0-2 keeps a full copy per process: the teacher fits, so place and cast it like TRL's stage 0 engine
            prepared = teacher.to(device=accelerator.device, dtype=_deepspeed_dtype(accelerator))
    else:
        prepared = accelerator.prepare_model(teacher, evaluation_mode=True)
        device = torch.device(accelerator.device)
        if _parameter_devices(prepared) != {device}:
            logger.info("moving the teacher to %s (the %s launch did not place it)", device, kind)
            prepared.to(device)
    prepared.eval()
    return prepared
