"""GPU execution helpers shared by every training loop and by scoring.

Each helper follows one of the execution fields of ``MethodConfig`` (methods/base.py)
and is a no-op on the CPU, so CPU results are those of plain fp32 PyTorch:

* ``configure_backends``: TF32 matmuls and convolutions and ``cudnn.benchmark`` (CUDA);
* ``train_autocast``: bf16 autocast of network forward passes (``train_amp``; losses are
  computed by the caller in float32 after casting the outputs back);
* ``to_channels_last``: the channels_last memory layout for convolution networks;
* ``compile_forward``: ``torch.compile`` of a network's forward pass (``compile``); the
  method keeps and saves the original module, so state-dict keys never change;
* ``prefetch_epoch`` / ``prefetch_endless``: batches read from the (memory-mapped) slice
  arrays by a background thread, pinned, and copied to the device without blocking. They
  yield exactly the batches, in the order, that reading them directly would, and draw the
  next epoch's order at the moment a direct loop would (RNG streams stay the same).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from itertools import islice
from typing import Any, Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch
from torch import nn

#: Reads the rows of one batch: ``read(indices) -> (array, ...)`` (NumPy, on the host).
ReadFn = Callable[[np.ndarray], Sequence[np.ndarray]]

#: Device types on which ``compile_forward`` compiles (on the CPU it would change the float
#: results and cost minutes of compilation for seconds of work).
COMPILE_DEVICES = frozenset({"cuda"})
_compile: Callable[[nn.Module], Callable[..., Any]] = torch.compile


def configure_backends(device: torch.device) -> None:
    """TF32 for float32 matmuls and convolutions and cuDNN autotuning, on CUDA only."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def train_autocast(device: torch.device, enabled: bool = True) -> ContextManager:
    """bf16 autocast on CUDA when ``enabled``; otherwise a context that changes nothing."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def to_channels_last(module: nn.Module, device: torch.device, enabled: bool = True) -> nn.Module:
    """Convert ``module``'s 4-d parameters to channels_last on CUDA (in place; returns it)."""
    if enabled and device.type == "cuda":
        module.to(memory_format=torch.channels_last)
    return module


def compile_forward(module: nn.Module, device: torch.device, enabled: bool) -> Callable[..., Any]:
    """A callable for ``module``'s forward passes: ``torch.compile(module)`` on CUDA when
    ``enabled``, else the module itself. The compiled wrapper shares the module's
    parameters, so training through it updates the module that ``networks()`` saves."""
    if enabled and device.type in COMPILE_DEVICES:
        return _compile(module)
    return module


def _host_tensors(read: ReadFn, indices: np.ndarray, pin: bool) -> tuple[torch.Tensor, ...]:
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in read(indices))
    return tuple(t.pin_memory() for t in tensors) if pin else tensors


def prefetch_epoch(
    read: ReadFn, batches: Sequence[np.ndarray], device: torch.device, depth: int = 2
) -> Iterator[tuple[np.ndarray, tuple[torch.Tensor, ...]]]:
    """Yield ``(indices, tensors on device)`` for each index batch of ``batches``, in order.

    A background thread reads up to ``depth`` batches ahead (``read`` must only read); on
    CUDA the host tensors are pinned and copied with ``non_blocking=True``. On the CPU the
    tensors are ``torch.from_numpy`` of what ``read`` returned: the same values.
    """
    pin = device.type == "cuda" and torch.cuda.is_available()
    todo = iter(batches)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="uad-prefetch") as pool:
        pending: deque[tuple[np.ndarray, Future]] = deque(
            (idx, pool.submit(_host_tensors, read, idx, pin)) for idx in islice(todo, max(1, depth))
        )
        try:
            while pending:
                idx, future = pending.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(_host_tensors, read, nxt, pin)))
                yield idx, tuple(t.to(device, non_blocking=True) for t in future.result())
        finally:
            for _, future in pending:
                future.cancel()


def prefetch_endless(
    read: ReadFn, next_epoch: Callable[[], Sequence[np.ndarray]], device: torch.device, depth: int = 2
) -> Iterator[tuple[np.ndarray, tuple[torch.Tensor, ...]]]:
    """``prefetch_epoch`` over epoch after epoch; ``next_epoch()`` (which may draw a shuffle)
    is called when the first batch of an epoch is asked for, as a direct loop would."""
    while True:
        yield from prefetch_epoch(read, next_epoch(), device, depth)
