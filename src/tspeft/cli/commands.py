"""The `tspeft` subcommands (setup, train, eval, importance, report; compare is in compare.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..training.run_folder import METRICS


def write_report(run_dir: Path) -> Path:
    """report.html of a run folder (tspeft.analysis.report)."""
    from ..analysis.report import write_report as write_html

    return Path(write_html(run_dir))


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _print_metrics(metrics: dict[str, Any]) -> None:
    keys = ("task", "model", "method", "seed", "accuracy", "kept_fraction", "target_kept", "train_seconds",
            "trainable_params", "n_train", "n_eval")
    width = max(len(k) for k in keys)
    for key in keys:
        if key in metrics:
            print(f"  {key:<{width}}  {fmt(metrics[key])}")


def cmd_setup(args) -> int:
    from ..tasks.resources import prepare_all

    folders = prepare_all(log=lambda message: print(message, flush=True))
    print(f"[tspeft] setup complete: {len(folders)} resources ready")
    return 0


def is_main_process() -> bool:
    """False on the other ranks under torchrun / accelerate launch (they print and write nothing)."""
    from accelerate import PartialState

    return PartialState().is_main_process  # set up by train()'s TrainingArguments


def cmd_train(args) -> int:
    from ..training.train import train

    metrics = train(args)
    if not is_main_process():
        return 0
    out = Path(args.out)
    print(f"[tspeft] {metrics['method']} on {metrics['task']}: metrics in {out / METRICS}")
    _print_metrics(metrics)
    if not args.no_report:
        print(f"[tspeft] report: {write_report(out)}")
    return 0


def cmd_eval(args) -> int:
    from ..training.evaluate import evaluate

    result = evaluate(args)
    print(f"[tspeft] evaluated {result['adapter']} ({result['method']}) on {result['task']} "
          f"({result['n_eval']} examples)")
    print(f"  accuracy       {fmt(result['accuracy'])}")
    print(f"  kept_fraction  {fmt(result['kept_fraction'])}")
    return 0


def cmd_importance(args) -> int:
    from ..analysis.importance import importance_for_run

    result = importance_for_run(Path(args.adapter), n_batches=args.n_batches, seed=args.seed,
                                out=Path(args.out) if args.out else None)
    criteria = list(result["scores"])
    print(f"[tspeft] module importance of {args.adapter} (rank 1 = most important; measured on "
          f"{result['measured_tokens']} real training tokens)")
    print("module".ljust(48) + "".join(c[:18].rjust(20) for c in criteria))
    for name in result["ranking"]["kept_fraction" if "kept_fraction" in result["ranking"] else criteria[0]]:
        print(name[-48:].ljust(48) + "".join(f"{result['rank_of'][c][name]:>20d}" for c in criteria))
    print(f"[tspeft] importance: {result['path']}  plot: {result['plot']}")
    return 0


def cmd_generate(args) -> int:
    from ..training.generate import GenerateConfig, generate

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    generate(GenerateConfig.from_namespace(args), write)
    return 0


def cmd_report(args) -> int:
    print(f"[tspeft] report: {write_report(Path(args.run_dir))}")
    return 0
