"""Training losses kept on the device, read back only at log-outs, with the divergence check.

``float(loss)`` after every step makes the host wait for the GPU once per step. Every
training loop therefore adds its losses to a ``LossMeter`` (float64 sums on the device) and
calls ``read`` every ``log_every`` steps and at the end: that is the loop's only host sync.
A sum that is not finite means some loss since the last read-out was NaN or inf, so
``read`` raises ``FloatingPointError`` naming the run and the step: a diverged run stops
at the next read-out instead of training on and scoring garbage.

The meter keeps two sums: the window since the last read-out (for the progress bar and the
check) and the current epoch (for the per-epoch loss history a method writes to its notes).
It never touches the graph (it adds detached values), so the weights are those of a loop
without it, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class LossMeter:
    """Weighted running means of one or more named training losses."""

    def __init__(self, desc: str, device: torch.device | str, names: Sequence[str] = ("loss",)) -> None:
        if not names:
            raise ValueError("LossMeter needs at least one loss name")
        self.desc = desc
        self.names = tuple(names)
        # weighted loss sums on the device; their weights are Python numbers, so on the host
        self._window = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        self._epoch = torch.zeros_like(self._window)
        self._window_weight = self._epoch_weight = 0.0

    def add(self, *losses: torch.Tensor, weight: float = 1.0) -> None:
        """Add one step's losses (scalar tensors, in the order of ``names``), weighted."""
        if len(losses) != len(self.names):
            raise ValueError(f"{self.desc}: expected {len(self.names)} loss(es) {self.names}, got {len(losses)}")
        values = torch.stack([loss.detach().double().reshape(()) for loss in losses]) * weight
        self._window += values
        self._epoch += values
        self._window_weight += weight
        self._epoch_weight += weight

    def read(self, step: int, unit: str = "step") -> dict[str, float]:
        """The mean losses since the last read-out (a host sync); raise if any is not finite.

        Returns ``{}`` (without a sync) when nothing was added since the last read-out.
        Restarts the window.
        """
        if self._window_weight == 0:
            return {}
        means = {name: value / self._window_weight for name, value in zip(self.names, self._window.tolist())}
        self._window.zero_()
        self._window_weight = 0.0
        bad = {name: value for name, value in means.items() if not math.isfinite(value)}
        if bad:
            shown = ", ".join(f"{name} {value}" for name, value in bad.items())
            raise FloatingPointError(f"{self.desc}: the training loss is not finite ({shown}) by {unit} {step}")
        return means

    def end_epoch(self) -> torch.Tensor:
        """This epoch's mean losses, on the device (no host sync); restarts the epoch sums.

        Stack the returned tensors and read them once, after training, for the history.
        """
        means = self._epoch / self._epoch_weight if self._epoch_weight else self._epoch.clone()
        self._epoch = torch.zeros_like(self._epoch)
        self._epoch_weight = 0.0
        return means

    @staticmethod
    def postfix(means: dict[str, float]) -> dict[str, str]:
        """The means formatted for a progress bar's ``set_postfix``."""
        return {name: f"{value:.4f}" for name, value in means.items()}
