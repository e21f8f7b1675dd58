"""Ablations and hyperparameter sweeps of one method; results in the run's record format.

Grid mode: the cartesian product of the ``--grid`` knobs, one variant per combination
(named ``ddim_steps=2+gamma=0.4``), run through the local or the Ray executor. Variants
that change only inference-time knobs share one trained model per (modality, seed)::

    python -m benchmarks.ablate --protocol S2 --methods madad --grid ddim_steps=2,5,10 --grid gamma=0.2,0.4,none

Search mode (training-time knobs): Ray Tune samples ``--space`` distributions (and
grid-searches any ``--grid`` knobs); each trial runs one variant on every modality and
seed and reports the mean metric::

    python -m benchmarks.ablate --protocol S1 --methods ae --search random --num-samples 8 \\
        --space lr=loguniform:1e-5:1e-3 --space batch_size=choice:16,32

Spaces: ``loguniform:LOW:HIGH``, ``uniform:LOW:HIGH``, ``randint:LOW:HIGH`` (HIGH
excluded), ``choice:V1,V2,...``. Sampled floats are rounded to 4 significant digits, so a
variant's name states its exact value. The best configuration is printed at the end.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from benchmarks.executors import get_executor
from benchmarks.jobs import DEFAULT_VARIANT, Job, Variant, build_jobs, group_jobs
from benchmarks.plugins import PluginError, load_plugins
from benchmarks.run import (
    UsageError,
    add_common_arguments,
    check_common_args,
    default_threads,
    check_finished_records,
    parse_seeds,
    parse_set_overrides,
    with_compile,
    resolve_data,
    resolve_methods,
    resolve_profile,
    summary_table,
    validate_config,
)

if TYPE_CHECKING:  # torch loads only after the arguments are parsed (fast --help)
    from benchmarks.execute import RunContext

SPACE_KINDS = ("loguniform", "uniform", "randint", "choice")


# ---------------------------------------------------------------------- parsing
def parse_assignment(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise UsageError(f"{flag} {text!r}: expected KNOB=VALUES, e.g. ddim_steps=2,5,10")
    return key.strip(), value.strip()


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """``--grid KNOB=V1,V2`` flags -> {knob: values}, in command-line order."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, text = parse_assignment(spec, "--grid")
        values = [v.strip() for v in text.split(",") if v.strip()]
        if key in grid:
            raise UsageError(f"--grid {spec!r}: knob {key!r} is given twice")
        grid[key] = list(dict.fromkeys(values))
    return grid


def variant_name(values: dict[str, Any]) -> str:
    return "+".join(f"{k}={_text(v)}" for k, v in values.items()) or DEFAULT_VARIANT


def _text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def grid_variants(grid: dict[str, list[str]], include_default: bool = True) -> list[Variant]:
    """The cartesian product of the grid, one variant per combination (default first)."""
    variants = [Variant()] if include_default else []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        variants.append(Variant(variant_name(values), tuple(values.items())))
    return variants


@dataclass(frozen=True)
class Space:
    """One ``--space`` distribution."""

    knob: str
    kind: str
    args: tuple[Any, ...]

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def example(self) -> Any:
        """A value inside the space, to validate the knob before any trial starts."""
        return self.args[0]


def parse_space(spec: str) -> Space:
    knob, text = parse_assignment(spec, "--space")
    kind, sep, rest = text.partition(":")
    if kind not in SPACE_KINDS or not sep:
        raise UsageError(f"--space {spec!r}: expected KNOB=KIND:ARGS with KIND one of {', '.join(SPACE_KINDS)} (e.g. lr=loguniform:1e-5:1e-3)")
    if kind == "choice":
        values = [v.strip() for v in rest.split(",") if v.strip()]
        if not values:
            raise UsageError(f"--space {spec!r}: choice needs values, e.g. batch_size=choice:16,32")
        return Space(knob, kind, tuple(values))
    parts = rest.split(":")
    try:
        low, high = (int(p) if kind == "randint" else float(p) for p in parts)
    except ValueError:
        raise UsageError(f"--space {spec!r}: {kind} needs two numbers LOW:HIGH") from None
    if not low < high or (kind == "loguniform" and low <= 0):
        raise UsageError(f"--space {spec!r}: need 0 < LOW < HIGH for loguniform, LOW < HIGH otherwise")
    return Space(knob, kind, (low, high))


def trial_variant(config: dict[str, Any], knobs: Sequence[str]) -> Variant:
    """The variant of a Tune trial; floats rounded so the name is the exact value."""
    values = {}
    for knob in knobs:
        value = config[knob]
        if isinstance(value, float):
            value = float(f"{value:.4g}")
        elif hasattr(value, "item"):  # numpy scalars from the sampler
            value = value.item()
        values[knob] = value
    return Variant(variant_name(values), tuple(values.items()))


# ---------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ablate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", "--method", dest="methods", required=True, help="the one method to ablate (see python -m benchmarks.run --list-methods)")
    p.add_argument("--grid", action="append", default=[], metavar="KNOB=V1,V2", help="values of a knob; the cartesian product of all --grid flags is run")
    p.add_argument("--no-default", action="store_true", help="grid mode: do not add the default variant")
    p.add_argument("--search", choices=["random"], default=None, help="Ray Tune search over --space (and --grid) instead of the plain grid")
    p.add_argument("--space", action="append", default=[], metavar="KNOB=KIND:ARGS", help="search distribution: loguniform:LOW:HIGH, uniform:LOW:HIGH, randint:LOW:HIGH, choice:V1,V2")
    p.add_argument("--num-samples", type=int, default=4, help="search: samples (each --grid combination is sampled this many times)")
    p.add_argument("--search-seed", type=int, default=0, help="search: seed of the sampler (a rerun samples the same variants and resumes)")
    p.add_argument("--metric", default="max_dice", help="metric to rank variants by (mean over modalities and seeds; higher is better)")
    add_common_arguments(p, default_out="results/runs/ablate-<method>-<protocol>-<profile>")
    return p


def parse_base_overrides(specs: Sequence[str], method: str) -> dict[str, str]:
    """``--set METHOD:FIELD=VALUE`` as in ``run`` (``FIELD=VALUE`` also works: there is one method)."""
    qualified = [s if s.split("=", 1)[0].count(":") else f"{method}:{s}" for s in specs]
    return parse_set_overrides(qualified, [method]).get(method, {})


@dataclass
class Setup:
    protocol: str
    method: str
    profile: str
    data: str
    data_name: str
    modalities: list[str]
    seeds: list[int]
    base: dict[str, str]
    ctx: RunContext
    out: Path


def _setup(args: argparse.Namespace) -> Setup:
    from benchmarks.execute import RunContext, data_name
    from protocols import get_protocol

    load_plugins()
    if args.protocol is None:
        raise UsageError("--protocol is required (S1 or S2)")
    check_common_args(args)
    methods = resolve_methods(args.methods)
    if len(methods) != 1:
        raise UsageError(f"--methods: ablate takes exactly one method, got {', '.join(methods)}")
    method = methods[0]
    seeds = parse_seeds(args.seeds)
    profile = resolve_profile(args.profile, args.device, [method])
    protocol = get_protocol(args.protocol)
    spec, modalities = resolve_data(protocol, args.data, args.modalities)
    base = parse_base_overrides(with_compile(args.set, [method], args.compile), method)
    out = Path(args.out or f"results/runs/ablate-{method}-{protocol.name}-{profile}").resolve()
    ctx = RunContext(
        out=str(out),
        checkpoints=str(Path(args.checkpoints).resolve() if args.checkpoints else out / "checkpoints"),
        device=args.device,
        progress=not args.no_progress,
        n_examples=args.examples,
        threads=args.threads or default_threads(args.executor if not args.search else "ray", args.cpus_per_job),
    )
    return Setup(protocol.name, method, profile, spec, data_name(spec), modalities, seeds, base, ctx, out)


def with_base(variant: Variant, base: dict[str, str]) -> Variant:
    return Variant(variant.name, tuple({**base, **variant.as_dict}.items())) if base else variant


def ranking(records: list[dict[str, Any]], metric: str) -> list[tuple[str, float, float, int]]:
    """(variant, mean, std, n) over ok records, best first."""
    values: dict[str, list[float]] = {}
    for record in records:
        if record.get("status") == "ok" and metric in record.get("metrics", {}):
            values.setdefault(record["variant"], []).append(float(record["metrics"][metric]))
    rows = [(name, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for name, v in values.items()]
    return sorted(rows, key=lambda row: -row[1])


def print_ranking(records: list[dict[str, Any]], metric: str) -> tuple[str, float] | None:
    rows = ranking(records, metric)
    if not rows:
        print(f"\nno variant produced {metric!r}")
        return None
    print(f"\n{'variant':40s} {metric + ' x100':>14s} {'std':>6s} {'n':>3s}")
    for name, mean, std, n in rows:
        print(f"{name:40s} {100 * mean:14.2f} {100 * std:6.2f} {n:3d}")
    best = rows[0]
    print(f"\nbest configuration: {best[0]} ({metric} {100 * best[1]:.2f} +- {100 * best[2]:.2f} x100 over {best[3]} job(s))")
    return best[0], best[1]


# ---------------------------------------------------------------------- grid mode
def run_grid(args: argparse.Namespace, setup: Setup) -> list[dict[str, Any]]:
    grid = parse_grid(args.grid)
    if not grid:
        raise UsageError("give at least one --grid KNOB=V1,V2 (or --search random with --space)")
    variants = [with_base(v, setup.base) for v in grid_variants(grid, include_default=not args.no_default)]
    for variant in variants:
        validate_config(setup.method, *variant.resolve(setup.profile), f"--grid variant {variant.name}")
    jobs = build_jobs(setup.protocol, [setup.method], setup.data, setup.data_name, setup.modalities, setup.seeds, setup.profile, {setup.method: variants})
    check_finished_records(jobs, setup.out, replace=args.replace_changed)
    print(
        f"ablate: {setup.method} on {setup.protocol} ({', '.join(setup.modalities)}), profile {setup.profile}: "
        f"{len(variants)} variant(s) x {len(setup.modalities)} modality(ies) x {len(setup.seeds)} seed(s) = {len(jobs)} job(s); records in {setup.out}",
        file=sys.stderr,
    )
    executor = get_executor(args.executor)
    return executor(jobs, setup.ctx, address=args.address, gpus_per_job=args.gpus_per_job, cpus_per_job=args.cpus_per_job, retries=args.retries)


# ---------------------------------------------------------------------- search mode
def _trial(config: dict[str, Any], base_jobs: list[Job], knobs: list[str], base: dict[str, str], ctx: RunContext, cpus: float, metric: str) -> None:
    """One Tune trial: run one variant on every modality and seed, report the mean metric."""
    from ray import tune

    from benchmarks.execute import run_group
    from benchmarks.executors.ray_executor import JobsFailed, worker_context

    load_plugins()
    variant = with_base(trial_variant(config, knobs), base)
    jobs = [replace(job, variant=variant) for job in base_jobs]
    worker_ctx = worker_context(ctx, cpus)
    records = [r for group in group_jobs(jobs) for r in run_group(group, worker_ctx)]
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:  # Tune retries the trial (FailureConfig); finished jobs are skipped then
        raise JobsFailed([r["job_id"] for r in failed], [str(r.get("error")) for r in failed])
    values = [float(r["metrics"][metric]) for r in records if metric in r.get("metrics", {})]
    if not values:
        raise KeyError(f"metric {metric!r} not in the records; they have {sorted(records[0].get('metrics', {}))}")
    tune.report({metric: statistics.fmean(values), "n_jobs": len(records)})


def _searched_jobs_on_disk(setup: Setup, base_jobs: list[Job], knobs: list[str]) -> list[Job]:
    """The jobs of earlier trials over the same knobs whose records a rerun would skip."""
    from benchmarks.records import read_record

    if not base_jobs:
        return []
    cells = {(job.modality, job.seed): job for job in base_jobs}
    jobs = []
    for path in sorted(base_jobs[0].record_path(setup.out).parent.glob("*.json")):
        record = read_record(path)
        if record is None:
            continue
        overrides = record.get("variant_overrides") or {}
        cell = cells.get((record.get("data", {}).get("modality"), record.get("seed")))
        if cell is None or not set(knobs) <= set(overrides):
            continue
        variant = with_base(trial_variant(overrides, knobs), setup.base)
        if variant.name == record["variant"]:
            jobs.append(replace(cell, variant=variant))
    return jobs


def run_search(args: argparse.Namespace, setup: Setup) -> list[dict[str, Any]]:
    import ray
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from benchmarks.executors.ray_executor import connect, default_gpus_per_job, records_after_failure

    spaces = [parse_space(s) for s in args.space]
    grid = parse_grid(args.grid)
    if not spaces and not grid:
        raise UsageError("--search needs at least one --space KNOB=KIND:ARGS (or --grid)")
    if args.num_samples < 1:
        raise UsageError("--num-samples must be >= 1")
    knobs = [s.knob for s in spaces] + list(grid)
    if len(set(knobs)) != len(knobs):
        raise UsageError("a knob is given twice across --space/--grid")
    example = {**setup.base, **{s.knob: s.example() for s in spaces}, **{k: v[0] for k, v in grid.items()}}
    validate_config(setup.method, setup.profile, example, "--space/--grid")
    param_space = {s.knob: s.to_tune() for s in spaces} | {k: tune.grid_search(v) for k, v in grid.items()}
    base_jobs = build_jobs(setup.protocol, [setup.method], setup.data, setup.data_name, setup.modalities, setup.seeds, setup.profile, {setup.method: [Variant()]})
    check_finished_records(_searched_jobs_on_disk(setup, base_jobs, knobs), setup.out, replace=args.replace_changed)

    started = connect(args.address)
    try:
        gpus = default_gpus_per_job(args.gpus_per_job, setup.ctx.device)
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base_jobs=base_jobs, knobs=knobs, base=setup.base, ctx=setup.ctx, cpus=args.cpus_per_job, metric=args.metric),
            {"cpu": args.cpus_per_job, "gpu": gpus},
        )
        since_ns = time.time_ns()
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=args.metric,
                mode="max",
                num_samples=args.num_samples,
                search_alg=BasicVariantGenerator(random_state=args.search_seed),
            ),
            run_config=tune.RunConfig(
                name=f"{setup.method}-{setup.protocol}-{setup.profile}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str(setup.out / "tune"),
                failure_config=tune.FailureConfig(max_failures=args.retries),
                verbose=1 if setup.ctx.progress else 0,
            ),
        )
        results = tuner.fit()
        records: list[dict[str, Any]] = []
        for result in results:
            variant = with_base(trial_variant(result.config, knobs), setup.base)
            jobs = [replace(job, variant=variant) for job in base_jobs]
            if result.error is not None:
                records += records_after_failure(jobs, result.error, Path(setup.ctx.out), since_ns, args.retries + 1)
            else:
                from benchmarks.records import read_record

                records += [r for job in jobs if (r := read_record(job.record_path(setup.out))) is not None]
        try:
            best = results.get_best_result(metric=args.metric, mode="max")
            print(f"\nTune best trial: {trial_variant(best.config, knobs).name} ({args.metric} {best.metrics.get(args.metric)})", file=sys.stderr)
        except RuntimeError:
            pass  # every trial failed; the ranking below says so
    finally:
        if started:
            ray.shutdown()
    return records


# ---------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from methods.base import ConfigError

    try:
        if args.search is None and args.space:
            raise UsageError("--space needs --search random")
        setup = _setup(args)
        start = time.perf_counter()
        records = run_search(args, setup) if args.search else run_grid(args, setup)
    except (UsageError, ConfigError, PluginError) as exc:
        parser.error(str(exc))
    wall = time.perf_counter() - start
    print(summary_table(records))
    print_ranking(records, args.metric)
    failed = [r for r in records if r.get("status") != "ok"]
    print(f"\n{len(records) - len(failed)} job(s) ok, {len(failed)} failed, wall time {wall:.1f} s; records in {setup.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
