"""The training loop of Liang et al.'s code (``utils/train_util.py`` of IterMask2 and MMCCD).

AdamW on the raw (non-EMA) weights, mean-squared error over the whole image, one optimiser
step per batch, and a step decay to ``lr * factor ** (k // lr_decay_steps)`` after the update with index ``k``. The authors
also keep an EMA of the weights (rate 0.9999) but save and test the raw weights, so no
EMA is kept here. Batches are drawn epoch by epoch from a reshuffled order (their
endless, shuffling DataLoader), the last short batch included.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from methods.progress import progress_bar

LossFn = Callable[[np.ndarray], torch.Tensor]


def endless_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[np.ndarray]:
    """Index batches over reshuffled epochs, forever (sorted within a batch: memory maps read in order)."""
    batch_size = max(1, min(batch_size, n))
    while True:
        order = torch.randperm(n, generator=generator).numpy()
        for start in range(0, n, batch_size):
            yield np.sort(order[start : start + batch_size])


def train_steps(
    net: nn.Module,
    loss_fn: LossFn,
    batches: Iterator[np.ndarray],
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    lr_decay_steps: int = 0,
    lr_decay_factor: float = 1.0,
    desc: str = "fit",
) -> list[float]:
    """Run ``steps`` AdamW updates of ``loss_fn(batch_indices)``; returns the loss per step."""
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    net.train()
    losses: list[float] = []
    bar = progress_bar(range(int(steps)), desc=desc, unit="step")
    for step in bar:
        done = step - 1  # the authors decay right after the update with index k * lr_decay_steps
        if lr_decay_steps and done > 0 and done % lr_decay_steps == 0:
            for group in optimiser.param_groups:
                group["lr"] = lr * lr_decay_factor ** (done // lr_decay_steps)
        loss = loss_fn(next(batches))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(mse=f"{losses[-1]:.4f}")
    net.eval()
    return losses
