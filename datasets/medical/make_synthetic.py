"""Write the offline medical datasets (MONAI's synthetic discs and spheres as NIfTI with a Decathlon datalist).

    python datasets/medical/make_synthetic.py            # work_dirs/data/medical/synthetic2d and .../synthetic3d
    python datasets/medical/make_synthetic.py --root /tmp/med

Already-complete copies with the same parameters are left as they are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vpeft.engine import cli
from vpeft.medical.synthetic import write_synthetic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("work_dirs/data/medical"))
    args = parser.parse_args(argv)
    print(
        write_synthetic(
            args.root / "synthetic2d", spatial_dims=2, counts={"training": 48, "validation": 12, "test": 12}
        )
    )
    print(
        write_synthetic(args.root / "synthetic3d", spatial_dims=3, counts={"training": 8, "validation": 3, "test": 3})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
