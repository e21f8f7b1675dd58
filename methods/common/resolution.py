"""Running a network at a fixed internal resolution (``config.image_size``) whatever the data's."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class InternalResolution:
    """Mixin for methods whose config has ``image_size`` (None: the data's own H x W).

    Inputs are area-resampled to the internal size; ``input_shape_`` is set by ``fit``/``load``.
    """

    def _internal_size(self) -> tuple[int, int]:
        _, h, w = self.input_shape_  # type: ignore[attr-defined]
        size = self.config.image_size  # type: ignore[attr-defined]
        return (h, w) if size is None else (size, size)

    def _to_internal(self, x: torch.Tensor) -> torch.Tensor:
        size = self._internal_size()
        return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="area")
