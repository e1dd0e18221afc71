"""The registry of exposed functions, and loading a registry from an import string.

A registry maps public names to plain functions. Handler processes find the
registry by import string (``"pkg.module:registry"``), so a registry handed to a
server must live at module level where a fresh interpreter can import it.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from .errors import ConfigError

__all__ = ["Registry", "MethodInfo", "load_registry", "import_string_of"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class MethodInfo:
    """What clients learn about one exposed method."""

    name: str
    signature: str
    doc: str


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"method name must be a non-empty string, not {name!r}")
    for part in name.split("."):
        if not part.isidentifier():
            raise ConfigError(f"method name {name!r}: each dotted part must be an identifier")
        if part.startswith("_"):
            raise ConfigError(f"method name {name!r}: names starting with '_' are private and never exposed")


class Registry:
    """A set of functions exposed under public names.

    >>> registry = Registry()
    >>> @registry.expose
    ... def add(x, y):
    ...     return x + y
    """

    def __init__(self) -> None:
        self._functions: dict[str, Callable[..., Any]] = {}
        # Remember where the registry was made, to find its import string later.
        self._module: str | None = sys._getframe(1).f_globals.get("__name__")

    @overload
    def expose(self, fn: F, /) -> F: ...

    @overload
    def expose(self, fn: None = None, /, *, name: str | None = None) -> Callable[[F], F]: ...

    def expose(self, fn: F | None = None, /, *, name: str | None = None) -> F | Callable[[F], F]:
        """Decorator: expose ``fn`` under its own name, or under ``name=`` (dots make namespaces)."""
        if fn is None:
            return lambda f: self.register(f, name=name)
        return self.register(fn, name=name)

    def register(self, fn: F, name: str | None = None) -> F:
        """Expose ``fn`` as ``name`` (default: its ``__name__``); returns ``fn`` unchanged."""
        if not callable(fn):
            raise ConfigError(f"cannot expose {fn!r}: not callable")
        name = fn.__name__ if name is None else name
        _check_name(name)
        if name in self._functions and self._functions[name] is not fn:
            raise ConfigError(f"method name {name!r} is already exposed")
        self._functions[name] = fn
        return fn

    def get(self, name: str) -> Callable[..., Any] | None:
        """The function exposed as ``name``, or None. A plain lookup: no attribute walking."""
        return self._functions.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._functions

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._functions))

    def __len__(self) -> int:
        return len(self._functions)

    def describe(self) -> list[MethodInfo]:
        """Name, signature text and first docstring line of every method, sorted by name."""
        return [_describe(name, self._functions[name]) for name in self]

    def import_string(self) -> str:
        """``"module:attribute"`` under which a fresh interpreter finds this registry."""
        return import_string_of(self)


def _describe(name: str, fn: Callable[..., Any]) -> MethodInfo:
    try:
        signature = str(inspect.signature(fn, eval_str=True))
    except Exception:  # annotations that cannot be evaluated: show them as written
        try:
            signature = str(inspect.signature(fn))
        except (TypeError, ValueError):
            signature = "(...)"
    doc = inspect.getdoc(fn) or ""
    return MethodInfo(name, signature, doc.strip().splitlines()[0] if doc.strip() else "")


def import_string_of(registry: Registry) -> str:
    """Find the module-level name of ``registry``; :class:`ConfigError` if it has none."""
    module_name = registry._module
    module = sys.modules.get(module_name or "")
    if module is not None:
        for attribute, value in vars(module).items():
            if value is registry:
                return f"{module_name}:{attribute}"
    raise ConfigError(
        "handler processes import the registry, so it must be a module-level global of an "
        f"importable module (this one was made in {module_name!r}); "
        "or pass its import string, 'pkg.module:registry'"
    )


def load_registry(spec: str) -> Registry:
    """Import ``"pkg.module:attribute"`` and return the :class:`Registry` it names."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"registry import string {spec!r} must look like 'pkg.module:registry'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import registry module {module_name!r}: {exc}") from exc
    registry: Any = module
    for part in attribute.split("."):
        try:
            registry = getattr(registry, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(registry, Registry):
        raise ConfigError(f"{spec!r} is a {type(registry).__name__}, not an rpc.Registry")
    return registry
