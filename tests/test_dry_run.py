"""Dry runs (``benchmarks.run --dry-run``): the profile's real networks, every loop cut short,
records marked and kept off the leaderboard, checkpoints never shared with real runs."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from benchmarks.jobs import Job
from benchmarks.report.collect import load_records
from benchmarks.resume import changed_records, job_config
from benchmarks.run import main
from datasets.format import save_slices
from methods.base import DRY_RUN_BATCH, DRY_RUN_STEPS
from methods.registry import create_method, get_method_class, list_methods
from tests.conftest import make_tiny_slices

METHODS = list_methods()
#: Count fields that are not loop lengths: the schedule's T, learning-rate schedule lengths.
NOT_LOOPS = {"num_train_timesteps", "timesteps", "lr_decay_steps", "t_max_epochs"}
_LOOP = re.compile(r"(^|_)(epochs|steps|iterations)$")


def _dry_config(name: str, profile: str = "paper", **fields):
    cls = get_method_class(name)
    config = cls.config_for(profile, **fields)
    return config, cls.config_for(profile, **fields, **cls.dry_run_overrides(config))


def _parameters_on_meta(name: str, config) -> tuple[int, dict]:
    """Parameter count of the networks ``config`` builds for 128 x 128 inputs, built on the meta device (no memory, no time)."""
    method = get_method_class(name)(dataclasses.replace(config, device="meta"))
    method.input_shape_ = (len(method.training_modalities("FLAIR")), 128, 128)
    with torch.device("meta"):
        method._build()
    sizes = {k: getattr(method, k) for k in ("internal_size", "T") if hasattr(type(method), k)}
    return sum(p.numel() for net in method.networks().values() for p in net.parameters()), sizes


@pytest.mark.parametrize("name", METHODS)
def test_dry_run_keeps_the_profiles_networks_and_resolution(name: str) -> None:
    paper, dry = _dry_config(name)
    assert _parameters_on_meta(name, dry) == _parameters_on_meta(name, paper)
    for field in ("image_size", "num_train_timesteps", "timesteps", "channels", "unet_block_out_channels", "vae_block_out_channels", "model_channels"):
        assert getattr(dry, field, None) == getattr(paper, field, None), field


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("profile", ["paper", "quick"])
def test_dry_run_cuts_every_loop_and_batch(name: str, profile: str) -> None:
    """Every loop length (``*epochs``, ``*steps``, ``*iterations``) and batch size of the dry config is tiny."""
    _, dry = _dry_config(name, profile)
    for field in dataclasses.fields(dry):
        value = getattr(dry, field.name)
        if field.name in NOT_LOOPS or value is None or not isinstance(value, int):
            continue
        if field.name == "epochs" and getattr(dry, "max_steps", None) is not None:
            continue  # the pixel DDPMs train max_steps steps; epochs is used only without them
        if _LOOP.search(field.name):
            assert value <= DRY_RUN_STEPS, f"{name}: {field.name} = {value}"
        if field.name.endswith("batch_size"):
            assert value <= DRY_RUN_BATCH, f"{name}: {field.name} = {value}"


@pytest.fixture(scope="module")
def tiny_data():
    return make_tiny_slices(n_train=6, n_val=2, n_test=2, size=32)


def _fit_dry_tiny(name: str, data, **fields):
    _, dry = _dry_config(name, "tiny", device="cpu", **fields)
    method = get_method_class(name)(dry)
    method.fit(data.split("train"), data.split("val"))
    return method


@pytest.mark.parametrize("name, t_start, nfe", [("ddpm", 4, 2), ("anoddpm", 3, 2), ("thor", 4, 2), ("autoddpm", 2, 2 + 2 * 2)])
def test_a_dry_run_cuts_the_reverse_chains_to_two_steps(name: str, t_start: int, nfe: int, tiny_data) -> None:
    method = _fit_dry_tiny(name, tiny_data)
    assert method.notes["train_steps"] == DRY_RUN_STEPS and len(method.notes["val_history"]) == 1
    test = tiny_data.split("test")
    maps = method.score(test.images, test.brain_masks)
    assert torch.isfinite(maps).all()
    assert method.nfe == nfe  # full chains: t_start + 1 evaluations (AutoDDPM: coarse + RePaint x resamplings)
    assert method.chain_steps(t_start, 0) == ([3, 0] if name == "thor" else [t_start, 0])


def test_a_cut_thor_chain_keeps_a_harmonisation_step() -> None:
    thor = create_method("thor", "paper", device="cpu", max_reverse_steps=2)
    assert thor.chain_steps(350, 0) == [300, 0]  # the first harmonisation step blends, the last one ends the chain
    assert create_method("ddpm", "paper", device="cpu", max_reverse_steps=3).chain_steps(350, 0) == [350, 175, 0]
    assert create_method("ddpm", "paper", device="cpu").chain_steps(5, 2) == [5, 4, 3, 2]


def test_a_dry_run_caps_the_itermask2_refinement(tiny_data) -> None:
    method = _fit_dry_tiny("itermask2", tiny_data)
    test = tiny_data.split("test")
    method.score(test.images, test.brain_masks)
    assert 1 <= int(method.iterations_.max()) <= DRY_RUN_STEPS


# ----------------------------------------------------------------------------- the runner
def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "records").rglob("*.json"))]


def test_dry_run_of_a_paper_profile_end_to_end(tmp_path, capsys) -> None:
    """AE's paper profile on the embedded data: marked, resumable, and never on the leaderboard."""
    out = tmp_path / "dry"
    argv = ["--protocol", "S2", "--profile", "paper", "--methods", "ae", "--dry-run", "--modalities", "FLAIR", "--threads", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    (record,) = _records(out)
    assert record["status"] == "ok" and record["dry_run"] is True
    assert record["config"]["epochs"] == 1 and record["config"]["channels"] == [32, 64, 128, 128]  # paper network, one epoch
    data = record["data"]
    assert (data["n_train"], data["n_val"], data["n_test"]) == (4, 2, 2)
    assert record["metrics"]["auroc"] == record["metrics"]["auroc"]  # the protocol's metrics ran (lesions in both test slices)
    assert "DRY RUN" in capsys.readouterr().err

    stamps = {p: p.stat().st_mtime_ns for p in (out / "records").rglob("*.json")}
    assert main(argv) == 0  # a rerun finds its finished record matching (dry-run overrides included) and skips it
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "records").rglob("*.json")}

    loaded = load_records([out])
    assert loaded.ok == [] and loaded.failed == [] and len(loaded.dry_run) == 1
    from benchmarks.leaderboard import main as leaderboard

    page = tmp_path / "page"
    assert leaderboard(["--runs", str(out), "--out", str(page)]) == 0
    text = (page / "leaderboard.md").read_text()
    assert "1 dry-run record(s) ignored" in text and "No finished result records" in text


def test_the_default_out_of_a_dry_run_is_its_own_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--protocol", "S2", "--profile", "paper", "--methods", "intensity", "--dry-run", "--modalities", "FLAIR", "--threads", "1", "--no-progress"]) == 0
    assert (tmp_path / "results" / "runs" / "S2-paper-dry-run" / "records").is_dir()
    assert not (tmp_path / "results" / "runs" / "S2-paper").exists()


def test_a_real_run_never_reuses_a_dry_runs_checkpoint_or_record(tmp_path, capsys) -> None:
    """Data the dry run keeps whole (4 train, 2 val, 2 lesion test slices): only the dry-run mark separates the keys."""
    data = save_slices(make_tiny_slices(n_train=4, n_val=2, n_test=2, size=32), tmp_path / "tiny-set")
    common = ["--protocol", "S1", "--profile", "tiny", "--methods", "intensity", "--data", str(data), "--checkpoints", str(tmp_path / "ckpt"), "--no-progress", "--threads", "1"]
    assert main([*common, "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    assert main([*common, "--out", str(tmp_path / "real")]) == 0
    (dry,) = _records(tmp_path / "dry")
    (real,) = _records(tmp_path / "real")
    assert dry["data"]["train_fingerprint"] == real["data"]["train_fingerprint"]
    assert real["timings"]["reused_checkpoint"] is False and real["training_key"] != dry["training_key"]
    assert "dry_run" not in real

    # A real run in the dry run's folder does not take the dry record for its own.
    with pytest.raises(SystemExit):
        main([*common, "--out", str(tmp_path / "dry")])
    assert "dry run: True -> False" in capsys.readouterr().err


def test_the_leaderboard_sets_dry_run_records_aside(tmp_path) -> None:
    base = {"schema_version": 1, "status": "ok", "method": "ae", "variant": "default", "profile": "paper", "seed": 0,
            "protocol": {"name": "S2"}, "data": {"name": "embedded", "modality": "FLAIR"}, "metrics": {"max_dice": 0.5}}
    (tmp_path / "real.json").write_text(json.dumps(base))
    (tmp_path / "dry.json").write_text(json.dumps({**base, "dry_run": True, "seed": 1}))
    (tmp_path / "dry-failed.json").write_text(json.dumps({**base, "dry_run": True, "status": "failed", "seed": 2}))
    loaded = load_records([tmp_path])
    assert [r["seed"] for r in loaded.ok] == [0] and loaded.failed == []
    assert sorted(p.name for p in loaded.dry_run) == ["dry-failed.json", "dry.json"]


def test_records_from_before_max_reverse_steps_still_match(tmp_path) -> None:
    """Records written before the dry-run field existed ran every chain in full: they are not 'changed'."""
    job = Job("S2", "ddpm", "embedded", "embedded", "FLAIR", 0, "quick")
    config = job_config(job)
    stored = {k: v for k, v in config.items() if k != "max_reverse_steps"}
    path = job.record_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"schema_version": 1, "status": "ok", "config": stored, "data": {"fingerprint": "f"}}))
    assert changed_records([job], tmp_path, lambda spec: "f") == []
    path.write_text(json.dumps({"schema_version": 1, "status": "ok", "config": {**stored, "max_reverse_steps": 2}, "data": {"fingerprint": "f"}}))
    assert len(changed_records([job], tmp_path, lambda spec: "f")) == 1
