"""Print what a method would adapt on a timm model, without training: matched targets and trainable counts.

    python tools/show_targets.py vit_base_patch16_224 lora --num-classes 100 --set r=16 targets='["q","k","v"]'

The model is built with random weights (no download); the counts do not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import sys

import timm

import vpeft
from vpeft.backbones import check_timm_name
from vpeft.engine import cli


def parse_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set takes key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string such as targets=attn.qkv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="timm model name, e.g. vit_base_patch16_224")
    parser.add_argument("method", help=f"one of: {', '.join(vpeft.list_methods())}")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument(
        "--set",
        nargs="*",
        type=parse_option,
        default=[],
        metavar="KEY=VALUE",
        help='method options, values in JSON (r=16, targets=\'["q","v"]\')',
    )
    args = parser.parse_args(argv)
    check_timm_name(args.model, "timm model")
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
    print(vpeft.apply_method(model, args.method, **dict(args.set)))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
