"""Leaderboard tables built from the records frame, and their markdown / CSV / LaTeX forms.

Layouts follow the MAD-AD paper: Table 1 (S1: rows = methods, columns = average Max Dice
and the small/medium/large buckets), Table 2 (S2: rows = methods, columns = modalities and
their average), Tables 3/4 (ablations: rows = variants of one method, the columns of the
protocol's main table). Values are fractions in the records and x 100 here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .published import Published, display_name, method_rank, row_label

SCALE = 100.0
MIN_PAIRS = 5  # below this the Wilcoxon test is not run (n = 5 cannot reach p < 0.05 anyway)
S1_COLUMNS: tuple[tuple[str, str], ...] = (
    ("average", "max_dice"),
    ("small", "max_dice_small"),
    ("medium", "max_dice_medium"),
    ("large", "max_dice_large"),
)
MODALITY_ORDER: tuple[str, ...] = ("FLAIR", "T1CE", "T2", "T1")
SECONDARY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("AUROC", "auroc"),
    ("AUPRC", "auprc"),
    ("Dice @ val. threshold", "dice_at_val_threshold"),
    ("small", "max_dice_small"),
    ("medium", "max_dice_medium"),
    ("large", "max_dice_large"),
    # S2 records since the bucket Dice at the one global threshold (IterMask2) exists; absent columns are dropped
    ("small @ global thr.", "dice_small_at_global"),
    ("medium @ global thr.", "dice_medium_at_global"),
    ("large @ global thr.", "dice_large_at_global"),
)
TEST_NAME = (
    "Wilcoxon signed-rank test (scipy.stats.wilcoxon, two-sided) of each row against the best row "
    "(highest mean in the `average` column). Pairs are test images (marked †): each image's Dice at the "
    "reported threshold, over the (seed, modality) jobs both rows have, averaged over seeds and then over "
    "modalities, so that every test image counts once (`n=k images`); without per-image results, the "
    "per-job Max Dice of every (seed, modality) both rows have (`n=k jobs`). "
    f"With fewer than {MIN_PAIRS} pairs no test is run (shown as `n<{MIN_PAIRS}`)"
)


@dataclass
class Cell:
    """One table cell: a value per seed (or per job), already scaled."""

    values: dict[Any, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.values.values()))) if self.values else math.nan

    @property
    def std(self) -> float:
        # Sample std over seeds; undefined with one seed.
        return float(np.std(list(self.values.values()), ddof=1)) if self.n > 1 else math.nan


@dataclass
class TestResult:
    n: int
    p: float | None
    per_image: bool = False

    def text(self) -> str:
        unit = "images" if self.per_image else "jobs"
        if self.p is None:
            return f"n<{MIN_PAIRS} (n={self.n} {unit})"
        mark = "†" if self.per_image else ""
        return f"{self.p:.3g}{mark} (n={self.n} {unit})"


@dataclass
class Row:
    label: str
    method: str
    variant: str
    modality: str | None = None
    cells: dict[str, Cell] = field(default_factory=dict)
    published: dict[str, float] = field(default_factory=dict)
    pairs: dict[tuple, float] = field(default_factory=dict)  # (seed, modality) -> headline value
    per_image: dict[tuple, float] = field(default_factory=dict)  # (seed, modality, image) -> Dice
    extra: dict[str, str] = field(default_factory=dict)  # text columns (timings: device, jobs)
    test: TestResult | None = None
    best: bool = False
    count: int | None = None  # overrides the seed count (timings count jobs)

    @property
    def n_seeds(self) -> int:
        if self.count is not None:
            return self.count
        return max((c.n for c in self.cells.values()), default=0)


@dataclass
class Table:
    slug: str
    title: str
    kind: str  # "comparison" | "ablation" | "metrics" | "timings"
    protocol: str
    row_header: str
    columns: list[str]
    rows: list[Row]
    headline: str | None = None  # column that decides the best row
    decimals: int | None = 1  # None: adapted to each value (timings)
    spread: str = "seeds"
    published_caption: str | None = None  # None: the table has no published block
    published_status: str = ""
    published_short: str = ""  # for figure legends
    extra_columns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def has_tests(self) -> bool:
        return len(self.rows) > 1 and any(r.test is not None or r.best for r in self.rows)

    @property
    def has_published(self) -> bool:
        return any(r.published for r in self.rows)


# ----------------------------------------------------------------------------- building


def columns_for(protocol: str, frame: pd.DataFrame) -> list[str]:
    if protocol == "S2":
        return ordered_modalities(frame["modality"]) + ["average"]
    return [name for name, _ in S1_COLUMNS]


def ordered_modalities(values: pd.Series | list[str]) -> list[str]:
    present = sorted(set(values))
    known = [m for m in MODALITY_ORDER if m in present]
    return known + [m for m in present if m not in known]


def comparison_table(frame: pd.DataFrame, section: str, protocol: str, published: Published, status: str, short: str = "") -> Table | None:
    """Table 1 (S1) or Table 2 (S2) layout over the default variants."""
    base = frame[frame["variant"] == "default"]
    if base.empty:
        return None
    number = "2" if protocol == "S2" else "1"
    what, name = ("Per-image Max Dice by modality", "max_dice_by_modality") if protocol == "S2" else ("Global Max Dice by lesion size", "max_dice_by_size")
    table = _empty_table(f"{section}_{name}", f"{what} (paper Table {number} layout)", "comparison", "method", frame, protocol, published, status, short)
    for method in sorted(base["method"].unique(), key=method_rank):
        table.rows.extend(_score_rows(base[base["method"] == method], protocol, frame, published))
    _run_tests(table)
    return table


def _empty_table(
    table_slug: str, title: str, kind: str, row_header: str, frame: pd.DataFrame, protocol: str, published: Published, status: str, short: str
) -> Table:
    """A comparison or ablation table with the protocol's columns and its published block's captions."""
    return Table(
        slug=table_slug,
        title=title,
        kind=kind,
        protocol=protocol,
        row_header=row_header,
        columns=columns_for(protocol, frame),
        rows=[],
        headline="average",
        published_caption=published.caption(protocol),
        published_status=status,
        published_short=short or status,
    )


def ablation_tables(frame: pd.DataFrame, section: str, protocol: str, published: Published, status: str, short: str = "") -> list[Table]:
    """Tables 3/4 layout: one table per method that has variants besides the default."""
    tables = []
    for method in sorted(frame["method"].unique(), key=method_rank):
        subset = frame[frame["method"] == method]
        if set(subset["variant"]) <= {"default"}:
            continue
        title = f"Ablation of {display_name(method)} (Tables 3/4 layout)"
        table = _empty_table(f"{section}_ablation_{slug(method)}", title, "ablation", "variant", frame, protocol, published, status, short)
        variants = sorted(subset["variant"].unique(), key=lambda v: (v != "default", v))
        for variant in variants:
            table.rows.extend(_score_rows(subset[subset["variant"] == variant], protocol, frame, published))
        _run_tests(table)
        tables.append(table)
    return tables


def _score_rows(records: pd.DataFrame, protocol: str, section_frame: pd.DataFrame, published: Published) -> list[Row]:
    """Rows of one (method, variant): one row, or one per modality when S1 has several."""
    method, variant = records["method"].iloc[0], records["variant"].iloc[0]
    if protocol == "S2":
        row = Row(row_label(method, variant), method, variant)
        _fill_by_modality(row, records, ordered_modalities(section_frame["modality"]))
        groups = [row]
    else:
        several = section_frame["modality"].nunique() > 1
        groups = []
        for modality, part in records.groupby("modality", sort=True):
            label = row_label(method, variant) + (f" ({modality})" if several else "")
            row = Row(label, method, variant, modality if several else None)
            _fill_by_metric(row, part)
            groups.append(row)
    for row in groups:
        _add_pairs(row, records if row.modality is None else records[records["modality"] == row.modality])
        for column in columns_for(protocol, section_frame):
            value = published.lookup(protocol, method, variant, column)
            if value is not None:
                row.published[column] = value
    return groups


def _fill_by_modality(row: Row, records: pd.DataFrame, modalities: list[str]) -> None:
    per_seed: dict[Any, dict[str, float]] = {}
    for rec in records.itertuples(index=False):
        value = _metric(rec, "max_dice")
        if not math.isnan(value):
            row.cells.setdefault(rec.modality, Cell()).values[rec.seed] = value
            per_seed.setdefault(rec.seed, {})[rec.modality] = value
    # The average of a seed needs every modality of the section; a partial mean would flatter.
    average = Cell({s: float(np.mean([v[m] for m in modalities])) for s, v in per_seed.items() if set(modalities) <= set(v)})
    row.cells["average"] = average


def _fill_by_metric(row: Row, records: pd.DataFrame) -> None:
    for rec in records.itertuples(index=False):
        for column, metric in S1_COLUMNS:
            value = _metric(rec, metric)
            if not math.isnan(value):
                row.cells.setdefault(column, Cell()).values[rec.seed] = value


def _add_pairs(row: Row, records: pd.DataFrame) -> None:
    for rec in records.itertuples(index=False):
        value = _metric(rec, "max_dice")
        if not math.isnan(value):
            row.pairs[(rec.seed, rec.modality)] = value
        for image, dice in _per_image(rec.per_image).items():
            row.per_image[(rec.seed, rec.modality, image)] = dice


def _metric(rec: Any, name: str) -> float:
    value = getattr(rec, f"m_{name}", math.nan)
    return math.nan if value is None or (isinstance(value, float) and math.isnan(value)) else float(value) * SCALE


def _per_image(path: Path | None) -> dict[Any, float]:
    """Per-image Dice from a record's per_image CSV; {} when absent or in an unknown layout."""
    if path is None or (isinstance(path, float) and math.isnan(path)):
        return {}
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError):
        return {}
    # protocols/ writes dice_at_best_threshold (the Dice at the reported Max-Dice threshold).
    dice = next((c for c in ("dice_at_best_threshold", "dice", "max_dice") if c in frame.columns), None)
    if dice is None:
        dice = next((c for c in frame.columns if "dice" in str(c).lower()), None)
    if dice is None:
        return {}
    if {"subject_id", "slice_index"} <= set(frame.columns):
        ids = list(zip(frame["subject_id"].astype(str), frame["slice_index"]))
    elif "index" in frame.columns:
        ids = list(frame["index"])
    else:
        ids = list(range(len(frame)))
    values = pd.to_numeric(frame[dice], errors="coerce") * SCALE
    return {i: float(v) for i, v in zip(ids, values) if not math.isnan(v)}


# ----------------------------------------------------------------------------- paired test


def per_image_means(values: dict[tuple, float], keys: set[tuple]) -> dict[Any, float]:
    """Per test image: its Dice averaged over seeds per modality, then over modalities.

    ``values`` maps (seed, modality, image) to a Dice; only ``keys`` are used, so two rows
    are compared over the same jobs.
    """
    by_modality: dict[tuple, list[float]] = {}
    for seed, modality, image in keys:
        by_modality.setdefault((image, modality), []).append(values[(seed, modality, image)])
    by_image: dict[Any, list[float]] = {}
    for (image, _), dice in by_modality.items():
        by_image.setdefault(image, []).append(float(np.mean(dice)))
    return {image: float(np.mean(means)) for image, means in by_image.items()}


def paired_test(best: Row, other: Row) -> TestResult:
    """Wilcoxon test over test images (seeds and modalities averaged first), else over jobs."""
    common_keys = set(best.per_image) & set(other.per_image)
    a, b = per_image_means(best.per_image, common_keys), per_image_means(other.per_image, common_keys)
    images = sorted(a, key=str)
    if len(images) >= MIN_PAIRS:
        return TestResult(len(images), _wilcoxon([a[i] for i in images], [b[i] for i in images]), per_image=True)
    common = sorted(set(best.pairs) & set(other.pairs), key=str)
    if len(common) < MIN_PAIRS:
        return TestResult(len(common), None)
    return TestResult(len(common), _wilcoxon([best.pairs[k] for k in common], [other.pairs[k] for k in common]))


def _wilcoxon(a: list[float], b: list[float]) -> float:
    from scipy.stats import wilcoxon

    diffs = np.asarray(a) - np.asarray(b)
    if np.allclose(diffs, 0.0):
        return 1.0  # identical results: no evidence of a difference
    return float(wilcoxon(a, b, alternative="two-sided").pvalue)


def _run_tests(table: Table) -> None:
    scored = [r for r in table.rows if table.headline in r.cells and r.cells[table.headline].n > 0]
    if not scored:
        return
    best = max(scored, key=lambda r: (r.cells[table.headline].mean, r.label))
    best.best = True
    for row in table.rows:
        if row is not best:
            row.test = paired_test(best, row)


# ----------------------------------------------------------------------------- other tables


def metrics_table(frame: pd.DataFrame, section: str, protocol: str) -> Table | None:
    """Pixel AUROC/AUPRC and the test-set-free Dice; per seed averaged over modalities."""
    base = frame[frame["variant"] == "default"]
    names = [(c, m) for c, m in SECONDARY_COLUMNS if f"m_{m}" in base.columns and base[f"m_{m}"].notna().any()]
    if protocol != "S2":  # S1's size buckets already sit in Table 1
        names = [(c, m) for c, m in names if not m.startswith("max_dice_")]
    if base.empty or not names:
        return None
    table = Table(
        slug=f"{section}_metrics",
        title="Further metrics (per seed: mean over modalities)" if protocol == "S2" else "Further metrics",
        kind="metrics",
        protocol=protocol,
        row_header="method",
        columns=[c for c, _ in names],
        rows=[],
    )
    for method in sorted(base["method"].unique(), key=method_rank):
        part = base[base["method"] == method]
        row = Row(row_label(method, "default"), method, "default")
        for column, metric in names:
            per_seed = part.groupby("seed")[f"m_{metric}"].mean().dropna() * SCALE
            row.cells[column] = Cell({s: float(v) for s, v in per_seed.items()})
        table.rows.append(row)
    return table


def timings_table(frame: pd.DataFrame, section: str, protocol: str) -> Table:
    """Fit/score seconds and slices per second per (method, variant), over all its jobs."""
    table = Table(
        slug=f"{section}_timings",
        title="Timings (mean ± std over jobs; fit time over jobs that trained, not those reusing a checkpoint)",
        kind="timings",
        protocol=protocol,
        row_header="method",
        columns=["fit s", "score s", "slices/s"],
        rows=[],
        spread="jobs",
        decimals=None,
        extra_columns=["reused ckpt", "device", "threads"],
    )
    for (method, variant), part in sorted(frame.groupby(["method", "variant"]), key=lambda kv: (method_rank(kv[0][0]), kv[0][1] != "default", kv[0][1])):
        row = Row(row_label(method, variant), method, variant)
        reused = part["t_reused_checkpoint"].fillna(False).astype(bool) if "t_reused_checkpoint" in part else pd.Series(False, index=part.index)
        for column, key, keep in (("fit s", "t_fit_seconds", ~reused), ("score s", "t_score_seconds", None), ("slices/s", "t_slices_per_second", None)):
            values = pd.to_numeric(part[key], errors="coerce") if key in part else pd.Series(dtype=float)
            if keep is not None and len(values):
                values = values[keep]
            row.cells[column] = Cell({i: float(v) for i, v in values.dropna().items()})
        row.count = len(part)
        threads = sorted({str(int(t)) for t in pd.to_numeric(part.get("t_threads", pd.Series(dtype=float)), errors="coerce").dropna()})
        row.extra = {"reused ckpt": str(int(reused.sum())), "device": ", ".join(sorted(part["device"].unique())),
                     "threads": ", ".join(threads) or "?"}
        table.rows.append(row)
    return table


# ----------------------------------------------------------------------------- rendering


def format_cell(cell: Cell | None, decimals: int | None, row_n: int) -> str:
    """'mean ± std' ('mean' alone for one value); decimals=None adapts them to the size (timings)."""
    if cell is None or cell.n == 0:
        return "–"
    places = _auto_decimals(cell.mean) if decimals is None else decimals
    text = f"{cell.mean:.{places}f}"
    if cell.n > 1:
        text += f" ± {cell.std:.{places}f}"
    if cell.n != row_n:
        text += f" (n={cell.n})"
    return text


def _auto_decimals(value: float) -> int:
    # Three significant digits for small values, whole numbers from 100 on.
    magnitude = abs(value)
    if magnitude == 0 or magnitude >= 100:
        return 0 if magnitude >= 100 else 1
    return max(0, 2 - int(math.floor(math.log10(magnitude))))


def _best_means(table: Table) -> dict[str, float]:
    """Highest mean per column, bolded in markdown (not for timings: higher is not better)."""
    if table.kind == "timings" or table.decimals is None:
        return {}
    best: dict[str, float] = {}
    for column in table.columns:
        means = [r.cells[column].mean for r in table.rows if column in r.cells and r.cells[column].n]
        if len(means) > 1:
            best[column] = round(max(means), table.decimals)
    return best


def markdown_table(headers: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["l"] + ["r"] * (len(headers) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(_md_escape(h) for h in headers) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#])")
_TAG_OPEN = re.compile(r"<(?=[A-Za-z/!?])")  # what could start an HTML tag or an autolink


def _no_html(text: str) -> str:
    return _TAG_OPEN.sub("&lt;", " ".join(str(text).split()))


def md_inline(text: object) -> str:
    """Record-derived text made inert in markdown: one line, HTML escaped, no links, code or emphasis."""
    return _MD_SPECIAL.sub(r"\\\1", _no_html(str(text)))


def _md_escape(text: str) -> str:
    """A table cell: one line, HTML escaped, no pipes or links (our own ``**bold**`` stays)."""
    return re.sub(r"([\\|])", r"\\\1", _no_html(text)).replace("](", "]\\(")  # "](" would open a link


def to_markdown(table: Table) -> str:
    """Our numbers; then, in a separate block, the published ones for the same rows."""
    best = _best_means(table)
    headers = [table.row_header, *table.columns, table.spread, *table.extra_columns]
    if table.has_tests:
        headers.append("p vs best")
    body = []
    for row in table.rows:
        n = row.n_seeds
        cells = []
        for column in table.columns:
            cell = row.cells.get(column)  # None: this row has no job for the column (e.g. one modality only)
            text = format_cell(cell, table.decimals, n)
            if column in best and cell is not None and cell.n and round(cell.mean, table.decimals) == best[column]:
                text = f"**{text}**"
            cells.append(text)
        line = [row.label, *cells, str(n), *[row.extra.get(c, "") for c in table.extra_columns]]
        if table.has_tests:
            line.append("best" if row.best else (row.test.text() if row.test else "–"))
        body.append(line)
    parts = [markdown_table(headers, body)]
    if table.published_caption is not None:
        parts.append(_published_markdown(table))
    return "\n\n".join(parts)


def _published_markdown(table: Table) -> str:
    caption = table.published_caption[:1].upper() + table.published_caption[1:]
    title = f"**{caption} — {table.published_status}**"
    rows = [r for r in table.rows if r.published]
    if not rows:
        return f"{title}: the papers report no numbers for these rows."
    body = [[r.label, *[_fmt(r.published.get(c), 1) for c in table.columns]] for r in rows]
    return title + "\n\n" + markdown_table([table.row_header, *table.columns], body)


def _fmt(value: float | None, decimals: int) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{decimals}f}"


def to_csv(table: Table, path: Path) -> None:
    """Numeric CSV: mean/std/n per column, the published value beside it, and the test."""
    records = []
    for row in table.rows:
        item: dict[str, Any] = {"row": row.label, "method": row.method, "variant": row.variant}
        if row.modality:
            item["modality"] = row.modality
        for column in table.columns:
            cell = row.cells.get(column, Cell())
            item[f"{column}_mean"] = round(cell.mean, 6) if cell.n else None
            item[f"{column}_std"] = round(cell.std, 6) if cell.n > 1 else None
            item[f"{column}_n"] = cell.n
        if table.published_caption is not None:
            for column in table.columns:
                item[f"published_{column}"] = row.published.get(column)
        for column in table.extra_columns:
            item[column] = row.extra.get(column, "")
        if table.has_tests:
            item["best"] = row.best
            item["p_vs_best"] = row.test.p if row.test else None
            item["n_pairs"] = row.test.n if row.test else None
            item["per_image_pairs"] = row.test.per_image if row.test else None
        records.append(item)
    frame = pd.DataFrame(records)
    if "n_pairs" in frame:
        frame["n_pairs"] = frame["n_pairs"].astype("Int64")  # counts stay integers beside missing values
    frame.to_csv(path, index=False)


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    text = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))
    return text.replace("±", r"$\pm$").replace("—", "---").replace("–", "--").replace("→", r"$\to$").replace("†", r"$^\dagger$")


def to_latex(table: Table, caption: str) -> str:
    """A booktabs table; the published numbers form their own column group on the right."""
    pub = table.published_caption is not None and table.has_published
    ours = len(table.columns) + 1 + len(table.extra_columns) + (1 if table.has_tests else 0)  # after the label
    spec = "l" + "c" * ours + ("c" * len(table.columns) if pub else "")
    head1 = [""] + [rf"\multicolumn{{{ours}}}{{c}}{{ours (mean $\pm$ std over {table.spread})}}"]
    rules = [rf"\cmidrule(lr){{2-{ours + 1}}}"]
    if pub:
        head1.append(rf"\multicolumn{{{len(table.columns)}}}{{c}}{{{latex_escape(table.published_caption)}}}")
        caption += f". Published numbers: {table.published_status}"
        rules.append(rf"\cmidrule(lr){{{ours + 2}-{ours + 1 + len(table.columns)}}}")
    head2 = [table.row_header, *table.columns, table.spread, *table.extra_columns] + (["$p$ vs best"] if table.has_tests else [])
    head2 = [latex_escape(h) if not h.startswith("$") else h for h in head2] + ([latex_escape(c) for c in table.columns] if pub else [])
    lines = [
        "% generated by `python -m benchmarks.leaderboard` from stored records; do not edit",
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(caption)}}}",
        rf"\label{{tab:{table.slug}}}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(head1) + r" \\",
        " ".join(rules),
        " & ".join(head2) + r" \\",
        r"\midrule",
    ]
    for row in table.rows:
        cells = [format_cell(row.cells.get(c), table.decimals, row.n_seeds) for c in table.columns]
        line = [row.label, *cells, str(row.n_seeds), *[row.extra.get(c, "") for c in table.extra_columns]]
        if table.has_tests:
            line.append("best" if row.best else (row.test.text() if row.test else "–"))
        if pub:
            line += [_fmt(row.published.get(c), 1) for c in table.columns]
        lines.append(" & ".join(latex_escape(x) for x in line) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def long_values(tables: list[Table], section: str) -> list[dict[str, Any]]:
    """Every per-seed value behind the tables, for re-analysis (values_long.csv)."""
    out = []
    for table in tables:
        for row in table.rows:
            for column, cell in row.cells.items():
                for key, value in sorted(cell.values.items(), key=lambda kv: str(kv[0])):
                    out.append({"section": section, "table": table.slug, "row": row.label, "method": row.method, "variant": row.variant, "column": column, "key": key, "value": value})
    return out


def slug(text: str) -> str:
    """A file-name-safe identifier: lower case, runs of other characters as '_'."""
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_") or "x"
