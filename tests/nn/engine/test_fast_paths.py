"""The fast paths of the statistics (chosen by shape or by model) against their plain definitions."""

import groundtruth as gt
import pytest
import torch
from models import loader_of, make
from torch import nn

from nngeo_ops.nn import (
    FIM,
    CurvatureGenerator,
    FIM_MonteCarlo,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatKFAC,
    build_many,
)
from nngeo_ops.nn.engine.accumulators import DiagAcc
from nngeo_ops.nn.engine.capture import Capture
from nngeo_ops.nn.layers.conv import ConvRule, conv_patches, conv_squared_grads
from nngeo_ops.nn.layers.moments import _SQUARE_LOOP, column_square_sum, second_moment
from nngeo_ops.nn.losses import output_model_for_variant
from nngeo_ops.nn.params import LayerCollection


@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv2d(3, 4, 3, padding=1), (2, 3, 7, 6)),
        (nn.Conv2d(3, 4, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(0, 1)), (2, 3, 9, 8)),
        (nn.Conv2d(2, 2, 3, padding="same", dilation=2), (1, 2, 8, 8)),
        (nn.Conv1d(2, 3, 3, padding="same"), (2, 2, 7)),
        (nn.Conv1d(2, 3, 2, stride=2, dilation=2), (2, 2, 9)),
    ],
)
def test_conv_patches_are_unfold(conv, shape):
    a = torch.randn(*shape)
    out = conv(a)
    g = torch.randn(3, *out.shape)
    arow, grow = ConvRule().rows(conv, a, g)  # unfold: (B, R, dA), (K, B, R, dG)
    torch.testing.assert_close(conv_patches(conv, a), arow.reshape(-1, arow.shape[-1]).T)
    # the squared per-example gradients, chunked, against the (K, B, P) tensor
    w = torch.einsum("kbrg,bra->kbga", grow, arow)
    sq = conv_squared_grads(conv, a, g)
    torch.testing.assert_close(sq["weight"].reshape(w.shape[2:]), w.square().sum((0, 1)))
    torch.testing.assert_close(sq["bias"], grow.sum(2).square().sum((0, 1)))


@pytest.mark.parametrize(
    "shape", [(1, 5, 3), (4, 5, 3), (3, 2, _SQUARE_LOOP // 2), (1, 2, _SQUARE_LOOP)]
)
def test_column_square_sum(shape):
    # small columns: squares then one sum; large ones: addcmul_ column by column; one column
    g = torch.randn(*shape, dtype=torch.float64)
    before = g.clone()
    torch.testing.assert_close(column_square_sum(g), (g * g).sum(0))
    assert torch.equal(g, before)  # the cotangents are not overwritten


@pytest.mark.parametrize(
    "shape, transposed",
    [((7, 5), False), ((300, 200), False), ((600, 130), False), ((3, 4, 40, 6), True)],
)
@pytest.mark.parametrize("pad", [0, 1])
def test_gram_paths(shape, transposed, pad):
    # plain product, upper panels mirrored (large compute-bound), batched blocks (feature axis
    # not innermost), each with or without room for the bias row
    t = torch.randn(*shape, dtype=torch.float64)
    if transposed:
        t = t.transpose(-1, -2)
    m = t.reshape(-1, t.shape[-1])
    d = m.shape[1]
    torch.testing.assert_close(second_moment(t, pad=pad)[:d, :d], m.T @ m)
    assert second_moment(t, pad=pad).shape == (d + pad, d + pad)


def test_block_of_one_position_layers_from_the_output_factor():
    # BlockAcc builds Linear blocks as Σ_n h_n ⊗ a_n a_nᵀ; with the MC Fisher (K = 1) and the
    # exact one (K = C), in one pass with the dense matrix so that both see the same samples
    model, x = make("conv2d")
    for kind, trials in (("exact", 1), ("sample", 2)):
        gen = CurvatureGenerator(
            model,
            output_model_for_variant("classif_logits"),
            kind,
            trials=trials,
            generator=torch.Generator().manual_seed(0),
        )
        dense, block = build_many(gen, loader_of(x), [PMatDense, PMatBlockDiag])
        for sl in dense.layer_collection.layer_slices().values():
            torch.testing.assert_close(block.to_torch()[sl, sl], dense.to_torch()[sl, sl])


@pytest.mark.parametrize("case", ["mlp", "conv2d", "residual"])
def test_batched_and_looped_backward_agree(case):
    # models made only of Linear layers and activations (in Sequential) back-propagate the K
    # columns with one vmapped backward; the others (convolutions, custom forward code) loop over
    # the columns: both give the same statistics
    model, x = make(case)
    loader = loader_of(x)
    ref = FIM(model, loader, PMatDense, progress=False).to_torch()
    om = output_model_for_variant("classif_logits")
    for batched in (True, False):
        gen = CurvatureGenerator(model, om, "exact")
        cap = gen.capture()
        cap._batched_backward = batched
        torch.testing.assert_close(PMatDense(gen, examples=loader).to_torch(), ref)
        torch.testing.assert_close(
            PMatKFAC(gen, examples=loader).to_torch(),
            FIM(model, loader, PMatKFAC, progress=False).to_torch(),
        )
    cap = Capture(model, LayerCollection.from_model(model), om)
    assert cap._batched_backward == (case == "mlp")


def test_one_position_ekfac_diagonal_in_closed_form():
    # a Linear layer's refit diagonal is Σ_n (Σ_k pg²) ⊗ pa², without per-example gradients;
    # checked against the definition E[(Q_Gᵀ ∇W Q_A)²] from the dense per-example gradients
    model, x = make("mlp")
    loader = loader_of(x)
    E = FIM(model, loader, PMatEKFAC, progress=False)
    gen = E.generator
    pe = build_many(gen, loader, [_Grads])[0].data.T  # (K·N, P), scaled: Σ rows² = F
    lc = E.layer_collection
    for lid, sl in lc.layer_slices().items():
        f = E.data[lid]
        n_out, n_in = f["QG"].shape[0], f["QA"].shape[0] - 1
        w = pe[:, sl]
        wm = torch.cat(
            [w[:, : n_out * n_in].reshape(-1, n_out, n_in), w[:, n_out * n_in :, None]], 2
        )
        proj = f["QG"].T @ wm @ f["QA"]
        torch.testing.assert_close(f["diag"], proj.square().sum(0).reshape(-1))


class _Grads(PMatDense):
    """The scaled per-example gradients U (U Uᵀ = F), through the low-rank accumulator."""

    @staticmethod
    def accumulators(generator):
        from nngeo_ops.nn.engine.accumulators import GradsAcc

        return [GradsAcc()]

    def __init__(self, generator, data=None, examples=None):
        self.data = data
        self.layer_collection = generator.layer_collection


def test_monte_carlo_diag_and_kfac_reproducible_after_the_sampler_change():
    model, x = make("conv2d")
    for rep in (PMatDiag, PMatKFAC):
        runs = [
            FIM_MonteCarlo(
                model, loader_of(x), rep, generator=torch.Generator().manual_seed(5), progress=False
            ).to_torch()
            for _ in range(2)
        ]
        torch.testing.assert_close(runs[0], runs[1])


def _fisher_diagonal(model, x):
    """Σ_n diag(J_nᵀ H_n J_n) / N of classif_logits by torch.func (H_n = diag(p) − ppᵀ)."""
    j = gt.jacobian(model, x)  # (N, C, P)
    p = torch.softmax(model(x).detach(), 1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncp,ncd,ndp->p", j, h, j) / x.shape[0]


def test_exact_diagonal_with_large_columns_above_the_dense_limit():
    # one-position layers whose per-column cotangents have ≥ _SQUARE_LOOP entries (B · d_out =
    # 128 · 128): their Σ_k g² is added column by column; 19 204 parameters (above the compile
    # policy's dense_limit), so the truth is the diagonal of Σ_n J_nᵀ H_n J_n / N directly
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 4)
    ).double()
    x = torch.randn(128, 16, dtype=torch.float64)
    truth = _fisher_diagonal(model, x)
    assert truth.numel() > 3000
    F = FIM(model, loader_of(x, sizes=(128,)), PMatDiag, progress=False)
    torch.testing.assert_close(F.get_diag(), truth)


@pytest.mark.parametrize(
    "narrow", [0, 10**6]
)  # the grouped kernel everywhere, the patches everywhere
@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv2d(3, 4, 3, padding=1), (5, 3, 7, 6)),
        (nn.Conv2d(6, 4, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(0, 1)), (5, 6, 9, 8)),
        (nn.Conv1d(2, 3, 3, padding="same"), (5, 2, 7)),
    ],
)
def test_conv_example_grads_routes_and_chunks(monkeypatch, conv, shape, narrow):
    # both routes of ExampleGrads, with chunks of one or two examples (the chunk bound lowered), in
    # conv_squared_grads (K = 3 columns) and per_example_weight, against unfold's rows and einsum
    from nngeo_ops.nn.layers import conv as conv_mod

    conv = conv.double()
    a = torch.randn(*shape, dtype=torch.float64)
    g = torch.randn(3, *conv(a).shape, dtype=torch.float64)
    arow, grow = ConvRule().rows(conv, a, g)
    w = torch.einsum("kbrg,bra->kbga", grow, arow)
    monkeypatch.setattr(conv_mod, "_NARROW_PATCH", narrow)
    for chunk in (1, 200, 1 << 22):
        monkeypatch.setattr(conv_mod, "_CONV_CHUNK", chunk)
        sq = conv_squared_grads(conv, a, g)
        torch.testing.assert_close(sq["weight"].reshape(w.shape[2:]), w.square().sum((0, 1)))
        torch.testing.assert_close(ConvRule().per_example_weight(conv, a, g), w)


def test_exact_diagonal_of_a_cnn_above_the_dense_limit():
    # a narrow first convolution (3 input channels: the patches route) and a wide second one (16:
    # the grouped kernel); 7 140 parameters, above dense_limit; truth Σ_n diag(J_nᵀ H_n J_n) / N
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.Tanh(), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 4),
    ).double()  # fmt: skip
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    truth = _fisher_diagonal(model, x)
    assert truth.numel() > 3000
    F = FIM(model, loader_of(x, sizes=(10, 6)), PMatDiag, progress=False)
    torch.testing.assert_close(F.get_diag(), truth)


def test_diagonal_layers_are_slices_of_one_buffer():
    # each layer's diagonal is written into its slice of one (P,) buffer: a Linear by its closed
    # form, a convolution and a LayerNorm (kinds that return new tensors, copied in), a Linear
    # without bias; three batches of different sizes (the later ones added into the slices);
    # truth Σ_n diag(J_nᵀ H_n J_n) / N by torch.func
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.LayerNorm(3 * 4 * 4),
        nn.Linear(48, 8), nn.Tanh(), nn.Linear(8, 3, bias=False),
    ).double()  # fmt: skip
    x = torch.randn(11, 2, 6, 6, dtype=torch.float64)
    truth = _fisher_diagonal(model, x)
    loader = loader_of(x, sizes=(4, 5))
    F = FIM(model, loader, PMatDiag, progress=False)
    torch.testing.assert_close(F.get_diag(), truth)
    # the accumulator's layer values are views of the diagonal it returns: nothing concatenated
    gen = F.generator
    acc = DiagAcc(gen.layer_collection.layers)
    gen.run(loader, [acc])
    d = acc.concatenated()
    assert all(
        v.untyped_storage().data_ptr() == d.untyped_storage().data_ptr() for v in acc.value.values()
    )
    torch.testing.assert_close(d, truth)


def test_finiteness_check_survives_an_overflowing_sum():
    # the check proves finiteness by a finite sum; a sum that overflows (finite entries near the
    # float32 maximum) falls back to the exact range, a NaN or an inf entry is found either way
    from nngeo_ops.nn.engine.finite import nonfinite_layers

    lc = LayerCollection.from_model(nn.Linear(2, 2))
    big = torch.full((6,), 3e38)
    assert nonfinite_layers({lid: big for lid in lc.layers}, lc) == []
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = big.clone()
        t[3] = bad
        assert nonfinite_layers({lid: t for lid in lc.layers}, lc) == list(lc.layers)
    assert nonfinite_layers(torch.full((6,), -3e38), lc) == []
