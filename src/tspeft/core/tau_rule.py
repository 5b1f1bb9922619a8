"""The τ rule: a Frank–Wolfe step on each module's kept fraction u, realised as a threshold τ.

Problem (per module m, trained jointly with the adapter; derivation in docs/method.md):

    min_{τ ≥ 0}  L(θ, τ)   s.t.  Σ_m N_m K_m(τ_m) = k* Σ_m N_m      (target mode; loss-driven: + price · kept)

K_m(τ) = kept fraction of real tokens at threshold τ. S = 1(r ≥ τ) has no gradient, so we change variables to
u_m = K_m(τ_m) (τ_m = Q_m(1 − u_m), the (1 − u)-quantile of r) and build each module's first-order loss curve
from every token's effect c_i = ⟨∂L/∂h_i, M(x_i)⟩ (loss change from keeping token i), tokens in order of r:

    F_m(u) = Σ_{i: rank_m(r_i) ≤ u N_m} c_i          (keep the top-u share by r)      F̂_m ← β F̂_m + (1 − β) F_m

                  F_m(u)
                    0 ┼──╮                  hull slopes s_mj (loss per unit kept) rise with u:
                      │   ╲__               the first tokens by r help most
                      │      ╲____
                      │           ‾‾‾──── u
                      0                 1

One step (after `warmup_steps` with τ = 0), with F̂_m (with `shrink_curves`: first pulled toward the pooled
per-token curve as far as its noise says, `shrink_to_pooled`, from the running mean of F_m²) replaced by its lower
convex hull on a grid of J segments:

    oracle u*:  target k_t:  take segments in increasing order of s_mj / N_m until Σ N_m u*_m = k_t Σ N_m
                loss-driven: take every segment with −s_mj / N_m ≥ λ · |Σ_m F̂_m(1)| / Σ_m N_m   (λ relative)
    u ← u + γ (u* − u), then (target mode) the exact projection onto {Σ N u = k_t Σ N, u_min ≤ u ≤ 1}
    k_t = k* + (1 − k*)(1 − t/T)³ for t = 1…T steps after the warm-up (T = ramp_steps)
    τ_m ← (1 − α) τ_m + α Q_m(1 − u_m);   τ_m = 0 when u_m = 1     (τ ≥ 0 always: r ≥ 0)

Controls through the same code: allocation "uniform" sets u_m = k_t (loss-driven: one u shared by all modules,
from the summed curve); selection "random" keeps each token with probability u_m, so F_m(u) = u · Σ_i c_i.
Histograms of log10 r and of c_i by r bin are sums, so they can be all-reduced across ranks.
"""

from __future__ import annotations

from typing import Callable

import torch

from .config import TokenSelectiveConfig
from .gate import GATE_STATE, TokenGate

AllReduce = Callable[[torch.Tensor], torch.Tensor]
COUNTS, CHANGES = 0, 1  # rows of the per-module statistics: token counts and Σ c_i per bin of log10 r


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


def loss_curves(counts: torch.Tensor, changes: torch.Tensor, points: int, random: bool) -> torch.Tensor:
    """F_m(u) at u = 0, 1/J, …, 1 from per-bin token counts and Σ c_i (modules, bins): tokens kept from the top bin
    down, linear inside a bin (its tokens share one r). Random selection keeps a random share: F(u) = u Σ c_i."""
    grid = torch.linspace(0.0, 1.0, points + 1, dtype=torch.float64).expand(counts.shape[0], -1).contiguous()
    total_change = changes.sum(-1, keepdim=True)
    if random:
        return grid * total_change
    real = counts.sum(-1, keepdim=True).clamp_min(1e-12)
    zero = counts.new_zeros(counts.shape[0], 1)
    kept = torch.cat([zero, torch.cumsum(counts.flip(-1), -1) / real], -1)  # share kept down to each bin edge
    cumulative = torch.cat([zero, torch.cumsum(changes.flip(-1), -1)], -1)
    index = torch.searchsorted(kept, grid).clamp_(1, kept.shape[-1] - 1)
    left, right = kept.gather(-1, index - 1), kept.gather(-1, index)
    inside = ((grid - left) / (right - left).clamp_min(1e-12)).clamp_(0.0, 1.0)
    low = cumulative.gather(-1, index - 1)
    return low + inside * (cumulative.gather(-1, index) - low)


def hull_slopes(curves: torch.Tensor) -> torch.Tensor:
    """Slopes (per unit kept fraction) of each curve's lower convex hull on its grid: (modules, J), non-decreasing.

    Pool-adjacent-violators on the segment slopes with equal segment lengths: merging two adjacent segments whose
    slopes fall replaces both by their mean, which is the hull of a piecewise-linear curve.
    """
    points = curves.shape[-1] - 1
    slopes = (curves.diff(dim=-1) * points).tolist()
    hulls = []
    for row in slopes:
        blocks: list[list[float]] = []  # [mean slope, length]
        for value in row:
            blocks.append([value, 1.0])
            while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
                value, length = blocks.pop()
                previous = blocks[-1]
                previous[0] = (previous[0] * previous[1] + value * length) / (previous[1] + length)
                previous[1] += length
        hulls.append([mean for mean, length in blocks for _ in range(int(length))])
    return torch.tensor(hulls, dtype=torch.float64).reshape(curves.shape[0], points)


def allocation_oracle(slopes: torch.Tensor, weights: torch.Tensor, config: TokenSelectiveConfig, target: float | None,
                      mean_benefit: float) -> torch.Tensor:
    """u* minimising Σ_m hull_m(u_m) (+ the price in loss-driven mode) over the budget, by water-filling.

    Segment (m, j) costs N_m / J tokens of budget and changes the loss by s_mj / J; its density s_mj / N_m is the
    loss change per token. Target mode takes the lowest densities until the budget is spent (segments tied at the
    cut share the rest equally); loss-driven mode takes every segment whose benefit per token −s_mj / N_m is at
    least λ · mean_benefit. Segments below u_min are always taken.
    """
    points = slopes.shape[-1]
    density = slopes / weights.clamp_min(1e-12).unsqueeze(-1)
    forced = torch.arange(points, dtype=torch.float64) < int(config.min_kept * points)
    density = torch.where(forced, torch.full_like(density, -torch.inf), density)
    cost = (weights.unsqueeze(-1) / points).expand_as(density)
    if target is None:
        taken = (-density >= config.sparsity_weight * mean_benefit).double()
        return taken.sum(-1) / points
    flat, flat_cost = density.flatten(), cost.flatten()
    order = torch.argsort(flat, stable=True)
    spent = torch.cumsum(flat_cost[order], 0)
    budget = target * float(weights.sum())
    budget_left = torch.tensor(budget, dtype=torch.float64) - 1e-9
    cut_index = int(torch.searchsorted(spent, budget_left).clamp(max=flat.numel() - 1))
    cut = flat[order[cut_index]]
    below, tied = density < cut, density == cut
    rest = budget - float((cost * below).sum())
    share = min(1.0, max(0.0, rest / max(float((cost * tied).sum()), 1e-12)))
    return (below.double() + share * tied.double()).sum(-1) / points


def shrink_to_pooled(curves: torch.Tensor, variances: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each module's running curve pulled toward the pooled per-token curve as far as its noise says (empirical Bayes).

    Per token, f_m = F̂_m / N_m and f̄ = Σ_m F̂_m / Σ_m N_m. With D_m = Σ_j (f_m(u_j) − f̄(u_j))² (deviation of the
    module from the pool) and S_m = Σ_j Var f_m(u_j) (the running mean's own variance), the normal-means posterior
    mean with the prior's spread estimated by moments (D_m − S_m) is f̄ + w_m (f_m − f̄), w_m = max(0, 1 − S_m / D_m):
    a module whose curve differs from the others by no more than its noise gets the pooled curve, so the oracle
    leaves it at the allocation the pool gives (uniform when every module is pooled); a module whose curve differs
    clearly keeps its own.
    """
    n = weights.clamp_min(1e-12).unsqueeze(-1)
    seen = (weights > 0).unsqueeze(-1)  # a module that saw no token this step keeps its old curve: not pooled
    per_token = curves / n
    pooled = torch.where(seen, curves, 0.0).sum(0, keepdim=True) / weights.sum().clamp_min(1e-12)
    deviation = (per_token - pooled).square().sum(-1)
    noise = (variances / n.square()).sum(-1)
    weight = (1 - noise / deviation.clamp_min(1e-300)).clamp(0.0, 1.0)
    return n * (pooled + weight.unsqueeze(-1) * (per_token - pooled))


def _new_allocation(old_u, curves, weights, config: TokenSelectiveConfig, step: int,
                    variances: torch.Tensor | None = None) -> torch.Tensor:
    """The allocation after one step (see the module docstring): oracle, Frank–Wolfe mixing, exact budget."""
    target = None if config.target_kept is None else scheduled_target(config, step)
    uniform = config.allocation == "uniform"
    if uniform and target is not None:
        return torch.full_like(old_u, target)
    mean_benefit = abs(float(curves[:, -1].sum())) / float(weights.sum())
    if uniform:  # loss-driven, one u for every module: the oracle on the summed curve
        shared = allocation_oracle(hull_slopes(curves.sum(0, keepdim=True)), weights.sum().reshape(1), config,
                                   None, mean_benefit)
        oracle = shared.expand_as(old_u)
    else:
        if config.shrink_curves and variances is not None:
            curves = shrink_to_pooled(curves, variances, weights)
        oracle = allocation_oracle(hull_slopes(curves), weights, config, target, mean_benefit)
    mixed = old_u + config.step_size * (oracle - old_u)
    if target is None:
        return mixed.clamp(config.min_kept, 1.0)
    return project_onto_budget(mixed, weights, target, config.min_kept)


def running_mean_variance(curves: torch.Tensor, squares: torch.Tensor, beta: float, step: int) -> torch.Tensor:
    """Variance of the running mean F̂ (in F̂'s own, uncorrected scale): the step curves' variance from the two
    running means (bias-corrected for their zero start), times (1 − β)/(1 + β), the variance of an exponential mean
    of independent steps relative to one step's."""
    kept_share = 1 - beta ** max(step, 1)  # the weight the running means have put on data so far
    mean, square = curves / kept_share, squares / kept_share
    step_variance = (square - mean.square()).clamp_min(0.0)
    return step_variance * (1 - beta) / (1 + beta) * kept_share ** 2


def slope_at(curves: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """∂F̂/∂u of each module's running curve at its current u (loss per unit kept fraction; > 0: keeping hurts)."""
    points = curves.shape[-1] - 1
    segment = (u * points).long().clamp(0, points - 1).unsqueeze(-1)
    return ((curves.gather(-1, segment + 1) - curves.gather(-1, segment)) * points).squeeze(-1)


def gather_statistics(gates: list[TokenGate], all_reduce: AllReduce | None) -> torch.Tensor:
    """(modules, 2, bins) on the CPU: rows COUNTS and CHANGES, summed over ranks; the gates' step statistics reset."""
    stats = torch.stack([torch.stack([g.r_histogram, g.change_histogram]) for g in gates])
    if all_reduce is not None:  # sums over ranks, so every rank computes the same τ
        stats = all_reduce(stats)
    for gate in gates:
        gate.clear_rule_stats()
    return stats.cpu()


@torch.no_grad()
def update_thresholds(gates: list[TokenGate], config: TokenSelectiveConfig, step: int,
                      all_reduce: AllReduce | None = None) -> None:
    """Apply one τ-rule step to every gate from the statistics gathered since the previous step.

    Every module is handled at once: one gather of the statistics and of the rule state, tensor arithmetic on
    (modules, …) arrays, one batched quantile call and one write-back (the gates share a device).
    """
    if not gates:
        return
    stats = gather_statistics(gates, all_reduce)
    counts, changes = stats[:, COUNTS], stats[:, CHANGES]
    real_count = counts.sum(-1)
    seen = real_count > 0  # a module that saw no real token keeps its state
    state_tensors = [getattr(g, field) for g in gates for field in GATE_STATE]
    state = torch.stack(state_tensors).reshape(len(gates), len(GATE_STATE)).double().cpu()
    old_tau, old_u, old_slope = state.unbind(1)  # GATE_STATE's order
    old_curves = torch.stack([g.loss_curve for g in gates]).cpu()
    old_squares = torch.stack([g.loss_curve_square for g in gates]).cpu()
    step_curves = loss_curves(counts, changes, config.curve_points, config.selection == "random")
    beta = config.slope_momentum
    curves = torch.where(seen.unsqueeze(-1), beta * old_curves + (1 - beta) * step_curves, old_curves)
    squares = torch.where(seen.unsqueeze(-1), beta * old_squares + (1 - beta) * step_curves.square(), old_squares)

    if step <= config.warmup_steps or not bool(seen.any()):
        new_u = old_u if step > config.warmup_steps else torch.ones_like(old_u)
    else:
        weights = torch.where(seen, real_count, torch.zeros_like(real_count))
        new_u = torch.where(seen, _new_allocation(old_u, curves, weights, config, step,
                                                  running_mean_variance(curves, squares, beta, step)), old_u)
    u = new_u
    tau_quantile = histogram_quantiles(counts, (1 - u).unsqueeze(1), config.log10_r_range).squeeze(1)
    finite = torch.isfinite(old_tau)
    alpha = torch.where(finite, config.tau_smoothing, 1.0)  # τ = inf (set by hand) restarts from the quantile
    smoothed = ((1 - alpha) * torch.where(finite, old_tau, 0.0) + alpha * tau_quantile).clamp_min(0.0)
    tau = torch.where(u >= 1.0, torch.zeros_like(smoothed), torch.where(seen, smoothed, old_tau))
    slope = torch.where(seen, slope_at(curves, u), old_slope)
    device = state_tensors[0].device
    new_state = torch.stack([tau, u, slope], 1)  # GATE_STATE's order
    torch._foreach_copy_(state_tensors, list(new_state.float().to(device).flatten().unbind()))
    torch._foreach_copy_([g.loss_curve for g in gates], list(curves.to(device).unbind()))
    torch._foreach_copy_([g.loss_curve_square for g in gates], list(squares.to(device).unbind()))


@torch.no_grad()
def calibrate_thresholds(gates: list[TokenGate], all_reduce: AllReduce | None = None) -> None:
    """τ_m = Q_m(1 − u_m) exactly (no smoothing) from the r histograms gathered since the last rule step, e.g. over
    batches run the way evaluation runs them; modules that saw no token keep their τ."""
    if not gates:
        return
    counts = gather_statistics(gates, all_reduce)[:, COUNTS]
    u = torch.stack([g.allocated_kept for g in gates]).double().cpu()
    tau = histogram_quantiles(counts, (1 - u).unsqueeze(1), gates[0].config.log10_r_range).squeeze(1)
    old_tau = torch.stack([g.tau.detach() for g in gates]).double().cpu()
    tau = torch.where(counts.sum(-1) > 0, torch.where(u >= 1.0, torch.zeros_like(tau), tau), old_tau)
    taus = [g.tau.data for g in gates]
    torch._foreach_copy_(taus, list(tau.float().to(taus[0].device).unbind()))
