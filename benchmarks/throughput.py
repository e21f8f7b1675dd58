"""Shared pieces of the scoring-throughput benchmarks (pytest-benchmark files beside this one).

Throughput does not depend on the weights, so the benchmarks score with untrained networks
on synthetic slices; what they report (slices/s, network evaluations per slice, batch,
device, peak GPU memory, achieved TFLOP/s and MFU) goes into ``benchmark.extra_info`` and
is printed. Timings are pytest-benchmark's median over several rounds after warm-up
rounds. FLOPs come from the method's ``cost_plan`` and ``torch.utils.flop_counter`` on a
meta-device twin, as in ``--estimate``; MFU divides the achieved FLOP/s by the dense bf16
peak of the detected GPU (``benchmarks.estimate.GPU_PEAK_TFLOPS``; ``UAD_BENCH_GPU=h100``
names it when the device name is not recognised).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from methods.base import UADMethod
from methods.registry import create_method

if TYPE_CHECKING:  # pragma: no cover
    from datasets.format import SliceSet


def cpu_threads() -> int:
    """Torch threads for CPU benchmarks: ``UAD_BENCH_THREADS`` or at most two.

    On a shared machine set ``UAD_BENCH_THREADS=1``: OpenMP threads spin when other jobs
    hold the cores, and two threads can be an order of magnitude slower than one.
    """
    return int(os.environ.get("UAD_BENCH_THREADS", min(2, torch.get_num_threads())))


def synthetic_slices(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` one-channel disc 'brains' with noise texture, and their brain masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    brain = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) <= (0.4 * size) ** 2).astype(np.uint8)
    images = (rng.random((n, 1, size, size)) * 0.2 + 0.4).astype(np.float32) * brain
    return images, np.repeat(brain[None], n, 0)


def synthetic_set(n: int, size: int, seed: int = 0) -> "SliceSet":
    """``synthetic_slices`` as a healthy training ``SliceSet`` (for timing training loops)."""
    import pandas as pd

    from datasets.format import SliceSet

    images, brains = synthetic_slices(n, size, seed)
    table = pd.DataFrame({"subject_id": [f"s{i}" for i in range(n)], "slice_index": np.arange(n), "split": "train", "lesion_area": 0})
    return SliceSet(images, np.zeros_like(brains), brains, table, ["T1"])


def untrained(name: str, profile: str, shape: tuple[int, int, int], **overrides: Any) -> UADMethod:
    """A method with freshly initialised networks, marked fitted, for timing only."""
    method = create_method(name, profile, **overrides)
    method.input_shape_ = shape
    method._build()
    if name == "madad":
        method.latent_scale_ = 1.0  # MAD-AD's fit sets it from the training latents
    if hasattr(method, "data_range_") and method.data_range_ is None:
        method.data_range_ = (0.0, 1.0)  # the pixel methods' fit records the training range
    method.fitted_ = True
    return method


def largest_batch(forward: Callable[[int], None], limit: int = 512) -> int:
    """Largest power of two <= ``limit`` for which ``forward(batch)`` fits on the GPU, halved for headroom."""
    best, batch = 1, 1
    while batch <= limit:
        try:
            forward(batch)
            torch.cuda.synchronize()
            best, batch = batch, batch * 2
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return max(1, best // 2)


def gpu_peak(device: torch.device) -> tuple[str, str | None, float | None]:
    """(device name, ``GPU_PEAK_TFLOPS`` key, dense bf16 peak TFLOP/s) of a CUDA device; ``UAD_BENCH_GPU``
    names the key when the device name is not recognised. On the CPU: ("cpu", None, None)."""
    from benchmarks.estimate import GPU_PEAK_TFLOPS, detect_gpu

    if device.type != "cuda":
        return "cpu", None, None
    name = torch.cuda.get_device_name(device)
    key = os.environ.get("UAD_BENCH_GPU", "").lower() or detect_gpu(name)
    return name, key, GPU_PEAK_TFLOPS.get(key) if key else None


def plan_flops(method: UADMethod, n_train: int = 1, n_val: int = 1) -> tuple[Any, dict[str, int]]:
    """The method's cost plan and the FLOPs of one evaluation per stage, counted on a meta-device twin
    (the same counts ``--estimate`` uses)."""
    from benchmarks.estimate import built_method, stage_flop_counts
    from methods.base import config_to_dict

    config = {k: v for k, v in config_to_dict(method.config).items() if k != "device"}
    twin = built_method(method.name, "paper", config, tuple(method.input_shape_))  # type: ignore[arg-type]
    plan = twin.cost_plan(n_train, n_val)
    return plan, stage_flop_counts(twin, plan)


def efficiency(device: torch.device, flops_per_second: float) -> dict[str, Any]:
    """Achieved TFLOP/s and, on a GPU of ``GPU_PEAK_TFLOPS``, MFU = achieved / dense bf16 peak."""
    name, key, peak = gpu_peak(device)
    info: dict[str, Any] = {"achieved_tflops": round(flops_per_second / 1e12, 4)}
    if device.type == "cuda":
        info.update(gpu=name, gpu_key=key, peak_bf16_tflops=peak, mfu=None if peak is None else round(flops_per_second / (peak * 1e12), 4))
    return info


def timed(benchmark: Any, fn: Callable[[], None], rounds: int, warmup_rounds: int, device: torch.device | None = None) -> float:
    """Seconds per call: pytest-benchmark's median over ``rounds`` after ``warmup_rounds`` (one plain call when disabled).

    On a CUDA ``device`` every call waits for the GPU, and the peak-memory counter starts
    afresh, so that the timings and ``max_memory_allocated`` describe ``fn`` alone.
    """
    if device is not None and device.type == "cuda":
        call = fn

        def fn() -> None:
            call()
            torch.cuda.synchronize(device)

        torch.cuda.reset_peak_memory_stats(device)
    if benchmark.disabled:
        start = time.perf_counter()
        benchmark(fn)
        return time.perf_counter() - start
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    return float(benchmark.stats.stats.median)


def measure_scoring(
    benchmark: Any, method: UADMethod, images: np.ndarray, masks: np.ndarray, rounds: int = 5, warmup_rounds: int = 1, **extra: Any
) -> dict[str, Any]:
    """Time ``method.score`` (median of ``rounds`` after warm-up) and report slices/s, peak memory and MFU."""
    cuda = method.device.type == "cuda"
    seconds = timed(benchmark, lambda: method.score(images, masks), rounds, warmup_rounds, method.device)
    plan, flops = plan_flops(method)
    per_slice = sum(e.count * flops[e.stage] for e in plan.score)
    info: dict[str, Any] = {
        "method": method.name,
        "slices": len(images),
        "batch_size": method.config.score_batch_size,
        "seconds": round(seconds, 4),
        "slices_per_s": round(len(images) / seconds, 3),
        "gflop_per_slice": round(per_slice / 1e9, 3),
        **efficiency(method.device, per_slice * len(images) / seconds),
        "device": torch.cuda.get_device_name(method.device) if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "amp_bf16": bool(method.config.amp and cuda),
        "rounds": 1 if benchmark.disabled else rounds,
        **extra,
    }
    return report(benchmark, info, cuda)


def report(benchmark: Any, info: dict, cuda: bool) -> dict:
    """Add the peak GPU memory (on CUDA), store ``info`` in the benchmark's extra_info and print it."""
    if cuda:
        info["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    benchmark.extra_info.update(info)
    print(f"\n{info}")
    return info
