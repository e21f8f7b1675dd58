"""The end-of-run summary: per job, then per method averaged over modalities (seeds first), with the floor."""

from __future__ import annotations

from benchmarks.run import summary_table


def _record(method: str, modality: str, seed: int, dice: float) -> dict:
    return {"method": method, "variant": "default", "seed": seed, "status": "ok", "error": None,
            "data": {"modality": modality}, "metrics": {"max_dice": dice, "auprc": dice / 2, "auroc": 0.9},
            "timings": {"fit_seconds": 1.0, "slices_per_second": 10.0}}


def _average_row(text: str, method: str) -> list[str]:
    block = text.split("Average over modalities")[1]
    return next(line.split() for line in block.splitlines() if line.split()[:1] == [method])


def test_average_takes_seeds_first_then_modalities_and_marks_the_floor() -> None:
    records = [_record("ae", "T1", 0, 0.2), _record("ae", "T1", 1, 0.4), _record("ae", "T2", 0, 0.6),
               _record("intensity", "T1", 0, 0.5), _record("intensity", "T2", 0, 0.7)]
    text = summary_table(records)
    ae = _average_row(text, "ae")
    assert ae[2] == "45.0"  # (mean(20, 40) + 60) / 2, not the mean of three jobs (40.0)
    assert ae[3] == "22.5"  # AUPRC the same way
    assert ae[5:7] == ["2", "2"]  # modalities, seeds
    floor = _average_row(text, "intensity")
    assert floor[2] == "60.0" and " ".join(floor[-2:]) == "untrained floor"
    assert "add intensity to --methods" not in text


def test_without_the_floor_the_summary_says_how_to_add_it() -> None:
    assert "add intensity to --methods" in summary_table([_record("ae", "T1", 0, 0.2)])
