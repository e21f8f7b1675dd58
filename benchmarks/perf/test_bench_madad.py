"""Scoring throughput of MAD-AD (encode -> masked DDIM -> decode -> map).

    pytest benchmarks/perf/test_bench_madad.py --benchmark-enable -s

- CPU: the ``quick`` profile (64 px internal, 10 DDIM steps) on 128 x 128 slices, per
  ``score_batch_size`` in (1, 8, 32);
- CUDA: the ``paper`` profile (256 px internal, kl-f8 VAE, 10 DDIM steps) under bf16
  autocast (``amp=True``), per batch size; also reports ``torch.cuda.max_memory_allocated``
  and MFU (achieved FLOP/s over the GPU's dense bf16 peak). Skipped cleanly without CUDA.
  Ceiling on one H100 at 40 % MFU: 368 slices/s (1.07 TFLOP per slice, ``--estimate``).

Throughput does not depend on the weights, so the networks are built untrained. Each
benchmark times several rounds after warm-up (pytest-benchmark's median) and puts
``slices_per_s``, ``gflop_per_slice``, ``achieved_tflops``, ``mfu`` (CUDA) and the batch
size, device, profile and peak memory into ``benchmark.extra_info``. With benchmarks disabled (the project default) the
same code runs once on the ``tiny`` profile.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from benchmarks.throughput import cpu_threads, measure_scoring, synthetic_slices, untrained  # noqa: E402


def _run(benchmark, method, images, masks, profile: str, rounds: int, warmup_rounds: int) -> dict:
    extra = {"profile": profile, "ddim_steps": method.config.ddim_steps, "internal_resolution": method.config.image_size}
    return measure_scoring(benchmark, method, images, masks, rounds=rounds, warmup_rounds=warmup_rounds, **extra)


@pytest.mark.parametrize("batch_size", [1, 8, 32])
def test_bench_madad_cpu(benchmark, batch_size: int) -> None:
    torch.set_num_threads(cpu_threads())
    if benchmark.disabled:
        profile, n, size = "tiny", 4, 32
    else:
        profile, n, size = "quick", 32, 128
    images, masks = synthetic_slices(n, size)
    method = untrained("madad", profile, (1, size, size), device="cpu", score_batch_size=batch_size)
    info = _run(benchmark, method, images, masks, profile, rounds=3, warmup_rounds=1)
    assert info["slices_per_s"] > 0 and info["gflop_per_slice"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch_size", [64, 256])
def test_bench_madad_cuda_bf16(benchmark, batch_size: int) -> None:
    torch.backends.cudnn.benchmark = True
    profile = "paper"
    images, masks = synthetic_slices(4 * batch_size if not benchmark.disabled else batch_size, 128)
    method = untrained("madad", profile, (1, 128, 128), device="cuda", amp=True, score_batch_size=batch_size)
    info = _run(benchmark, method, images, masks, profile, rounds=5, warmup_rounds=2)
    assert info["slices_per_s"] > 0 and info["max_memory_allocated_gib"] > 0
