"""Scoring throughput of MAD-AD (encode -> masked DDIM -> decode -> map).

    pytest benchmarks/test_bench_madad.py --benchmark-enable -s

- CPU: the ``quick`` profile (64 px internal, 10 DDIM steps) on 128 x 128 slices, per
  ``score_batch_size`` in (1, 8, 32);
- CUDA: the ``paper`` profile (256 px internal, kl-f8 VAE, 10 DDIM steps) under bf16
  autocast (``amp=True``), per batch size; also reports ``torch.cuda.max_memory_allocated``.
  Skipped cleanly without CUDA. Issue 3's target on one H100: >= 500 slices/s.

Throughput does not depend on the weights, so the networks are built untrained. Each
benchmark puts ``slices_per_s`` (and the batch size, device, profile, peak memory) into
``benchmark.extra_info`` and prints it. With benchmarks disabled (the project default) the
same code runs once on the ``tiny`` profile.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from methods.madad import MADAD  # noqa: E402


def _untrained(profile: str, shape: tuple[int, int, int], **overrides) -> MADAD:
    method = MADAD.from_profile(profile, **overrides)
    method.input_shape_ = shape
    method._build()
    method.latent_scale_ = 1.0
    method.fitted_ = True
    return method


def _slices(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    brain = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) <= (0.4 * size) ** 2).astype(np.uint8)
    images = (rng.random((n, 1, size, size)) * 0.2 + 0.4).astype(np.float32) * brain
    return images, np.repeat(brain[None], n, 0)


def _run(benchmark, method: MADAD, images: np.ndarray, masks: np.ndarray, profile: str) -> dict:
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
    info = {
        "profile": profile,
        "device": str(method.device),
        "batch_size": method.config.score_batch_size,
        "ddim_steps": method.config.ddim_steps,
        "internal_resolution": method.config.image_size,
        "n_slices": len(images),
        "seconds": round(seconds, 4),
        "slices_per_s": round(len(images) / seconds, 2),
    }
    if cuda:
        info["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        info["amp_bf16"] = bool(method.config.amp)
    benchmark.extra_info.update(info)
    print(f"\nmadad {info}")
    return info


@pytest.mark.parametrize("batch_size", [1, 8, 32])
def test_bench_madad_cpu(benchmark, batch_size: int) -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if benchmark.disabled:
        profile, n, size = "tiny", 4, 32
    else:
        profile, n, size = "quick", 32, 128
    images, masks = _slices(n, size)
    method = _untrained(profile, (1, size, size), device="cpu", score_batch_size=batch_size)
    info = _run(benchmark, method, images, masks, profile)
    assert info["slices_per_s"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch_size", [64, 256])
def test_bench_madad_cuda_bf16(benchmark, batch_size: int) -> None:
    torch.backends.cudnn.benchmark = True
    profile = "paper"
    images, masks = _slices(4 * batch_size if not benchmark.disabled else batch_size, 128)
    method = _untrained(profile, (1, 128, 128), device="cuda", amp=True, score_batch_size=batch_size)
    info = _run(benchmark, method, images, masks, profile)
    assert info["slices_per_s"] > 0
