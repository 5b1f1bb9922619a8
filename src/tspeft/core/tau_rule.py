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
Histograms of log10 r and of c_i by r bin are sums, so they can be all-reduced across ranks. The arithmetic runs
on the host in numpy (rule_math.py); the functions below take and return torch tensors.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from . import rule_math
from .config import TokenSelectiveConfig
from .gate import GATE_STATE, TokenGate

AllReduce = Callable[[torch.Tensor], torch.Tensor]
COUNTS, CHANGES = 0, 1  # rows of the per-module statistics: token counts and Σ c_i per bin of log10 r


def _host(values) -> np.ndarray:
    return values.detach().double().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)


def histogram_quantiles(histograms: torch.Tensor, q: torch.Tensor, log10_range: tuple[float, float]) -> torch.Tensor:
    """Quantiles of r from histograms of log10 r, every module at once (linear interpolation inside a bin).

    `histograms` is (modules, bins) and `q` is (modules, k): entry [m, j] is the q[m, j]-quantile of module m's
    r, 0 for a module whose histogram is empty.
    """
    return torch.from_numpy(rule_math.histogram_quantiles(_host(histograms), _host(q), log10_range))


def project_onto_budget(u: torch.Tensor, weights: torch.Tensor, target: float, low: float) -> torch.Tensor:
    """Weighted Euclidean projection onto {Σ w u / Σ w = target, low ≤ u ≤ 1}: u' = clip(u − ν, low, 1).

    f(ν) = Σ w clip(u − ν, low, 1) / Σ w is continuous, non-increasing and piecewise linear with breakpoints
    u_i − 1 (where module i starts to fall below 1) and u_i − low (where it reaches `low`). Sorting the
    breakpoints gives f at each of them from a cumulative sum of slopes; ν is the smallest point where f
    reaches `target`, interpolated exactly on its segment (the largest breakpoint when target < low).
    """
    return torch.from_numpy(rule_math.project_onto_budget(_host(u), _host(weights), target, low))


def scheduled_target(config: TokenSelectiveConfig, step: int) -> float:
    """Kept target at `step`: 1 during the warm-up, then a cubic ramp down to `target_kept` over `ramp_steps`."""
    return rule_math.scheduled_target(config, step)


def loss_curves(counts: torch.Tensor, changes: torch.Tensor, points: int, random: bool) -> torch.Tensor:
    """F_m(u) at u = 0, 1/J, …, 1 from per-bin token counts and Σ c_i (modules, bins): tokens kept from the top bin
    down, linear inside a bin (its tokens share one r). Random selection keeps a random share: F(u) = u Σ c_i."""
    return torch.from_numpy(rule_math.loss_curves(_host(counts), _host(changes), points, random))


def hull_slopes(curves: torch.Tensor) -> torch.Tensor:
    """Slopes (per unit kept fraction) of each curve's lower convex hull on its grid: (modules, J), non-decreasing.

    Pool-adjacent-violators on the segment slopes with equal segment lengths: merging two adjacent segments whose
    slopes fall replaces both by their mean, which is the hull of a piecewise-linear curve.
    """
    return torch.from_numpy(rule_math.hull_slopes(_host(curves)))


def allocation_oracle(slopes: torch.Tensor, weights: torch.Tensor, config: TokenSelectiveConfig, target: float | None,
                      mean_benefit: float) -> torch.Tensor:
    """u* minimising Σ_m hull_m(u_m) (+ the price in loss-driven mode) over the budget, by water-filling.

    Segment (m, j) costs N_m / J tokens of budget and changes the loss by s_mj / J; its density s_mj / N_m is the
    loss change per token. Target mode takes the lowest densities until the budget is spent (segments tied at the
    cut share the rest equally); loss-driven mode takes every segment whose benefit per token −s_mj / N_m is at
    least λ · mean_benefit. Segments below u_min are always taken.
    """
    return torch.from_numpy(np.asarray(rule_math.allocation_oracle(_host(slopes), _host(weights), config, target,
                                                                   mean_benefit), dtype=np.float64))


def shrink_to_pooled(curves: torch.Tensor, variances: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each module's running curve pulled toward the pooled per-token curve as far as its noise says (empirical Bayes).

    Per token, f_m = F̂_m / N_m and f̄ = Σ_m F̂_m / Σ_m N_m. With D_m = Σ_j (f_m(u_j) − f̄(u_j))² (deviation of the
    module from the pool) and S_m = Σ_j Var f_m(u_j) (the running mean's own variance), the normal-means posterior
    mean with the prior's spread estimated by moments (D_m − S_m) is f̄ + w_m (f_m − f̄), w_m = max(0, 1 − S_m / D_m):
    a module whose curve differs from the others by no more than its noise gets the pooled curve, so the oracle
    leaves it at the allocation the pool gives (uniform when every module is pooled); a module whose curve differs
    clearly keeps its own.
    """
    return torch.from_numpy(rule_math.shrink_to_pooled(_host(curves), _host(variances), _host(weights)))


def to_host(parts: list[torch.Tensor | list[torch.Tensor]]) -> list[np.ndarray]:
    """fp64 numpy copies of `parts` by one device-to-host copy per device they live on (one sync on a GPU): the
    parts' flat values in one `torch.cat` (which promotes dtypes), copied, then split on the host. A list of
    equal-shaped tensors comes back as one array stacked along a new first axis, with no stack on the device."""
    pieces = [part if isinstance(part, list) else [part] for part in parts]
    host: list[np.ndarray | None] = [None] * len(parts)
    for device in dict.fromkeys(group[0].device for group in pieces):
        chosen = [i for i, group in enumerate(pieces) if group[0].device == device]
        flat = [t if t.dim() == 1 else t.reshape(-1) for i in chosen for t in pieces[i]]
        packed = torch.cat(flat).to("cpu", torch.float64, copy=True).numpy()
        offset = 0
        for i in chosen:
            shape = (len(parts[i]), *parts[i][0].shape) if isinstance(parts[i], list) else tuple(parts[i].shape)
            size = int(np.prod(shape))
            host[i] = packed[offset:offset + size].reshape(shape)
            offset += size
    return host


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a sync: through pinned memory, non-blocking, on a GPU."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _read_rule_inputs(gates: list[TokenGate], all_reduce: AllReduce | None,
                      extra: list[torch.Tensor | list[torch.Tensor]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(statistics (modules, 2, bins): rows COUNTS and CHANGES summed over ranks, `extra` parts), all on the host
    from one device read; then the gates' step statistics reset (one `_foreach_zero_` for every gate)."""
    histograms = [h for g in gates for h in (g._buffers["r_histogram"], g._buffers["change_histogram"])]
    stats: torch.Tensor | list[torch.Tensor] = histograms
    if all_reduce is not None:  # sums over ranks, so every rank computes the same τ
        stats = all_reduce(torch.stack(histograms).view(len(gates), 2, -1))
    host_stats, *rest = to_host([stats, *extra])  # stats reduced by gloo are on the host already
    torch._foreach_zero_(histograms)
    return host_stats.reshape(len(gates), 2, -1), rest


@torch.no_grad()
def update_thresholds(gates: list[TokenGate], config: TokenSelectiveConfig, step: int | torch.Tensor,
                      all_reduce: AllReduce | None = None) -> None:
    """Apply one τ-rule step to every gate from the statistics gathered since the previous step.

    Every module is handled at once: the statistics, the rule state and `step` (a count or the model's step
    buffer) are read in one device-to-host copy, the arithmetic runs on the host in numpy on (modules, …)
    arrays (rule_math.rule_step), and the new state is written back by one host-to-device copy without a sync
    (pinned, non-blocking) and one `_foreach_copy_`: one sync per call on a GPU, a fixed number of tensor
    operations whatever the number of modules.
    """
    if not gates:
        return
    buffers = [g._buffers for g in gates]  # dict lookups, not nn.Module.__getattr__, per module
    state_tensors = [b[field] for b in buffers for field in GATE_STATE]
    step_tensor = step if isinstance(step, torch.Tensor) else torch.tensor(step)
    running = [b["loss_curve"] for b in buffers] + [b["loss_curve_square"] for b in buffers]
    stats, (state, old_running, step_read) = _read_rule_inputs(
        gates, all_reduce, [torch.stack(state_tensors), running, step_tensor])
    modules = len(gates)
    new_state, curves, squares = rule_math.rule_step(
        stats, state.reshape(modules, len(GATE_STATE)), old_running[:modules], old_running[modules:], config,
        int(step_read))
    values = to_device(torch.from_numpy(np.concatenate([new_state.ravel(), curves.ravel(), squares.ravel()])),
                       state_tensors[0].device)  # the state in GATE_STATE's order, then the curves
    state_values = values[:len(state_tensors)].float()  # every source has its destination's dtype
    sources = [*state_values.unbind(), *values[len(state_tensors):].view(len(running), -1).unbind()]
    torch._foreach_copy_(state_tensors + running, sources)


@torch.no_grad()
def calibrate_thresholds(gates: list[TokenGate], all_reduce: AllReduce | None = None) -> None:
    """τ_m = Q_m(1 − u_m) exactly (no smoothing) from the r histograms gathered since the last rule step, e.g. over
    batches run the way evaluation runs them; modules that saw no token keep their τ."""
    if not gates:
        return
    taus = [g.tau.data for g in gates]
    counts, (u, old_tau) = _read_rule_inputs(gates, all_reduce, [torch.stack([g.allocated_kept for g in gates]),
                                                                  torch.stack(taus)])
    counts = counts[:, COUNTS]
    tau = rule_math.histogram_quantiles(counts, (1 - u)[:, None], gates[0].config.log10_r_range)[:, 0]
    tau = np.where(counts.sum(-1) > 0, np.where(u >= 1.0, 0.0, tau), old_tau)
    torch._foreach_copy_(taus, list(to_device(torch.from_numpy(tau).float(), taus[0].device).unbind()))
