"""Method registry in the style of timm: ``@register_method``, ``list_methods``, ``create_method``.

In-tree methods register with the decorator when ``methods`` is imported. Third-party
packages expose classes through the entry-point group ``uad_bench.methods``::

    [project.entry-points."uad_bench.methods"]
    mymethod = "my_package.module:MyMethod"
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Callable, TypeVar

from methods.base import UADMethod

ENTRY_POINT_GROUP = "uad_bench.methods"
_REGISTRY: dict[str, type[UADMethod]] = {}
_SOURCES: dict[str, str] = {}
_plugins_loaded = False

M = TypeVar("M", bound=type[UADMethod])


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _source_of(cls: type) -> str:
    """``built-in`` for classes of this package, else ``plugin <module>`` (code from elsewhere)."""
    module = cls.__module__
    return "built-in" if module == "methods" or module.startswith("methods.") else f"plugin {module}"


def register_method(name: str, source: str | None = None) -> Callable[[M], M]:
    """Class decorator: make ``cls`` available as ``name`` (``source`` defaults to where it comes from)."""

    def decorate(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, UADMethod)):
            raise TypeError(f"@register_method({name!r}) must decorate a UADMethod subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"method name {name!r} is already taken by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        _SOURCES[name] = source or _source_of(cls)
        return cls

    return decorate


register = register_method  # short alias


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not hide the others
            import warnings

            warnings.warn(f"could not load uad_bench method plugin {ep.name!r} ({ep.value}): {exc}", stacklevel=2)
            continue
        register_method(ep.name, source=f"plugin {ep.value}")(cls)


def _ensure_builtins() -> None:
    import methods  # noqa: F401  (importing the package registers the built-in methods)

    _load_plugins()


def list_methods() -> list[str]:
    _ensure_builtins()
    return sorted(_REGISTRY)


def method_sources() -> dict[str, str]:
    _ensure_builtins()
    return dict(sorted(_SOURCES.items()))


def get_method_class(name: str) -> type[UADMethod]:
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}") from None


def create_method(name: str, profile: str = "paper", **overrides: Any) -> UADMethod:
    """Instantiate ``name`` with a named profile and field overrides."""
    return get_method_class(name).from_profile(profile, **overrides)
