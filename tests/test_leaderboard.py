"""The leaderboard rebuilds tables and figures from fake records with known numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks import leaderboard
from benchmarks.report import load_published
from benchmarks.report import tables

REPO = Path(__file__).resolve().parent.parent
PUBLISHED = REPO / "results" / "published.csv"
MODALITIES = ("FLAIR", "T1CE", "T2", "T1")
BASE = {"ae": 0.30, "thor": 0.50, "madad": 0.60}
MOD_OFFSET = {"FLAIR": 0.10, "T1CE": 0.05, "T2": 0.0, "T1": -0.05}
SEED_OFFSET = {0: 0.0, 1: 0.02, 2: 0.06}
VARIANT_OFFSET = {"default": 0.0, "ddim_steps=2": -0.01, "gamma=none": -0.02, "source=latent_diff": -0.03}


def _record(protocol: str, method: str, modality: str, seed: int, profile: str, metrics: dict, variant: str = "default", status: str = "ok") -> dict:
    return {
        "schema_version": 1,
        "job_id": f"{protocol}/{profile}/{method}/embedded-{modality}/seed{seed}/{variant}",
        "status": status,
        "error": None,
        "method": method,
        "variant": variant,
        "variant_overrides": {} if variant == "default" else dict([variant.split("=")]),
        "profile": profile,
        "seed": seed,
        "protocol": {"name": protocol, "metric": "per-image max dice" if protocol == "S2" else "global max dice", "mode": "exact", "resolution": 128},
        "data": {"name": "embedded", "modality": modality, "fingerprint": "abc123def4567890", "n_test": 10},
        "metrics": metrics,
        "timings": {"fit_seconds": 10.0 + seed, "score_seconds": 2.0, "slices_per_second": 5.0, "reused_checkpoint": variant != "default"},
        "device": {"type": "cpu", "name": "x86_64"},
        "notes": {},
        "created": "2025-01-01T00:00:00+00:00",
        "examples": None,
        "per_image": None,
    }


def _write(path: Path, record: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return path


def _fake_examples(path: Path, method: str, with_reconstruction: bool) -> str:
    """Two synthetic 64x64 slices: an elliptic 'brain', a round lesion, a map that finds it."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    brain = (((yy - 32) / 26.0) ** 2 + ((xx - 32) / 20.0) ** 2 < 1).astype(np.uint8)
    images, maps, lesions, recons = [], [], [], []
    for k, (cy, cx, r) in enumerate(((24, 28, 7), (38, 36, 3))):
        lesion = (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r).astype(np.uint8)
        healthy = brain * (0.5 + 0.2 * np.sin(xx / 5.0) * np.cos(yy / 7.0))
        image = healthy + 0.4 * lesion + 0.02 * rng.standard_normal((64, 64)) * brain
        sharp = {"madad": 1.0, "thor": 0.7, "ae": 0.4}[method]
        amap = brain * (sharp * lesion + (1 - sharp) * 0.3 * rng.random((64, 64)))
        images.append(image[None]), maps.append(amap), lesions.append(lesion), recons.append(healthy[None])
    arrays = {"index": np.array([3, 7]), "image": np.stack(images).astype(np.float32), "map": np.stack(maps).astype(np.float32),
              "lesion_mask": np.stack(lesions), "brain_mask": np.stack([brain, brain])}
    if with_reconstruction:
        arrays["reconstruction"] = np.stack(recons).astype(np.float32)
    np.savez_compressed(path, **arrays)
    return path.name


def make_fake_runs(root: Path) -> Path:
    """S2 paper (3 methods x 4 modalities x 3 seeds + MAD-AD variants), S2 quick, S1 paper, a failure."""
    runs = root / "runs"
    for method, base in BASE.items():
        for seed, seed_offset in SEED_OFFSET.items():
            for modality in MODALITIES:
                if method == "thor" and seed == 2 and modality == "T1":
                    continue  # a missing job: THOR's seed 2 has no average
                variants = list(VARIANT_OFFSET) if method == "madad" and seed < 2 else ["default"]
                for variant in variants:
                    value = base + MOD_OFFSET[modality] + seed_offset + VARIANT_OFFSET[variant]
                    metrics = {"max_dice": value, "auroc": 0.9, "auprc": value / 2, "dice_at_val_threshold": value - 0.1,
                               "max_dice_small": value / 2, "max_dice_medium": value, "max_dice_large": value + 0.1}
                    rec = _record("S2", method, modality, seed, "paper", metrics, variant)
                    folder = runs / "a" / "records" / "S2" / "paper" / method
                    stem = f"embedded-{modality}__seed{seed}__{variant}"
                    if variant == "default" and method in ("thor", "madad"):
                        per_image = pd.DataFrame({"subject_id": [f"s{i}" for i in range(8)], "slice_index": 80,
                                                  "dice": np.linspace(value - 0.05, value + 0.05, 8) + (0.002 * np.arange(8) if method == "thor" else 0)})
                        folder.mkdir(parents=True, exist_ok=True)
                        per_image.to_csv(folder / f"{stem}.per_image.csv", index=False)
                        rec["per_image"] = f"{stem}.per_image.csv"
                    if variant == "default" and seed == 0 and modality == "FLAIR":
                        folder.mkdir(parents=True, exist_ok=True)
                        rec["examples"] = _fake_examples(folder / f"{stem}.examples.npz", method, method == "ae")
                    _write(folder / f"{stem}.json", rec)
    # a preset compared on one modality only: its row has no cell in the other columns
    partial = _record("S2", "madad", "FLAIR", 0, "paper", {"max_dice": 0.55, "auroc": 0.9}, "profile=official")
    _write(runs / "a" / "records" / "S2" / "paper" / "madad" / "embedded-FLAIR__seed0__profile=official.json", partial)
    for modality, value in (("FLAIR", 0.12), ("T1", 0.08)):  # quick profile, other runs folder
        _write(runs / "b" / f"quick-ae-{modality}.json", _record("S2", "ae", modality, 0, "quick", {"max_dice": value}))
    for method, base in (("ae", 0.20), ("madad", 0.50)):
        for seed in (0, 1):
            metrics = {"max_dice": base + 0.02 * seed, "max_dice_small": base / 4, "max_dice_medium": base, "max_dice_large": base + 0.1, "auroc": 0.8}
            _write(runs / "b" / "S1" / f"{method}-{seed}.json", _record("S1", method, "T1", seed, "paper", metrics))
    failed = _record("S2", "ddpm", "T2", 0, "paper", {}, status="failed")
    failed["error"] = "RuntimeError: CUDA out of memory\nTraceback (most recent call last): ..."
    _write(runs / "a" / "records" / "S2" / "paper" / "ddpm" / "failed.json", failed)
    _write(runs / "a" / "checkpoints" / "fit.json", {"fit_seconds": 3.0})  # not a record: skipped
    (runs / "a" / "broken.json").write_text("{not json")
    return runs


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lb")
    runs = make_fake_runs(root)
    out = root / "out"
    assert leaderboard.main(["--runs", str(runs / "a"), str(runs / "b"), "--out", str(out), "--published", str(PUBLISHED)]) == 0
    return out


def _section(markdown: str, title: str) -> str:
    start = markdown.index(f"## {title}")
    end = markdown.find("\n## ", start + 1)
    return markdown[start:end if end > 0 else None]


def _row(markdown_block: str, label: str) -> list[str]:
    line = next(l for l in markdown_block.splitlines() if l.startswith(f"| {label} |"))
    return [c.strip().strip("*") for c in line.strip("|").split(" | ")]


def test_means_stds_and_s2_average(built: Path) -> None:
    md = (built / "leaderboard.md").read_text()
    paper = _section(md, "S2 · embedded · paper profile")
    table2 = paper[paper.index("### Per-image Max Dice by modality"):paper.index("### Ablation")]
    # AE FLAIR: 40, 42, 46 -> 42.7 ± 3.1; AE average per seed 32.5, 34.5, 38.5 -> 35.2 ± 3.1
    assert _row(table2, "AE")[:7] == ["AE", "42.7 ± 3.1", "37.7 ± 3.1", "32.7 ± 3.1", "27.7 ± 3.1", "35.2 ± 3.1", "3"]
    # THOR's seed 2 lacks T1: T1 and the average come from seeds 0 and 1 only
    thor = _row(table2, "THOR")
    assert thor[4] == "46.0 ± 1.4 (n=2)" and thor[5] == "53.5 ± 1.4 (n=2)"
    assert _row(table2, "MAD-AD")[-1] == "best"
    assert _row(table2, "AE")[-1].startswith("0.000488 (n=12 jobs)")  # no per-image results: 12 seed x modality pairs
    # per-image pairs: 8 test images (not 11 jobs x 8 images), each averaged over seeds and modalities;
    # MAD-AD is ahead on every image, so the exact two-sided p is 2 / 2^8
    assert thor[-1] == "0.00781† (n=8 images)"
    csv = pd.read_csv(built / "tables" / "s2_embedded_paper_max_dice_by_modality.csv")
    assert csv.loc[csv["method"] == "thor", "n_pairs"].item() == 8
    ae = csv[csv["method"] == "ae"].iloc[0]
    assert ae["average_mean"] == pytest.approx(np.mean([32.5, 34.5, 38.5]))
    assert ae["FLAIR_std"] == pytest.approx(np.std([40, 42, 46], ddof=1))
    assert ae["published_FLAIR"] == 33.4


def test_profiles_not_mixed(built: Path) -> None:
    md = (built / "leaderboard.md").read_text()
    quick = _section(md, "S2 · embedded · quick profile (smoke-test scale, not comparable to papers)")
    row = _row(quick, "AE")
    assert row[1:5] == ["12.0", "8.0", "10.0", "1"]  # FLAIR, T1, average of the two, one seed
    assert "42.7" not in quick and "| MAD-AD" not in quick and "| THOR" not in quick
    paper = _section(md, "S2 · embedded · paper profile")
    assert "12.0" not in paper
    assert md.index("## S2 · embedded · paper profile") < md.index("## S2 · embedded · quick profile")


def test_published_side_by_side_and_marked(built: Path) -> None:
    md = (built / "leaderboard.md").read_text()
    paper = _section(md, "S2 · embedded · paper profile")
    assert "**Published (MAD-AD IPMI 2025, BraTS'21) — different data (the embedded sanity set is used here): not comparable**" in paper
    block = paper[paper.index("Published (MAD-AD IPMI 2025, BraTS'21)"):]
    assert _row(block, "MAD-AD")[1:] == ["76.2", "68.5", "73.2", "63.4", "70.3"]
    assert "## Published numbers (reference)" in md and "IterMask2" in md
    tex = (built / "tables" / "s2_embedded_paper_max_dice_by_modality.tex").read_text()
    assert "different data" in tex and "76.2" in tex


def test_ablation_has_variants_with_published_labels(built: Path) -> None:
    md = (built / "leaderboard.md").read_text()
    paper = _section(md, "S2 · embedded · paper profile")
    ablation = paper[paper.index("### Ablation of MAD-AD"):paper.index("### Further metrics")]
    for label in ("MAD-AD", "MAD-AD [ddim_steps=2]", "MAD-AD [gamma=none]", "MAD-AD [source=latent_diff]"):
        _row(ablation, label)
    ours, published = ablation.split("Published (")
    assert _row(ours, "MAD-AD [ddim_steps=2]")[1] == "70.0 ± 1.4"  # FLAIR 0.69, 0.71 (seeds 0, 1)
    assert _row(published, "MAD-AD [ddim_steps=2]")[1:] == ["75.3", "70.1", "68.5", "62.3", "69.0"]
    assert _row(published, "MAD-AD [source=latent_diff]")[-1] == "68.6"
    assert _row(ours, "MAD-AD [profile=official]")[1:5] == ["55.0", "–", "–", "–"]  # FLAIR only
    csv = pd.read_csv(built / "tables" / "s2_embedded_paper_ablation_madad.csv")
    assert sorted(csv["variant"]) == ["ddim_steps=2", "default", "gamma=none", "profile=official", "source=latent_diff"]


def test_s1_table_and_too_few_pairs(built: Path) -> None:
    md = (built / "leaderboard.md").read_text()
    s1 = _section(md, "S1 · embedded · paper profile")
    assert _row(s1, "AE")[1:7] == ["21.0 ± 1.4", "5.0 ± 0.0", "20.0 ± 0.0", "30.0 ± 0.0", "2", "n<5 (n=2 jobs)"]
    assert "Published (MAD-AD IPMI 2025, IXI → ATLAS 2.0)" in s1 and "| THOR |" not in s1


def _row_with(per_image: dict) -> tables.Row:
    row = tables.Row("x", "m", "default")
    row.per_image = dict(per_image)
    return row


def test_paired_test_counts_each_test_image_once() -> None:
    """3 seeds x 2 modalities x 6 images: n = 6, the test runs on per-image means, not on 36 pairs."""
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(0)
    images = [(f"s{i}", 80) for i in range(6)]
    best, other = {}, {}
    for seed in range(3):
        for modality in ("FLAIR", "T2"):
            for k, image in enumerate(images):
                noise = rng.normal(0, 5)
                best[(seed, modality, image)] = 60 + k + noise
                other[(seed, modality, image)] = 58 + k + rng.normal(0, 5)
    other[(2, "T2", images[0])] = 0.0
    other[(9, "T2", images[0])] = 99.0  # a job the best row lacks: never paired
    result = tables.paired_test(_row_with(best), _row_with(other))
    assert result.per_image and result.n == 6
    common = set(best) & set(other)

    def means(values):
        out = []
        for image in sorted(images, key=str):
            per_modality = [np.mean([values[(s, m, image)] for s in range(3)]) for m in ("FLAIR", "T2")]
            out.append(np.mean(per_modality))
        return out

    assert result.p == pytest.approx(wilcoxon(means(best), means(other)).pvalue, rel=1e-12)
    keys = sorted(common, key=str)
    old = wilcoxon([best[k] for k in keys], [other[k] for k in keys]).pvalue  # one pair per (seed, modality, image)
    assert len(keys) == 36 and old != pytest.approx(result.p, rel=0.05)
    assert result.text().endswith("(n=6 images)")
    # missing jobs: an image is averaged over the jobs both rows have
    partial = {k: v for k, v in best.items() if k[0] != 1}
    assert tables.per_image_means(partial, set(partial) & set(other))[images[1]] == pytest.approx(
        np.mean([np.mean([best[(s, m, images[1])] for s in (0, 2)]) for m in ("FLAIR", "T2")])
    )
    # fewer than MIN_PAIRS images: the per-job Max Dice pairs are tested instead
    few = _row_with({k: v for k, v in best.items() if k[2] in images[:3]})
    assert not tables.paired_test(few, _row_with(other)).per_image


def test_files_parse_and_figures_written(built: Path) -> None:
    tables = sorted(p.name for p in (built / "tables").iterdir())
    assert "s2_embedded_paper_max_dice_by_modality.tex" in tables and "s1_embedded_paper_max_dice_by_size.csv" in tables
    for tex in (built / "tables").glob("*.tex"):
        text = tex.read_text()
        assert text.count(r"\begin{") == text.count(r"\end{") == 2
        body = text[text.index(r"\midrule"):text.index(r"\bottomrule")].splitlines()[1:]
        n_cols = len(text.split(r"\begin{tabular}{")[1].split("}")[0])
        assert all(line.count(" & ") == n_cols - 1 for line in body), tex.name
    for csv in (built / "tables").glob("*.csv"):
        assert len(pd.read_csv(csv)) > 0, csv.name
    figures = {p.name for p in (built / "figures").glob("*.png")}
    assert {"s2_embedded_paper_max_dice_by_modality.png", "s2_embedded_paper_ablation_madad.png", "s2_embedded_paper_maps_flair.png"} <= figures
    md = (built / "leaderboard.md").read_text()
    assert "](figures/s2_embedded_paper_maps_flair.png)" in md and "](figures/s1_embedded_paper_max_dice_by_size.png)" in md


def test_failed_job_listed_and_non_records_skipped(built: Path) -> None:
    md = (built / "leaderboard.md").read_text()
    failed = _section(md, "Failed jobs")
    assert "RuntimeError: CUDA out of memory" in failed and "Traceback" not in failed and "DDPM" in failed
    assert "1 unreadable JSON file(s) skipped" in md


def test_empty_runs_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "runs").mkdir()
    out = tmp_path / "out"
    assert leaderboard.main(["--runs", str(tmp_path / "runs"), "--out", str(out), "--published", str(PUBLISHED)]) == 0
    assert "No finished result records" in capsys.readouterr().out
    md = (out / "leaderboard.md").read_text()
    assert "No finished result records were found" in md and "MAD-AD" in md and "70.3" in md


def test_rebuild_is_deterministic_and_removes_stale(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed in (0, 1):
        _write(runs / f"{seed}.json", _record("S1", "ae", "T1", seed, "paper", {"max_dice": 0.2 + seed / 100}))
    out = tmp_path / "out"
    (out / "tables").mkdir(parents=True)
    (out / "tables" / "old_table.csv").write_text("x\n1\n")
    argv = ["--runs", str(runs), "--out", str(out), "--published", str(PUBLISHED)]
    leaderboard.main(argv)
    first = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    leaderboard.main(argv)
    assert first == {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert "old_table.csv" not in first


def test_import_is_light() -> None:
    code = "import sys, benchmarks.leaderboard; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "False"


def test_floor_row_marked_in_every_table_and_drawn(tmp_path: Path) -> None:
    """The untrained intensity floor is labelled as such, listed first, and drawn on the bar chart."""
    from benchmarks.report import figures, tables
    from benchmarks.report.collect import load_records, records_frame

    runs = tmp_path / "runs"
    values = {"intensity": {"FLAIR": 0.70, "T1": 0.20}, "ae": {"FLAIR": 0.22, "T1": 0.10}}
    for method, per_modality in values.items():
        for modality, value in per_modality.items():
            metrics = {"max_dice": value, "auroc": 0.8, "max_dice_small": value / 2, "max_dice_medium": value, "max_dice_large": value}
            _write(runs / f"s2-{method}-{modality}.json", _record("S2", method, modality, 0, "quick", metrics))
        _write(runs / f"s1-{method}.json", _record("S1", method, "T1", 0, "quick", {"max_dice": per_modality["T1"], "auroc": 0.7}))
    out = tmp_path / "out"
    assert leaderboard.main(["--runs", str(runs), "--out", str(out), "--published", str(PUBLISHED)]) == 0
    md = (out / "leaderboard.md").read_text()
    label = "Intensity — floor (untrained)"
    assert "**Floor.**" in md
    for title in ("S2 · embedded · quick", "S1 · embedded · quick"):
        section = _section(md, title)
        for block in section.split("### ")[1:]:  # every table of the section
            if not block.startswith(("Per-image Max Dice", "Global Max Dice", "Further metrics", "Timings")):
                continue
            rows = [l for l in block.splitlines() if l.startswith("| ")][2:]  # after the header and the rule
            assert rows[0].startswith(f"| {label} |"), (title, block[:60])
    assert _row(_section(md, "S2 · embedded · quick"), label)[1:4] == ["70.0", "20.0", "45.0"]
    # the bar chart draws the floor's mean per column as a dashed line
    frame = records_frame(load_records([runs]).ok)
    s2 = frame[frame["protocol"] == "S2"]
    table = tables.comparison_table(s2, "x", "S2", load_published(PUBLISHED), "status")
    plt = figures._pyplot()
    fig, ax = plt.subplots()
    assert figures._draw_floor(ax, table) is not None
    drawn = sorted(float(c.get_segments()[0][0][1]) for c in ax.collections)
    assert drawn == pytest.approx([20.0, 45.0, 70.0])  # FLAIR, T1 and the average of the floor row
    plt.close(fig)
    assert (out / "figures" / "s2_embedded_quick_max_dice_by_modality.png").is_file()
    assert "Intensity --- floor (untrained) &" in (out / "tables" / "s2_embedded_quick_max_dice_by_modality.tex").read_text()
