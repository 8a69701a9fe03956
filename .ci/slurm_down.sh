#!/usr/bin/env bash
# Stop the daemons .ci/slurm_up.sh started, by their pid files (never by name).
set -uo pipefail
for f in /run/slurmd.pid /run/slurmctld.pid /run/slurmdbd.pid /run/mariadbd-manual.pid /run/munge/munged.pid; do
  if [ -s "$f" ]; then
    p=$(cat "$f")
    if kill "$p" 2>/dev/null; then
      echo "stopped $p ($f)"
      for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    fi
  fi
done
rm -f /run/mariadbd-manual.pid /run/slurmctld.pid /run/slurmdbd.pid /run/slurmd.pid
