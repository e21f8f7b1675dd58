"""IterMask2's frequency mask: hp(x) keeps the FFT phase everywhere and the magnitude only at
high frequencies (ZiyunLiang/IterMask2, ``utils/train_util.py`` and ``models/test_model.py``).

The centred spectrum keeps its coefficients at distance >= ``radius`` from the centre
index ``(H // 2, W // 2)`` and gets magnitude 1 (phase kept) inside it; the image is the
real part of the inverse FFT. The radius is in frequency-index units, i.e. cycles per
field of view, so the same radius keeps the same band at any resolution.
"""

from __future__ import annotations

import torch


def low_frequency_disc(height: int, width: int, radius: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``H x W``: True where the centred spectrum lies within ``radius`` of the centre."""
    yy = torch.arange(height, device=device, dtype=torch.float64)[:, None] - height // 2
    xx = torch.arange(width, device=device, dtype=torch.float64)[None, :] - width // 2
    return torch.sqrt(yy**2 + xx**2) < radius


def high_pass_phase(x: torch.Tensor, radius: float = 15.0) -> torch.Tensor:
    """hp(x) for ``... x H x W`` real ``x``: unit magnitude, same phase, inside ``radius``."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(x if x.is_floating_point() else x.float()), dim=(-2, -1))
    inside = low_frequency_disc(x.shape[-2], x.shape[-1], radius, x.device)
    unit = torch.polar(torch.ones_like(spectrum.real), torch.angle(spectrum))
    spectrum = torch.where(inside, unit, spectrum)
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real.to(x.dtype)
