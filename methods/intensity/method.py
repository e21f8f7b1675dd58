"""The untrained intensity floor (Meissen, Kaissis and Rueckert, "Challenging current
semi-supervised anomaly segmentation methods for brain MRI", MICCAI BrainLes 2021).

No network and no training: the anomaly map of a slice is its own intensity inside the
brain, zero outside. Meissen et al. showed that thresholding the FLAIR intensity this way
beats the autoencoders of Baur et al.'s comparative study on BraTS; every learned method
has to beat this floor before its map says more than "bright is abnormal".

The authors' code (github.com/FeliMe/brain_sas_baseline, ``baseline.py``) uses the FLAIR
volume itself as the map (``anomaly_maps = torch.cat(ds.samples, 0)``), after a histogram
equalisation of the whole volume (``utils/utils.py``, ``histogram_equalization``) and
followed by a 3-D connected-component filter of the binarised map. Here, as in the rest
of the suite, maps are scored slice by slice on the prepared intensities as they are:
no equalisation (a per-volume step a slice-based method cannot reproduce) and no
post-processing.

Lesions that are darker than tissue (T1 and T1CE: stroke lesions, oedema and necrosis
are hypointense on T1-weighted images; only the enhancing rim is bright on T1CE) need
the opposite sign. ``sign`` chooses it: ``bright`` (map = x), ``dark`` (map = r - x,
with r the largest brain intensity of the healthy training slices, so brain pixels stay
>= 0 = the background's value and the ranking inside the brain is the negative
intensity; brighter pixels are clipped to 0), or ``auto`` (``dark`` for the modalities in
``dark_modalities``, else ``bright``). The modality is read from the training set
(``SliceSet.modalities``; the runner fits one modality per job). The sign used is recorded
in the method's notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from datasets.format import SliceSet
from methods.base import ConfigError, MethodConfig, UADMethod, inference_field
from methods.registry import register_method

SIGNS = ("auto", "bright", "dark")


@dataclass
class IntensityConfig(MethodConfig):
    sign: str = inference_field("auto")  # auto | bright | dark
    dark_modalities: tuple[str, ...] = inference_field(("T1", "T1CE"))  # used by sign="auto"


@register_method("intensity")
class IntensityFloor(UADMethod):
    """Map = intensity in the brain (or r - intensity for dark lesions); nothing is learned."""

    Config = IntensityConfig
    config: IntensityConfig
    # No sizes or steps to shrink: every profile is the same algorithm.
    profiles = {"paper": {}, "quick": {}, "tiny": {}}

    def __init__(self, config: IntensityConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.modalities_: list[str] = []
        self.reference_: list[float] = []  # per channel: largest healthy brain intensity

    def _build(self) -> None:
        pass  # nothing to build

    def networks(self) -> dict[str, nn.Module]:
        return {}

    def cost_plan(self, n_train: int, n_val: int):
        from methods.cost import CostPlan

        return CostPlan(notes=["no network: the map is the intensity"])

    def _fit(self, train: SliceSet, val: SliceSet | None) -> None:
        self.modalities_ = list(train.modalities)
        images = np.asarray(train.images, dtype=np.float32)
        brain = np.asarray(train.brain_masks) > 0
        self.reference_ = [float(images[:, c][brain].max()) if brain.any() else 0.0 for c in range(images.shape[1])]
        self._record_signs()

    def signs(self) -> list[str]:
        """The sign applied to each channel ('bright' or 'dark')."""
        sign = self.config.sign
        if sign not in SIGNS:
            raise ConfigError(f"intensity: sign must be one of {', '.join(SIGNS)}, got {sign!r}")
        if sign != "auto":
            return [sign] * len(self.modalities_)
        dark = set(self.config.dark_modalities)
        return ["dark" if m in dark else "bright" for m in self.modalities_]

    def _record_signs(self) -> None:
        self.notes = {
            "sign": dict(zip(self.modalities_, self.signs())),
            "dark_reference": dict(zip(self.modalities_, self.reference_)),
            "map": "intensity in the brain ('bright'), or dark_reference - intensity clipped at 0 ('dark'); zero outside",
        }

    def _score_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        self._record_signs()  # the sign is an inference knob: keep the notes in step with it
        maps = []
        for c, sign in enumerate(self.signs()):
            x = images[:, c]
            maps.append(x if sign == "bright" else (self.reference_[c] - x).clamp_min(0.0))
        out = torch.stack(maps).mean(dim=0)  # one channel per job in the runner: the mean is that channel
        return out * (brain_masks > 0)

    def extra_state(self) -> dict[str, Any]:
        return {"modalities": self.modalities_, "reference": self.reference_}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.modalities_ = list(state.get("modalities", []))
        self.reference_ = [float(v) for v in state.get("reference", [])]
