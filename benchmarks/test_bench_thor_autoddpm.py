"""Scoring throughput of THOR and AutoDDPM (slices/s, network evaluations per slice).

    pytest benchmarks/test_bench_thor_autoddpm.py --benchmark-enable -s

- CPU: the ``quick`` profile on 16 slices of 128 x 128 (internal 64 x 64), at most two threads
  (``UAD_BENCH_THREADS`` overrides);
- CUDA: the ``paper`` profile (T = 1000, the full THOR/ci-ber UNet, 128 x 128) under bf16
  autocast with the largest power-of-two batch whose forward pass fits (up to 512);
  skipped cleanly without CUDA.

Networks are built untrained (throughput does not depend on the weights); the perceptual
distance is whatever ``make_perceptual("auto")`` resolves to (the SSIM substitute unless
``UAD_BENCH_LPIPS_DIR`` points at LPIPS weights) and is reported. Each benchmark writes
``slices_per_s``, ``nfe_per_slice``, batch size, device and perceptual distance into
``benchmark.extra_info`` and prints them. With benchmarks disabled (the project default)
the same code runs once on the ``tiny`` profile as a smoke test.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from methods.common.diffusion import PixelDiffusionMethod  # noqa: E402
from methods.registry import create_method  # noqa: E402

METHODS = ("thor", "autoddpm")


def _untrained(name: str, profile: str, shape: tuple[int, int, int], **overrides) -> PixelDiffusionMethod:
    method = create_method(name, profile, **overrides)
    assert isinstance(method, PixelDiffusionMethod)
    method.input_shape_ = shape
    method._build()
    method.fitted_ = True
    return method


def _slices(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    brain = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) <= (0.4 * size) ** 2).astype(np.uint8)
    images = (rng.random((n, 1, size, size)) * 0.2 + 0.4).astype(np.float32) * brain
    return images, np.repeat(brain[None], n, 0)


def _run(benchmark, method: PixelDiffusionMethod, images: np.ndarray, masks: np.ndarray) -> dict:
    def score() -> None:
        method.score(images, masks)
        if method.device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    if benchmark.disabled:
        benchmark(score)
    else:
        benchmark.pedantic(score, rounds=1, iterations=1, warmup_rounds=0)
    seconds = time.perf_counter() - start
    info = {
        "method": method.name,
        "slices": len(images),
        "batch_size": method.config.score_batch_size,
        "slices_per_s": round(len(images) / seconds, 3),
        "nfe_per_slice": method.nfe,  # one batched network call per chain step
        "internal_resolution": list(method.internal_size),
        "T": method.T,
        "perceptual": method.notes.get("perceptual"),
        "device": str(method.device) if method.device.type == "cpu" else torch.cuda.get_device_name(method.device),
        "threads": torch.get_num_threads(),
        "amp_bf16": bool(method.config.amp and method.device.type == "cuda"),
    }
    benchmark.extra_info.update(info)
    print(info)
    return info


@pytest.mark.parametrize("name", METHODS)
def test_bench_score_cpu(benchmark, name: str) -> None:
    # UAD_BENCH_THREADS=1 on a shared box: OpenMP threads spin when other jobs hold the cores
    torch.set_num_threads(int(os.environ.get("UAD_BENCH_THREADS", min(2, torch.get_num_threads()))))
    profile, n, size = ("tiny", 4, 32) if benchmark.disabled else ("quick", 16, 128)
    method = _untrained(name, profile, (1, size, size), device="cpu", score_batch_size=16, progress=False)
    images, masks = _slices(n, size)
    info = _run(benchmark, method, images, masks)
    assert info["nfe_per_slice"] >= 1 and info["slices_per_s"] > 0


def largest_batch(method: PixelDiffusionMethod, limit: int = 512) -> int:
    """Largest power of two (<= limit) whose bf16 forward pass fits; halved for the maps' headroom."""
    h, w = method.internal_size
    c = int(method.input_shape_[0])
    best, batch = 1, 1
    while batch <= limit:
        try:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                x = torch.randn(batch, c, h, w, device=method.device)
                method.model(x, torch.zeros(batch, dtype=torch.long, device=method.device))
            torch.cuda.synchronize()
            best = batch
            batch *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return max(1, best // 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", METHODS)
def test_bench_score_cuda_bf16(benchmark, name: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    profile = "tiny" if benchmark.disabled else "paper"
    method = _untrained(name, profile, (1, 128, 128), device="cuda", amp=True, progress=False)
    batch = 8 if benchmark.disabled else largest_batch(method)
    method.config.score_batch_size = batch
    images, masks = _slices(batch, 128)
    info = _run(benchmark, method, images, masks)
    assert info["slices_per_s"] > 0
