"""apps.spectrum against dense eigvalsh of torch.func ground truths (float64), and the plots."""

import sys

import pytest
import torch
from torch import nn

from nngeo_ops.apps import (
    MissingDependencyError,
    SpectrumSettings,
    SpectrumTracker,
    plot_spectra,
    plot_spectrum,
    plot_tracker,
    spectrum,
)
from nngeo_ops.errors import NotSymmetricError, UnsupportedError
from nngeo_ops.linalg import DensitySettings
from nngeo_ops.nn import (
    FIM,
    GGN,
    Hessian,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatQuasiDiag,
    PVector,
)
from nngeo_ops.ops import CompilePolicy
from tests.nn import groundtruth as gt

DT = torch.float64
# a tiny dense_limit: no route may hide behind densification
NO_DENSE = SpectrumSettings(policy=CompilePolicy(dense_limit=4))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def mlp(n_in=4, hidden=5, out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, out)).to(DT)


def data(n=20, n_in=4, classes=3, seed=1):
    g = gen(seed)
    x = torch.randn(n, n_in, generator=g, dtype=DT)
    y = torch.randint(classes, (n,), generator=g)
    return x, y


def loader(x, y, bs=10):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs)


@pytest.fixture(scope="module")
def setup():
    model = mlp()
    x, y = data()
    return model, x, y, loader(x, y, bs=20)  # one batch: each Hessian product is one pass


@pytest.fixture(scope="module")
def truth(setup):
    """Dense torch.func ground truths, computed once: the Fisher and the Hessian."""
    model, x, y, _ = setup
    return {
        "fisher": gt.fim(model, x, "classif_logits").detach(),
        "hessian": gt.exact_hessian(model, x, y, nn.CrossEntropyLoss()).detach(),
    }


def check_top_bottom(F, dense, route, k=5, atol=1e-8):
    ref = torch.linalg.eigvalsh(dense).flip(0)
    # structured routes never densify (only fallback rules do, and those are skipped)
    top = spectrum(F, k, which="LA", generator=gen())
    bottom = spectrum(F, k, which="SA", generator=gen())
    torch.testing.assert_close(top.eigenvalues, ref[:k], rtol=0, atol=atol)
    torch.testing.assert_close(bottom.eigenvalues, ref[-k:], rtol=0, atol=atol)
    assert route in top.explain() and route in bottom.explain()
    torch.testing.assert_close(top.trace.value, dense.trace(), rtol=1e-10, atol=1e-12)
    return top


FISHER_ROUTES = {
    PMatDense: "torch.linalg.eigh",
    PMatDiag: "identity basis",
    PMatBlockDiag: "block bases",
    PMatKFAC: "block bases",
    PMatEKFAC: "block bases",
    PMatImplicit: "from the Gram matrix",
    PMatLowRank: "thin QR",
    PMatQuasiDiag: "block bases",
}


@pytest.mark.parametrize("rep", list(FISHER_ROUTES), ids=lambda r: r.__name__)
def test_fisher_every_representation_exact_from_its_structure(setup, truth, rep):
    model, x, _, ld = setup
    F = FIM(model, ld, rep, n_output=3, progress=False)
    true = truth["fisher"]
    if rep in (PMatDense, PMatImplicit, PMatLowRank):
        dense = true  # the exact Fisher
    elif rep is PMatDiag:
        dense = torch.diag(true.diagonal())
    elif rep is PMatBlockDiag:
        dense = torch.block_diag(true[:25, :25], true[25:, 25:])
    else:  # KFAC, EKFAC, quasi-diagonal: approximations, compared with their own dense matrix
        dense = F.to_torch()
    s = check_top_bottom(F, dense, FISHER_ROUTES[rep])
    assert s.exact and float(s.trace.stderr) == 0
    # eigenvectors: PVectors with F v = λ v
    assert isinstance(s.eigenvectors[0], PVector)
    V = s.flat_eigenvectors()
    torch.testing.assert_close(dense @ V, V * s.eigenvalues, rtol=0, atol=1e-8)


def test_kfac_eigenvalues_are_products_of_factor_eigenvalues_above_dense_limit():
    model = mlp(60, 50, 10, seed=2)  # P = 3560 > CompilePolicy.dense_limit = 3000
    x, y = data(40, 60, 10, seed=3)
    F = FIM(model, loader(x, y, 20), PMatKFAC, n_output=10, progress=False)
    assert F.op.shape[0] > CompilePolicy().dense_limit
    s = spectrum(F, 8, density=True)
    expected = []
    for lid in F.layer_collection.layers:
        A, G = F.get_factors(lid)
        expected.append(torch.kron(torch.linalg.eigvalsh(A), torch.linalg.eigvalsh(G)))
    ref = torch.cat(expected).sort(descending=True).values
    torch.testing.assert_close(s.eigenvalues, ref[:8], rtol=1e-10, atol=0)
    torch.testing.assert_close(s.trace.value, ref.sum(), rtol=1e-10, atol=0)
    assert s.exact and "block bases" in s.explain() and s.num_matvecs == 0
    assert abs(s.density.integral() - 1) < 1e-6 and s.density.exact


def test_implicit_fisher_gram_route_above_dense_limit():
    model = mlp(60, 50, 10, seed=4)
    x, y = data(12, 60, 10, seed=5)  # C·N = 120 ≪ P = 3560
    F = FIM(model, loader(x, y, 6), PMatImplicit, n_output=10, progress=False)
    J = gt.jacobian(model, x).detach().reshape(-1, F.op.shape[0])  # (N·C, P)
    Fo = gt.fisher_output_matrix(model(x).detach(), "classif_logits")
    w, Vo = torch.linalg.eigh(Fo)
    L = Vo * w.clamp_min(0).sqrt()
    ref = torch.linalg.eigvalsh(L.T @ J @ J.T @ L / x.shape[0]).flip(0)  # the nonzero spectrum
    s = spectrum(F, 6, generator=gen())
    torch.testing.assert_close(s.eigenvalues, ref[:6], rtol=1e-9, atol=0)
    assert "from the Gram matrix" in s.explain() and s.exact
    torch.testing.assert_close(s.trace.value, ref.sum(), rtol=1e-9, atol=0)
    # the P − C·N zero eigenvalues are known without vectors
    low = spectrum(F, 3, which="SA")
    assert float(low.eigenvalues.abs().max()) == 0 and low.eigenvectors is None
    assert "not formed" in low.explain()


def test_ggn_implicit_by_lanczos_and_by_gram(setup):
    model, x, y, ld = setup
    loss = nn.MSELoss()
    yy = torch.randn(x.shape[0], 3, generator=gen(2), dtype=DT)
    ld2 = loader(x, yy)
    G = GGN(model, ld2, loss, PMatImplicit, progress=False)
    dense = gt.ggn(model, x, yy, loss).detach()
    check_top_bottom(G, dense, "from the Gram matrix")
    settings = SpectrumSettings(method="lanczos", policy=CompilePolicy(dense_limit=4))
    s = spectrum(G, 5, settings=settings, generator=gen())
    torch.testing.assert_close(
        s.eigenvalues, torch.linalg.eigvalsh(dense).flip(0)[:5], rtol=0, atol=1e-8
    )
    assert "Lanczos" in s.explain() and not s.exact


@pytest.mark.parametrize("which", ["LA", "SA", "BE"])
def test_indefinite_hessian_by_lanczos(setup, truth, which):
    model, x, y, ld = setup
    loss = nn.CrossEntropyLoss()
    H = Hessian(model, ld, loss, PMatImplicit, progress=False)
    dense = truth["hessian"]
    ref = torch.linalg.eigvalsh(dense)
    assert float(ref[0]) < -1e-3  # indefinite
    s = spectrum(H, 4, which=which, settings=NO_DENSE, generator=gen())
    expected = {"LA": ref[-4:], "SA": ref[:4], "BE": torch.cat([ref[:2], ref[-2:]])}[which].flip(0)
    torch.testing.assert_close(s.eigenvalues, expected, rtol=0, atol=1e-8)
    assert "Lanczos" in s.explain() and float(s.residuals.max()) < 1e-10
    V = s.flat_eigenvectors()
    torch.testing.assert_close(dense @ V, V * s.eigenvalues, rtol=0, atol=1e-8)


def test_hessian_dense_and_diag_routes(setup, truth):
    model, x, y, ld = setup
    loss = nn.CrossEntropyLoss()
    dense = truth["hessian"]
    H = Hessian(model, ld, loss, PMatDense, progress=False)
    check_top_bottom(H, dense, "torch.linalg.eigh")
    Hd = Hessian(model, ld, loss, PMatDiag, progress=False)
    check_top_bottom(Hd, torch.diag(dense.diagonal()), "identity basis")


def test_per_layer_blocks_trace_and_density(setup, truth):
    model, x, y, ld = setup
    loss = nn.CrossEntropyLoss()
    dense = truth["hessian"]
    H = Hessian(model, ld, loss, PMatImplicit, progress=False)
    settings = SpectrumSettings(trace_matvecs=12, num_probes=6, num_iter_slq=15)
    s = spectrum(H, 3, which="BE", per_layer=True, settings=settings, generator=gen())
    assert list(s.per_layer) == ["0", "2"]
    for lid, (lo, hi) in zip(s.per_layer, [(0, 25), (25, 43)]):
        block = dense[lo:hi, lo:hi]
        ref = torch.linalg.eigvalsh(block)
        sub = s.per_layer[lid]
        expected = torch.stack([ref[-1], ref[-2], ref[0]])
        torch.testing.assert_close(sub.eigenvalues, expected, rtol=0, atol=1e-8)
        assert sub.eigenvectors[0].layer_collection.numel() == hi - lo
    # P = 43 > trace_matvecs = 12: Hutch++ with an error bar that covers the truth
    assert "Hutch++" in s.routes["trace"]
    assert abs(float(s.trace.value - dense.trace())) < 4 * float(s.trace.stderr) + 1e-8
    # the SLQ density: normalised, mean tr/P within its error, bit-identical when seeded
    d = spectrum(H, 1, density=True, trace=False, settings=settings, generator=gen(3)).density
    assert abs(d.integral() - 1) < 1e-6 and not d.exact and bool((d.stderr > 0).any())
    assert abs(d.mean() - float(dense.trace()) / 43) < 4 * d.mean_stderr()
    again = spectrum(H, 1, density=True, trace=False, settings=settings, generator=gen(3))
    assert torch.equal(again.density.values, d.values)
    assert torch.equal(again.density.stderr, d.stderr)
    # KFAC per layer takes the blocks themselves: exact per layer
    K = FIM(model, ld, PMatKFAC, n_output=3, progress=False)
    sk = spectrum(K, 2, per_layer=True)
    Kd = K.to_torch()
    for lid, (lo, hi) in zip(sk.per_layer, [(0, 25), (25, 43)]):
        ref = torch.linalg.eigvalsh(Kd[lo:hi, lo:hi]).flip(0)[:2]
        torch.testing.assert_close(sk.per_layer[lid].eigenvalues, ref, rtol=0, atol=1e-10)
        assert sk.per_layer[lid].exact


def test_log_density_of_an_exact_spectrum(setup):
    model, x, _, ld = setup
    F = FIM(model, ld, PMatEKFAC, n_output=3, progress=False)
    s = spectrum(F, 3, density=DensitySettings(scale="log", sigma=0.1))
    assert s.density.scale == "log" and s.density.exact
    assert abs(s.density.integral() + s.density.mass_below - 1) < 1e-6


def test_tracker_warm_starts_along_training(setup):
    model, x, y, ld = setup
    model = mlp(seed=0)
    loss = nn.CrossEntropyLoss()
    tracker = SpectrumTracker(2, generator=gen())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(2):
        H = Hessian(model, ld, loss, PMatImplicit, progress=False)
        tracker.update(H, step=step)
        ref = torch.linalg.eigvalsh(gt.exact_hessian(model, x, y, loss).detach()).flip(0)[:2]
        torch.testing.assert_close(tracker.history[-1], ref, rtol=0, atol=1e-8)
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    assert tracker.values().shape == (2, 2)
    assert tracker.matvecs[-1] <= tracker.matvecs[0]


def test_plots_are_written(setup, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    model, x, y, ld = setup
    F = FIM(model, ld, PMatKFAC, n_output=3, progress=False)
    G = FIM(model, ld, PMatImplicit, n_output=3, progress=False)
    settings = SpectrumSettings(num_probes=4, num_iter_slq=15)
    s1 = spectrum(F, 4, density=True, per_layer=True)
    s2 = spectrum(G, 4, density=True, settings=settings, generator=gen())
    H = Hessian(model, ld, nn.CrossEntropyLoss(), PMatImplicit, progress=False)
    s3 = spectrum(H, 4, which="BE", density=True, trace=False, settings=settings, generator=gen())
    for name, fig_of in {
        "one.png": lambda p: plot_spectrum(s3, p),
        "overlay.png": lambda p: plot_spectra(
            {"KFAC": s1, "Fisher": s2, "Hessian": s3}, p, overlay=True
        ),
        "layers.png": lambda p: plot_spectra(s1.per_layer, p),
    }.items():
        fig = fig_of(tmp_path / name)
        assert (tmp_path / name).stat().st_size > 10_000
        assert len(fig.axes) >= 1 and fig.axes[0].get_yscale() == "log"
    tracker = SpectrumTracker(1, generator=gen())
    tracker.update(H)
    tracker.update(H)
    plot_tracker(tracker, tmp_path / "track.png")
    assert (tmp_path / "track.png").stat().st_size > 5_000


def test_plot_without_matplotlib_names_the_fix(setup, monkeypatch):
    model, _, _, ld = setup
    s = spectrum(FIM(model, ld, PMatDiag, n_output=3, progress=False), 2)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingDependencyError, match="pip install matplotlib"):
        plot_spectrum(s)
    with pytest.raises(ImportError):
        plot_spectra({"a": s})


def test_bad_inputs(setup):
    model, x, y, ld = setup
    M = torch.randn(6, 6, generator=gen(), dtype=DT)
    with pytest.raises(NotSymmetricError, match="symmetric part"):
        spectrum(M, 2)
    with pytest.raises(ValueError, match="per_layer"):
        spectrum(M + M.T, 2, per_layer=True)
    with pytest.raises(ValueError, match="which"):
        spectrum(M + M.T, 2, which="LM")
    with pytest.raises(TypeError, match="torch.Generator"):
        spectrum(M + M.T, 2, generator=0)
    with pytest.raises(TypeError, match="as_matmat"):
        spectrum([[1.0]], 1)
    H = Hessian(model, ld, nn.CrossEntropyLoss(), PMatImplicit, progress=False)
    with pytest.raises(UnsupportedError, match="method='auto'"):
        spectrum(H, 2, settings=SpectrumSettings(method="exact"))
    with pytest.raises(UnsupportedError, match="trace='auto'"):
        spectrum(H, 2, settings=SpectrumSettings(trace="exact"))
    with pytest.raises(ValueError, match="method"):
        SpectrumSettings(method="dense")
    # a plain tensor works (exact, dense eigh), eigenvectors as columns
    s = spectrum(M + M.T, 3)
    assert s.eigenvectors.shape == (6, 3)
