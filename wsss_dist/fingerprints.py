"""What every output was made from: the data settings' hash (which names the shards folder) and each stage's
fingerprint (the config keys that affect it, the content of the shards it read and the outputs of the stages it
read), recorded in its ``DONE``.

A stage whose DONE holds another fingerprint is not done: when its own settings differ the run refuses in one line
(a run is its config: a new ``run=`` or ``redo=STAGE``); when only its inputs differ (shards rebuilt, an upstream
stage redone with other results) it runs again. Content hashes, never times: an uninterrupted run and a killed and
resumed one record the same fingerprints.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from . import runs
from .config import Config, data_settings, is_operational, to_dict
from .registry import STAGE_SPECS

IGNORED_FILES = frozenset({"DONE", "LOCK", "STARTED", "metrics.json", "environment.json"})  # not results, or written after the digest
IGNORED_DIRS = frozenset({"ckpt", "tb", "logs"})


def digest(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def stage_settings(cfg: Config, stage: str) -> dict[str, Any]:
    """The config keys (dotted, with their values) that affect ``stage`` itself."""
    if stage == "shards":
        return data_settings(cfg)
    spec = STAGE_SPECS[stage]

    def within(key: str, prefixes: tuple[str, ...]) -> bool:
        return any(key == w or key.startswith(w + ".") for w in prefixes)

    when = spec.settings_when(cfg)  # keys it names win over not_settings (pseudo.crf_* only with pseudo.crf=true)
    return {k: v for k, v in _flat(to_dict(cfg)).items()
            if (within(k, when) or within(k, spec.settings) and not within(k, spec.not_settings))
            and not is_operational(k)}


def upstream(cfg: Config, stage: str) -> list[str]:
    """The stages whose outputs ``stage`` reads (its :class:`~wsss_dist.registry.StageSpec`'s ``reads``)."""
    return list(STAGE_SPECS[stage].reads(cfg))


def stage_path(cfg: Config, stage: str) -> Path:
    """Where a stage's outputs and DONE live (a sweep's shared teacher: ``teacher.dir``)."""
    return cfg.teacher_dir if stage == "teacher" else cfg.run_dir / stage


def manifest_digest(shards_dir: Path) -> str | None:
    """A hash of the shards' content (every shard's sha256, by split) from ``manifest.json``; None when unreadable."""
    try:
        splits = runs.read_json(Path(shards_dir) / "manifest.json")["splits"]
        return digest({s: info["sha256"] for s, info in sorted(splits.items())})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def output_digest(path: Path) -> str:
    """A hash of a stage folder's results: each file's sha256 (an output shard's from its record), by relative path;
    checkpoints, logs, TensorBoard files and the markers are left out."""
    items = {}
    for f in sorted(Path(path).rglob("*")):
        rel = f.relative_to(path)
        if not f.is_file() or f.name in IGNORED_FILES or f.name.startswith(".") \
                or any(p in IGNORED_DIRS for p in rel.parts[:-1]):
            continue
        record = f.with_name(f.name + ".json")
        sha = None
        if f.suffix == ".tar" and record.is_file():
            try:
                sha = runs.read_json(record).get("sha256")
            except (OSError, ValueError, AttributeError):
                sha = None
        items[str(rel)] = sha or runs.sha256_file(f)
    return digest(items)



@dataclasses.dataclass
class Fingerprint:
    """What a stage is made from: its own settings and its inputs (the shards' and upstream outputs' digests)."""

    settings: dict[str, Any]
    inputs: dict[str, Any]

    @property
    def inputs_hash(self) -> str:
        """One hash of the inputs."""
        return digest(self.inputs)

    def record(self, output: str | None = None) -> dict[str, Any]:
        """The JSON kept in DONE (and ``STARTED``)."""
        return {"settings": self.settings, "inputs": self.inputs, "output": output}


def fingerprint(cfg: Config, stage: str) -> Fingerprint:
    """The fingerprint ``stage`` would have if it ran now with ``cfg``."""
    inputs: dict[str, Any] = {}
    if stage != "shards":
        inputs["shards"] = manifest_digest(cfg.shards_dir)
    for up in upstream(cfg, stage):
        inputs[up] = recorded(stage_path(cfg, up)).get("output")
    return Fingerprint(stage_settings(cfg, stage), inputs)


def recorded(path: Path) -> dict[str, Any]:
    """The fingerprint record in ``<path>/DONE`` ({} when there is none: an older run or no DONE)."""
    try:
        rec = runs.read_json(Path(path) / "DONE").get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return {}
    return rec if isinstance(rec, dict) else {}


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old → new`` for every key whose value differs (a key only one side has counts as differing)."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {_show(old.get(k))} → {_show(new.get(k))}" for k in keys if _norm(old.get(k)) != _norm(new.get(k))]


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))  # tuples and lists compare equal, as they round-trip JSON


def _show(v: Any) -> str:
    return json.dumps(_norm(v)) if not isinstance(v, str) else v
