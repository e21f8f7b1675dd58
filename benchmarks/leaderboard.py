"""Rebuild the leaderboard from stored result records.

    python -m benchmarks.leaderboard [--runs DIR ...] [--out results/] [--published results/published.csv]

Writes OUT/leaderboard.md, OUT/tables/*.csv|.tex and OUT/figures/*.png. Only the records
are read (no method code, no torch), so it runs anywhere the records are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.report import build, load_published, load_records


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.leaderboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", action="extend", help="run folder(s) searched recursively for *.json records (default: results/runs)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="output folder (default: results)")
    parser.add_argument("--published", type=Path, default=None, help="published numbers CSV (default: results/published.csv here, else the one in the repository)")
    return parser.parse_args(argv)


def default_published() -> Path:
    """results/published.csv of the working folder, else the repository's copy (run from elsewhere)."""
    local = Path("results/published.csv")
    repo = Path(__file__).resolve().parent.parent / "results" / "published.csv"
    return local if local.is_file() or not repo.is_file() else repo


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = args.runs or [Path("results/runs")]
    records = load_records(runs)
    published = load_published(args.published or default_published())
    sections, written = build(records, published, args.out, runs)
    for problem in published.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if not sections:
        where = ", ".join(str(d) for d in runs)
        print(f"No finished result records under {where}; wrote {args.out / 'leaderboard.md'} with the published numbers only.")
    else:
        n = sum(len(s.frame) for s in sections)
        print(f"{n} record(s) in {len(sections)} section(s), {len(records.failed)} failed job(s); wrote {len(written)} file(s) under {args.out}")
        for section in sections:
            print(f"  {section.title}: {len(section.frame)} job(s)")
    print(f"leaderboard: {args.out / 'leaderboard.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
