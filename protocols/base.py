"""What every evaluation protocol shares: parameters, data checks, map handling, results.

A protocol is a dataclass whose fields are its tunable parameters (threshold search mode,
grid, map normalisation, brain-mask application, empty-ground-truth rule); everything else
it pins (metric, slice rule, normalisation, size buckets) is a class attribute.
``parameters()`` returns all of it, and the runner writes that dict into every result
record. Defaults follow the code that defined each protocol (THOR for S1, IterMask2 for
S2) wherever that code is well defined; every departure is a named field, recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Sequence

import numpy as np
import pandas as pd

from datasets.format import SliceSet
from protocols import metrics

#: The resolution at which the literature's lesion-size buckets are defined.
REFERENCE_RESOLUTION = (128, 128)

#: How maps are rescaled before evaluation (``Protocol.map_normalisation``).
MAP_NORMALISATIONS = ("none", "minmax_test_set")

#: Each peer's per-image Dice for an image without lesion pixels (read from their code).
PEER_EMPTY_GT = {
    "THOR": "0: pooled Dice 2TP / (P + G + 1e-6) is 0 without lesion pixels (optim/metrics/dice.py)",
    "IterMask2": "NaN when the prediction is empty too (0 / 0 in utils/metrics.py dice_score), else 0; "
    "their test set (one tumour slice per subject) has no such image",
    "MAD-AD code": "1 if the prediction is empty too, else 0 (evaluate-MAD-AD.py compute_dice)",
}


class ProtocolDataError(ValueError):
    """A slice set does not fit a protocol (missing modality, no test lesions, ...)."""


@dataclass
class EvaluationResult:
    """Scalar metrics (fractions in [0, 1], counts and thresholds) and one row per test image.

    ``notes`` holds facts about this evaluation a record should carry (resolution, bucket
    scale, images excluded, how the validation threshold was chosen).
    """

    metrics: dict[str, float]
    per_image: pd.DataFrame
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SizeBuckets:
    """Lesion-size buckets given in pixels at 128 x 128; scaled by area at other resolutions.

    Bucket ``k`` is ``(edges[k], edges[k+1]]`` when ``right`` else ``[edges[k], edges[k+1])``.
    """

    edges: tuple[float, ...]
    labels: tuple[str, ...]
    right: bool

    @staticmethod
    def scale(resolution: tuple[int, int]) -> float:
        """Pixels at ``resolution`` per pixel at 128 x 128: (H * W) / 128^2."""
        return (resolution[0] * resolution[1]) / float(REFERENCE_RESOLUTION[0] * REFERENCE_RESOLUTION[1])

    def scaled_edges(self, resolution: tuple[int, int]) -> list[float]:
        factor = self.scale(resolution)
        return [e * factor for e in self.edges]

    def assign(self, areas: np.ndarray, resolution: tuple[int, int]) -> np.ndarray:
        """Label of each lesion area measured at ``resolution`` (None outside every bucket)."""
        return metrics.size_bucket(areas, self.scaled_edges(resolution), self.labels, right=self.right)

    def describe(self, resolution: tuple[int, int] = REFERENCE_RESOLUTION) -> dict[str, str]:
        """``{"small": "(3, 71]", ...}`` in pixels at ``resolution``."""
        edges = self.scaled_edges(resolution)
        left, right = ("(", "]") if self.right else ("[", ")")
        out = {}
        for k, label in enumerate(self.labels):
            hi = edges[k + 1]
            upper = f"{_fmt(hi)}{right}" if np.isfinite(hi) else "inf)"
            out[label] = f"{left}{_fmt(edges[k])}, {upper}"
        return out


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def lesion_areas(masks: np.ndarray) -> np.ndarray:
    """Lesion pixels per image, counted from the masks (the table's column may be stale)."""
    masks = np.asarray(masks)
    return np.count_nonzero(masks.reshape(masks.shape[0], -1), axis=1).astype(np.int64)


@dataclass
class Protocol:
    """Base class: the shared parameters and plumbing of S1 and S2.

    Parameters
    ----------
    mode:
        ``"exact"`` (every distinct score is a candidate threshold) or ``"grid"``.
    grid:
        With ``mode="grid"``: a peer's evaluator, thresholds and rule -- ``"thor"``
        (101 values in [0, 1], map > t, epsilon 1e-6), ``"itermask2"`` (k / 10000 for
        k = 0..99: their published loop), ``"itermask2_fine"`` (k / 10000 up to 1),
        ``"madad"`` (201 values, the MAD-AD code's) -- or a sequence of thresholds (our
        rule, map >= t). See :mod:`protocols.metrics`.
    map_normalisation:
        ``"none"`` (default): maps as given. ``"minmax_test_set"``: (map - min) / (max -
        min) with min and max over every pixel of every evaluated test map (IterMask2's
        ``normalize`` in test.py), before the brain mask; validation maps get the same
        affine map. The peer grids on [0, 1] assume maps in that range: IterMask2's
        evaluation is ``mode="grid", grid="itermask2", map_normalisation="minmax_test_set"``
        with the brain mask applied (the S2 default).
    apply_brain_mask:
        Multiply the maps by the brain mask (after any normalisation): zero scores outside
        the brain. S1 default False (THOR's evaluator compares maps as given), S2 default
        True (IterMask2's test.py always does).
    empty_gt:
        Per-image Dice of an image without lesion pixels: ``"one_if_empty_pred"``
        (default), ``"zero"`` or ``"exclude"`` (see :mod:`protocols.metrics`).
    val_fpr:
        Test-set-free operating point: the threshold flags at most this fraction of the
        healthy validation brain pixels (used when validation maps are given).
    """

    mode: str = "exact"
    grid: str | Sequence[float] | None = None
    apply_brain_mask: bool = False
    empty_gt: str = "one_if_empty_pred"
    val_fpr: float = 0.01
    map_normalisation: str = "none"

    name: ClassVar[str] = ""
    metric: ClassVar[str] = ""
    buckets: ClassVar[SizeBuckets]
    slice_rule: ClassVar[str] = ""
    normalisation: ClassVar[str] = ""
    data_setting: ClassVar[str] = ""
    needs_val_maps: ClassVar[bool] = False

    def __post_init__(self) -> None:
        metrics._check_mode(self.mode, self.grid)
        metrics._check_empty_gt(self.empty_gt)
        if not 0.0 <= self.val_fpr < 1.0:
            raise ValueError(f"val_fpr must be in [0, 1), got {self.val_fpr}")
        if self.map_normalisation not in MAP_NORMALISATIONS:
            raise ValueError(f"map_normalisation must be one of {MAP_NORMALISATIONS}, got {self.map_normalisation!r}")
        if self.grid is not None:
            metrics.resolve_grid(self.grid)  # fail early on an unknown name
        if not isinstance(self.grid, (str, type(None))):
            self.grid = [float(v) for v in self.grid]

    # ----------------------------------------------------------------- record

    def _grid_record(self) -> dict[str, Any]:
        if self.grid is None:
            return {"grid": None, "grid_values": None, "grid_rule": None}
        grid = metrics.peer_grid(self.grid)
        values = grid.values
        name = self.grid.lower() if isinstance(self.grid, str) else list(self.grid)
        return {
            "grid": name,
            "grid_values": f"{values.size} thresholds from {values[0]:g} to {values[-1]:g}",
            "grid_rule": grid.describe(),
        }

    def _rule(self) -> metrics.PeerGrid | None:
        """The comparison rule of the search (None: ours, map >= t)."""
        return None if self.mode == "exact" else metrics.peer_grid(self.grid)

    def _threshold_rule(self) -> tuple[str, str]:
        if self.mode == "exact":
            return (
                "prediction = map >= threshold (maps: higher = more anomalous); candidates: every distinct "
                "score value and one above the maximum (predict nothing)",
                "among equally good thresholds the highest is reported",
            )
        grid = metrics.peer_grid(self.grid)
        compare = "map > threshold" if grid.strict else "map >= threshold"
        extra = f"; scores >= {grid.saturate_at:g} always predicted" if grid.saturate_at is not None else ""
        extra += "; float32 maps compared with float32 thresholds" if grid.compare_in_map_dtype else ""
        return (
            f"prediction = {compare} (maps: higher = more anomalous); candidates: the grid; Dice = 2TP / (P + G + "
            f"{grid.eps:g}){extra} ({grid.source or 'custom grid'})",
            f"among equally good thresholds the {grid.tie} is reported",
        )

    def _bucket_record(self) -> dict[str, Any]:
        return {"bucket_threshold": "each bucket gets its own best threshold (max_dice_<bucket>)"}

    def parameters(self) -> dict[str, Any]:
        """Everything a result record must state about how the numbers were computed."""
        return {
            "name": self.name,
            "metric": self.metric,
            "mode": self.mode,
            **self._grid_record(),
            "threshold_rule": self._threshold_rule()[0],
            "tie_rule": self._threshold_rule()[1],
            "lesion_rule": "a lesion pixel is any non-zero mask pixel",
            "resolution": list(REFERENCE_RESOLUTION),
            "resolution_rule": "maps are evaluated at the test set's resolution (128 x 128 for the "
            "prepared sets); bucket edges are pixels at 128 x 128, scaled by (H * W) / 128^2 otherwise",
            "buckets": self.buckets.describe(),
            **self._bucket_record(),
            "empty_gt": self.empty_gt,
            "empty_gt_peers": dict(PEER_EMPTY_GT),
            "map_normalisation": self.map_normalisation,
            "map_normalisation_rule": "maps as given"
            if self.map_normalisation == "none"
            else "(map - min) / (max - min), min and max over all pixels of the evaluated test maps (IterMask2), "
            "before the brain mask; validation maps get the same affine map",
            "brain_mask": "maps multiplied by the brain mask before evaluation"
            if self.apply_brain_mask
            else "maps compared as given (no brain mask applied)",
            "apply_brain_mask": self.apply_brain_mask,
            "val_threshold": f"chosen on healthy validation maps only: flags at most {self.val_fpr:g} "
            "of in-brain validation pixels (dice_at_val_threshold)",
            "val_fpr": self.val_fpr,
            "auroc_auprc": "pooled over every test pixel; AUPRC = average precision (sklearn)",
            "slice_rule": self.slice_rule,
            "normalisation": self.normalisation,
            "data_setting": self.data_setting,
            **self._extra_parameters(),
        }

    def _extra_parameters(self) -> dict[str, Any]:
        return {}

    def settings(self) -> dict[str, Any]:
        """The dataclass fields (what ``get_protocol(name, **settings)`` accepts)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # ----------------------------------------------------------------- data

    def modalities(self, data: SliceSet) -> list[str]:
        raise NotImplementedError

    def check_data(self, data: SliceSet) -> None:
        """Raise :class:`ProtocolDataError` saying why ``data`` does not fit this protocol."""
        prepared_for = data.manifest.get("protocols")
        if prepared_for is not None and self.name not in prepared_for:
            source = data.manifest.get("source", "unknown source")
            what = data.manifest.get("protocol", "another use")
            raise ProtocolDataError(
                f"{self.name}: this set ({source}) was prepared for {what} and fits protocol(s) "
                f"{', '.join(prepared_for) or 'none on its own'}; see docs/data-preparation.md for the {self.name} preparation"
            )
        self.modalities(data)  # raises when no evaluated modality is present
        splits = set(data.table["split"].astype(str))
        if "test" not in splits:
            raise ProtocolDataError(f"{self.name}: the data has no 'test' split (splits present: {sorted(splits)})")
        if "train" not in splits:
            raise ProtocolDataError(f"{self.name}: the data has no 'train' split of healthy slices")
        test_areas = data.table.loc[data.table["split"] == "test", "lesion_area"].to_numpy(dtype=np.float64)
        if not np.any(test_areas > self._min_lesion_area(data.resolution)):
            raise ProtocolDataError(
                f"{self.name}: no test slice has a lesion larger than "
                f"{_fmt(self._min_lesion_area(data.resolution))} pixels; the protocol needs test lesions"
            )

    def _min_lesion_area(self, resolution: tuple[int, int]) -> float:
        """Test images with at most this many lesion pixels are not evaluated."""
        return 0.0

    def select_test(self, test: SliceSet) -> SliceSet:
        """The test slices this protocol evaluates (default: all of them)."""
        return test

    # ----------------------------------------------------------------- evaluation

    def _as_maps(self, maps: Any, masks: np.ndarray, what: str = "maps") -> np.ndarray:
        """``N x H x W`` maps checked against the masks (float32, or float64 if given so)."""
        arr = metrics._to_numpy(maps)
        if arr.ndim == 4 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.shape != masks.shape:
            raise ValueError(f"{self.name}: {what} have shape {arr.shape}, expected N x H x W = {masks.shape}")
        arr = np.asarray(arr, dtype=np.float64 if arr.dtype == np.float64 else np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{self.name}: {what} contain NaN or infinite values; anomaly maps must be finite")
        return arr

    def _map_scale(self, maps: np.ndarray) -> tuple[float, float] | None:
        """(min, max) of the evaluated test maps when they are min-max normalised, else None."""
        if self.map_normalisation == "none":
            return None
        return float(maps.min()), float(maps.max())

    def _transform(self, maps: np.ndarray, brain_masks: Any | None, scale: tuple[float, float] | None) -> np.ndarray:
        """Normalisation (with the test set's scale), then the brain mask, as configured."""
        if scale is not None:
            low, high = scale
            # IterMask2 normalises float64 arrays; a constant test set has no scale: all 0
            maps = (maps.astype(np.float64) - low) / (high - low) if high > low else np.zeros(maps.shape)
        if self.apply_brain_mask and brain_masks is not None:
            maps = maps * (np.asarray(brain_masks) != 0)
        return maps

    def _prepare(self, maps: np.ndarray, brain_masks: Any | None) -> tuple[np.ndarray, dict[str, Any]]:
        """Evaluated test maps after normalisation and brain mask, and the notes they imply."""
        scale = self._map_scale(maps)
        notes: dict[str, Any] = {"map_scale": list(scale) if scale is not None else None}
        return self._transform(maps, brain_masks, scale), notes

    def _search(self) -> dict[str, Any]:
        return {"mode": self.mode, "grid": self.grid}

    def evaluate(self, maps: Any, test: SliceSet, val_maps: Any | None = None, val_brain_masks: Any | None = None) -> EvaluationResult:
        raise NotImplementedError

    def _resolution_notes(self, test: SliceSet) -> dict[str, Any]:
        """Evaluation resolution and the bucket edges it implies, for the record's notes."""
        return {
            "resolution": list(test.resolution),
            "bucket_scale": SizeBuckets.scale(test.resolution),
            "buckets_px": self.buckets.describe(test.resolution),
        }

    def _per_image_frame(self, test: SliceSet, keep: np.ndarray, areas: np.ndarray, buckets: np.ndarray, maps: np.ndarray) -> pd.DataFrame:
        table = test.table.iloc[np.flatnonzero(keep)]
        return pd.DataFrame(
            {
                "index": np.flatnonzero(keep),
                "subject_id": table["subject_id"].astype(str).to_numpy(),
                "slice_index": table["slice_index"].to_numpy(),
                "lesion_area": areas,
                "bucket": [b if b is not None else "" for b in buckets],
                "max_score": maps.reshape(maps.shape[0], -1).max(axis=1),
            }
        )


def val_threshold_metrics(
    protocol: Protocol,
    val_maps: Any,
    val_brain_masks: Any | None,
    maps: np.ndarray,
    masks: np.ndarray,
    per_image: bool,
    scale: tuple[float, float] | None = None,
) -> tuple[dict[str, float], dict[str, Any], float]:
    """Dice on the (prepared) test maps at a threshold chosen on healthy validation maps only.

    The validation maps get the test maps' normalisation (``scale``) and brain mask; the
    Dice uses our rule (map >= threshold), the rule the threshold was chosen with.
    """
    brain = None if val_brain_masks is None else np.asarray(metrics._to_numpy(val_brain_masks))
    val = metrics._to_numpy(val_maps)
    if val.ndim == 4 and val.shape[1] == 1:
        val = val[:, 0]
    if brain is not None and brain.shape != val.shape:
        raise ValueError(f"{protocol.name}: val_brain_masks have shape {brain.shape}, val_maps {val.shape}")
    val = protocol._transform(np.asarray(val, dtype=np.float64 if val.dtype == np.float64 else np.float32), brain, scale)
    threshold = metrics.threshold_from_healthy(val, brain, fpr=protocol.val_fpr)
    dice = metrics.dice_at_threshold(maps, masks, threshold, per_image=per_image, empty_gt=protocol.empty_gt)
    notes = {
        "val_threshold_rule": f"smallest healthy validation score flagging at most {protocol.val_fpr:g} of "
        + ("in-brain validation pixels" if brain is not None else "all validation pixels (no brain masks given)"),
        "val_threshold_in_brain": brain is not None,
        "n_val_maps": int(val.shape[0]),
    }
    return {"dice_at_val_threshold": dice, "val_threshold": threshold}, notes, threshold
