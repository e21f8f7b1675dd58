"""The map grid's prediction panel flags exactly what the evaluator flagged at the record's threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.report.figures import MapEntry


def test_prediction_follows_the_protocols_rule() -> None:
    amap = np.array([[0.2, 0.5], [0.7, -1.0]])
    brain = np.array([[1, 1], [0, 1]])
    exact = MapEntry("m", Path("x.npz"), "T1", threshold=0.5)
    assert exact.prediction(amap, brain).tolist() == [[False, True], [True, False]]  # map >= t
    grid = MapEntry("m", Path("x.npz"), "T1", threshold=0.5, strict=True)
    assert grid.prediction(amap, brain).tolist() == [[False, False], [True, False]]  # map > t (peer grids)
    masked = MapEntry("m", Path("x.npz"), "T1", threshold=0.5, brain_masked=True)
    assert masked.prediction(amap, brain).tolist() == [[False, True], [False, False]]  # outside the brain: 0
    below_zero = MapEntry("m", Path("x.npz"), "T1", threshold=-0.5, brain_masked=True)
    assert below_zero.prediction(amap, brain).tolist() == [[True, True], [True, False]]  # masked-out 0 >= -0.5
    assert MapEntry("m", Path("x.npz"), "T1").prediction(amap, brain) is None
