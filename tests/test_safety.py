"""Names from manifests, plugins and the command line never steer a write outside its root;
files are created with the mode the umask gives."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from benchmarks.jobs import Job, Variant, inside, safe_component
from methods.atomic import atomic_write_text


@pytest.mark.parametrize("name", ["../../x", "..", ".", "", "a/b", "/etc/passwd", ".hidden", "ok-Name_1.2=3+4"])
def test_safe_component_is_one_plain_component(name: str) -> None:
    part = safe_component(name)
    assert part and "/" not in part and not part.startswith(".") and part not in (".", "..")
    if name == "ok-Name_1.2=3+4":
        assert part == name  # ordinary names are kept as they are


def test_record_path_of_hostile_names_stays_in_the_run_folder(tmp_path: Path) -> None:
    job = Job("S2", "../../../m", "embedded", "../../x", "../T1", 0, "../quick", Variant("../../v", (("a", "1"),)))
    path = job.record_path(tmp_path / "run")
    assert (tmp_path / "run").resolve() in path.resolve().parents
    assert path.relative_to(tmp_path / "run").parts[0] == "records"


def test_inside_refuses_an_escape(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    os.symlink(tmp_path, tmp_path / "root" / "link")  # a link out of the root is an escape too
    with pytest.raises(ValueError, match="outside"):
        inside(tmp_path / "root", tmp_path / "root" / "link" / "file")
    assert inside(tmp_path / "root", tmp_path / "root" / "a" / "b") == tmp_path / "root" / "a" / "b"


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path: Path, mask: int, mode: int) -> None:
    previous = os.umask(mask)
    try:
        atomic_write_text("x", tmp_path / "f.json")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == mode


def test_leaderboard_renders_hostile_record_fields_inert_and_hides_impossible_metrics(tmp_path: Path) -> None:
    from benchmarks import leaderboard
    from tests.test_leaderboard import PUBLISHED, _record, _write

    runs = tmp_path / "runs"
    hostile = _record("S2", "<script>alert(1)</script>", "FLAIR", 0, "paper", {"max_dice": 0.3, "auroc": 0.8})
    hostile["variant"] = "[click](javascript:alert(1))"
    hostile["data"]["name"] = "x\n# Injected heading <img src=x onerror=alert(1)>"
    _write(runs / "hostile.json", hostile)
    failed = _record("S2", "ae", "T1", 0, "paper", {}, status="failed")
    failed["error"] = "<iframe src=javascript:alert(1)>"
    _write(runs / "failed.json", failed)
    _write(runs / "edited.json", _record("S2", "ae", "FLAIR", 1, "paper", {"max_dice": 5.0, "auroc": 0.8}))
    out = tmp_path / "page"
    assert leaderboard.main(["--runs", str(runs), "--out", str(out), "--published", str(PUBLISHED)]) == 0
    md = (out / "leaderboard.md").read_text()
    for raw in ("<script", "<img", "<iframe", "](javascript:"):
        assert raw not in md, raw
    assert not any(line.startswith("# Injected") for line in md.splitlines())
    assert "edited.json not shown: max\\_dice = 5.0 is outside \\[0, 1\\]" in md
    assert "500.0" not in md  # the edited record is in no table


def test_plugins_are_labelled_as_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.plugins import ENV_VAR, load_plugins
    from benchmarks.run import list_methods_text
    from methods.registry import method_sources

    monkeypatch.setenv(ENV_VAR, "tests.toy_method")
    load_plugins()
    sources = method_sources()
    assert sources["toy-exec"] == "plugin tests.toy_method"
    assert sources["ae"] == "built-in"
    assert "load only code you trust" in list_methods_text()


def test_a_foreign_datasets_package_is_named_at_import(tmp_path: Path) -> None:
    import subprocess
    import sys

    fake = tmp_path / "site" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("# another project's package of the same name\n")
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{repo}")
    done = subprocess.run([sys.executable, "-c", "import benchmarks"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "not uad-bench's own" in done.stderr and "virtual environment of its own" in done.stderr
    env["PYTHONPATH"] = str(repo)
    assert subprocess.run([sys.executable, "-c", "import benchmarks"], cwd=tmp_path, env=env, timeout=120).returncode == 0
