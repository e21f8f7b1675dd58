"""What a planned run costs before it runs: FLOPs and device-hours (``python -m benchmarks.run ... --estimate``).

    python -m benchmarks.run --protocol S2 --methods all --profile paper --data published --estimate --gpu h100

For every planned job (methods x modalities x seeds x variants) the method's
``cost_plan`` (``methods.cost``) says how many network evaluations it makes: per scored
slice, per optimiser step of training (forward + backward = 3 x forward) and in the
forward-only passes of ``fit`` (validation, encoding the training set). The FLOPs of one
evaluation are measured with ``torch.utils.flop_counter.FlopCounterMode`` on the networks
the method builds at the profile's real size, on the meta device (no memory, no compute;
the CPU is the fall-back). The flop counter counts matrix multiplications, convolutions
and attention, the work tensor cores do; element-wise work is left out, as in MFU.

Training is counted once per training key, as the runner trains once per key: DDPM, THOR
and AutoDDPM share one network (``training_family``), and variants that change only
inference knobs reuse their job's model. Scored slices per job: the test set, the
validation set when the protocol scores it (S2: the threshold at 1 % validation FPR),
and the example slices restored for the figures.

Device-hours = FLOPs / (``--mfu`` x the dense bf16 peak of ``--gpu``): a compute-bound
estimate; small batches, host work and data loading only add to it.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

#: Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets.
GPU_PEAK_TFLOPS: dict[str, float] = {
    "h100": 989.5,  # H100 SXM5
    "h100-pcie": 756.0,
    "h200": 989.5,
    "b200": 2250.0,
    "a100": 312.0,
    "l40s": 362.0,
    "l4": 121.0,
    "a10": 125.0,
}
DEFAULT_GPU = "h100"
DEFAULT_MFU = 0.4


def detect_gpu(device_name: str) -> str | None:
    """The ``GPU_PEAK_TFLOPS`` key of a CUDA device name (``torch.cuda.get_device_name``), None if not listed."""
    name = device_name.lower()
    if "h100" in name:
        return "h100-pcie" if "pcie" in name else ("h100" if "nvl" not in name else None)
    for key in ("h200", "b200", "a100", "l40s"):
        if key in name:
            return key
    if re.search(r"\bl4\b", name):
        return "l4"
    if re.search(r"\ba10\b", name):
        return "a10"
    return None


# ---------------------------------------------------------------------- data sizes
@dataclass(frozen=True)
class DataSizes:
    """Slices per split for one modality's job, and where the numbers come from."""

    name: str
    n_train: int
    n_val: int
    n_test: int
    resolution: tuple[int, int]
    modalities: tuple[str, ...]
    source: str


#: IXI's T1 release (IXI-T1.tar, brain-development.org/ixi-dataset): 581 volumes, one
#: slice each; ``datasets.prepare ixi`` holds out round(0.1 x 581) = 58 subjects for val.
IXI_T1_SUBJECTS, IXI_VAL = 581, 58
#: ATLAS R2.0 training release (Liew et al., Sci. Data 2022): 655 T1w scans with lesion
#: masks, one slice each; subjects whose slice has no lesion are excluded later, so an upper bound.
ATLAS_SUBJECTS = 655
#: BraTS'21 axial slices 70..89 per subject (``datasets.prepare brats21``): train/val keep
#: the tumour-free ones (at most 20 per subject), test one per subject.
BRATS_SLICES_PER_SUBJECT = 20
BRATS_SPLIT_CSV = Path(__file__).resolve().parents[1] / "datasets" / "splits" / "brats21_split.csv"


def brats_split_counts(path: Path = BRATS_SPLIT_CSV) -> dict[str, int]:
    """Subjects per split in the fixed BraTS'21 split file."""
    counts: dict[str, int] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            counts[row["split"]] = counts.get(row["split"], 0) + 1
    return counts


def published_sizes(protocol: str) -> DataSizes:
    """The real data of a protocol, sized from the public releases (no data needed)."""
    if protocol == "S1":
        return DataSizes(
            "IXI -> ATLAS 2.0 (published sizes)",
            IXI_T1_SUBJECTS - IXI_VAL,
            IXI_VAL,
            ATLAS_SUBJECTS,
            (128, 128),
            ("T1",),
            f"IXI T1 release: {IXI_T1_SUBJECTS} subjects, 1 slice each, {IXI_VAL} held out for val; "
            f"ATLAS R2.0 training: {ATLAS_SUBJECTS} subjects, 1 slice each (upper bound)",
        )
    counts = brats_split_counts()
    k = BRATS_SLICES_PER_SUBJECT
    return DataSizes(
        "BraTS'21 (published sizes)",
        k * counts["train"],
        k * counts["val"],
        counts["test"],
        (128, 128),
        ("T1", "T1CE", "T2", "FLAIR"),
        f"datasets/splits/brats21_split.csv: {counts['train']}/{counts['val']}/{counts['test']} subjects; "
        f"train/val at most {k} tumour-free slices per subject (upper bound), test 1 per subject",
    )


def data_sizes(protocol: Any, spec: str) -> dict[str, DataSizes]:
    """Per modality the protocol evaluates: the slices a job of the prepared (or embedded) set uses."""
    from benchmarks.execute import data_name, load_data

    data = load_data(spec)
    protocol.check_data(data)
    out = {}
    for modality in protocol.modalities(data):
        view = data.modality(modality)
        out[modality] = DataSizes(
            data_name(spec),
            len(view.split("train")),
            len(view.split("val")),
            len(protocol.select_test(view.split("test"))),
            tuple(int(s) for s in data.images.shape[-2:]),  # type: ignore[arg-type]
            tuple(data.modalities),
            "counted in the set",
        )
    return out


# ---------------------------------------------------------------------- FLOPs
def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (2 per multiply-add) of matmuls, convolutions and attention in ``fn()``, without gradients."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def built_method(name: str, profile: str, overrides: dict[str, Any], shape: tuple[int, int, int], device: str = "meta"):
    """A method with its networks built for inputs ``shape`` (C, H, W), on ``device`` (meta: nothing allocated)."""
    import torch

    from methods.registry import create_method

    method = create_method(name, profile, **{**overrides, "device": device})
    method.input_shape_ = shape
    if name == "madad" or type(method).__name__ == "MADAD":
        method.latent_scale_ = 1.0
    with torch.device(device):
        method._build()
    return method


class _Captured(Exception):
    """Raised by a pre-hook to stop a probe once the stage's inputs are known."""


#: FLOPs per (network, stage module, input shapes): DDPM, THOR, AutoDDPM, AnoDDPM and pDDPM
#: build the same UNet, and counting on the meta device costs about a second per network.
_FLOPS_CACHE: dict[tuple, int] = {}


def _stage_inputs(method: Any, stage: Any) -> tuple:
    """Shapes and dtypes of the tensors the stage's module receives, without running it."""
    top, _, rest = stage.module.partition(".")
    network = method.networks()[top]
    module = network.get_submodule(rest) if rest else network
    seen: list[tuple] = []

    def hook(_module, args, kwargs):
        seen.extend((tuple(a.shape), str(a.dtype)) if hasattr(a, "shape") else repr(a) for a in (*args, *kwargs.values()))
        raise _Captured

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        stage.probe()
    except _Captured:
        pass
    finally:
        handle.remove()
    return (repr(network), rest, tuple(seen))


def stage_flop_counts(method: Any, plan: Any) -> dict[str, int]:
    """FLOPs of one evaluation of each stage of ``plan`` (cached by network and inputs)."""
    out = {}
    for stage in plan.stages:
        key = _stage_inputs(method, stage)
        if key not in _FLOPS_CACHE:
            _FLOPS_CACHE[key] = count_flops(stage.probe)
        out[stage.name] = _FLOPS_CACHE[key]
    return out


def measured_method(name: str, profile: str, overrides: dict[str, Any], shape: tuple[int, int, int]) -> tuple[Any, dict[str, int] | None, str]:
    """The method built on the meta device (the CPU if a network cannot run there), the FLOPs of one
    evaluation of each stage of its cost plan (None: no plan), and the device they were measured on."""
    for device in ("meta", "cpu"):
        try:
            method = built_method(name, profile, overrides, shape, device)
            plan = method.cost_plan(1, 1)
            return method, None if plan is None else stage_flop_counts(method, plan), device
        except (NotImplementedError, RuntimeError):
            if device == "cpu":
                raise
    raise AssertionError("unreachable")


def stage_flops(name: str, profile: str, overrides: dict[str, Any], shape: tuple[int, int, int]) -> dict[str, int]:
    """FLOPs of one evaluation of each stage of the method's cost plan (empty without a plan)."""
    return measured_method(name, profile, overrides, shape)[1] or {}


def score_flops_per_slice(plan: Any, flops: dict[str, int]) -> float:
    return sum(e.count * flops[e.stage] for e in plan.score)


# ---------------------------------------------------------------------- planning
@dataclass
class JobCost:
    method: str
    variant: str
    modality: str
    seed: int
    plan: Any
    flops: dict[str, int]
    scored_slices: int
    trains: bool  # False: a previous job (or a sibling of the training family) trains this key
    trained_by: str

    @property
    def score(self) -> float:
        return self.scored_slices * score_flops_per_slice(self.plan, self.flops)

    @property
    def train(self) -> float:
        return 3.0 * sum(p.samples * self.flops[p.stage] for p in self.plan.train) if self.trains else 0.0

    @property
    def fit_forward(self) -> float:
        return sum(e.count * self.flops[e.stage] for e in self.plan.fit_forward) if self.trains else 0.0


def plan_jobs(jobs: list, sizes: dict[str, DataSizes], needs_val_maps: bool, n_examples: int) -> tuple[list[JobCost], list[str], str]:
    """A ``JobCost`` per job with a cost plan; the jobs left out and why; where FLOPs were measured."""
    from methods.registry import create_method

    costs, unknown, measured_on = [], [], set()
    built: dict[tuple, tuple[Any, dict[str, int] | None, str]] = {}
    seen_keys: dict[tuple, str] = {}
    for job in jobs:
        size = sizes[job.modality]
        profile, overrides = job.variant.resolve(job.profile)
        shape = (1, *size.resolution)
        # networks and FLOPs do not depend on the seed: build once per config
        build_key = (job.method, profile, tuple(sorted((k, str(v)) for k, v in overrides.items())), shape)
        if build_key not in built:
            built[build_key] = measured_method(job.method, profile, overrides, shape)
        method, flops, device = built[build_key]
        if flops is None:
            note = f"{job.method}: declares no cost_plan"
            if note not in unknown:
                unknown.append(note)
            continue
        seeded = create_method(job.method, profile, **overrides, seed=job.seed)  # the training key holds the seed
        missing = [m for m in seeded.training_modalities(job.modality) if m not in size.modalities]
        if missing:  # e.g. Cycl.UNet on S1: no intermediate modality in the data
            note = f"{job.method} ({job.modality}): needs {', '.join(missing)}, which the data lack"
            if note not in unknown:
                unknown.append(note)
            continue
        measured_on.add(device)
        plan = method.cost_plan(size.n_train, size.n_val)
        key = (seeded.training_key(), job.modality, tuple(seeded.training_modalities(job.modality)))
        trains = key not in seen_keys
        seen_keys.setdefault(key, _label(job.method, job.variant.name))
        examples = min(n_examples, size.n_test) if method.can_reconstruct else 0
        scored = size.n_test + (size.n_val if needs_val_maps else 0) + examples
        costs.append(JobCost(job.method, job.variant.name, job.modality, job.seed, plan, flops, scored, trains, seen_keys[key]))
    return costs, unknown, "/".join(sorted(measured_on)) or "-"


# ---------------------------------------------------------------------- table
def _label(method: str, variant: str) -> str:
    return method if variant == "default" else f"{method}:{variant}"


def si(value: float, unit: str = "") -> str:
    """``value`` with an SI prefix: 3.1e15 -> '3.10 P'."""
    if value == 0:
        return f"0 {unit}".strip()
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".strip()


def _stages_text(plan: Any, flops: dict[str, int]) -> str:
    if not plan.stages:
        return "-"
    if len(plan.stages) == 1:
        return si(flops[plan.stages[0].name])
    return ", ".join(f"{s.name} {si(flops[s.name])}" for s in plan.stages)


def _evals_text(plan: Any) -> str:
    def one(e) -> str:
        count = f"{e.count:g}" if e.bound is None else f"~{e.count:g} (<= {e.bound:g})"
        return count if len(plan.stages) == 1 else f"{e.stage} {count}"

    return ", ".join(one(e) for e in plan.score) or "0"


def _train_text(plan: Any) -> str:
    if not plan.train:
        return "-"
    phases: dict[tuple[int, int], list[str]] = {}
    for p in plan.train:
        phases.setdefault((p.steps, p.batch), []).append(p.stage)
    if len(plan.stages) == 1:
        return ", ".join(f"{s:,} x {b}" for (s, b) in phases)
    return ", ".join(f"{'+'.join(names)} {s:,} x {b}" for (s, b), names in phases.items())


def _fit_forward_text(plan: Any) -> str:
    total: dict[str, float] = {}
    for e in plan.fit_forward:
        total[e.stage] = total.get(e.stage, 0.0) + e.count
    if not total:
        return "-"
    if len(plan.stages) == 1:
        return f"{sum(total.values()):,.0f}"
    return ", ".join(f"{stage} {count:,.0f}" for stage, count in total.items())


def hours(flops: float, peak_tflops: float, mfu: float) -> float:
    return flops / (peak_tflops * 1e12 * mfu) / 3600.0


def _hours_text(h: float) -> str:
    return "0" if h == 0 else (f"{h:.3g}" if h >= 0.01 else "<0.01")


def _total_text(h: float) -> str:
    return f"{h:.3g} device-hours" if h >= 0.01 else f"{h * 3600:.3g} device-seconds"


def cost_table(costs: list[JobCost], peak_tflops: float, mfu: float) -> str:
    """Two tables, one row per method and variant: what one job does, then what all its jobs cost; and the total."""
    import pandas as pd

    groups: dict[tuple[str, str], list[JobCost]] = {}
    for c in costs:
        groups.setdefault((c.method, c.variant), []).append(c)
    if not groups:
        return "(no job with a cost plan)"
    work, cost = [], []
    grand = 0.0
    for (method, variant), items in groups.items():
        first = items[0]
        train, fit_fwd, score = (sum(getattr(c, part) for c in items) for part in ("train", "fit_forward", "score"))
        total = train + fit_fwd + score
        grand += total
        trainings = sum(c.trains for c in items)
        shared = sorted({c.trained_by for c in items if not c.trains})
        name = {"method": method, "variant": variant}
        work.append(
            {
                **name,
                "FLOPs/eval": _stages_text(first.plan, first.flops),
                "evals/slice": _evals_text(first.plan),
                "train steps x batch": _train_text(first.plan),
                "fit forward evals": _fit_forward_text(first.plan),
            }
        )
        cost.append(
            {
                **name,
                "jobs": len(items),
                "trainings": f"{trainings}" + (f" ({len(items) - trainings} by {', '.join(shared)})" if shared else ""),
                "slices scored": sum(c.scored_slices for c in items),
                "train": si(train),
                "fit forward": si(fit_fwd),
                "score": si(score),
                "total FLOPs": si(total),
                "device-h": _hours_text(hours(total, peak_tflops, mfu)),
            }
        )
    frames = [pd.DataFrame(rows) for rows in (work, cost)]
    if all(v == "default" for v in frames[0]["variant"]):
        frames = [f.drop(columns="variant") for f in frames]
    return (
        "per job (evals = samples through a network; fit forward = validation and encoding passes of fit):\n"
        + frames[0].to_string(index=False)
        + "\n\nall planned jobs (training counted once per training key; 'n by X': n jobs score the network X trains):\n"
        + frames[1].to_string(index=False)
        + f"\n\ntotal: {si(grand, 'FLOP')} = {_total_text(hours(grand, peak_tflops, mfu))}"
    )


# ---------------------------------------------------------------------- command line
def estimate_main(args: argparse.Namespace) -> int:
    """The ``--estimate`` branch of ``benchmarks.run``: print the cost table, train nothing."""
    from benchmarks.jobs import Variant, build_jobs, parse_variants
    from benchmarks.run import UsageError, _validate_variants, parse_seeds, parse_set_overrides, resolve_methods, resolve_profile
    from protocols import get_protocol

    start = time.perf_counter()
    gpu = args.gpu.lower()
    if gpu not in GPU_PEAK_TFLOPS:
        raise UsageError(f"--gpu {args.gpu}: unknown; choose from {', '.join(f'{k} ({v:g} TFLOP/s)' for k, v in GPU_PEAK_TFLOPS.items())}")
    if not 0 < args.mfu <= 1:
        raise UsageError(f"--mfu {args.mfu}: give a fraction of the peak in (0, 1], e.g. 0.4")
    if args.examples < 0:
        raise UsageError(f"--examples {args.examples}: give 0 or more")
    methods = resolve_methods(args.methods)
    seeds = parse_seeds(args.seeds)
    # the estimate plans a GPU run: 'auto' is the profile a GPU run gets
    profile = resolve_profile("paper" if args.profile == "auto" else args.profile, "cpu", methods)
    protocol = get_protocol(args.protocol)
    if args.data == "published":
        published = published_sizes(protocol.name)
        sizes = {m: published for m in published.modalities}
    else:
        spec = args.data if args.data == "embedded" else str(Path(args.data).resolve())
        try:
            sizes = data_sizes(protocol, spec)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(f"--data {args.data}: {exc} (or --data published: the real set's published sizes)") from exc
    modalities = list(sizes)
    if args.modalities:
        wanted = [m.strip() for m in args.modalities.split(",") if m.strip()]
        bad = [m for m in wanted if m not in sizes]
        if bad:
            raise UsageError(f"--modalities: {', '.join(bad)} not evaluated by {protocol.name} on this data; choose from {', '.join(sizes)}")
        modalities = wanted
    try:
        variants = parse_variants(args.variants, methods)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    for method, overrides in parse_set_overrides(args.set, methods).items():
        variants[method] = [Variant(v.name, tuple({**overrides, **v.as_dict}.items())) for v in variants[method]]
    _validate_variants(variants, profile)
    any_size = sizes[modalities[0]]
    jobs = build_jobs(protocol.name, methods, args.data, any_size.name, modalities, seeds, profile, variants)
    costs, unknown, measured_on = plan_jobs(jobs, sizes, protocol.needs_val_maps, args.examples)
    peak = GPU_PEAK_TFLOPS[gpu]
    print(
        f"uad-bench estimate: protocol {protocol.name}, profile {profile}, {len(methods)} method(s) x "
        f"{len(modalities)} modalit{'y' if len(modalities) == 1 else 'ies'} ({', '.join(modalities)}) x {len(seeds)} seed(s) -> {len(jobs)} job(s)\n"
        f"data: {any_size.name}, per modality train {any_size.n_train:,} / val {any_size.n_val:,} / test {any_size.n_test:,} slices "
        f"at {any_size.resolution[0]} x {any_size.resolution[1]} ({any_size.source})\n"
        f"scored per job: test{' + validation (the protocol scores it)' if protocol.needs_val_maps else ''} + "
        f"{args.examples} example slices (methods that restore)\n"
        f"device: {gpu}, dense bf16 peak {peak:g} TFLOP/s, at {args.mfu:.0%} of peak = {peak * args.mfu:g} TFLOP/s; "
        f"FLOPs measured with torch.utils.flop_counter on the {measured_on} device; training = 3 x forward\n"
    )
    print(cost_table(costs, peak, args.mfu))
    for cost in {c.method: c for c in costs}.values():
        for note in cost.plan.notes:
            print(f"note: {cost.method}: {note}")
        for e in cost.plan.score:
            if e.bound is not None:
                print(f"note: {cost.method}: {e.stage} evaluations per slice are {e.what}")
    for note in unknown:
        print(f"not estimated: {note}")
    print(f"(estimated in {time.perf_counter() - start:.1f} s; nothing was trained)", file=sys.stderr)
    return 0


def add_estimate_arguments(parser: argparse.ArgumentParser) -> None:
    """``--estimate``, ``--gpu`` and ``--mfu`` of ``benchmarks.run``."""
    parser.add_argument("--estimate", action="store_true", help="print the FLOPs and device-hours of the planned jobs and exit without training (--profile auto = paper; --data published: the real set's published sizes)")
    parser.add_argument("--gpu", default=DEFAULT_GPU, help=f"--estimate: GPU whose dense bf16 peak is used ({', '.join(GPU_PEAK_TFLOPS)}; default {DEFAULT_GPU})")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=f"--estimate: fraction of the peak the run achieves (default {DEFAULT_MFU})")


__all__ = ["GPU_PEAK_TFLOPS", "DataSizes", "count_flops", "detect_gpu", "estimate_main", "published_sizes", "stage_flops"]
