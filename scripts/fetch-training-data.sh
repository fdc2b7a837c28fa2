#!/usr/bin/env bash
# Fetch the real CT/MR data (docs/data.md) from Debian packages: apt-get download, dpkg-deb -x,
# converted into <split>/<ct|mr|complex>/ files and sources.json. A thin wrapper around
# `scorerecon data fetch`; arguments are passed on, e.g.
#   scripts/fetch-training-data.sh --dest .cache/realdata [--only cranium,colin27]
# Without --dest: $SCORERECON_REALDATA, else $SCORERECON_HOME/data/real. Exit status 1 only
# if no source could be fetched. PYTHON selects the interpreter (default: the checkout's .venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null 2>&1; then PY=python3; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m models.cli data fetch "$@"
