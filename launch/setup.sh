#!/usr/bin/env bash
# Create .venv (Python >= 3.10) and install wsss-dist with its test extras into it. Idempotent and quiet:
# a second run with an unchanged pyproject.toml returns at once; any failure prints pip's output and exits non-zero.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
fail() { echo "setup.sh: $*" >&2; exit 1; }
command -v "$PY" >/dev/null || fail "$PY not found (set PYTHON=/path/to/python3.10+)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || fail "Python >= 3.10 needed, $PY is $("$PY" -V 2>&1)"

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || fail "could not create .venv (on Debian: apt-get install python3-venv)"
fi
V=.venv/bin/python
STAMP=.venv/.wsss-dist-installed
want="$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$V" -c 'import wsss_dist, torch, pytest' 2>/dev/null; then
  exit 0  # already set up
fi

log=$(mktemp); trap 'rm -f "$log"' EXIT
pip_q() { if ! "$V" -m pip install -q "$@" >"$log" 2>&1; then cat "$log" >&2; return 1; fi; }
echo "setup.sh: installing into .venv (first time: a few minutes)" >&2
if ! "$V" -c 'import torch' 2>/dev/null; then
  # Install the tested torch/torchvision pair first so that pip does not pick another one;
  # elsewhere (no such wheels) fall back to the range pyproject.toml accepts.
  pip_q 'torch==2.14.1' 'torchvision==0.29.1' || echo "setup.sh: torch 2.14.1 not available here; using pyproject's torch range" >&2
fi
pip_q -e '.[test]' || fail "pip install -e '.[test]' failed (output above)"
"$V" -c 'import wsss_dist, torch, torchvision, accelerate, submitit, webdataset, pytest' || fail "installed, but imports fail"
echo "$want" > "$STAMP"
echo "setup.sh: ready (.venv, torch $("$V" -c 'import torch; print(torch.__version__)'))" >&2
