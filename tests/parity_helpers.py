"""What the parity tests share: the fixtures made from the authors' code, and a stored perceptual map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from methods.common.perceptual import PerceptualDistance

FIXTURES = Path(__file__).parent / "fixtures" / "parity"


def load_fixture(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


def f32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32))


class FixedMap(PerceptualDistance):
    """Returns a stored raw perceptual map (the one the authors' pipeline used)."""

    name = "fixed"

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert self.value.shape[0] == x.shape[0] and self.value.shape[-2:] == x.shape[-2:]
        return self.value
