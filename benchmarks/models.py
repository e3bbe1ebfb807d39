"""The benchmark models and their batches: an MLP, a small CNN and a small transformer block.

Each factory returns ``(model, input_shape)`` for a classification problem with 10 classes; the
batch is drawn by :func:`batch` from a fixed seed so that every worker process of a case (ours and
each peer) sees the same weights and data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import nn

CLASSES = 10


def mlp():
    """MLP 784-256-128-10 (235 146 parameters) on a batch of 256 flattened 28×28 images."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, CLASSES),
    ), (256, 1, 28, 28)


def cnn():
    """conv 3→16, conv 16→32 (3×3, ReLU, 2×2 max-pool), dense 2048→10, on 128 images 3×32×32."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, CLASSES),
    ), (128, 3, 32, 32)


class TransformerBlock(nn.Module):
    """A pre-LayerNorm transformer block on sequences, mean-pooled into a linear classifier.

    x (B, T, d_in) → h = W_in x; h += W_o · attention(LN(h)); h += MLP(LN(h)) (GELU, width 2d);
    logits = W_head · mean_t h. Attention is written out (softmax(q kᵀ / √d_h) v, per head) rather
    than through ``scaled_dot_product_attention``, whose CPU kernel has no forward-mode derivative.
    Every parameter sits in an ``nn.Linear`` or ``nn.LayerNorm``, with 3-D inputs (a sequence
    dimension shared by the weights).
    """

    def __init__(self, d_in: int = 16, d: int = 32, heads: int = 2, classes: int = CLASSES):
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(d_in, d)
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        b, t, d = h.shape
        z = self.ln1(h)

        def heads(u):
            return u.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = heads(self.q(z)), heads(self.k(z)), heads(self.v(z))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        h = h + self.o((att @ v).transpose(1, 2).reshape(b, t, d))
        h = h + self.fc2(Fn.gelu(self.fc1(self.ln2(h))))
        return self.head(h.mean(1))


def transformer():
    """:class:`TransformerBlock` (d = 32, 2 heads, 9 418 parameters) on 64 sequences of 16×16."""
    return TransformerBlock(), (64, 16, 16)


MODELS = {"mlp": mlp, "cnn": cnn, "transformer": transformer}
TITLES = {
    "mlp": "MLP 784-256-128-10, batch 256",
    "cnn": "CNN conv16-conv32-fc, batch 128 of 3×32×32",
    "transformer": "transformer block d=32, 2 heads, batch 64 × 16 tokens",
}


def batch(name: str, device: torch.device | str = "cpu", seed: int = 0):
    """(model, x, y) of the named model, float32, from a fixed seed."""
    torch.manual_seed(seed)
    model, shape = MODELS[name]()
    model = model.to(device)
    x = torch.randn(shape, device=device)
    y = torch.randint(0, CLASSES, (shape[0],), device=device)
    return model, x, y
