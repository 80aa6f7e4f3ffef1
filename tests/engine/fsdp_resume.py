"""Run under torchrun by tests/engine/test_fsdp.py: ``python fsdp_resume.py CONFIG RUN_DIR SET...``.

Trains CONFIG (with the ``--set`` overrides SET) through tools/train.py into RUN_DIR, killed at the start of the
second epoch (after the first checkpoint), then resumes RUN_DIR with ``--resume`` in the same processes (the process
group is made once: torch cannot make it again in processes torchrun started).
"""

from __future__ import annotations

import sys

import tools.train as train_tool
from vpeft.engine import cli
from vpeft.engine import train as engine


class Interrupt(Exception):
    pass


def main(argv: list[str]) -> int:
    config, run_dir, *sets = argv
    real_loader = engine._loader

    def dying_loader(cfg, task, dataset, train, dist=None, epoch=0):
        if train and epoch == 1:
            raise Interrupt
        return real_loader(cfg, task, dataset, train, dist, epoch)

    engine._loader = dying_loader
    try:
        train_tool.main([config, "--set", *sets, "--work-dir", run_dir])
    except Interrupt:
        pass
    engine._loader = real_loader
    train_tool.main(["--resume", run_dir])
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, sys.argv[1:]))
