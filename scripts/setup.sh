#!/usr/bin/env bash
# Set up ssl_vision on a fresh machine: the Debian Fashion-MNIST package (when missing and apt is there),
# a venv in .venv with the tested package versions (constraints.txt). Safe to run again (it skips what is already
# done, and reinstalls when pyproject.toml, setup.py or constraints.txt is newer than the last install).
set -euo pipefail
cd "$(dirname "$0")/.."
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -e "$FMNIST/train-images-idx3-ubyte.gz" ] && [ ! -e "$FMNIST/train-images-idx3-ubyte" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian's dataset-fashion-mnist"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "[setup] Fashion-MNIST not found in $FMNIST and apt-get is not usable; install dataset-fashion-mnist," \
         "or pass data.root=<dir with the IDX files> / data.download=true" >&2
  fi
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import ssl_vision, torch, torchvision, lightning, hydra, faiss, timm, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ] || [ constraints.txt -nt .venv/.installed ] \
   || [ setup.py -nt .venv/.installed ] || [ ! -x .venv/bin/ruff ]; then
  echo "[setup] installing packages into .venv (the versions of constraints.txt:" \
       "$(grep -E '^torch(vision)?==' constraints.txt | tr '\n' ' '))"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
  touch .venv/.installed
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')"
