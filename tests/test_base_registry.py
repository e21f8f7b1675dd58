"""The method interface and registry: overrides, profiles, errors, save/load, plugins."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint
from typing import Optional

import numpy as np
import pytest
import torch
from torch import nn

from methods import registry
from methods.base import ConfigError, MethodConfig, MethodError, UADMethod, apply_overrides, inference_field
from methods.registry import UnknownMethodError, create_method, get_method_class, list_methods, register_method


@dataclass
class _ToyConfig(MethodConfig):
    width: int = 4
    factor: float = 1.0
    sizes: tuple[int, ...] = (1, 2)
    probs: Optional[tuple[float, ...]] = None
    gain: float = inference_field(1.0)


class _Toy(UADMethod):
    """Mean-intensity deviation, with a learnable scale so save/load has weights to move."""

    Config = _ToyConfig
    profiles = {"paper": {}, "quick": {"width": 2}}

    def _build(self) -> None:
        self.scale = nn.Linear(1, 1, bias=False)

    def networks(self):
        return {"scale": self.scale}

    def _fit(self, train, val):
        self._build()
        with torch.no_grad():
            self.scale.weight.fill_(float(np.mean(train.images)))

    def _score_batch(self, images, brain_masks):
        return self.config.gain * (images.mean(1) - self.scale.weight[0, 0]).abs()


class _Broken(_Toy):
    def _score_batch(self, images, brain_masks):
        return torch.full(images.shape[:1] + images.shape[2:], float("nan"))


class _WrongShape(_Toy):
    def _score_batch(self, images, brain_masks):
        return images.mean(1)[:, :-1]


def test_overrides_coerce_strings_and_reject_unknown_fields():
    cfg = apply_overrides(_ToyConfig(), {"width": "8", "factor": "2", "sizes": "[3, 4]", "gain": "none"})
    assert cfg.width == 8 and cfg.factor == 2.0 and isinstance(cfg.factor, float) and cfg.sizes == (3, 4) and cfg.gain is None
    with pytest.raises(ConfigError, match="no field.*nope"):
        apply_overrides(_ToyConfig(), {"nope": 1})


def test_tuple_fields_take_comma_separated_values_and_bad_strings_name_the_field():
    """``--set madad:patch_sizes=1,2`` must not reach the config as the string "1,2"."""
    cfg = apply_overrides(_ToyConfig(), {"sizes": "1,2,4", "probs": "0.75, 0.25"})
    assert cfg.sizes == (1, 2, 4) and cfg.probs == (0.75, 0.25)  # probs: None by default, typed by its annotation
    assert apply_overrides(_ToyConfig(), {"sizes": "8"}).sizes == (8,)
    with pytest.raises(ConfigError, match="factor: expected a float like 1.0, got 'abc'"):
        apply_overrides(_ToyConfig(), {"factor": "abc"})


def test_profiles_and_training_key_ignore_inference_fields():
    quick = _Toy.from_profile("quick")
    assert quick.config.width == 2
    with pytest.raises(ConfigError, match="no profile 'fast'"):
        _Toy.from_profile("fast")
    a, b = _Toy(), _Toy(gain=3.0)
    assert a.training_key() == b.training_key()
    assert a.training_key() != _Toy(width=5).training_key()
    with pytest.raises(ConfigError, match="change\\(s\\) training"):
        a.with_inference_overrides(width=3)


def test_execution_fields_do_not_change_the_training_key_and_can_change_on_a_fitted_method():
    """bf16, compile, layout and the loss read-out interval change nothing on the CPU: same weights, same key."""
    from methods.base import execution_field_names

    names = execution_field_names(_ToyConfig)
    assert names == {"amp", "train_amp", "compile", "channels_last", "log_every"}
    a = _Toy()
    assert a.config.amp and a.config.train_amp and a.config.channels_last and not a.config.compile and a.config.log_every == 50
    for name, value in {"amp": False, "train_amp": False, "compile": True, "channels_last": False, "log_every": 7}.items():
        assert _Toy(**{name: value}).training_key() == a.training_key(), name
        assert name not in a.training_config()
    assert a.with_inference_overrides(compile=True, log_every=3).config.compile
    with pytest.raises(ConfigError, match="log_every must be >= 1"):
        _Toy(log_every=0)


def test_a_record_differing_only_in_execution_fields_is_not_changed(tmp_path):
    from benchmarks.jobs import Job
    from benchmarks.records import SCHEMA_VERSION, write_record
    from benchmarks.resume import changed_records, job_config

    job = Job("S1", "ae", "embedded", "tiny", "T1", 0, "tiny")
    config = dict(job_config(job), amp=False, train_amp=False, compile=True, channels_last=False, log_every=9, device="cuda")
    record = {"schema_version": SCHEMA_VERSION, "status": "ok", "config": config, "data": {"fingerprint": "abc"}}
    write_record(record, job.record_path(tmp_path))
    assert changed_records([job], tmp_path, lambda data: "abc") == []
    write_record(dict(record, config=dict(config, epochs=config["epochs"] + 1)), job.record_path(tmp_path))
    [changed] = changed_records([job], tmp_path, lambda data: "abc")
    assert changed.differences == (f"epochs: {config['epochs'] + 1} -> {config['epochs']}",)


def test_registry_lists_builtins_and_rejects_unknown_names():
    assert "ae" in list_methods()
    with pytest.raises(UnknownMethodError, match="known methods: .*ae"):
        get_method_class("no-such-method")
    with pytest.raises(TypeError):
        register_method("bad")(object)


def test_entry_point_plugins_are_registered(monkeypatch):
    ep = EntryPoint(name="toy-plugin", value="tests.test_base_registry:_Toy", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    assert "toy-plugin" in list_methods()
    assert registry.method_sources()["toy-plugin"].startswith("plugin")
    assert type(create_method("toy-plugin")).__name__ == "_Toy"  # loaded through the entry point


def test_score_contract_and_save_load_round_trip(tiny_slices, tmp_path):
    train, test = tiny_slices.split("train"), tiny_slices.split("test")
    with pytest.raises(MethodError, match="fit"):
        _Toy().score(test.images, test.brain_masks)
    method = _Toy(score_batch_size=4).fit(train)
    _Toy.name = "toy"
    maps = method.score(test.images, test.brain_masks)
    assert maps.shape == (len(test), 32, 32) and maps.dtype == torch.float32
    assert torch.all(maps[torch.as_tensor(test.brain_masks) == 0] == 0)
    method.save(tmp_path / "toy")
    loaded = _Toy.load(tmp_path / "toy")
    assert torch.equal(loaded.score(test.images, test.brain_masks), maps)
    assert loaded.config == method.config
    with pytest.raises(FileNotFoundError, match="method.json"):
        _Toy.load(tmp_path / "missing")


def test_bad_outputs_and_inputs_fail_with_clear_messages(tiny_slices):
    train, test = tiny_slices.split("train"), tiny_slices.split("test")
    with pytest.raises(MethodError, match="non-finite"):
        _Broken().fit(train).score(test.images, test.brain_masks)
    with pytest.raises(MethodError, match="shape"):
        _WrongShape().fit(train).score(test.images, test.brain_masks)
    method = _Toy().fit(train)
    with pytest.raises(ValueError, match="B x C x H x W"):
        method.score(test.images[:, 0], test.brain_masks)
    with pytest.raises(ValueError, match="brain_masks"):
        method.score(test.images, test.brain_masks[:, :5])
    with pytest.raises(ValueError, match="healthy"):
        _Toy().fit(test)
