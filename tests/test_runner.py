"""End to end: the run CLI on a tiny prepared set, resume, checkpoint reuse and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.run import main
from datasets.format import save_slices
from tests.conftest import make_tiny_slices


@pytest.fixture
def prepared(tmp_path) -> Path:
    return save_slices(make_tiny_slices(n_train=8, n_val=3, n_test=5, size=32), tmp_path / "tiny-set")


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "records").rglob("*.json"))]


def test_run_writes_records_resumes_and_reuses_checkpoints(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--protocol", "S1", "--methods", "ae", "--profile", "tiny", "--data", str(prepared), "--out", str(out), "--seeds", "0,1", "--no-progress", "--variants", "ae:apply_brain_mask=false"]
    assert main(argv) == 0
    records = _records(out)
    assert len(records) == 4 and {r["status"] for r in records} == {"ok"}
    first = next(r for r in records if r["seed"] == 0 and r["variant"] == "default")
    assert first["protocol"]["name"] == "S1" and first["data"]["modality"] == "T1"
    assert 0.0 <= first["metrics"]["max_dice"] <= 1.0
    assert first["data"]["fingerprint"] and first["versions"]["torch"] and first["timings"]["slices_per_second"] > 0
    assert first["config"]["seed"] == 0 and first["profile"] == "tiny"
    variant = next(r for r in records if r["seed"] == 0 and r["variant"] != "default")
    assert variant["timings"]["reused_checkpoint"] is True and variant["training_key"] == first["training_key"]
    assert (out / "records" / "S1" / "tiny" / "ae" / Path(first["examples"]).name).exists() or any(out.rglob(first["examples"]))
    captured = capsys.readouterr()
    assert "max_dice" in captured.out  # the summary table
    assert "fit ae" not in captured.err  # --no-progress hides the training bars too

    # A rerun skips finished jobs: records are not rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "records").rglob("*.json")}
    assert main(argv) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "records").rglob("*.json")}

    # A lost record reruns from the cached checkpoint, without training again.
    lost = next(p for p in stamps if "seed1__default" in p.name)
    lost.unlink()
    assert main(argv) == 0
    again = json.loads(lost.read_text())
    assert again["status"] == "ok" and again["timings"]["reused_checkpoint"] is True


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--protocol", "S1", "--methods", "nope"], "unknown method"),
        (["--protocol", "S1", "--methods", "ae", "--profile", "fastest"], "profiles"),
        (["--protocol", "S1", "--methods", "ae", "--seeds", "a,b"], "--seeds"),
        (["--protocol", "S1", "--methods", "ae", "--variants", "ae:nope=1"], "no field"),
        (["--protocol", "S3", "--methods", "ae"], "invalid choice"),
    ],
)
def test_bad_arguments_fail_with_the_valid_choices(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_path_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--protocol", "S1", "--methods", "ae", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert "nowhere" in capsys.readouterr().err


def test_list_methods(capsys):
    assert main(["--list-methods"]) == 0
    assert "ae" in capsys.readouterr().out


def test_profile_variant_is_an_ablation_row_of_the_run_profile(prepared, tmp_path):
    """``METHOD:profile=NAME`` trains that preset and files it next to the run's default row."""
    out = tmp_path / "run"
    argv = ["--protocol", "S1", "--methods", "ae", "--profile", "tiny", "--data", str(prepared), "--out", str(out), "--no-progress",
            "--variants", "ae:profile=quick", "--set", "ae:epochs=1"]
    assert main(argv) == 0
    records = {r["variant"]: r for r in _records(out)}
    assert set(records) == {"default", "profile=quick"}
    default, preset = records["default"], records["profile=quick"]
    assert preset["profile"] == default["profile"] == "tiny"  # same leaderboard section
    assert preset["config"]["image_size"] == 64 and default["config"]["image_size"] == 32  # quick's sizes
    assert preset["config"]["epochs"] == default["config"]["epochs"] == 1  # --set still applies on top
    assert preset["training_key"] != default["training_key"]


def test_unknown_profile_variant_is_a_usage_error(prepared, tmp_path, capsys):
    argv = ["--protocol", "S1", "--methods", "ae", "--profile", "tiny", "--data", str(prepared), "--out", str(tmp_path / "r"), "--variants", "ae:profile=fastest"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "ae:profile=fastest" in err and "fastest" in err


def test_a_record_from_another_config_or_data_is_not_skipped_silently(prepared, tmp_path, capsys):
    """Resume is by job, so a record made under other settings must stop the rerun (and
    --replace-changed keeps it aside, never deletes it, and reruns the job)."""
    from benchmarks.report.collect import load_records

    out = tmp_path / "run"
    base = ["--protocol", "S1", "--methods", "ae", "--profile", "tiny", "--data", str(prepared), "--out", str(out), "--no-progress"]
    assert main([*base, "--set", "ae:epochs=1"]) == 0
    record_path = next((out / "records").rglob("*.json"))
    before = record_path.read_bytes()

    with pytest.raises(SystemExit) as exc:
        main([*base, "--set", "ae:epochs=2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "epochs: 1 -> 2" in err and record_path.name in err and "--replace-changed" in err
    assert record_path.read_bytes() == before  # nothing touched

    assert main([*base, "--set", "ae:epochs=2", "--replace-changed"]) == 0
    assert json.loads(record_path.read_text())["config"]["epochs"] == 2
    kept = list((out / "superseded").rglob(record_path.name))
    assert len(kept) == 1 and kept[0].read_bytes() == before
    assert list((out / "superseded").rglob("*.per_image.csv")) or list((out / "superseded").rglob("*.examples.npz"))
    assert [r["config"]["epochs"] for r in load_records([out]).ok] == [2]  # reports skip superseded records

    # The same config on other data (here: a fingerprint edited in the record) is flagged too.
    record = json.loads(record_path.read_text())
    record["data"]["fingerprint"] = "0" * 16
    record_path.write_text(json.dumps(record))
    with pytest.raises(SystemExit):
        main([*base, "--set", "ae:epochs=2"])
    assert "data fingerprint: 0000000000000000 ->" in capsys.readouterr().err


def test_compile_flag_sets_compile_for_every_job_and_is_the_same_job(prepared, tmp_path):
    """--compile is --set METHOD:compile=true for every method; an explicit --set wins; a record
    made with it answers the job without it (an execution field: same weights on the CPU)."""
    from benchmarks.run import parse_set_overrides, with_compile

    assert parse_set_overrides(with_compile([], ["ae", "dae"], True), ["ae", "dae"]) == {"ae": {"compile": "true"}, "dae": {"compile": "true"}}
    assert parse_set_overrides(with_compile(["ae:compile=false"], ["ae"], True), ["ae"]) == {"ae": {"compile": "false"}}
    assert with_compile(["ae:epochs=1"], ["ae"], False) == ["ae:epochs=1"]

    out = tmp_path / "run"
    argv = ["--protocol", "S1", "--methods", "ae", "--profile", "tiny", "--data", str(prepared), "--out", str(out), "--no-progress"]
    assert main([*argv, "--compile"]) == 0
    [record] = _records(out)
    assert record["status"] == "ok" and record["config"]["compile"] is True
    stamps = {p: p.stat().st_mtime_ns for p in (out / "records").rglob("*.json")}
    assert main(argv) == 0  # not "changed": skipped, not rerun
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "records").rglob("*.json")}
