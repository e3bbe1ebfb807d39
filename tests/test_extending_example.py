"""The worked example of docs/extending.md (a new node kind with its own rules, checked by
:mod:`nngeo_ops.testing`) runs as part of the suite, so the page cannot go stale."""

import importlib.util
import pathlib

_path = pathlib.Path(__file__).parent.parent / "docs" / "examples" / "bidiagonal.py"
_spec = importlib.util.spec_from_file_location("bidiagonal_example", _path)
_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_example)

TestBidiagonal = _example.TestBidiagonal
test_the_rules_ran = _example.test_the_rules_ran
