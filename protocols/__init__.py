"""Evaluation protocols S1 (global Max Dice, THOR setting) and S2 (per-image Max Dice, IterMask2 setting).

``get_protocol("S2")`` returns a configured protocol; keyword arguments override its
parameters (``mode="grid", grid="itermask2"``, ``map_normalisation="minmax_test_set"``,
``apply_brain_mask=False``, ...). Metrics live in :mod:`protocols.metrics`. Maps are higher =
more anomalous; the exact search predicts map >= threshold, a peer grid follows its
peer's rule (map > threshold, ...).
"""

from __future__ import annotations

from typing import Any

from protocols import metrics
from protocols.base import EvaluationResult, Protocol, ProtocolDataError, SizeBuckets
from protocols.metrics import MaxDice
from protocols.s1 import S1Protocol
from protocols.s2 import S2Protocol

#: Protocol classes by canonical name.
PROTOCOLS: dict[str, type[Protocol]] = {"S1": S1Protocol, "S2": S2Protocol}


def list_protocols() -> list[str]:
    return sorted(PROTOCOLS)


def get_protocol(name: str, **overrides: Any) -> Protocol:
    """The protocol called ``name`` (case-insensitive), with parameter ``overrides``."""
    key = str(name).strip().upper()
    if key not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; valid protocols are {', '.join(list_protocols())}")
    return PROTOCOLS[key](**overrides)


__all__ = [
    "PROTOCOLS",
    "EvaluationResult",
    "MaxDice",
    "Protocol",
    "ProtocolDataError",
    "S1Protocol",
    "S2Protocol",
    "SizeBuckets",
    "get_protocol",
    "list_protocols",
    "metrics",
]
