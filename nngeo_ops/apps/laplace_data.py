"""The data pass of :class:`~nngeo_ops.apps.laplace.Laplace`: counts, the loss at θ* and checks.

Bad data is caught here with a message that names the fix, before any curvature is computed:
unlabelled batches, regression targets given to a classification Laplace (and class labels to a
regression one), labels outside the classes, inputs the model cannot take, an empty loader.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DataError, ShapeError


def _check_batch(model, batch, device):
    if not isinstance(batch, list | tuple) or len(batch) < 2:
        raise DataError(
            "Laplace needs labelled batches (inputs, targets); the loader yielded "
            f"{type(batch).__name__}"
        )
    x, y = batch[0].to(device), batch[1].to(device)
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as err:
        raise ShapeError(
            f"the model cannot take inputs of shape {tuple(x.shape[1:])} (torch says: "
            f"{str(err).splitlines()[0]}); give a loader of the inputs the model was built for"
        ) from None
    if out.dim() != 2:
        raise ShapeError(f"Laplace needs outputs of shape [B, C], got {tuple(out.shape)}")
    return x, y, out


def data_pass(model, loader, likelihood: str, dtype, device):
    """One pass over a labelled loader at the current parameters: (N, the summed loss —
    cross-entropy, or squared error for regression —, the number of outputs C, the input shape
    per example), checking the batches, the targets and the input shape on the way."""
    n, total, c, in_shape = 0, torch.zeros((), dtype=dtype, device=device), None, None
    for batch in loader:
        x, y, out = _check_batch(model, batch, device)
        if in_shape is None:
            in_shape, c = tuple(x.shape[1:]), out.shape[1]
        elif tuple(x.shape[1:]) != in_shape:
            raise ShapeError(
                f"the loader yields inputs of shapes {in_shape} and {tuple(x.shape[1:])}; all "
                "batches must have the same input shape"
            )
        if likelihood == "classification":
            if y.is_floating_point() or y.dim() != 1 or y.shape[0] != out.shape[0]:
                raise DataError(
                    f"a classification Laplace needs integer class labels of shape [B], got "
                    f"{y.dtype} of shape {tuple(y.shape)} (regression targets?); use "
                    "likelihood='regression' for real-valued targets"
                )
            if bool((y < 0).any()) or bool((y >= c).any()):
                raise DataError(
                    f"class labels must lie in [0, {c}) for a model with {c} outputs, got "
                    f"[{int(y.min())}, {int(y.max())}]"
                )
            total = total + nn.functional.cross_entropy(out, y, reduction="sum")
        else:
            if not y.is_floating_point():
                raise DataError(
                    f"a regression Laplace needs real-valued targets, got {y.dtype} (class "
                    "labels?); use likelihood='classification' or cast the targets to float"
                )
            y = y.reshape(out.shape) if y.numel() == out.numel() else y
            if y.shape != out.shape:
                raise DataError(
                    f"regression targets of shape {tuple(y.shape)} for outputs of shape "
                    f"{tuple(out.shape)}: they must match"
                )
            total = total + (y.to(out.dtype) - out).square().sum()
        n += out.shape[0]
    if n == 0:
        raise DataError("the loader yielded no examples")
    return n, total, c, in_shape
