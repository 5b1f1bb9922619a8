"""The τ rule: a proximal-gradient step on each module's kept fraction u, realised as a threshold τ.

Problem (per module m, trained jointly with the adapter; derivation in docs/method.md):

    min_{τ ≥ 0}  L(θ, τ) + λ · Σ_m K_m(τ_m),      K_m(τ) = kept fraction of real tokens at threshold τ

S = 1(r ≥ τ) has no gradient, so we change variables to u_m = K_m(τ_m) (τ_m = Q_m(1 − u_m), the
(1 − u)-quantile of r) and estimate the slope from first-order token effects:

    ∂L/∂u_m ≈ g_m = N_m · mean_{i ∈ band} c_i,    c_i = ⟨∂L/∂h_i, M(x_i)⟩   (loss change of keeping i)

over real tokens whose r lies in a band around τ_m. One step (after `warmup_steps` with τ = 0):

    ĝ_m ← β ĝ_m + (1 − β) g_m                                     running slope
    loss-driven:  u_m ← clip(u_m − η (ĝ_m + λ), u_min, 1)          prox of the box constraint
    target k*:    u ← Π{Σ_m N_m u_m = k_t Σ_m N_m, u_min ≤ u ≤ 1}(u − η ĝ)   prox of the budget constraint,
                  k_t = k* + (1 − k*)(1 − t/T)³ for t = 1…T steps after the warm-up (T = ramp_steps)
    τ_m ← (1 − α) τ_m + α Q_m(1 − u_m);   τ_m = 0 when u_m = 1     (τ ≥ 0 always: r ≥ 0)

Q_m comes from a histogram of log10 r, so every statistic is a sum and can be all-reduced across ranks.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .config import TokenSelectiveConfig
from .gate import TokenGate

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def histogram_quantile(histogram: torch.Tensor, q: float, log10_range: tuple[float, float]) -> float:
    """The q-quantile of r from a histogram of log10 r (linear interpolation inside a bin)."""
    total = float(histogram.sum())
    if total <= 0:
        return 0.0
    lo, hi = log10_range
    width = (hi - lo) / histogram.numel()
    cdf = torch.cumsum(histogram, 0) / total
    q = min(max(q, 0.0), 1.0)
    index = int(torch.searchsorted(cdf, torch.tensor(q, dtype=cdf.dtype)).clamp(max=histogram.numel() - 1))
    before = float(cdf[index - 1]) if index > 0 else 0.0
    inside = (q - before) / max(float(cdf[index]) - before, 1e-12)
    return 10 ** (lo + width * (index + min(max(inside, 0.0), 1.0)))


def project_onto_budget(u: torch.Tensor, weights: torch.Tensor, target: float, low: float) -> torch.Tensor:
    """Weighted Euclidean projection onto {Σ w u / Σ w = target, low ≤ u ≤ 1}: u' = clip(u − ν), ν by bisection."""
    weights = weights / weights.sum()
    nu_low, nu_high = float(u.min()) - 1.0, float(u.max()) + 1.0  # kept mean is 1 at nu_low and `low` at nu_high
    for _ in range(60):
        nu = 0.5 * (nu_low + nu_high)
        if float((weights * (u - nu).clamp(low, 1.0)).sum()) > target:
            nu_low = nu
        else:
            nu_high = nu
    return (u - 0.5 * (nu_low + nu_high)).clamp(low, 1.0)


def scheduled_target(config: TokenSelectiveConfig, step: int) -> float:
    """Kept target at `step`: 1 during the warm-up, then a cubic ramp down to `target_kept` over `ramp_steps`."""
    progress = min(1.0, max(0, step - config.warmup_steps) / max(config.ramp_steps, 1))
    return config.target_kept + (1.0 - config.target_kept) * (1.0 - progress) ** 3


@torch.no_grad()
def update_thresholds(gates: list[TokenGate], config: TokenSelectiveConfig, step: int,
                      all_reduce: AllReduce | None = None) -> None:
    """Apply one τ-rule step to every gate from the statistics gathered since the previous step."""
    if not gates:
        return
    stats = torch.cat([torch.cat([g.band_stats, g.r_histogram]) for g in gates]).reshape(len(gates), -1)
    if all_reduce is not None:  # sums over ranks, so every rank computes the same τ
        stats = all_reduce(stats)
    stats = stats.cpu()
    for gate in gates:
        gate.clear_rule_stats()
    band_sum, band_count, real_count, histograms = stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3:]

    if step <= config.warmup_steps:
        new_u = torch.ones(len(gates), dtype=torch.float64)
    else:
        slope = real_count * band_sum / band_count.clamp_min(1)
        seen = real_count > 0  # a module that saw no real token keeps its state
        old_u = torch.stack([g.kept_target.double().cpu() for g in gates])
        old_slope = torch.stack([g.loss_slope.double().cpu() for g in gates])
        beta = config.slope_momentum
        running = torch.where(seen, beta * old_slope + (1 - beta) * slope, old_slope)
        for gate, value in zip(gates, running):
            gate.loss_slope.fill_(float(value))
        if config.target_kept is None:
            new_u = (old_u - config.step_size * (running + config.sparsity_weight)).clamp(config.min_kept, 1.0)
        else:
            weights = torch.where(seen, real_count, torch.zeros_like(real_count))
            weights = weights if float(weights.sum()) > 0 else torch.ones_like(weights)
            new_u = project_onto_budget(old_u - config.step_size * running, weights,
                                        scheduled_target(config, step), config.min_kept)
        new_u = torch.where(seen, new_u, old_u)

    for gate, u, histogram, seen in zip(gates, new_u.tolist(), histograms, (real_count > 0).tolist()):
        gate.kept_target.fill_(u)
        if not seen:
            continue
        q = lambda p: histogram_quantile(histogram, p, config.log10_r_range)  # noqa: E731
        gate.band_low.fill_(q(1 - u - config.band))
        gate.band_high.fill_(q(1 - u + config.band) if u - config.band > 0 else float("inf"))
        if u >= 1.0:
            gate.tau.fill_(0.0)
        else:
            alpha = config.tau_smoothing if math.isfinite(float(gate.tau)) else 1.0  # τ = inf (set by hand) restarts
            gate.tau.fill_(max(0.0, (1 - alpha) * float(gate.tau) + alpha * q(1 - u)))
