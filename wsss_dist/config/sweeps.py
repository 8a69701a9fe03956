"""Sweeps: a key given a list ``key=[a,b]`` makes one point (run) per value."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import ConfigError
from .build import ALIASES, _short, parse_words
from .keys import _field_types
from .schema import SweepCfg
from .validate import PATH_RULE, _safe_path, check_value


@dataclass(frozen=True)
class Point:
    """One point of a sweep: its name (its values), its ``key=value`` words (with ``run=``) and the swept values."""

    name: str
    words: tuple[str, ...]
    values: tuple[tuple[str, str], ...]


def sweep_axes(words: Iterable[str]) -> list[tuple[str, list[str]]]:
    """The swept keys of ``words`` in order: a key that takes one value given a list ``[a,b,...]``."""
    axes = []
    for key, value in parse_words(words):
        v = value.strip()
        if key in ("stage", "config") or not (v.startswith("[") and v.endswith("]")):
            continue
        targets = ALIASES.get(key, (key,))
        typ = _field_types().get(targets[0])
        if typ is None or getattr(typ, "__origin__", None) is tuple:
            continue  # unknown (make_config names it) or a list-valued key such as cam.scales
        items = [x.strip() for x in v[1:-1].split(",") if x.strip()]
        if not items:
            raise ConfigError(f"{key}={value}: an empty list sweeps nothing")
        axes.append((key, items))
    return axes


def sweep_points(words: list[str]) -> tuple[str, list[Point]]:
    """The sweep of ``words``: (sweep directory, its points); no swept key → ("", []).

    Every swept key's list is expanded (``sweep.mode=product``: all combinations, ``zip``: element by element);
    each point gets ``run=<sweep dir>/<values joined by ->`` (e.g. ``runs/grid/fmix-train_aug-s2``).
    """
    import itertools

    axes = sweep_axes(words)
    if not axes:
        return "", []
    opts = dict(parse_words([w for w in words if w.startswith("sweep.")]))
    mode = opts.get("sweep.mode", SweepCfg.mode)
    if mode not in ("product", "zip"):
        raise ConfigError(f"sweep.mode={mode}: allowed values are product, zip")
    if mode == "zip":
        sizes = {len(v) for _, v in axes}
        if len(sizes) != 1:
            raise ConfigError("sweep.mode=zip needs lists of equal length: " + ", ".join(f"{k} has {len(v)}" for k, v in axes))
        combos = list(zip(*(v for _, v in axes)))
    else:
        combos = list(itertools.product(*(v for _, v in axes)))
    name = opts.get("sweep.name") or "-".join(k.split(".")[-1] for k, _ in axes)
    base = dict(parse_words(words)).get("run")
    check_value("sweep.name", name)
    root = str(Path(base) if base else Path("runs") / name)
    swept = {k for k, _ in axes}
    fixed = [w for w in words if w.split("=", 1)[0].strip().lstrip("-") not in swept | {"run"}]
    points = []
    for combo in combos:
        values = tuple((k, v) for (k, _), v in zip(axes, combo))
        pname = "-".join(_short(k, v) for k, v in values)
        if not _safe_path(f"{root}/{pname}"):  # checked before anything is written or submitted
            raise ConfigError(f"run={root}/{pname} (a point of the sweep): must be {PATH_RULE}; choose sweep.name "
                              "or run=, or sweep values that make shorter names")
        points.append(Point(pname, tuple(fixed + [f"{k}={v}" for k, v in values] + [f"run={root}/{pname}"]), values))
    if len({p.name for p in points}) != len(points):
        raise ConfigError("two points of the sweep get the same name; sweep distinct values")
    return root, points
