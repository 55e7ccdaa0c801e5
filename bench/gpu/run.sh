#!/usr/bin/env bash
# GPU readiness on a machine with an NVIDIA GPU: installs nothing from the
# network; uses .venv when present (make setup), else the system python3.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=python3
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
PYTHONUNBUFFERED=1 PYTHONPATH=.:sdk/python exec "$PY" -m bench.gpu.readiness
