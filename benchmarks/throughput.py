"""Shared pieces of the scoring-throughput benchmarks (pytest-benchmark files beside this one).

Throughput does not depend on the weights, so the benchmarks score with untrained networks
on synthetic slices; what they report (slices/s, network evaluations per slice, batch,
device, peak GPU memory) goes into ``benchmark.extra_info`` and is printed.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np
import torch

from methods.base import UADMethod
from methods.registry import create_method


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


def measure_scoring(benchmark: Any, method: UADMethod, images: np.ndarray, masks: np.ndarray, **extra: Any) -> dict[str, Any]:
    """Time ``method.score`` once (one pedantic round when enabled) and report throughput."""
    cuda = method.device.type == "cuda"

    def score() -> None:
        method.score(images, masks)
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        score()  # warm-up: cuDNN autotuning and allocator growth are not throughput
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if benchmark.disabled:
        benchmark(score)
    else:
        benchmark.pedantic(score, rounds=1, iterations=1, warmup_rounds=0)
    seconds = time.perf_counter() - start
    info: dict[str, Any] = {
        "method": method.name,
        "slices": len(images),
        "batch_size": method.config.score_batch_size,
        "seconds": round(seconds, 4),
        "slices_per_s": round(len(images) / seconds, 3),
        "device": torch.cuda.get_device_name(method.device) if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "amp_bf16": bool(method.config.amp and cuda),
        **extra,
    }
    if cuda:
        info["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    benchmark.extra_info.update(info)
    print(f"\n{info}")
    return info
