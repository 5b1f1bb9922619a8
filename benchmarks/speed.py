"""Speed and memory of token-selective PEFT against peft, measured in one process.

    python benchmarks/speed.py                      # full run (CPU: largest combos dropped, see output)
    python benchmarks/speed.py --device cuda        # same script on a GPU, every combo
    python benchmarks/speed.py --quick              # fewer sizes and repeats
    python benchmarks/speed_table.py                # -> benchmarks/SPEED.md

What is measured (every ratio is token-selective / its peft twin with identical weights, same process):

* train step: forward + backward + AdamW step (+ `update_thresholds()` for TS), median of interleaved
  repeats after warm-up steps; TS-LoRA / LoRA, TS-DoRA / DoRA and TS-adapter / bottleneck adapter, TS in target
  mode (kept 0.5).
* peak memory: CUDA `max_memory_allocated` over one step; CPU has no allocator statistics, so it is
  parameter + gradient + optimizer-state bytes + activation bytes, where activations are the storages saved
  for backward (`saved_tensors_hooks`) plus any other tensor created during forward and still alive at its end
  (e.g. tensors captured by gradient hooks), deduplicated by storage. The JSON names the measure used.
* inference forward (eval, no_grad): TS-LoRA with τ fixed per gate so exactly a fraction k of the tokens is
  kept (k = 1.0 / 0.5 / 0.2), against unmerged LoRA and merged LoRA (the base cost floor). Both TS rows are
  core paths, each forced at every gate: `ts-lora` is the dense-masked path (the update of a dropped token is
  computed, then zeroed, and added to peft's result in place) and `ts-lora-skip` the kept-rows path (B·z only
  for kept rows, via peft's own lora_B and an in-place `index_add_`). Without autograd core picks the kept-rows
  path by itself when a call keeps at most half of its tokens (`TokenSelectiveVariant.skip_max_kept`,
  `skip_min_elements`).
* profile (train): one torch.profiler step of each TS model and its twin; the ops whose self CPU time grows
  most in the TS step, and the time inside `update_thresholds()`: what an over-target ratio is made of.

Timing: the methods' repeats are interleaved (the order rotates each round) to cancel drift from other
processes sharing the machine; medians are reported. Repeats adapt to a per-combo time budget.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]  # this checkout's code, not an installed copy
from speed_measure import RULE_LABEL, interleaved_medians, machine_info, peak_memory, profile_pair  # noqa: E402
from speed_models import RANK, build_real, build_synthetic, real_batch, synthetic_batch  # noqa: E402
from tspeft.core.variant import TokenSelectiveVariant  # noqa: E402

KEPT_LEVELS = (1.0, 0.5, 0.2)
TRAIN_KINDS = ("lora", "dora", "adapter")  # each trained gated ("ts-…") and plain, with identical weights
CPU_MAX_WORK = 4096 * 4096 * 2048  # hidden² · tokens above this is dropped on CPU (one step would take > 10 s)


# ----- training ----------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, model: nn.Module, forward: Callable[[nn.Module], torch.Tensor], is_ts: bool):
        self.model, self._forward, self.is_ts = model, forward, is_ts
        model.train()
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def forward(self) -> torch.Tensor:
        return self._forward(self.model)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.forward().backward()
        self.optimizer.step()
        if self.is_ts:
            with torch.profiler.record_function(RULE_LABEL):  # a no-op unless a profiler runs
                self.model.update_thresholds()


def bench_train(case: str, hidden: int | None, tokens: int, builders: dict[str, Callable[[], nn.Module]],
                forward: Callable[[nn.Module], torch.Tensor], device: torch.device, args, machine: dict) -> list[dict]:
    pairs = [(f"ts-{kind}", kind) for kind in TRAIN_KINDS]
    trainers = {m: Trainer(builders[m](), forward, m.startswith("ts-")) for pair in pairs for m in pair}
    for trainer in trainers.values():  # TS: lets the τ rule reach the target before timing
        for _ in range(args.rule_steps):
            trainer.step()
    for m, t in trainers.items():
        if t.is_ts:
            t.model.reset_stats()
    medians, repeats = interleaved_medians({m: t.step for m, t in trainers.items()}, device, args.warmup,
                                           args.train_budget, args.min_repeats, args.max_repeats)
    kept = {m: (t.model.kept_fraction() if t.is_ts else None) for m, t in trainers.items()}
    memory = {m: peak_memory(t.forward, t.step, t.model, t.optimizer, device) for m, t in trainers.items()}
    profiles = ({ts: profile_pair(trainers[ts].step, trainers[base].step) for ts, base in pairs}
                if args.profile else {})
    records = []
    for ts, base in pairs:
        records.append({
            "case": case, "phase": "train", "hidden": hidden, "tokens": tokens, "rank": RANK,
            "method": ts, "baseline": base,
            "train_step_ratio": medians[ts] / medians[base],
            "peak_memory_ratio": memory[ts][0] / memory[base][0],
            "activation_memory_ratio": (memory[ts][1] / memory[base][1]) if memory[base][1] else None,
            "inference_ratio": None,
            "train_step_s": medians[ts], "baseline_train_step_s": medians[base],
            "peak_memory_bytes": memory[ts][0], "baseline_peak_memory_bytes": memory[base][0],
            "activation_bytes": memory[ts][1], "baseline_activation_bytes": memory[base][1],
            "memory_measure": memory[ts][2], "kept_fraction": kept[ts], "target_kept": 0.5,
            "repeats": repeats, "machine": machine, "profile": profiles.get(ts),
        })
        print(f"  train {case:9s} h={hidden} n={tokens:6d} {ts:8s}/{base:5s} "
              f"step {records[-1]['train_step_ratio']:.3f}x ({medians[ts] * 1e3:.1f} / {medians[base] * 1e3:.1f} ms)  "
              f"mem {records[-1]['peak_memory_ratio']:.3f}x  "
              f"kept {kept[ts]:.2f}  reps {repeats}", flush=True)
    del trainers
    gc.collect()
    return records


# ----- inference -----------------------------------------------------------------------------------------------
def _lora_parts(layer: nn.Module):
    adapter = layer.active_adapters[0]
    return layer.lora_A[adapter], layer.lora_B[adapter], float(layer.scaling[adapter])


def _relative_magnitude(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """r = ‖s·B A x‖ / ‖W0 x‖ per token, from the weights directly (no hooks fire)."""
    lora_a, lora_b, scaling = _lora_parts(layer)
    base = F.linear(x, layer.base_layer.weight)
    update = F.linear(F.linear(x, lora_a.weight), lora_b.weight) * scaling
    base_norm = torch.linalg.vector_norm(base.float(), dim=-1).clamp_min(1e-30)
    return torch.linalg.vector_norm(update.float(), dim=-1) / base_norm


def calibrate_thresholds(ts_model, run: Callable[[nn.Module], object], kept: float) -> dict[str, float]:
    """Set each gate's τ from the r of its own input in this forward, so exactly round(kept·N) tokens are kept: τ
    halfway between the two r values at the cut, so float rounding of another path cannot flip a token there."""
    base = ts_model.get_base_model()
    handles = []
    for name, gate in ts_model.gates.items():
        layer = base.get_submodule(name)

        def pre_hook(module, args, gate=gate):
            with torch.no_grad():
                r = _relative_magnitude(module, args[0]).flatten()
                n, k = r.numel(), int(round(kept * r.numel()))
                ordered = r.sort().values
                tau = 0.0 if k >= n else (math.inf if k == 0 else float(ordered[n - k - 1:n - k + 1].mean()))
                gate.tau.fill_(tau)

        handles.append(layer.register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            run(ts_model)
    finally:
        for h in handles:
            h.remove()
    return ts_model.thresholds()


def force_path(ts_model, path: str) -> None:
    """Force core's dense-masked ("dense") or kept-rows ("skip") inference path at every LoRA gate."""
    for attachment in ts_model._attachments:
        if isinstance(attachment, TokenSelectiveVariant):
            attachment.skip_max_kept, attachment.skip_min_elements = (-1.0, 0) if path == "dense" else (1.0, 0)


def core_takes(method: str, kept: float, output_elements: int) -> bool:
    """Whether core picks this forced path by itself (`TokenSelectiveVariant`; hidden stands for out_features)."""
    few = kept <= TokenSelectiveVariant.skip_max_kept and output_elements >= TokenSelectiveVariant.skip_min_elements
    return few == (method == "ts-lora-skip")


def bench_inference(case: str, hidden: int | None, tokens: int, build: Callable[[str], nn.Module],
                    run: Callable[[nn.Module], torch.Tensor], device: torch.device, args, machine: dict) -> list[dict]:
    lora = build("lora").eval()
    merged = copy.deepcopy(lora).merge_and_unload().eval()
    # (pyflakes: the lambdas run before the `del` at the end)
    fns: dict[str, Callable[[], object]] = {"lora": lambda: run(lora), "merged": lambda: run(merged)}  # noqa: F821
    ts_models, kept = {}, {}
    reference = run(lora)
    for level in KEPT_LEVELS:
        ts = build("ts-lora").eval()
        thresholds = calibrate_thresholds(ts, run, level)
        force_path(ts, "dense")
        skip = build("ts-lora").eval()
        skip.set_thresholds(thresholds)
        force_path(skip, "skip")
        ts.reset_stats(), skip.reset_stats()
        out_ts, out_skip = run(ts), run(skip)
        scale = float(reference.float().abs().max())
        err = float((out_ts.float() - out_skip.float()).abs().max()) / max(scale, 1e-30)
        # Deep models: a rounding difference upstream can still move a token across τ downstream; the outputs must
        # agree only where every gate kept the same number of tokens in both.
        same = all(torch.equal(ts.gates[n].kept_counts[:2], skip.gates[n].kept_counts[:2]) for n in ts.gates)
        if err > 1e-4 and same:
            raise AssertionError(f"core's skip path disagrees with its dense-masked path (rel. error {err:.2e})")
        ts_models[level] = (ts, skip)
        fns[f"ts-lora@{level}"] = (lambda m=ts: run(m))
        fns[f"ts-lora-skip@{level}"] = (lambda m=skip: run(m))
    for ts, _ in ts_models.values():
        ts.reset_stats()
    medians, repeats = interleaved_medians(fns, device, args.warmup, args.inference_budget, args.min_repeats,
                                           args.max_repeats)
    for level, (ts, _) in ts_models.items():
        kept[level] = ts.kept_fraction()
    profile = profile_pair(fns["ts-lora-skip@0.5"], fns["lora"]) if args.profile else None
    records = []

    def record(method: str, seconds: float, kept_fraction: float | None) -> None:
        records.append({
            "case": case, "phase": "inference", "hidden": hidden, "tokens": tokens, "rank": RANK,
            "method": method, "baseline": "lora (unmerged)",
            "train_step_ratio": None, "peak_memory_ratio": None,
            "inference_ratio": seconds / medians["lora"], "inference_ratio_vs_merged": seconds / medians["merged"],
            "inference_s": seconds, "baseline_inference_s": medians["lora"], "merged_inference_s": medians["merged"],
            "kept_fraction": kept_fraction, "repeats": repeats, "machine": machine,
            "profile": profile if method == "ts-lora-skip" and kept_fraction is not None
            and abs(kept_fraction - 0.5) < 0.05 else None,
            "core_default": None if kept_fraction is None else core_takes(method, kept_fraction, tokens * hidden),
        })

    record("lora-merged", medians["merged"], None)
    for level in KEPT_LEVELS:
        record("ts-lora", medians[f"ts-lora@{level}"], kept[level])
        record("ts-lora-skip", medians[f"ts-lora-skip@{level}"], kept[level])
    line = "  ".join(f"{r['method']}@{r['kept_fraction'] if r['kept_fraction'] is not None else '-'}:"
                     f"{r['inference_ratio']:.3f}x" for r in records)
    print(f"  infer {case:9s} h={hidden} n={tokens:6d} lora {medians['lora'] * 1e3:.1f} ms  {line}  reps {repeats}",
          flush=True)
    del ts_models, fns, lora, merged
    gc.collect()
    return records


# ----- cases -----------------------------------------------------------------------------------------------------
REAL_HIDDEN = {"minilm": 384, "smollm2": 576}


def bench_real(name: str, batch: int, seq: int, device: torch.device, args, machine: dict) -> list[dict]:
    inputs = real_batch(name, device, batch, seq)
    builders = {m: (lambda m=m: build_real(name, m, device)) for kind in TRAIN_KINDS for m in (kind, f"ts-{kind}")}
    records = bench_train(name, REAL_HIDDEN[name], batch * seq, builders, lambda m: m(**inputs).loss, device, args,
                          machine)
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        records += bench_inference(name, REAL_HIDDEN[name], batch * seq, lambda m: build_real(name, m, device),
                                   lambda m: m(**no_labels).logits, device, args, machine)
    return records


def write_atomic(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(records, handle, indent=1)
        handle.write("\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "speed.json"))
    parser.add_argument("--hidden", type=int, nargs="+", help="override the synthetic hidden sizes")
    parser.add_argument("--tokens", type=int, nargs="+", help="override the synthetic tokens per batch")
    parser.add_argument("--skip-minilm", action="store_true", help="no real-model case (same as --real none)")
    parser.add_argument("--real", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2", "none"],
                        help="embedded models to benchmark after the synthetic grid")
    parser.add_argument("--minilm-batch", type=int, nargs=2, default=(32, 64), metavar=("BATCH", "SEQ"))
    parser.add_argument("--smollm-batch", type=int, nargs=2, default=(4, 64), metavar=("BATCH", "SEQ"))
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="no torch.profiler pass per train combo")
    parser.add_argument("--all-combos", action="store_true", help="on CPU, keep the combos dropped for time")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds per method")
    parser.add_argument("--rule-steps", type=int, default=5, help="train steps before timing (τ rule settles)")
    parser.add_argument("--min-repeats", type=int, default=5)
    parser.add_argument("--max-repeats", type=int, default=11)
    parser.add_argument("--train-budget", type=float, default=None, help="seconds of timed rounds per train combo")
    parser.add_argument("--inference-budget", type=float, default=None, help="seconds per inference combo")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    hiddens = args.hidden or ([256, 1024] if args.quick else [256, 1024, 4096])
    token_counts = args.tokens or ([512, 2048] if args.quick else [512, 2048, 16384])
    if args.quick:
        args.warmup, args.rule_steps, args.min_repeats, args.max_repeats = 1, 2, 2, 5
    args.train_budget = args.train_budget if args.train_budget is not None else (3.0 if args.quick else 20.0)
    if args.inference_budget is None:
        args.inference_budget = 2.0 if args.quick else 10.0
    machine = machine_info(device)
    print(f"machine: {machine}", flush=True)

    combos, dropped = [], []
    for hidden in hiddens:
        for tokens in token_counts:
            too_big = device.type == "cpu" and not args.all_combos and hidden * hidden * tokens > CPU_MAX_WORK
            (dropped if too_big else combos).append((hidden, tokens))
    if dropped:
        print(f"CPU: dropped for time (hidden, tokens) = {dropped}; pass --all-combos to run them", flush=True)

    records: list[dict] = []
    started = time.perf_counter()
    for hidden, tokens in combos:
        x, y = synthetic_batch(hidden, tokens, device)
        builders = {m: (lambda m=m, h=hidden: build_synthetic(h, m, device))
                    for kind in TRAIN_KINDS for m in (kind, f"ts-{kind}")}
        records += bench_train("synthetic", hidden, tokens, builders, lambda m, x=x, y=y: F.mse_loss(m(x), y),
                               device, args, machine)
        with torch.no_grad():
            records += bench_inference("synthetic", hidden, tokens, lambda m, h=hidden: build_synthetic(h, m, device),
                                       lambda m, x=x: m(x), device, args, machine)
        write_atomic(Path(args.out).with_suffix(".partial.json"), records)  # a crash later loses nothing
    for name in [] if args.skip_minilm else [n for n in args.real if n != "none"]:
        batch, seq = args.minilm_batch if name == "minilm" else args.smollm_batch
        records += bench_real(name, batch, seq, device, args, machine)
        write_atomic(Path(args.out).with_suffix(".partial.json"), records)
    for r in records:
        r["dropped_combos"] = [list(c) for c in dropped]
        r["quick"] = bool(args.quick)
    write_atomic(Path(args.out), records)
    Path(args.out).with_suffix(".partial.json").unlink(missing_ok=True)
    print(f"wrote {len(records)} records to {args.out} in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
