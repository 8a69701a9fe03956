#!/usr/bin/env bash
# Create .venv (Python >= 3.10) and install wsss-dist into it. Idempotent and quiet: a second run with an unchanged
# pyproject.toml returns at once; any failure prints pip's output and exits non-zero.
#   bash launch/setup.sh                   the package (what the demo needs: no C++ compiler)
#   bash launch/setup.sh --test            also the test and coco extras (pytest, pycocotools, ...) and, where a C++ compiler is, the [crf] extra
#                                          (pydensecrf2 builds from source; without it the CRF tests skip)
#   bash launch/setup.sh --torch=cpu       pick the torch build: cpu, or a CUDA version (cu118, cu121, cu124, cu126,
#                                          cu128, cu130) from download.pytorch.org; default: what pip picks (on Linux x86
#                                          a CUDA build, which also runs on CPU)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
fail() { echo "setup.sh: $*" >&2; exit 1; }
EXTRAS="" TORCH_BUILD=""
for arg in "$@"; do
  case "$arg" in
    --test) EXTRAS="[test,coco]" ;;
    --torch=*) TORCH_BUILD="${arg#--torch=}" ;;
    *) fail "unknown argument $arg (use --test and/or --torch=cpu|cu118|cu121|cu124|cu126|cu128|cu130)" ;;
  esac
done
case "$TORCH_BUILD" in ""|cpu|cu118|cu121|cu124|cu126|cu128|cu130) ;; *) fail "--torch=$TORCH_BUILD: use cpu or one of cu118 cu121 cu124 cu126 cu128 cu130" ;; esac
command -v "$PY" >/dev/null || fail "$PY not found (set PYTHON=/path/to/python3.10+)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || fail "Python >= 3.10 needed, $PY is $("$PY" -V 2>&1)"

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || fail "could not create .venv (on Debian: apt-get install python3-venv)"
fi
V=.venv/bin/python
STAMP=.venv/.wsss-dist-installed
want="$( (cat pyproject.toml; echo "$EXTRAS") | sha256sum | cut -c1-16)"
check='import wsss_dist, torch'; [ -n "$EXTRAS" ] && check="$check, pytest"
if [ -f "$STAMP" ] && { [ "$(cat "$STAMP")" = "$want" ] || { [ -z "$EXTRAS" ] && "$V" -c 'import pytest' 2>/dev/null; }; } \
   && "$V" -c "$check" 2>/dev/null; then
  exit 0  # already set up (a test set-up also serves the demo)
fi

log=$(mktemp); trap 'rm -f "$log"' EXIT
pip_q() { if ! "$V" -m pip install -q "$@" >"$log" 2>&1; then cat "$log" >&2; return 1; fi; }
echo "setup.sh: installing into .venv (first time: a few minutes)" >&2
INDEX=(); [ -n "$TORCH_BUILD" ] && INDEX=(--index-url "https://download.pytorch.org/whl/$TORCH_BUILD")
if ! "$V" -c 'import torch' 2>/dev/null; then
  # Install the tested torch/torchvision pair first so that pip does not pick another one;
  # elsewhere (no such wheels) fall back to the range pyproject.toml accepts.
  pip_q "${INDEX[@]}" 'torch==2.14.1' 'torchvision==0.29.1' \
    || { [ -z "$TORCH_BUILD" ] || pip_q "${INDEX[@]}" torch torchvision; } \
    || echo "setup.sh: torch 2.14.1 not available here; using pyproject's torch range" >&2
fi
pip_q -e ".$EXTRAS" || fail "pip install -e '.$EXTRAS' failed (output above)"
if [ -n "$EXTRAS" ] && ! "$V" -c 'import pydensecrf' 2>/dev/null; then  # the CRF tests: pydensecrf2 builds from source
  pip_q -e ".[crf]" 2>/dev/null || echo "setup.sh: pydensecrf2 (the [crf] extra) did not build (no C++ compiler?): the CRF tests will skip" >&2
fi
"$V" -c "import torchvision, accelerate, submitit, webdataset; $check" || fail "installed, but imports fail"
echo "$want" > "$STAMP"
echo "setup.sh: ready (.venv, torch $("$V" -c 'import torch; print(torch.__version__, "CUDA " + torch.version.cuda if torch.version.cuda else "CPU-only")'))" >&2
