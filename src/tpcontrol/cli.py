"""`tpcontrol`: the developer-facing command; `demo` is the README's first command."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import uvloop

from tpcontrol import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpcontrol", description="Control traffic intercepts.")
    parser.add_argument("--version", action="version", version=f"tpcontrol {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="run a local intercept demo: an app, the engine in front, an intercept on and off",
    )
    demo.add_argument("--requests", type=int, default=3, help="requests sent per step (1-100)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tpcontrol` and `python -m tpcontrol`."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        if not 1 <= args.requests <= 100:
            parser.error("--requests: must be from 1 to 100")
        from tpcontrol.demo import run_demo

        return uvloop.run(run_demo(args.requests))
    parser.error(f"unknown command {args.command!r}")
    return 2
