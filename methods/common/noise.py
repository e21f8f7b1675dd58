"""Noise sources of the pixel diffusion baselines, seeded per slice at scoring time.

At scoring time every slice draws its noise from its own generator, seeded by
``(config.seed, index of the slice in the scored set)`` (``SliceGenerators``), so a
slice's anomaly map does not depend on which other slices share its batch. In training
one generator serves the whole batch. Draw helpers accept either.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch


class SliceGenerators:
    """One ``torch.Generator`` per slice of a batch, each seeded by (seed, the slice's index in the scored set).

    Noise drawn through ``per_slice`` gives slice ``i`` the same values whatever batch it
    is scored in. The generators live on the scoring device, so draws stay there.
    """

    def __init__(self, seed: int, indices: "list[int] | range", device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(slice_seed(seed, int(i))) for i in indices]

    def __len__(self) -> int:
        return len(self.generators)


def slice_seed(seed: int, index: int) -> int:
    """A 63-bit seed for slice ``index`` under run seed ``seed`` (distinct pairs give unrelated streams)."""
    return int(np.random.SeedSequence([int(seed) % 2**32, int(index)]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def per_slice(draw: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor], like: torch.Tensor, generator) -> torch.Tensor:
    """``draw(like, generator)``, or with ``SliceGenerators`` one draw per slice from its own generator."""
    if isinstance(generator, SliceGenerators):
        if len(generator) != like.shape[0]:
            raise ValueError(f"{len(generator)} slice generators for a batch of {like.shape[0]}")
        return torch.cat([draw(like[i : i + 1], g) for i, g in enumerate(generator.generators)])
    return draw(like, generator)


def gaussian_noise(like: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise like ``like``, from one generator or per slice (``SliceGenerators``)."""

    def draw(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        return torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)

    return per_slice(draw, like, generator)
