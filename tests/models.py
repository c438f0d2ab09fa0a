"""Small float64 test models covering the architectures the engine must support."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(2, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding="same")
        self.norm2 = nn.GroupNorm(2, c)

    def forward(self, x):
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(x + self.norm2(self.conv2(h)))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.block1 = ResBlock(4)
        self.block2 = ResBlock(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.block2(self.block1(self.stem(x)))
        return self.head(h.mean((2, 3)))


class TinyTransformer(nn.Module):
    """Embedding, a learned positional parameter, an encoder layer, LayerNorm, sequence head."""

    def __init__(self, vocab=11, d=8, heads=2, seq=5, classes=4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.1)
        self.encoder = nn.TransformerEncoderLayer(
            d, heads, dim_feedforward=12, dropout=0.0, batch_first=True
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, idx):
        h = self.embed(idx) + self.pos
        return self.head(self.norm(self.encoder(h)))


class TiedLM(nn.Module):
    """A weight-tied language model: the output head reuses the embedding table."""

    def __init__(self, vocab=9, d=6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.embed(idx))))


def bn_cnn() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 6),
        nn.BatchNorm1d(6),
        nn.Linear(6, 3),
    )
    # give the running statistics non-trivial values, then evaluate
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 2, 6, 6, dtype=torch.float64))
    return model.eval()


class TwiceUsed(nn.Module):
    """The same Linear applied twice (recurrence), plus a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.rec = nn.Linear(5, 5)
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.rec(h))
        h = torch.tanh(self.rec(h))
        return self.out(self.frozen(h))
