"""The job grid, variant parsing and atomic records."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks.jobs import Variant, build_jobs, group_jobs, parse_variants
from benchmarks.records import SCHEMA_VERSION, is_finished, read_record, write_record


def test_variants_one_knob_at_a_time_and_combined():
    variants = parse_variants(["madad:ddim_steps=2,5,10", "madad:gamma=0.4,none", "madad:ddim_steps=2+gamma=none"], ["madad", "ae"])
    names = [v.name for v in variants["madad"]]
    assert names == ["default", "ddim_steps=2", "ddim_steps=5", "ddim_steps=10", "gamma=0.4", "gamma=none", "ddim_steps=2+gamma=none"]
    assert variants["madad"][-1].as_dict == {"ddim_steps": "2", "gamma": "none"}
    assert [v.name for v in variants["ae"]] == ["default"]


@pytest.mark.parametrize("spec, message", [("ddim_steps=2", "METHOD:KNOB"), ("thor:t=1", "not among --methods"), ("madad:ddim_steps", "KNOB=VALUE")])
def test_bad_variant_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_variants([spec], ["madad"])


def test_jobs_group_by_shared_training():
    variants = {"madad": [Variant(), Variant("g=1", (("g", 1),))], "ae": [Variant()]}
    jobs = build_jobs("S2", ["madad", "ae"], "embedded", "embedded", ["T1", "T2"], [0, 1], "quick", variants)
    assert len(jobs) == 2 * 2 * 2 + 1 * 2 * 2
    groups = group_jobs(jobs)
    assert len(groups) == 8 and all(len({j.group_key for j in g}) == 1 for g in groups)
    assert len({j.job_id for j in jobs}) == len(jobs)
    assert len({j.record_path(__import__("pathlib").Path("out")) for j in jobs}) == len(jobs)


def test_records_are_written_atomically_and_read_back(tmp_path, monkeypatch):
    path = tmp_path / "r" / "job.json"
    write_record({"schema_version": SCHEMA_VERSION, "status": "ok", "metrics": {"max_dice": 0.5}}, path)
    assert is_finished(path) and read_record(path)["metrics"]["max_dice"] == 0.5

    # A crash in the middle of a write leaves the previous record intact and no temp file.
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_record({"schema_version": SCHEMA_VERSION, "status": "failed"}, path)
    assert json.loads(path.read_text())["status"] == "ok"
    assert [p.name for p in path.parent.iterdir()] == ["job.json"]

    path.write_text("{ truncated")
    assert read_record(path) is None and not is_finished(path)
