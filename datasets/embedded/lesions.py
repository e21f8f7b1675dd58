"""Synthetic lesions with exact masks: shape, size, placement and per-modality contrast.

A lesion is a union of a few ellipses around a centre, its boundary perturbed by a few
low angular harmonics. That gives one "normalised radius" field ``r`` per slice: the
lesion is ``r < 1``, and the binary mask is exactly ``(r < 1) & brain``. The image gets
a soft version, a logistic ramp of about two pixels across the same boundary, so the
edge looks like partial volume while the mask stays exact (the ramp crosses 0.5 exactly
on the mask boundary).

Sizes come in five classes whose area intervals (pixels at 128 x 128) are the
intersections of the two protocols' buckets, so a balanced test set covers every bucket
of both: S1 small (3, 71], medium (71, 570], large > 570; S2 < 200, 200..799, >= 800.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from datasets.embedded import stable_math
from datasets.embedded.augment import smooth_field

REFERENCE_RESOLUTION = 128


@dataclass(frozen=True)
class SizeClass:
    """Accepted lesion area ``[lo, hi]`` (pixels at 128^2) and the interior targets are drawn from."""

    name: str
    lo: int
    hi: int
    target: tuple[float, float]


SIZE_CLASSES: tuple[SizeClass, ...] = (
    SizeClass("xs", 6, 71, (14.0, 60.0)),  # S1 small,  S2 small
    SizeClass("s", 72, 199, (90.0, 180.0)),  # S1 medium, S2 small
    SizeClass("m", 200, 570, (240.0, 520.0)),  # S1 medium, S2 medium
    SizeClass("ml", 571, 799, (610.0, 760.0)),  # S1 large,  S2 medium
    SizeClass("l", 800, 3000, (900.0, 2000.0)),  # S1 large,  S2 large
)
SIZE_CLASS_NAMES = tuple(c.name for c in SIZE_CLASSES)


def s1_bucket(area_128: float) -> str:
    """THOR/S1 bucket of an area given in pixels at 128^2 ('' if excluded, <= 3 px)."""
    if area_128 <= 3:
        return ""
    return "small" if area_128 <= 71 else "medium" if area_128 <= 570 else "large"


def s2_bucket(area_128: float) -> str:
    """IterMask2/S2 bucket of an area given in pixels at 128^2."""
    return "small" if area_128 < 200 else "medium" if area_128 < 800 else "large"


def area_scale(resolution: int) -> float:
    """Pixels at ``resolution`` per pixel at 128^2."""
    return (resolution / REFERENCE_RESOLUTION) ** 2


@dataclass
class BlobShape:
    """Ellipses (offsets and axes in units of the base radius) plus boundary harmonics."""

    centre: np.ndarray  # (row, col), pixels
    radius: float  # base radius, pixels
    offsets: np.ndarray  # k x 2
    axes: np.ndarray  # k x 2
    angles: np.ndarray  # k
    harmonics: np.ndarray  # m x 3: order, amplitude, phase

    def radius_field(self, size: int, scale: float = 1.0) -> np.ndarray:
        """Normalised radius r at every pixel: < 1 inside the lesion.

        Only +, -, *, /, sqrt on arrays and scalar libm cos/sin: NumPy's vector
        transcendentals (arctan2, cos, hypot) may differ between CPUs in the last bit.
        """
        rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
        rad = self.radius * scale
        r = np.full((size, size), np.inf)
        for off, ax, ang in zip(self.offsets, self.axes, self.angles):
            cos, sin = math.cos(float(ang)), math.sin(float(ang))
            dr = rows - (self.centre[0] + off[0] * rad)
            dc = cols - (self.centre[1] + off[1] * rad)
            u = (cos * dr + sin * dc) / (ax[0] * rad)
            v = (-sin * dr + cos * dc) / (ax[1] * rad)
            r = np.minimum(r, np.sqrt(u * u + v * v))
        # cos(k phi + p) with phi the polar angle about the centre, from the unit vector
        # (cos phi, sin phi) raised to the k-th power by complex multiplication
        dr, dc = rows - self.centre[0], cols - self.centre[1]
        rho = np.sqrt(dr * dr + dc * dc)
        c1 = np.where(rho > 0, dc / np.where(rho > 0, rho, 1.0), 1.0)
        s1 = np.where(rho > 0, dr / np.where(rho > 0, rho, 1.0), 0.0)
        powers, ck, sk = {1: (c1, s1)}, c1, s1
        for k in range(2, int(max(self.harmonics[:, 0], default=1)) + 1):
            ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
            powers[k] = (ck, sk)
        wobble = np.zeros_like(rows)
        for k, a, p in self.harmonics:
            ck, sk = powers[int(k)]
            wobble = wobble + a * (ck * math.cos(float(p)) - sk * math.sin(float(p)))
        return r / (1.0 + wobble)


def random_shape(rng: np.random.Generator, centre: np.ndarray, area: float) -> BlobShape:
    """A random blob with roughly ``area`` pixels (before clipping to the brain)."""
    n = int(rng.integers(1, 5))
    offsets = np.zeros((n, 2))
    offsets[1:] = rng.normal(0.0, 0.45, (n - 1, 2))
    axes = rng.uniform(0.55, 1.0, (n, 2))
    angles = rng.uniform(0.0, np.pi, n)
    orders = np.arange(2, 6)
    harmonics = np.stack([orders, rng.uniform(0.0, 0.10, orders.size) / np.sqrt(orders - 1),
                          rng.uniform(0.0, 2 * np.pi, orders.size)], axis=1)
    # the union of n ellipses of these axes covers roughly this many base-radius^2 units
    coverage = np.pi * float(axes.prod(axis=1).max()) * (1.0 + 0.35 * (n - 1))
    return BlobShape(centre, float(np.sqrt(area / coverage)), offsets, axes, angles, harmonics)


def choose_centre(rng: np.random.Generator, wm: np.ndarray, gm: np.ndarray, brain: np.ndarray, radius: float) -> np.ndarray:
    """A lesion centre, mostly in white matter, deep enough in the brain for its size."""
    depth = ndi.distance_transform_edt(brain)
    min_depth = min(0.8 * radius, 0.6 * float(depth.max()))
    weight = (0.75 * wm + 0.25 * gm) ** 2 * (depth >= min_depth)
    if weight.sum() <= 0:
        weight = depth.astype(np.float64)
    flat = weight.ravel() / weight.sum()
    index = rng.choice(flat.size, p=flat)
    return np.array(np.unravel_index(index, brain.shape), dtype=np.float64) + rng.uniform(-0.5, 0.5, 2)


@dataclass
class Lesion:
    """A placed lesion: the exact mask, the soft occupancy for the image, and its core."""

    mask: np.ndarray  # H x W uint8, exact: (r < 1) & brain
    soft: np.ndarray  # H x W float32 in [0, 1], crosses 0.5 on the mask boundary
    core: np.ndarray  # H x W float32 <= soft, the inner part (T1CE necrotic core)
    area: int
    size_class: str
    radius_px: float


def soft_occupancy(r: np.ndarray, radius_px: float, edge_px: float = 0.5) -> np.ndarray:
    """Logistic ramp across r = 1; (1 - r) * radius approximates the signed distance in px."""
    return stable_math.logistic(np.clip((1.0 - r) * radius_px / edge_px, -30, 30)).astype(np.float32)


def make_lesion(
    rng: np.random.Generator, size_class: SizeClass, brain: np.ndarray, wm: np.ndarray, gm: np.ndarray,
    max_shapes: int = 8, max_fits: int = 8,
) -> Lesion:
    """Draw shapes and rescale each until its area inside the brain lands in the class interval.

    Scaling is the one free parameter, so a few secant-like steps (area ~ scale^2) usually
    hit the interval; a shape that cannot (e.g. squeezed by the brain edge) is redrawn. If
    no draw fits, the closest one is kept, so the build never fails on a small brain slice.
    """
    size = brain.shape[0]
    k = area_scale(size)
    lo, hi = max(1.0, size_class.lo * k), max(1.0, size_class.hi * k)
    best: tuple[float, np.ndarray, float, BlobShape] | None = None
    for _ in range(max_shapes):
        target = float(stable_math.exp(rng.uniform(*stable_math.log(np.array(size_class.target))))) * k
        target = min(max(target, lo), hi)
        centre = choose_centre(rng, wm, gm, brain, np.sqrt(target / np.pi))
        shape = random_shape(rng, centre, target)
        scale = 1.0
        for _ in range(max_fits):
            r = shape.radius_field(size, scale)
            area = float(((r < 1.0) & brain).sum())
            miss = 0.0 if lo <= area <= hi else min(abs(area - lo), abs(area - hi)) / max(target, 1.0)
            if best is None or miss < best[0]:
                best = (miss, r, scale, shape)
            if miss == 0.0:
                break
            scale *= 1.5 if area == 0 else float(np.clip(np.sqrt(target / area), 0.5, 2.0))
        if best[0] == 0.0:
            break
    _, r, scale, shape = best
    radius_px = shape.radius * scale
    mask = ((r < 1.0) & brain).astype(np.uint8)
    soft = soft_occupancy(r, radius_px)
    # a ring needs room: lesions under ~4 px radius enhance solidly (no core)
    core = soft_occupancy(r / 0.6, 0.6 * radius_px) if radius_px >= 4.0 else np.zeros_like(soft)
    return Lesion(mask, soft, np.minimum(core, soft), int(mask.sum()), size_class.name, radius_px)


def lesion_targets(levels: dict[str, tuple[float, float, float]], rng: np.random.Generator) -> dict[str, tuple[float, float]]:
    """Per modality (lesion-body level, T1CE-rim level) from the slice's (CSF, GM, WM) levels.

    Moderate on purpose: FLAIR 15-40 % above GM, T2 30-60 % of the way from GM to CSF,
    T1 20-50 % of the way from GM to CSF (hypointense), T1CE a core like T1 and a rim
    15-35 % above WM.
    """
    t1_csf, t1_gm, t1_wm = levels["T1"]
    t2_csf, t2_gm, _ = levels["T2"]
    _, fl_gm, _ = levels["FLAIR"]
    t1_body = t1_gm - rng.uniform(0.20, 0.50) * (t1_gm - t1_csf)
    return {
        "T1": (t1_body, t1_body),
        "T1CE": (t1_body, t1_wm * rng.uniform(1.15, 1.35)),
        "T2": (t2_gm + rng.uniform(0.30, 0.60) * (t2_csf - t2_gm),) * 2,
        "FLAIR": (fl_gm * rng.uniform(1.15, 1.40),) * 2,
    }


def paint(images: dict[str, np.ndarray], levels: dict[str, tuple[float, float, float]], lesion: Lesion,
          rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Blend the lesion into every modality (partial volume at the soft edge)."""
    targets = lesion_targets(levels, rng)
    texture = 1.0 + smooth_field(rng, lesion.soft.shape[0], 8, 0.05)
    out = {}
    for name, image in images.items():
        body, rim = targets[name]
        if name == "T1CE":
            fill = lesion.core * body + (lesion.soft - lesion.core) * rim
        else:
            fill = lesion.soft * body
        out[name] = (image * (1.0 - lesion.soft) + fill * texture).astype(np.float32)
    return out
