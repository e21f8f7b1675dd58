"""Shared fixtures: tiny synthetic slice sets that every test can afford on 2 CPU cores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from datasets.format import SliceSet

torch.set_num_threads(min(2, torch.get_num_threads()))


def make_tiny_slices(n_train: int = 12, n_val: int = 4, n_test: int = 6, size: int = 32, channels: int = 1, seed: int = 0) -> SliceSet:
    """Disc-shaped 'brains' with smooth texture; test slices carry a bright square lesion."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    yy, xx = np.mgrid[:size, :size]
    centre = (size - 1) / 2
    brain = ((yy - centre) ** 2 + (xx - centre) ** 2 <= (0.42 * size) ** 2).astype(np.uint8)
    images = np.zeros((n, channels, size, size), np.float32)
    lesions = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        for c in range(channels):
            phase = rng.uniform(0, 2 * np.pi, 2)
            texture = 0.5 + 0.15 * np.sin(2 * np.pi * xx / size * 2 + phase[0]) * np.cos(2 * np.pi * yy / size * 2 + phase[1])
            images[i, c] = texture * brain + rng.normal(0, 0.01, (size, size)) * brain
        if i >= n_train + n_val:
            side = int(rng.integers(3, size // 4))
            y0, x0 = (int(v) for v in rng.integers(size // 3, 2 * size // 3 - side // 2, 2))
            lesions[i, y0 : y0 + side, x0 : x0 + side] = 1
            lesions[i] &= brain
            images[i, :, lesions[i] > 0] = 1.0
    split = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    table = pd.DataFrame(
        {"subject_id": [f"s{i:03d}" for i in range(n)], "slice_index": np.arange(n), "split": split, "lesion_area": lesions.reshape(n, -1).sum(1)}
    )
    modalities = ["T1", "T1CE", "T2", "FLAIR"][:channels]
    return SliceSet(images, lesions, np.repeat(brain[None], n, 0), table, modalities, manifest={"name": "tiny"})


def tiny_training_splits(method_name: str, n_train: int = 6, n_val: int = 2, size: int = 32) -> tuple[SliceSet, SliceSet]:
    """(train, val) of tiny slices for a FLAIR job of ``method_name``: one channel, or the
    channels of its ``training_modalities`` in their order, as the runner gives ``fit``."""
    from benchmarks.execute import paired_split
    from methods.registry import create_method

    modalities = create_method(method_name, "tiny", device="cpu").training_modalities("FLAIR")
    single = modalities == ["FLAIR"]
    data = make_tiny_slices(n_train=n_train, n_val=n_val, n_test=0, size=size, channels=1 if single else 4)
    if single:
        return data.split("train"), data.split("val")
    return paired_split(data, modalities, "train"), paired_split(data, modalities, "val")


@pytest.fixture
def tiny_slices() -> SliceSet:
    return make_tiny_slices()
