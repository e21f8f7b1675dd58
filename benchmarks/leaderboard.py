"""Rebuild the leaderboard from stored result records.

    python -m benchmarks.leaderboard                      # your runs: results/runs -> results/local/
    python -m benchmarks.leaderboard --shipped            # the shipped page: results/records -> results/
    python -m benchmarks.leaderboard --runs DIR --out DIR # any records, any folder

Writes OUT/leaderboard.md, OUT/tables/*.csv|.tex and OUT/figures/*.png. Only the records
are read (no method code, no torch), so it runs anywhere the records are. A build never
changes or deletes a file that git tracks unless --force (or --publish) says so: your own
runs cannot overwrite the shipped results.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

RESULTS = Path("results")
USER_RUNS = RESULTS / "runs"
USER_PAGE = RESULTS / "local"
SHIPPED_RECORDS = RESULTS / "records"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.leaderboard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="+", action="extend", help=f"run folder(s) searched recursively for *.json records (default: {USER_RUNS})")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: {USER_PAGE}; with --shipped or --publish: {RESULTS})")
    parser.add_argument("--shipped", action="store_true", help=f"rebuild the shipped page from the shipped records ({SHIPPED_RECORDS} -> {RESULTS})")
    parser.add_argument("--publish", action="store_true", help=f"replace the shipped records ({SHIPPED_RECORDS}) with those under --runs and rebuild the shipped page from them")
    parser.add_argument("--force", action="store_true", help="allow the build to change or delete files that git tracks")
    parser.add_argument("--published", type=Path, default=None, help="published numbers CSV (default: results/published.csv here, else the one shipped with the package)")
    args = parser.parse_args(argv)
    if args.shipped and args.publish:
        parser.error("--shipped rebuilds from the shipped records; --publish replaces them: choose one")
    if args.shipped and args.runs:
        parser.error(f"--shipped reads {SHIPPED_RECORDS}; drop --runs (or use --runs DIR --out DIR)")
    if args.publish and not args.runs:
        parser.error("--publish needs --runs: the run folder(s) whose records become the shipped ones")
    return args


#: The papers' numbers, shipped with the package (results/published.csv links to it).
PACKAGED_PUBLISHED = Path(__file__).resolve().parent / "report" / "published.csv"


def default_published() -> Path:
    """results/published.csv of the working folder (a user's edited copy), else the packaged one."""
    local = RESULTS / "published.csv"
    return local if local.is_file() else PACKAGED_PUBLISHED


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from benchmarks.report import build, load_published, load_records
    from benchmarks.report.publish import TrackedFilesError, export_records, figure_examples, sync

    shipped = args.shipped or args.publish
    out = args.out or (RESULTS if shipped else USER_PAGE)
    if args.publish:
        chosen = load_records(args.runs)
        written = export_records(chosen.ok + chosen.failed, SHIPPED_RECORDS, figure_examples(chosen.ok))
        print(f"shipped records: {sum(p.suffix == '.json' for p in written)} record(s) copied to {SHIPPED_RECORDS}")
    runs = [SHIPPED_RECORDS] if shipped else (args.runs or [USER_RUNS])
    records = load_records(runs)
    published = load_published(args.published or default_published())
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".leaderboard-", dir=out) as staging:
        sections, _ = build(records, published, Path(staging), runs)
        try:
            plan = sync(Path(staging), out, force=args.force or args.publish)
        except TrackedFilesError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    for problem in published.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if records.dry_run:
        print(f"{len(records.dry_run)} dry-run record(s) ignored (made with benchmarks.run --dry-run; not results)")
    if not sections:
        where = ", ".join(str(d) for d in runs)
        print(f"No finished result records under {where}; wrote {out / 'leaderboard.md'} with the published numbers only.")
    else:
        n = sum(len(s.frame) for s in sections)
        print(f"{n} record(s) in {len(sections)} section(s), {len(records.failed)} failed job(s) -> {out}: "
              f"{len(plan.write)} file(s) written, {len(plan.unchanged)} unchanged, {len(plan.remove)} stale removed")
        for section in sections:
            print(f"  {section.title}: {len(section.frame)} job(s)")
    print(f"leaderboard: {out / 'leaderboard.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
