"""Where half precision pays on CPU, and the CPU description that goes with every speed number.

The decision itself lives in the model file (it ships with saved models for ``trust_remote_code``):
:func:`~modeling_efficientsam.modeling_efficientsam.cpu_half_precision_is_native` detects native
bfloat16 / float16 (ATen's CPU capability plus the /proc/cpuinfo flags, overridable with
``EFFICIENTSAM_CPU_NATIVE_HALF=1`` / ``0``), and under CPU autocast without it the model runs in
float32 with one log line, since emulated half precision is several times slower than float32.

:func:`autocast_dtype` says which dtype a requested mixed-precision setting will actually compute
in; :func:`cpu_description` is what the benchmarks record beside their numbers.
"""

from __future__ import annotations

import os
import platform
from typing import Optional

import torch

from .modeling_efficientsam import CPU_NATIVE_HALF_PRECISION_ENV, _cpu_flags, cpu_half_precision_is_native

# Flags worth recording: what decides float32 speed (AVX2 / AVX-512) and half-precision support.
RECORDED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16", "bf16",
                  "asimdhp")
# Environment variables that change which kernels run or how memory is reused (glibc's allocator);
# recorded when set.
RECORDED_ENVIRONMENT = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", CPU_NATIVE_HALF_PRECISION_ENV,
                        "OMP_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def autocast_dtype(device, requested: Optional[torch.dtype]) -> torch.dtype:
    """The dtype the model computes in when ``requested`` autocast (None: none) is asked for on ``device``:
    float32 on a CPU without native support for ``requested``, else ``requested``."""
    if requested is None or requested == torch.float32:
        return torch.float32
    if torch.device(device).type == "cpu" and not cpu_half_precision_is_native(requested):
        return torch.float32
    return requested


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description() -> dict:
    """The CPU as the benchmarks record it: model, logical CPUs, torch threads, ATen capability,
    native bf16 / fp16 as the model decides it, the relevant flags and kernel-selecting variables."""
    flags = _cpu_flags()
    return {
        "cpu": cpu_model_name(),
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_half_precision_is_native(torch.bfloat16),
        "native_fp16": cpu_half_precision_is_native(torch.float16),
        "flags": [flag for flag in RECORDED_FLAGS if flag in flags],
        "environment": {name: os.environ[name] for name in RECORDED_ENVIRONMENT if name in os.environ},
        "torch": torch.__version__,
    }


def cpu_summary(description: Optional[dict] = None) -> str:
    """One line for tables: 'Intel(R) Xeon(R) Processor, ATen AVX512, native bf16, 2 threads'."""
    d = description or cpu_description()
    half = "native bf16" if d["native_bf16"] else "no native bf16"
    return f"{d['cpu']}, ATen {d['aten_cpu_capability']}, {half}, {d['torch_threads']} threads"


__all__ = ["autocast_dtype", "cpu_description", "cpu_model_name", "cpu_summary"]
