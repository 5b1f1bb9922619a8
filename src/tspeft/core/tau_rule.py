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
from .gate import GATE_STATE, BandStats, TokenGate

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def histogram_quantiles(histograms: torch.Tensor, q: torch.Tensor, log10_range: tuple[float, float]) -> torch.Tensor:
    """Quantiles of r from histograms of log10 r, every module at once (linear interpolation inside a bin).

    `histograms` is (modules, bins) and `q` is (modules, k): entry [m, j] is the q[m, j]-quantile of module m's
    r, 0 for a module whose histogram is empty. One cumsum and one batched searchsorted for all modules.
    """
    histograms = histograms.double()
    lo, hi = log10_range
    bins = histograms.shape[-1]
    total = histograms.sum(-1, keepdim=True)
    cdf = torch.cumsum(histograms, -1) / torch.where(total > 0, total, torch.ones_like(total))
    q = q.double().clamp(0.0, 1.0)
    index = torch.searchsorted(cdf, q).clamp_(max=bins - 1)
    before = torch.where(index > 0, cdf.gather(-1, (index - 1).clamp(min=0)), torch.zeros_like(q))
    inside = ((q - before) / (cdf.gather(-1, index) - before).clamp_min(1e-12)).clamp_(0.0, 1.0)
    value = torch.pow(10.0, lo + (hi - lo) / bins * (index + inside))
    return torch.where(total > 0, value, torch.zeros_like(value))


def project_onto_budget(u: torch.Tensor, weights: torch.Tensor, target: float, low: float) -> torch.Tensor:
    """Weighted Euclidean projection onto {Σ w u / Σ w = target, low ≤ u ≤ 1}: u' = clip(u − ν, low, 1).

    f(ν) = Σ w clip(u − ν, low, 1) / Σ w is continuous, non-increasing and piecewise linear with breakpoints
    u_i − 1 (where module i starts to fall below 1) and u_i − low (where it reaches `low`). Sorting the
    breakpoints gives f at each of them from a cumulative sum of slopes; ν is the smallest point where f
    reaches `target`, interpolated exactly on its segment (the largest breakpoint when target < low).
    """
    u, weights = u.double(), weights.double()
    weights = weights / weights.sum()
    breaks, order = torch.sort(torch.cat([u - 1.0, u - low]))
    slope = torch.cumsum(torch.cat([-weights, weights])[order], 0)  # f's slope right of each breakpoint
    kept_at_first = (weights * (u - breaks[0]).clamp(low, 1.0)).sum()
    kept = kept_at_first + torch.cat([breaks.new_zeros(1), torch.cumsum(slope[:-1] * breaks.diff(), 0)])
    below = (kept <= target).nonzero()
    if below.numel() == 0:
        nu = breaks[-1]
    elif int(below[0]) == 0:
        nu = breaks[0]
    else:
        k = int(below[0])
        nu = breaks[k - 1] + (kept[k - 1] - target) * (breaks[k] - breaks[k - 1]) / (kept[k - 1] - kept[k])
    return (u - nu).clamp(low, 1.0)


def scheduled_target(config: TokenSelectiveConfig, step: int) -> float:
    """Kept target at `step`: 1 during the warm-up, then a cubic ramp down to `target_kept` over `ramp_steps`."""
    progress = min(1.0, max(0, step - config.warmup_steps) / max(config.ramp_steps, 1))
    return config.target_kept + (1.0 - config.target_kept) * (1.0 - progress) ** 3


@torch.no_grad()
def update_thresholds(gates: list[TokenGate], config: TokenSelectiveConfig, step: int,
                      all_reduce: AllReduce | None = None) -> None:
    """Apply one τ-rule step to every gate from the statistics gathered since the previous step.

    Every module is handled at once: one gather of the statistics and of the rule state, tensor arithmetic on a
    (modules,) vector, one batched quantile call and one write-back (the gates share a device).
    """
    if not gates:
        return
    stats = torch.cat([torch.stack([g.band_stats for g in gates]), torch.stack([g.r_histogram for g in gates])], 1)
    if all_reduce is not None:  # sums over ranks, so every rank computes the same τ
        stats = all_reduce(stats)
    stats = stats.cpu()
    for gate in gates:
        gate.clear_rule_stats()
    band, histograms = stats.split([len(BandStats._fields), stats.shape[1] - len(BandStats._fields)], 1)
    band_sum, band_count, real_count = band.unbind(1)  # BandStats' order
    state_tensors = [getattr(g, field) for g in gates for field in GATE_STATE]
    state = torch.stack(state_tensors).reshape(len(gates), len(GATE_STATE)).double().cpu()
    old_tau, old_u, old_slope, old_low, old_high = state.unbind(1)  # GATE_STATE's order
    seen = real_count > 0  # a module that saw no real token keeps its state

    if step <= config.warmup_steps:
        new_u, running = torch.ones_like(old_u), old_slope
    else:
        slope = real_count * band_sum / band_count.clamp_min(1)
        beta = config.slope_momentum
        running = torch.where(seen, beta * old_slope + (1 - beta) * slope, old_slope)
        if config.target_kept is None:
            new_u = (old_u - config.step_size * (running + config.sparsity_weight)).clamp(config.min_kept, 1.0)
        else:
            weights = torch.where(seen, real_count, torch.zeros_like(real_count))
            weights = weights if float(weights.sum()) > 0 else torch.ones_like(weights)
            new_u = project_onto_budget(old_u - config.step_size * running, weights,
                                        scheduled_target(config, step), config.min_kept)
        new_u = torch.where(seen, new_u, old_u)

    # Band edges and τ from one batched quantile call; τ_m = 0 where u_m = 1; unseen modules keep them.
    u, band = new_u, config.band
    band_low, band_high, tau_quantile = histogram_quantiles(
        histograms, torch.stack([1 - u - band, 1 - u + band, 1 - u], 1), config.log10_r_range).unbind(1)
    band_high = torch.where(u - band > 0, band_high, torch.full_like(band_high, math.inf))
    finite = torch.isfinite(old_tau)
    alpha = torch.where(finite, config.tau_smoothing, 1.0)  # τ = inf (set by hand) restarts from the quantile
    smoothed = ((1 - alpha) * torch.where(finite, old_tau, 0.0) + alpha * tau_quantile).clamp_min(0.0)
    tau = torch.where(u >= 1.0, torch.zeros_like(smoothed), smoothed)
    if_seen = lambda new, old: torch.where(seen, new, old)  # noqa: E731
    new_state = torch.stack([if_seen(tau, old_tau), u, running, if_seen(band_low, old_low),
                             if_seen(band_high, old_high)], 1)  # GATE_STATE's order
    device = state_tensors[0].device
    torch._foreach_copy_(state_tensors, list(new_state.float().to(device).flatten().unbind()))
