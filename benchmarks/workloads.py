"""The benchmark workloads: models, random data and loss functions.

Only ``torch`` is imported here: this module is also run inside the reference
environment ``.bench-venv`` (see :mod:`benchmarks.bench_reference`), where our
``cockpit`` package must not be importable.

======  ==================================================  ======  ===========
key     model                                               input   N (quick)
======  ==================================================  ======  ===========
``A``   MLP 784-128-10 (ReLU), 10 classes                    784     128 (32)
``B``   3C3D (DeepOBS CIFAR-10), 10 classes                  3×32×32 128 (16)
``C``   All-CNN-C (DeepOBS CIFAR-100, no dropout), 100 cl.   3×32×32 32 (8)
======  ==================================================  ======  ===========

All models are plain ``nn.Sequential`` stacks of standard layers (TF-style "same"
padding is an explicit ``ZeroPad2d``), so BackPACK can ``extend`` them. Data are
random (fixed seed), the loss is ``CrossEntropyLoss(reduction="mean")``, float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Workload", "WORKLOADS", "mlp", "c3d3", "allcnnc", "get"]


def _tf_same_pool() -> nn.Sequential:
    """Max-pool 3×3, stride 2, TF ``"same"`` padding on even inputs (pad bottom/right by 1).

    TF pads with -inf; zero padding is identical here because the pool follows a ReLU.
    """
    return nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(3, 2))


def mlp() -> nn.Sequential:
    """Workload A: MLP 784-128-10 with ReLU."""
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def c3d3(num_classes: int = 10) -> nn.Sequential:
    """Workload B: DeepOBS 3C3D (Xavier-normal weights, zero biases).

    conv 64 5×5 valid → ReLU → maxpool 3/2 same; conv 96 3×3 valid → ReLU → maxpool;
    conv 128 3×3 same → ReLU → maxpool; dense 1152→512 → ReLU → 256 → ReLU → classes.
    """
    model = nn.Sequential(
        nn.Conv2d(3, 64, 5),
        nn.ReLU(),
        _tf_same_pool(),
        nn.Conv2d(64, 96, 3),
        nn.ReLU(),
        _tf_same_pool(),
        nn.Conv2d(96, 128, 3, padding=1),
        nn.ReLU(),
        _tf_same_pool(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 128, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )
    _init(model, bias=0.0)
    return model


def allcnnc(num_classes: int = 100) -> nn.Sequential:
    """Workload C: All-CNN-C (Springenberg et al. 2015, as in DeepOBS), dropout omitted.

    96-96-96(s2)-192-192-192(s2) 3×3 convs ("same"), 192 3×3 valid, 192 1×1,
    ``num_classes`` 1×1, each followed by ReLU, then global average pooling.
    Xavier-normal weights, biases 0.1 (DeepOBS).
    """

    def conv(c_in: int, c_out: int, k: int = 3, stride: int = 1, pad: int = 1) -> list:
        return [nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad), nn.ReLU()]

    def conv_s2(c_in: int, c_out: int) -> list:  # TF "same" with stride 2 on even inputs
        return [nn.ZeroPad2d((0, 1, 0, 1)), *conv(c_in, c_out, stride=2, pad=0)]

    model = nn.Sequential(
        *conv(3, 96),
        *conv(96, 96),
        *conv_s2(96, 96),
        *conv(96, 192),
        *conv(192, 192),
        *conv_s2(192, 192),
        *conv(192, 192, pad=0),
        *conv(192, 192, k=1, pad=0),
        *conv(192, num_classes, k=1, pad=0),
        nn.AvgPool2d(6),
        nn.Flatten(),
    )
    _init(model, bias=0.1)
    return model


def _init(model: nn.Module, bias: float) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
            nn.init.constant_(m.bias, bias)


@dataclass(frozen=True)
class Workload:
    """A model, its input shape and batch sizes.

    Attributes:
        key: ``"A"``, ``"B"`` or ``"C"``.
        name: Human-readable name.
        build: Model constructor (no arguments).
        input_shape: Shape of one sample.
        num_classes: Number of classes of the random labels.
        n: Batch size of the full benchmark.
        n_quick: Batch size for ``--quick``.
    """

    key: str
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    n: int
    n_quick: int

    def batch_size(self, quick: bool = False) -> int:
        """N for the full or the quick benchmark."""
        return self.n_quick if quick else self.n

    def model(self, seed: int = 0, device: str = "cpu") -> nn.Module:
        """A freshly initialized model (fixed seed)."""
        torch.manual_seed(seed)
        return self.build().to(device)

    def data(self, n: int, seed: int = 1, device: str = "cpu") -> tuple[Tensor, Tensor]:
        """A random batch ``(x, y)`` of N samples (fixed seed)."""
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, *self.input_shape, generator=gen)
        y = torch.randint(0, self.num_classes, (n,), generator=gen)
        return x.to(device), y.to(device)

    @staticmethod
    def loss_fn() -> nn.Module:
        """The loss module (mean reduction)."""
        return nn.CrossEntropyLoss()


WORKLOADS: dict[str, Workload] = {
    w.key: w
    for w in (
        Workload("A", "MLP 784-128-10", mlp, (784,), 10, 128, 32),
        Workload("B", "3C3D", c3d3, (3, 32, 32), 10, 128, 16),
        Workload("C", "All-CNN-C", allcnnc, (3, 32, 32), 100, 32, 8),
    )
}


def get(key: str) -> Workload:
    """The workload with this key (``"A"``, ``"B"`` or ``"C"``)."""
    try:
        return WORKLOADS[key]
    except KeyError:
        raise KeyError(f"unknown workload {key!r}; choose from {sorted(WORKLOADS)}") from None
