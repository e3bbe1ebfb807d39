"""Precision policy of the curvature builders: which dtype statistics are accumulated in.

Everything follows the model's device and dtype, with one exception: the statistics of a model in
half precision (``bfloat16``, ``float16``) are accumulated in ``float32``. The forward and backward
passes run in the model's own precision (that is what the model computes); the per-example
quantities they produce (input rows, output cotangents, per-example gradients, implicit products)
are cast to float32 before any sum over examples, so that a Fisher over many examples does not lose
the small contributions that a half-precision running sum would round away (bfloat16 keeps 8 bits of
mantissa). Representations of a half model therefore hold float32 tensors and their ops nodes are
float32; factorisations are done in float32 (or float64 where the ops rules widen a small system).
Vectors passed in a half dtype are cast up, and results are returned in the dtype of the vector.
float32 and float64 models are accumulated in their own dtype.
"""

from __future__ import annotations

import torch

HALF = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics of a model in ``dtype`` are accumulated in (float32 for half)."""
    return torch.promote_types(dtype, torch.float32) if dtype in HALF else dtype
