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
        # per sum: the weighted losses, then the total weight (the last entry)
        self._window = torch.zeros(len(self.names) + 1, dtype=torch.float64, device=device)
        self._epoch = torch.zeros_like(self._window)
        self._ones = torch.ones(1, dtype=torch.float64, device=device)

    def add(self, *losses: torch.Tensor, weight: float = 1.0) -> None:
        """Add one step's losses (scalar tensors, in the order of ``names``), weighted."""
        if len(losses) != len(self.names):
            raise ValueError(f"{self.desc}: expected {len(self.names)} loss(es) {self.names}, got {len(losses)}")
        values = torch.cat([torch.stack([loss.detach().double().reshape(()) for loss in losses]), self._ones]) * weight
        self._window += values
        self._epoch += values

    def read(self, step: int, unit: str = "step") -> dict[str, float]:
        """The mean losses since the last read-out (a host sync); raise if any is not finite.

        Returns ``{}`` when nothing was added since the last read-out. Restarts the window.
        """
        sums = self._window.tolist()
        self._window.zero_()
        if sums[-1] == 0:
            return {}
        means = {name: value / sums[-1] for name, value in zip(self.names, sums)}
        bad = {name: value for name, value in means.items() if not math.isfinite(value)}
        if bad:
            shown = ", ".join(f"{name} {value}" for name, value in bad.items())
            raise FloatingPointError(f"{self.desc}: the training loss is not finite ({shown}) by {unit} {step}")
        return means

    def end_epoch(self) -> torch.Tensor:
        """This epoch's mean losses, on the device (no host sync); restarts the epoch sums.

        Stack the returned tensors and read them once, after training, for the history.
        """
        means = self._epoch[:-1] / self._epoch[-1].clamp(min=torch.finfo(torch.float64).tiny)
        self._epoch = torch.zeros_like(self._epoch)
        return means

    @staticmethod
    def postfix(means: dict[str, float]) -> dict[str, str]:
        """The means formatted for a progress bar's ``set_postfix``."""
        return {name: f"{value:.4f}" for name, value in means.items()}
