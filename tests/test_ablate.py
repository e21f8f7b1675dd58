"""The ablation CLI: grid variants through the executors, Ray Tune search, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.ablate import Space, grid_variants, main, parse_grid, parse_space, trial_variant
from benchmarks.plugins import ENV_VAR
from benchmarks.run import UsageError
from datasets.format import save_slices
from tests import toy_method
from tests.conftest import make_tiny_slices

pytestmark = pytest.mark.slow  # Ray / Tune / a subprocess run: deselect with -m 'not slow'

METHOD = toy_method.NAME


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "tests.toy_method")  # the CLI imports it, and Ray workers too
    monkeypatch.setenv(toy_method.STATE_ENV, str(tmp_path / "state"))
    data = save_slices(make_tiny_slices(channels=1), tmp_path / "tiny")
    return {"data": str(data), "state": tmp_path / "state", "tmp": tmp_path}


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "records").rglob("*.json"))]


def _argv(env, *extra: str) -> list[str]:
    return ["--protocol", "S1", "--method", METHOD, "--data", env["data"], "--profile", "quick", "--no-progress", *extra]


def test_grid_is_the_cartesian_product_with_readable_names():
    grid = parse_grid(["ddim_steps=2,5,10", "gamma=0.2,0.4,none"])
    variants = grid_variants(grid)
    assert variants[0].name == "default" and len(variants) == 1 + 9
    assert "ddim_steps=2+gamma=0.4" in [v.name for v in variants]
    assert dict(variants[-1].overrides) == {"ddim_steps": "10", "gamma": "none"}
    with pytest.raises(UsageError, match="KNOB=VALUES"):
        parse_grid(["ddim_steps"])
    assert parse_space("lr=loguniform:1e-5:1e-3") == Space("lr", "loguniform", (1e-5, 1e-3))
    assert parse_space("batch_size=choice:16,32").args == ("16", "32")
    with pytest.raises(UsageError, match="KIND one of"):
        parse_space("lr=normal:0:1")
    assert trial_variant({"lr": 0.000123456789, "width": "2"}, ["lr", "width"]).name == "lr=0.0001235+width=2"


def test_unknown_knobs_fail_listing_the_valid_fields(env, capsys):
    for extra in (["--grid", "nope=1,2"], ["--search", "random", "--space", "nope=uniform:0:1"]):
        with pytest.raises(SystemExit) as exc:
            main(_argv(env, "--out", str(env["tmp"] / "x"), *extra))
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "no field(s) nope" in err and "valid fields:" in err and "gain" in err


def test_grid_runs_through_the_executor_and_inference_knobs_share_a_model(env, capsys):
    out = env["tmp"] / "grid"
    argv = _argv(env, "--grid", "gain=0.5,2", "--grid", "width=2,4", "--seeds", "0", "--out", str(out))
    assert main(argv) == 0
    records = _records(out)
    assert sorted(r["variant"] for r in records) == ["default", "gain=0.5+width=2", "gain=0.5+width=4", "gain=2+width=2", "gain=2+width=4"]
    assert {r["status"] for r in records} == {"ok"} and all("max_dice" in r["metrics"] for r in records)
    # Two models (width 2 and 4; the default has width 4): gain variants reuse them.
    assert len(toy_method.events(env["state"], "fit")) == 2
    assert "best configuration:" in capsys.readouterr().out
    assert main(argv) == 0  # a rerun resumes: nothing is trained or scored again
    assert len(toy_method.events(env["state"], "score")) == 5
    with pytest.raises(SystemExit) as exc:  # records of other settings are not skipped silently
        main([*argv, "--set", "gain=3"])
    assert exc.value.code == 2 and "gain: 1.0 -> 3.0" in capsys.readouterr().err


def test_search_mode_runs_tune_trials_into_the_same_records(env, capsys):
    pytest.importorskip("ray.tune")
    out = env["tmp"] / "search"
    argv = _argv(
        env, "--search", "random", "--num-samples", "1", "--space", "lr=loguniform:1e-5:1e-3", "--grid", "width=2,4",
        "--seeds", "0", "--out", str(out), "--cpus-per-job", "1",
    )  # fmt: skip
    assert main(argv) == 0
    records = _records(out)
    assert len(records) == 2 and {r["status"] for r in records} == {"ok"}
    for record in records:
        lr = float(record["variant"].split("+")[0].removeprefix("lr="))
        assert record["config"]["lr"] == lr and 1e-5 <= lr <= 1e-3  # the name is the exact value
        assert record["config"]["width"] in (2, 4) and record["protocol"]["name"] == "S1"
    assert (out / "tune").is_dir()
    assert "best configuration: lr=" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # a rerun over other base settings stops before any trial
        main([*argv, "--set", "gain=3"])
    assert exc.value.code == 2 and "gain: 1.0 -> 3.0" in capsys.readouterr().err
