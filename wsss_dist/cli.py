"""Command line (fire): ``wsss-dist run|submit|keys|report|convert-weights ...``; every ``key=value`` word goes to the config.

    wsss-dist run stage=cls method=fmix [key=value ...]   run stages in this process (also: python -m wsss_dist ...,
                                                          accelerate launch -m wsss_dist ...)
    wsss-dist submit stage=all method=fmix [key=value ...] the chain as submitit jobs (also: python launch/submit.py ...)
    wsss-dist keys [PREFIX] [key=value ...]                every config key: type, value (toy defaults) and doc
    wsss-dist report RUN_DIR [RUN_DIR ...] [key=value ...] the comparison report of finished runs (into the first)
    wsss-dist report runs/<sweep>                          the report of every point of a sweep (into runs/<sweep>/report)
    wsss-dist convert-weights IN OUT.safetensors [--backbone=NAME]  weights in our names (psa's MXNet .params,
                                                          deeplab-pytorch's .pth, a state dict) as safetensors

``config=FILE.yaml`` (may repeat) merges a YAML file under the words that follow; a run's saved
``runs/<run>/config.yaml`` reruns it. Keys: ``wsss-dist keys`` and docs/usage.md.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .config import keys as config_keys
from .launcher import SWEEP_FILE
from .config import make_config
from .pipeline import exit_on_user_error, setup_logging
from .pipeline import run as run_pipeline
from .runs import read_json

COMMANDS = ("run", "submit", "keys", "report", "convert-weights")


class Commands:
    """wsss-dist: weakly supervised semantic segmentation on VOC, from a workstation to SLURM."""

    def run(self, *words: str) -> None:
        """Run the stages of ``stage=`` (default all) in this process: ``wsss-dist run stage=cls method=fmix``."""
        cfg = make_config(_strings(words))
        setup_logging(cfg.log_level)
        run_pipeline(cfg)

    def submit(self, *words: str) -> None:
        """Submit the chain as submitit jobs (local or SLURM): ``wsss-dist submit stage=all method=fmix``."""
        from .launcher import main as launcher_main

        code = launcher_main(_strings(words))
        if code:
            sys.exit(code)

    def keys(self, *args: str) -> None:
        """Print every config key under the given prefixes: key, type, value (with the given words) and doc."""
        words = [a for a in _strings(args) if "=" in a]
        prefixes = [a for a in _strings(args) if "=" not in a] or [""]
        cfg = make_config(words, check=False)
        rows = [r for p in prefixes for r in config_keys(p, cfg)]
        if not rows:
            from .errors import ConfigError

            raise ConfigError(f"no config key starts with {', '.join(prefixes)}; see wsss-dist keys")
        width = max(len(r[0]) for r in rows)
        for key, typ, value, doc in rows:
            shown = "null" if value is None else (f"[{','.join(map(str, value))}]" if isinstance(value, tuple) else value)
            print(f"{key:<{width}}  {shown!s:<14} {typ:<24} {doc}")

    def report(self, *args: str) -> None:
        """Write the comparison report of run directories (``report.runs``) into the first one's ``report/``, or of
        every point of a sweep directory into its ``report/``."""
        paths = [a for a in _strings(args) if "=" not in a]
        words = [a for a in _strings(args) if "=" in a]
        if len(paths) == 1 and (Path(paths[0]) / SWEEP_FILE).is_file():  # a sweep directory: all its points
            points = read_json(Path(paths[0]) / SWEEP_FILE)["points"]
            words = [f"report.runs=[{','.join(p['run'] for p in points)}]", f"run={paths[0]}", *words]
        elif paths:
            words = [f"report.runs=[{','.join(paths)}]", f"run={paths[0]}", *words]
        cfg = make_config(["stage=report", *words])
        setup_logging(cfg.log_level)
        run_pipeline(cfg)

    def convert_weights(self, src: str, dst: str, backbone: str = "") -> None:
        """Write ``src`` (psa's MXNet ``.params``, deeplab-pytorch's ``.pth``, a state dict) in our names as
        safetensors ``dst``, atomically: ``wsss-dist convert-weights ilsvrc-cls_rna-a1_cls1000_ep-0001.params
        resnet38d.safetensors``; ``--backbone=NAME``: check that the tensors fit that backbone."""
        from .models.backbones import convert_weights

        out = convert_weights(str(src), str(dst), backbone=str(backbone) or None)
        fits = f", fits {out['backbone']}" if out["backbone"] else ""
        print(f"wrote {out['tensors']} tensors to {out['dst']} (from {src}: {out['format']}{fits})")


def _strings(words: Any) -> list[str]:
    """fire parses arguments that look like Python literals; the config wants every word as typed."""
    return [w if isinstance(w, str) else str(w) for w in words]


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``wsss-dist`` and ``python -m wsss_dist`` (words without a command mean ``run``)."""
    import fire

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help", "help") for a in argv[:1]) or (argv and argv[0] in COMMANDS and "--help" in argv):
        print(__doc__.strip())
        return
    if not argv or argv[0] not in COMMANDS:
        argv = ["run", *argv]
    exit_on_user_error(lambda: fire.Fire(Commands, command=argv, name="wsss-dist"))
