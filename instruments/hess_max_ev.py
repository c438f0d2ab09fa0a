"""``hess_max_ev``: the largest-magnitude eigenvalue of the mini-batch Hessian, by Lanczos."""

from __future__ import annotations

from cockpit.linops import lanczos
from instruments.base import Instrument, PanelSpec, Record, Scalar, StepContext, register_instrument

__all__ = ["HessMaxEV"]


@register_instrument
class HessMaxEV(Instrument):
    """Largest-magnitude eigenvalue of the Hessian of the batch loss L.

    Lanczos with full reorthogonalization on Hessian-vector products (no
    ``backward(create_graph=True)`` needed from the user), warm-started from the
    previous tracked step's eigenvector.

    Args:
        schedule: Step predicate.
        tol: Relative tolerance of the eigenvalue (default 1e-3, Cockpit's).
        max_iter: Iteration cap (Hessian-vector products).

    Metrics: ``hess_max_ev``, ``converged`` (0/1) and ``num_hvps``.

    Example:
        >>> import torch
        >>> from cockpit import Cockpit
        >>> from instruments.hess_max_ev import HessMaxEV
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
        >>> x, y = torch.randn(32, 3).double(), torch.randn(32, 1).double()  # [N, D_in], [N, 1]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with Cockpit(model, loss_fn, opt, [HessMaxEV(tol=1e-8)]) as cockpit:
        ...     loss = loss_fn(model(x), y)
        ...     with cockpit.step(0, loss):
        ...         loss.backward()
        >>> latest = cockpit.latest()
        >>> a = torch.cat([x, x.new_ones(32, 1)], 1)  # [N, D]: the Hessian is (2/N) aᵀa
        >>> top = torch.linalg.eigvalsh(2 / 32 * a.T @ a).max()
        >>> abs(latest["hess_max_ev"] - float(top)) < 1e-6 * float(top)
        True
        >>> latest["hess_max_ev.converged"], latest["hess_max_ev.num_hvps"] <= 4  # D = 4
        (1.0, True)
    """

    name = "hess_max_ev"
    cost = "HVP"
    panel = PanelSpec(
        "line",
        "curvature",
        "Max eigenvalue",
        y_log=True,
        description="How sharp is the steepest direction? Often moves before the loss.",
    )

    def __init__(self, schedule=None, tol: float = 1e-3, max_iter: int = 100) -> None:
        super().__init__(schedule)
        self.tol, self.max_iter = tol, max_iter
        self._v0 = None

    def compute(self, ctx: StepContext) -> list[Record]:  # noqa: D102
        op = ctx.engine.hessian_operator()
        v0 = self._v0 if self._v0 is not None and self._v0.shape[0] == op.shape[0] else None
        # the engine's generator, never torch's global one: drawing from that would change
        # the user's dropout masks and data order
        gen = ctx.engine.generator(op.device)
        res = lanczos(op, k=1, tol=self.tol, max_iter=self.max_iter, v0=v0, generator=gen)
        self._v0 = res.eigenvectors[:, 0].detach()
        return [
            Scalar(ctx.step, self.name, self.name, "all", float(res.eigenvalues[0])),
            Scalar(ctx.step, self.name, "converged", "all", float(res.converged)),
            Scalar(ctx.step, self.name, "num_hvps", "all", float(res.num_matvecs)),
        ]

    def config(self) -> dict:  # noqa: D102
        return {**super().config(), "tol": self.tol, "max_iter": self.max_iter}
