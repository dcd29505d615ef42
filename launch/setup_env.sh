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

# PYTHON: the interpreter (python3.12 for the GPU machines' stack); VENV: the environment's
# folder; PINS: exact versions to install first (e.g. 'jax==0.11.2 jaxlib==0.11.2 flax==0.12.12').
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# shellcheck disable=SC2086  (PINS is a list of requirements)
[ -z "${PINS:-}" ] || "$VENV/bin/python" -m pip install -q ${PINS}
"$VENV/bin/python" -m pip install -q -e '.[test]'
echo "capi_jax environment $VENV ready: $("$VENV/bin/python" -c 'import sys, jax, flax; print("Python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__)')"
