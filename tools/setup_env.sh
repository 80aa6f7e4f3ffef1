# Sourced by the README's commands: a virtual environment in .venv with the pinned dependencies, made once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# the stamp records what was installed; a changed constraints file or pyproject reinstalls
stamp=$(cat requirements/constraints.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat .venv/.vpeft-stamp 2>/dev/null)" != "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt \
        torch torchvision
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e ".[test]"
    echo "$stamp" > .venv/.vpeft-stamp
fi
export PATH="$PWD/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # nothing is downloaded
