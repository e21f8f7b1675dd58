"""The device-side loss meter, and the divergence check it gives every training loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods.common.loss_meter import LossMeter
from methods.registry import create_method
from tests.conftest import tiny_training_splits


def test_read_gives_weighted_means_since_the_last_read_and_epochs_keep_their_own_sums() -> None:
    meter = LossMeter("run", "cpu", names=("loss", "mse"))
    meter.add(torch.tensor(1.0), torch.tensor(10.0), weight=1)
    meter.add(torch.tensor(4.0), torch.tensor(40.0), weight=2)
    assert meter.read(2) == pytest.approx({"loss": 3.0, "mse": 30.0})  # (1 + 8) / 3, (10 + 80) / 3
    assert meter.read(2) == {}  # nothing since the last read-out
    meter.add(torch.tensor(7.0), torch.tensor(70.0), weight=1)
    assert meter.read(3) == pytest.approx({"loss": 7.0, "mse": 70.0})
    epoch = meter.end_epoch()  # the epoch is not cut by the read-outs
    assert epoch.dtype == torch.float64 and epoch.tolist() == pytest.approx([4.0, 40.0])  # (1 + 8 + 7) / 4
    assert meter.end_epoch().tolist() == [0.0, 0.0]  # an empty epoch


def test_add_keeps_no_graph_and_checks_the_number_of_losses() -> None:
    w = torch.ones(2, requires_grad=True)
    meter = LossMeter("run", "cpu")
    meter.add((w * 3).sum())
    assert not meter.end_epoch().requires_grad
    with pytest.raises(ValueError, match="expected 1 loss"):
        meter.add(torch.tensor(1.0), torch.tensor(2.0))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_anywhere_in_the_window_fails_the_read_naming_run_and_step(bad: float) -> None:
    meter = LossMeter("fit thing", "cpu", names=("loss", "mask"))
    meter.add(torch.tensor(1.0), torch.tensor(bad))
    meter.add(torch.tensor(1.0), torch.tensor(2.0))  # a later finite loss does not hide it
    with pytest.raises(FloatingPointError, match=r"fit thing: the training loss is not finite \(mask .*\) by epoch 7"):
        meter.read(7, unit="epoch")


# One training loop per entry (the Liang trainer serves cyclunet and itermask2; madad runs its
# VAE loop first, then the denoiser's). A learning rate of 1e30 makes Adam's first update
# blow the weights up, so the loss turns NaN or inf within a step or two: what divergence
# looks like. Each loop must stop with the meter's error instead of training on.
_DIVERGING = {
    "ae": {"lr": 1e30},
    "dae": {"lr": 1e30},
    "ddpm": {"lr": 1e30},
    "cyclunet": {"lr": 1e30},
    "madad": {"lr": 1e30},  # the denoiser loop
    "madad-vae": {"vae_lr": 1e30, "vae_epochs": 2},  # tiny's one VAE step would end before its loss is hit
}


@pytest.mark.parametrize("case", sorted(_DIVERGING))
def test_every_training_loop_stops_when_its_loss_diverges(case: str) -> None:
    name = case.split("-")[0]
    train, val = tiny_training_splits(name)
    assert np.isfinite(np.asarray(train.images)).all()
    method = create_method(name, "tiny", device="cpu", **_DIVERGING[case])
    with pytest.raises(FloatingPointError, match="the training loss is not finite"):
        method.fit(train, val)
