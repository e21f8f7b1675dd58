"""Scoring throughput of the pixel-space diffusion methods (DDPM, AnoDDPM, pDDPM, THOR, AutoDDPM).

    pytest benchmarks/perf/test_bench_pixel_diffusion.py --benchmark-enable -s

- CPU: the ``quick`` profile on 16 slices of 128 x 128 (``UAD_BENCH_THREADS`` threads, default <= 2);
- CUDA: the ``paper`` profile (T = 1000, the full THOR/ci-ber UNet, 128 x 128) under bf16
  autocast with the largest power-of-two batch whose forward pass fits (up to 512);
  skipped cleanly without CUDA.

Each benchmark reports slices/s (pytest-benchmark's median over several rounds after
warm-up), network evaluations per slice (``nfe_per_slice``), GFLOP per slice, achieved
TFLOP/s and, on CUDA, peak memory and MFU (the fraction of the GPU's dense bf16 peak);
THOR and AutoDDPM also report which perceptual distance ran (the SSIM substitute unless
``UAD_BENCH_LPIPS_DIR`` points at LPIPS weights). With benchmarks disabled (the project
default) the same code runs once on the ``tiny`` profile as a smoke test.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from benchmarks.throughput import cpu_threads, largest_batch, measure_scoring, synthetic_slices, untrained  # noqa: E402

METHODS = ("ddpm", "anoddpm", "pddpm", "thor", "autoddpm")


def _details(benchmark, method, info: dict) -> dict:
    """Add what the method counted while scoring (``nfe`` is updated by ``score``)."""
    details = {
        "nfe_per_slice": method.nfe,
        "internal_resolution": list(method.internal_size),
        "T": method.T,
        "perceptual": method.notes.get("perceptual"),
    }
    benchmark.extra_info.update(details)
    print(details)
    return {**info, **details}


@pytest.mark.parametrize("name", METHODS)
def test_bench_score_cpu(benchmark, name: str) -> None:
    torch.set_num_threads(cpu_threads())
    profile, n, size = ("tiny", 4, 32) if benchmark.disabled else ("quick", 16, 128)
    method = untrained(name, profile, (1, size, size), device="cpu", score_batch_size=16, progress=False)
    images, masks = synthetic_slices(n, size)
    info = _details(benchmark, method, measure_scoring(benchmark, method, images, masks, rounds=3, warmup_rounds=1, profile=profile))
    assert info["nfe_per_slice"] >= 1 and info["slices_per_s"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", METHODS)
def test_bench_score_cuda_bf16(benchmark, name: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    profile = "tiny" if benchmark.disabled else "paper"
    method = untrained(name, profile, (1, 128, 128), device="cuda", amp=True, progress=False)
    h, w = method.internal_size

    def forward(batch: int) -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            x = torch.randn(batch, 1, h, w, device=method.device)
            method.model(x, torch.zeros(batch, dtype=torch.long, device=method.device))

    method.config.score_batch_size = 8 if benchmark.disabled else largest_batch(forward)
    images, masks = synthetic_slices(method.config.score_batch_size, 128)
    info = _details(benchmark, method, measure_scoring(benchmark, method, images, masks, rounds=3, warmup_rounds=1, profile=profile))
    assert info["slices_per_s"] > 0 and info["max_memory_allocated_gib"] > 0
