"""Registries of plug-ins (direction methods, readouts): one instance per name, no silent clash."""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def add_plugin(registry: dict[str, Any], cls: type[T], kind: str) -> type[T]:
    """Put an instance of ``cls`` under ``cls.name``; another class of that name is an error."""
    name = cls.name  # type: ignore[attr-defined]
    if name in registry and type(registry[name]) is not cls:
        raise ValueError(f"a {kind} named {name!r} is registered already")
    registry[name] = cls()
    return cls
