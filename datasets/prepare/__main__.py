"""Command line: ``python -m datasets.prepare {ixi,atlas,s1,brats21} ...`` (see docs/data-preparation.md)."""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

from datasets.prepare.atlas import ATLASConfig, prepare_atlas
from datasets.prepare.brats21 import DEFAULT_SPLIT_CSV, BraTSConfig, prepare_brats21
from datasets.prepare.combine import prepare_s1
from datasets.format import DatasetFormatError
from datasets.prepare.common import Outcome, PrepareError
from datasets.prepare.ixi import IXIConfig, prepare_ixi


def _common(p: argparse.ArgumentParser, raw: bool = True) -> None:
    if raw:
        p.add_argument("--raw", type=Path, required=True, help="folder holding the downloaded release")
    p.add_argument("--out", type=Path, required=True, help="prepared set directory to create")
    p.add_argument("--resolution", type=int, default=128, help="output slice size (default 128)")
    p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="parallel subject processes")
    p.add_argument("--strict", action="store_true", help="fail (exit 1) if any subject is skipped for bad input")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _s1(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slice-index", type=int, default=95, help="axial slice (RAS z index; default 95)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m datasets.prepare", description="Prepare real data sets for protocols S1 and S2.")
    sub = parser.add_subparsers(dest="dataset", required=True)
    p = sub.add_parser("ixi", help="IXI T1 (MNI-registered) -> S1 train/val part")
    _common(p)
    _s1(p)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("atlas", help="ATLAS 2.0 -> S1 test part")
    _common(p)
    _s1(p)
    p = sub.add_parser("s1", help="IXI + ATLAS 2.0 -> the combined S1 set the runner evaluates")
    p.add_argument("--ixi", type=Path, required=True, help="IXI raw folder or prepared IXI set")
    p.add_argument("--atlas", type=Path, required=True, help="ATLAS raw folder or prepared ATLAS set")
    _common(p, raw=False)
    _s1(p)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("brats21", help="BraTS 2021 -> S2 set")
    _common(p)
    p.add_argument("--split-csv", type=Path, default=DEFAULT_SPLIT_CSV, help="subject_id,split CSV (default: the shipped 990/128/133)")
    p.add_argument("--allow-missing", action="store_true", help="prepare even if the split CSV names subjects not under --raw")
    p.add_argument("--slice-start", type=int, default=70)
    p.add_argument("--slice-stop", type=int, default=90, help="one past the last axial slice (default 90: slices 70..89)")
    return parser


def run(args: argparse.Namespace) -> Outcome:
    common = dict(workers=args.workers, strict=args.strict, overwrite=args.overwrite, progress=not args.no_progress)
    if args.dataset in ("ixi", "s1"):
        ixi_cfg = IXIConfig(resolution=args.resolution, slice_index=args.slice_index, val_fraction=args.val_fraction, seed=args.seed)
    if args.dataset in ("atlas", "s1"):
        atlas_cfg = ATLASConfig(resolution=args.resolution, slice_index=args.slice_index)
    if args.dataset == "ixi":
        return prepare_ixi(args.raw, args.out, ixi_cfg, **common)
    if args.dataset == "atlas":
        return prepare_atlas(args.raw, args.out, atlas_cfg, **common)
    if args.dataset == "s1":
        return prepare_s1(args.ixi, args.atlas, args.out, ixi_config=ixi_cfg, atlas_config=atlas_cfg, **common)
    cfg = BraTSConfig(resolution=args.resolution, slice_start=args.slice_start, slice_stop=args.slice_stop)
    return prepare_brats21(args.raw, args.out, cfg, split_csv=args.split_csv, allow_missing=args.allow_missing, **common)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        outcome = run(args)
    except (PrepareError, DatasetFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the disk filled up while writing: one line, not a traceback
        print(f"error: {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(outcome.summary.report(args.dataset), file=sys.stderr)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        f"wrote {outcome.path}: {outcome.n_slices} slices from {outcome.summary.used} subject(s) in "
        f"{outcome.seconds:.1f} s ({outcome.subjects_per_second:.2f} subjects/s); peak RSS {peak_mb:.0f} MB"
        f" (largest worker {child_mb:.0f} MB)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
