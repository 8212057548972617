#!/usr/bin/env bash
# CI's packaging check: build the wheel, install it into a fresh venv, and use it from outside the
# source tree: the console script, `eval --json` on the embedded model, the README's API example,
# and no generic top-level modules (`import validation` / `import exporters` must fail there).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$root/tools/dev.sh" venv)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$venv/bin/python" -m build --wheel --no-isolation --outdir "$work/dist" "$root" > "$work/build.log" 2>&1 \
  || { cat "$work/build.log" >&2; exit 1; }
wheel=$(ls "$work"/dist/*.whl)
echo "built $(basename "$wheel")" >&2
python3 -m venv "$work/venv"
# torch from the local files (see ../shared/docs/ENVIRONMENT.md); the rest from the wheel's metadata.
"$work/venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 >&2 2> >(grep -v "^WARNING: Location" >&2)
"$work/venv/bin/pip" install -q "$wheel[cpu]" 2> >(grep -v "^WARNING: Location" >&2)
mkdir "$work/elsewhere" && cd "$work/elsewhere"
py="$work/venv/bin/python"
"$work/venv/bin/sardfq-export" --help > /dev/null
"$work/venv/bin/sardfq-export" eval --data fashion-mnist --json
"$py" -c "import sardfq_export as sx; print(sx.__version__)"
# the DINOv2 model's pinned head ships in the wheel, intact (its sha256 is checked on load)
"$py" -c "from sardfq_export.models import dinov2; assert dinov2.pinned_head(112)[0].shape == (10, 384)"
for generic in validation exporters calibrators; do
  if "$py" -c "import $generic" 2>/dev/null; then echo "the wheel installed a generic top-level module: $generic" >&2; exit 1; fi
done
"$py" - "$root/README.md" <<'PY'
import re, sys
section = open(sys.argv[1]).read().split("## Python API", 1)[1]
exec(compile(re.search(r"```python\n(.*?)```", section, re.S).group(1), "README.md", "exec"), {})
PY
echo "wheel check passed" >&2
