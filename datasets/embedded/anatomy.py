"""Real anatomy for the embedded set: the MNI ICBM152 2009a template shipped inside nilearn.

The nilearn wheel carries the symmetric ICBM152 2009a T1 template and its grey- and
white-matter probability maps under ``nilearn/datasets/data/`` (no download). This module
reads them with nibabel, derives a brain mask and a CSF map, and returns a stack of
co-registered channels on a square canvas, ready to be sampled by ``augment``.

Orientation: the volumes are RAS (x = left->right, y = posterior->anterior, z = up). An
axial slice is shown as rows = y with anterior at the top and columns = x, the way most
viewers and the BraTS/IXI preparations show it. The 197 x 233 in-plane grid is padded
symmetrically to 233 x 233 ("pad to square") before any resampling.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from datasets.embedded import stable_math

TEMPLATE_FILES: dict[str, str] = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

# Channels of the prepared anatomy stack, in this order.
CHANNELS: tuple[str, ...] = ("t1", "gm", "wm", "csf", "brain", "t1_residual", "pial")

# Axial range (template voxel index along z, 1 mm) that slices are drawn from: from the
# temporal lobes / top of the cerebellum (MNI z = -26 mm) to the upper convexity
# (MNI z = +50 mm). Outside it the brain cross-section is small or dominated by the
# brain stem, which no protocol samples.
Z_RANGE: tuple[float, float] = (46.0, 122.0)
# Extra slices kept around Z_RANGE so that tilted sampling planes stay inside the stack.
Z_MARGIN: int = 8


class TemplateNotFoundError(FileNotFoundError):
    """The nilearn package on this machine does not ship the MNI template files."""


def template_dir() -> Path:
    """Folder inside the installed nilearn package that holds the MNI template files."""
    try:
        import nilearn
    except ImportError as exc:  # nilearn is a declared dependency; say what to do
        raise TemplateNotFoundError("the embedded data set needs nilearn (pip install nilearn)") from exc
    return Path(nilearn.__file__).resolve().parent / "datasets" / "data"


def template_paths() -> dict[str, Path]:
    """Paths of the three template files; raises naming the first one that is missing."""
    folder = template_dir()
    paths = {key: folder / name for key, name in TEMPLATE_FILES.items()}
    for path in paths.values():
        if not path.is_file():
            raise TemplateNotFoundError(
                f"{path}: missing; the embedded data set reads the MNI ICBM152 2009a template that "
                "the nilearn wheel ships (nilearn >= 0.10)"
            )
    return paths


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_records() -> list[dict[str, str]]:
    """File name, sha256 and nilearn version of every source file (for the manifest)."""
    import nilearn

    return [
        {"key": key, "file": f"nilearn/datasets/data/{path.name}", "sha256": sha256_file(path),
         "nilearn_version": nilearn.__version__}
        for key, path in template_paths().items()
    ]


def _to_canvas(volume: np.ndarray) -> np.ndarray:
    """RAS (X, Y, Z) volume -> (Z, rows, cols) with anterior at row 0, padded to square."""
    zyx = np.ascontiguousarray(np.transpose(volume[:, ::-1, :], (2, 1, 0)))
    _, rows, cols = zyx.shape
    side = max(rows, cols)
    pad_r, pad_c = side - rows, side - cols
    return np.pad(zyx, ((0, 0), (pad_r // 2, pad_r - pad_r // 2), (pad_c // 2, pad_c - pad_c // 2)))


def z_window() -> tuple[int, int]:
    """Template z slices [lo, hi) that slices can touch: ``Z_RANGE`` plus the tilt margin."""
    return max(0, int(np.floor(Z_RANGE[0])) - Z_MARGIN), int(np.ceil(Z_RANGE[1])) + Z_MARGIN + 1


def raw_volumes() -> dict[str, np.ndarray]:
    """The three template volumes over ``z_window()`` on the square canvas, float32 in [0, 1]."""
    import nibabel as nib

    z_lo, z_hi = z_window()
    out = {}
    for key, path in template_paths().items():
        img = nib.load(str(path))
        if len(img.shape) != 3 or img.shape[2] < z_hi:
            raise TemplateNotFoundError(f"{path}: expected a 3-D volume with >= {z_hi} axial slices, got {img.shape}")
        data = np.asarray(img.dataobj[:, :, z_lo:z_hi], dtype=np.float32) / 255.0  # stored as uint8 0..255
        if not np.isfinite(data).all():
            raise TemplateNotFoundError(f"{path}: non-finite values")
        out[key] = _to_canvas(data)
    shapes = {v.shape for v in out.values()}
    if len(shapes) != 1:
        raise TemplateNotFoundError(f"template volumes disagree in shape: {shapes}")
    return out


def tissue_maps(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> dict[str, np.ndarray]:
    """Brain mask and GM/WM/CSF fractions that sum to 1 inside the brain.

    The nilearn copy of the T1 template is already skull-stripped: its non-zero support
    is the template's brain mask (it agrees with the closed GM+WM > 0.5 region with a
    Dice of 0.97). Holes enclosed in an axial plane are filled so that the ventricles
    always count as brain (the shipped file has none, but the rule does not rely on it).
    Inside that mask CSF is what the GM and WM probabilities leave over,
    ``1 - GM - WM``: the ventricles, the sulci and the cisterns. Outside it every tissue is 0.
    """
    brain = np.stack([ndi.binary_fill_holes(plane) for plane in t1 > 0]).astype(np.float32)
    gm = gm * brain
    wm = wm * brain
    total = gm + wm
    over = total > 1.0  # rounding in the uint8 maps can push the sum a little above 1
    gm = np.where(over, gm / np.maximum(total, 1e-6), gm)
    wm = np.where(over, wm / np.maximum(total, 1e-6), wm)
    csf = np.clip(brain - gm - wm, 0.0, 1.0) * brain
    return {"gm": gm.astype(np.float32), "wm": wm.astype(np.float32), "csf": csf.astype(np.float32), "brain": brain}


def t1_residual(t1: np.ndarray, maps: dict[str, np.ndarray], stride: int = 7) -> np.ndarray:
    """What the tissue fractions do not explain of the real T1 (least squares inside the brain).

    The synthetic contrasts add this residual, scaled by their own GM-WM contrast, so they
    inherit the template's fine structure (deep nuclei, cortical ribbon detail) instead of
    looking like smooth probability maps. Three coefficients need few samples, so the
    fit uses every ``stride``-th brain voxel.
    """
    inside = np.flatnonzero(maps["brain"].ravel() > 0)[::stride]
    design = [maps[k].ravel()[inside].astype(np.float64) for k in ("gm", "wm", "csf")]
    target = t1.ravel()[inside].astype(np.float64)
    # Normal equations summed by NumPy (pairwise, the same on every CPU) and solved by
    # Cramer's rule in Python floats: LAPACK's lstsq runs BLAS kernels chosen per CPU.
    gram = [[float((a * b).sum()) for b in design] for a in design]
    rhs = [float((a * target).sum()) for a in design]
    coef = solve3(gram, rhs)
    fitted = sum(c * maps[k] for c, k in zip(coef, ("gm", "wm", "csf")))
    return ((t1 - fitted) * maps["brain"]).astype(np.float32)


def det3(m: list[list[float]]) -> float:
    return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))


def solve3(m: list[list[float]], b: list[float]) -> list[float]:
    """Solve a 3 x 3 system by Cramer's rule (plain float arithmetic: CPU-independent bits)."""
    d = det3(m)
    if d == 0:
        raise ValueError("singular 3 x 3 system (tissue maps are linearly dependent)")
    out = []
    for j in range(3):
        mj = [[b[i] if k == j else m[i][k] for k in range(3)] for i in range(3)]
        out.append(det3(mj) / d)
    return out


def pial_map(maps: dict[str, np.ndarray], depth_mm: float = 4.0) -> np.ndarray:
    """CSF near the brain surface (sulci, where pial vessels run): used for T1CE enhancement.

    Depth is a taxicab distance transform: cheap, and the exact metric does not matter
    for a soft exponential weight. The exponential is ``stable_math.exp`` (same bits on
    every CPU; NumPy's float32 ``exp`` depends on the vector instruction set).
    """
    depth = ndi.distance_transform_cdt(maps["brain"] > 0, metric="taxicab").astype(np.float64)
    return (maps["csf"] * stable_math.exp(-depth / depth_mm)).astype(np.float32)


CROP_MARGIN_MM = 6


@lru_cache(maxsize=1)
def base_stack() -> tuple[np.ndarray, int, tuple[int, int], int]:
    """All channels at 1 mm over ``z_window()``, cropped in-plane to the brain + a margin.

    Returns the stack, the template z of stack slice 0, the canvas (row, col) in mm of
    stack pixel (0, 0) and the canvas side in mm. Everything outside the crop is 0 in every channel, so sampling
    with a zero fill value outside the stack is exact, and the stack takes ~45 % less memory.
    """
    vols = raw_volumes()
    z_lo, _ = z_window()
    t1, gm, wm = (vols[k] for k in ("t1", "gm", "wm"))
    maps = tissue_maps(t1, gm, wm)
    t1 = t1 * maps["brain"]
    channels = {"t1": t1, **maps, "t1_residual": t1_residual(t1, maps), "pial": pial_map(maps)}
    inside = maps["brain"].any(axis=0)
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    r0, c0 = max(0, rows[0] - CROP_MARGIN_MM), max(0, cols[0] - CROP_MARGIN_MM)
    r1, c1 = rows[-1] + CROP_MARGIN_MM + 1, cols[-1] + CROP_MARGIN_MM + 1
    stack = np.stack([channels[name][:, r0:r1, c0:c1] for name in CHANNELS]).astype(np.float32)
    stack.setflags(write=False)
    return stack, z_lo, (int(r0), int(c0)), int(inside.shape[-1])


@dataclass(frozen=True)
class Anatomy:
    """Prefiltered channel stack ready for slice sampling.

    ``stack`` is C x Z x H x W (channels ``CHANNELS``); stack index 0 along Z is template
    slice ``z_offset``. ``canvas`` is the side of the padded square in mm, ``origin`` the
    canvas (row, col) in mm where the stack's first pixel starts, and ``spacing`` the mm
    per stack pixel in-plane (> 1 when it was pooled for a coarse resolution).
    """

    stack: np.ndarray
    z_offset: int
    canvas: int
    origin: tuple[int, int]
    spacing: int
    resolution: int

    def channel(self, name: str) -> int:
        return CHANNELS.index(name)


def antialias_sigma(canvas: int, resolution: int) -> float:
    """Gaussian sigma (mm) before sampling at ``resolution``: (factor - 1) / 2, as skimage."""
    return max(0.0, (canvas / resolution - 1.0) / 2.0)


def block_mean(stack: np.ndarray, factor: int) -> np.ndarray:
    """Average in-plane blocks of ``factor`` x ``factor`` (zero-padding the far edges)."""
    c, z, h, w = stack.shape
    hp, wp = -(-h // factor) * factor, -(-w // factor) * factor
    padded = np.zeros((c, z, hp, wp), np.float32)
    padded[..., :h, :w] = stack
    return padded.reshape(c, z, hp // factor, factor, wp // factor, factor).mean(axis=(3, 5))


@lru_cache(maxsize=2)
def load_anatomy(resolution: int) -> Anatomy:
    """The channel stack smoothed in-plane for sampling at ``resolution``.

    Smoothing once here, before sampling, keeps coarse slices free of aliasing while
    every slice stays one cheap trilinear lookup. For coarse resolutions the stack is
    first block-averaged (itself a low-pass), which makes small test builds fast.
    """
    stack, z_lo, origin, canvas = base_stack()
    sigma = antialias_sigma(canvas, resolution)
    factor = max(1, int(canvas / resolution // 2))
    if factor > 1:
        stack = block_mean(stack, factor)
        # a box of width f already has std f / sqrt(12); smooth only the rest (in pooled px)
        sigma = float(np.sqrt(max(sigma**2 - factor**2 / 12.0, 0.0))) / factor
    if sigma > 0:
        stack = ndi.gaussian_filter(stack, (0, 0, sigma, sigma), truncate=3.0)
    stack = np.ascontiguousarray(stack, dtype=np.float32)
    stack.setflags(write=False)
    return Anatomy(stack=stack, z_offset=z_lo, canvas=canvas, origin=origin, spacing=factor, resolution=resolution)
