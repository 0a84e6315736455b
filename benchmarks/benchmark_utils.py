"""What every benchmark here shares: the machine record, disturbance-aware timing, the float32 peak.

* :func:`machine_record`: CPU (model, ATen capability, native bf16 / fp16 as the model decides it,
  flags), torch threads, load average; stored beside every number.
* :class:`CpuWatch` / :func:`measure`: timings on a shared machine. Each timed run also measures the
  CPU time other processes used meanwhile (from /proc/stat); a run during which they used more than
  ``MAX_OTHERS`` cores is repeated (within a patience budget) and what had to be kept anyway is
  flagged. On 2 cores, one other busy process slows small multi-threaded operators by up to 20x.
* :func:`interleaved`: several variants timed in turn, round after round, so that a change of load
  hits all of them alike; ratios between variants come from the same rounds.
* :func:`matmul_peak`: float32 (and bf16) GFLOP/s of a large matrix product, measured in the run.
* :func:`synchronized`: a function timed on an accelerator returns only once its kernels are done.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict

import torch

from modeling_efficientsam.precision import cpu_description, cpu_summary

MAX_OTHERS = 0.15  # cores used by other processes during a run, above which the run counts as disturbed
MAX_ATTEMPTS = 4  # timed attempts per accepted run before the least disturbed one is kept


def load_average() -> float:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")


def accelerator_description(device) -> dict:
    """The GPU a CUDA device is (name, compute capability, memory, CUDA and cuDNN versions), or {}."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    return {
        "gpu": properties.name,
        "compute_capability": f"{properties.major}.{properties.minor}",
        "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
        "multiprocessors": properties.multi_processor_count,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),  # "highest": no TF32
    }


def machine_record(device="cpu") -> dict:
    """CPU description, torch threads and the 1-minute load average, for a results file; on a GPU
    also the GPU (:func:`accelerator_description`), which the summary then names first."""
    record = {**cpu_description(), "load_average_1min": load_average(), "summary": cpu_summary()}
    accelerator = accelerator_description(device)
    if accelerator:
        record["accelerator"] = accelerator
        record["summary"] = (f"{accelerator['gpu']} (compute {accelerator['compute_capability']}, CUDA {accelerator['cuda']}, "
                             f"torch {torch.__version__}); host: {record['summary']}")
    return record


def synchronized(function: Callable[[], object], device) -> Callable[[], object]:
    """`function` followed by waiting for the device's queued work (a no-op wait on a CPU), so that a
    wall-clock timer around a call measures the work, not its launch."""
    device = torch.device(device)
    if device.type == "cpu":
        return function

    def run():
        result = function()
        torch.accelerator.synchronize(device) if hasattr(torch, "accelerator") else torch.cuda.synchronize(device)
        return result

    return run


class CpuWatch:
    """CPU time used by *other* processes during a measurement, from /proc/stat minus our own usage.

    ``others`` is the average number of cores other processes used while a run lasted.
    """

    def __init__(self, patience: float = 120.0):
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.available = Path("/proc/stat").exists()
        self.patience = patience  # total seconds this process may spend waiting for, or retrying into, quiet

    @property
    def patient(self) -> bool:
        return self.patience > 0

    def _busy_seconds(self) -> float:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        return (sum(fields) - fields[3] - fields[4]) / self.tick  # all but idle and iowait

    @staticmethod
    def _own_seconds() -> float:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system

    def start(self):
        return (time.perf_counter(), self._busy_seconds() if self.available else 0.0, self._own_seconds())

    def stop(self, started) -> tuple:
        wall = time.perf_counter() - started[0]
        if not self.available:
            return wall, 0.0
        others = (self._busy_seconds() - started[1]) - (self._own_seconds() - started[2])
        return wall, max(0.0, others) / max(wall, 1e-9)

    def wait_for_quiet(self, max_others: float) -> None:
        """Wait until other processes use less than ``max_others`` cores over 0.5 s, while patience lasts."""
        while self.available and self.patient:
            mark = self.start()
            time.sleep(0.5)
            wall, others = self.stop(mark)
            if others <= max_others:
                return
            self.patience -= wall


WATCH = CpuWatch()


def measure(function: Callable[[], object], repeats: int) -> dict:
    """Warm up once, then collect ``repeats`` timings, each retried while disturbed (see :class:`CpuWatch`).

    Returns ``seconds`` (the fastest accepted run), ``runs`` (every attempt: wall seconds and the
    cores other processes used meanwhile) and ``clean`` (False if some run had to be kept although
    it was disturbed, after ``MAX_ATTEMPTS`` tries or when patience ran out).
    """
    function()  # warm-up
    accepted, runs, clean = [], [], True
    for _ in range(repeats):
        best = None
        for _ in range(MAX_ATTEMPTS):
            WATCH.wait_for_quiet(MAX_OTHERS)
            mark = WATCH.start()
            function()
            wall, others = WATCH.stop(mark)
            runs.append({"seconds": round(wall, 4), "other_cores": round(others, 3)})
            if best is None or others < best[1]:
                best = (wall, others)
            if others <= MAX_OTHERS:
                break
            WATCH.patience -= wall
            if not WATCH.patient:
                break
        clean = clean and best[1] <= MAX_OTHERS
        accepted.append(best[0])
    return {"seconds": min(accepted), "runs": runs, "clean": clean}


def interleaved(functions: Dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> Dict[str, dict]:
    """Time each function once per round, in turn, for ``rounds`` rounds (after ``warmup`` untimed ones).

    Per name: ``best`` (fastest run), ``median``, ``runs`` (seconds and other processes' cores per run)
    and ``quiet_best`` (fastest run during which others used at most ``MAX_OTHERS`` cores, or None).
    Before each round the machine gets a chance to be quiet (within the patience budget).
    """
    for _ in range(warmup):
        for function in functions.values():
            function()
    runs = {name: [] for name in functions}
    for _ in range(rounds):
        WATCH.wait_for_quiet(MAX_OTHERS)
        for name, function in functions.items():
            mark = WATCH.start()
            function()
            wall, others = WATCH.stop(mark)
            runs[name].append({"seconds": round(wall, 4), "other_cores": round(others, 3)})
    results = {}
    for name, entries in runs.items():
        seconds = [entry["seconds"] for entry in entries]
        quiet = [entry["seconds"] for entry in entries if entry["other_cores"] <= MAX_OTHERS]
        results[name] = {"best": min(seconds), "median": statistics.median(seconds),
                         "quiet_best": min(quiet) if quiet else None, "runs": entries}
    return results


def matmul_peak(size: int = 3072, repeats: int = 5, device="cpu") -> dict:
    """GFLOP/s of a ``size`` cube matrix product on ``device``: float32 (the peak the float32 decoder is
    held to) and bfloat16; the fastest of ``repeats`` after a warm-up."""
    result = {"matrix_size": size}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(size, size).to(device, dtype), torch.randn(size, size).to(device, dtype)
        product = synchronized(lambda: torch.mm(a, b), device)
        product()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
        result[f"{name}_gflops"] = round(2 * size**3 / best / 1e9, 1)
    return result


__all__ = ["MAX_ATTEMPTS", "MAX_OTHERS", "WATCH", "CpuWatch", "accelerator_description", "interleaved", "load_average",
           "machine_record", "matmul_peak", "measure", "synchronized"]
