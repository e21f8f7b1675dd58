"""GPU execution helpers: CPU no-ops, the prefetching loader's batches and RNG order, compile keeping the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from methods.base import UADMethod
from methods.common import accel
from methods.common.accel import compile_forward, configure_backends, prefetch_endless, prefetch_epoch, to_channels_last, train_autocast
from methods.common.liang_train import endless_batches, epoch_batches
from methods.registry import create_method
from tests.conftest import make_tiny_slices, tiny_training_splits

CPU = torch.device("cpu")


@pytest.fixture
def rows(tmp_path) -> np.memmap:
    """A memory-mapped float16 array, as the prepared sets store slices."""
    data = np.memmap(tmp_path / "rows.npy", dtype=np.float16, mode="w+", shape=(23, 2, 5, 5))
    data[:] = np.random.default_rng(0).normal(size=data.shape)
    return data


def _read(rows: np.memmap):
    return lambda idx: (np.asarray(rows[idx], dtype=np.float32), np.asarray(idx))


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetch_epoch_yields_the_direct_batches_in_order(rows, depth: int) -> None:
    order = [np.sort(b) for b in np.array_split(np.random.default_rng(1).permutation(23), 6)]
    got = list(prefetch_epoch(_read(rows), order, CPU, depth=depth))
    assert [idx.tolist() for idx, _ in got] == [b.tolist() for b in order]
    for (idx, (images, index)), expected in zip(got, order):
        assert images.dtype == torch.float32 and images.device == CPU
        assert torch.equal(images, torch.from_numpy(np.asarray(rows[expected], dtype=np.float32)))
        assert torch.equal(index, torch.from_numpy(expected))


def test_prefetch_epoch_stops_early_and_reports_read_errors(rows) -> None:
    order = [np.array([i]) for i in range(10)]
    seen = []
    for idx, _ in prefetch_epoch(_read(rows), order, CPU):
        seen.append(int(idx[0]))
        if len(seen) == 3:
            break
    assert seen == [0, 1, 2]

    def bad(idx):
        if idx[0] == 2:
            raise OSError("slices.npy: truncated")
        return (np.zeros(1),)

    with pytest.raises(OSError, match="truncated"):
        list(prefetch_epoch(bad, order, CPU))


def test_prefetch_endless_keeps_the_generator_stream_of_a_direct_loop(rows) -> None:
    """The next epoch's shuffle is drawn when its first batch is asked for, so noise drawn
    from the same generator between steps is unchanged."""

    def direct(steps: int) -> tuple[list[list[int]], list[float]]:
        gen = torch.Generator().manual_seed(5)
        batches, draws, stream = [], [], endless_batches(23, 7, gen)
        for _ in range(steps):
            batches.append(next(stream).tolist())
            draws.append(float(torch.rand(1, generator=gen)))
        return batches, draws

    gen = torch.Generator().manual_seed(5)
    loader = prefetch_endless(_read(rows), lambda: epoch_batches(23, 7, gen), CPU)
    batches, draws = [], []
    for _ in range(11):  # 4 batches an epoch: crosses two epoch boundaries
        idx, (images, _) = next(loader)
        assert torch.equal(images, torch.from_numpy(np.asarray(rows[idx], dtype=np.float32)))
        batches.append(idx.tolist())
        draws.append(float(torch.rand(1, generator=gen)))
    assert (batches, draws) == direct(11)


def test_execution_helpers_change_nothing_on_the_cpu() -> None:
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    configure_backends(CPU)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) == flags
    net = nn.Conv2d(2, 3, 3)
    x = torch.randn(1, 2, 6, 6)
    with train_autocast(CPU, True):
        assert net(x).dtype == torch.float32
    assert to_channels_last(net, CPU).weight.is_contiguous()
    assert compile_forward(net, CPU, enabled=True) is net


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_execution_helpers_on_cuda() -> None:
    cuda = torch.device("cuda")
    configure_backends(cuda)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    net = to_channels_last(nn.Conv2d(2, 3, 3).to(cuda), cuda)
    assert net.weight.is_contiguous(memory_format=torch.channels_last)
    with train_autocast(cuda, True):
        assert net(torch.randn(1, 2, 6, 6, device=cuda)).dtype == torch.bfloat16
    with train_autocast(cuda, False):
        assert net(torch.randn(1, 2, 6, 6, device=cuda)).dtype == torch.float32
    order = [np.arange(i, i + 2) for i in range(0, 8, 2)]
    data = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    for idx, (x,) in prefetch_epoch(lambda i: (data[i],), order, cuda):
        assert x.device.type == "cuda" and torch.equal(x.cpu(), torch.from_numpy(data[idx]))


class _FakeCompiled:
    """Stands for torch.compile's wrapper: calls the module, counts the calls."""

    made = 0

    def __init__(self, module: nn.Module) -> None:
        type(self).made += 1
        self.module, self.calls = module, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("name", ["ddpm", "pddpm"])
def test_compile_runs_forwards_through_the_wrapper_and_keeps_the_weights(name: str, monkeypatch, tmp_path) -> None:
    """compile=True: training and scoring go through the compiled callable, while networks()
    (and so save/load) keep the plain module: same keys, same weights, same maps as without."""
    monkeypatch.setattr(accel, "_compile", _FakeCompiled)
    monkeypatch.setattr(accel, "COMPILE_DEVICES", frozenset({"cpu", "cuda"}))
    data = make_tiny_slices(n_train=6, n_val=2, n_test=3, size=16)
    train, val, test = data.split("train"), data.split("val"), data.split("test")
    plain = create_method(name, "tiny", device="cpu", compile=False).fit(train, val)
    _FakeCompiled.made = 0
    compiled = create_method(name, "tiny", device="cpu", compile=True).fit(train, val)
    assert _FakeCompiled.made == 1 and compiled._forward[1].calls > 0
    for net_name, module in compiled.networks().items():
        assert isinstance(module, nn.Module) and not isinstance(module, _FakeCompiled)
        state, reference = module.state_dict(), plain.networks()[net_name].state_dict()
        assert list(state) == list(reference) and all(torch.equal(state[k], reference[k]) for k in state)
    maps = compiled.score(test.images, test.brain_masks)
    assert torch.equal(maps, plain.score(test.images, test.brain_masks))
    compiled.save(tmp_path / name)
    loaded = UADMethod.load(tmp_path / name)
    assert loaded.config.compile and torch.equal(loaded.score(test.images, test.brain_masks), maps)


def _direct_epoch(read, batches, device, depth=2):
    """The loader's reference: read each batch on the spot, in the caller's thread."""
    for idx in batches:
        yield idx, tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in read(idx))


def _direct_endless(read, next_epoch, device, depth=2):
    while True:
        yield from _direct_epoch(read, next_epoch(), device)


_LOOPS = {  # method -> (modules that import the loader, overrides that reach every loader path)
    "ae": (["methods.ae.method"], {}),
    "dae": (["methods.dae.method"], {}),
    "ddpm": (["methods.common.diffusion"], {}),
    "cyclunet": (["methods.cyclunet.method"], {}),
    "itermask2": (["methods.itermask2.method"], {}),
    "madad": (["methods.madad.method"], {"aug_p": 0.5, "aug_rotate_deg": 5.0}),  # augmentation: rows read per batch
}


@pytest.mark.parametrize("name", sorted(_LOOPS))
def test_training_through_the_prefetching_loader_is_bitwise_the_direct_read(name: str, monkeypatch) -> None:
    """Each training loop gives the same weights, bit for bit, with the threaded loader as with direct reads."""
    import importlib

    modules, overrides = _LOOPS[name]
    train, val = tiny_training_splits(name)

    def weights() -> dict[str, torch.Tensor]:
        method = create_method(name, "tiny", device="cpu", seed=3, **overrides).fit(train, val)
        return {f"{n}.{k}": v.clone() for n, net in method.networks().items() for k, v in net.state_dict().items()}

    loaded = weights()
    for module in modules:
        mod = importlib.import_module(module)
        for attr, direct in (("prefetch_epoch", _direct_epoch), ("prefetch_endless", _direct_endless)):
            if hasattr(mod, attr):
                monkeypatch.setattr(mod, attr, direct)
    reference = weights()
    assert list(loaded) == list(reference)
    assert all(torch.equal(loaded[k], reference[k]) for k in loaded)
