"""uad-bench's command-line entry points (run, ablate, leaderboard), executors and reports."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _check_datasets_package() -> None:
    """Fail loudly when ``datasets`` is not this suite's package (e.g. Hugging Face's shadows it).

    The suite's top-level ``datasets`` package shares its name with Hugging Face's
    ``datasets``; in one environment one of the two hides the other, and the failure would
    otherwise surface later as a confusing missing ``datasets.format``.
    """
    spec = importlib.util.find_spec("datasets")
    expected = Path(__file__).resolve().parent.parent / "datasets"
    origin = Path(spec.origin).resolve().parent if spec is not None and spec.origin else None
    if origin != expected and not (origin is not None and (origin / "format.py").is_file() and (origin / "embedded").is_dir()):
        raise ImportError(
            f"Python imports the package 'datasets' from {origin or 'nowhere'}, not uad-bench's own ({expected}). "
            "Hugging Face's 'datasets' (or another package of that name) is installed in this environment; "
            "install uad-bench in a virtual environment of its own (bash install.sh)."
        )


_check_datasets_package()
