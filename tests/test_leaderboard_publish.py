"""The leaderboard never rewrites shipped results by accident, and the shipped page is reproducible.

Each test works in a fresh git repository laid out like this one (results/records tracked,
results/runs for the user's own runs), with the command run from its root as a user would.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import leaderboard
from tests.test_leaderboard import PUBLISHED, make_fake_runs


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture()
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repo whose shipped page was published from fake runs and committed."""
    root = tmp_path / "repo"
    (root / "results").mkdir(parents=True)
    shutil.copyfile(PUBLISHED, root / "results" / "published.csv")
    runs = make_fake_runs(tmp_path)
    _git(tmp_path, "init", "-q", str(root))
    monkeypatch.chdir(root)
    assert leaderboard.main(["--runs", str(runs / "a"), str(runs / "b"), "--publish"]) == 0
    _git(root, "add", "-A")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "shipped")
    return root


def _status(repo: Path) -> str:
    return _git(repo, "status", "--porcelain", "--untracked-files=no")


def test_shipped_page_rebuilds_byte_for_byte(repo: Path) -> None:
    page = (repo / "results" / "leaderboard.md").read_text()
    assert "S2 · embedded · paper profile" in page  # the published runs made it onto the page
    assert len(list((repo / "results" / "figures").glob("*.png"))) >= 2
    assert leaderboard.main(["--shipped"]) == 0
    assert _status(repo) == ""


def test_user_runs_never_touch_the_shipped_page(repo: Path, tmp_path: Path) -> None:
    from tests.test_leaderboard import _record, _write

    _write(repo / "results" / "runs" / "mine" / "x.json", _record("S2", "ae", "FLAIR", 0, "quick", {"max_dice": 0.1}))
    assert leaderboard.main([]) == 0  # the default: results/runs -> results/local
    assert _status(repo) == ""
    local = (repo / "results" / "local" / "leaderboard.md").read_text()
    assert "1 finished" in local


def test_refuses_to_overwrite_tracked_files_without_force(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_leaderboard import _record, _write

    _write(repo / "results" / "runs" / "mine" / "x.json", _record("S2", "ae", "FLAIR", 0, "quick", {"max_dice": 0.1}))
    before = (repo / "results" / "leaderboard.md").read_bytes()
    assert leaderboard.main(["--runs", "results/runs", "--out", "results"]) == 2
    assert "git tracks" in capsys.readouterr().err
    assert (repo / "results" / "leaderboard.md").read_bytes() == before
    assert _status(repo) == ""
    assert leaderboard.main(["--runs", "results/runs", "--out", "results", "--force"]) == 0
    assert "leaderboard.md" in _status(repo)


def test_shipped_records_carry_only_the_examples_the_figures_draw(repo: Path) -> None:
    shipped = repo / "results" / "records"
    examples = sorted(p.name for p in shipped.rglob("*.examples.npz"))
    # fake runs: default variant, seed 0, FLAIR for each S2 paper method
    assert examples == ["embedded-FLAIR__seed0__default.examples.npz"] * 3
    assert list(shipped.rglob("*.per_image.csv"))


def test_tiny_sections_are_marked_last_and_never_beside_the_papers(tmp_path: Path) -> None:
    from tests.test_leaderboard import _record, _write

    runs = tmp_path / "runs"
    for profile in ("tiny", "paper"):
        for modality in ("FLAIR", "T1"):
            record = _record("S2", "ae", modality, 0, profile, {"max_dice": 0.2, "auroc": 0.8})
            record["timings"]["threads"] = 1
            _write(runs / f"{profile}-{modality}.json", record)
    out = tmp_path / "page"
    assert leaderboard.main(["--runs", str(runs), "--out", str(out), "--published", str(PUBLISHED)]) == 0
    md = (out / "leaderboard.md").read_text()
    paper, tiny = md.index("## S2 · embedded · paper profile"), md.index("## S2 · embedded · tiny profile")
    assert paper < tiny
    tiny_section = md[tiny:]
    assert "smoke test of the code path, not comparable" in tiny_section
    assert "Published" not in tiny_section.split("## Published numbers")[0].split("### Metrics")[0]
    assert "published" in md[paper:tiny].lower()
    timings = tiny_section[tiny_section.index("### Timings"):]
    assert "| threads |" in timings.splitlines()[2] and timings.splitlines()[4].rstrip().endswith("| 1 |")
