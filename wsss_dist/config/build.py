"""Building a config: defaults → preset → ``config=FILE.yaml`` → ``key=value`` words; typed parsing with one-line
errors, YAML in and out, the default run name."""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Literal

from ..errors import ConfigError
from ..registry import METHODS, STAGE_SPECS, TRAINERS
from .keys import _all_keys, _field_types, _is_group, _schema, get, type_name
from .presets import PRESETS
from .schema import Config, DataCfg
from .validate import check_value, validate


# words that set several keys at once: data=NAME, train.seed=N (the seed of every trainer)
PRECISION_KEYS = tuple(s.precision_key for s in STAGE_SPECS.values() if s.precision_key)


ALIASES: dict[str, tuple[str, ...]] = {"data": ("data.name",),
                                       "train.seed": (*(f"{t}.train.seed" for t in TRAINERS), "irn.train.seed"),
                                       "precision": (*PRECISION_KEYS, "irn.train.mixed_precision")}  # one precision for every trainer and the CAMs


def parse_words(words: Iterable[str]) -> list[tuple[str, str]]:
    """Split ``key=value`` words into (key, value) pairs, in order; a word without ``=`` is an error."""
    out = []
    for a in words:
        if "=" not in a:
            raise ConfigError(f"{a!r}: arguments are key=value (e.g. stage=cls method=fmix data=toy)")
        k, v = a.split("=", 1)
        out.append((k.strip().lstrip("-"), v.strip()))
    return out


def make_config(overrides: dict[str, Any] | list[str] | None = None, check: bool = True) -> Config:
    """Build a Config: defaults, the dataset preset, ``config=`` YAML files, then the other overrides; ``check``:
    also the value checks of :func:`validate` (names, ranges, extras)."""
    from omegaconf import OmegaConf

    pairs = parse_words(overrides) if isinstance(overrides, list) else list((overrides or {}).items())
    files = [v for k, v in pairs if k == "config"]
    pairs = [(k2, v) for k, v in pairs if k != "config" for k2 in ALIASES.get(k, (k,))]
    layers = [load_yaml(f) for f in files]
    name = next((v for k, v in reversed(pairs) if k == "data.name"), None)
    for layer in reversed(layers):
        name = name or OmegaConf.select(layer, "data.name", default=None)
    name = str(name or DataCfg.name)
    if name not in PRESETS:
        raise ConfigError(f"data={name!r}: allowed values are {', '.join(PRESETS)}")
    cfg = OmegaConf.structured(Config)
    _merge(cfg, _nested(PRESETS[name].items()), "the preset")
    method = next((v for k, v in reversed(pairs) if k == "method"), None)
    for layer in reversed(layers):
        method = method or OmegaConf.select(layer, "method", default=None)
    if str(method) in METHODS and METHODS[str(method)].preset:  # the method's own values (method=clip_es: no classifier)
        _merge(cfg, _nested(METHODS[str(method)].preset), f"method={method}'s preset")
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")  # accelerate launch --mixed_precision / accelerate config
    if launched:
        for key in ALIASES["precision"]:
            _set(cfg, key, launched, "accelerate's --mixed_precision (ACCELERATE_MIXED_PRECISION)")
    for f, layer in zip(files, layers):
        _merge(cfg, layer, f)
    for key, value in pairs:
        _set(cfg, key, value)
    obj = OmegaConf.to_object(cfg)
    if obj.run is None:
        obj.run = default_run(obj, [(k, v) for k, v in (parse_words(overrides) if isinstance(overrides, list)
                                                         else list((overrides or {}).items()))])
    if check:
        validate(obj)
    return obj


# Keys that never change a result: where things live, how they are run and logged (every other key does).
OPERATIONAL = ("config", "stage", "run", "redo", "cluster", "log_level", "device", "log_with", "report", "sweep", "slurm", "teacher.dir",
               "data.shards_dir", "data.toy.root", "data.num_workers", "data.pack_workers", "data.augment_on", "data.max_skip_fraction",
               "cls.round", "cam.batch_images", "eval.crf_workers")


OPERATIONAL_LEAVES = ("ckpt_every", "log_every", "channels_last")


def is_operational(key: str) -> bool:
    """Whether a dotted key only says where or how a run runs (never what it computes)."""
    return any(key == o or key.startswith(o + ".") for o in OPERATIONAL) or key.rsplit(".", 1)[-1] in OPERATIONAL_LEAVES


def default_run(cfg: Config, typed: list[tuple[str, Any]]) -> str:
    """``runs/<method>-<data>``, plus the typed values of the keys that change results (named as sweep points are:
    ``runs/fmix-toy-steps600``); a hash of them when that gets long. Other settings never land in the same run."""
    import hashlib

    shown = [(k, str(v)) for k, v in typed if k not in ("method", "data", "data.name") and not is_operational(k)]
    base = f"runs/{cfg.method}-{cfg.data.name}"
    if not shown:
        return base
    suffix = "-".join(_short(k, v) for k, v in shown)
    if len(suffix) > 60 or not re.fullmatch(r"[A-Za-z0-9_.+-]+", suffix):
        suffix = hashlib.sha256(json.dumps(shown).encode()).hexdigest()[:10]
    return f"{base}-{suffix}"


def typed_value(key: str, text: str, schema: type = None) -> Any:  # type: ignore[assignment]
    """One command-line value converted and checked as the dotted ``key`` of ``schema`` (default: the Config) takes it."""
    from omegaconf import OmegaConf

    if schema is not None and schema is not Config:
        node = OmegaConf.structured(schema)
        name = key.split(".")[-1]
        try:
            OmegaConf.update(node, name, OmegaConf.from_dotlist([f"v={text}"])["v"], merge=False)
        except Exception as e:
            raise ConfigError(f"{key}={text}: {_first_line(e)}") from None
        return getattr(OmegaConf.to_object(node), name)
    cfg = OmegaConf.structured(Config)
    _set(cfg, key, text)
    value = get(OmegaConf.to_object(cfg), key)
    check_value(key, value)
    return value


def load_yaml(path: str | Path) -> Any:
    """A YAML (or JSON) config file as an OmegaConf container (ConfigError when missing or not a mapping)."""
    from omegaconf import DictConfig, OmegaConf

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config={path}: no such file")
    try:
        layer = OmegaConf.load(p)
    except Exception as e:  # yaml.YAMLError and friends
        raise ConfigError(f"config={path}: not valid YAML ({_first_line(e)})") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"config={path}: must hold a mapping of keys (like a saved runs/<run>/config.yaml)")
    return layer


def to_yaml(cfg: Config) -> str:
    """The config as YAML (what ``runs/<run>/config.yaml`` holds; :func:`make_config` reads it back): the text
    OmegaConf's ``to_yaml`` writes, through PyYAML directly (20× quicker; tests/test_config.py checks they agree)."""
    import yaml

    return yaml.dump(to_dict(cfg), sort_keys=False, allow_unicode=True, default_flow_style=False)


def to_dict(cfg: Any) -> Any:
    """The config as plain data, as its YAML reads back (lists for tuples); a walk of the dataclasses, 200× quicker
    than the YAML round trip (tests/test_config.py checks they agree)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    return cfg


def _nested(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in items:
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = list(value) if isinstance(value, tuple) else value
    return out


def _merge(cfg: Any, layer: Any, where: str) -> None:
    """Merge a nested mapping into ``cfg``, key by key, so that errors name the key and where it came from."""
    from omegaconf import DictConfig, OmegaConf

    def walk(prefix: str, node: Any) -> None:
        items = node.items() if isinstance(node, (dict, DictConfig)) else ()
        for k, v in items:
            key = f"{prefix}{k}"
            if isinstance(v, (dict, DictConfig)) and _is_group(key):
                walk(key + ".", v)
            else:
                _set(cfg, key, OmegaConf.to_container(v) if OmegaConf.is_config(v) else v, where, parse=False)

    walk("", layer)


def _set(cfg: Any, key: str, value: Any, where: str = "", parse: bool = True) -> None:
    """Set one dotted key on the structured config (``parse``: ``value`` is command-line text); OmegaConf's errors
    become one-line ConfigErrors."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    suffix = f" (in {where})" if where else ""
    if key not in _all_keys():
        if _is_group(key):
            raise ConfigError(f"{key} is a group; set one of its keys: {', '.join(k for k in _all_keys() if k.startswith(key + '.'))[:200]}, ...")
        raise ConfigError(f"unknown config key {key!r}{_did_you_mean(key)}{suffix}")
    if key == "stage" and isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    elif parse and isinstance(value, str):
        value = _parse_value(key, value)
    try:
        OmegaConf.update(cfg, key, value, merge=False)
    except (ConfigKeyError, OmegaConfBaseException) as e:
        raise ConfigError(_explain(key, value, e) + suffix) from None


def _parse_value(key: str, text: str) -> Any:
    """A command-line value: text for string keys (``null``/``none`` for an optional one), else YAML-like scalars and
    ``[a,b]`` lists, as OmegaConf's dot-list parser reads them."""
    from omegaconf import OmegaConf

    typ = _field_types()[key]
    args = getattr(typ, "__args__", ())
    optional = type(None) in args
    if optional and text.lower() in ("none", "null", ""):
        return None
    if typ is str or (optional and str in args) or (getattr(typ, "__origin__", None) is Literal and all(isinstance(a, str) for a in args)):
        return text
    try:
        return OmegaConf.from_dotlist([f"v={text}"])["v"]
    except Exception:
        return text


def _explain(key: str, value: Any, e: Exception) -> str:
    """One line for an OmegaConf validation error, in this project's words."""
    from omegaconf import ListConfig, OmegaConf

    shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
    shown = f"[{','.join(map(str, shown))}]" if isinstance(shown, (list, tuple)) else shown
    typ = _field_types().get(key)
    msg = _first_line(e)
    if isinstance(shown, str) and shown.startswith("[") and getattr(typ, "__origin__", None) is not tuple:
        return (f"{key}={shown}: a list makes a sweep, which launch/submit.py (wsss-dist submit) runs; "
                f"here {key} takes one value")
    if typ is not None and getattr(typ, "__origin__", None) is Literal:
        return f"{key}={shown}: allowed values are {', '.join(map(str, typ.__args__))}"
    if typ is int:
        return f"{key}={shown}: expected an integer"
    if typ is float:
        return f"{key}={shown}: expected a finite number"
    if typ is bool:
        return f"{key}={shown}: expected a boolean (true/false)"
    if "length" in msg and "does not match" in msg:
        return f"{key}={shown}: expected {msg.split('length')[-1].split()[-1]} values, like {key}=[a,b]"
    return f"{key}={shown}: {msg}"


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[0] if lines else type(e).__name__


def _did_you_mean(key: str) -> str:
    keys = _all_keys()
    last = key.split(".")[-1]
    close = [k for k in keys if k.split(".")[-1] == last and k != key]
    close += [k for k in difflib.get_close_matches(key, keys, n=3, cutoff=0.6) if k not in close]
    if close:
        return f"; did you mean {', '.join(close[:3])}?"
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    under = [k[len(parent) + 1:] if parent else k for k in keys if (k.startswith(parent + ".") if parent else "." not in k)]
    return f"; keys under {parent or 'the top level'}: {', '.join(under)}"


def _short(key: str, value: str) -> str:
    """How a swept value appears in a point's name: ``s0`` for seeds, ``fmix``, ``train_aug``, ``lr0.01``."""
    last = key.split(".")[-1]
    if last == "seed":
        return f"s{value}"
    if key in ("method", "cls.split", "data.name", "data", "model.backbone") or not re.fullmatch(r"[-+.\deE]+", value):
        return value
    return f"{last}{value}"


def keys(prefix: str = "", cfg: Config | None = None) -> list[tuple[str, str, Any, str]]:
    """Every config key under ``prefix``: (key, type, value in ``cfg`` (default: the toy defaults), doc)."""
    cfg = cfg or make_config([])
    out = []
    for key, (typ, _, doc) in _schema().items():
        if key.startswith(prefix):
            out.append((key, type_name(typ), get(cfg, key), doc))
    return out
