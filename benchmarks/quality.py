"""Quality suite: dense PEFT vs its token-selective form, same rank/steps/lr, several seeds.

Each run is one `tspeft train` (in process); its metrics.json becomes one record of
benchmarks/results/quality.json (or sweep.json for --sweep). Records already present are skipped, so an
interrupted suite resumes where it stopped. Tables and plots: `python benchmarks/make_tables.py`.

    python benchmarks/quality.py --suite encoder            # MiniLM-L6: rotten_tomatoes, sst2, boolq
    python benchmarks/quality.py --suite decoder            # SmolLM2: piqa, obqa, boolq_mc, asdiv, trec_gen
    python benchmarks/quality.py --suite encoder --sweep    # kept 0.9/0.7/0.5/0.3 on rotten_tomatoes
    python benchmarks/quality.py --suite decoder --sweep --sweep-task trec_gen \
        --sweep-methods ts-lora,ts-lora:uniform,ts-lora:random --seeds 0   # the sweep with the τ-rule controls
    python benchmarks/quality.py --suite decoder --lr-tune 1e-4,5e-4,2e-3   # dense LoRA, seed 0, sweep task
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from provenance import code_commit  # noqa: E402
from tspeft.cli.main import main as tspeft_main  # noqa: E402
from tspeft.core.io import atomic_write  # noqa: E402
from tspeft.training.defaults import default_lr  # noqa: E402
from tspeft.training.run_config import split_method_spec  # noqa: E402

SUITES = {
    # sizes: 63 optimizer steps per encoder run (about 1 min on 2 quiet CPU cores: ~1 h for the whole encoder suite);
    # lr 2e-3 for every method, because the default 5e-4 is too slow for 63 steps (dense LoRA 0.758 at 2e-3)
    "encoder": {"model": "minilm", "tasks": ["rotten_tomatoes", "sst2", "boolq"],
                "methods": ["lora", "ts-lora", "dora", "ts-dora", "adapter", "ts-adapter"],
                "flags": ["--n-train", "2000", "--n-eval", "1000", "--epochs", "1", "--lr", "2e-3"],
                "sweep_task": "rotten_tomatoes",
                "lr_choice": "lr 2e-3 for every method, the best of the tuning below (the default 5e-4 is too slow "
                             "for 63 steps)"},
    "decoder": {"model": "smollm2", "tasks": ["piqa", "obqa", "boolq_mc", "asdiv", "trec_gen"],
                "methods": ["none", "lora", "ts-lora", "dora", "ts-dora", "adapter", "ts-adapter"],
                "flags": ["--n-train", "200", "--n-eval", "200", "--max-steps", "50"], "sweep_task": "piqa",
                "lr_choice": "the default lr 5e-4 for every method, kept after the tuning below",
                # BoolQ passages fill the 192 tokens, too slow in fp32 for the CPU budget; bf16 autocast (fast on
                # this CPU's AVX512-BF16) for every method of the task alike
                "task_flags": {"boolq_mc": ["--bf16"],
                               # generation: short sequences (~45 tokens) but the loaded 2-core machine ran SmolLM2 at
                               # minutes per step, so 30 steps in bf16; lr 1e-3 and a 10-step warm-up (untuned) so
                               # 30 steps can learn the answer format and the gate bites for two thirds of the run
                               "asdiv": ["--n-train", "240", "--n-eval", "100", "--max-steps", "30", "--bf16",
                                         "--lr", "1e-3", "--max-new-tokens", "8"],
                               # generation with a closed answer set: 480 questions x 1 epoch (60 steps of 8);
                               # lr 1e-3 as asdiv (untuned); 3 new tokens hold any of the six answer words
                               "trec_gen": ["--n-train", "480", "--n-eval", "200", "--max-steps", "60",
                                            "--lr", "1e-3", "--max-new-tokens", "3"]},
                # generation: zero-shot, 3-shot (the frozen baselines) and the LoRA pair
                "task_methods": {task: ["none", "none-3shot", "lora", "ts-lora"] for task in ("asdiv", "trec_gen")},
                # (3 demonstrations make the eval prompts about 4x longer: room for them)
                "task_train_flags": {"asdiv": {"ts-lora": ["--warmup-steps", "10"],
                                               "none-3shot": ["--max-length", "768"]},
                                     "trec_gen": {"none-3shot": ["--max-length", "768"]}}},
}
SWEEP_KEPT = ["0.9", "0.7", "0.5", "0.3"]
FEW_SHOT = {"none-3shot": 3}  # frozen few-shot baselines: method none with --few-shot N
KEYS = ("task", "model", "method", "seed", "target_kept")
LR_TUNING_KEYS = ("suite", "task", "method", "seed", "lr")
MACHINE = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def load_records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def save_records(path: Path, records: list[dict]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1)))


def run_dir(runs_dir: str, suite_name: str, task: str, method: str, seed: int, kept: str | None) -> Path:
    folder = method.replace(":", "_")  # ts-lora:random -> ts-lora_random
    return Path(runs_dir) / suite_name / task / f"{folder}{'@' + kept if kept else ''}-s{seed}"


def token_stats_of(out: Path) -> dict | None:
    """Which tokens the gates kept, from a run's token_stats.json (ts-* runs only)."""
    path = out / "token_stats.json"
    if not path.is_file():
        return None
    stats = json.loads(path.read_text())
    return {k: stats.get(k) for k in ("by_kind", "by_position", "most_kept_tokens", "least_kept_tokens")}


def refresh_token_stats(records: list[dict], runs_dir: str, suite_name: str) -> int:
    """Re-read token_stats.json of the suite's finished runs into their records (e.g. for fields added later)."""
    refreshed = 0
    for record in records:
        if record.get("suite") != suite_name:
            continue
        kept = f"{record['target_kept']:g}" if record.get("target_kept") is not None else None
        stats = token_stats_of(run_dir(runs_dir, suite_name, record["task"], record["method"], record["seed"], kept))
        if stats is not None:
            record["token_stats"], refreshed = stats, refreshed + 1
    return refreshed


def refresh_majority(records: list[dict], suite_name: str) -> int:
    """Add the eval set's majority-class accuracy to the suite's records that lack it (the eval set depends only
    on the task and n_eval)."""
    from tspeft.tasks.data import get_task, load_task
    from tspeft.tasks.kinds import get_kind

    refreshed, cache = 0, {}
    for record in records:
        if record.get("suite") != suite_name or record.get("majority_accuracy") is not None:
            continue
        key = (record["task"], record["n_eval"])
        if key not in cache:
            cache[key] = get_kind(get_task(key[0]).kind).majority_accuracy(
                load_task(key[0], n_train=1, n_eval=key[1])[1])
        record["majority_accuracy"], refreshed = cache[key], refreshed + 1
    return refreshed


def sizes_of(suite: dict, task: str) -> list[str]:
    """The suite's size flags plus the task's own (e.g. --bf16 for a long-input task)."""
    return [*suite["flags"], *suite.get("task_flags", {}).get(task, [])]


def run_one(suite: dict, task: str, method: str, seed: int, out: Path, extra: list[str]) -> dict:
    # resumable by record: a run folder without its record (killed before the record was saved) is trained
    # again, replacing it whole
    shots = ["--few-shot", str(FEW_SHOT[method])] if method in FEW_SHOT else []
    own = suite.get("task_train_flags", {}).get(task, {}).get(method, [])
    # a control (ts-lora:random) is its method with the control's --allocation/--selection, as `tspeft compare` runs it
    base_method, control = ("none", {}) if shots else split_method_spec(method)
    control_flags = [flag for key, value in control.items() for flag in (f"--{key}", value)]
    args = ["train", "--task", task, "--model", suite["model"], "--method", base_method, *control_flags,
            "--seed", str(seed), "--out", str(out), "--overwrite", *sizes_of(suite, task), *own, *shots, *extra]
    tspeft_main(args)
    return json.loads((out / "metrics.json").read_text())


def suite_lr(suite: dict) -> float:
    """The learning rate the suite trains dense LoRA with: its --lr flag, else tspeft's default."""
    flags = suite["flags"]
    return float(flags[flags.index("--lr") + 1]) if "--lr" in flags else default_lr("lora")


def tune_lr(suite: dict, suite_name: str, lrs: list[float], seed: int, runs_dir: str, results: Path,
            records: list[dict], extra: list[str]) -> None:
    """Dense LoRA on the sweep task at each learning rate (resumable, like the suite)."""
    task = suite["sweep_task"]
    done = {tuple(r.get(k) for k in LR_TUNING_KEYS) for r in records}
    for lr in lrs:
        if (suite_name, task, "lora", seed, lr) in done:
            continue
        out = Path(runs_dir) / suite_name / "lr_tuning" / f"lora-lr{lr:g}-s{seed}"
        metrics = run_one(suite, task, "lora", seed, out, ["--lr", f"{lr:g}", *extra])
        records.append({"suite": suite_name, "task": task, "model": suite["model"], "method": "lora", "seed": seed,
                        "lr": lr, "accuracy": metrics["accuracy"], "n_eval": metrics["n_eval"],
                        "train_seconds": metrics["train_seconds"], "final_train_loss": metrics["final_train_loss"],
                        "sizes": " ".join(sizes_of(suite, task)),
                        "machine": MACHINE + f", device {metrics.get('device')}", "commit": code_commit()})
        save_records(results, records)
        print(f"[quality] lr tuning {task} lora lr {lr:g}: accuracy {metrics['accuracy']:.4f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--sweep", action="store_true", help="target-kept sweep of ts-lora on the suite's sweep task")
    parser.add_argument("--lr-tune", metavar="LRS",
                        help="comma-separated learning rates: dense LoRA on the suite's sweep "
                        "task, first seed only (the one tuning of the dense baseline); writes lr_tuning.json")
    parser.add_argument("--sweep-task", help="the task of --sweep (default: the suite's sweep task)")
    parser.add_argument("--sweep-methods", default="ts-lora",
                        help="comma-separated token-selective methods or controls of --sweep, e.g. "
                             "ts-lora,ts-lora:uniform,ts-lora:random (dense lora is always run as the reference)")
    parser.add_argument("--sweep-kept", default=",".join(SWEEP_KEPT), help="comma-separated targets of --sweep")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", help="comma-separated subset of the suite's tasks")
    parser.add_argument("--methods", help="comma-separated subset of the suite's methods")
    parser.add_argument("--runs-dir", default="runs/bench")
    parser.add_argument("--device", default="auto",
                        help="passed to every run: auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--results", default=None,
                        help="output JSON (default benchmarks/results/quality.json or sweep.json)")
    parser.add_argument("--refresh-token-stats", action="store_true",
                        help="only re-read token_stats.json of finished runs under --runs-dir into their records")
    parser.add_argument("--refresh-majority", action="store_true",
                        help="only add the eval set's majority-class accuracy to records that lack it")
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    device_flag = ["--device", args.device]
    seeds = [int(s) for s in args.seeds.split(",")]
    default_name = "lr_tuning.json" if args.lr_tune else "sweep.json" if args.sweep else "quality.json"
    results = Path(args.results or ROOT / "results" / default_name)
    records = load_records(results)
    if args.lr_tune:
        tune_lr(suite, args.suite, [float(lr) for lr in args.lr_tune.split(",")], seeds[0], args.runs_dir, results,
                records, device_flag)
        return
    done = {tuple(r.get(k) for k in KEYS) for r in records}
    if args.refresh_token_stats:
        refreshed = refresh_token_stats(records, args.runs_dir, args.suite)
        save_records(results, records)
        print(f"[quality] token statistics refreshed for {refreshed} records of {results}")
        return
    if args.refresh_majority:
        refreshed = refresh_majority(records, args.suite)
        save_records(results, records)
        print(f"[quality] majority-class accuracy added to {refreshed} records of {results}")
        return
    if args.sweep:
        task = args.sweep_task or suite["sweep_task"]
        plan = [(task, "lora", None)] + [(task, method, kept) for kept in args.sweep_kept.split(",")
                                         for method in args.sweep_methods.split(",")]
    else:
        tasks = args.tasks.split(",") if args.tasks else suite["tasks"]
        methods = args.methods.split(",") if args.methods else suite["methods"]
        plan = [(task, method, None) for task in tasks for method in suite.get("task_methods", {}).get(task, methods)
                if not args.methods or method in methods]
    for task, method, kept in plan:
        for seed in seeds:
            if method.startswith("none") and seed != seeds[0]:
                continue  # zero-shot does not depend on the seed
            extra = (["--target-kept", kept] if kept else []) + device_flag
            key_target = float(kept) if kept else None
            if (task, suite["model"], method, seed, key_target) in done:
                continue
            out = run_dir(args.runs_dir, args.suite, task, method, seed, kept)
            metrics = run_one(suite, task, method, seed, out, extra)
            record = {k: metrics.get(k) for k in ("task", "method", "seed", "accuracy", "majority_accuracy",
                                                  "kept_fraction", "train_seconds", "calibration_examples",
                                                  "eval_seconds", "trainable_params", "per_module", "n_train",
                                                  "n_eval")}
            if metrics.get("generation"):
                record.update(generation=metrics["generation"], eval_loss=metrics.get("eval_loss"),
                              perplexity=metrics.get("perplexity"))
            record.update(method=method, model=suite["model"], suite=args.suite, target_kept=key_target,
                          target_kept_used=metrics.get("target_kept"),
                          sizes=" ".join(sizes_of(suite, task)), machine=MACHINE + f", device {metrics.get('device')}",
                          commit=code_commit())
            token_stats = token_stats_of(out)
            if token_stats is not None:
                record["token_stats"] = token_stats
            records.append(record)
            save_records(results, records)
            print(f"[quality] {task} {method} seed {seed}: accuracy {record['accuracy']:.4f} "
                  f"kept {record['kept_fraction']}", flush=True)


if __name__ == "__main__":
    main()
