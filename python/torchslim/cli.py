"""The `torchslim` command."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchslim", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="version, torch, and which kernel runs each op on each device")
    sub.add_parser("demo", add_help=False,
                   help="every method and auto on the real model all-MiniLM-L6-v2: quality, latency, "
                        "bytes, save/reload, a plot (needs pip install 'torchslim[demo]'; "
                        "`torchslim demo --help` for options)")
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "demo":
        from . import demo

        return demo.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "info":
        from . import info
        from ._info import format_info

        print(format_info(info()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
