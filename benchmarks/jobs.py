"""The job grid: (protocol, method, data/modality, seed, variant), and its file layout."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

DEFAULT_VARIANT = "default"
PROFILE_KNOB = "profile"  # a variant knob naming another profile, not a config field
SUPERSEDED_DIR = "superseded"  # records a rerun replaced (benchmarks/resume.py); reports skip it


def safe_component(name: str) -> str:
    """``name`` as one harmless path component: no separators, no ``..``, nothing hidden.

    Names of data sets, modalities, methods and variants come from manifests, plugins and
    the command line; none of them may steer a write outside the run folder.
    """
    text = re.sub(r"[^A-Za-z0-9_.=+-]", "_", str(name)).lstrip(".")
    return text or "_"


def inside(root: Path, path: Path) -> Path:
    """``path`` if it resolves below ``root``; else a ValueError (a write would escape it)."""
    resolved, base = path.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        raise ValueError(f"refusing to write {path}: it resolves outside {root}")
    return path


@dataclass(frozen=True)
class Variant:
    """Config overrides applied on top of a method's profile (``default`` = none)."""

    name: str = DEFAULT_VARIANT
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def as_dict(self) -> dict[str, Any]:
        return dict(self.overrides)

    def resolve(self, run_profile: str) -> tuple[str, dict[str, Any]]:
        """(profile, field overrides): the reserved knob ``profile`` swaps the named profile the
        overrides apply to (``madad:profile=official-quick`` compares presets as ablation rows
        of the run's section); every other knob is a config field."""
        overrides = self.as_dict
        return str(overrides.pop(PROFILE_KNOB, run_profile)), overrides


@dataclass(frozen=True)
class Job:
    protocol: str
    method: str
    data: str  # "embedded" or a path to a prepared set
    data_name: str
    modality: str
    seed: int
    profile: str
    variant: Variant = field(default_factory=Variant)
    #: ``--dry-run``: the method's ``dry_run_overrides`` on top of the variant, a few slices
    #: (``benchmarks.execute.dry_run_splits``), and a record marked ``"dry_run": true``
    dry_run: bool = False

    @property
    def job_id(self) -> str:
        return f"{self.protocol}/{self.profile}/{self.method}/{self.data_name}-{self.modality}/seed{self.seed}/{self.variant.name}"

    def record_path(self, out: Path) -> Path:
        name = f"{self.data_name}-{self.modality}__seed{self.seed}__{self.variant.name}.json"
        parts = [safe_component(p) for p in ("records", self.protocol, self.profile, self.method, name)]
        return inside(Path(out), Path(out).joinpath(*parts))

    @property
    def group_key(self) -> tuple:
        """Jobs with the same key differ only in their variant and run back to back."""
        return (self.protocol, self.method, self.data, self.modality, self.seed, self.profile, self.dry_run)

    def settings(self) -> tuple[str, dict[str, Any]]:
        """(profile, field overrides) the job's method is built with: the variant's, then a dry run's."""
        profile, overrides = self.variant.resolve(self.profile)
        if not self.dry_run:
            return profile, overrides
        from methods.registry import get_method_class

        cls = get_method_class(self.method)
        config = cls.config_for(profile, seed=self.seed, **overrides)
        return profile, {**overrides, **cls.dry_run_overrides(config)}


def parse_variants(specs: Iterable[str], methods: Iterable[str]) -> dict[str, list[Variant]]:
    """Parse ``--variants`` flags.

    Each flag is ``METHOD:KNOB=V1,V2[,...]`` and adds one variant per value (one knob at a
    time, as the paper's ablation tables do); several knobs in one variant are joined with
    ``+``: ``madad:ddim_steps=2+gamma=none``. The knob ``profile`` names another profile of
    the method (``madad:profile=official-quick``). The default variant is always kept.
    """
    methods = list(methods)
    result: dict[str, list[Variant]] = {m: [Variant()] for m in methods}
    for spec in specs:
        if ":" not in spec:
            raise ValueError(f"--variants {spec!r}: expected METHOD:KNOB=V1,V2 (e.g. madad:ddim_steps=2,5,10)")
        method, body = spec.split(":", 1)
        if method not in result:
            raise ValueError(f"--variants {spec!r}: method {method!r} is not among --methods ({', '.join(methods)})")
        if "+" in body:
            overrides = tuple(_split_assignment(part, spec) for part in body.split("+"))
            combos = [tuple((k, v) for k, v in overrides)]
        else:
            key, values = _split_assignment(body, spec)
            combos = [((key, v.strip()),) for v in values.split(",")]
        if any(not k or not v for combo in combos for k, v in combo):
            raise ValueError(f"--variants {spec!r}: every knob needs a name and non-empty values (e.g. madad:ddim_steps=2,5,10)")
        for combo in combos:
            name = "+".join(f"{k}={v}" for k, v in combo)
            if all(existing.name != name for existing in result[method]):
                result[method].append(Variant(name=name, overrides=combo))
    return result


def _split_assignment(text: str, spec: str) -> tuple[str, str]:
    if "=" not in text:
        raise ValueError(f"--variants {spec!r}: {text!r} is not KNOB=VALUE")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def build_jobs(
    protocol: str,
    methods: list[str],
    data: str,
    data_name: str,
    modalities: list[str],
    seeds: list[int],
    profile: str,
    variants: dict[str, list[Variant]],
    dry_run: bool = False,
) -> list[Job]:
    jobs = []
    for method, modality, seed in itertools.product(methods, modalities, seeds):
        for variant in variants.get(method, [Variant()]):
            jobs.append(Job(protocol, method, data, data_name, modality, seed, profile, variant, dry_run))
    return jobs


def group_jobs(jobs: list[Job]) -> list[list[Job]]:
    """Group jobs that share a trained model, keeping first-seen order."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.group_key, []).append(job)
    return list(groups.values())
