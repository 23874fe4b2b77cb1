#!/usr/bin/env bash
# Creates .venv/ at the repo root (if missing) and installs ttswap with its extras, pinned by
# constraints.txt. Re-running is cheap: the install is skipped while pyproject.toml and
# constraints.txt are unchanged.
#
# Interpreter, first that runs: $PYTHON, python3.12, pyenv's 3.12, python3.10, pyenv's 3.10.
# (ttnn 0.81.1 has wheels for CPython 3.10 and 3.12 only.)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$root/.venv
stamp=$venv/.ttswap-installed

runs() { [ -n "$1" ] && "$1" -c 'import sys; assert sys.version_info[:2] in ((3, 12), (3, 10))' >/dev/null 2>&1; }

find_python() {
  local pyenv_root candidates=()
  [ -n "${PYTHON:-}" ] && { runs "$PYTHON" && { echo "$PYTHON"; return; }; echo "PYTHON=$PYTHON is not a working CPython 3.12 or 3.10" >&2; exit 1; }
  pyenv_root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
  candidates+=("$(command -v python3.12 || true)")
  candidates+=($(ls -d "$pyenv_root"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V -r))
  candidates+=("$(command -v python3.10 || true)")
  candidates+=($(ls -d "$pyenv_root"/versions/3.10.*/bin/python3.10 2>/dev/null | sort -V -r))
  for py in "${candidates[@]}"; do runs "$py" && { echo "$py"; return; }; done
  echo "no CPython 3.12 or 3.10 found; install one or set PYTHON=/path/to/python3.12" >&2
  exit 1
}

if [ ! -x "$venv/bin/python" ]; then
  py=$(find_python)
  echo "ttswap: creating .venv with $py ($("$py" --version))"
  "$py" -m venv "$venv"
fi

if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$root/constraints.txt" -nt "$stamp" ]; then
  echo "ttswap: installing the project and its extras into .venv (torch, timm, ttnn; a few minutes the first time)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -c "$root/constraints.txt" -e "$root[tt,dev]"
  touch "$stamp"
fi
