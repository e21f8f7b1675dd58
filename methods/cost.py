"""What a method's run costs, counted in network evaluations (``UADMethod.cost_plan``).

A method knows how often it runs each of its networks: per scored slice (a DDPM's
reverse chain, pDDPM's patches, MAD-AD's encode -> DDIM -> decode), per optimiser step
of training and in the forward-only passes of ``fit`` (validation, encoding the training
set). ``cost_plan`` writes that down as a ``CostPlan``; ``benchmarks.estimate`` measures
the FLOPs of one evaluation of each ``Stage`` (``Stage.probe``, under
``torch.utils.flop_counter``) and multiplies. The counts come from the same config
fields the code reads, and a test scores every method and counts the forward calls of
each stage's module, so the plan cannot drift from the code.

Conventions: one *evaluation* is one sample through the stage's network (a batch of B
is B evaluations); training costs forward + backward = 3 x the forward FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Stage:
    """One way a network is evaluated, on one sample at the size the method runs it.

    ``module`` is the dotted path of the module whose forward calls are the evaluations,
    from the names of ``UADMethod.networks()`` (``"unet"``, ``"vae.decoder"``).
    ``probe()`` runs the stage once on one sample (inputs on the method's device).
    """

    name: str
    module: str
    probe: Callable[[], Any]


@dataclass(frozen=True)
class Evaluations:
    """``count`` evaluations of a stage: per scored slice in ``CostPlan.score``, in total in ``CostPlan.fit_forward``.

    ``bound``: for a data-dependent count, the most it can be; ``count`` is then the
    typical value, and ``what`` says where it comes from.
    """

    stage: str
    count: float
    what: str = ""
    bound: float | None = None


@dataclass(frozen=True)
class TrainPhase:
    """``steps`` optimiser steps of batch ``batch`` through a stage: ``samples`` evaluations, forward + backward."""

    stage: str
    steps: int
    batch: int
    samples: int
    what: str = ""


@dataclass
class CostPlan:
    """A method's network evaluations for one job (training counted for one training key)."""

    stages: list[Stage] = field(default_factory=list)
    score: list[Evaluations] = field(default_factory=list)  # per scored slice
    train: list[TrainPhase] = field(default_factory=list)
    fit_forward: list[Evaluations] = field(default_factory=list)  # forward-only passes in fit, in total
    notes: list[str] = field(default_factory=list)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"cost plan has no stage {name!r}; stages: {[s.name for s in self.stages]}")


def epoch_phase(stage: str, epochs: int, n: int, batch: int, drop_last: bool = False, what: str = "") -> TrainPhase:
    """``epochs`` passes over ``n`` samples in batches of ``batch`` (``iterate_minibatches``)."""
    batch = max(1, min(int(batch), int(n))) if n > 0 else max(1, int(batch))
    if drop_last and n >= batch:
        per_epoch, samples = n // batch, (n // batch) * batch
    else:
        per_epoch, samples = math.ceil(n / batch), n
    return TrainPhase(stage, int(epochs) * per_epoch, batch, int(epochs) * samples, what)


def endless_phase(stage: str, steps: int, n: int, batch: int, what: str = "") -> TrainPhase:
    """``steps`` batches of an endless reshuffled loader over ``n`` samples, the short last batch of an epoch included
    (``methods.common.liang_train.endless_batches``)."""
    batch = max(1, min(int(batch), int(n)))
    per_epoch = math.ceil(n / batch)
    epochs, rest = divmod(int(steps), per_epoch)
    return TrainPhase(stage, int(steps), batch, epochs * int(n) + rest * batch, what)  # the first `rest` batches are full
