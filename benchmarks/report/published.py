"""Published numbers (results/published.csv, in %) and the mapping from our ids to the papers' names."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

# Registry id -> the name the papers print.
PUBLISHED_NAMES: dict[str, str] = {
    "intensity": "Intensity",
    "ae": "AE",
    "ddpm": "DDPM",
    "anoddpm": "AnoDDPM",
    "autoddpm": "AutoDDPM",
    "pddpm": "pDDPM",
    "thor": "THOR",
    "dae": "DAE",
    "madad": "MAD-AD",
    "cyclunet": "Cycl.UNet",
    "itermask2": "IterMask2",
}
# The order the papers list the methods in; unknown methods follow alphabetically.
METHOD_ORDER: tuple[str, ...] = ("intensity", "ae", "ddpm", "anoddpm", "autoddpm", "pddpm", "thor", "cyclunet", "dae", "itermask2", "madad")
# Untrained floors (Meissen et al., 2021): shown first and marked, the score to beat.
FLOOR_METHODS: tuple[str, ...] = ("intensity",)
FLOOR_MARK = "floor (untrained)"
# Which data each protocol's published numbers come from.
PUBLISHED_DATA: dict[str, str] = {"S1": "IXI → ATLAS 2.0", "S2": "BraTS'21"}
COLUMNS = ("source", "table", "protocol", "method", "column", "max_dice", "note")


def display_name(method: str) -> str:
    return PUBLISHED_NAMES.get(method, method)


def method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def is_floor(method: str) -> bool:
    return method in FLOOR_METHODS


def row_label(method: str, variant: str) -> str:
    """Our label for a (method, variant) row: 'MAD-AD', 'MAD-AD [ddim_steps=2]', 'Intensity — floor (untrained)'."""
    name = f"{display_name(method)} — {FLOOR_MARK}" if is_floor(method) else display_name(method)
    return name if variant == "default" else f"{name} [{variant}]"


def _normalise(label: str) -> str:
    # 'MAD-AD[source=latent diff]' and 'madad' + 'source=latent_diff' must meet.
    return re.sub(r"[\s_\-]", "", label).lower()


def published_label(method: str, variant: str) -> str:
    """The label the papers would give (method, variant); the '+' of combined knobs becomes ','."""
    name = display_name(method)
    return name if variant == "default" else f"{name}[{variant.replace('+', ',')}]"


@dataclass
class Published:
    """The published table, looked up by (protocol, method label, column)."""

    frame: pd.DataFrame
    path: Path | None = None
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._index: dict[tuple[str, str, str], float] = {}
        for row in self.frame.sort_values(["table", "method", "column"]).itertuples(index=False):
            key = (str(row.protocol), _normalise(str(row.method)), str(row.column))
            self._index.setdefault(key, float(row.max_dice))  # first table wins (Table 2 before 3)

    def lookup(self, protocol: str, method: str, variant: str, column: str) -> float | None:
        return self._index.get((protocol, _normalise(published_label(method, variant)), column))

    def sources(self, protocol: str) -> list[str]:
        return sorted(self.frame.loc[self.frame["protocol"] == protocol, "source"].astype(str).unique())

    def caption(self, protocol: str) -> str:
        """'published (MAD-AD IPMI 2025, BraTS'21)'."""
        parts = self.sources(protocol) + ([PUBLISHED_DATA[protocol]] if protocol in PUBLISHED_DATA else [])
        return f"published ({', '.join(parts)})" if parts else "published"

    def __len__(self) -> int:
        return len(self.frame)


def load_published(path: Path | None) -> Published:
    """Read the published CSV; a missing or malformed file gives an empty table and a problem note."""
    empty = pd.DataFrame(columns=list(COLUMNS))
    if path is None:
        return Published(empty)
    path = Path(path)
    if not path.is_file():
        return Published(empty, path, [f"published numbers not found at {path}"])
    frame = pd.read_csv(path)
    missing = [c for c in ("table", "protocol", "method", "column", "max_dice") if c not in frame.columns]
    if missing:
        return Published(empty, path, [f"{path}: missing columns {', '.join(missing)}"])
    for column in ("source", "note"):
        if column not in frame.columns:
            frame[column] = ""
    frame["note"] = frame["note"].fillna("")
    frame["source"] = frame["source"].fillna("")
    frame = frame.dropna(subset=["max_dice"])
    return Published(frame.reset_index(drop=True), path)
