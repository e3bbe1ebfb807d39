"""The ``nngeo-ops`` command (also ``python -m nngeo_ops``).

Sub-commands:

- ``demo``: the tour of the library on a small network, with pictures (:mod:`nngeo_ops.apps.demo`;
  ``nngeo-ops demo --help`` lists its options).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the sub-command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="nngeo-ops",
        description="nngeo_ops: curvature of neural networks as lazy linear operators.",
    )
    parser.add_argument("command", choices=["demo"], help="demo: a tour of the library")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "demo":
        from .apps.demo import main as demo

        demo(argv[1:] + rest)
    return 0
