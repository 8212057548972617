#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine, then runs:
#   bash tools/dev.sh demo [OPTIONS]   the main job on the embedded reference model
#   bash tools/dev.sh test [PYTEST]    the test suite
#   bash tools/dev.sh run ARGS         any sardfq-export command
#   bash tools/dev.sh python ARGS      the venv's python (benchmarks, training script)
# The venv lives outside the clone, keyed by a hash of the dependency spec, so fresh clones reuse
# it; a missing or half-built one is rebuilt.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hash=$(cat "$root/pyproject.toml" "$root/tools/dev.sh" | sha256sum | cut -c1-12)
venv=${SARDFQ_VENV:-$HOME/.cache/sardfq-export/venv-$hash}

if [ ! -f "$venv/.complete" ]; then
  echo "setting up $venv (first run only, ~2 min)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  # The CUDA build of torch 2.14.1 runs on CPU and pairs with timm; see ENVIRONMENT notes in README.
  "$venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 >&2
  python3 "$root/tools/deps.py" cpu dev > "$venv/requirements.txt"
  "$venv/bin/pip" install -q -r "$venv/requirements.txt" >&2
  touch "$venv/.complete"
fi

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && [ "$(id -u)" = 0 ]; then
  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)" >&2
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >&2 || true
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cmd=${1:-demo}
shift || true
case "$cmd" in
  demo) exec "$venv/bin/python" -m sardfq_export --data fashion-mnist --out "$root/sardfq-out" "$@" ;;
  test) cd "$root" && exec "$venv/bin/python" -m pytest -q "$@" ;;
  run) exec "$venv/bin/python" -m sardfq_export "$@" ;;
  python) exec "$venv/bin/python" "$@" ;;
  *) echo "usage: bash tools/dev.sh demo|test|run|python [ARGS]" >&2; exit 2 ;;
esac
