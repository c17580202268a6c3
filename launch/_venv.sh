# Sourced by main.sh and test.sh: create or reuse .venv and install nl_jax, with the extra named
# by the argument ("main" installs none: the main job needs no TPU runtime nor test tools).
# Re-installs only when setup.cfg changed, so a second run starts at once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "nl_jax needs Python 3.11 or newer; '$PY' is $("$PY" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2
  exit 1
}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.nl_jax_installed_$1"
want="$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  spec="."
  [ "$1" = main ] || spec=".[$1]"
  echo "[setup] installing nl_jax${spec#.} into .venv (first run takes about a minute)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e "$spec"
  echo "$want" > "$stamp"
fi
