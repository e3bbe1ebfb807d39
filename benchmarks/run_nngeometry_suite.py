"""Run NNGeometry's own test suite against ``nngeo_ops.compat.nngeometry`` (or against NNGeometry).

Usage::

    python benchmarks/run_nngeometry_suite.py PATH_TO_NNGEOMETRY_CHECKOUT [--target compat|nngeometry]
        [-- extra pytest arguments]

``PATH_TO_NNGEOMETRY_CHECKOUT`` is a checkout of https://github.com/tfjgeorge/nngeometry (its
``tests/`` folder is what runs). This script downloads nothing: NNGeometry's tests read MNIST through
torchvision, so a stub ``torchvision`` module is installed whose ``datasets.MNIST`` is a fixed,
seeded synthetic data set of the same shapes (1x28x28 images in [0, 1], integer labels 0..9).
Results on this stub are what the counts in docs/compat_nngeometry.md refer to.

With ``--target compat`` (the default) the module name ``nngeometry`` and all its submodules are
aliased to ``nngeo_ops.compat.nngeometry`` before the tests import anything, so that the tests run
unchanged against nngeo_ops. With ``--target nngeometry`` the checkout's own package runs (the
baseline).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap

_CONFTEST = '''
import importlib
import pkgutil
import sys
import types

import torch


class _SyntheticMNIST(torch.utils.data.Dataset):
    """A seeded stand-in for torchvision's MNIST (no download): 1x28x28 images, labels 0..9."""

    def __init__(self, root=None, train=True, download=False, transform=None, n=1000):
        g = torch.Generator().manual_seed(0 if train else 1)
        # images in [0, 1] as ToTensor gives them; blobs so that convolutions see structure
        self.x = torch.rand(n, 1, 28, 28, generator=g, dtype=torch.float32) ** 3
        self.y = torch.randint(0, 10, (n,), generator=g)
        self.transform = transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.y[i])


class _Compose:
    def __init__(self, ts):
        self.ts = ts

    def __call__(self, x):
        for t in self.ts:
            x = t(x)
        return x


class _ToTensor:
    def __call__(self, x):
        return x


class _Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean[0], std[0]

    def __call__(self, x):
        return (x - self.mean) / self.std


tv = types.ModuleType("torchvision")
tv.datasets = types.ModuleType("torchvision.datasets")
tv.datasets.MNIST = _SyntheticMNIST
tv.transforms = types.ModuleType("torchvision.transforms")
tv.transforms.Compose = _Compose
tv.transforms.ToTensor = _ToTensor
tv.transforms.Normalize = _Normalize
sys.modules.setdefault("torchvision", tv)
sys.modules.setdefault("torchvision.datasets", tv.datasets)
sys.modules.setdefault("torchvision.transforms", tv.transforms)

# the suite imports ``tests.tasks`` as well as ``tasks``; its tests/ has no __init__.py, so a regular
# package named ``tests`` elsewhere on the path (ours) would win: bind the name to the suite's folder
suite_pkg = types.ModuleType("tests")
suite_pkg.__path__ = [SUITE_TESTS]
sys.modules["tests"] = suite_pkg

if TARGET == "compat":
    compat = importlib.import_module("nngeo_ops.compat.nngeometry")
    sys.modules["nngeometry"] = compat
    for info in pkgutil.walk_packages(compat.__path__, "nngeo_ops.compat.nngeometry."):
        mod = importlib.import_module(info.name)
        sys.modules["nngeometry." + info.name[len("nngeo_ops.compat.nngeometry."):]] = mod
'''


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkout", help="path of a checkout of NNGeometry's repository")
    p.add_argument("--target", choices=["compat", "nngeometry"], default="compat")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = p.parse_args(argv)
    tests = os.path.join(os.path.abspath(args.checkout), "tests")
    if not os.path.isdir(tests):
        p.error(f"{tests} does not exist: pass the root of an NNGeometry checkout")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        # a plugin module (not a conftest) so that it runs before the suite's own conftest
        with open(os.path.join(tmp, "nngeo_compat_runner.py"), "w") as f:
            head = f"TARGET = {args.target!r}\nSUITE_TESTS = {tests!r}\n"
            f.write(head + textwrap.dedent(_CONFTEST))
        env = dict(os.environ)
        paths = [tmp, tests]
        paths.append(repo if args.target == "compat" else os.path.abspath(args.checkout))
        env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
        # test paths among the extra arguments replace the whole suite
        chosen = [a for a in args.pytest_args if os.path.exists(a.split("::")[0])]
        cmd = [sys.executable, "-m", "pytest", *([] if chosen else [tests])]
        cmd += ["-p", "nngeo_compat_runner"]
        cmd += ["-p", "no:cacheprovider", "-q", "-rfE", *args.pytest_args]
        return subprocess.call(cmd, env=env, cwd=tmp)


if __name__ == "__main__":
    sys.exit(main())
