"""Dense convolutional autoencoder baseline (Baur et al., "Autoencoders for unsupervised
anomaly segmentation in brain MR images: a comparative study", MedIA 2021).

Encoder: four 5x5 convolutions with stride 2 (32, 64, 128, 128 channels), a dense
bottleneck of 128 units; the decoder mirrors it with transposed convolutions. Trained with
an L1 reconstruction loss on healthy slices; the anomaly map is |x - x_hat| (mean over
channels), zero outside the brain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasets.format import SliceSet
from methods.base import MethodConfig, UADMethod
from methods.progress import progress_bar
from methods.registry import register_method


@dataclass
class AEConfig(MethodConfig):
    channels: tuple[int, ...] = (32, 64, 128, 128)
    kernel_size: int = 5
    latent_dim: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 100
    image_size: int | None = None  # internal resolution; None = the data's (maps are resampled back)


def _conv_block(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride=2, padding=k // 2), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))


def _deconv_block(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, k, stride=2, padding=k // 2, output_padding=1),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.2),
    )


class DenseAutoEncoder(nn.Module):
    """Conv encoder -> dense bottleneck -> transposed-conv decoder."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], channels: tuple[int, ...], kernel_size: int, latent_dim: int):
        super().__init__()
        factor = 2 ** len(channels)
        if image_size[0] % factor or image_size[1] % factor:
            raise ValueError(f"AE: image size {image_size} must be divisible by {factor} (2 ** number of conv levels)")
        self.grid = (image_size[0] // factor, image_size[1] // factor)
        widths = (in_channels, *channels)
        self.encoder = nn.Sequential(*[_conv_block(a, b, kernel_size) for a, b in zip(widths[:-1], widths[1:])])
        flat = channels[-1] * self.grid[0] * self.grid[1]
        self.to_latent = nn.Linear(flat, latent_dim)
        self.from_latent = nn.Linear(latent_dim, flat)
        rev = tuple(reversed(channels))
        self.decoder = nn.Sequential(*[_deconv_block(a, b, kernel_size) for a, b in zip(rev[:-1], rev[1:])])
        # Last level restores full resolution and the input channels; no activation, so the
        # output can follow intensities outside [0, 1] (e.g. BraTS's p90 scaling).
        self.head = nn.ConvTranspose2d(rev[-1], in_channels, kernel_size, stride=2, padding=kernel_size // 2, output_padding=1)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        z = self.to_latent(h.flatten(1))
        h = self.from_latent(z).view(x.shape[0], self.channels[-1], *self.grid)
        return self.head(self.decoder(h))


@register_method("ae")
class AutoEncoder(UADMethod):
    """Baur et al.'s dense autoencoder; map = |x - x_hat| inside the brain."""

    Config = AEConfig
    config: AEConfig
    profiles = {
        "paper": {},
        # Same architecture at half the width and 64 px: trains in about a minute per model on 2 CPU cores.
        "quick": {"epochs": 40, "batch_size": 16, "lr": 1e-3, "channels": (16, 32, 64, 64), "image_size": 64},
        # For the conformance test: seconds on a CPU, same architecture family.
        "tiny": {"epochs": 2, "batch_size": 4, "channels": (8, 16, 16, 16), "latent_dim": 16, "image_size": 32},
    }

    def _internal_size(self) -> tuple[int, int]:
        _, h, w = self.input_shape_  # type: ignore[misc]
        size = self.config.image_size
        return (h, w) if size is None else (size, size)

    def _to_internal(self, x: torch.Tensor) -> torch.Tensor:
        size = self._internal_size()
        return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="area")

    def _build(self) -> None:
        c = self.input_shape_[0]  # type: ignore[index]
        cfg = self.config
        self.model = DenseAutoEncoder(c, self._internal_size(), tuple(cfg.channels), cfg.kernel_size, cfg.latent_dim).to(self.device)

    def networks(self) -> dict[str, nn.Module]:
        return {"autoencoder": self.model}

    def _fit(self, train: SliceSet, val: SliceSet | None) -> None:
        cfg = self.config
        self._build()
        optimiser = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        generator = torch.Generator().manual_seed(cfg.seed)
        batch = min(cfg.batch_size, len(train))
        self.model.train()
        bar = progress_bar(range(cfg.epochs), desc="fit ae", unit="epoch")
        for _ in bar:
            total = 0.0
            for index in self.iterate_minibatches(len(train), batch, generator, drop_last=True):
                x = self._to_internal(torch.from_numpy(np.asarray(train.images[index], dtype=np.float32)).to(self.device))
                loss = (self.model(x) - x).abs().mean()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(index)
            bar.set_postfix(l1=f"{total / len(train):.4f}")

    def _reconstruct_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        recon = self.model(self._to_internal(images))
        return recon if recon.shape == images.shape else F.interpolate(recon, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def _score_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        # The residual is taken at the input's resolution, against the upsampled restoration.
        return (images - self._reconstruct_batch(images, brain_masks)).abs().mean(dim=1)
