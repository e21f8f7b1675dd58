"""Dense convolutional autoencoder baseline (Baur et al., "Autoencoders for unsupervised
anomaly segmentation in brain MR images: a comparative study", MedIA 2021).

The network as the authors built it (StefanDenn3r/Unsupervised_Anomaly_Detection_Brain_MRI
at 3e413c0: ``models/autoencoder.py``, ``models/customlayers.py``, ``run.py``,
``trainers/AE.py``):

* encoder: four 5x5 convolutions with stride 2 (32, 64, 128, 128 channels), each followed
  by batch norm and LeakyReLU (Keras' default slope 0.3), 128 x 128 -> 8 x 8;
* bottleneck: a 1x1 convolution reducing the channels 8-fold (128 -> 16), flatten, a
  dense layer to the 128-dim latent, dropout 0.2, a dense layer back, dropout 0.2,
  reshape, a 1x1 convolution restoring the 128 channels;
* decoder: batch norm and ReLU, four 5x5 transposed convolutions with stride 2 (128, 64,
  32, 32 channels) with batch norm and LeakyReLU, and a final 1x1 convolution to the
  input channels with no activation (the output follows intensities above 1, e.g. S2's
  90th-percentile units: nothing assumes a [0, 1] range);
* training: L1 reconstruction loss, Adam 1e-4, batch 128 (the paper's; ``run.py``'s
  command-line default is 8), the weights of the best validation loss kept (their
  trainer early-stops on the validation loss).

Map = ``|x - x_hat|`` (channel mean), zero outside the brain.

Departures: the L1 loss is averaged over pixels (theirs sums over pixels, averages over
the batch: the same direction, which Adam's scale invariance makes nearly irrelevant);
a fixed epoch budget (``epochs``) with the best-validation weights instead of their
early stopping; dropout is active in training only (as theirs; their Monte-Carlo
variant is not offered).

GPU execution (``methods.common.accel``; no-ops on the CPU): prefetched batches, bf16
autocast of the forward passes in training (``train_amp``; the L1 in float32), the losses
kept on the device and read back every ``log_every`` steps (a non-finite loss stops the
run), ``compile`` and ``channels_last`` for the training forward passes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasets.format import SliceSet
from methods.base import DRY_RUN_BATCH, ConfigError, MethodConfig, UADMethod
from methods.common.accel import compile_forward, prefetch_epoch, to_channels_last, train_autocast
from methods.common.loss_meter import LossMeter
from methods.common.resolution import InternalResolution
from methods.progress import progress_bar
from methods.registry import register_method


@dataclass
class AEConfig(MethodConfig):
    channels: tuple[int, ...] = (32, 64, 128, 128)  # encoder: min(128, 32 * 2**i)
    decoder_channels: tuple[int, ...] = (128, 64, 32, 32)  # decoder: max(32, 128 / 2**i)
    kernel_size: int = 5
    latent_dim: int = 128
    bottleneck_reduction: int = 8  # 1x1 convolution to channels[-1] // 8 before the dense layer
    dropout: float = 0.2
    leaky_slope: float = 0.3  # Keras' LeakyReLU default
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 100
    keep_best: bool = True  # keep the weights of the best validation L1 (checked every epoch)
    image_size: int | None = None  # internal resolution; None = the data's (maps are resampled back)


def _conv_block(c_in: int, c_out: int, k: int, slope: float) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride=2, padding=k // 2), nn.BatchNorm2d(c_out), nn.LeakyReLU(slope))


def _deconv_block(c_in: int, c_out: int, k: int, slope: float) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, k, stride=2, padding=k // 2, output_padding=1),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(slope),
    )


class DenseAutoEncoder(nn.Module):
    """Conv encoder -> 1x1 reduction -> dense bottleneck (dropout) -> 1x1 expansion -> deconv decoder -> 1x1 head."""

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        channels: tuple[int, ...],
        kernel_size: int,
        latent_dim: int,
        decoder_channels: tuple[int, ...] | None = None,
        reduction: int = 8,
        dropout: float = 0.2,
        slope: float = 0.3,
    ):
        super().__init__()
        decoder_channels = tuple(decoder_channels or reversed(channels))
        if len(decoder_channels) != len(channels):
            raise ValueError(f"AE: decoder_channels {decoder_channels} must have as many levels as channels {channels}")
        factor = 2 ** len(channels)
        if image_size[0] % factor or image_size[1] % factor:
            raise ValueError(f"AE: image size {image_size} must be divisible by {factor} (2 ** number of conv levels)")
        self.grid = (image_size[0] // factor, image_size[1] // factor)
        widths = (in_channels, *channels)
        self.encoder = nn.Sequential(*[_conv_block(a, b, kernel_size, slope) for a, b in zip(widths[:-1], widths[1:])])
        self.reduced = max(1, channels[-1] // reduction)
        self.reduce = nn.Conv2d(channels[-1], self.reduced, 1)
        flat = self.reduced * self.grid[0] * self.grid[1]
        self.to_latent = nn.Linear(flat, latent_dim)
        self.from_latent = nn.Linear(latent_dim, flat)
        self.dropout = nn.Dropout(dropout)
        self.expand = nn.Conv2d(self.reduced, channels[-1], 1)
        dec_widths = (channels[-1], *decoder_channels)
        self.decoder = nn.Sequential(
            nn.BatchNorm2d(channels[-1]),
            nn.ReLU(),
            *[_deconv_block(a, b, kernel_size, slope) for a, b in zip(dec_widths[:-1], dec_widths[1:])],
        )
        self.head = nn.Conv2d(decoder_channels[-1], in_channels, 1)  # no activation: any intensity range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.reduce(self.encoder(x))
        z = self.dropout(self.to_latent(h.flatten(1)))
        h = self.dropout(self.from_latent(z)).view(x.shape[0], self.reduced, *self.grid)
        return self.head(self.decoder(self.expand(h)))


@register_method("ae")
class AutoEncoder(InternalResolution, UADMethod):
    """Baur et al.'s dense autoencoder; map = |x - x_hat| inside the brain."""

    Config = AEConfig
    config: AEConfig
    profiles = {
        "paper": {},
        # Same architecture at half the width and 64 px: trains in about a minute per model on 2 CPU cores.
        "quick": {
            "epochs": 40,
            "batch_size": 16,
            "lr": 1e-3,
            "channels": (16, 32, 64, 64),
            "decoder_channels": (64, 32, 16, 16),
            "image_size": 64,
        },
        # For the conformance test: seconds on a CPU, same architecture family.
        "tiny": {
            "epochs": 2,
            "batch_size": 4,
            "channels": (8, 16, 16, 16),
            "decoder_channels": (16, 16, 8, 8),
            "latent_dim": 16,
            "image_size": 32,
        },
    }

    @classmethod
    def dry_run_overrides(cls, config: MethodConfig) -> dict[str, Any]:
        """One epoch of batch 2 (a dry run's training set holds a few slices), validated as usual."""
        return {**super().dry_run_overrides(config), "epochs": 1, "batch_size": DRY_RUN_BATCH}

    def _build(self) -> None:
        cfg = self.config
        if not 0.0 <= cfg.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {cfg.dropout}")
        c = self.input_shape_[0]  # type: ignore[index]
        self.model = DenseAutoEncoder(
            c,
            self._internal_size(),
            tuple(cfg.channels),
            cfg.kernel_size,
            cfg.latent_dim,
            decoder_channels=tuple(cfg.decoder_channels),
            reduction=cfg.bottleneck_reduction,
            dropout=cfg.dropout,
            slope=cfg.leaky_slope,
        ).to(self.device)

    def networks(self) -> dict[str, nn.Module]:
        return {"autoencoder": self.model}

    def cost_plan(self, n_train: int, n_val: int):
        from methods.cost import CostPlan, Evaluations, Stage, epoch_phase

        cfg, c, (h, w) = self.config, int(self.input_shape_[0]), self._internal_size()  # type: ignore[index]
        stage = Stage("autoencoder", "autoencoder", lambda: self.model(torch.zeros(1, c, h, w, device=self.device)))
        plan = CostPlan(stages=[stage], score=[Evaluations("autoencoder", 1)])
        plan.train.append(epoch_phase("autoencoder", cfg.epochs, n_train, cfg.batch_size, drop_last=True, what="epochs"))
        if cfg.keep_best and n_val > 0:
            plan.fit_forward.append(Evaluations("autoencoder", cfg.epochs * n_val, f"validation: {cfg.epochs} epochs x {n_val} slices"))
        return plan

    def _recon_l1(self, forward, x: torch.Tensor) -> torch.Tensor:
        """Mean L1 between ``x`` and its reconstruction (forward under bf16 autocast on CUDA, the L1 in float32)."""
        with train_autocast(x.device, self.config.train_amp):
            recon = forward(x)
        return (recon.float() - x).abs().mean()

    def _l1(self, data: SliceSet) -> float:
        """Mean L1 reconstruction error over ``data`` (eval mode; read back once)."""
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for start in range(0, len(data), self.config.batch_size):
                x = self._to_internal(torch.from_numpy(np.asarray(data.images[start : start + self.config.batch_size], dtype=np.float32)).to(self.device))
                total += self._recon_l1(self.model, x).double() * x.shape[0]
        return float(total) / max(len(data), 1)

    def _fit(self, train: SliceSet, val: SliceSet | None) -> None:
        cfg = self.config
        self._build()
        device = self.device
        forward = compile_forward(to_channels_last(self.model, device, cfg.channels_last), device, cfg.compile)
        optimiser = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        generator = torch.Generator().manual_seed(cfg.seed)
        batch = min(cfg.batch_size, len(train))
        best: tuple[float, int, dict] | None = None
        bar = progress_bar(range(cfg.epochs), desc="fit ae", unit="epoch")

        def read(index: np.ndarray) -> tuple[np.ndarray]:
            return (np.asarray(train.images[index], dtype=np.float32),)

        meter = LossMeter("ae", device, names=("l1",))
        step = 0
        for epoch in bar:
            self.model.train()
            order = list(self.iterate_minibatches(len(train), batch, generator, drop_last=True))
            for index, (images,) in prefetch_epoch(read, order, device):
                loss = self._recon_l1(forward, self._to_internal(images))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                meter.add(loss, weight=len(index))
                step += 1
                if step % cfg.log_every == 0:  # the only host sync of the loop
                    bar.set_postfix(meter.postfix(meter.read(step)))
            if cfg.keep_best and val is not None and len(val) > 0:
                val_l1 = self._l1(val)
                if best is None or val_l1 < best[0]:
                    best = (val_l1, epoch, copy.deepcopy(self.model.state_dict()))
        meter.read(step)  # the steps since the last read-out
        if best is not None:
            self.model.load_state_dict(best[2])
            self.notes["best_val_epoch"], self.notes["best_val_l1"] = best[1], best[0]
        self.model.eval()

    def _reconstruct_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        recon = self.model(self._to_internal(images))
        return recon if recon.shape == images.shape else F.interpolate(recon, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def _score_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        # The residual is taken at the input's resolution, against the upsampled restoration.
        return (images - self._reconstruct_batch(images, brain_masks)).abs().mean(dim=1)
