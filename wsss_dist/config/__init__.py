"""Typed configuration for every stage: dataclasses as OmegaConf structured configs, presets, YAML files, overrides.

A config is built as: the dataclass defaults, then the dataset's preset (:data:`PRESETS`), then the YAML files
given with ``config=FILE.yaml`` (in order; may repeat), then the other ``key=value`` words. ``run/<x>/config.yaml``
is such a file, so ``config=runs/x/config.yaml`` reruns a run. Unknown keys and bad values raise
:class:`ConfigError` naming the key and what is allowed, before any work starts; every field's trailing comment
is its one-line doc (``wsss-dist keys``).

One file, one job: ``schema`` (the dataclasses and ``Config``), ``presets`` (toy and voc), ``build`` (building a config
from words and files, YAML, the default run name, the key list), ``validate`` (every value checked when the config
is built), ``keys`` (the schema's keys, types and docs), ``sweeps`` (a key given a list). The package imports none of
timm, torch or safetensors: the weights checks live in :mod:`wsss_dist.models.preflight`.
"""
from ..errors import ConfigError
from ..registry import METHOD_NAMES
from .build import (ALIASES, PRECISION_KEYS, default_run, is_operational, keys, load_yaml, make_config, parse_words,
                    to_dict, to_yaml, typed_value)
from .keys import _schema, get, type_name
from .presets import PRESETS, TOY_PRESET, VOC_PRESET
from .schema import (DATA_KEYS, STAGES, AffCfg, CamCfg, ClipCfg, ClsCfg, Config, DataCfg, ModelCfg, OptimCfg, Precision, PseudoCfg,
                     ReportCfg, SegCfg, SlurmCfg, SweepCfg, TeacherCfg, ToyCfg, TrainCfg, data_hash, data_settings,
                     parse_stages)
from .sweeps import Point, sweep_axes, sweep_points
from .validate import check_batches, check_value, validate

__all__ = ["ALIASES", "DATA_KEYS", "METHOD_NAMES", "PRECISION_KEYS", "PRESETS", "STAGES", "TOY_PRESET", "VOC_PRESET",
           "AffCfg", "CamCfg", "ClipCfg", "ClsCfg", "Config", "ConfigError", "DataCfg", "ModelCfg", "OptimCfg", "Point", "Precision",
           "PseudoCfg", "ReportCfg", "SegCfg", "SlurmCfg", "SweepCfg", "TeacherCfg", "ToyCfg", "TrainCfg", "_schema",
           "check_batches", "check_value", "data_hash", "data_settings", "default_run", "get", "is_operational", "keys",
           "load_yaml", "make_config", "parse_stages", "parse_words", "sweep_axes", "sweep_points", "to_dict", "to_yaml",
           "type_name", "typed_value", "validate"]
