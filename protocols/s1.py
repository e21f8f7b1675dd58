"""S1, the THOR setting: global Max Dice overall and per lesion-size bucket.

Train on IXI T1 healthy mid-axial slices, test on ATLAS 2.0 mid-axial slices. Every pixel
of every test image is pooled and the threshold maximising Dice is searched (exactly, or
on THOR's grid with THOR's rule: ``mode="grid", grid="thor"``). Each size bucket gets its
own best threshold, as in THOR's evaluator, which runs each size range separately
(ci-ber/THOR_DDPM ``projects/thor/DownstreamEvaluatorAtlas.py``: ``start_task`` calls
``pathology_localization`` for (3, 71], (71, 570] and (570, 10000] lesion pixels). A lesion
pixel is any non-zero mask pixel (THOR: ``masks[masks > 0] = 1``); images with 0..3 lesion
pixels (at 128 x 128) are not evaluated (THOR: ``sum <= 3`` skipped). Maps are compared as
given by default (THOR's evaluator applies no brain mask).

Quirks of THOR's released code that this protocol does not copy (documented, not
options): its training CSV (``data/CAPS_IXI/splits/ixi-t1_atlas_train_2D.csv``) lists 218
ATLAS slice-95 images beside 465 IXI slices, so its "healthy" training set holds stroke
slices; its evaluator scores only a hard-coded list of 21 dataset indices (and skips 20
more "with large black artefacts"); its IXI slices are the registered but not
skull-stripped clinica ``t1-linear`` images (``..._space-MNI152NLin2009cSym_res-1x1x1_T1w``),
while ATLAS 2.0 is skull-stripped. Our S1 trains on healthy IXI only and scores every test
image with more than 3 lesion pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from datasets.format import SliceSet
from protocols import metrics
from protocols.base import (
    EvaluationResult,
    Protocol,
    ProtocolDataError,
    SizeBuckets,
    lesion_areas,
    val_threshold_metrics,
)


@dataclass
class S1Protocol(Protocol):
    """Global Max Dice (pooled pixels), per-bucket Max Dice, pixel AUROC / AUPRC; T1 only."""

    name: ClassVar[str] = "S1"
    metric: ClassVar[str] = "global Max Dice: all test pixels pooled, one threshold maximising Dice"
    buckets: ClassVar[SizeBuckets] = SizeBuckets((3.0, 71.0, 570.0, float("inf")), ("small", "medium", "large"), right=True)
    min_lesion_area: ClassVar[float] = 3.0  # pixels at 128 x 128; images with <= this are excluded
    slice_rule: ClassVar[str] = (
        "mid-axial slices: IXI T1 healthy for training; ATLAS 2.0 registered to MNI152 1 mm, "
        "slice index 95 of the 197-slice MNI grid, for testing; test images with 0..3 lesion "
        "pixels (at 128 x 128) are excluded"
    )
    normalisation: ClassVar[str] = "percentile normalisation, pad to square, resize to 128 x 128"
    data_setting: ClassVar[str] = "THOR setting: IXI (train, healthy) -> ATLAS 2.0 (test), T1"
    needs_val_maps: ClassVar[bool] = False

    def _extra_parameters(self) -> dict[str, Any]:
        return {
            "exclusion": f"test images with at most {self.min_lesion_area:g} lesion pixels at 128 x 128 "
            "(scaled by area at other resolutions) are excluded",
            "modalities": ["T1"],
            "peer_quirks_not_copied": [
                "THOR's training CSV holds 218 ATLAS slices beside 465 IXI slices; we train on IXI only",
                "THOR's evaluator scores a hard-coded subset of 21 test indices; we score every test image",
                "THOR's IXI slices keep the skull (ATLAS is skull-stripped)",
            ],
        }

    def _bucket_record(self) -> dict[str, Any]:
        return {
            "bucket_threshold": "each bucket gets its own best threshold (max_dice_<bucket>), as THOR's "
            "evaluator runs each size range separately"
        }

    def modalities(self, data: SliceSet) -> list[str]:
        if "T1" not in data.modalities:
            raise ProtocolDataError(f"S1 evaluates T1 only, and this set has no 'T1' channel (it has {data.modalities})")
        return ["T1"]

    def _min_lesion_area(self, resolution: tuple[int, int]) -> float:
        return self.min_lesion_area * SizeBuckets.scale(resolution)

    def _kept(self, masks: np.ndarray, resolution: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        areas = lesion_areas(masks)
        keep = areas > self._min_lesion_area(resolution)
        if not keep.any():
            raise ProtocolDataError(
                f"S1: no test image has more than {self._min_lesion_area(resolution):g} lesion pixels; nothing to evaluate"
            )
        return keep, areas

    def select_test(self, test: SliceSet) -> SliceSet:
        """Drop test images with 0..3 lesion pixels (scaled by area off 128 x 128)."""
        keep, _ = self._kept(np.asarray(test.lesion_masks), test.resolution)
        return test if keep.all() else test.subset(np.flatnonzero(keep))

    def evaluate(self, maps: Any, test: SliceSet, val_maps: Any | None = None, val_brain_masks: Any | None = None) -> EvaluationResult:
        """Metrics on ``maps`` (N x H x W, aligned with ``test``); excluded images are dropped here too."""
        masks = np.asarray(test.lesion_masks)
        arr = self._as_maps(maps, masks)
        keep, areas = self._kept(masks, test.resolution)
        arr, masks, areas = arr[keep], masks[keep], areas[keep]
        brain = None if test.brain_masks is None else np.asarray(test.brain_masks)[keep]
        arr, map_notes = self._prepare(arr, brain)
        buckets = self.buckets.assign(areas, test.resolution)
        rule = self._rule()

        best = metrics.global_max_dice(arr, masks, **self._search())
        out: dict[str, float] = {"max_dice": best.dice, "threshold": best.threshold, "n_images": float(len(arr))}
        per_image = self._per_image_frame(test, keep, areas, buckets, arr)
        per_image["dice_at_best_threshold"] = metrics.per_image_dice(arr, masks, best.threshold, self.empty_gt, rule)
        per_image["dice_at_bucket_threshold"] = np.nan
        for label in self.buckets.labels:
            rows = np.flatnonzero(buckets == label)
            out[f"n_{label}"] = float(rows.size)
            if rows.size == 0:
                out[f"max_dice_{label}"] = out[f"threshold_{label}"] = float("nan")
                continue
            bucket_best = metrics.global_max_dice(arr[rows], masks[rows], **self._search())
            out[f"max_dice_{label}"], out[f"threshold_{label}"] = bucket_best
            per_image.loc[rows, "dice_at_bucket_threshold"] = metrics.per_image_dice(
                arr[rows], masks[rows], bucket_best.threshold, self.empty_gt, rule
            )
        out["auroc"] = metrics.pixel_auroc(arr, masks)
        out["auprc"] = metrics.pixel_auprc(arr, masks)

        notes: dict[str, Any] = {**self._resolution_notes(test), "n_excluded": int((~keep).sum()), **map_notes}
        if val_maps is not None:
            scale = None if map_notes["map_scale"] is None else tuple(map_notes["map_scale"])
            val_out, val_notes, _ = val_threshold_metrics(self, val_maps, val_brain_masks, arr, masks, per_image=False, scale=scale)
            out.update(val_out)
            notes.update(val_notes)
        return EvaluationResult(metrics=out, per_image=per_image, notes=notes)
