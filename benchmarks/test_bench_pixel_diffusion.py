"""Scoring throughput of the pixel-space diffusion baselines (DDPM, AnoDDPM, pDDPM).

    pytest benchmarks/test_bench_pixel_diffusion.py --benchmark-enable -s

- CPU: the ``quick`` profile (what CI and the README run) on 16 slices of 128 x 128;
- CUDA: the ``paper`` profile (T = 1000, the full THOR/ci-ber UNet) under bf16 autocast,
  with the largest power-of-two batch whose forward pass fits (searched up to 512);
  skipped cleanly without CUDA.

Throughput does not depend on the weights, so the networks are built untrained. Each
benchmark writes ``slices_per_s``, ``nfe_per_slice`` (network evaluations per slice),
batch size, device and profile into ``benchmark.extra_info`` and prints them. With
benchmarks disabled (the project default) the same code runs once on the ``tiny`` profile.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from methods.common.diffusion import PixelDiffusionMethod  # noqa: E402
from methods.registry import create_method  # noqa: E402

FAMILY = ("ddpm", "anoddpm", "pddpm")


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
        "nfe_per_slice": method.nfe,
        "internal_resolution": list(method.internal_size),
        "T": method.T,
        "device": str(method.device) if method.device.type == "cpu" else torch.cuda.get_device_name(method.device),
        "amp_bf16": bool(method.config.amp and method.device.type == "cuda"),
    }
    benchmark.extra_info.update(info)
    print(info)
    return info


@pytest.mark.parametrize("name", FAMILY)
def test_bench_score_cpu(benchmark, name: str) -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    profile, n, size = ("tiny", 4, 32) if benchmark.disabled else ("quick", 16, 128)
    method = _untrained(name, profile, (1, size, size), device="cpu", score_batch_size=16)
    images, masks = _slices(n, size)
    info = _run(benchmark, method, images, masks)
    assert info["nfe_per_slice"] >= 1 and info["slices_per_s"] > 0


def largest_batch(method: PixelDiffusionMethod, limit: int = 512) -> int:
    """Largest power of two (<= limit) whose bf16 forward pass fits on the GPU, halved for headroom."""
    h, w = method.internal_size
    c = int(method.input_shape_[0])
    best = 1
    batch = 1
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
    return max(1, best // 2) if best == limit * 2 else best


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", FAMILY)
def test_bench_score_cuda_bf16(benchmark, name: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    method = _untrained(name, "tiny" if benchmark.disabled else "paper", (1, 128, 128), device="cuda", amp=True)
    batch = 8 if benchmark.disabled else largest_batch(method)
    method.config.score_batch_size = batch
    images, masks = _slices(batch if not benchmark.disabled else 8, 128)
    info = _run(benchmark, method, images, masks)
    assert info["slices_per_s"] > 0
