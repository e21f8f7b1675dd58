"""S2, the IterMask2 setting: per-image Max Dice with one shared threshold, per modality.

BraTS'21 split by subject 990/128/133; axial slices 70..89; training uses tumour-free
slices; each test subject contributes its slice (in 70..89) with the largest tumour. One
threshold, shared by every test image, is chosen to maximise the mean per-image Dice
(exactly by default, or with IterMask2's evaluator: ``mode="grid", grid="itermask2",
map_normalisation="minmax_test_set"``). The Dice at a threshold chosen on healthy
validation maps only is reported next to it.

What IterMask2's ``test.py`` (ZiyunLiang/IterMask2) does, and where we stand:

- maps: ``normalize((x - y) ** 2) * brain_mask``, a min-max over the whole test set, then
  the brain mask. The brain mask is applied by default here (``apply_brain_mask=True``);
  the min-max is ``map_normalisation="minmax_test_set"`` (off by default: the exact search
  does not need maps in [0, 1]). Their brain mask is the area-resized 240 -> 128 mask,
  fractional at the brain's edge; the prediction ``(t < map) * brain`` is cast to int in
  ``dice_score``, so edge pixels with a brain fraction below 1 are never predicted. Our
  brain masks are binary (set when the data are prepared): edge pixels count in full.
- threshold: ``thres / 10000 < error_map`` for ``thres`` in ``range(100)`` (100 values up
  to 0.0099), the first maximum of the mean per-image Dice (``np.argmax``).
- buckets (tumour pixels at 128 x 128: small < 200, medium 200..799, large >= 800) are
  scored at that one global threshold: ``dice_<bucket>_at_global`` here. Next to it,
  ``max_dice_<bucket>`` gives each bucket its own best threshold (THOR's convention).
- empty ground truth: their ``dice_score`` gives NaN (0 / 0) for an empty prediction;
  ours is explicit (``empty_gt``) and recorded. Their test set has no such image.
- intensities (their preprocessing, ``datasets/brats_preprocess.py``): 6 x / p90 - 3 per
  volume (p90 = the brain's 90th percentile; background -3), then area resize to 128 x
  128. Ours: x / p90, background 0 (``normalisation`` below); a tumour pixel is a resized
  segmentation value > 0.
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

    # IterMask2 always multiplies the maps by the brain mask before thresholding.
    apply_brain_mask: bool = True

    def _extra_parameters(self) -> dict[str, Any]:
        return {"modalities": list(S2_MODALITIES), "modality_rule": "each of T1, T1CE, T2, FLAIR present, evaluated separately"}

    def _bucket_record(self) -> dict[str, Any]:
        return {
            "bucket_threshold": "max_dice_<bucket>: each bucket gets its own best threshold; "
            "dice_<bucket>_at_global: the bucket's mean per-image Dice at the one global best threshold (IterMask2)",
            "bucket_metrics": {
                "max_dice_<bucket>": "per-bucket threshold",
                "dice_<bucket>_at_global": "global threshold (IterMask2's test.py)",
            },
        }

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
        arr, map_notes = self._prepare(self._as_maps(maps, masks), test.brain_masks)
        areas = lesion_areas(masks)
        keep = np.ones(len(arr), dtype=bool)
        buckets = self.buckets.assign(areas, test.resolution)
        search = dict(self._search(), empty_gt=self.empty_gt)
        rule = self._rule()

        best = metrics.per_image_max_dice(arr, masks, **search)
        out: dict[str, float] = {"max_dice": best.dice, "threshold": best.threshold, "n_images": float(len(arr))}
        per_image = self._per_image_frame(test, keep, areas, buckets, arr)
        per_image["dice_at_best_threshold"] = at_best = metrics.per_image_dice(arr, masks, best.threshold, self.empty_gt, rule)
        per_image["dice_at_bucket_threshold"] = np.nan
        for label in self.buckets.labels:
            rows = np.flatnonzero(buckets == label)
            out[f"n_{label}"] = float(rows.size)
            kept = at_best[rows][~np.isnan(at_best[rows])]
            out[f"dice_{label}_at_global"] = float(kept.mean()) if kept.size else float("nan")
            if rows.size == 0 or (self.empty_gt == "exclude" and not masks[rows].any()):
                out[f"max_dice_{label}"] = out[f"threshold_{label}"] = float("nan")
                continue
            bucket_best = metrics.per_image_max_dice(arr[rows], masks[rows], **search)
            out[f"max_dice_{label}"], out[f"threshold_{label}"] = bucket_best
            per_image.loc[rows, "dice_at_bucket_threshold"] = metrics.per_image_dice(
                arr[rows], masks[rows], bucket_best.threshold, self.empty_gt, rule
            )
        out["auroc"] = metrics.pixel_auroc(arr, masks)
        out["auprc"] = metrics.pixel_auprc(arr, masks)

        notes: dict[str, Any] = {**self._resolution_notes(test), "n_empty_gt": int((areas == 0).sum()), **map_notes}
        if val_maps is not None:
            scale = None if map_notes["map_scale"] is None else tuple(map_notes["map_scale"])
            val_out, val_notes, threshold = val_threshold_metrics(
                self, val_maps, val_brain_masks, arr, masks, per_image=True, scale=scale
            )
            out.update(val_out)
            notes.update(val_notes)
            per_image["dice_at_val_threshold"] = metrics.per_image_dice(arr, masks, threshold, self.empty_gt)
        return EvaluationResult(metrics=out, per_image=per_image, notes=notes)
