"""Assemble the leaderboard: sections (protocol x data x profile), files, and leaderboard.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import figures, tables
from .collect import RecordSet, error_line, job_key, records_frame
from .published import FLOOR_MARK, PUBLISHED_DATA, Published, display_name, method_rank
from .tables import Table

QUICK_LABEL = "quick profile (smoke-test scale, not comparable to papers)"
TINY_LABEL = "tiny profile (smoke test of the code path, not comparable)"
#: Profiles that shrink the networks and budgets: a banner, never beside the papers' numbers.
SCALED_PROFILES = {
    "quick": (QUICK_LABEL, "Small models and few steps, trained in minutes on a CPU, for checking the pipeline; "
              "these numbers do not rank the methods as the papers' settings would."),
    "tiny": (TINY_LABEL, "Networks of a few thousand weights trained for seconds, for testing that every code path runs; "
             "the numbers say nothing about the methods."),
}
_PROFILE_ORDER = {"paper": 0, "official": 1, "quick": 9, "tiny": 10}


@dataclass
class Section:
    protocol: str
    data: str
    profile: str
    frame: pd.DataFrame
    tables: list[Table] = field(default_factory=list)
    figures: dict[str, Path] = field(default_factory=dict)  # table slug (or "maps:<modality>") -> png
    notes: list[str] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return tables.slug(f"{self.protocol}_{self.data}_{self.profile}")

    @property
    def profile_label(self) -> str:
        return SCALED_PROFILES[self.profile][0] if self.profile in SCALED_PROFILES else f"{self.profile} profile"

    @property
    def title(self) -> str:
        return f"{self.protocol} · {self.data} · {self.profile_label}"

    @property
    def published_short(self) -> str:
        """The same, short enough for a figure legend."""
        if self.data == "embedded":
            return "different data, not comparable"
        return f"{self.profile} run here, not comparable" if self.profile in SCALED_PROFILES else "same protocol"

    @property
    def published_status(self) -> str:
        """How far the published numbers can be compared with this section's."""
        if self.data == "embedded":
            return "different data (the embedded sanity set is used here): not comparable"
        if self.profile in SCALED_PROFILES:
            return f"full-scale training in the paper, a {self.profile}-profile smoke test here: not comparable"
        return "as printed in the paper; same protocol, preprocessing may differ"


def _section_order(key: tuple[str, str, str]) -> tuple:
    protocol, data, profile = key
    rank = _PROFILE_ORDER.get(profile, 5)
    return (protocol, data == "embedded", data, rank, profile)


def build_sections(frame: pd.DataFrame, published: Published) -> list[Section]:
    """One section per (protocol, data name, profile): profiles are never mixed."""
    if frame.empty:
        return []
    sections = []
    for key in sorted(frame.groupby(["protocol", "data", "profile"]).groups, key=_section_order):
        part = frame[(frame["protocol"] == key[0]) & (frame["data"] == key[1]) & (frame["profile"] == key[2])]
        section = Section(*key, frame=part.reset_index(drop=True))
        _fill(section, published)
        sections.append(section)
    return sections


def _fill(section: Section, published: Published) -> None:
    frame, protocol, slug = section.frame, section.protocol, section.slug
    status = (section.published_status, section.published_short)
    if section.profile == "tiny":  # a code-path smoke test: never beside the papers' numbers
        published = Published(published.frame.iloc[0:0])
    built = [
        tables.comparison_table(frame, slug, protocol, published, *status),
        *tables.ablation_tables(frame, slug, protocol, published, *status),
        tables.metrics_table(frame, slug, protocol),
        tables.timings_table(frame, slug, protocol),
    ]
    section.tables = [t for t in built if t is not None]
    if section.profile == "tiny":
        for table in section.tables:
            table.published_caption = None  # no published block at all
    fingerprints = sorted(frame["fingerprint"].unique())
    if len(fingerprints) > 1:
        section.notes.append(f"warning: {len(fingerprints)} different data fingerprints in this section ({', '.join(f[:12] for f in fingerprints)}); the data changed between runs")
    modes = sorted(frame["mode"].unique())
    if len(modes) > 1:
        section.notes.append(f"warning: records use different metric modes ({', '.join(modes)})")


def write_outputs(sections: list[Section], out: Path) -> list[Path]:
    """Write CSV/LaTeX per table and the figures; return every file written."""
    table_dir, figure_dir = out / "tables", out / "figures"
    table_dir.mkdir(parents=True, exist_ok=True)
    figure_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    long: list[dict[str, Any]] = []
    for section in sections:
        for table in section.tables:
            csv_path, tex_path = table_dir / f"{table.slug}.csv", table_dir / f"{table.slug}.tex"
            tables.to_csv(table, csv_path)
            tex_path.write_text(tables.to_latex(table, f"{section.title}: {table.title}"))
            written += [csv_path, tex_path]
            if table.kind in ("comparison", "ablation"):
                png = figures.bar_chart(table, f"{section.title}\n{table.title}", figure_dir / f"{table.slug}.png")
                if png is not None:
                    section.figures[table.slug] = png
                    written.append(png)
        long += tables.long_values(section.tables, section.slug)
        for modality, grid in _map_grids(section, figure_dir).items():
            section.figures[f"maps:{modality}"] = grid
            written.append(grid)
    long_path = table_dir / "values_long.csv"
    pd.DataFrame(long, columns=["section", "table", "row", "method", "variant", "column", "key", "value"]).to_csv(long_path, index=False)
    written.append(long_path)
    return written


def _map_grids(section: Section, figure_dir: Path) -> dict[str, Path]:
    """One grid per modality: default variants, lowest seed, per method, with the prediction at its threshold."""
    frame = section.frame[(section.frame["variant"] == "default") & section.frame["examples"].notna()]
    grids: dict[str, Path] = {}
    for modality in tables.ordered_modalities(frame["modality"]) if not frame.empty else []:
        rows = frame[frame["modality"] == modality]
        entries = []
        for method in sorted(rows["method"].unique(), key=method_rank):
            rec = rows[rows["method"] == method].sort_values("seed").iloc[0]
            params = rec["protocol_params"] if isinstance(rec["protocol_params"], dict) else {}
            threshold = rec.get("m_threshold")
            entries.append(figures.MapEntry(
                display_name(method), Path(rec["examples"]), modality,
                threshold=None if threshold is None or pd.isna(threshold) else float(threshold),
                strict=str(params.get("mode")) == "grid",
                brain_masked=bool(params.get("apply_brain_mask", False)),
            ))
        path = figure_dir / f"{section.slug}_maps_{tables.slug(modality)}.png"
        grid = figures.map_grid(entries, f"{section.title} — {modality}, lowest seed per method", path)
        if grid is not None:
            grids[modality] = grid
    return grids


def remove_stale(out: Path, keep: list[Path]) -> list[Path]:
    """Delete leaderboard outputs of earlier builds that this build did not write again."""
    keep_set = {p.resolve() for p in keep}
    removed = []
    for folder, patterns in ((out / "tables", ("*.csv", "*.tex")), (out / "figures", ("*.png",))):
        for pattern in patterns:
            for path in sorted(folder.glob(pattern)):
                if path.resolve() not in keep_set:
                    path.unlink()
                    removed.append(path)
    return removed


# ----------------------------------------------------------------------------- markdown


def render_markdown(sections: list[Section], records: RecordSet, published: Published, out: Path, runs: list[Path]) -> str:
    n_ok, n_failed = sum(len(s.frame) for s in sections), len(records.failed)
    where = ", ".join(f"`{_display_path(d)}`" for d in runs) or "(none)"
    lines = [
        "# uad-bench leaderboard",
        "",
        f"Generated by `python -m benchmarks.leaderboard` from the stored result records alone: "
        f"{n_ok} finished and {n_failed} failed job record(s) under {where}. Do not edit by hand; rerun the command.",
        "",
    ]
    if not sections:
        lines += ["**No finished result records were found**, so there are no tables of ours yet. "
                  "Run e.g. `python -m benchmarks.run --protocol S2 --methods ae` first. The published numbers are listed below.", ""]
        if records.missing_dirs:
            lines += [f"Runs folder(s) not found: {', '.join(f'`{_display_path(d)}`' for d in records.missing_dirs)}.", ""]
    else:
        lines += _how_to_read() + _contents(sections, records)
        for section in sections:
            lines += _section_markdown(section, out)
    lines += _problems(records, published)
    lines += _failed_markdown(records)
    lines += _published_reference(published)
    return "\n".join(lines).rstrip() + "\n"


def _how_to_read() -> list[str]:
    return [
        "**How to read.** Metric values are x 100 (Max Dice in %). A cell is `mean ± std` over seeds "
        "(sample std; a single seed shows the mean alone, and `(n=k)` marks a cell with fewer seeds than its row). "
        "The best mean of each column is bold. Sections never mix profiles, data sets or protocols; "
        f"{QUICK_LABEL} sections are smoke tests. S2's `average` is, per seed, the mean over all modalities of the "
        "section, then mean ± std over seeds (a seed missing a modality has no average).",
        "",
        f"**Floor.** Rows marked *{FLOOR_MARK}* are the untrained intensity map (Meissen et al., 2021): the slice's own "
        "intensity in the brain (its shifted negative for T1/T1CE). A learned method that does not beat it has learned "
        "nothing beyond \"bright (or dark) is abnormal\"; bar charts draw it as a dashed line.",
        "",
        f"**Paired test.** {tables.TEST_NAME}.",
        "",
        "**Published numbers** (results/published.csv, from the MAD-AD paper) appear below each table in their own block, "
        "with how far they compare: on the embedded sanity data they are *different data* and not comparable.",
        "",
    ]


def _contents(sections: list[Section], records: RecordSet) -> list[str]:
    lines = ["## Contents", ""]
    lines += [f"- [{tables.md_inline(s.title)}](#{s.slug}) — {len(s.frame)} job(s), methods: "
              f"{', '.join(tables.md_inline(display_name(m)) for m in sorted(s.frame['method'].unique(), key=method_rank))}" for s in sections]
    if records.failed:
        lines.append(f"- [Failed jobs](#failed-jobs) — {len(records.failed)}")
    lines += ["- [Published numbers (reference)](#published-numbers)", ""]
    return lines


def _section_markdown(section: Section, out: Path) -> list[str]:
    frame = section.frame
    seeds = sorted(pd.to_numeric(frame["seed"], errors="coerce").dropna().astype(int).unique().tolist())
    lines = [f'<a id="{section.slug}"></a>', "", f"## {tables.md_inline(section.title)}", ""]
    if section.profile in SCALED_PROFILES:
        label, text = SCALED_PROFILES[section.profile]
        lines += [f"> **{label}.** {text}", ""]
    lines += [
        f"- data {tables.md_inline(section.data)}: fingerprint(s) {', '.join(tables.md_inline(f[:12]) for f in sorted(frame['fingerprint'].unique()))}; "
        f"modalities {', '.join(tables.md_inline(m) for m in tables.ordered_modalities(frame['modality']))}; seeds {', '.join(map(str, seeds))}; {len(frame)} job(s)",
    ]
    lines += [f"- {tables.md_inline(note)}" for note in section.notes]
    lines += _protocol_markdown(frame)
    lines.append("")
    for table in section.tables:
        lines += [f"### {tables.md_inline(table.title)}", "", tables.to_markdown(table), ""]
        files = f"[CSV](tables/{table.slug}.csv) · [LaTeX](tables/{table.slug}.tex)"
        lines += [f"Files: {files}", ""]
        png = section.figures.get(table.slug)
        if png is not None:
            lines += [f"![{tables.md_inline(table.title)}]({_relative(png, out)})", ""]
    grids = {k.split(":", 1)[1]: p for k, p in section.figures.items() if k.startswith("maps:")}
    if grids:
        lines += ["### Anomaly maps", ""]
        for modality, grid in grids.items():
            lines += [f"![anomaly maps, {tables.md_inline(modality)}]({_relative(grid, out)})", ""]
    return lines


def _protocol_params(frame: pd.DataFrame) -> dict[str, str]:
    """The protocol parameters of the section's records ('varies' where they disagree)."""
    params: dict[str, set[str]] = {}
    for item in frame["protocol_params"]:
        for key, value in (item or {}).items():
            if key == "name":
                continue
            text = " x ".join(map(str, value)) if isinstance(value, list) else str(value)
            params.setdefault(key, set()).add(text)
    return {k: (next(iter(v)) if len(v) == 1 else "varies between records") for k, v in sorted(params.items())}


def _protocol_markdown(frame: pd.DataFrame) -> list[str]:
    params = _protocol_params(frame)
    if not params:
        return ["- protocol: (no parameters recorded)"]
    short = "; ".join(f"{tables.md_inline(k)} = {tables.md_inline(v)}" for k, v in params.items() if len(v) <= 40)
    lines = [f"- protocol: {short}"]
    lines += ["", "<details><summary>all protocol parameters</summary>", ""]
    lines += [f"- **{tables.md_inline(k)}**: {tables.md_inline(v)}" for k, v in params.items()]
    return lines + ["", "</details>"]


def _failed_markdown(records: RecordSet) -> list[str]:
    if not records.failed:
        return []
    rows = []
    for record in records.failed:
        key = job_key(record)
        rows.append([key["protocol"], key["data"], key["profile"], display_name(key["method"]), key["variant"], key["modality"], str(key["seed"]), error_line(record)])
    return ['<a id="failed-jobs"></a>', "", "## Failed jobs", "", f"{len(rows)} job(s) failed; rerun them with the same `benchmarks.run` command (finished jobs are skipped).", "",
            tables.markdown_table(["protocol", "data", "profile", "method", "variant", "modality", "seed", "error"], rows, ["l"] * 8), ""]


def _problems(records: RecordSet, published: Published) -> list[str]:
    notes = [*published.problems]
    if records.unreadable:
        notes.append(f"{len(records.unreadable)} unreadable JSON file(s) skipped: " + ", ".join(tables.md_inline(_display_path(p)) for p in records.unreadable[:5]))
    for path, problem in records.invalid:
        notes.append(f"record {tables.md_inline(_display_path(path))} not shown: {tables.md_inline(problem)}")
    if records.duplicates:
        notes.append(f"{len(records.duplicates)} older duplicate record(s) of the same job ignored (the newest wins)")
    if records.dry_run:
        notes.append(f"{len(records.dry_run)} dry-run record(s) ignored (`benchmarks.run --dry-run`: training and chains cut short, not results)")
    return (["## Notes", "", *[f"- {n}" for n in notes], ""]) if notes else []


def _published_reference(published: Published) -> list[str]:
    lines = ['<a id="published-numbers"></a>', "", "## Published numbers (reference)", ""]
    if not len(published):
        return lines + ["No published numbers available.", ""]
    frame = published.frame
    lines += [f"From `{_display_path(published.path) if published.path else 'published.csv'}` (in %, as printed in the papers; not produced by this suite).", ""]
    for (source, number, protocol), part in frame.groupby(["source", "table", "protocol"], sort=True):
        caption = str(part["note"].iloc[0])
        if protocol == "S1":
            columns = [c for c in ("average", "small", "medium", "large") if c in part["column"].values]
        else:
            columns = [c for c in (*tables.MODALITY_ORDER, "average") if c in part["column"].values]
        columns += [c for c in dict.fromkeys(part["column"]) if c not in columns]
        rows = []
        for method in dict.fromkeys(part["method"]):
            sub = part[part["method"] == method]
            values = dict(zip(sub["column"], sub["max_dice"]))
            extra = sorted({n for n in sub["note"] if n and n != caption})
            rows.append([str(method), *[tables._fmt(values.get(c), 1) for c in columns], "; ".join(extra)])
        lines += [f"**{source}, Table {number} ({protocol}, {PUBLISHED_DATA.get(protocol, '')})** — {caption}", "",
                  tables.markdown_table(["method", *columns, "note"], rows, ["l"] + ["r"] * len(columns) + ["l"]), ""]
    return lines


def _relative(path: Path, out: Path) -> str:
    try:
        return path.resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _display_path(path: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def build(records: RecordSet, published: Published, out: Path, runs: list[Path]) -> tuple[list[Section], list[Path]]:
    """Everything: sections, CSV/LaTeX/figures, leaderboard.md; returns sections and files written."""
    frame = records_frame(records.ok)
    sections = build_sections(frame, published)
    out.mkdir(parents=True, exist_ok=True)
    written = write_outputs(sections, out)
    page = out / "leaderboard.md"
    page.write_text(render_markdown(sections, records, published, out, runs))
    written.append(page)
    remove_stale(out, written)
    return sections, written


__all__ = ["Section", "build", "build_sections", "render_markdown"]
