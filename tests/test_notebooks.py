"""Every notebook in notebooks/ runs: its code cells are executed in order, in one namespace.

The notebooks assert their own results against dense matrices and closed forms (torch.testing), so a
notebook that runs is a notebook whose numbers are right; this keeps them from going stale.
"""

import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    cells = json.loads(path.read_text())["cells"]
    code = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    namespace: dict = {"__name__": "__notebook__"}
    assert "assert" in code, f"{path.name} checks nothing"
    exec(compile(code, str(path), "exec"), namespace)  # noqa: S102 - our own notebooks
