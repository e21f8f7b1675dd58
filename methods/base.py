"""The method interface every UAD method implements.

A method is a class with a config dataclass (every hyperparameter, published value as the
default), registered by name with ``@register_method``. The contract follows
scikit-learn's estimators:

* ``__init__`` stores the config and does no work; learned state is created in ``fit``.
* ``fit(train, val=None)`` learns from healthy slices only and returns ``self``.
* ``score(images, brain_masks)`` returns anomaly maps, ``B x H x W`` float32, finite, same
  ``H x W`` as the input, **higher = more anomalous** (as in anomalib and PyOD).
* ``save(dir)`` / ``load(dir)`` round-trip exactly: a loaded method scores identically.

Subclasses implement three hooks: ``_fit``, ``_score_batch`` and ``networks`` (the
``nn.Module``s whose weights ``save`` stores). Configuration fields marked
``inference_field(...)`` only change scoring, so the runner can evaluate ablation
variants on one trained model (see ``training_key``). Fields marked
``execution_field(...)`` only change how the work runs on a GPU (bf16 autocast,
``torch.compile``, memory layout, how often losses are read back); on the CPU they change
nothing, so they are left out of ``training_key`` too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from methods.atomic import atomic_torch_save, atomic_write_text
from methods.common.accel import configure_backends, to_channels_last
from methods.config_checks import ConfigValueError, check_config
from methods.progress import progress_bar

if TYPE_CHECKING:  # pragma: no cover
    from datasets.format import SliceSet
    from methods.cost import CostPlan

FORMAT_VERSION = 1

#: A dry run (``benchmarks.run --dry-run``): optimiser steps, batch sizes and loop lengths
#: its config overrides use. Network sizes and resolutions are never changed.
DRY_RUN_STEPS = 2
DRY_RUN_BATCH = 2


class MethodError(RuntimeError):
    """A method produced something the interface forbids (wrong shape, NaN, ...)."""


class ConfigError(ValueError):
    """A configuration override names an unknown field or has a bad value."""


def inference_field(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A config field that only affects scoring; changing it reuses the trained model."""
    metadata = dict(kwargs.pop("metadata", {}) or {}, inference=True)
    if default is dataclasses.MISSING:
        return field(metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def execution_field(default: Any, **kwargs: Any) -> Any:
    """A config field that only changes how the work runs on a GPU, never the CPU result.

    Excluded from ``training_key`` (like ``device``) and from the runner's check of finished
    records; changeable on a fitted method like an inference field.
    """
    metadata = dict(kwargs.pop("metadata", {}) or {}, execution=True)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class MethodConfig:
    """Fields shared by every method. Subclasses add their own, published values as defaults."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    score_batch_size: int = inference_field(32)
    apply_brain_mask: bool = inference_field(True)  # zero the map outside the brain
    # GPU execution (methods/common/accel.py); each is a no-op on the CPU.
    amp: bool = execution_field(True)  # bf16 autocast of the networks when scoring on CUDA
    train_amp: bool = execution_field(True)  # bf16 autocast of the network forwards in training on CUDA (losses fp32)
    compile: bool = execution_field(False)  # torch.compile the networks' forward passes (CUDA only)
    channels_last: bool = execution_field(True)  # channels_last memory layout of conv networks (CUDA only)
    log_every: int = execution_field(50)  # training steps between loss read-outs (each one is a host sync)


def config_to_dict(config: MethodConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def inference_field_names(config_cls: type[MethodConfig]) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls) if f.metadata.get("inference")}


def execution_field_names(config_cls: type[MethodConfig]) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls) if f.metadata.get("execution")}


def untrained_field_names(config_cls: type[MethodConfig]) -> set[str]:
    """Fields that do not change the trained weights: inference and execution fields, and ``device``."""
    return inference_field_names(config_cls) | execution_field_names(config_cls) | {"device"}


def _coerce(value: Any, current: Any, name: str, annotation: str = "") -> Any:
    """Turn a string from the command line into the type of the field's current value.

    Tuples may be given as JSON (``[1, 2]``) or comma-separated (``1,2``); a string that
    parses to nothing of the field's type is an error naming the field.
    """
    if not isinstance(value, str) or isinstance(current, str):
        return value
    text = value.strip()
    if text.lower() in {"none", "null"}:
        return None
    if isinstance(current, bool):
        if text.lower() in {"true", "1", "yes"}:
            return True
        if text.lower() in {"false", "0", "no"}:
            return False
        raise ConfigError(f"{name}: expected a boolean, got {value!r}")
    parsed = _parse_scalar(text)
    wants_tuple = isinstance(current, tuple) or "tuple" in annotation
    if wants_tuple and isinstance(parsed, (str, int, float)) and not isinstance(parsed, bool):
        parsed = [_parse_scalar(part.strip()) for part in text.split(",")]  # "1,2" or a single "4"
    if wants_tuple and isinstance(parsed, list):
        return tuple(parsed)
    if isinstance(current, float) and isinstance(parsed, int) and not isinstance(parsed, bool):
        return float(parsed)
    if isinstance(parsed, str) and current is not None:
        raise ConfigError(f"{name}: expected a {type(current).__name__} like {current!r}, got {value!r}")
    return parsed


def _parse_scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: MethodConfig, overrides: Mapping[str, Any]) -> MethodConfig:
    """Return a copy of ``config`` with ``overrides`` applied; unknown names raise ConfigError."""
    valid = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ConfigError(
            f"{type(config).__name__} has no field(s) {', '.join(unknown)}; "
            f"valid fields: {', '.join(sorted(valid))}"
        )
    annotations = {f.name: str(f.type) for f in dataclasses.fields(config)}
    values = {k: _coerce(v, getattr(config, k), k, annotations[k]) for k, v in overrides.items()}
    return dataclasses.replace(config, **values)


def stable_hash(obj: Any, length: int = 16) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} was asked for but CUDA is not available")
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed the global RNGs and return a CPU generator for explicit sampling."""
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class UADMethod(ABC):
    """Base class of every anomaly detection method in the suite."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: Named overrides of the config; ``paper`` is the published setting (the defaults).
    profiles: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}, "quick": {}}
    #: Whether maps are independent of ``score_batch_size`` (False for methods that draw
    #: sampling noise batch by batch); the conformance test checks it when True.
    batch_invariant: ClassVar[bool] = True
    #: Methods that train the same network the same way share a family (e.g. DDPM, THOR
    #: and AutoDDPM: "pixel-ddpm"); the training key, and so the checkpoint, is the
    #: family's, not the method's. ``None``: the method's own name.
    training_family: ClassVar[str | None] = None
    #: Extra facts a record should carry (e.g. which perceptual distance was used).
    notes: dict[str, Any]

    def __init__(self, config: MethodConfig | None = None, **overrides: Any) -> None:
        config = config if config is not None else self.Config()
        if not isinstance(config, self.Config):
            raise ConfigError(f"{type(self).__name__} expects a {self.Config.__name__}, got {type(config).__name__}")
        self.config = apply_overrides(config, overrides) if overrides else config
        try:
            check_config(self.config)
        except ConfigValueError as exc:
            raise ConfigError(f"{type(self).__name__}: {exc}") from None
        if int(self.config.log_every) < 1:
            raise ConfigError(f"{type(self).__name__}: log_every must be >= 1, got {self.config.log_every}")
        self.notes = {}
        self.fitted_ = False
        self.input_shape_: tuple[int, int, int] | None = None  # C, H, W seen in fit

    # ------------------------------------------------------------------ construction
    @classmethod
    def config_for(cls, profile: str = "paper", **overrides: Any) -> MethodConfig:
        """The config a named profile plus field overrides resolve to (no model is built)."""
        if profile not in cls.profiles:
            raise ConfigError(f"{cls.name or cls.__name__} has no profile {profile!r}; choose from {sorted(cls.profiles)}")
        return apply_overrides(apply_overrides(cls.Config(), cls.profiles[profile]), overrides)

    @classmethod
    def from_profile(cls, profile: str = "paper", **overrides: Any) -> "UADMethod":
        return cls(cls.config_for(profile, **overrides))

    @property
    def device(self) -> torch.device:
        return resolve_device(self.config.device)

    @classmethod
    def family(cls) -> str:
        """The name under which trained weights are keyed and stored (``training_family`` or the method's name)."""
        return cls.training_family or cls.name

    def training_config(self) -> dict[str, Any]:
        """The config values that change the trained weights (inference and execution fields and the device excluded)."""
        skip = untrained_field_names(type(self.config))
        return {k: v for k, v in config_to_dict(self.config).items() if k not in skip}

    def training_key(self) -> str:
        """Hash of what determines the weights: the training family (network and training code) and training config."""
        return stable_hash({"method": self.family(), "config": self.training_config(), "format": FORMAT_VERSION})

    @classmethod
    def dry_run_overrides(cls, config: MethodConfig) -> dict[str, Any]:
        """Config overrides that make ``config`` a dry run: every code path of it, cut short.

        A dry run (``benchmarks.run --dry-run``) checks that a profile runs end to end at
        its real resolution and network size before a long launch: a few optimiser steps
        on tiny batches, validations that happen at once, and reverse chains or iterative
        loops cut to ``DRY_RUN_STEPS`` steps. The overrides never touch network widths,
        depth, image sizes or numbers of timesteps. The default only shrinks the scoring
        batch; a method with training or loops overrides this (calling ``super()``).
        """
        return {"score_batch_size": DRY_RUN_BATCH}

    def with_inference_overrides(self, **overrides: Any) -> "UADMethod":
        """Change scoring-only (or execution) knobs of a fitted method in place (ablation variants)."""
        allowed = inference_field_names(type(self.config)) | execution_field_names(type(self.config))
        bad = sorted(set(overrides) - allowed)
        if bad:
            raise ConfigError(
                f"{', '.join(bad)} change(s) training for {self.name}; inference-time knobs are: {', '.join(sorted(allowed))}"
            )
        self.config = apply_overrides(self.config, overrides)
        return self

    # ------------------------------------------------------------------ hooks
    @abstractmethod
    def _fit(self, train: "SliceSet", val: "SliceSet | None") -> None:
        """Learn from healthy ``train`` slices; build every network returned by ``networks``."""

    @abstractmethod
    def _score_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        """Map a batch ``B x C x H x W`` (on ``self.device``) to ``B x H x W`` anomaly maps."""

    @abstractmethod
    def networks(self) -> dict[str, nn.Module]:
        """The modules whose weights make up the learned state."""

    def training_modalities(self, modality: str) -> list[str]:
        """The modalities ``fit`` needs, in channel order, for a job on ``modality``.

        The default is ``[modality]``. A method that also learns from other modalities of the
        same slices (e.g. a translation target) returns ``[modality, other, ...]``; the runner
        then hands ``fit`` those channels and ``score`` only ``modality``.
        """
        return [modality]

    def cost_plan(self, n_train: int, n_val: int) -> "CostPlan | None":
        """The network evaluations of one job on ``n_train`` / ``n_val`` slices (``methods.cost``).

        Called after ``input_shape_`` is set and ``_build`` has run (on the meta device by
        ``benchmarks.estimate``). ``None``: not declared (the estimate lists the method as unknown).
        """
        return None

    def _build(self) -> None:
        """Create untrained networks for ``self.input_shape_`` (used by ``load``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _build to support load()")

    def _reconstruct_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} does not produce a pseudo-healthy reconstruction")

    def extra_state(self) -> dict[str, Any]:
        """JSON-serialisable learned state beyond network weights (e.g. a fitted threshold)."""
        return {}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ public API
    def fit(self, train: "SliceSet", val: "SliceSet | None" = None) -> "UADMethod":
        if len(train) == 0:
            raise ValueError(f"{self.name}: the training set is empty")
        if int(np.asarray(train.lesion_areas()).sum()) > 0:
            raise ValueError(f"{self.name}: training slices must be healthy, but some carry lesion pixels")
        self.input_shape_ = tuple(int(s) for s in train.images.shape[1:])  # type: ignore[assignment]
        seed_everything(self.config.seed)
        configure_backends(self.device)  # TF32 and cuDNN autotuning on CUDA
        self._fit(train, val)
        for module in self.networks().values():  # the scoring layout (CUDA only; training loops set their own)
            to_channels_last(module, self.device, self.config.channels_last)
        self.fitted_ = True
        return self

    def score(self, images: Any, brain_masks: Any, progress: bool = False) -> torch.Tensor:
        """Anomaly maps for ``images`` (``B x C x H x W``); higher = more anomalous.

        Runs in batches of ``config.score_batch_size`` without gradients; the result is a
        float32 CPU tensor ``B x H x W``. Raises ``MethodError`` if the method returns a
        wrong shape or non-finite values.
        """
        return self._batched(self._score_batch, images, brain_masks, progress, desc=f"score {self.name}", is_map=True)

    def reconstruct(self, images: Any, brain_masks: Any) -> torch.Tensor:
        """Pseudo-healthy restoration ``B x C x H x W`` (only for methods that make one)."""
        return self._batched(self._reconstruct_batch, images, brain_masks, False, desc="reconstruct", is_map=False)

    @property
    def can_reconstruct(self) -> bool:
        return type(self)._reconstruct_batch is not UADMethod._reconstruct_batch

    def _batched(self, fn, images: Any, brain_masks: Any, progress: bool, desc: str, is_map: bool) -> torch.Tensor:
        if not self.fitted_:
            raise MethodError(f"{self.name}: call fit() or load() before scoring")
        images_t = torch.as_tensor(np.asarray(images, dtype=np.float32))
        masks_t = torch.as_tensor(np.asarray(brain_masks)).to(torch.float32)
        if images_t.ndim != 4:
            raise ValueError(f"{self.name}: images must be B x C x H x W, got shape {tuple(images_t.shape)}")
        if masks_t.shape != (images_t.shape[0], *images_t.shape[2:]):
            raise ValueError(
                f"{self.name}: brain_masks must be B x H x W = {(images_t.shape[0], *images_t.shape[2:])}, got {tuple(masks_t.shape)}"
            )
        if self.input_shape_ is not None and images_t.shape[1] != self.input_shape_[0]:
            raise ValueError(f"{self.name}: trained on {self.input_shape_[0]} channel(s), got {images_t.shape[1]}")
        device = self.device
        configure_backends(device)
        outputs = []
        batch = max(1, int(self.config.score_batch_size))
        starts = range(0, images_t.shape[0], batch)
        if progress:
            starts = progress_bar(starts, desc=desc, unit="batch")
        for module in self.networks().values():
            module.eval()
        with torch.no_grad():
            for start in starts:
                x = images_t[start : start + batch].to(device)
                m = masks_t[start : start + batch].to(device)
                with self._autocast(device):
                    out = fn(x, m)
                out = out.float()
                if is_map:
                    out = self._check_map(out, x)
                    if self.config.apply_brain_mask:
                        out = out * (m > 0)
                outputs.append(out.cpu())
        if not outputs:
            shape = (0, *images_t.shape[2:]) if is_map else (0, *images_t.shape[1:])
            return torch.zeros(shape)
        return torch.cat(outputs)

    def _autocast(self, device: torch.device):
        """bf16 autocast of the scoring pass on CUDA (``amp``); the maps are returned in float32."""
        if self.config.amp and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast(device.type, enabled=False)

    def _check_map(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        expected = (x.shape[0], *x.shape[2:])
        if tuple(out.shape) != expected:
            raise MethodError(f"{self.name}: anomaly map has shape {tuple(out.shape)}, expected B x H x W = {expected}")
        if not torch.isfinite(out).all():
            bad = int((~torch.isfinite(out)).sum())
            raise MethodError(f"{self.name}: anomaly map has {bad} non-finite value(s) (NaN or inf)")
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write weights, config and version into ``directory`` (created; files replaced atomically)."""
        if not self.fitted_:
            raise MethodError(f"{self.name}: nothing to save, the method is not fitted")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        from methods import __version__

        meta = {
            "method": self.name,
            "training_family": self.family(),
            "class": f"{type(self).__module__}:{type(self).__qualname__}",
            "format_version": FORMAT_VERSION,
            "uad_bench_version": __version__,
            "input_shape": list(self.input_shape_ or ()),
            "config": config_to_dict(self.config),
            "extra_state": self.extra_state(),
            "notes": self.notes,
        }
        weights = {name: {k: v.detach().cpu() for k, v in module.state_dict().items()} for name, module in self.networks().items()}
        atomic_torch_save(weights, directory / "weights.pt")
        atomic_write_text(json.dumps(meta, indent=2, default=str), directory / "method.json")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | None = None, config: MethodConfig | None = None) -> "UADMethod":
        """Rebuild a fitted method saved by ``save``.

        A method of the same ``training_family`` may load the checkpoint (THOR the network
        DDPM trained). ``config`` replaces the saved config; it must have the same training
        fields (else ``ValueError``). Without it, a sibling's saved training fields are
        combined with this method's defaults for the rest.
        """
        directory = Path(directory)
        meta_path, weights_path = directory / "method.json", directory / "weights.pt"
        for path in (meta_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; not a saved method directory")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{meta_path}: not valid JSON ({exc})") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format version {meta.get('format_version')} is not {FORMAT_VERSION}")
        if cls is UADMethod:
            from methods.registry import get_method_class

            cls = get_method_class(meta["method"])
        elif meta["method"] != cls.name and meta.get("training_family") != cls.family():
            raise ValueError(f"{meta_path}: holds method {meta['method']!r}, not {cls.name!r}")
        config_values = meta["config"]
        if meta["method"] != cls.name:  # a sibling of the family trained it: keep its training fields
            skip = untrained_field_names(cls.Config) - {"device"}
            known = {f.name for f in dataclasses.fields(cls.Config)} - skip
            config_values = {k: v for k, v in config_values.items() if k in known}
        if device is not None:
            config_values = dict(config_values, device=device)
        defaults = cls.Config()
        saved = apply_overrides(defaults, {k: _restore_type(v, getattr(defaults, k, None)) for k, v in config_values.items()})
        if config is not None:
            if device is not None:
                config = dataclasses.replace(config, device=device)
            if cls(config).training_config() != cls(saved).training_config():
                raise ValueError(f"{meta_path}: the given config trains differently from the saved one; not the same weights")
            saved = config
        method = cls(saved)
        method.input_shape_ = tuple(meta["input_shape"])  # type: ignore[assignment]
        method.notes = dict(meta.get("notes", {}))
        method._build()
        weights = torch.load(weights_path, map_location="cpu", weights_only=True)
        networks = method.networks()
        if set(weights) != set(networks):
            raise ValueError(f"{weights_path}: holds networks {sorted(weights)}, expected {sorted(networks)}")
        for name, module in networks.items():
            module.load_state_dict(weights[name])
            to_channels_last(module.to(method.device), method.device, method.config.channels_last)
        method.set_extra_state(meta.get("extra_state", {}))
        method.fitted_ = True
        return method

    # ------------------------------------------------------------------ helpers for subclasses
    def iterate_minibatches(
        self, n: int, batch_size: int, generator: torch.Generator, drop_last: bool = False
    ) -> Iterator[np.ndarray]:
        """Shuffled index batches for one epoch, reproducible from ``generator``."""
        order = torch.randperm(n, generator=generator).numpy()
        stop = n - (n % batch_size) if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            yield np.sort(order[start : start + batch_size])  # sorted: memory-mapped reads stay sequential

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def _restore_type(value: Any, default: Any) -> Any:
    """JSON turns tuples into lists; give them back their tuple type."""
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    return value
