"""Offline perceptual distances: SSIM substitute, LPIPS loader on locally saved random weights."""

from __future__ import annotations

import socket

import pytest
import torch

from methods.common import perceptual as P


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny convs: one thread avoids OpenMP spinning when other jobs share the 2 cores
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _images(b: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    base = torch.sin(3 * xx) * torch.cos(2 * yy) * 0.6
    return (base + 0.05 * torch.randn(b, 1, size, size, generator=g)).clamp(-1, 1)


def _save_random_lpips(net: str, directory, seed: int = 0) -> None:
    """Random weights in the documented layout: torchvision trunk + lpips ``<net>.pth``."""
    torch.manual_seed(seed)
    dist = P.LPIPSDistance(net)
    trunk = {f"features.{k}": torch.randn_like(v) * 0.05 for k, v in dist.features.state_dict().items()}
    trunk["classifier.1.weight"] = torch.zeros(4, 4)  # torchvision checkpoints carry a classifier: ignored
    torch.save(trunk, directory / f"{P.BACKBONE_PREFIX[net]}-0000.pth")
    chns = P.TRUNKS[net][2]
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(chns)}, directory / f"{net}.pth")


def test_ssim_identical_is_zero_and_grows_with_noise(no_network) -> None:
    dist = P.make_perceptual("ssim")
    x = _images()
    d0 = dist(x, x)
    assert d0.shape == (2, 1, 64, 64)
    assert torch.allclose(d0, torch.zeros_like(d0), atol=1e-5)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    means = [float(dist(x, x + s * noise).mean()) for s in (0.02, 0.1, 0.4)]
    assert means[0] < means[1] < means[2]
    assert float(dist(x, x + 0.4 * noise).max()) <= 1.0


def test_ssim_substitute_is_default_and_warns_once(monkeypatch, caplog, no_network) -> None:
    monkeypatch.delenv(P.ENV_DIR, raising=False)
    monkeypatch.setattr(P, "_warned_substitute", False)
    with caplog.at_level("WARNING", logger=P.__name__):
        a = P.make_perceptual("auto")
        b = P.make_perceptual("auto")
    assert isinstance(a, P.SSIMDistance) and isinstance(b, P.SSIMDistance)
    assert a.name == "ssim-substitute"
    assert sum("SSIM" in r.getMessage() for r in caplog.records) == 1


def test_explicit_lpips_without_weights_raises(monkeypatch, no_network) -> None:
    monkeypatch.delenv(P.ENV_DIR, raising=False)
    with pytest.raises(P.PerceptualWeightsError):
        P.make_perceptual("lpips-alex")


@pytest.mark.parametrize("net", ["alex", "squeeze"])
def test_lpips_loader_random_weights(net: str, tmp_path, monkeypatch, no_network) -> None:
    _save_random_lpips(net, tmp_path)
    # via the env var ...
    monkeypatch.setenv(P.ENV_DIR, str(tmp_path))
    dist = P.make_perceptual("auto", net=net)
    assert isinstance(dist, P.LPIPSDistance)
    assert dist.name.startswith(f"lpips-{net}:")
    x = _images()
    d0 = dist(x, x)
    assert d0.shape == (2, 1, 64, 64) and torch.all(d0 == 0)
    y = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    d1 = dist(x, y)
    assert torch.isfinite(d1).all() and float(d1.mean()) > 0
    # ... and via explicit file paths: same weights, same map
    monkeypatch.delenv(P.ENV_DIR)
    backbone, lin = P.find_lpips_files(net, tmp_path)
    explicit = P.make_perceptual("auto", net=net, backbone_weights=backbone, lin_weights=lin)
    assert torch.equal(explicit(x, y), d1)


def test_lpips_loader_rejects_wrong_files(tmp_path) -> None:
    _save_random_lpips("alex", tmp_path)
    backbone, _ = P.find_lpips_files("alex", tmp_path)
    torch.save({"lin0.model.1.weight": torch.rand(1, 3, 1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(P.PerceptualWeightsError, match="bad.pth"):
        P.LPIPSDistance("alex", backbone, tmp_path / "bad.pth")
    with pytest.raises(P.PerceptualWeightsError, match="squeezenet"):
        P.LPIPSDistance("squeeze", backbone, tmp_path / "alex.pth")
