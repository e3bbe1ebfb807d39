"""What every ``benchmarks/bench_<x>.py`` script shares (the contract of ``python -m benchmarks``).

A script is runnable as ``python benchmarks/bench_<x>.py [--quick] [--out DIR]``, prints a markdown
table to stdout, writes ``DIR/bench_<x>.md`` (and optional PNGs) when ``--out`` is given, and
finishes in under about 20 s with ``--quick``. These helpers give a script the two options and the
copy of its stdout; scripts of other authors need not use them, only follow the contract.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path


def add_contract_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--quick`` and ``--out DIR`` to a script's parser."""
    parser.add_argument("--quick", action="store_true", help="a short run (under ~20 s)")
    parser.add_argument("--out", default=None, help="write bench_<x>.md (and PNGs) into DIR")
    return parser


class Tee(io.TextIOBase):
    """Copies everything written to stdout into a string while still printing it.

    Use as ``with Tee() as tee: ...`` then ``tee.text``.
    """

    def __init__(self) -> None:
        self._buf = io.StringIO()
        self._stdout = None

    def write(self, s: str) -> int:
        self._buf.write(s)
        return self._stdout.write(s) if self._stdout is not None else len(s)

    def flush(self) -> None:
        if self._stdout is not None:
            self._stdout.flush()

    def __enter__(self) -> Tee:
        self._stdout, sys.stdout = sys.stdout, self
        return self

    def __exit__(self, *exc) -> bool:
        sys.stdout = self._stdout
        self._stdout = None
        return False

    @property
    def text(self) -> str:
        return self._buf.getvalue()


def write_report(out: str | None, name: str, text: str) -> Path | None:
    """Write ``text`` to ``out/name.md`` (creating ``out``); None when ``out`` is None."""
    if not out:
        return None
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    target = path / f"{name}.md"
    target.write_text(text)
    return target
