"""UAD methods. Importing this package registers every built-in method."""

__version__ = "0.1.0"

from methods.base import MethodConfig, UADMethod, inference_field  # noqa: E402
from methods.registry import create_method, get_method_class, list_methods, register_method  # noqa: E402

# Built-in methods register themselves on import. Each import is guarded so that a
# method under construction never breaks the others.
import importlib as _importlib

for _name in ("intensity", "ae", "ddpm", "anoddpm", "autoddpm", "pddpm", "thor", "cyclunet", "dae", "itermask2", "madad"):
    try:
        _importlib.import_module(f"methods.{_name}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"methods.{_name}":
            raise

__all__ = ["MethodConfig", "UADMethod", "inference_field", "create_method", "get_method_class", "list_methods", "register_method", "__version__"]
