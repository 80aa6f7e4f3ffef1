"""How every command-line tool ends: a user's mistake as one paragraph, a bug with its traceback.

    if __name__ == "__main__":
        sys.exit(run(main))

A :class:`~vpeft.errors.UserError` (a config key, a file, the data, an option, a missing package) prints
``error: <what is wrong, where, what would be right>`` on stderr and exits with status 2, as argparse does for a bad
argument; Ctrl-C exits with 130 and no traceback (the files on disk are whole: every write is atomic). Any other
exception is a bug in vpeft: its traceback is kept, followed by one line saying where to report it.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

from ..errors import UserError

USER_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped with Ctrl-C
BUG = 1
BUG_NOTE = (
    "This is a bug in vpeft, not a mistake in your input: please report it with the traceback above and the output "
    "of `python -m vpeft env`."
)


def run(main: Callable[..., int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)`` (``main()`` when ``argv`` is None) and return the process's exit status."""
    try:
        status = main() if argv is None else main(list(argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return USER_ERROR
    except KeyboardInterrupt:
        return INTERRUPTED
    except Exception:
        traceback.print_exc()
        print(BUG_NOTE, file=sys.stderr, flush=True)
        return BUG
    return int(status or 0)



def at_least(low: float, kind: type = int) -> Callable[[str], float]:
    """An argparse ``type``: a finite ``kind`` (int or float) of at least ``low`` (a step count, a learning rate)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value < float("inf"):
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what} of at least {low}, got {text!r}")
        return value

    return parse
