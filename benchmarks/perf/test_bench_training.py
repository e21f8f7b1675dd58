"""Training throughput: optimiser steps of the pixel DDPM UNet and of MAD-AD's denoiser.

    pytest benchmarks/perf/test_bench_training.py --benchmark-enable -s

Each benchmark runs the method's own training loop (``PixelDiffusionMethod._train``,
``MADAD._train_denoiser``) for a few optimiser steps on synthetic healthy slices and
reports training samples/s, seconds per step, achieved TFLOP/s (forward + backward = 3 x
the forward FLOPs of ``cost_plan``, counted with ``torch.utils.flop_counter`` as in
``--estimate``) and, on CUDA, peak memory and MFU against the GPU's dense bf16 peak.
Timings are pytest-benchmark's median over several rounds after warm-up rounds.

- CPU: the ``quick`` profile (the ``tiny`` one, one round, when benchmarks are disabled:
  the project's default smoke run);
- CUDA: the ``paper`` profile at its published batch (DDPM: 16 at 128 x 128, with the
  augmentation; MAD-AD: 96 latents of 4 x 32 x 32) and a larger batch, under bf16
  autocast. Skipped cleanly without CUDA.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from benchmarks.throughput import cpu_threads, efficiency, plan_flops, report, synthetic_set, timed, untrained  # noqa: E402

STEPS = 4  # optimiser steps per timed round


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _report(benchmark, method, stage: str, batch: int, step_fn, rounds: int, warmup_rounds: int, **extra: Any) -> dict:
    device = method.device
    cuda = device.type == "cuda"

    def run() -> None:
        with _autocast(device):
            step_fn()

    seconds = timed(benchmark, run, rounds, warmup_rounds, device)
    _, flops = plan_flops(method)
    step_flops = 3.0 * flops[stage] * batch  # forward + backward
    info: dict[str, Any] = {
        "method": method.name,
        "stage": stage,
        "batch_size": batch,
        "steps_per_round": STEPS,
        "seconds_per_step": round(seconds / STEPS, 5),
        "train_samples_per_s": round(STEPS * batch / seconds, 3),
        "tflop_per_step": round(step_flops / 1e12, 4),
        **efficiency(device, STEPS * step_flops / seconds),
        "bf16_autocast": cuda,
        "threads": torch.get_num_threads(),
        "rounds": 1 if benchmark.disabled else rounds,
        **extra,
    }
    return report(benchmark, info, cuda)


def _ddpm(benchmark, profile: str, device: str, batch: int, rounds: int, warmup_rounds: int) -> dict:
    method = untrained("ddpm", profile, (1, 128, 128), device=device, batch_size=batch, max_steps=STEPS, val_every=None, progress=False)
    train = synthetic_set(batch * STEPS, 128)
    return _report(benchmark, method, "unet", batch, lambda: method._train(train, None), rounds, warmup_rounds, profile=profile,
                   augment=method.config.augment, internal_resolution=list(method.internal_size))


def _madad(benchmark, profile: str, device: str, batch: int, rounds: int, warmup_rounds: int) -> dict:
    method = untrained("madad", profile, (1, 128, 128), device=device, batch_size=batch, epochs=1, warmup_epochs=0, checkpoint="last")
    dev = method.device
    n = batch * STEPS  # one epoch = STEPS optimiser steps on cached latents (the default: no augmentation)
    channels, (h, w) = int(method.denoiser.unet.config.in_channels), method._latent_hw
    gen = torch.Generator().manual_seed(0)
    cached = (torch.randn(n, channels, h, w, generator=gen).to(dev), torch.full((n, channels, h, w), 0.1, device=dev), torch.ones(n, 1, h, w, device=dev))
    train = synthetic_set(n, 8)  # only its length is read when latents are cached
    return _report(benchmark, method, "denoiser", batch, lambda: method._train_denoiser(train, cached, None, gen, None), rounds, warmup_rounds,
                   profile=profile, latent=[channels, h, w])


@pytest.mark.parametrize("name", ["ddpm", "madad"])
def test_bench_train_step_cpu(benchmark, name: str) -> None:
    torch.set_num_threads(cpu_threads())
    profile = "tiny" if benchmark.disabled else "quick"
    batch = 2 if benchmark.disabled else 16
    info = (_ddpm if name == "ddpm" else _madad)(benchmark, profile, "cpu", batch, rounds=3, warmup_rounds=1)
    assert info["train_samples_per_s"] > 0 and info["tflop_per_step"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [16, 64])
def test_bench_train_step_ddpm_cuda_bf16(benchmark, batch: int) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    info = _ddpm(benchmark, "tiny" if benchmark.disabled else "paper", "cuda", batch, rounds=5, warmup_rounds=2)
    assert info["train_samples_per_s"] > 0 and info["max_memory_allocated_gib"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [96, 256])
def test_bench_train_step_madad_cuda_bf16(benchmark, batch: int) -> None:
    torch.backends.cudnn.benchmark = True
    info = _madad(benchmark, "tiny" if benchmark.disabled else "paper", "cuda", batch, rounds=5, warmup_rounds=2)
    assert info["train_samples_per_s"] > 0 and info["max_memory_allocated_gib"] > 0
