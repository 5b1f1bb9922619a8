"""The peft/Trainer flags users expect reach LoraConfig and TrainingArguments with their usual meanings; bad
generation input through the CLI is a one-line error naming the file and row."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tspeft.cli.main import main
from tspeft.cli.parser import parse
from tspeft.training.build import build_for_plan
from tspeft.training.data import load_data
from tspeft.training.fit import training_arguments
from tspeft.training.run_config import TrainConfig, resolve_device, resolve_train

FLAGS = ["--target-modules", "q_proj,o_proj", "--lora-alpha", "24", "--lora-dropout", "0.1",
         "--gradient-accumulation-steps", "3", "--gradient-checkpointing", "--warmup-ratio", "0.2",
         "--lr-scheduler", "cosine", "--weight-decay", "0.01", "--max-grad-norm", "0.5"]


def _data(tmp_path: Path) -> str:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) for i in range(12)) + "\n")
    return str(path)


def test_flags_reach_lora_config_and_training_arguments(tmp_path, llama_dir, tiny_llama):
    _, args = parse(["train", "--data", _data(tmp_path), "--model", str(llama_dir), "--method", "ts-lora",
                     "--out", str(tmp_path / "run"), *FLAGS])
    cfg = TrainConfig.from_namespace(args)
    task_data = load_data(cfg)
    plan = resolve_train(cfg, task_data)
    training = training_arguments(cfg, plan, tmp_path / "ckpt", resolve_device("cpu"))
    assert training.gradient_accumulation_steps == 3 and training.activation_checkpointing is True
    assert training.warmup_steps == 0.2 and training.get_warmup_steps(50) == 10  # a ratio of the steps
    assert training.lr_scheduler_type.value == "cosine" and training.weight_decay == 0.01
    assert training.max_grad_norm == 0.5
    model = build_for_plan(plan, tiny_llama)
    lora = model.peft_config
    assert lora.lora_alpha == 24 and lora.lora_dropout == 0.1
    chosen = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "o_proj")]
    assert sorted(model.gates) == sorted(chosen)


def test_training_with_the_flags_runs(tmp_path, llama_dir):
    out = tmp_path / "run"
    assert main(["train", "--data", _data(tmp_path), "--model", str(llama_dir), "--method", "ts-lora",
                 "--out", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--n-eval", "2", "--max-new-tokens", "2", "--no-report",
                 *FLAGS]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 2 and metrics["task_kind"] == "generation"
    assert {"eval_loss", "perplexity", "generation"} <= set(metrics)


@pytest.mark.parametrize("rows, flags, message", [
    ([{"prompt": "a", "response": "b"}, {"prompt": "c"}], [], r"d.jsonl: line 2: no response"),
    ([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": ""}], [], r"d.jsonl: line 2: empty response"),
    ([{"chat": [{"role": "user", "content": "hi"}]}], ["--messages-column", "chat"],
     r"d.jsonl: line 1: the chat has no assistant turn"),
    ([{"chat": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 5,
     ["--messages-column", "chat"], r"d.jsonl: line \d: chat data needs a tokenizer with a chat template"),
    ([{"prompt": "x" * 80, "response": "y"}] * 5, ["--max-length", "40"],
     r"d.jsonl: line \d: prompt \+ response are 83 tokens, more than --max-length 40"),
])
def test_bad_generation_input_is_one_line(tmp_path, llama_dir, capsys, rows, flags, message):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--model", str(llama_dir), "--out", str(tmp_path / "run"), "--n-eval", "1",
              *flags])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the loading bars
    assert len(errors) == 1 and errors[0].startswith("tspeft train: error: ")
    assert re.search(message, errors[0]), errors[0]


def test_few_shot_is_a_frozen_baseline(tmp_path, llama_dir, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--data", _data(tmp_path), "--model", str(llama_dir), "--method", "lora", "--few-shot", "2",
              "--out", str(tmp_path / "run")])
    assert "--few-shot: a few-shot baseline is --method none" in capsys.readouterr().err
