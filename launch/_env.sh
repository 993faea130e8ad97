# Sourced by launch/demo and launch/test: use the active Python environment, or create and
# activate ./.venv, and install crnn-art (with its test extra) when it is missing or pyproject.toml
# changed. torch comes from whatever pip resolves for this machine: a GPU box keeps its own build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${VIRTUAL_ENV:-}" && -z "${CONDA_PREFIX:-}" ]]; then
  if [[ ! -x .venv/bin/python ]]; then
    echo "crnn-art: creating .venv (first run only)"
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
STAMP="$(python -c 'import sys; print(sys.prefix)')/.crnn-art-installed"
WANT="$(sha256sum pyproject.toml | cut -c1-16)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]] || ! python -c "import crnn_art, torch, torchvision" 2>/dev/null; then
  echo "crnn-art: installing (torch first, then the package and its test extra)"
  python -m pip install -q --upgrade pip
  python -c "import torch, torchvision" 2>/dev/null || python -m pip install -q torch torchvision
  python -m pip install -q -e ".[test]"
  echo "$WANT" > "$STAMP"
fi
export PYTHONUNBUFFERED=1
