"""The demo command runs (``python -m nngeo_ops demo --quick``) and writes its pictures."""

import subprocess
import sys

import pytest

from nngeo_ops.cli import main


def test_help_names_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--quick", "--out", "--seed", "--damping", "--no-plots", "--no-progress"):
        assert option in text


def test_no_command_prints_usage(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_quick_demo_writes_pngs_and_checks_itself(tmp_path):
    pytest.importorskip("matplotlib")
    from nngeo_ops.apps.demo import main as demo

    res = demo(["--quick", "--out", str(tmp_path), "--no-progress"])
    for path in res["files"]:
        assert path.exists() and path.stat().st_size > 10_000, path
    # the representations that are exact must be exact; the approximations must be worse
    rows = {name: (err, cos) for name, _, _, err, cos in res["representations"]}
    assert rows["PMatImplicit"][0] < 1e-5 and rows["PMatImplicit"][1] > 0.9999
    assert rows["PMatLowRank"][0] < 1e-5
    assert rows["PMatDiag"][0] > rows["PMatBlockDiag"][0]
    computed, dense = res["top_eigenvalues"]
    assert (computed[:5] - dense[:5]).abs().max() < 1e-4 * dense[0]
    kept = res["ewc"]
    assert kept["SGD on task B + EWC"][0] > kept["plain SGD on task B"][0]


def test_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "nngeo_ops", "demo", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--quick" in out.stdout
