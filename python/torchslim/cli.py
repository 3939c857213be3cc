"""The `torchslim` command."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchslim", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="version, torch, and which kernel runs each op on each device")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        from . import info
        from ._info import format_info

        print(format_info(info()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
