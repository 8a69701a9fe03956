#!/usr/bin/env python3
"""Submit the pipeline as submitit jobs: ``python launch/submit.py stage=all method=fmix [key=value ...]``.

cluster=local (default: one local job after another), cluster=slurm (afterok chain), cluster=debug (in-process).
Keys: every ``python -m wsss_dist`` key, plus ``slurm.<stage>.<key>=`` and ``launch.{logs,wait,poll_s}=``;
see wsss_dist/launcher.py and docs/cluster.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without pip install

from wsss_dist.launcher import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
