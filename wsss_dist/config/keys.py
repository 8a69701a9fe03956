"""Every key of the schema: its type, default and one-line doc (``wsss-dist keys``), and reading a dotted key."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from typing import Any, Literal

from .schema import Config


@functools.cache
def _schema() -> dict[str, tuple[Any, Any, str]]:
    """Dotted key → (type, default, one-line doc) of every leaf field, from the dataclasses and their comments."""
    import typing

    out: dict[str, tuple[Any, Any, str]] = {}

    def walk(obj: Any, prefix: str) -> None:
        hints, docs = typing.get_type_hints(type(obj)), _field_docs(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, prefix + f.name + ".")
            else:
                out[prefix + f.name] = (hints[f.name], value, docs.get(f.name, ""))

    walk(Config(), "")
    return out


def _field_docs(cls: type) -> dict[str, str]:
    """Field name → its trailing ``# comment`` in the class source."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"^\s+(\w+): [^#]*?#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _all_keys() -> list[str]:
    return list(_schema())


def _is_group(key: str) -> bool:
    return any(k.startswith(key + ".") for k in _schema())


def _field_types() -> dict[str, Any]:
    return {k: t for k, (t, _, _) in _schema().items()}


def type_name(typ: Any) -> str:
    """A short readable name of a field type (``int``, ``str | None``, ``one of sgd, adamw``, ``list of float``)."""
    origin, args = getattr(typ, "__origin__", None), getattr(typ, "__args__", ())
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if args and type(None) in args:
        return " | ".join(type_name(a) for a in args if a is not type(None)) + " | null"
    return getattr(typ, "__name__", str(typ))


def get(cfg: Config, key: str) -> Any:
    """The value of a dotted key."""
    obj: Any = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj
