"""Ridge regression voxels → features, the Brain-Diffuser baseline (Ozcelik & VanRullen 2023).

:func:`fit_ridge` is the closed form with an intercept and λ chosen by exact leave-one-out, fitted per
subject; :class:`RidgeDecoder` keeps the fitted maps as buffers (so they checkpoint like weights).
Written by hand rather than with scikit-learn's ``RidgeCV`` (which it equals, see the tests): it runs in
torch on the training device, picks the primal or dual form by size, and never holds an (n, F) float64 copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from brainit_pl.errors import require

# Ridge penalties as multiples of the Gram matrix's mean non-zero eigenvalue (trace / min(n, V)), so that
# one grid suits every subject and data size. Brain-Diffuser's λ = 5e4 with V ≈ 15.7k, n ≈ 8.9k is ≈ 3.2.
DEFAULT_ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4)


@dataclass
class RidgeSolution:
    """A fitted multi-output ridge: ŷ = ((x − x_mean) / x_scale) @ W + y_mean.

    W is kept in whichever exact form is smaller: ``coef`` = W (V, F) (primal), or ``support`` (n, V),
    the standardised training betas, with ``dual_coef`` (n, F), W = supportᵀ @ dual_coef (dual).

    Attributes:
        alpha: the chosen penalty (absolute).
        alphas: (A,) the candidate penalties (absolute); ``loo_mse``: (A,) their leave-one-out MSE.
    """

    alpha: float
    alphas: Tensor
    loo_mse: Tensor
    x_mean: Tensor
    x_scale: Tensor
    y_mean: Tensor
    coef: Tensor | None = None
    support: Tensor | None = None
    dual_coef: Tensor | None = None

    def predict(self, x: Tensor) -> Tensor:
        """(B, V) betas → (B, F) predicted targets (in the solution's dtype)."""
        xs = (x.to(self.x_mean.dtype) - self.x_mean) / self.x_scale
        if self.coef is not None:
            return xs @ self.coef + self.y_mean
        return (xs @ self.support.T) @ self.dual_coef + self.y_mean  # (B, n) @ (n, F)


def _column_chunks(n_cols: int, n_rows: int, budget: int = 2**26) -> list[slice]:
    """Column slices of ~``budget`` float64 values each, so that no full (n, F) float64 copy is made."""
    step = max(1, budget // max(n_rows, 1))
    return [slice(i, min(i + step, n_cols)) for i in range(0, n_cols, step)]


def fit_ridge(
    x: Tensor,
    y: Tensor,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    relative: bool = False,
    standardize: bool = True,
    form: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> RidgeSolution:
    """Closed-form multi-output ridge with an intercept, λ chosen by efficient leave-one-out.

    Centred (and, with ``standardize``, unit-variance) betas X̃ with the training mean and population std.
    Dual form when n < V: the n × n kernel K = X̃X̃ᵀ = UΛUᵀ gives (K + λI)⁻¹ = U(Λ + λ)⁻¹Uᵀ; primal form
    otherwise: the V × V covariance X̃ᵀX̃ = PΛPᵀ. One eigendecomposition serves every λ: the hat matrix is
    1/n + U diag(Λ/(Λ+λ)) Uᵀ (U orthonormal; in the primal form U = X̃P/√Λ), and the leave-one-out residual
    of sample i is r_i / (1 − h_ii) (as sklearn's RidgeCV). Its squared norm, averaged over samples and
    outputs, scores each λ; it needs only the n × n target Gram matrix T = Y_c Y_cᵀ, so the cost per
    λ does not grow with the number of outputs F. The algebra is float64, over column chunks of the outputs,
    so that peak memory is about the stored coefficients (``dtype``) beyond the inputs.

    Args:
        x: (n, V) training betas.
        y: (n, F) training targets (any float dtype; float16 is fine).
        alphas: candidate penalties λ.
        relative: ``alphas`` are multiples of the Gram's mean non-zero eigenvalue trace / min(n, V).
        standardize: scale each voxel to unit variance (constant voxels keep scale 1).
        form: how to store W: ``"primal"``, ``"dual"`` or ``None`` (the smaller of the two).
        dtype: dtype of the returned solution.

    Returns:
        The :class:`RidgeSolution` of the λ with the lowest leave-one-out MSE, on ``x``'s device.
    """
    require(x.ndim == 2 and y.ndim == 2 and len(x) == len(y), f"fit_ridge needs x (n, V) and y (n, F), got "
            f"{tuple(x.shape)} and {tuple(y.shape)}")  # fmt: skip
    require(len(x) >= 3, f"ridge needs at least 3 training samples (leave-one-out), got {len(x)}")
    require(len(alphas) >= 1 and min(alphas) > 0, f"ridge alphas must be positive, got {list(alphas)}")
    require(form in (None, "primal", "dual"), f"form must be 'primal', 'dual' or None, got {form!r}")
    n, v = x.shape
    n_out = y.shape[1]
    x = x.double()
    x_mean = x.mean(0)
    x_scale = x.std(0, correction=0) if standardize else torch.ones_like(x_mean)
    x_scale = torch.where(x_scale > 0, x_scale, torch.ones_like(x_scale))
    xs = (x - x_mean) / x_scale  # (n, V)
    chunks = _column_chunks(n_out, n)
    y_mean = torch.cat([y[:, c].double().mean(0) for c in chunks])  # (F,)

    def centred(c: slice) -> Tensor:
        return y[:, c].double() - y_mean[c]  # (n, f)

    dual = n < v
    gram = xs @ xs.T if dual else xs.T @ xs  # (n, n) or (V, V)
    eigval, eigvec = torch.linalg.eigh(gram)
    eigval = eigval.clamp_min(0)
    scale = eigval.sum() / min(n, v) if relative else 1.0
    grid = torch.tensor([float(a) for a in alphas], dtype=torch.float64, device=x.device) * scale
    if dual:
        basis, keep = eigvec, torch.ones_like(eigval, dtype=torch.bool)  # U: (n, n)
    else:
        keep = eigval > eigval.max() * 1e-12  # directions X̃ does not span have no effect on the fit
        basis = (xs @ eigvec[:, keep]) / eigval[keep].sqrt()  # U: (n, r) orthonormal
    lam = eigval[keep]

    target_gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)  # T = Y_c Y_cᵀ
    for c in chunks:
        yc = centred(c)
        target_gram += yc @ yc.T
    t_basis = target_gram @ basis  # (n, r)
    z = basis.T @ t_basis  # (r, r)
    loo = []
    for a in grid:
        shrunk = basis * (lam / (lam + a))  # U diag(f): (n, r), hat matrix H = shrunk @ Uᵀ
        leverage = 1.0 / n + (shrunk * basis).sum(1)  # (n,) diag of the full hat matrix
        # ||(I − H) Y_c||² per row: diag(T) − 2 diag(H T) + diag(H T H)
        resid = target_gram.diagonal() - 2 * (shrunk * t_basis).sum(1) + ((shrunk @ z) * shrunk).sum(1)
        loo.append((resid.clamp_min(0) / (1 - leverage).clamp_min(1e-12) ** 2).mean() / n_out)
    loo_mse = torch.stack(loo)
    best = int(loo_mse.argmin())
    alpha = grid[best]

    inv = 1.0 / (eigval + alpha)
    require(form != "dual" or dual, f"the dual form is stored only when n < V, got n={n}, V={v}")
    store_dual = form == "dual" or (form is None and dual and n * (v + n_out) < v * n_out)
    out = torch.empty(n if store_dual else v, n_out, dtype=dtype, device=x.device)
    for c in chunks:
        if dual:
            alpha_c = (eigvec * inv) @ (eigvec.T @ centred(c))  # (K + λI)⁻¹ Y_c: (n, f)
            out[:, c] = alpha_c if store_dual else xs.T @ alpha_c
        else:
            out[:, c] = (eigvec * inv) @ (eigvec.T @ (xs.T @ centred(c)))  # (X̃ᵀX̃ + λI)⁻¹ X̃ᵀ Y_c: (V, f)
    return RidgeSolution(
        alpha=float(alpha),
        alphas=grid,
        loo_mse=loo_mse,
        x_mean=x_mean.to(dtype),
        x_scale=x_scale.to(dtype),
        y_mean=y_mean.to(dtype),
        coef=None if store_dual else out,
        support=xs.to(dtype) if store_dual else None,
        dual_coef=out if store_dual else None,
    )


class SubjectRidge(nn.Module):
    """One subject's fitted ridge as buffers (so checkpoints hold it), float32; empty until :meth:`load`.

    The buffers' shapes depend on the data (n, V, F) and the stored form, so loading a state dict resizes
    them to what it holds (:meth:`_load_from_state_dict`): a fresh module loads any fitted checkpoint.
    """

    BUFFERS = ("x_mean", "x_scale", "y_mean", "coef", "support", "dual_coef")

    def __init__(self) -> None:
        super().__init__()
        for name in self.BUFFERS:
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("alpha", torch.zeros(()))

    @property
    def fitted(self) -> bool:
        return self.y_mean.numel() > 0

    def load(self, solution: RidgeSolution) -> None:
        """Keep a :func:`fit_ridge` solution (cast to float32, on this module's device)."""
        device = self.alpha.device
        for name in self.BUFFERS:
            value = getattr(solution, name)
            # A new tensor, not an in-place resize: wrappers such as DDP hold references to the old ones.
            setattr(
                self,
                name,
                torch.zeros(0, device=device) if value is None else value.to(device, torch.float32),
            )
        self.alpha = torch.tensor(solution.alpha, device=device)

    def forward(self, x: Tensor) -> Tensor:
        """(B, V) betas → (B, F) predictions."""
        xs = (x.float() - self.x_mean) / self.x_scale  # (B, V)
        if self.coef.numel():
            return xs @ self.coef + self.y_mean
        return (xs @ self.support.T) @ self.dual_coef + self.y_mean  # (B, n) @ (n, F)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in self.BUFFERS:
            if prefix + name in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name], device=self.alpha.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class RidgeDecoder(nn.Module):
    """Per-subject ridge maps from all of a subject's voxels (store order) to (T, D) target tokens.

    Args:
        n_voxels: subject → voxel count V_s.
    """

    def __init__(self, n_voxels: dict[int, int]) -> None:
        super().__init__()
        self.n_voxels = {int(s): int(v) for s, v in sorted(n_voxels.items())}
        self.subjects = nn.ModuleDict({str(s): SubjectRidge() for s in self.n_voxels})
        self.register_buffer("target_shape", torch.zeros(2, dtype=torch.long))  # (T, D), set by fit

    def fitted(self, subject: int) -> bool:
        return str(subject) in self.subjects and self.subjects[str(subject)].fitted

    def fit(
        self,
        subject: int,
        x: Tensor,
        y: Tensor,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        relative: bool = True,
    ) -> RidgeSolution:
        """Fit one subject: x (n, V_s) betas, y (n, T, D) targets → the solution (also kept as buffers)."""
        require(subject in self.n_voxels, f"subject {subject} is not one of {list(self.n_voxels)}")
        require(
            x.shape[1] == self.n_voxels[subject],
            f"subject {subject} has {self.n_voxels[subject]} voxels, got betas of {x.shape[1]}",
        )
        solution = fit_ridge(x, y.flatten(1), alphas, relative=relative)
        self.target_shape = torch.tensor(y.shape[1:], device=self.target_shape.device)
        self.subjects[str(subject)].load(solution)
        return solution

    def forward(self, x: Tensor, subject: int) -> Tensor:
        """(B, V_s) betas of ``subject`` (all its voxels, store order) → (B, T, D) predicted tokens."""
        require(
            self.fitted(subject), f"the ridge of subject {subject} is not fitted (run `brainit-pl fit` first)"
        )
        t, d = self.target_shape.tolist()
        return self.subjects[str(subject)](x).view(len(x), t, d)
