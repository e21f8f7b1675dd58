"""Exact, vectorised pixel metrics for anomaly maps, and the peers' threshold grids.

Definitions used everywhere in this module:

- ``maps`` hold anomaly scores, **higher = more anomalous**; they must be finite. Their
  units are free (negative values and values above 1 are fine; nothing is clipped).
- ``masks`` are ground-truth lesion masks; any non-zero value is a lesion pixel.
- Image axis: for per-image metrics an array with ``ndim >= 3`` indexes images on axis 0
  (``N x H x W``); a 2-D or 1-D array is one image.

Max Dice comes in two flavours:

- :func:`global_max_dice` pools every pixel of every image and picks the threshold that
  maximises the pooled Dice (S1, THOR's evaluator).
- :func:`per_image_max_dice` picks one threshold shared by all images that maximises the
  *mean* of the per-image Dice (S2, IterMask2 / MAD-AD).

Two search modes share one code path (counts at a sorted set of candidate thresholds are
read off sorted scores with ``searchsorted`` and cumulative sums, never with a Python loop
over thresholds):

- ``mode="exact"`` (default), our rule: a threshold ``t`` predicts ``map >= t`` (compared
  in float64; a float32 value converts without rounding); Dice = 2 TP / (|prediction| +
  |ground truth|); the candidates are every distinct score value AND one value above the
  maximum (``nextafter(max, +inf)``: "predict nothing"), so exact is an upper bound of
  every grid; among equally good thresholds the **highest** is reported (the smallest
  prediction).
- ``mode="grid"``: a :class:`PeerGrid` -- the thresholds AND the comparison rule of a
  peer's evaluator, so that value and reported threshold are the peer's (:data:`PEER_GRIDS`):

  ============== ============================ ========= ============ ====== ===============
  grid           thresholds                   predicts  Dice eps     ties   empty GT (peer)
  ============== ============================ ========= ============ ====== ===============
  thor           linspace(0, 1, 101)          map > t   1e-6         lowest 0
  itermask2      k / 10000, k = 0..99 (100)   map > t   0            lowest NaN
  itermask2_fine k / 10000, k = 0..10000      map > t   0            lowest NaN
  madad          linspace(0, 1, 201)          map > t   1e-6         lowest 1 if nothing predicted
  ============== ============================ ========= ============ ====== ===============

  Sources (read, not copied): THOR -- ci-ber/THOR_DDPM ``optim/metrics/dice.py``
  (``compute_dice``) and ``projects/thor/DownstreamEvaluatorAtlas.py``
  (``pathology_localization``: ``np.linspace(0, 1, 101)``, ``np.argmax``); IterMask2 --
  ZiyunLiang/IterMask2 ``test.py`` (``for thres in range(100)``, ``thres / 10000 <
  error_map``, ``np.argmax``) and ``utils/metrics.py`` (``dice_score``, no epsilon);
  MAD-AD -- farzad-bz/MAD-AD ``evaluate-MAD-AD.py`` (``compute_dice``, ``dsc_max``: 201
  thresholds, a strict ``>`` update so the first maximum wins). ``itermask2_fine`` is the
  10^4-step grid over [0, 1] with IterMask2's rule; no peer runs it.

  Two details of THOR's and MAD-AD's binarisation are reproduced: they set ``p[p > t] =
  1`` and then ``p[p < 1] = 0`` on the map itself, so a score >= 1 is always predicted
  (``saturate_at=1``; it matters only at t = 1); and they ran numpy 1.x, which compares a
  float32 map with a float64 threshold in float32 (``compare_in_map_dtype``: the
  threshold is rounded to float32 first for float32 maps). IterMask2 holds its maps in
  float64 arrays. Dice values are computed in float64 here (the peers sum in float32 or
  float64: last-digit differences only).

Empty ground truth:

- Global Dice with no lesion pixel at all (all-zero masks) is 0 for every threshold (also
  THOR's value: 0 / (|P| + eps)); the reported threshold then follows the tie rule.
- A per-image Dice of an image with empty ground truth follows ``empty_gt`` (ours, always
  explicit and recorded): ``"one_if_empty_pred"`` (default, and MAD-AD's code: 1 if the
  prediction is empty too, else 0), ``"zero"`` (always 0), or ``"exclude"`` (the image is
  left out of the mean; its per-image value is NaN). The peers' own values are recorded in
  each :class:`PeerGrid` (``empty_gt``): IterMask2's ``dice_score`` gives 0 / 0 = NaN for
  an empty GT with an empty prediction, which turns that threshold's mean into NaN (their
  test set has no empty-GT image); we never reproduce a NaN mean.

Ties: the per-image search treats mean Dice values within ``TIE_TOL`` (1e-12) of the
maximum as tied and reports the mean recomputed directly at the chosen threshold. AUROC /
AUPRC are NaN when the pooled pixels hold only one class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np

__all__ = [
    "EMPTY_GT_RULES",
    "EXACT_RULE",
    "GRIDS",
    "PEER_GRIDS",
    "TIE_TOL",
    "MaxDice",
    "PeerGrid",
    "dice_at_threshold",
    "global_max_dice",
    "peer_grid",
    "per_image_dice",
    "per_image_max_dice",
    "pixel_auprc",
    "pixel_auroc",
    "resolve_grid",
    "size_bucket",
    "threshold_from_healthy",
]

#: How a per-image Dice treats an image whose ground truth is empty.
EMPTY_GT_RULES = ("one_if_empty_pred", "zero", "exclude")

#: Mean per-image Dice values closer than this count as tied (see module docstring).
TIE_TOL = 1e-12

# Pixels per chunk of images in the per-image search (bounds memory to ~ 40 bytes / pixel).
_CHUNK_PIXELS = 1 << 22


class MaxDice(NamedTuple):
    """Best Dice and the threshold that reaches it (the prediction rule is the search's)."""

    dice: float
    threshold: float


@dataclass(frozen=True)
class PeerGrid:
    """A threshold grid with the comparison rule of the evaluator that uses it.

    ``strict``: prediction ``map > t`` (else ``map >= t``). ``eps``: added to every Dice
    denominator (for a per-image Dice only when the ground truth is not empty).
    ``tie``: ``"lowest"`` or ``"highest"`` threshold among equally good ones.
    ``empty_gt``: the peer's own per-image value for an image without lesion pixels (for
    the record; the search uses the caller's explicit ``empty_gt`` rule).
    ``saturate_at``: scores >= this are always predicted (binarisation in place).
    ``compare_in_map_dtype``: a float32 map is compared with the threshold rounded to
    float32 (numpy 1.x casting); otherwise every comparison is in float64.
    """

    name: str
    thresholds: tuple[float, ...]
    strict: bool = False
    eps: float = 0.0
    tie: str = "highest"
    empty_gt: str = "one_if_empty_pred"
    saturate_at: float | None = None
    compare_in_map_dtype: bool = False
    source: str = ""

    def __post_init__(self) -> None:
        values = np.asarray(self.thresholds, dtype=np.float64)
        if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
            raise ValueError(f"grid {self.name!r}: thresholds must be a non-empty 1-D sequence of finite values")
        if np.any(np.diff(values) <= 0):
            raise ValueError(f"grid {self.name!r}: thresholds must be strictly increasing")
        if self.tie not in ("lowest", "highest"):
            raise ValueError(f"grid {self.name!r}: tie must be 'lowest' or 'highest', got {self.tie!r}")
        if not self.eps >= 0:
            raise ValueError(f"grid {self.name!r}: eps must be >= 0, got {self.eps}")

    @property
    def values(self) -> np.ndarray:
        """The thresholds as an ascending float64 array."""
        return np.asarray(self.thresholds, dtype=np.float64)

    def describe(self) -> dict[str, Any]:
        """The rule as plain data, for a result record."""
        values = self.values
        return {
            "name": self.name,
            "n_thresholds": int(values.size),
            "first": float(values[0]),
            "last": float(values[-1]),
            "prediction": "map > t" if self.strict else "map >= t",
            "dice": f"2 TP / (|P| + |G| + {self.eps:g})",
            "tie": f"{self.tie} threshold among equally good ones",
            "peer_empty_gt": self.empty_gt,
            "saturate_at": self.saturate_at,
            "compare_in_map_dtype": self.compare_in_map_dtype,
            "source": self.source,
        }


#: Our rule for ``mode="exact"`` (its candidates are the data's own values, not a grid).
EXACT_RULE = PeerGrid("exact", (0.0,), strict=False, eps=0.0, tie="highest", empty_gt="one_if_empty_pred", source="this module")

_THOR_SOURCE = "ci-ber/THOR_DDPM: optim/metrics/dice.py (compute_dice), projects/thor/DownstreamEvaluatorAtlas.py (pathology_localization)"
_ITERMASK2_SOURCE = "ZiyunLiang/IterMask2: test.py (threshold loop, np.argmax), utils/metrics.py (dice_score)"
_MADAD_SOURCE = "farzad-bz/MAD-AD: evaluate-MAD-AD.py (compute_dice, dsc_max)"

#: The peers' evaluators: thresholds and rule (module docstring).
PEER_GRIDS: dict[str, PeerGrid] = {
    "thor": PeerGrid(
        "thor", tuple(np.linspace(0.0, 1.0, 101).tolist()), strict=True, eps=1e-6, tie="lowest",
        empty_gt="zero", saturate_at=1.0, compare_in_map_dtype=True, source=_THOR_SOURCE,
    ),
    "itermask2": PeerGrid(
        "itermask2", tuple((np.arange(100) / 10000.0).tolist()), strict=True, eps=0.0, tie="lowest",
        empty_gt="nan_if_empty_pred", source=_ITERMASK2_SOURCE,
    ),
    "itermask2_fine": PeerGrid(
        "itermask2_fine", tuple((np.arange(10001) / 10000.0).tolist()), strict=True, eps=0.0, tie="lowest",
        empty_gt="nan_if_empty_pred", source=_ITERMASK2_SOURCE + "; step 1e-4 over all of [0, 1] (not run by the peer)",
    ),
    "madad": PeerGrid(
        "madad", tuple(np.linspace(0.0, 1.0, 201).tolist()), strict=True, eps=1e-6, tie="lowest",
        empty_gt="one_if_empty_pred", saturate_at=1.0, compare_in_map_dtype=True, source=_MADAD_SOURCE,
    ),
}

#: Threshold values of the named grids (ascending float64).
GRIDS: dict[str, np.ndarray] = {name: grid.values for name, grid in PEER_GRIDS.items()}


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


def peer_grid(grid: str | PeerGrid | Sequence[float] | np.ndarray) -> PeerGrid:
    """A named grid of :data:`PEER_GRIDS`, a :class:`PeerGrid` as given, or an array.

    An array of thresholds gets our rule (``map >= t``, no epsilon, highest threshold
    among ties); build a :class:`PeerGrid` for any other rule.
    """
    if isinstance(grid, PeerGrid):
        return grid
    if isinstance(grid, str):
        key = grid.lower()
        if key not in PEER_GRIDS:
            raise ValueError(f"unknown grid {grid!r}; named grids are {sorted(PEER_GRIDS)} (or pass an array)")
        return PEER_GRIDS[key]
    values = np.unique(np.asarray(_to_numpy(grid), dtype=np.float64).ravel())
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("a threshold grid must hold at least one finite value")
    return PeerGrid("custom", tuple(values.tolist()))


def resolve_grid(grid: str | PeerGrid | Sequence[float] | np.ndarray) -> np.ndarray:
    """Sorted distinct float64 thresholds of a named grid, a :class:`PeerGrid` or an array."""
    return peer_grid(grid).values


def _check_mode(mode: str, grid: Any) -> None:
    if mode not in ("exact", "grid"):
        raise ValueError(f"mode must be 'exact' or 'grid', got {mode!r}")
    if mode == "grid" and grid is None:
        raise ValueError(f"mode='grid' needs grid= (one of {sorted(PEER_GRIDS)} or an array of thresholds)")
    if mode == "exact" and grid is not None:
        raise ValueError("grid= is only used with mode='grid'")


def _check_empty_gt(empty_gt: str) -> None:
    if empty_gt not in EMPTY_GT_RULES:
        raise ValueError(f"empty_gt must be one of {EMPTY_GT_RULES}, got {empty_gt!r}")


def _cutoffs(rule: PeerGrid, thresholds: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float64 values compared with the scores for ``thresholds`` under ``rule``.

    ``map > c`` / ``map >= c`` with ``c`` the threshold, rounded to float32 first for a
    float32 map when the rule compares in the map's dtype, and lowered so that scores >=
    ``saturate_at`` are always predicted. Monotone in the threshold.
    """
    cut = np.asarray(thresholds, dtype=np.float64)
    if rule.compare_in_map_dtype and np.dtype(dtype) == np.float32:
        cut = cut.astype(np.float32).astype(np.float64)
    if rule.saturate_at is not None:
        # map > nextafter(s, -inf) is map >= s for every float64 value
        floor = np.nextafter(np.float64(rule.saturate_at), -np.inf) if rule.strict else np.float64(rule.saturate_at)
        cut = np.minimum(cut, floor)
    return cut


def _predict(scores: np.ndarray, threshold: float, rule: PeerGrid) -> np.ndarray:
    """Boolean prediction of ``rule`` at one threshold."""
    cut = _cutoffs(rule, np.array([threshold]), scores.dtype)[0]
    values = scores.astype(np.float64, copy=False)
    return values > cut if rule.strict else values >= cut


def _dice(tp: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray | int, eps: float = 0.0) -> np.ndarray:
    """2 TP / (|pred| + |true| + eps) from integer counts, 0 where the denominator is 0."""
    denom = np.asarray(n_pred + n_true, dtype=np.float64) + eps
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


def _above(maximum: float) -> float:
    """The exact mode's "predict nothing" candidate: the next float64 above the largest score."""
    return float(np.nextafter(np.float64(maximum), np.inf))


def _pick(values: np.ndarray, tie: str, tol: float = 0.0) -> int:
    """Index of the best value (ties within ``tol``): the lowest or highest index among them."""
    tied = np.flatnonzero(values >= values.max() - tol)
    return int(tied[0] if tie == "lowest" else tied[-1])


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


def _global_curve(scores: np.ndarray, truth: np.ndarray, grid: PeerGrid | None) -> tuple[np.ndarray, np.ndarray]:
    """Pooled Dice at every candidate threshold (ascending); ``grid=None``: exact candidates.

    Exact: every distinct score (see :func:`_distinct_counts`) and one above the maximum
    (empty prediction, Dice 0). Grid: both counts are read off the sorted scores and sorted
    lesion scores with searchsorted at the rule's cut-offs.
    """
    n_true = int(np.count_nonzero(truth))
    if grid is None:
        distinct, n_pred, tp = _distinct_counts(scores, truth)
        thresholds = np.append(distinct.astype(np.float64), _above(distinct[-1]))
        return thresholds, np.append(_dice(tp, n_pred, n_true), 0.0)
    flat = scores.ravel().astype(np.float64)
    ordered = np.sort(flat)
    positives = np.sort(flat[truth.ravel()])
    cut = _cutoffs(grid, grid.values, scores.dtype)
    side = "right" if grid.strict else "left"  # strict: count values <= cut-off as not predicted
    n_pred = ordered.size - np.searchsorted(ordered, cut, side=side)
    tp = positives.size - np.searchsorted(positives, cut, side=side)
    return grid.values, _dice(tp, n_pred, n_true, grid.eps)


def global_max_dice(maps: Any, masks: Any, mode: str = "exact", grid: str | PeerGrid | Sequence[float] | None = None) -> MaxDice:
    """Global (pooled) Max Dice: the best Dice over all pixels of all images at one threshold.

    Every pixel of every image is pooled; the Dice is evaluated at every exact candidate
    (``mode="exact"``: every distinct score and one above the maximum, ``map >= t``, ties
    to the highest threshold) or at every value of ``grid`` under its rule (``mode="grid"``;
    the named peer grids reproduce the peer's value and threshold), with one sort and
    cumulative counts. Returns ``MaxDice(dice, threshold)``; all-zero masks give Dice 0.
    """
    _check_mode(mode, grid)
    scores, truth = _pair(maps, masks)
    rule = EXACT_RULE if mode == "exact" else peer_grid(grid)
    thresholds, dice = _global_curve(scores, truth, None if mode == "exact" else rule)
    best = _pick(dice, rule.tie)
    return MaxDice(float(dice[best]), float(thresholds[best]))


# --------------------------------------------------------------------------- per-image Dice


def _empty_value(n_true: np.ndarray, empty_gt: str) -> np.ndarray:
    """Per-image Dice of an empty prediction: 0 with lesions; for empty GT per ``empty_gt``."""
    value = np.zeros(n_true.shape, dtype=np.float64)
    if empty_gt == "one_if_empty_pred":
        value[n_true == 0] = 1.0
    return value


def _rule(rule: str | PeerGrid | None) -> PeerGrid:
    return EXACT_RULE if rule is None else peer_grid(rule)


def per_image_dice(
    maps: Any, masks: Any, threshold: float, empty_gt: str = "one_if_empty_pred", rule: str | PeerGrid | None = None
) -> np.ndarray:
    """Dice of each image at ``threshold`` (``N`` values; NaN for excluded empty-GT images).

    ``rule=None``: ours (``map >= threshold``); a grid name or :class:`PeerGrid`: that
    grid's comparison and epsilon (so the Dice at a grid's reported threshold is the one
    the grid search saw).
    """
    _check_empty_gt(empty_gt)
    chosen = _rule(rule)
    scores, truth = _pair(maps, masks)
    scores, truth = _as_images(scores), _as_images(truth)
    pred = _predict(scores, threshold, chosen)
    n_true = truth.sum(axis=1)
    n_pred = pred.sum(axis=1)
    dice = _dice((pred & truth).sum(axis=1), n_pred, n_true, chosen.eps)
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


def dice_at_threshold(
    maps: Any,
    masks: Any,
    threshold: float,
    per_image: bool = False,
    empty_gt: str = "one_if_empty_pred",
    rule: str | PeerGrid | None = None,
) -> float:
    """Dice at ``threshold``: pooled over all pixels, or (``per_image``) the mean per-image Dice.

    Pooled: all-zero masks and an empty prediction give 0. Per image: empty ground truth
    follows ``empty_gt`` (see :func:`per_image_dice`). ``rule`` as in :func:`per_image_dice`.
    """
    if per_image:
        return _mean_dice(per_image_dice(maps, masks, threshold, empty_gt, rule))
    chosen = _rule(rule)
    scores, truth = _pair(maps, masks)
    pred = _predict(scores, threshold, chosen)
    return float(_dice(np.count_nonzero(pred & truth), np.count_nonzero(pred), np.count_nonzero(truth), chosen.eps))


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


def _mean_curve_chunk(
    ranks: np.ndarray, truth: np.ndarray, covered_by_rank: np.ndarray, n_thresholds: int, empty_gt: str, eps: float = 0.0
) -> np.ndarray:
    """Sum over the images of a chunk of their Dice at every threshold, as a difference array.

    ``ranks[i, p]`` is the 1-based rank of pixel ``p``'s score among all distinct scores;
    ``covered_by_rank[r]`` is how many candidate thresholds predict the score of rank ``r``
    (``map >= t`` or ``map > t``: either way a prefix of the ascending candidates).
    One sort of packed (image, rank, lesion) keys orders every image's pixels by score.
    Image ``i``'s prediction at candidate ``k`` is every pixel with score >= its smallest
    distinct score ``v_r`` whose coverage exceeds ``k``, so its Dice is a step function of
    ``k`` (a reversed cumulative sum of lesion hits gives each step); where no score is
    covered the prediction is empty. Each step adds its change at the first candidate it
    covers; a cumulative sum later restores the values.
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
    dice = _dice(tp_at_or_above[rows, cols], n_pixels - cols, n_true[rows], eps)
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


def _per_image_steps(scores: np.ndarray, truth: np.ndarray, grid: PeerGrid | None, empty_gt: str) -> tuple[np.ndarray, np.ndarray]:
    """Candidate thresholds and the difference array of the summed per-image Dice over them.

    ``grid=None``: the exact candidates (every distinct score, then one above the maximum).
    """
    distinct, ranks = _distinct_ranks(scores)
    if distinct.size >= 1 << _RANK_BITS:
        raise ValueError("too many distinct scores for the per-image search")
    if grid is None:
        thresholds = np.append(distinct.astype(np.float64), _above(distinct[-1]))
        covered_by_rank = np.arange(distinct.size + 1, dtype=np.int64)
        eps = 0.0
    else:
        thresholds = grid.values
        cut = _cutoffs(grid, thresholds, scores.dtype)
        # candidates predicting a score: cut-offs below it (strict) or at most it
        side = "left" if grid.strict else "right"
        covered_by_rank = np.concatenate(([0], np.searchsorted(cut, distinct.astype(np.float64), side=side)))
        eps = grid.eps
    steps = np.zeros(thresholds.size, dtype=np.float64)
    for part in _chunks(*scores.shape):
        steps += _mean_curve_chunk(ranks[part], truth[part].astype(np.int64), covered_by_rank, thresholds.size, empty_gt, eps)
    return thresholds, steps


class _ExactPerImage:
    """Per-image sorted scores, to evaluate the per-image Dice exactly at a few thresholds."""

    def __init__(self, scores: np.ndarray, truth: np.ndarray, empty_gt: str, rule: PeerGrid) -> None:
        self.dtype = scores.dtype
        self.ordered = np.sort(scores, axis=1).astype(np.float64)
        self.positives = np.sort(np.where(truth, scores.astype(np.float64), -np.inf), axis=1)
        self.n_true = truth.sum(axis=1)
        self.empty_gt = empty_gt
        self.rule = rule

    def dice(self, candidates: np.ndarray) -> np.ndarray:
        """``n_images x n_candidates`` Dice under the rule."""
        n_images, n = self.ordered.shape
        cut = _cutoffs(self.rule, candidates, self.dtype)
        side = "right" if self.rule.strict else "left"
        n_pred = np.empty((n_images, candidates.size), dtype=np.int64)
        tp = np.empty_like(n_pred)
        for i in range(n_images):  # a loop over images, each a vectorised search
            n_pred[i] = n - np.searchsorted(self.ordered[i], cut, side=side)
            tp[i] = n - np.searchsorted(self.positives[i], cut, side=side)
        dice = _dice(tp, n_pred, self.n_true[:, None], self.rule.eps)
        if self.empty_gt == "one_if_empty_pred":
            dice[(self.n_true == 0)[:, None] & (n_pred == 0)] = 1.0
        return dice

    def best(self, candidates: np.ndarray, chunk: int = 4096) -> MaxDice:
        """The candidate the rule's tie direction picks among those within TIE_TOL of the best mean."""
        means = np.concatenate(
            [self.dice(candidates[i : i + chunk]).mean(axis=0) for i in range(0, candidates.size, chunk)]
        )
        best = _pick(means, self.rule.tie, TIE_TOL)
        return MaxDice(float(means[best]), float(candidates[best]))


def _chunks(n_images: int, n_pixels: int) -> list[slice]:
    step = max(1, _CHUNK_PIXELS // max(1, n_pixels))
    return [slice(start, min(start + step, n_images)) for start in range(0, n_images, step)]


def per_image_max_dice(
    maps: Any,
    masks: Any,
    mode: str = "exact",
    grid: str | PeerGrid | Sequence[float] | None = None,
    empty_gt: str = "one_if_empty_pred",
) -> MaxDice:
    """Per-image Max Dice: one threshold shared by all images maximising the mean per-image Dice.

    Candidates are the exact ones (``mode="exact"``: every distinct score over all images and
    one above the maximum; ``map >= t``; ties to the highest threshold) or the values of
    ``grid`` under its rule (the named peer grids reproduce the peer's value and threshold).
    One global sort ranks every score among the distinct values; each image then
    contributes its step-function Dice curve (one sort of packed (image, rank, lesion) keys
    and reversed cumulative counts), placed on the candidate thresholds through those
    ranks as a difference array and summed with one cumulative sum; images are processed
    in memory-bounded chunks. The near-best candidates (within the rounding margin of that
    sum) are then re-evaluated exactly, so the result is the brute-force maximum.
    Empty-GT images follow ``empty_gt`` (module docstring).
    """
    _check_mode(mode, grid)
    _check_empty_gt(empty_gt)
    rule = EXACT_RULE if mode == "exact" else peer_grid(grid)
    scores, truth = _pair(maps, masks)
    scores, truth = _as_images(scores), _as_images(truth)
    if empty_gt == "exclude":
        keep = truth.any(axis=1)
        if not keep.any():
            raise ValueError("no image has a lesion, and empty_gt='exclude' leaves nothing to average")
        scores, truth = scores[keep], truth[keep]
    thresholds, steps = _per_image_steps(scores, truth, None if mode == "exact" else rule, empty_gt)
    approx = np.cumsum(steps.astype(np.longdouble)).astype(np.float64) / scores.shape[0]
    # rounding of the difference array is far below this margin; re-evaluate what is near the top
    margin = 1e-9 + 8 * np.finfo(np.float64).eps * float(np.abs(steps).sum()) / scores.shape[0]
    near = np.flatnonzero(approx >= approx.max() - margin)
    return _ExactPerImage(scores, truth, empty_gt, rule).best(thresholds[near].astype(np.float64))


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
