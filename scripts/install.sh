#!/usr/bin/env bash
# Installs everything the project needs into ./.venv (idempotent, safe to re-run).
# System packages come from Debian, Python packages from PyPI; nothing is fetched from anywhere else.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo ">> installing Debian package dataset-fashion-mnist (real data for the demo and tests)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo ">> creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.ddm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo ">> installing Python packages into .venv (first run downloads torch: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[operator,trainer,test]"
  touch "$stamp"
fi
echo ">> environment ready: $(.venv/bin/python --version), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
