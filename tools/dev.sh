#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine, then runs:
#   bash tools/dev.sh demo [OPTIONS]   the main job on the embedded reference model
#   bash tools/dev.sh test [PYTEST]    the test suite
#   bash tools/dev.sh run ARGS         any sardfq-export command
#   bash tools/dev.sh python ARGS      the venv's python (benchmarks, training script)
# The venv lives outside the clone, keyed by a hash of the dependency list (not of the whole
# pyproject), so fresh clones reuse it; a missing or half-built one is rebuilt. The package itself
# is installed editable from *this* clone (re-pointed when another clone used the venv last).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
torch_pins="torch==2.14.1 torchvision==0.29.1"
spec="$torch_pins
$(python3 "$root/tools/deps.py" cpu dev)"
hash=$(printf '%s' "$spec" | sha256sum | cut -c1-12)
venv=${SARDFQ_VENV:-$HOME/.cache/sardfq-export/venv-$hash}

# One setup at a time per venv: two clones (or a CI run beside a developer's) must not build or
# re-point it at once. The lock is released when this script execs the command.
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9

if [ ! -f "$venv/.complete" ]; then
  echo "setting up $venv (first run only, ~2 min)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip "setuptools>=77" wheel >&2
  # The CUDA build of torch 2.14.1 runs on CPU and pairs with timm (../shared/docs/ENVIRONMENT.md).
  "$venv/bin/pip" install -q $torch_pins >&2
  python3 "$root/tools/deps.py" cpu dev > "$venv/requirements.txt"
  "$venv/bin/pip" install -q -r "$venv/requirements.txt" >&2
  touch "$venv/.complete"
fi

# Editable install of this clone (no dependencies: they are all in the venv already). Redone when
# the venv was last pointed at another clone or pyproject.toml changed.
stamp="$root $(sha256sum "$root/pyproject.toml" | cut -c1-12)"
if [ "$(cat "$venv/.editable" 2>/dev/null)" != "$stamp" ]; then
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root" > "$venv/editable.log" 2>&1 \
    || { cat "$venv/editable.log" >&2; exit 1; }
  echo "$stamp" > "$venv/.editable"
fi

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && [ "$(id -u)" = 0 ]; then
  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)" >&2
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >&2 || true
fi

flock -u 9
exec 9>&-

cmd=${1:-demo}
shift || true
case "$cmd" in
  demo) exec "$venv/bin/sardfq-export" --data fashion-mnist --out "$root/sardfq-out" "$@" ;;
  # Two pytest-xdist workers where there are two cores (a module's tests stay on one worker, so its
  # fixtures are built once): 586 s instead of 888 s on a 2-core host; SARDFQ_TEST_WORKERS=0 runs
  # one process. tests/conftest.py gives each worker its share of the threads.
  test)
    cores=$(nproc)
    workers=${SARDFQ_TEST_WORKERS:-$([ "$cores" -ge 2 ] && echo 2 || echo 0)}
    cd "$root" && exec "$venv/bin/python" -m pytest -q -n "$workers" --dist loadscope "$@" ;;
  run) exec "$venv/bin/sardfq-export" "$@" ;;
  python) exec "$venv/bin/python" "$@" ;;
  venv) echo "$venv" ;;
  *) echo "usage: bash tools/dev.sh demo|test|run|python|venv [ARGS]" >&2; exit 2 ;;
esac
