"""Train and evaluate methods under a protocol; one JSON record per job.

    python -m benchmarks.run --protocol S2 --methods madad,thor
    python -m benchmarks.run --protocol S1 --methods ae --seeds 0,1,2 --profile paper --device cuda
    python -m benchmarks.run --protocol S2 --methods madad --variants madad:ddim_steps=2,5,10
    python -m benchmarks.run --list-methods
    python -m benchmarks.run --protocol S2 --methods all --profile paper --dry-run   # before a GPU launch

A rerun with the same --out skips finished jobs, so a killed run resumes. A finished
record whose config or data differ from what its job would use now (after --set, a
changed default or rebuilt data) stops the run before any work; --replace-changed moves
such records to <out>/superseded/ and reruns their jobs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.estimate import add_estimate_arguments
from benchmarks.executors import EXECUTORS, get_executor
from benchmarks.jobs import SUPERSEDED_DIR, build_jobs, parse_variants

# torch, the methods and Ray are imported only once the arguments are parsed, so that
# --help and argument errors answer at once.

PROFILES_AUTO = "auto"


class UsageError(ValueError):
    """A command-line argument is wrong; the message says which and what is valid."""


def add_common_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """The options ``run`` and ``ablate`` share, with one spelling and one help text."""
    parser.add_argument("--protocol", type=str.upper, choices=["S1", "S2"], help="S1: global Max Dice (IXI->ATLAS setting); S2: per-image Max Dice (BraTS'21 setting)")
    parser.add_argument("--data", default="embedded", help="'embedded' (default, no download) or the path of a prepared set")
    parser.add_argument("--profile", default=PROFILES_AUTO, help="config profile: tiny (smoke test), quick (CPU minutes), paper (published), or a method-specific one (e.g. official); auto = quick on CPU, paper on GPU")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--modalities", default=None, help="comma-separated subset of the protocol's modalities (default: all it evaluates)")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD:FIELD=VALUE", help="override a config field for every job of METHOD; repeatable")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", default=None, help=f"run directory (default {default_out})")
    parser.add_argument("--checkpoints", default=None, help="checkpoint cache (default <out>/checkpoints)")
    parser.add_argument("--executor", default="local", choices=EXECUTORS, help="local: jobs one after another in this process; ray: in parallel on a Ray cluster")
    parser.add_argument("--address", default=None, help="Ray: address of an existing cluster (default: start a local one)")
    parser.add_argument("--gpus-per-job", type=float, default=None, help="Ray: GPUs per job, fractional allowed (default 1 if GPUs exist, else 0)")
    parser.add_argument("--cpus-per-job", type=float, default=1.0, help="Ray: CPUs per job")
    parser.add_argument("--retries", type=int, default=1, help="Ray: retries of a job whose task raised or whose worker died")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per job (on a shared or busy machine: 1)")
    parser.add_argument("--examples", type=int, default=4, help="test slices stored per record for the figures")
    parser.add_argument("--replace-changed", action="store_true", help="rerun jobs whose finished records came from another config or data (the old records move to <out>/superseded/)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars and the status line")
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks' forward passes on CUDA (sets compile=true for every job, as --set METHOD:compile=true; an explicit --set wins)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="ae", help="comma-separated method names, or 'all' (see --list-methods)")
    parser.add_argument("--variants", action="append", default=[], metavar="METHOD:KNOB=V1,V2", help="ablation variants; repeatable")
    add_common_arguments(parser, default_out="results/runs/<protocol>-<profile>")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failing job instead of recording it")
    parser.add_argument("--list-methods", action="store_true", help="list registered methods (built-in and plugins) and exit")
    parser.add_argument(
        "--dry-run", action="store_true",
        help="run every code path of the profile at its real resolution and network size, cut short: 2 optimiser "
        "steps of batch 2, 4 training, 2 validation and 2 lesion test slices, loops and reverse chains of 2 steps; "
        "records are marked dry_run and the leaderboard ignores them (default --out results/runs/<protocol>-<profile>-dry-run)",
    )
    add_estimate_arguments(parser)
    return parser


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip() != ""]
    except ValueError:
        raise UsageError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise UsageError("--seeds: give at least one seed")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise UsageError(f"--seeds {text!r}: seed(s) {', '.join(map(str, repeated))} given twice")
    return seeds


def check_common_args(args: argparse.Namespace) -> None:
    """Numbers and folders of the shared options, checked before any data or model is touched."""
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: give at least 1 (or leave it out)")
    if args.retries < 0:
        raise UsageError(f"--retries {args.retries}: give 0 or more")
    if args.examples < 0:
        raise UsageError(f"--examples {args.examples}: give 0 or more")
    if not args.cpus_per_job > 0:
        raise UsageError(f"--cpus-per-job {args.cpus_per_job}: give a number > 0")
    if args.gpus_per_job is not None and args.gpus_per_job < 0:
        raise UsageError(f"--gpus-per-job {args.gpus_per_job}: give 0 or more")
    for flag in ("out", "checkpoints"):
        if getattr(args, flag):
            check_writable_folder(Path(getattr(args, flag)), f"--{flag}")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(executor: str, cpus_per_job: float, cores: int | None = None, load: float | None = None) -> int:
    """Torch CPU threads per job when --threads is not given.

    Ray runs several jobs at once: each gets its ``--cpus-per-job`` share. The local
    executor runs one job, on the cores the rest of the machine leaves free (1-minute load
    average): on a busy machine, OpenMP threads that outnumber the free cores spin-wait on
    each other and run an order of magnitude slower, not proportionally slower.
    """
    if executor == "ray":
        return max(1, int(cpus_per_job))
    cores = available_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    return max(1, min(cores, int(round(cores - load))))


def check_writable_folder(path: Path, flag: str) -> None:
    """``path`` is, or can become, a folder this process can write in."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: this is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {existing} is not writable")


def resolve_methods(text: str) -> list[str]:
    from methods.registry import list_methods

    known = list_methods()
    names = known if text.strip() == "all" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in known]
    if unknown:
        raise UsageError(f"--methods: unknown method(s) {', '.join(unknown)}; known methods: {', '.join(known)}")
    if not names:
        raise UsageError("--methods: give at least one method")
    return names


def resolve_profile(profile: str, device: str, methods: list[str]) -> str:
    from methods.base import resolve_device
    from methods.registry import get_method_class

    if profile == PROFILES_AUTO:
        profile = "quick" if resolve_device(device).type == "cpu" else "paper"
    for name in methods:
        available = get_method_class(name).profiles
        if profile not in available:
            raise UsageError(f"--profile {profile!r}: method {name!r} has profiles {', '.join(sorted(available))}")
    return profile


def with_compile(specs: list[str], methods: list[str], compile: bool) -> list[str]:
    """``--set`` specs with ``METHOD:compile=true`` for every method first when ``--compile`` is given."""
    return [*(f"{m}:compile=true" for m in methods), *specs] if compile else list(specs)


def parse_set_overrides(specs: list[str], methods: list[str]) -> dict[str, dict[str, str]]:
    result: dict[str, dict[str, str]] = {}
    for spec in specs:
        method, sep, assignment = spec.partition(":")
        if not sep or "=" not in assignment:
            raise UsageError(f"--set {spec!r}: expected METHOD:FIELD=VALUE")
        if method not in methods:
            raise UsageError(f"--set {spec!r}: method {method!r} is not among --methods ({', '.join(methods)})")
        key, value = assignment.split("=", 1)
        result.setdefault(method, {})[key.strip()] = value.strip()
    return result


def resolve_data(protocol: Any, data: str, modalities: str | None) -> tuple[str, list[str]]:
    """Check ``--data`` against the protocol; return its spec and the modalities to evaluate."""
    from benchmarks.execute import load_data
    from protocols import ProtocolDataError

    spec = data if data == "embedded" else str(Path(data).resolve())
    try:
        loaded = load_data(spec)
        protocol.check_data(loaded)
    except (ProtocolDataError, FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--data {data}: {exc}") from exc
    available = protocol.modalities(loaded)
    if not modalities:
        return spec, available
    wanted = [m.strip() for m in modalities.split(",") if m.strip()]
    bad = [m for m in wanted if m not in available]
    if bad:
        raise UsageError(f"--modalities: {', '.join(bad)} not evaluated by {protocol.name} on this data; choose from {', '.join(available)}")
    return spec, wanted


def list_methods_text() -> str:
    from methods.registry import get_method_class, method_sources

    lines = []
    for name, source in method_sources().items():
        cls = get_method_class(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        lines.append(f"{name:10s} {source:30s} profiles: {', '.join(sorted(cls.profiles)):28s} {doc}")
    if any(source.startswith("plugin") for source in method_sources().values()):
        lines.append("\nplugins are code imported from other packages or UAD_BENCH_PLUGINS: load only code you trust")
    return "\n".join(lines)


#: The untrained floor (map = the slice's own intensity) every learned method must beat.
FLOOR_METHOD = "intensity"


def _pct(metrics: dict[str, Any], name: str) -> float | None:
    value = metrics.get(name)
    return None if value is None else round(100 * float(value), 1)


def summary_table(records: list[dict[str, Any]]) -> str:
    """Per job, then per method and variant: Max Dice, AUPRC and AUROC (x100), averaged over modalities."""
    import pandas as pd

    rows = []
    for r in records:
        timings, metrics = r.get("timings", {}), r.get("metrics", {})
        rows.append(
            {
                "method": r["method"],
                "variant": r["variant"],
                "modality": r.get("data", {}).get("modality"),
                "seed": r["seed"],
                "status": r["status"],
                "note": r.get("status_note") or "",
                "max_dice": _pct(metrics, "max_dice"),
                "auprc": _pct(metrics, "auprc"),
                "auroc": _pct(metrics, "auroc"),
                "fit_s": None if timings.get("fit_seconds") is None else round(timings["fit_seconds"], 1),
                "slices/s": None if timings.get("slices_per_second") is None else round(timings["slices_per_second"], 1),
                "error": (r.get("error") or "")[:60],
            }
        )
    if not rows:
        return "(no jobs)"
    frame = pd.DataFrame(rows).sort_values(["method", "variant", "modality", "seed"])
    for column in ("error", "note"):
        if not frame[column].astype(bool).any():
            frame = frame.drop(columns=column)
    text = frame.to_string(index=False)
    ok = frame[frame["status"] == "ok"]
    if ok.empty:
        return text
    # seeds first, then modalities: each modality counts once however many seeds it has
    per_modality = ok.groupby(["method", "variant", "modality"])[["max_dice", "auprc", "auroc"]].mean()
    average = per_modality.groupby(["method", "variant"]).mean().round(1)
    average["modalities"] = per_modality.groupby(["method", "variant"]).size()
    average["seeds"] = ok.groupby(["method", "variant"])["seed"].nunique()
    average = average.reset_index()
    average["note"] = ["untrained floor" if m == FLOOR_METHOD else "" for m in average["method"]]
    text += "\n\nAverage over modalities (mean over seeds first), x100:\n" + average.to_string(index=False)
    if FLOOR_METHOD not in set(average["method"]):
        text += f"\n(add {FLOOR_METHOD} to --methods to see the untrained floor every method must beat)"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from benchmarks.plugins import PluginError, load_plugins

    try:
        load_plugins()  # methods named in UAD_BENCH_PLUGINS (modules on the path, not installed)
    except PluginError as exc:
        parser.error(str(exc))
    if args.list_methods:
        print(list_methods_text())
        return 0
    if args.protocol is None:
        parser.error("--protocol is required (S1 or S2)")
    from methods.base import ConfigError

    try:
        if args.estimate:
            from benchmarks.estimate import estimate_main

            return estimate_main(args)
        return _run(args)
    except (UsageError, ConfigError) as exc:
        parser.error(str(exc))
    return 2  # unreachable: parser.error exits


def _run(args: argparse.Namespace) -> int:
    from benchmarks.execute import RunContext, data_name
    from protocols import get_protocol

    check_common_args(args)
    methods = resolve_methods(args.methods)
    seeds = parse_seeds(args.seeds)
    profile = resolve_profile(args.profile, args.device, methods)
    protocol = get_protocol(args.protocol)
    data_spec, modalities = resolve_data(protocol, args.data, args.modalities)
    try:
        variants = parse_variants(args.variants, methods)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    base_overrides = parse_set_overrides(with_compile(args.set, methods, args.compile), methods)
    if base_overrides:
        from benchmarks.jobs import Variant

        for method, overrides in base_overrides.items():
            variants[method] = [
                Variant(v.name, tuple({**overrides, **v.as_dict}.items())) for v in variants[method]
            ]
    _validate_variants(variants, profile)

    suffix = "-dry-run" if args.dry_run else ""
    out = Path(args.out or f"results/runs/{protocol.name}-{profile}{suffix}").resolve()
    checkpoints = Path(args.checkpoints).resolve() if args.checkpoints else out / "checkpoints"
    name = data_name(data_spec)
    jobs = build_jobs(protocol.name, methods, data_spec, name, modalities, seeds, profile, variants, dry_run=args.dry_run)
    if args.dry_run:
        _validate_dry_run(jobs)
    check_finished_records(jobs, out, replace=args.replace_changed)
    threads = args.threads or default_threads(args.executor, args.cpus_per_job)
    ctx = RunContext(
        out=str(out),
        checkpoints=str(checkpoints),
        device=args.device,
        progress=not args.no_progress,
        n_examples=args.examples,
        fail_fast=args.fail_fast,
        threads=threads,
    )
    print(
        f"uad-bench: {'DRY RUN (cut short; records marked dry_run, not results), ' if args.dry_run else ''}"
        f"protocol {protocol.name}, data {name} ({', '.join(modalities)}), profile {profile}, "
        f"{len(methods)} method(s), {len(seeds)} seed(s) -> {len(jobs)} job(s), {threads} CPU thread(s) per job"
        f"{'' if args.threads else ' (from the free cores; set --threads to choose)'}; records in {out}",
        file=sys.stderr,
    )
    start = time.perf_counter()
    executor = get_executor(args.executor)
    records = executor(
        jobs,
        ctx,
        address=args.address,
        gpus_per_job=args.gpus_per_job,
        cpus_per_job=args.cpus_per_job,
        retries=args.retries,
    )
    wall = time.perf_counter() - start
    print(summary_table(records))
    elsewhere = [r for r in records if r.get("status") == "skipped"]
    failed = [r for r in records if r.get("status") not in ("ok", "skipped")]
    by_other = sum(1 for r in records if r.get("status_note") == "finished by another run")
    print(f"\n{len(records) - len(failed) - len(elsewhere)} job(s) ok, {len(failed)} failed, wall time {wall:.1f} s; records in {out}", file=sys.stderr)
    if elsewhere or by_other:
        print(f"{len(elsewhere)} job(s) left to another run on the same --out (running there now), "
              f"{by_other} finished by another run while this one waited; rerun to collect them", file=sys.stderr)
    if args.dry_run:
        print(f"dry run: {'every job ran end to end' if not failed else 'fix the failed jobs before a real launch'}; "
              "its records are marked dry_run and no leaderboard shows them (metrics of a cut-short run mean nothing)", file=sys.stderr)
    else:
        print(f"next: python -m benchmarks.leaderboard --runs {_shown(out)}   (tables and figures of this run)", file=sys.stderr)
    return 1 if failed else 0


def _shown(path: Path) -> str:
    """``path`` relative to the working folder when it lies below it (shorter to copy)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def check_finished_records(jobs: list, out: Path, replace: bool) -> None:
    """Refuse to skip a job on the strength of a record made with another config or data."""
    from benchmarks.execute import load_data
    from benchmarks.resume import changed_records, describe, supersede

    changed = changed_records(jobs, out, lambda spec: load_data(spec).fingerprint())
    if not changed:
        return
    if not replace:
        raise UsageError(
            describe(changed, out) + "\nRerun with --replace-changed to move them to "
            f"{out / SUPERSEDED_DIR} and rerun those jobs, or write this run elsewhere with --out."
        )
    moved_to = supersede(changed, out)
    print(describe(changed, out) + f"\nmoved to {moved_to}; those jobs rerun", file=sys.stderr)


def validate_config(method: str, profile: str, overrides: dict[str, Any], what: str) -> None:
    """Fail before any training if a profile, knob or value is unknown (the error lists the valid ones)."""
    from methods.base import ConfigError
    from methods.registry import create_method

    try:
        create_method(method, profile, **overrides)
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{what}: {exc}") from exc


def _validate_dry_run(jobs: list) -> None:
    """A method's dry-run overrides must make a valid config of every variant (checked before any work)."""
    seen = set()
    for job in jobs:
        if (job.method, job.variant) in seen:
            continue
        seen.add((job.method, job.variant))
        validate_config(job.method, *job.settings(), f"--dry-run of {job.method}:{job.variant.name}")


def _validate_variants(variants: dict, profile: str) -> None:
    for method, items in variants.items():
        for variant in items:
            validate_config(method, *variant.resolve(profile), f"variant {method}:{variant.name}")


if __name__ == "__main__":
    sys.exit(main())
