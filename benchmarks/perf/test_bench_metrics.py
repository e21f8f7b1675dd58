"""Speed of the exact Max Dice searches against a plain loop over a threshold grid.

    pytest benchmarks/test_bench_metrics.py --benchmark-enable -s

- global Max Dice, exact (every distinct score of 10 million pixels) vs a loop over 101
  thresholds (THOR's grid);
- per-image Max Dice, exact (every distinct score of 133 maps of 128 x 128) vs a loop over
  201 thresholds (MAD-AD authors' grid).

The ratio loop_seconds / exact_seconds goes into ``benchmark.extra_info`` and is printed.
With benchmarks disabled (the project default) the same checks run once on small inputs.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import pytest

from protocols.metrics import global_max_dice, per_image_max_dice

torch = pytest.importorskip("torch")
torch.set_num_threads(1)


def loop_global_max_dice(maps: np.ndarray, masks: np.ndarray, thresholds: np.ndarray) -> tuple[float, float]:
    """The straightforward evaluator (THOR's rule): one full pass per threshold, map > t, eps 1e-6, first maximum.

    The maps here lie in [0, 1) and are float32, so THOR's float32 comparison is used and
    its saturation at 1 never matters.
    """
    truth = masks != 0
    n_true = int(truth.sum())
    best = (-1.0, float("nan"))
    for t in thresholds:
        pred = maps > np.float32(t)
        d = 2.0 * int((pred & truth).sum()) / (int(pred.sum()) + n_true + 1e-6)
        if d > best[0]:
            best = (d, float(t))
    return best


def loop_per_image_max_dice(maps: np.ndarray, masks: np.ndarray, thresholds: np.ndarray) -> tuple[float, float]:
    """Mean per-image Dice per threshold (MAD-AD code's rule, images with lesions only): map > t, eps 1e-6, first max."""
    truth = (masks != 0).reshape(len(masks), -1)
    flat = maps.reshape(len(maps), -1)
    n_true = truth.sum(1)
    best = (-1.0, float("nan"))
    for t in thresholds:
        pred = flat > np.float32(t)
        d = np.mean(2.0 * (pred & truth).sum(1) / (pred.sum(1) + n_true + 1e-6))
        if d > best[0]:
            best = (float(d), float(t))
    return best


def _lesion_maps(n: int, h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Float32 maps in [0, 1] that are brighter on blob-like lesions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((n, h, w), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(0.2, 0.8, 2) * (h, w)
        r = rng.uniform(0.03, 0.15) * min(h, w)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    maps = 0.55 * rng.random((n, h, w), dtype=np.float32) + 0.45 * masks * rng.random((n, h, w), dtype=np.float32)
    return maps.astype(np.float32), masks


def _best_of(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def _report(benchmark, name: str, exact_seconds: float, loop_seconds: float, n_exact: int, n_loop: int, pixels: int) -> None:
    ratio = loop_seconds / exact_seconds
    info = {
        "pixels": pixels,
        "exact_seconds": round(exact_seconds, 4),
        "exact_thresholds": n_exact,
        "loop_seconds": round(loop_seconds, 4),
        "loop_thresholds": n_loop,
        "loop_over_exact_ratio": round(ratio, 3),
        "loop_seconds_per_threshold": loop_seconds / n_loop,
    }
    benchmark.extra_info.update(info)
    print(
        f"\n{name}: exact {exact_seconds:.3f} s over {n_exact} distinct thresholds; "
        f"loop {loop_seconds:.3f} s over {n_loop} thresholds; loop / exact = {ratio:.2f}"
    )


def test_bench_global_max_dice_10m_pixels(benchmark):
    shape = (1, 100, 1000) if benchmark.disabled else (10, 1000, 1000)  # 10 million pixels when enabled
    maps, masks = _lesion_maps(*shape)
    grid = np.linspace(0.0, 1.0, 101)
    if benchmark.disabled:
        result = benchmark(global_max_dice, maps, masks)
        exact_seconds, _ = _best_of(lambda: global_max_dice(maps, masks), 1)
    else:
        result = benchmark.pedantic(global_max_dice, args=(maps, masks), rounds=3, iterations=1, warmup_rounds=0)
        exact_seconds = benchmark.stats.stats.min
    loop_seconds, loop = _best_of(lambda: loop_global_max_dice(maps, masks, grid), 1)
    assert result.dice >= loop[0] - 1e-12  # exact can only be better than a grid
    grid_result = global_max_dice(maps, masks, mode="grid", grid="thor")
    assert abs(grid_result.dice - loop[0]) <= 1e-12 and grid_result.threshold == loop[1]
    _report(benchmark, "global Max Dice", exact_seconds, loop_seconds, int(np.unique(maps).size), grid.size, maps.size)


def test_bench_per_image_max_dice_133_maps(benchmark):
    n = 8 if benchmark.disabled else 133
    maps, masks = _lesion_maps(n, 128, 128, seed=1)
    grid = np.linspace(0.0, 1.0, 201)
    if benchmark.disabled:
        result = benchmark(per_image_max_dice, maps, masks)
        exact_seconds, _ = _best_of(lambda: per_image_max_dice(maps, masks), 1)
    else:
        result = benchmark.pedantic(per_image_max_dice, args=(maps, masks), rounds=5, iterations=1, warmup_rounds=1)
        exact_seconds = benchmark.stats.stats.min
    loop_seconds, loop = _best_of(lambda: loop_per_image_max_dice(maps, masks, grid), 1 if benchmark.disabled else 3)
    assert result.dice >= loop[0] - 1e-12
    grid_result = per_image_max_dice(maps, masks, mode="grid", grid="madad")
    assert abs(grid_result.dice - loop[0]) <= 1e-12 and grid_result.threshold == loop[1]
    _report(benchmark, "per-image Max Dice", exact_seconds, loop_seconds, int(np.unique(maps).size), grid.size, maps.size)
