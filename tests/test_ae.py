"""Baur et al.'s dense autoencoder: the authors' layer layout, no assumed intensity range, best-validation weights."""

from __future__ import annotations

import torch
from torch import nn

from methods.ae import AutoEncoder
from methods.ae.method import DenseAutoEncoder
from tests.conftest import make_tiny_slices


def _baur_parameter_count() -> int:
    """Parameters of StefanDenn3r/Unsupervised_Anomaly_Detection_Brain_MRI ``models/autoencoder.py`` at 128 x 128, zDim 128."""
    conv = lambda k, a, b: k * k * a * b + b  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731 (trainable gamma, beta)
    enc = sum(conv(5, a, b) + bn(b) for a, b in [(1, 32), (32, 64), (64, 128), (128, 128)])
    bottleneck = conv(1, 128, 16) + (1024 * 128 + 128) + (128 * 1024 + 1024) + conv(1, 16, 128)
    dec = bn(128) + sum(conv(5, a, b) + bn(b) for a, b in [(128, 128), (128, 64), (64, 32), (32, 32)]) + conv(1, 32, 1)
    return enc + bottleneck + dec


def test_paper_network_has_the_authors_layout() -> None:
    method = AutoEncoder.from_profile("paper", device="cpu")
    method.input_shape_ = (1, 128, 128)
    method._build()
    net = method.model
    assert sum(p.numel() for p in net.parameters()) == _baur_parameter_count()
    assert isinstance(net.reduce, nn.Conv2d) and net.reduce.kernel_size == (1, 1) and net.reduce.out_channels == 16
    assert isinstance(net.head, nn.Conv2d) and net.head.kernel_size == (1, 1)
    assert net.dropout.p == 0.2 and method.config.batch_size == 128


def test_dropout_only_in_training() -> None:
    net = DenseAutoEncoder(1, (32, 32), (8, 8, 8, 8), 5, 16, reduction=8, dropout=0.5)
    x = torch.rand(2, 1, 32, 32)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    assert not torch.equal(net(x), net(x))


def test_output_is_not_bounded_to_an_assumed_range() -> None:
    net = DenseAutoEncoder(1, (32, 32), (8, 8, 8, 8), 5, 16).eval()
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.fill_(2.5)  # S2 units: intensities well above 1
    assert torch.allclose(net(torch.rand(2, 1, 32, 32)), torch.full((2, 1, 32, 32), 2.5))


def test_keep_best_restores_the_best_validation_epoch() -> None:
    data = make_tiny_slices(n_train=8, n_val=2, n_test=0, size=32)
    method = AutoEncoder.from_profile("tiny", device="cpu", epochs=3)
    losses, snapshots = iter([2.0, 1.0, 3.0]), []

    def fake_l1(_val):
        snapshots.append({k: v.clone() for k, v in method.model.state_dict().items()})
        return next(losses)

    method._l1 = fake_l1  # type: ignore[method-assign]
    method.fit(data.split("train"), data.split("val"))
    assert method.notes["best_val_epoch"] == 1
    for k, v in method.model.state_dict().items():
        assert torch.equal(v, snapshots[1][k]), k
