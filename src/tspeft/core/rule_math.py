"""The τ rule's host arithmetic, in numpy on fp64 arrays of shape (modules, …) (the formulas: tau_rule.py).

    statistics (modules, 2, bins) ─► loss_curves ─► hull_slopes ─► allocation_oracle ─► project_onto_budget ─► u
    r histograms ─► histogram_quantiles(1 − u) ─► τ

The rule runs once per optimizer step on a few small arrays per module; numpy's per-call cost is a fraction of
torch's CPU dispatch, which made a torch version of these ~200 small operations the largest fixed cost of a
step for small layers. `tau_rule.py` exposes each function with torch tensors in and out.
"""

from __future__ import annotations

import functools

import numpy as np

from .config import TokenSelectiveConfig


def _take(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """take_along_axis on the last axis of (rows, n) `values` with (rows, k) `index`, by one fancy index."""
    return values[np.arange(values.shape[0])[:, None], index]


def _search_rows(sorted_rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per row, the first index with sorted_rows[i] ≥ value (searchsorted, left; `values` (rows, k) or (k,)), for every
    row at once: in an ascending row that is the count of entries not ≥ the value (a NaN value: all of them)."""
    at_least = np.count_nonzero(sorted_rows[:, None, :] >= values[..., None], axis=-1)  # (rows, k) either way
    return sorted_rows.shape[-1] - at_least


def _search_grid(sorted_rows: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """`_search_rows` for one strictly increasing `grid` shared by every row, in O(rows × (entries + grid)): entry
    e lies below grid[j] exactly when j ≥ searchsorted(grid, e, right), so the index of grid[j] in a row is the
    count of the row's entries whose grid position is ≤ j, a cumulative sum of their per-row bincount."""
    rows, slots = sorted_rows.shape[0], grid.shape[0] + 1
    position = np.searchsorted(grid, sorted_rows, side="right")  # 0 … len(grid)
    offsets = (np.arange(rows) * slots)[:, None]
    per_slot = np.bincount((position + offsets).ravel(), minlength=rows * slots).reshape(rows, slots)
    return np.cumsum(per_slot[:, :-1], -1)


def histogram_quantiles(histograms: np.ndarray, q: np.ndarray, log10_range: tuple[float, float]) -> np.ndarray:
    lo, hi = log10_range
    bins = histograms.shape[-1]
    cumulative = histograms.cumsum(-1)  # ndarray methods and ufuncs below: no numpy Python wrappers per call
    total = cumulative[:, -1:]  # not a separate sum: the cdf then ends at exactly 1
    cdf = cumulative / np.where(total > 0, total, 1.0)
    q = np.minimum(np.maximum(q, 0.0), 1.0)  # = np.clip, NaN included
    index = np.minimum(_search_rows(cdf, q), bins - 1)
    before = np.where(index > 0, _take(cdf, np.maximum(index - 1, 0)), 0.0)
    inside = np.minimum(np.maximum((q - before) / np.maximum(_take(cdf, index) - before, 1e-12), 0.0), 1.0)
    value = 10.0 ** (lo + (hi - lo) / bins * (index + inside))
    return np.where(total > 0, value, 0.0)


def budget_multiplier(points: np.ndarray, slope_changes: np.ndarray, kept_at_first: float, target: float) -> float:
    """The ν at which a non-increasing piecewise-linear kept(ν) meets `target`: kept is `kept_at_first` at the smallest
    of `points` and its slope changes by `slope_changes[i]` at `points[i]`; the first (last) point when the target
    lies above (below) every breakpoint's value."""
    order = np.argsort(points, kind="stable")
    breaks = points[order]
    slope = np.cumsum(slope_changes[order])  # kept's slope right of each breakpoint
    kept = kept_at_first + np.concatenate([[0.0], np.cumsum(slope[:-1] * np.diff(breaks))])
    below = np.flatnonzero(kept <= target)
    if below.size == 0:
        return breaks[-1]
    if below[0] == 0:
        return breaks[0]
    k = int(below[0])
    return breaks[k - 1] + (kept[k - 1] - target) * (breaks[k] - breaks[k - 1]) / (kept[k - 1] - kept[k])


def project_onto_budget(u: np.ndarray, weights: np.ndarray, target: float, low: float) -> np.ndarray:
    weights = weights / weights.sum()
    points = np.concatenate([u - 1.0, u - low])
    kept_at_first = (weights * np.clip(u - points.min(), low, 1.0)).sum()
    nu = budget_multiplier(points, np.concatenate([-weights, weights]), kept_at_first, target)
    return np.clip(u - nu, low, 1.0)


def scheduled_target(config: TokenSelectiveConfig, step: int) -> float:
    progress = min(1.0, max(0, step - config.warmup_steps) / max(config.ramp_steps, 1))
    return config.target_kept + (1.0 - config.target_kept) * (1.0 - progress) ** 3


@functools.lru_cache(maxsize=8)
def _grid(points: int) -> np.ndarray:
    grid = np.linspace(0.0, 1.0, points + 1)
    grid.flags.writeable = False  # shared by every call
    return grid


def loss_curves(counts: np.ndarray, changes: np.ndarray, points: int, random: bool) -> np.ndarray:
    grid = _grid(points)
    total_change = changes.sum(-1, keepdims=True)
    if random:
        return grid * total_change
    real = np.maximum(counts.sum(-1, keepdims=True), 1e-12)
    zero = np.zeros((counts.shape[0], 1))
    kept = np.concatenate([zero, counts[:, ::-1].cumsum(-1) / real], -1)  # share kept down to each bin edge
    cumulative = np.concatenate([zero, changes[:, ::-1].cumsum(-1)], -1)
    index = np.minimum(np.maximum(_search_grid(kept, grid), 1), kept.shape[-1] - 1)
    left, right = _take(kept, index - 1), _take(kept, index)
    inside = np.minimum(np.maximum((grid - left) / np.maximum(right - left, 1e-12), 0.0), 1.0)
    low = _take(cumulative, index - 1)
    return low + inside * (_take(cumulative, index) - low)


def hull_slopes(curves: np.ndarray) -> np.ndarray:
    """The isotonic (pool-adjacent-violators) slopes by the max–min formula, every module at once: with equal
    segments the pooled slope at i is max_{a ≤ i} min_{b ≥ i} (F_{b+1} − F_a)·J / (b + 1 − a). O(J²) per module
    in chunks of rows; rows with a non-finite value take the pool-adjacent-violators loop (NaN pools differently)."""
    points = curves.shape[-1] - 1
    slopes = np.empty((curves.shape[0], points))
    finite = np.isfinite(curves).all(-1)
    rows = np.flatnonzero(finite)
    chunk = max(1, (1 << 20) // (points * points))
    for start in range(0, rows.size, chunk):
        part = rows[start:start + chunk]
        slopes[part] = _max_min_slopes(curves[part], points)
    for row in np.flatnonzero(~finite):
        slopes[row] = _pool_adjacent_violators(np.diff(curves[row]) * points)
    return slopes


def _max_min_slopes(curves: np.ndarray, points: int) -> np.ndarray:
    first = np.arange(points)
    span = first[None, :] - first[:, None] + 1  # [a, b]: segments a … b, ≤ 0 when b < a
    means = (curves[:, None, 1:] - curves[:, :-1, None]) * points / np.maximum(span, 1)
    means = np.where(span > 0, means, np.inf)
    # [m, a, i] = min over b ≥ i of the mean from a to b (for i ≥ a every such b is ≥ a)
    suffix_min = np.minimum.accumulate(means[..., ::-1], -1)[..., ::-1]
    return np.where(span > 0, suffix_min, -np.inf).max(1)


def _pool_adjacent_violators(row_slopes: np.ndarray) -> np.ndarray:
    blocks: list[list[float]] = []  # [mean slope, length]
    for value in row_slopes.tolist():
        blocks.append([value, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            value, length = blocks.pop()
            previous = blocks[-1]
            previous[0] = (previous[0] * previous[1] + value * length) / (previous[1] + length)
            previous[1] += length
    return np.array([mean for mean, length in blocks for _ in range(int(length))], dtype=np.float64)


def allocation_oracle(slopes: np.ndarray, weights: np.ndarray, config: TokenSelectiveConfig, target: float | None,
                      mean_benefit: float) -> np.ndarray:
    points = slopes.shape[-1]
    density = slopes / np.maximum(weights, 1e-12)[:, None]
    forced = np.arange(points) < int(config.min_kept * points)
    density = np.where(forced, -np.inf, density)
    cost = np.broadcast_to(weights[:, None] / points, density.shape)
    if target is None:
        return (-density >= config.sparsity_weight * mean_benefit).sum(-1) / points
    if config.allocation_prior > 0:
        return prior_oracle(density, weights, target, config.allocation_prior * max(mean_benefit, 1e-300))
    flat, flat_cost = density.ravel(), cost.ravel()
    order = np.argsort(flat, kind="stable")
    spent = np.cumsum(flat_cost[order])
    budget = target * float(weights.sum())
    cut_index = min(int(np.searchsorted(spent, budget - 1e-9, side="left")), flat.size - 1)
    cut = flat[order[cut_index]]
    below, tied = density < cut, density == cut
    rest = budget - float((cost * below).sum())
    share = min(1.0, max(0.0, rest / max(float((cost * tied).sum()), 1e-12)))
    return (below + share * tied).sum(-1) / points


def prior_oracle(density: np.ndarray, weights: np.ndarray, target: float, mu: float) -> np.ndarray:
    """argmin Σ_m N_m [f_m(u_m) + μ/2 (u_m − k)²] s.t. Σ_m N_m u_m = k Σ_m N_m, f_m piecewise linear and convex
    with per-token slopes `density` (modules, J) on the grid j/J. For a multiplier ν each module's minimiser is
    u_m(ν) = Σ_j clip((b_mj − ν)/μ, 0, 1/J) with b_mj = μ (k − j/J) − d_mj (segment j is filled as far as the
    quadratic lets it). The kept mean Σ N u(ν) / Σ N is piecewise linear and falls in ν, with breakpoints
    b_mj − μ/J and b_mj: ν is found exactly (`budget_multiplier`, as for `project_onto_budget`)."""
    points = density.shape[-1]
    share = np.broadcast_to((weights / max(float(weights.sum()), 1e-300))[:, None], density.shape)
    ends = mu * (target - np.arange(points) / points) - density  # b_mj; +inf for forced segments (-inf density)
    free = np.isfinite(ends)  # a forced segment (below u_min) is always filled
    if not free.any():
        nu = 0.0
    else:
        starts = ends[free] - mu / points
        weight = share[free] / mu
        nu = budget_multiplier(np.concatenate([starts, ends[free]]), np.concatenate([-weight, weight]),
                               float(share.sum()) / points, target)
    return np.clip((ends - nu) / mu, 0.0, 1.0 / points).sum(-1)


def shrink_to_pooled(curves: np.ndarray, variances: np.ndarray, weights: np.ndarray) -> np.ndarray:
    n = np.maximum(weights, 1e-12)[:, None]
    seen = (weights > 0)[:, None]  # a module that saw no token this step keeps its old curve: not pooled
    per_token = curves / n
    pooled = np.where(seen, curves, 0.0).sum(0, keepdims=True) / max(float(weights.sum()), 1e-12)
    deviation = ((per_token - pooled) ** 2).sum(-1)
    noise = (variances / n ** 2).sum(-1)
    weight = np.clip(1 - noise / np.maximum(deviation, 1e-300), 0.0, 1.0)
    return n * (pooled + weight[:, None] * (per_token - pooled))


def running_mean_variance(curves: np.ndarray, squares: np.ndarray, beta: float, step: int) -> np.ndarray:
    """Variance of the running mean F̂ (in F̂'s own, uncorrected scale): the step curves' variance from the two
    running means (bias-corrected for their zero start), times (1 − β)/(1 + β), the variance of an exponential mean
    of independent steps relative to one step's."""
    kept_share = 1 - beta ** max(step, 1)  # the weight the running means have put on data so far
    mean, square = curves / kept_share, squares / kept_share
    step_variance = np.maximum(square - mean ** 2, 0.0)
    return step_variance * (1 - beta) / (1 + beta) * kept_share ** 2


def new_allocation(old_u: np.ndarray, curves: np.ndarray, weights: np.ndarray, config: TokenSelectiveConfig,
                   step: int, variances: np.ndarray | None = None) -> np.ndarray:
    """The allocation after one step: oracle, Frank–Wolfe mixing, exact budget (tau_rule.py's docstring)."""
    target = None if config.target_kept is None else scheduled_target(config, step)
    uniform = config.allocation == "uniform"
    if uniform and target is not None:
        return np.full_like(old_u, target)
    mean_benefit = abs(float(curves[:, -1].sum())) / float(weights.sum())
    if uniform:  # loss-driven, one u for every module: the oracle on the summed curve
        shared = allocation_oracle(hull_slopes(curves.sum(0, keepdims=True)), np.array([weights.sum()]), config,
                                   None, mean_benefit)
        oracle = np.broadcast_to(shared, old_u.shape)
    else:
        if config.shrink_curves and variances is not None:
            curves = shrink_to_pooled(curves, variances, weights)
        oracle = allocation_oracle(hull_slopes(curves), weights, config, target, mean_benefit)
    mixed = old_u + config.step_size * (oracle - old_u)
    if target is None:
        return np.clip(mixed, config.min_kept, 1.0)
    return project_onto_budget(mixed, weights, target, config.min_kept)


def slope_at(curves: np.ndarray, u: np.ndarray) -> np.ndarray:
    points = curves.shape[-1] - 1
    segment = np.clip((u * points).astype(np.int64), 0, points - 1)[:, None]
    return ((_take(curves, segment + 1) - _take(curves, segment)) * points)[:, 0]


def rule_step(stats: np.ndarray, state: np.ndarray, old_curves: np.ndarray, old_squares: np.ndarray,
              config: TokenSelectiveConfig, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One τ-rule step on the host: (statistics (modules, 2, bins), state (modules, 3) as GATE_STATE, running
    curves and running squared curves) → (new state, curves, squares). A module that saw no real token keeps its
    state."""
    counts, changes = stats[:, 0], stats[:, 1]
    real_count = counts.sum(-1)
    seen = real_count > 0
    old_tau, old_u, old_slope = state.T  # GATE_STATE's order
    step_curves = loss_curves(counts, changes, config.curve_points, config.selection == "random")
    beta = config.slope_momentum
    curves = np.where(seen[:, None], beta * old_curves + (1 - beta) * step_curves, old_curves)
    squares = np.where(seen[:, None], beta * old_squares + (1 - beta) * step_curves ** 2, old_squares)
    if step <= config.warmup_steps or not seen.any():
        u = old_u if step > config.warmup_steps else np.ones_like(old_u)
    else:
        weights = np.where(seen, real_count, 0.0)
        variances = running_mean_variance(curves, squares, beta, step)
        u = np.where(seen, new_allocation(old_u, curves, weights, config, step, variances), old_u)
    tau_quantile = histogram_quantiles(counts, (1 - u)[:, None], config.log10_r_range)[:, 0]
    finite = np.isfinite(old_tau)
    alpha = np.where(finite, config.tau_smoothing, 1.0)  # τ = inf (set by hand) restarts from the quantile
    smoothed = np.maximum((1 - alpha) * np.where(finite, old_tau, 0.0) + alpha * tau_quantile, 0.0)
    tau = np.where(u >= 1.0, 0.0, np.where(seen, smoothed, old_tau))
    slope = np.where(seen, slope_at(curves, u), old_slope)
    return np.stack([tau, u, slope], 1), curves, squares
