"""Exact, vectorised pixel metrics for anomaly maps.

Definitions used everywhere in this module:

- ``maps`` hold anomaly scores, **higher = more anomalous**; they must be finite.
- A threshold ``t`` predicts ``map >= t`` (a threshold includes every pixel whose score
  equals it, so ties are handled exactly). Comparisons are made in float64 (a float32 map
  value converts to float64 without rounding).
- ``masks`` are ground-truth lesion masks; any non-zero value is a lesion pixel.
- Dice = 2 TP / (|prediction| + |ground truth|).
- Image axis: for per-image metrics an array with ``ndim >= 3`` indexes images on axis 0
  (``N x H x W``); a 2-D or 1-D array is one image.

Max Dice comes in two flavours:

- :func:`global_max_dice` pools every pixel of every image and picks the threshold that
  maximises the pooled Dice (S1, THOR's evaluator).
- :func:`per_image_max_dice` picks one threshold shared by all images that maximises the
  *mean* of the per-image Dice (S2, IterMask2 / MAD-AD).

``mode="exact"`` (default) searches every distinct score value; ``mode="grid"`` searches a
fixed threshold grid (``"thor"``: 101 values linspace(0, 1); ``"madad"``: 201 values
linspace(0, 1); ``"itermask2"``: k / 10000 for k = 0..10000; or any array). Both modes
share one code path: counts at a sorted set of candidate thresholds are read off sorted
scores with ``searchsorted`` and cumulative sums, never with a Python loop over
thresholds.

Edge cases (stated once, tested):

- Global Dice with no lesion pixel at all (all-zero masks) is defined as 0 for every
  threshold (an empty pooled ground truth cannot be segmented, so a degenerate test set
  cannot score); the reported threshold then follows the tie rule.
- A per-image Dice of an image with empty ground truth follows ``empty_gt``:
  ``"one_if_empty_pred"`` (default; IterMask2 / MAD-AD authors' code: 1 if the prediction
  is empty too, else 0), ``"zero"`` (always 0), or ``"exclude"`` (the image is left out of
  the mean; its per-image value is NaN).
- Ties between thresholds: the global search returns the highest threshold among those
  with exactly the maximal Dice (the smallest prediction). The per-image search returns the
  highest threshold among those whose mean Dice is within ``TIE_TOL`` (1e-12) of the
  maximum; its reported Dice is the mean recomputed directly at that threshold.
- AUROC / AUPRC are NaN when the pooled pixels hold only one class.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

__all__ = [
    "EMPTY_GT_RULES",
    "GRIDS",
    "TIE_TOL",
    "MaxDice",
    "dice_at_threshold",
    "global_max_dice",
    "per_image_dice",
    "per_image_max_dice",
    "pixel_auprc",
    "pixel_auroc",
    "resolve_grid",
    "size_bucket",
    "threshold_from_healthy",
]

#: Named peer-compatible threshold grids.
GRIDS: dict[str, np.ndarray] = {
    "thor": np.linspace(0.0, 1.0, 101),
    "madad": np.linspace(0.0, 1.0, 201),
    "itermask2": np.arange(10001, dtype=np.float64) / 10000.0,
}

#: How a per-image Dice treats an image whose ground truth is empty.
EMPTY_GT_RULES = ("one_if_empty_pred", "zero", "exclude")

#: Mean per-image Dice values closer than this count as tied (see module docstring).
TIE_TOL = 1e-12

# Pixels per chunk of images in the per-image search (bounds memory to ~ 40 bytes / pixel).
_CHUNK_PIXELS = 1 << 22


class MaxDice(NamedTuple):
    """Best Dice and the threshold that reaches it (prediction = map >= threshold)."""

    dice: float
    threshold: float


# --------------------------------------------------------------------------- inputs


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy view of an array or a torch tensor (moved to CPU, detached)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _scores(maps: Any) -> np.ndarray:
    """Scores as float32 / float64 (others cast to float64); must be finite and non-empty."""
    arr = _to_numpy(maps)
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    if arr.size == 0:
        raise ValueError("maps are empty")
    if not np.isfinite(arr).all():
        raise ValueError("maps contain NaN or infinite values; anomaly maps must be finite")
    return arr


def _truth(masks: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Boolean ground truth of the same shape as the maps."""
    arr = _to_numpy(masks)
    if arr.shape != shape:
        raise ValueError(f"masks have shape {arr.shape}, maps have shape {shape}")
    return arr != 0


def _pair(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    scores = _scores(maps)
    return scores, _truth(masks, scores.shape)


def _as_images(arr: np.ndarray) -> np.ndarray:
    """``n_images x n_pixels`` view (axis 0 = images when ndim >= 3; else one image)."""
    if arr.ndim >= 3:
        return arr.reshape(arr.shape[0], -1)
    return arr.reshape(1, -1)


def resolve_grid(grid: str | Sequence[float] | np.ndarray) -> np.ndarray:
    """Sorted distinct float64 thresholds of a named grid (:data:`GRIDS`) or an array."""
    if isinstance(grid, str):
        key = grid.lower()
        if key not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; named grids are {sorted(GRIDS)} (or pass an array)")
        return GRIDS[key].copy()
    values = np.unique(np.asarray(_to_numpy(grid), dtype=np.float64).ravel())
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("a threshold grid must hold at least one finite value")
    return values


def _check_mode(mode: str, grid: Any) -> None:
    if mode not in ("exact", "grid"):
        raise ValueError(f"mode must be 'exact' or 'grid', got {mode!r}")
    if mode == "grid" and grid is None:
        raise ValueError(f"mode='grid' needs grid= (one of {sorted(GRIDS)} or an array of thresholds)")
    if mode == "exact" and grid is not None:
        raise ValueError("grid= is only used with mode='grid'")


def _check_empty_gt(empty_gt: str) -> None:
    if empty_gt not in EMPTY_GT_RULES:
        raise ValueError(f"empty_gt must be one of {EMPTY_GT_RULES}, got {empty_gt!r}")


def _dice(tp: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray | int) -> np.ndarray:
    """2 TP / (|pred| + |true|) from integer counts, 0 where both are empty."""
    denom = np.asarray(n_pred + n_true)
    with np.errstate(divide="ignore", invalid="ignore"):
        dice = np.asarray(2.0 * np.asarray(tp, dtype=np.float64) / denom, dtype=np.float64)
    empty = denom == 0
    if np.any(empty):
        dice[empty] = 0.0
    return dice


def _sorted_distinct(sorted_values: np.ndarray) -> np.ndarray:
    """Index of the first element of every run of equal values in a sorted 1-D array."""
    change = np.empty(sorted_values.size, dtype=bool)
    change[0] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=change[1:])
    return np.flatnonzero(change)


# --------------------------------------------------------------------------- global Max Dice


def _distinct_counts(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores v (ascending) with |map >= v| and |(map >= v) & truth|.

    One sort of the scores gives the prediction sizes; each lesion pixel is located among
    the distinct values and a reversed cumulative sum of those counts gives TP.
    """
    flat = scores.ravel()
    ordered = np.sort(flat)
    first = _sorted_distinct(ordered)
    distinct = ordered[first]
    located = np.searchsorted(distinct, np.sort(flat[truth.ravel()]), side="left")  # exact matches
    tp = np.cumsum(np.bincount(located, minlength=distinct.size)[::-1])[::-1]
    return distinct, (ordered.size - first).astype(np.int64), tp.astype(np.int64)


def _global_curve(scores: np.ndarray, truth: np.ndarray, thresholds: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Pooled Dice at every candidate threshold (ascending); ``None`` = all distinct scores.

    Exact: see :func:`_distinct_counts`. Grid: both counts are read off the sorted scores
    and sorted lesion scores with searchsorted.
    """
    if thresholds is None:
        distinct, n_pred, tp = _distinct_counts(scores, truth)
        return distinct, _dice(tp, n_pred, int(np.count_nonzero(truth)))
    flat = scores.ravel()
    ordered = np.sort(flat)
    positives = np.sort(flat[truth.ravel()])
    n, n_true = ordered.size, positives.size
    n_pred = n - np.searchsorted(ordered.astype(np.float64), thresholds, side="left")
    tp = n_true - np.searchsorted(positives.astype(np.float64), thresholds, side="left")
    return thresholds, _dice(tp, n_pred, n_true)


def _best_highest(thresholds: np.ndarray, dice: np.ndarray) -> MaxDice:
    """Maximal Dice; among exact ties the highest threshold."""
    best = dice.size - 1 - int(np.argmax(dice[::-1]))
    return MaxDice(float(dice[best]), float(thresholds[best]))


def global_max_dice(maps: Any, masks: Any, mode: str = "exact", grid: str | Sequence[float] | None = None) -> MaxDice:
    """Global (pooled) Max Dice: the best Dice over all pixels of all images at one threshold.

    Every pixel of every image is pooled; the Dice of ``map >= t`` against ``masks`` is
    evaluated at every distinct score value (``mode="exact"``) or at every value of ``grid``
    (``mode="grid"``) with one sort and cumulative counts. Returns ``MaxDice(dice,
    threshold)``; ties go to the highest threshold; all-zero masks give Dice 0.
    """
    _check_mode(mode, grid)
    scores, truth = _pair(maps, masks)
    thresholds = None if mode == "exact" else resolve_grid(grid)
    return _best_highest(*_global_curve(scores, truth, thresholds))


# --------------------------------------------------------------------------- per-image Dice


def _empty_value(n_true: np.ndarray, empty_gt: str) -> np.ndarray:
    """Per-image Dice of an empty prediction: 0 with lesions; for empty GT per ``empty_gt``."""
    value = np.zeros(n_true.shape, dtype=np.float64)
    if empty_gt == "one_if_empty_pred":
        value[n_true == 0] = 1.0
    return value


def per_image_dice(maps: Any, masks: Any, threshold: float, empty_gt: str = "one_if_empty_pred") -> np.ndarray:
    """Dice of ``map >= threshold`` for each image (``N`` values; NaN for excluded empty-GT images)."""
    _check_empty_gt(empty_gt)
    scores, truth = _pair(maps, masks)
    scores, truth = _as_images(scores), _as_images(truth)
    pred = scores >= np.float64(threshold)
    n_true = truth.sum(axis=1)
    n_pred = pred.sum(axis=1)
    dice = _dice((pred & truth).sum(axis=1), n_pred, n_true)
    empty_gt_rows = n_true == 0
    if empty_gt == "one_if_empty_pred":
        dice[empty_gt_rows & (n_pred == 0)] = 1.0
    elif empty_gt == "exclude":
        dice[empty_gt_rows] = np.nan
    return dice


def _mean_dice(dice: np.ndarray) -> float:
    """Mean over images, NaN (excluded) images left out."""
    kept = dice[~np.isnan(dice)]
    if kept.size == 0:
        raise ValueError("no image left to average (every image has an empty ground truth and empty_gt='exclude')")
    return float(kept.mean())


def dice_at_threshold(maps: Any, masks: Any, threshold: float, per_image: bool = False, empty_gt: str = "one_if_empty_pred") -> float:
    """Dice of ``map >= threshold``: pooled over all pixels, or (``per_image``) the mean per-image Dice.

    Pooled: all-zero masks and an empty prediction give 0. Per image: empty ground truth
    follows ``empty_gt`` (see :func:`per_image_dice`).
    """
    if per_image:
        return _mean_dice(per_image_dice(maps, masks, threshold, empty_gt))
    scores, truth = _pair(maps, masks)
    pred = scores >= np.float64(threshold)
    return float(_dice(np.count_nonzero(pred & truth), np.count_nonzero(pred), np.count_nonzero(truth)))


def _distinct_ranks(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct scores (ascending) and, per pixel, how many of them are <= its score."""
    flat = scores.ravel()
    order = np.argsort(flat)
    ordered = flat[order]
    change = np.empty(flat.size, dtype=bool)
    change[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=change[1:])
    upto = np.empty(flat.size, dtype=np.int64)
    upto[order] = np.cumsum(change)
    return ordered[change], upto.reshape(scores.shape)


_RANK_BITS = 39  # a chunk key packs (image, rank, lesion bit) into one int64


def _mean_curve_chunk(ranks: np.ndarray, truth: np.ndarray, covered_by_rank: np.ndarray, n_thresholds: int, empty_gt: str) -> np.ndarray:
    """Sum over the images of a chunk of their Dice at every threshold, as a difference array.

    ``ranks[i, p]`` is the 1-based rank of pixel ``p``'s score among all distinct scores;
    ``covered_by_rank[r]`` is how many candidate thresholds are <= the score of rank ``r``.
    One sort of packed (image, rank, lesion) keys orders every image's pixels by score.
    Image ``i``'s Dice is a step function of the threshold: for ``t`` in ``(v_{r-1}, v_r]``
    (consecutive distinct scores of the image) it equals the Dice of ``map >= v_r`` (a
    reversed cumulative sum of lesion hits); above its maximum score the prediction is
    empty. Each step adds its change at the first candidate threshold it covers; a
    cumulative sum later restores the values.
    """
    n_images, n_pixels = ranks.shape
    image = np.arange(n_images, dtype=np.int64)[:, None] << (_RANK_BITS + 1)
    keys = np.sort((image | (ranks << 1) | truth).ravel()).reshape(n_images, n_pixels)
    ordered = (keys >> 1) & ((1 << _RANK_BITS) - 1)
    tp_at_or_above = np.cumsum((keys & 1)[:, ::-1], axis=1)[:, ::-1]
    first = np.ones(ordered.shape, dtype=bool)
    np.not_equal(ordered[:, 1:], ordered[:, :-1], out=first[:, 1:])
    rows, cols = np.nonzero(first)
    n_true = truth.sum(axis=1)
    dice = _dice(tp_at_or_above[rows, cols], n_pixels - cols, n_true[rows])
    covered = covered_by_rank[ordered[rows, cols]]

    first_of_row = np.ones(rows.size, dtype=bool)
    np.not_equal(rows[1:], rows[:-1], out=first_of_row[1:])
    last_of_row = np.roll(first_of_row, -1)
    previous = np.concatenate(([0.0], dice[:-1]))
    previous[first_of_row] = 0.0
    starts = np.concatenate(([0], covered[:-1]))
    starts[first_of_row] = 0
    empty_steps = _empty_value(n_true, empty_gt)[rows[last_of_row]] - dice[last_of_row]
    return np.bincount(
        np.concatenate((starts, covered[last_of_row])),
        weights=np.concatenate((dice - previous, empty_steps)),
        minlength=n_thresholds + 1,
    )[:n_thresholds]


def _per_image_steps(scores: np.ndarray, truth: np.ndarray, grid: np.ndarray | None, empty_gt: str) -> tuple[np.ndarray, np.ndarray]:
    """Candidate thresholds and the difference array of the summed per-image Dice over them."""
    distinct, ranks = _distinct_ranks(scores)
    if distinct.size >= 1 << _RANK_BITS:
        raise ValueError("too many distinct scores for the per-image search")
    if grid is None:
        thresholds = distinct
        covered_by_rank = np.arange(distinct.size + 1, dtype=np.int64)
    else:
        thresholds = grid
        covered_by_rank = np.concatenate(([0], np.searchsorted(grid, distinct.astype(np.float64), side="right")))
    steps = np.zeros(thresholds.size, dtype=np.float64)
    for part in _chunks(*scores.shape):
        steps += _mean_curve_chunk(ranks[part], truth[part].astype(np.int64), covered_by_rank, thresholds.size, empty_gt)
    return thresholds, steps


class _ExactPerImage:
    """Per-image sorted scores, to evaluate the exact per-image Dice at a few thresholds."""

    def __init__(self, scores: np.ndarray, truth: np.ndarray, empty_gt: str) -> None:
        self.ordered = np.sort(scores, axis=1).astype(np.float64)
        self.positives = np.sort(np.where(truth, scores.astype(np.float64), -np.inf), axis=1)
        self.n_true = truth.sum(axis=1)
        self.empty_gt = empty_gt

    def dice(self, candidates: np.ndarray) -> np.ndarray:
        """``n_images x n_candidates`` Dice of ``map >= candidate``."""
        n_images, n = self.ordered.shape
        n_pred = np.empty((n_images, candidates.size), dtype=np.int64)
        tp = np.empty_like(n_pred)
        for i in range(n_images):  # a loop over images, each a vectorised search
            n_pred[i] = n - np.searchsorted(self.ordered[i], candidates, side="left")
            tp[i] = n - np.searchsorted(self.positives[i], candidates, side="left")
        dice = _dice(tp, n_pred, self.n_true[:, None])
        if self.empty_gt == "one_if_empty_pred":
            dice[(self.n_true == 0)[:, None] & (n_pred == 0)] = 1.0
        return dice

    def best(self, candidates: np.ndarray, chunk: int = 4096) -> MaxDice:
        """Highest candidate whose exact mean Dice is within TIE_TOL of the best."""
        means = np.concatenate(
            [self.dice(candidates[i : i + chunk]).mean(axis=0) for i in range(0, candidates.size, chunk)]
        )
        best = int(np.flatnonzero(means >= means.max() - TIE_TOL)[-1])
        return MaxDice(float(means[best]), float(candidates[best]))


def _chunks(n_images: int, n_pixels: int) -> list[slice]:
    step = max(1, _CHUNK_PIXELS // max(1, n_pixels))
    return [slice(start, min(start + step, n_images)) for start in range(0, n_images, step)]


def per_image_max_dice(
    maps: Any,
    masks: Any,
    mode: str = "exact",
    grid: str | Sequence[float] | None = None,
    empty_gt: str = "one_if_empty_pred",
) -> MaxDice:
    """Per-image Max Dice: one threshold shared by all images maximising the mean per-image Dice.

    Candidates are every distinct score value over all images (``mode="exact"``) or the
    values of ``grid``. One global sort ranks every score among the distinct values; each
    image then contributes its step-function Dice curve (one sort of packed (image, rank,
    lesion) keys and reversed cumulative counts), placed on the candidate thresholds through
    those ranks as a difference array and summed with one cumulative sum; images are
    processed in memory-bounded chunks. The near-best candidates (within the rounding
    margin of that sum) are then re-evaluated exactly, so the result is the brute-force
    maximum. Empty-GT images follow ``empty_gt`` (module docstring).
    """
    _check_mode(mode, grid)
    _check_empty_gt(empty_gt)
    scores, truth = _pair(maps, masks)
    scores, truth = _as_images(scores), _as_images(truth)
    if empty_gt == "exclude":
        keep = truth.any(axis=1)
        if not keep.any():
            raise ValueError("no image has a lesion, and empty_gt='exclude' leaves nothing to average")
        scores, truth = scores[keep], truth[keep]
    thresholds, steps = _per_image_steps(scores, truth, None if mode == "exact" else resolve_grid(grid), empty_gt)
    approx = np.cumsum(steps.astype(np.longdouble)).astype(np.float64) / scores.shape[0]
    # rounding of the difference array is far below this margin; re-evaluate what is near the top
    margin = 1e-9 + 8 * np.finfo(np.float64).eps * float(np.abs(steps).sum()) / scores.shape[0]
    near = np.flatnonzero(approx >= approx.max() - margin)
    return _ExactPerImage(scores, truth, empty_gt).best(thresholds[near].astype(np.float64))


# --------------------------------------------------------------------------- ranking metrics


def _ranking_counts(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Cumulative (TP, FP) for thresholds at every distinct score, from high to low."""
    _, n_pred, tp = _distinct_counts(scores, truth)
    n_pos = int(np.count_nonzero(truth))
    return tp[::-1], (n_pred - tp)[::-1], n_pos, int(truth.size) - n_pos


def pixel_auroc(maps: Any, masks: Any) -> float:
    """Pooled pixel AUROC (ties count one half; equals sklearn's ``roc_auc_score``); NaN for one class.

    The ROC curve through every distinct score is integrated with the trapezoid rule in
    exact integer arithmetic, then divided once by P * N.
    """
    scores, truth = _pair(maps, masks)
    tp, fp, n_pos, n_neg = _ranking_counts(scores, truth)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    tp0 = np.concatenate(([0], tp))
    fp0 = np.concatenate(([0], fp))
    twice_area = int(np.sum(np.diff(fp0) * (tp0[1:] + tp0[:-1])))
    return twice_area / (2.0 * n_pos * n_neg)


def pixel_auprc(maps: Any, masks: Any) -> float:
    """Pooled pixel average precision, sum_k (R_k - R_{k-1}) P_k over distinct thresholds.

    Equals sklearn's ``average_precision_score`` (no interpolation); NaN without lesion pixels.
    """
    scores, truth = _pair(maps, masks)
    tp, fp, n_pos, _ = _ranking_counts(scores, truth)
    if n_pos == 0:
        return float("nan")
    precision = tp / (tp + fp).astype(np.float64)
    recall_steps = np.diff(np.concatenate(([0], tp))) / float(n_pos)
    return float(np.sum(recall_steps * precision))


# --------------------------------------------------------------------------- operating point, buckets


def threshold_from_healthy(val_maps: Any, brain_masks: Any | None = None, fpr: float = 0.01) -> float:
    """A test-set-free threshold from healthy validation maps only.

    Returns the smallest observed in-brain healthy score ``t`` such that the fraction of
    healthy brain pixels with ``map >= t`` is at most ``fpr`` (an exact upper quantile;
    ties never push the flagged fraction above ``fpr``). When even the largest score is
    shared by more than ``fpr`` of the pixels, returns the next float above it (nothing
    healthy is flagged). ``brain_masks=None`` uses every pixel. Default ``fpr=0.01``: 1 % of
    healthy brain pixels flagged.
    """
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    scores = _scores(val_maps)
    if brain_masks is not None:
        inside = _truth(brain_masks, scores.shape)
        scores = scores[inside]
        if scores.size == 0:
            raise ValueError("brain masks of the validation maps are empty")
    ordered = np.sort(scores.ravel()).astype(np.float64)
    allowed = int(np.floor(fpr * ordered.size + 1e-9))
    first = _sorted_distinct(ordered)
    flagged = ordered.size - first
    ok = np.flatnonzero(flagged <= allowed)
    if ok.size == 0:
        return float(np.nextafter(ordered[-1], np.inf))
    return float(ordered[first[ok[0]]])


def size_bucket(areas: Any, edges: Sequence[float], labels: Sequence[str], right: bool = True) -> np.ndarray:
    """Bucket label of each lesion area (object array; ``None`` outside every bucket).

    Bucket ``k`` is ``(edges[k], edges[k+1]]`` when ``right`` (S1: small (3, 71]) and
    ``[edges[k], edges[k+1])`` otherwise (S2: small [0, 200)).
    """
    edges_arr = np.asarray(edges, dtype=np.float64)
    if edges_arr.size != len(labels) + 1 or np.any(np.diff(edges_arr) <= 0):
        raise ValueError("size_bucket needs strictly increasing edges, one more than labels")
    areas_arr = np.asarray(_to_numpy(areas), dtype=np.float64).ravel()
    index = np.searchsorted(edges_arr, areas_arr, side="left" if right else "right") - 1
    inside = (index >= 0) & (index < len(labels))
    out = np.full(areas_arr.size, None, dtype=object)
    out[inside] = np.asarray(labels, dtype=object)[index[inside]]
    return out
