"""The τ rule against its controls, in a learning regime: dense LoRA, learned / uniform allocation, random tokens.

    python benchmarks/controls.py --task sst5 --kept 0.5 --seeds 0,1,2        # resumable: done runs are skipped
    python benchmarks/controls.py --task sst5 --regime                         # probe and dense only
    python benchmarks/controls.py --task trec --n-train 1000 --epochs 3 --lr 2e-3 --kept 0.3 --seeds 0,1,2,3,4 \
        --arms learned-prior,fixed-prior,inverted-prior   # does the allocation matter? (pinned_allocation.py)

Tasks: any shipped classification task (`tspeft.tasks.data.TASKS`; sst5, trec and sst_pair were added for this);
sst5 keeps the split its first records used (2,000 sentences held out, `SST5_HELD_OUT`).

Every run: MiniLM-L6 + LoRA (the training defaults' rank, alpha and target modules) trained by a plain AdamW
loop (linear decay, `model.update_thresholds()` after each optimizer step) on the same seed-chosen examples in
the same order for every arm, then evaluated on the fixed eval set (accuracy, eval kept fraction). The ts arms
differ only in `TokenSelectiveConfig.allocation` / `selection`; after training, τ is calibrated on eval-mode
passes (`TSPeftModel.calibrate`, docs/method.md) over up to 640 examples of the train pool the run does not
train on (`--calibrate-on train`: over its training examples, as the records without a "calibration" field),
before the evaluation.

The frozen baseline ("probe") is `tspeft train --method none`'s (`tspeft.training.probe`): a multinomial logistic
regression on MiniLM's frozen mean-pooled token embeddings (the pooling the model was trained with), fitted to
convergence by L-BFGS with its L2 weight chosen on a held-out fifth of the training examples. A task is in regime
when dense LoRA beats it by >= 5 points.

Records go to benchmarks/results/controls.json, one per (task, arm, seed, kept, sizes); tables come from
`python benchmarks/make_tables.py` (section "τ rule vs controls").
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import platform
import random
import sys
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import get_linear_schedule_with_warmup, set_seed  # noqa: E402

from pinned_allocation import PINNED_ARMS, SOURCE_ARM, pinned_allocation, pinned_u  # noqa: E402
from provenance import code_commit  # noqa: E402
from tspeft.core.io import atomic_write  # noqa: E402
from tspeft.tasks.data import get_task, load_task, split_examples, unused_train_examples  # noqa: E402
from tspeft.tasks.kinds import get_kind  # noqa: E402
from tspeft.tasks.labels import LabelSet  # noqa: E402
from tspeft.training.build import build_model, load_base  # noqa: E402
from tspeft.training.data import TaskData  # noqa: E402
from tspeft.training.measure import evaluate_model  # noqa: E402
from tspeft.training.probe import fit_frozen_probe  # noqa: E402

RESULTS = ROOT / "results" / "controls.json"
LEARNED_PRIOR = 1.0  # κ of the learned-prior arm: TokenSelectiveConfig's default (test_benchmarks checks they match)
ARMS = {  # arm -> (method, TokenSelectiveConfig overrides)
    "dense": ("lora", {}),
    # the plain water-filling oracle (κ = 0), the rule the first records ran
    "learned": ("ts-lora", {"allocation": "learned", "selection": "magnitude", "allocation_prior": 0.0}),
    # with the proximal prior toward uniform at the κ tspeft uses by default (docs/method.md)
    "learned-prior": ("ts-lora", {"allocation": "learned", "selection": "magnitude",
                                  "allocation_prior": LEARNED_PRIOR}),
    "uniform": ("ts-lora", {"allocation": "uniform", "selection": "magnitude"}),
    "random": ("ts-lora", {"allocation": "uniform", "selection": "random"}),
    # diagnostics: the allocation pinned at the same seed's learned-prior result, or its mirror (pinned_allocation.py)
    **{arm: ("ts-lora", {"allocation": "uniform", "selection": "magnitude"}) for arm in PINNED_ARMS},
}
KEYS = ("task", "arm", "seed", "kept", "sizes")
CALIBRATED_ON_UNUSED = " calibrated-on-unused"  # sizes suffix of ts arms whose τ was calibrated on unused examples
SST5_HELD_OUT = 2000  # the recorded sst5 runs hold out 2,000 sentences (the shipped split would hold out a fifth)


def task_examples(task: str, n_train: int, n_eval: int, seed: int) -> TaskData:
    spec = get_task(task)
    if task == "sst5":  # kept as recorded: eval = the first n_eval of SST5_HELD_OUT held out, train from the rest
        pool, evaluation = split_examples(spec.loader()[0], n_eval=SST5_HELD_OUT, source="sst5")
        train = list(pool)
        random.Random(seed).shuffle(train)
        train, evaluation = train[:n_train], evaluation[:n_eval]
    else:
        train, evaluation = load_task(task, n_train=n_train, n_eval=n_eval, seed=seed)
    labels = LabelSet.for_task(spec.label_names) if spec.label_names else None
    return TaskData(task, get_kind(spec.kind), train, evaluation, labels)


def unused_examples(task: str, n_train: int, n_eval: int, seed: int, n: int) -> list[dict]:
    """Up to `n` examples of the task's train pool that `task_examples(task, n_train, n_eval, seed)` does not train
    on: the τ calibration set (their inputs only)."""
    if task != "sst5":
        return unused_train_examples(task, n_train, n_eval, seed, n)
    pool, _ = split_examples(get_task(task).loader()[0], n_eval=SST5_HELD_OUT, source=task)
    pool = list(pool)
    random.Random(seed).shuffle(pool)  # the order task_examples takes its n_train from
    return pool[n_train:n_train + n]


def development_split(task_data: TaskData, args, seed: int) -> TaskData:
    """`task_data` with n_eval train-pool examples the run neither trains nor calibrates on as its eval set."""
    spare = unused_examples(task_data.name, len(task_data.train), len(task_data.eval), seed,
                            args.calibration_examples + args.n_eval)[args.calibration_examples:]
    if len(spare) < args.n_eval:
        raise SystemExit(f"--dev: the {task_data.name} train pool has only {len(spare)} examples left for a "
                         f"development split of {args.n_eval}; lower --n-eval or --n-train")
    return TaskData(task_data.name, task_data.kind, task_data.train, spare, task_data.labels)


def features_and_collator(task_data: TaskData, tokenizer, examples: list[dict], max_length: int):
    return task_data.kind.features(tokenizer, examples, max_length), task_data.kind.collator(tokenizer)


def fit_arm(task_data: TaskData, arm: str, args, seed: int, on_step=None, source: dict | None = None) -> dict:
    """Train one run of `arm` (see ARMS), τ not yet calibrated: {"model", "tokenizer", "features", "collate",
    "train_seconds", "train_steps"}; `on_step(model, step, loss)` is called after each τ-rule step; `source`: the
    allocation a pinned arm pins (PINNED_ARMS)."""
    if arm in PINNED_ARMS:
        return fit_pinned(task_data, arm, args, seed, on_step, source)
    method, overrides = ARMS[arm]
    set_seed(seed)
    base, tokenizer = load_base("minilm", task_data.kind, task_data.num_labels)
    set_seed(seed)
    model = build_model(method, base, task_data.kind, target_kept=args.kept, warmup_steps=args.warmup_steps)
    ts = method.startswith("ts-")
    if ts:
        for key, value in {**overrides, **(args.rule or {})}.items():
            setattr(model.ts_config, key, value)  # the gates share this config object
    features, collate = features_and_collator(task_data, tokenizer, task_data.train, args.max_length)
    steps = math.ceil(len(features) / args.batch_size) * args.epochs
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, steps)
    generator = torch.Generator().manual_seed(seed)  # the same data order for every arm of a seed
    start, step = time.perf_counter(), 0
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(features), generator=generator).tolist()
        for i in range(0, len(order), args.batch_size):
            loss = model(**collate([features[j] for j in order[i:i + args.batch_size]])).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if ts:
                model.update_thresholds()
                if on_step is not None:
                    on_step(model, step, loss.item())
    return {"model": model, "tokenizer": tokenizer, "features": features, "collate": collate,
            "train_seconds": round(time.perf_counter() - start, 1), "train_steps": step}


def fit_pinned(task_data: TaskData, arm: str, args, seed: int, on_step, source: dict | None) -> dict:
    """A pinned arm: the uniform arm's run with every allocation step returning the pinned u. The pin is set at the
    first τ-rule step (inside the warm-up, before any allocation step), once the gates' names are known."""
    if not source:
        raise SystemExit(f"--arms {arm}: run the {SOURCE_ARM} arm of seed {seed} at kept {args.kept} first "
                         "(its allocation is what the arm pins)")
    with ExitStack() as pins:
        def pin_then_report(model, step, loss):
            if step == 1:
                u = pinned_u(source, list(model.gates), args.kept, PINNED_ARMS[arm], model.ts_config.min_kept)
                pins.enter_context(pinned_allocation(u))
            if on_step is not None:
                on_step(model, step, loss)

        return fit_arm(task_data, "uniform", args, seed, pin_then_report)


def calibrate(model, features: list[dict], collate, examples: int, max_rounds: int = 4) -> int:
    """τ calibrated in eval mode on the first `examples` of `features` (`TSPeftModel.calibrate`); the rounds."""
    model.eval()

    def run_passes():
        with torch.no_grad():
            for i in range(0, min(len(features), examples), 64):
                model(**collate(features[i:i + 64]))

    return model.calibrate(run_passes, max_rounds=max_rounds)


def evaluate_arm(fitted: dict, task_data: TaskData, args) -> dict:
    """Accuracy and eval kept fraction of a fitted arm (τ as it stands), with the fit's figures."""
    model = fitted["model"]
    ts = hasattr(model, "gates")
    result = evaluate_model(model, fitted["tokenizer"], task_data, args.max_length, 64, torch.device("cpu"))
    record = {"accuracy": result["accuracy"], "kept_fraction": result.get("kept_fraction", 1.0 if not ts else None),
              "per_module": result.get("per_module"), "train_seconds": fitted["train_seconds"],
              "train_steps": fitted["train_steps"]}
    if ts:
        record.update(allocation=model.allocated_kept(), rule=model.ts_config.to_dict())
    return record


def train_arm(task_data: TaskData, arm: str, args, seed: int, on_step=None, source: dict | None = None) -> dict:
    """One run of `arm`: fit, calibrate τ (ts arms, unless --no-calibrate; --calibrate-on), evaluate."""
    fitted = fit_arm(task_data, arm, args, seed, on_step, source)
    if not (hasattr(fitted["model"], "gates") and args.calibrate):
        return evaluate_arm(fitted, task_data, args)
    features, collate = fitted["features"], fitted["collate"]
    if args.calibrate_on == "unused":
        spare = unused_examples(task_data.name, len(task_data.train), len(task_data.eval), seed,
                                args.calibration_examples)
        if spare:
            features, _ = features_and_collator(task_data, fitted["tokenizer"], spare, args.max_length)
    rounds = calibrate(fitted["model"], features, collate, args.calibration_examples, args.calibration_rounds)
    source = "unused" if features is not fitted["features"] else "train"
    return {**evaluate_arm(fitted, task_data, args), "calibration_rounds": rounds,
            "calibration": f"{source} examples ({min(len(features), args.calibration_examples)})"}


def probe(task_data: TaskData, args) -> dict:
    """The frozen baseline: `tspeft train --method none`'s probe (tspeft.training.probe), evaluated the same way."""
    start = time.perf_counter()
    base, tokenizer = load_base("minilm", task_data.kind, task_data.num_labels)
    classifier, fit = fit_frozen_probe(base, tokenizer, task_data, args.max_length)
    result = evaluate_model(classifier, tokenizer, task_data, args.max_length, 64, torch.device("cpu"))
    return {"accuracy": result["accuracy"], "l2": fit.l2, "validation": fit.validation,
            "train_seconds": round(time.perf_counter() - start, 1)}


def append_record(record: dict, results: Path = RESULTS) -> list[dict]:
    """Add one record to `results` under a lock, re-reading the file first (several arms may run side by side)."""
    with open(results.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = json.loads(results.read_text()) if results.exists() else []
        records.append(record)
        atomic_write(results, lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1)))
    return records


def sizes_of(args) -> str:
    return (f"n_train={args.n_train} n_eval={args.n_eval} epochs={args.epochs} lr={args.lr:g} batch={args.batch_size} "
            f"max_length={args.max_length} warmup={args.warmup_steps}"
            + (f" rule={json.dumps(args.rule)}" if args.rule else ""))


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The sizes and τ-rule settings of one training run (shared with tau_trace.py)."""
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-eval", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--rule", type=json.loads, default=None, help="TokenSelectiveConfig overrides (JSON)")
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false")
    parser.add_argument("--calibration-examples", type=int, default=640)
    parser.add_argument("--calibrate-on", choices=("unused", "train"), default="unused",
                        help="τ calibration examples: of the train pool the run does not train on (default), or "
                             "its first training examples (as the records before this flag)")
    parser.add_argument("--calibration-rounds", type=int, default=4,
                        help="at most this many fixed-point rounds of τ calibration (1: one pass, as before)")


def calibration_suffix(args) -> str:
    """What a ts arm's sizes say about τ's calibration: nothing for the first records' (their training examples, one
    pass), so that runs calibrated another way are new runs, not repeats (tau_tables strips the suffix)."""
    if not args.calibrate:
        return " uncalibrated"
    return CALIBRATED_ON_UNUSED if args.calibrate_on == "unused" else ""


def kept_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="sst5")
    add_run_arguments(parser)
    parser.add_argument("--kept", type=kept_or_none, default=0.5,
                        help="target kept fraction of the ts arms; none: the loss-driven rule (λ from --rule)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--arms", default="probe,dense,learned,uniform,random")
    parser.add_argument("--regime", action="store_true", help="only the probe and dense LoRA")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"result file (default {RESULTS})")
    parser.add_argument("--dev", action="store_true",
                        help="evaluate on a development split instead of the eval set: n_eval examples of the train "
                             "pool after the calibration examples (for choosing rule settings; use its own --results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    arms = ["probe", "dense"] if args.regime else args.arms.split(",")
    records = json.loads(args.results.read_text()) if args.results.exists() else []
    for seed in [int(s) for s in args.seeds.split(",")]:
        task_data = task_examples(args.task, args.n_train, args.n_eval, seed)
        if args.dev:
            task_data = development_split(task_data, args, seed)
        for arm in arms:
            dense = arm in ("probe", "dense")
            key = {"task": args.task, "arm": arm, "seed": seed, "kept": None if dense else args.kept,
                   "sizes": sizes_of(args) + ("" if dense else calibration_suffix(args))
                   + (" dev" if args.dev else "")}
            if arm == "probe":
                key["sizes"] = f"n_train={args.n_train} n_eval={args.n_eval} max_length={args.max_length}"
            if any(all(r.get(k) == key[k] for k in KEYS) for r in records):
                continue
            print(f"{args.task} {arm} seed {seed} ...", flush=True)
            source = next((r.get("allocation") for r in records if arm in PINNED_ARMS and r["arm"] == SOURCE_ARM
                           and all(r.get(k) == key[k] for k in KEYS if k != "arm")), None)
            result = probe(task_data, args) if arm == "probe" else train_arm(task_data, arm, args, seed, source=source)
            record = {**key, **result, "n_train": len(task_data.train), "n_eval": len(task_data.eval),
                      "num_labels": task_data.num_labels, "commit": code_commit(),
                      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__}"}
            records = append_record(record, args.results)
            print(f"  accuracy {result['accuracy']:.4f} kept {result.get('kept_fraction')}", flush=True)


if __name__ == "__main__":
    main()
