#!/usr/bin/env bash
# The Debian packages of requirements/debian.txt: checked on every run (dpkg-query is fast) and installed when this
# shell may (root, apt-get), with apt's output in the log file given as $1; otherwise named with the command to run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LOG=${1:-/dev/null}

if ! command -v dpkg-query >/dev/null; then
    echo "vpeft setup: no dpkg here; provide the data of requirements/debian.txt by hand" >&2
    exit 0
fi
missing=()
for pkg in $(sed -e 's/#.*//' requirements/debian.txt); do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "vpeft setup: installing system data: ${missing[*]} (log in $LOG)"
    for step in "apt-get update -q" \
                "env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ${missing[*]}"; do
        if ! $step >>"$LOG" 2>&1; then
            echo "setup failed: $step; last lines of $LOG:" >&2
            tail -n 25 "$LOG" >&2
            exit 1
        fi
    done
else
    echo "vpeft setup: missing Debian packages: ${missing[*]}; install them with" \
         "\`sudo apt-get install ${missing[*]}\` (the tests that need them skip until then)" >&2
fi
