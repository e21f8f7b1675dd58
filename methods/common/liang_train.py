"""The training loop of Liang et al.'s code (``utils/train_util.py`` of IterMask2 and MMCCD).

AdamW on the raw (non-EMA) weights, mean-squared error over the whole image, one optimiser
step per batch, and a step decay to ``lr * factor ** (k // lr_decay_steps)`` after the update with index ``k``. The authors
also keep an EMA of the weights (rate 0.9999) but save and test the raw weights, so no
EMA is kept here. Batches are drawn epoch by epoch from a reshuffled order (their
endless, shuffling DataLoader), the last short batch included.

GPU execution: callers feed the batches through ``accel.prefetch_endless`` (with
``epoch_batches``) and run their network forwards under ``accel.train_autocast``; the
losses stay on the device and are read back every ``log_every`` steps, when a non-finite
loss stops the run.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from methods.common.loss_meter import LossMeter
from methods.progress import progress_bar

#: ``loss_fn(batch)``: the loss of one item of the batch iterator (indices, or indices and tensors).
LossFn = Callable[[Any], torch.Tensor]


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[np.ndarray]:
    """The index batches of one reshuffled epoch (sorted within a batch: memory maps read in order)."""
    batch_size = max(1, min(batch_size, n))
    order = torch.randperm(n, generator=generator).numpy()
    return [np.sort(order[start : start + batch_size]) for start in range(0, n, batch_size)]


def endless_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[np.ndarray]:
    """Index batches over reshuffled epochs, forever (each epoch drawn when its first batch is asked for)."""
    while True:
        yield from epoch_batches(n, batch_size, generator)


def train_steps(
    net: nn.Module,
    loss_fn: LossFn,
    batches: Iterator[Any],
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    lr_decay_steps: int = 0,
    lr_decay_factor: float = 1.0,
    desc: str = "fit",
    log_every: int = 50,
) -> list[float]:
    """Run ``steps`` AdamW updates of ``loss_fn(next(batches))``; returns the loss per step.

    The losses are kept on the device and read back every ``log_every`` steps (and at the
    end); a non-finite loss then raises ``FloatingPointError``.
    """
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    net.train()
    device = next(net.parameters()).device
    losses = torch.zeros(int(steps), dtype=torch.float32, device=device)  # per step, for the caller
    meter = LossMeter(desc, device, names=("mse",))
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
        losses[step] = loss.detach()
        meter.add(loss)
        if (step + 1) % log_every == 0 or step + 1 == steps:  # the only host syncs of the loop
            bar.set_postfix(meter.postfix(meter.read(step + 1)))
    net.eval()
    return losses.tolist()

