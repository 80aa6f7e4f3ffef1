#!/usr/bin/env bash
# The whole test suite, in the pinned environment (CI runs this through .ci/run).
source "$(dirname "$0")/setup_env.sh"
python -m pytest -q "$@"
