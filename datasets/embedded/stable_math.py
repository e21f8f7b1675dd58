"""exp, log, tanh, logistic and power that give the same bits on every CPU.

NumPy picks a SIMD kernel for ``exp``, ``log``, ``tanh``, ``power``, ... at run time
(AVX2, AVX-512 or the baseline), and the kernels differ in the last bits, in float32 *and*
float64 (``NPY_DISABLE_CPU_FEATURES`` shows it). The embedded set must be the same bytes on
every machine, since its fingerprint keys checkpoints and resumed runs. These functions use
only IEEE-754 operations that are correctly rounded whatever the instruction set (+, -, *,
/, rint, frexp, ldexp), in float64, with range reduction and a short series, so their
results depend only on the input. Accuracy is a few float64 ulps; callers cast to float32.
"""

from __future__ import annotations

import numpy as np

# ln 2 split so that k * LN2_HI is exact for |k| < 2**20 (Cody and Waite)
LN2_HI = 0.693145751953125
LN2_LO = 1.4286068203094173e-06
INV_LN2 = 1.4426950408889634
_EXPM1_TERMS = 16  # |r| <= ln2 / 2: the series' remainder is below 1e-20
_LOG_TERMS = 12  # |s| <= 0.172: the atanh series' remainder is below 1e-20


def _series_expm1(r: np.ndarray) -> np.ndarray:
    """exp(r) - 1 for |r| <= ~0.35: r (1 + r/2 (1 + r/3 (...))) by Horner's rule."""
    acc = np.ones_like(r)
    for k in range(_EXPM1_TERMS, 1, -1):
        acc = 1.0 + acc * r / k
    return acc * r


def exp(x: np.ndarray | float) -> np.ndarray:
    """e**x in float64 (inputs clipped to [-700, 700], far beyond what callers pass)."""
    x = np.clip(np.asarray(x, dtype=np.float64), -700.0, 700.0)
    k = np.rint(x * INV_LN2)
    r = (x - k * LN2_HI) - k * LN2_LO
    return np.ldexp(1.0 + _series_expm1(r), k.astype(np.int64))


def expm1(x: np.ndarray | float) -> np.ndarray:
    """e**x - 1 in float64, accurate near 0 (the series) and away from it (exp - 1)."""
    x = np.asarray(x, dtype=np.float64)
    small = np.abs(x) < 0.34
    return np.where(small, _series_expm1(np.where(small, x, 0.0)), exp(x) - 1.0)


def log(x: np.ndarray | float) -> np.ndarray:
    """Natural log of positive inputs in float64 (0 gives -inf)."""
    x = np.asarray(x, dtype=np.float64)
    positive = x > 0
    m, e = np.frexp(np.where(positive, x, 1.0))  # x = m 2**e, m in [0.5, 1)
    low = m < 0.7071067811865476
    m = np.where(low, 2.0 * m, m)
    e = (e - low).astype(np.float64)
    s = (m - 1.0) / (m + 1.0)  # log m = 2 atanh(s)
    s2 = s * s
    acc = np.full_like(s, 1.0 / (2 * _LOG_TERMS + 1))
    for k in range(_LOG_TERMS - 1, -1, -1):
        acc = 1.0 / (2 * k + 1) + s2 * acc
    out = (e * LN2_HI + (2.0 * s * acc + e * LN2_LO))
    return np.where(positive, out, np.where(x == 0, -np.inf, np.nan))


def tanh(x: np.ndarray | float) -> np.ndarray:
    """tanh in float64 via expm1 (no cancellation near 0)."""
    x = np.asarray(x, dtype=np.float64)
    t = expm1(-2.0 * np.abs(x))
    return -np.sign(x) * t / (2.0 + t)


def logistic(x: np.ndarray | float) -> np.ndarray:
    """1 / (1 + e**-x) in float64."""
    return 1.0 / (1.0 + exp(-np.asarray(x, dtype=np.float64)))


def power(x: np.ndarray, g: float) -> np.ndarray:
    """x**g for x >= 0 and g > 0 in float64 (0**g = 0)."""
    x = np.asarray(x, dtype=np.float64)
    inside = x > 0
    return np.where(inside, exp(g * log(np.where(inside, x, 1.0))), 0.0)
