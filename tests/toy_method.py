"""A tiny method for executor tests, importable by Ray workers (``UAD_BENCH_PLUGINS``).

It counts its fits and scorings in ``$UAD_TOY_STATE`` (one line per event) and fails on
demand through the inference-only knob ``fail``:

* ``once``   raise on the first attempt of a job, succeed on the next (marker file),
* ``always`` raise every time,
* ``die``    kill the worker process on the first attempt, succeed on the next.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from methods.base import MethodConfig, UADMethod, inference_field
from methods.registry import register_method

NAME = "toy-exec"
STATE_ENV = "UAD_TOY_STATE"


@dataclass
class ToyConfig(MethodConfig):
    width: int = 4  # a training knob: changes the trained "model"
    lr: float = 1e-3  # a training knob for search tests
    gain: float = inference_field(1.0)
    fail: str = inference_field("")


def _state() -> Path | None:
    text = os.environ.get(STATE_ENV)
    return Path(text) if text else None


def log_event(kind: str, config: ToyConfig) -> None:
    state = _state()
    if state is not None:
        state.mkdir(parents=True, exist_ok=True)
        with open(state / "events.log", "a") as f:
            f.write(f"{kind} seed={config.seed} width={config.width} gain={config.gain} fail={config.fail} pid={os.getpid()}\n")


def events(state: Path, kind: str) -> list[str]:
    path = state / "events.log"
    return [line for line in path.read_text().splitlines() if line.startswith(kind + " ")] if path.exists() else []


@register_method(NAME)
class ToyMethod(UADMethod):
    """Distance to the mean training intensity; deterministic and instant."""

    Config = ToyConfig
    config: ToyConfig
    profiles = {"paper": {}, "quick": {}}

    def _build(self) -> None:
        self.scale = nn.Linear(1, 1, bias=False)

    def networks(self) -> dict[str, nn.Module]:
        return {"scale": self.scale}

    def _fit(self, train, val) -> None:
        log_event("fit", self.config)
        self._build()
        offset = 0.01 * self.config.width + float(np.random.default_rng(self.config.seed).normal(0, 0.01)) + 1e-3 * self.config.lr
        with torch.no_grad():
            self.scale.weight.fill_(float(np.mean(train.images)) + offset)

    def _score_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        self._maybe_fail()
        log_event("score", self.config)
        return self.config.gain * (images.mean(1) - self.scale.weight[0, 0]).abs()

    def _maybe_fail(self) -> None:
        mode = self.config.fail
        if not mode:
            return
        if mode == "always":
            raise RuntimeError("injected permanent failure")
        state = _state()
        marker = (state or Path(".")) / f"marker-{mode}-seed{self.config.seed}-width{self.config.width}"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("attempted\n")
        if mode == "once":
            raise RuntimeError("injected failure on the first attempt")
        if mode == "die":
            os._exit(1)  # the worker dies without a Python exception
        raise ValueError(f"toy: unknown fail mode {mode!r}")
