"""The launcher's own keys (``launch.*``, ``slurm.<stage>.*``) split from the config's ``key=value`` words."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from ..config import STAGES, SlurmCfg, parse_words, typed_value
from ..errors import ConfigError


@dataclass
class LaunchCfg:
    """The launcher's own keys (``launch.*`` and ``slurm.<stage>.*``)."""

    logs: Optional[str] = None  # submitit folder; default <run>/logs
    wait: bool = False  # cluster=slurm: wait for the chain to finish
    poll_s: float = 5.0  # cluster=slurm with wait: seconds between state polls
    one_process: bool = True  # cluster=local: consecutive stages with the same GPU count run in one job (one start)
    dry_run: bool = False  # print every job (SLURM: its sbatch directives and dependency) and submit nothing
    stage_slurm: dict[str, dict[str, str]] = field(default_factory=dict)  # stage -> {slurm key: value}
    typed: list[str] = field(default_factory=list)  # the config keys the user typed (they beat dataset defaults)


def split_args(argv: list[str]) -> tuple[LaunchCfg, list[str]]:
    """Separate the launcher's keys from the config's ``key=value`` words (kept in order)."""
    launch = LaunchCfg()
    rest: list[str] = []
    names = [f.name for f in dataclasses.fields(LaunchCfg) if f.name != "stage_slurm"]
    slurm_keys = {f.name for f in dataclasses.fields(SlurmCfg)}
    for key, value in parse_words(argv):
        parts = key.split(".")
        if parts[0] == "launch":
            if len(parts) != 2 or parts[1] not in names:
                raise ConfigError(f"unknown launcher key {key!r}; launcher keys: {', '.join('launch.' + n for n in names)}")
            setattr(launch, parts[1], typed_value(key, value, LaunchCfg))
        elif parts[0] == "slurm" and len(parts) == 3:
            stage, name = parts[1], parts[2]
            if stage not in STAGES:
                raise ConfigError(f"{key!r}: per-stage resources are slurm.<stage>.<key> with stage one of {', '.join(STAGES)}")
            if name not in slurm_keys:
                raise ConfigError(f"unknown key {key!r}; slurm.<stage>.<key> takes {', '.join(sorted(slurm_keys))}")
            launch.stage_slurm.setdefault(stage, {})[name] = typed_value(f"slurm.{name}", value)  # checked now, before any work
        else:
            rest.append(f"{key}={value}")
            launch.typed.append(key)
    return launch, rest
