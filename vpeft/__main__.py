"""``python -m vpeft env``: the versions that matter for a bug report."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if argv[:1] != ["env"]:
        print("usage: python -m vpeft env", file=sys.stderr)
        return 2
    from .engine.system import environment

    env = environment()
    for key, value in env.pop("versions").items():
        print(f"{key:<20} {value}")
    for key, value in env.items():
        print(f"{key:<20} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
