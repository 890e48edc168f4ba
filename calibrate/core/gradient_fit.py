"""A calibration vector fit by gradient descent with the model frozen (``direction.method=gradient``).

One vector v is added to the residual at one layer (last position); a differentiable *readout*
maps the edited residuals of some calibration rows to their option scores [R, K] (at the last
layer: the final norm and the option rows, or the full-vocabulary log-softmax for cloze; at an
earlier layer: the upper blocks first, see :mod:`calibrate.directions.gradient`). v minimises

    objective(softmax(scores), labels)                               nll | brier | soft_ece
    + norm_penalty · ||v / r||²                                       (r: mean residual norm there)
    + accuracy_penalty · mean_i max(0, max_{k≠ŷ_i} z_ik − z_iŷ_i)      (ŷ: the unsteered answer)

on the training part of the calibration split, optionally with ||v|| <= max_norm · r (projected
after each step). v = r·u and Adam runs on u with a per-coordinate step lr/√H, so one step moves
||v|| by about ``lr``·r at most: ``lr`` and ``max_norm`` are in units of the residual's own size. v starts at 0; full-batch steps; early stopping on a seeded held-out part
of the calibration split (the best held-out step is kept). With the same inputs and seed the
fit is the same (no sampling after the split).

The direction is v*/||v*||; ||v*|| is the η (absolute units) at which the fit is optimal. +η thus
moves the way that lowers the calibration loss: the sign convention of every method (+η is meant
to reduce over-confidence). When no step improves the held-out loss (v* = 0), the direction is
the normalised descent direction -∇ at v = 0 on the training part (flagged in the meta).

``soft_ece`` is a differentiable ECE with soft bin memberships: each example's top-label
confidence c_i belongs to bin b with weight softmax_b(-(c_i - centre_b)² / τ) (``n_bins``
centres at (b + ½)/M, τ = ``soft_ece_temperature``), and the loss is Σ_b |Σ_i m_ib (c_i − a_i)| / N
with a_i = 1[argmax = label] held constant (it is piecewise constant in v).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from calibrate import values
from calibrate.core.direction import Direction, DirectionError

OBJECTIVES = ("nll", "brier", "soft_ece")
CURVE_KEY = "loss_curve"  # Direction.meta key of the fit's loss curve (column -> list)

# readout(v [H], rows [R] long) -> option scores [R, K] (-inf where an example has no option k)
Readout = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class GradientSettings:
    """``direction.gradient``: the objective, the bound, the accuracy guard and the optimiser."""

    objective: str = "nll"              # nll | brier | soft_ece
    layer: int | None = None            # the layer v is added at; null: the steering layer
    max_norm: float | None = None       # ||v|| <= max_norm · r (projection); null: unbounded
    norm_penalty: float = 0.0           # weight of ||v / r||²
    accuracy_penalty: float = 0.0       # weight of the changed-answer hinge
    lr: float = 0.01                    # about the largest ||step|| of v, units of r
    max_steps: int = 200
    patience: int = 20                  # stop after this many steps without a better held-out loss
    holdout_fraction: float = 0.2       # share of the calibration split held out (0: no early stop)
    soft_ece_bins: int = 15
    soft_ece_temperature: float = 0.001

    def __post_init__(self) -> None:
        err, key = DirectionError, "direction.gradient."
        values.choice(key + "objective", self.objective, OBJECTIVES, err)
        values.optional_integer(key + "layer", self.layer, 0, err)
        if self.max_norm is not None:
            values.number(key + "max_norm", self.max_norm, lambda m: m > 0, "null or a number > 0",
                          err)
        for name in ("norm_penalty", "accuracy_penalty"):
            values.number(key + name, getattr(self, name), lambda w: w >= 0, "a number >= 0", err)
        values.number(key + "lr", self.lr, lambda lr: lr > 0, "a number > 0", err)
        for name in ("max_steps", "patience", "soft_ece_bins"):
            values.integer(key + name, getattr(self, name), 1, err)
        values.number(key + "holdout_fraction", self.holdout_fraction, lambda f: 0 <= f < 1,
                      "a number in [0, 1)", err)
        values.number(key + "soft_ece_temperature", self.soft_ece_temperature, lambda s: s > 0,
                      "a number > 0", err)


def _probs(scores: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores, dim=-1)  # -inf slots get probability 0


def objective_value(scores: torch.Tensor, labels: torch.Tensor, settings: GradientSettings) -> torch.Tensor:
    """The calibration objective of option scores [R, K] against labels [R] (a scalar)."""
    if settings.objective == "nll":
        return -torch.log_softmax(scores, dim=-1).gather(1, labels[:, None]).mean()
    probs = _probs(scores)
    if settings.objective == "brier":
        onehot = torch.nn.functional.one_hot(labels, scores.shape[-1]).to(probs.dtype)
        return ((probs - onehot) ** 2).sum(-1).mean()
    conf, pred = probs.max(dim=-1)
    correct = (pred == labels).to(probs.dtype).detach()
    return soft_ece(conf, correct, settings.soft_ece_bins, settings.soft_ece_temperature)


def soft_ece(conf: torch.Tensor, correct: torch.Tensor, n_bins: int, temperature: float) -> torch.Tensor:
    """Soft-binned ECE (module docstring): Σ_b |Σ_i m_ib (c_i − a_i)| / N."""
    centres = (torch.arange(n_bins, dtype=conf.dtype, device=conf.device) + 0.5) / n_bins
    member = torch.softmax(-(conf[:, None] - centres[None]) ** 2 / temperature, dim=1)  # [R, M]
    gaps = (member * (conf - correct)[:, None]).sum(0) / conf.shape[0]
    return gaps.abs().sum()


def changed_answer_penalty(scores: torch.Tensor, base_pred: torch.Tensor) -> torch.Tensor:
    """mean_i max(0, max_{k≠ŷ_i} z_ik − z_iŷ_i): zero while every answer stays the unsteered one."""
    own = scores.gather(1, base_pred[:, None])[:, 0]
    others = scores.scatter(1, base_pred[:, None], float("-inf")).max(dim=1).values
    return torch.relu(others - own).mean()


@dataclass
class GradientFit:
    """The fitted vector, its direction and the loss curve."""

    vector: np.ndarray          # v* [H] float64 (absolute units)
    direction: Direction        # v*/||v*||
    curve: pd.DataFrame         # step, train_loss, train_objective, holdout_loss, holdout_objective, norm


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, holdout) positions 0..n-1; no holdout with fraction 0 or too few rows."""
    n_hold = int(round(n * fraction))
    if fraction == 0 or n_hold < 1 or n - n_hold < 1:
        return np.arange(n), np.arange(0)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def total_loss(readout: Readout, v: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor,
               base_pred: torch.Tensor, settings: GradientSettings, scale: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(penalised loss, objective alone) of the vector ``v`` on ``rows``."""
    scores = readout(v, rows)
    obj = objective_value(scores, labels[rows], settings)
    loss = obj
    if settings.norm_penalty:
        loss = loss + settings.norm_penalty * (v / scale).pow(2).sum()
    if settings.accuracy_penalty:
        loss = loss + settings.accuracy_penalty * changed_answer_penalty(scores, base_pred[rows])
    return loss, obj


def fit_vector(readout: Readout, hidden: int, labels: np.ndarray, settings: GradientSettings,
               scale: float, seed: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> GradientFit:
    """Fit v by Adam on the training part of ``labels``' rows, early-stopped on the held-out part."""
    if not np.isfinite(scale) or scale <= 0:
        raise DirectionError(f"direction.method=gradient: the residual scale is {scale!r}")
    torch.manual_seed(seed)
    n = len(labels)
    train_np, hold_np = holdout_split(n, settings.holdout_fraction, seed)
    train = torch.as_tensor(train_np, dtype=torch.long, device=device)
    hold = torch.as_tensor(hold_np, dtype=torch.long, device=device)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    u = torch.zeros(hidden, dtype=dtype, device=device, requires_grad=True)
    with torch.no_grad():
        base_pred = readout(torch.zeros(hidden, dtype=dtype, device=device),
                            torch.arange(n, device=device)).argmax(-1)
    # Adam steps each coordinate by about lr_adam; lr / sqrt(H) makes ||step|| about lr (units of r)
    optimiser = torch.optim.Adam([u], lr=settings.lr / np.sqrt(hidden))
    rows: list[dict[str, float]] = []
    best = (np.inf, 0, torch.zeros_like(u), np.nan)
    first_grad = None
    since_best = 0
    for step in range(int(settings.max_steps) + 1):
        optimiser.zero_grad()
        loss, obj = total_loss(readout, u * scale, train, y, base_pred, settings, scale)
        if step < settings.max_steps:
            loss.backward()
        if first_grad is None:
            first_grad = u.grad.detach().clone() if u.grad is not None else None
        with torch.no_grad():
            if len(hold):
                h_loss, h_obj = total_loss(readout, u * scale, hold, y, base_pred, settings, scale)
                h_loss, h_obj = float(h_loss), float(h_obj)
            else:
                h_loss, h_obj = float(loss.detach()), float(obj.detach())
        rows.append({"step": step, "train_loss": float(loss.detach()),
                     "train_objective": float(obj.detach()),
                     "holdout_loss": h_loss if len(hold) else float("nan"),
                     "holdout_objective": h_obj if len(hold) else float("nan"),
                     "norm": float(u.detach().norm()) * scale})
        criterion = h_loss
        if criterion < best[0] - 1e-12:
            best, since_best = (criterion, step, u.detach().clone(), h_obj), 0
        else:
            since_best += 1
        if step == settings.max_steps or (len(hold) and since_best >= settings.patience):
            break
        optimiser.step()
        if settings.max_norm is not None:
            with torch.no_grad():
                norm = u.norm()
                if norm > settings.max_norm:
                    u.mul_(settings.max_norm / norm)
    vector = (best[2] * scale).double().cpu().numpy()
    norm = float(np.linalg.norm(vector))
    improved = norm > 0.0
    if improved:
        unit = vector / norm
    else:  # no step beat v = 0 on the held-out part: the steepest descent direction at 0
        if first_grad is None or float(first_grad.norm()) == 0.0:
            raise DirectionError("direction.method=gradient: the objective's gradient is zero at "
                                 "v = 0; nothing to fit")
        unit = -(first_grad.double().cpu().numpy())
        unit = unit / np.linalg.norm(unit)
    curve = pd.DataFrame(rows)
    meta = {
        "method": "gradient", "hidden": int(hidden), "gradient": asdict(settings),
        "residual_scale": float(scale), "raw_norm": norm, "eta_fit": norm,
        "best_step": int(best[1]), "steps_run": int(curve["step"].max()),
        "n_train": int(len(train_np)), "n_holdout": int(len(hold_np)),
        "holdout_improved": bool(improved),
        "loss_start": float(curve["holdout_objective" if len(hold_np) else "train_objective"].iloc[0]),
        "loss_best": float(best[3]),
        "sign": "v*/|v*|: +eta lowers the calibration objective (eta_fit = |v*| is the fitted optimum)",
    }
    return GradientFit(vector, Direction(unit, meta), curve)


def curve_of(direction: Direction) -> pd.DataFrame | None:
    """The loss curve a gradient fit left in ``direction.meta`` (None for other methods)."""
    curve = direction.meta.get(CURVE_KEY)
    return None if not curve else pd.DataFrame(curve)
