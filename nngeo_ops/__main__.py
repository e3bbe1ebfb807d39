"""``python -m nngeo_ops`` — the command line (see :mod:`nngeo_ops.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
