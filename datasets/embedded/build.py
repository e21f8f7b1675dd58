"""Build, cache and load the embedded data set (see docs/embedded-data.md).

Every slice is rendered from its own seed, ``SeedSequence([seed, split, k])``, split into
independent streams for geometry, contrast, lesion and acquisition. So the set is
bit-identical for a seed, the first ``n`` slices of a split do not depend on how many
are built, train/val/test never share a draw, and a lesion can be left unpainted
without changing anything else about the slice (the tests use that).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datasets.embedded import anatomy as anat
from datasets.embedded.augment import (
    AugmentConfig, bias_field, gamma_jitter, normalise, rician_noise, sample_channels, sample_coordinates,
)
from datasets.embedded.contrasts import MODALITIES, TISSUE_MEANS, synthesise
from datasets.embedded.lesions import SIZE_CLASSES, area_scale, make_lesion, paint, s1_bucket, s2_bucket
from datasets.format import DatasetFormatError, SliceSet, array_fingerprint, load_slices, save_slices

log = logging.getLogger(__name__)

BUILDER_VERSION = "2"  # 2: CPU-independent transcendentals (stable_math)
SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
GOLDEN = 0.6180339887498949  # low-discrepancy axial positions, stable under prefixes
LICENCE_NOTE = (
    "Anatomy: MNI ICBM152 2009a nonlinear symmetric template (T1, GM, WM), as shipped in the "
    "nilearn wheel. Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, "
    "Montreal Neurological Institute, McGill University. Permission to use, copy, modify, and "
    "distribute this software and its documentation for any purpose and without fee is hereby "
    "granted, provided that the above copyright notice appear in all copies. The authors and "
    "McGill University make no representations about the suitability of this software for any "
    "purpose. It is provided 'as is' without express or implied warranty."
)


@dataclass
class RenderedSlice:
    """One slice: C x R x R images (MODALITIES order), masks and its bookkeeping."""

    images: np.ndarray
    brain_mask: np.ndarray
    lesion_mask: np.ndarray
    z: float
    size_class: str


def axial_position(seed: int, split: str, k: int) -> float:
    """Template z (voxel index, float) of slice ``k`` of ``split``: a golden-ratio sequence
    with a per-seed, per-split phase, so positions cover the range evenly for any n."""
    phase = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_CODES[split]])).random()
    u = (phase + k * GOLDEN) % 1.0
    lo, hi = anat.Z_RANGE
    return float(lo + u * (hi - lo))


def slice_streams(seed: int, split: str, k: int) -> dict[str, np.random.Generator]:
    children = np.random.SeedSequence([seed, SPLIT_CODES[split], k]).spawn(4)
    return {name: np.random.default_rng(s) for name, s in zip(("geometry", "contrast", "lesion", "acquisition"), children)}


def size_class_for(k: int) -> int:
    """Test slices cycle through the size classes, so every class gets n_test / 5 slices."""
    return k % len(SIZE_CLASSES)


def acquire(images: dict[str, np.ndarray], levels: dict[str, tuple[float, float, float]], brain: np.ndarray,
            rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Bias field, Rician noise, percentile normalisation and gamma jitter, per modality."""
    noise = rng.uniform(*cfg.noise_range)
    out = []
    for name in MODALITIES:
        image = images[name] * bias_field(rng, brain.shape[0], cfg)
        image = rician_noise(rng, image, noise * levels[name][1])
        image = normalise(image, brain, cfg.percentiles)
        out.append(gamma_jitter(rng, image, cfg))
    return np.stack(out)


def render_slice(anatomy: anat.Anatomy, seed: int, split: str, k: int, lesion: bool,
                 paint_lesion: bool = True, cfg: AugmentConfig = AugmentConfig()) -> RenderedSlice:
    """Render slice ``k`` of ``split``; ``paint_lesion=False`` gives the same slice without
    the lesion's intensity change (mask still drawn) -- the tests compare the two."""
    rngs = slice_streams(seed, split, k)
    z = axial_position(seed, split, k)
    channels = sample_channels(anatomy, sample_coordinates(rngs["geometry"], anatomy, z, cfg))
    brain = channels["brain"] >= 0.5
    images, levels = synthesise(channels, rngs["contrast"])
    lesion_mask = np.zeros(brain.shape, np.uint8)
    size_class = ""
    if lesion:
        cls = SIZE_CLASSES[size_class_for(k)]
        placed = make_lesion(rngs["lesion"], cls, brain, channels["wm"], channels["gm"])
        painted = paint(images, levels, placed, rngs["lesion"])
        if paint_lesion:
            images = painted
        lesion_mask, size_class = placed.mask, cls.name
    stack = acquire(images, levels, brain, rngs["acquisition"], cfg)
    return RenderedSlice(stack, brain.astype(np.uint8), lesion_mask, z, size_class)


def build_embedded(seed: int = 0, resolution: int = 128, n_train: int = 320, n_val: int = 48,
                   n_test: int = 96) -> SliceSet:
    """Render the whole set in memory (no caching); ``load_embedded`` is the normal entry."""
    start = time.perf_counter()
    anatomy = anat.load_anatomy(resolution)
    n = n_train + n_val + n_test
    # filled in place: holding a list of slices and stacking it would double peak memory
    images = np.zeros((n, len(MODALITIES), resolution, resolution), np.float32)
    lesions = np.zeros((n, resolution, resolution), np.uint8)
    brains = np.zeros((n, resolution, resolution), np.uint8)
    rows: list[dict[str, Any]] = []
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        for k in range(count):
            s = render_slice(anatomy, seed, split, k, lesion=split == "test")
            i = len(rows)
            images[i], lesions[i], brains[i] = s.images, s.lesion_mask, s.brain_mask
            area = int(s.lesion_mask.sum())
            area_128 = area / area_scale(resolution)
            rows.append({
                "subject_id": f"mni-z{round(s.z):03d}-{split}{k:04d}",
                "slice_index": int(round(s.z)),
                "split": split,
                "lesion_area": area,
                "z_mm": round(s.z - 72.0, 3),  # template voxel 72 is MNI z = 0
                "size_class": s.size_class,
                "s1_bucket": s1_bucket(area_128) if area else "",
                "s2_bucket": s2_bucket(area_128) if area else "",
            })
    manifest = make_manifest(seed, resolution, n_train, n_val, n_test, anatomy)
    manifest["fingerprint"] = array_fingerprint(images, lesions, brains)
    manifest["build_seconds"] = round(time.perf_counter() - start, 2)
    return SliceSet(images, lesions, brains, pd.DataFrame(rows), list(MODALITIES), manifest)


def make_manifest(seed: int, resolution: int, n_train: int, n_val: int, n_test: int,
                  anatomy: anat.Anatomy) -> dict[str, Any]:
    cfg = AugmentConfig()
    return {
        "name": "embedded",
        "builder_version": BUILDER_VERSION,
        "sources": anat.source_records(),
        "licence": LICENCE_NOTE,
        "seed": seed,
        "sizes": {"train": n_train, "val": n_val, "test": n_test},
        "resolution_requested": resolution,
        "normalisation": (
            "per slice and modality: brain 1st..99th percentile mapped to [0, 1], clipped, "
            "background 0; then gamma jitter x**g, log g ~ N(0, %.2f)" % cfg.gamma_log_std
        ),
        "slice_rule": (
            f"axial slices of the MNI ICBM152 2009a template, z voxel index in {list(anat.Z_RANGE)} "
            "(golden-ratio sequence per split), 197x233 padded to 233x233, sampled at the resolution "
            "with random rotation/scale/shift/tilt/elastic warp"
        ),
        "canvas_mm": anatomy.canvas,
        "augmentation": asdict(cfg),
        "synthetic_tissue_means": {k: list(v) for k, v in TISSUE_MEANS.items()},
        "lesion_size_classes_px_at_128": [
            {"name": c.name, "accepted": [c.lo, c.hi], "target": list(c.target)} for c in SIZE_CLASSES
        ],
        "protocol_hints": {"s1_resolution": 128, "s2_resolution": 128},
        "note": "sanity benchmark: one template subject, variety from deformations; "
                "not a substitute for IXI/ATLAS/BraTS",
    }


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else $UAD_BENCH_CACHE, else ~/.cache/uad-bench."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("UAD_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "uad-bench"


def cache_name(seed: int, resolution: int, n_train: int, n_val: int, n_test: int) -> str:
    return f"embedded-v{BUILDER_VERSION}-seed{seed}-r{resolution}-n{n_train}-{n_val}-{n_test}"


def load_embedded(seed: int = 0, resolution: int = 128, n_train: int = 320, n_val: int = 48,
                  n_test: int = 96, cache_dir: str | os.PathLike | None = None) -> SliceSet:
    """The embedded set: built on first use, then loaded (memory-mapped) from the cache."""
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    if resolution < 16:
        raise ValueError(f"resolution must be >= 16, got {resolution}")
    path = cache_root(cache_dir) / cache_name(seed, resolution, n_train, n_val, n_test)
    if path.exists():
        try:
            data = load_slices(path)
            if data.manifest.get("builder_version") == BUILDER_VERSION and data.manifest.get("name") == "embedded":
                return data
            log.warning("%s: not a current embedded build; rebuilding", path)
        except DatasetFormatError as exc:
            log.warning("%s: unreadable cache (%s); rebuilding", path, exc)
    data = build_embedded(seed, resolution, n_train, n_val, n_test)
    try:
        save_slices(data, path, overwrite=path.exists())
    except FileExistsError:
        pass  # another process finished the same build first; its files are identical
    return load_slices(path)
