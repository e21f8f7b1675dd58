"""S2, the IterMask2 setting: per-image Max Dice with one shared threshold, per modality.

BraTS'21 split by subject 990/128/133; axial slices 70..89; training uses tumour-free
slices; each test subject contributes its slice (in 70..89) with the largest tumour. One
threshold, shared by every test image, is chosen to maximise the mean per-image Dice
(exactly, or on IterMask2's k/10000 grid). Each size bucket gets its own best threshold.
The Dice at a threshold chosen on healthy validation maps only is reported next to it.
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

#: Modalities S2 evaluates, each with its own model, in this order.
S2_MODALITIES = ("T1", "T1CE", "T2", "FLAIR")


@dataclass
class S2Protocol(Protocol):
    """Per-image Max Dice (shared threshold), per-bucket, AUROC / AUPRC, healthy-val operating point."""

    name: ClassVar[str] = "S2"
    metric: ClassVar[str] = "per-image Max Dice: one threshold shared by all test images maximising the mean per-image Dice"
    buckets: ClassVar[SizeBuckets] = SizeBuckets((0.0, 200.0, 800.0, float("inf")), ("small", "medium", "large"), right=False)
    slice_rule: ClassVar[str] = (
        "BraTS'21, 1251 subjects split by subject 990/128/133 (fixed, seeded CSV); axial slices 70..89; "
        "training uses only slices without tumour; test uses, per subject, the slice in 70..89 with the "
        "largest tumour (applied when the set is prepared; every test slice given is evaluated)"
    )
    normalisation: ClassVar[str] = (
        "resize to 128 x 128 (area); intensities scaled per volume by the brain 90th percentile, "
        "background set to a constant"
    )
    data_setting: ClassVar[str] = "IterMask2 setting: BraTS'21, per-modality models (T1, T1CE, T2, FLAIR)"
    needs_val_maps: ClassVar[bool] = True

    def _extra_parameters(self) -> dict[str, Any]:
        return {"modalities": list(S2_MODALITIES), "modality_rule": "each of T1, T1CE, T2, FLAIR present, evaluated separately"}

    def modalities(self, data: SliceSet) -> list[str]:
        present = [m for m in S2_MODALITIES if m in data.modalities]
        if not present:
            raise ProtocolDataError(
                f"S2 evaluates {', '.join(S2_MODALITIES)} (one model each); this set has none of them "
                f"(its channels are {data.modalities})"
            )
        return present

    def evaluate(self, maps: Any, test: SliceSet, val_maps: Any | None = None, val_brain_masks: Any | None = None) -> EvaluationResult:
        """Metrics on ``maps`` (N x H x W, aligned with ``test``); ``val_maps`` are healthy validation maps."""
        masks = np.asarray(test.lesion_masks)
        arr = self._as_maps(maps, masks, test.brain_masks)
        areas = lesion_areas(masks)
        keep = np.ones(len(arr), dtype=bool)
        buckets = self.buckets.assign(areas, test.resolution)
        search = dict(self._search(), empty_gt=self.empty_gt)

        best = metrics.per_image_max_dice(arr, masks, **search)
        out: dict[str, float] = {"max_dice": best.dice, "threshold": best.threshold, "n_images": float(len(arr))}
        per_image = self._per_image_frame(test, keep, areas, buckets, arr)
        per_image["dice_at_best_threshold"] = metrics.per_image_dice(arr, masks, best.threshold, self.empty_gt)
        per_image["dice_at_bucket_threshold"] = np.nan
        for label in self.buckets.labels:
            rows = np.flatnonzero(buckets == label)
            out[f"n_{label}"] = float(rows.size)
            if rows.size == 0 or (self.empty_gt == "exclude" and not masks[rows].any()):
                out[f"max_dice_{label}"] = out[f"threshold_{label}"] = float("nan")
                continue
            bucket_best = metrics.per_image_max_dice(arr[rows], masks[rows], **search)
            out[f"max_dice_{label}"], out[f"threshold_{label}"] = bucket_best
            per_image.loc[rows, "dice_at_bucket_threshold"] = metrics.per_image_dice(
                arr[rows], masks[rows], bucket_best.threshold, self.empty_gt
            )
        out["auroc"] = metrics.pixel_auroc(arr, masks)
        out["auprc"] = metrics.pixel_auprc(arr, masks)

        notes: dict[str, Any] = {**self._resolution_notes(test), "n_empty_gt": int((areas == 0).sum())}
        if val_maps is not None:
            val_out, val_notes, threshold = val_threshold_metrics(self, val_maps, val_brain_masks, arr, masks, per_image=True)
            out.update(val_out)
            notes.update(val_notes)
            per_image["dice_at_val_threshold"] = metrics.per_image_dice(arr, masks, threshold, self.empty_gt)
        return EvaluationResult(metrics=out, per_image=per_image, notes=notes)
