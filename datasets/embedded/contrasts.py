"""T1 from the template, and T2-, FLAIR- and T1CE-like contrasts synthesised from tissue maps.

Each synthetic contrast is a partial-volume mix of tissue intensities,
``sum_t p_t * mu_t`` over CSF, GM and WM, plus the template's T1 residual scaled by the
contrast's own GM-WM difference (so fine structure carries over with the right sign).
Tissue means follow the usual ordering of the clinical sequences:

* T1   (real template): CSF < GM < WM.
* T1CE: the T1 with slightly less GM-WM contrast and enhancing sulcal CSF near the
  surface (pial vessels / dura take up gadolinium).
* T2:   WM < GM < CSF (CSF brightest).
* FLAIR: CSF < WM < GM (CSF suppressed, WM darker than GM).

Means are jittered per slice so that two slices never share an exact contrast.
"""

from __future__ import annotations

import numpy as np

from datasets.embedded import stable_math

MODALITIES: tuple[str, ...] = ("T1", "T1CE", "T2", "FLAIR")

# Tissue means (CSF, GM, WM) of the synthetic contrasts, arbitrary units.
TISSUE_MEANS: dict[str, tuple[float, float, float]] = {
    "T2": (1.00, 0.55, 0.38),
    "FLAIR": (0.12, 0.62, 0.46),
}
MEAN_JITTER = 0.05  # relative std of each tissue mean per slice
T1CE_PIAL_GAIN = 0.9  # enhancement of surface CSF, relative to the T1 GM level
# The residual is large only where the tissue maps disagree with the T1 (mostly around
# the basal cisterns); soft-clipping it keeps those spots from dominating the contrast.
RESIDUAL_CLIP = 0.06


def t1_tissue_means(channels: dict[str, np.ndarray]) -> tuple[float, float, float]:
    """(CSF, GM, WM) means of the real T1 on this slice, weighted by the tissue fractions."""
    t1 = channels["t1"]
    means = []
    for tissue in ("csf", "gm", "wm"):
        weight = channels[tissue] ** 2  # emphasise nearly pure voxels
        means.append(float((weight * t1).sum() / max(weight.sum(), 1e-6)))
    return means[0], means[1], means[2]


def mix(channels: dict[str, np.ndarray], means: tuple[float, float, float]) -> np.ndarray:
    return means[0] * channels["csf"] + means[1] * channels["gm"] + means[2] * channels["wm"]


def synthesise(
    channels: dict[str, np.ndarray], rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], dict[str, tuple[float, float, float]]]:
    """Clean (noise-free, unnormalised) images of every modality for one sampled slice.

    Also returns each modality's (CSF, GM, WM) levels, which the lesion painter uses to
    set lesion intensities relative to the surrounding tissue.
    """
    t1 = channels["t1"]
    t1_means = t1_tissue_means(channels)
    t1_gm_wm = t1_means[1] - t1_means[2]
    # soft clip; stable_math.tanh: NumPy's float32 tanh differs between CPUs
    resid = (RESIDUAL_CLIP * stable_math.tanh(channels["t1_residual"].astype(np.float64) / RESIDUAL_CLIP)).astype(np.float32)
    images: dict[str, np.ndarray] = {"T1": t1.astype(np.float32)}
    levels: dict[str, tuple[float, float, float]] = {"T1": t1_means}

    # T1CE: compress GM-WM contrast a little, then enhance surface CSF (vessels, dura)
    flatten = rng.uniform(0.05, 0.15)
    t1ce = t1 + flatten * (t1_means[1] - t1) * channels["gm"]
    t1ce = t1ce + T1CE_PIAL_GAIN * rng.uniform(0.8, 1.2) * t1_means[1] * channels["pial"]
    images["T1CE"] = t1ce.astype(np.float32)
    levels["T1CE"] = t1_means

    for name, base in TISSUE_MEANS.items():
        means = tuple(m * (1.0 + rng.normal(0.0, MEAN_JITTER)) for m in base)
        scale = (means[1] - means[2]) / t1_gm_wm if abs(t1_gm_wm) > 1e-6 else 0.0
        images[name] = (mix(channels, means) + scale * resid).astype(np.float32)
        levels[name] = means
    return images, levels
