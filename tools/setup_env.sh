# Sourced by the README's commands: a virtual environment in .venv with the pinned dependencies, made once, and the
# Debian packages of requirements/debian.txt. One line per step; the installers' output goes to .venv/setup.log and
# only its tail is shown, on failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
LOG=.venv/setup.log

quietly() {  # run a step with its output in the log; on failure show the log's tail and stop
    if ! "$@" >>"$LOG" 2>&1; then
        echo "setup failed: $*" >&2
        echo "last lines of $LOG:" >&2
        tail -n 25 "$LOG" >&2
        return 1
    fi
}

if [ ! -x .venv/bin/python ]; then
    echo "vpeft setup: creating .venv"
    "$PY" -m venv .venv
fi
# the stamp records what was installed; a changed requirements file or pyproject reinstalls
stamp=$(cat requirements/constraints.txt requirements/no-deps.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat .venv/.vpeft-stamp 2>/dev/null)" != "$stamp" ]; then
    echo "vpeft setup: installing the pinned Python dependencies (first run: a few minutes; log in $LOG)"
    : >"$LOG"
    quietly .venv/bin/python -m pip install --disable-pip-version-check -c requirements/constraints.txt \
        torch torchvision
    quietly .venv/bin/python -m pip install --disable-pip-version-check -c requirements/constraints.txt -e ".[test]"
    quietly .venv/bin/python -m pip install --disable-pip-version-check --no-deps -r requirements/no-deps.txt
    echo "$stamp" > .venv/.vpeft-stamp
fi

bash tools/install_system_packages.sh "$LOG"
export PATH="$PWD/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # nothing is downloaded
