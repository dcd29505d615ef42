#!/usr/bin/env bash
# Sets up a fresh machine for capi_jax: Debian's Fashion-MNIST (the quickstart's real, offline
# dataset) and a virtual environment `.venv` with capi_jax and its test dependencies.
# Usage: bash launch/setup_env.sh        (from the repository root; idempotent)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "Installing Debian's dataset-fashion-mnist ..."
  $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "WARNING: could not install dataset-fashion-mnist; pass --config.data.dataset=fashion_mnist:DIR with the IDX files."
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
echo "capi_jax environment ready: $(.venv/bin/python -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)')"
