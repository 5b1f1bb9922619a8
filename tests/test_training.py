"""Trainer integration on tiny random models: τ-rule callback, train() outputs, saving and evaluate()."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from tspeft import TokenSelectiveConfig, TSPeftModel, get_ts_peft_model
from tspeft.training.build import build_model
from tspeft.training.callback import ThresholdCallback, unwrap_ts_model
from tspeft.training.data import ListDataset
from tspeft.training.evaluate import evaluate
from tspeft.training.run_config import EvalConfig, TrainConfig
from tspeft.training.train import train

METRIC_KEYS = {"task", "model", "method", "seed", "accuracy", "kept_fraction", "per_module", "train_seconds",
               "trainable_params", "target_kept", "tau_per_module", "n_train", "n_eval"}


def write_classification(path, n=64, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(n):
            label = rng.randint(0, 1)
            word = rng.choice(["good", "great", "fine"] if label else ["bad", "awful", "poor"])
            filler = " ".join(rng.choice(["a", "the", "film", "plot", "was"]) for _ in range(rng.randint(1, 4)))
            handle.write(json.dumps({"text": f"{filler} {word}", "label": "pos" if label else "neg"}) + "\n")
    return path


def write_multiple_choice(path, n=24, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(n):
            colour = rng.choice(["red", "blue", "green"])
            handle.write(json.dumps({"question": f"Colour of {colour}?", "options": ["red", "blue", "green"],
                                     "answer": ["red", "blue", "green"].index(colour)}) + "\n")
    return path


def read_log(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_ts_lora_classification_run(tmp_path, bert_dir):
    data = write_classification(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    metrics = train(TrainConfig(out=str(out), data=str(data), model=str(bert_dir), method="ts-lora", seed=0,
                                max_steps=8, warmup_steps=2, target_kept=0.5, batch_size=8, lr=1e-2,
                                max_length=32, logging_steps=1, device="cpu"))
    assert METRIC_KEYS <= set(metrics)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["method"] == "ts-lora" and saved["seed"] == 0 and saved["target_kept"] == 0.5
    assert 0 <= saved["accuracy"] <= 1 and 0 < saved["kept_fraction"] < 1
    assert 0.5 <= saved["majority_accuracy"] <= 1  # two classes: the most common holds at least half
    assert saved["n_eval"] > 0 and saved["train_steps"] == 8 and saved["label_names"] == ["neg", "pos"]
    assert set(saved["per_module"]) == set(saved["tau_per_module"])
    # the log: one line per step, τ = 0 during warm-up, then it moves and the kept fraction drops
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 9))
    keys = {"loss", "kept_fraction", "mean_tau", "kept_per_module", "tau_per_module", "kept_target_per_module"}
    assert keys <= set(log[0])
    assert log[0]["mean_tau"] == 0 and log[0]["kept_fraction"] == 1.0
    assert log[-1]["mean_tau"] > 0 and log[-1]["kept_fraction"] < 0.95
    assert any(v > 0 for v in saved["tau_per_module"].values())
    # token masks: real tokens only, one 0/1 per token per module
    masks = json.loads((out / "token_masks.json").read_text())
    assert 1 <= len(masks["examples"]) <= 4
    for example in masks["examples"]:
        assert example["masks"]
        for values in example["masks"].values():
            assert len(values) == len(example["tokens"]) and set(values) <= {0, 1}
    # the saved adapter reloads with its τ and reproduces the evaluation
    result = evaluate(EvalConfig(adapter=str(out), device="cpu"))
    assert result["accuracy"] == pytest.approx(saved["accuracy"])
    assert result["kept_fraction"] == pytest.approx(saved["kept_fraction"])


def test_callback_with_plain_trainer(tmp_path, tiny_bert, tiny_tokenizer):
    """ThresholdCallback on a plain Trainer: τ-rule step per optimizer step, stats in log_history."""
    from peft import LoraConfig

    model = get_ts_peft_model(tiny_bert, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                    task_type="SEQ_CLS"),
                              TokenSelectiveConfig(target_kept=0.5, warmup_steps=1))
    torch.manual_seed(0)
    features = [{"input_ids": [2] + [random.Random(i).randint(5, 60) for _ in range(6)], "labels": i % 2}
                for i in range(16)]
    for f in features:
        f["attention_mask"] = [1] * len(f["input_ids"])
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=4, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=2, report_to=[],
                             save_strategy="no", use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    callback = ThresholdCallback(out_dir=tmp_path / "log")  # model taken from the Trainer
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(features), callbacks=[callback])
    trainer.train()
    assert int(model.rule_step) == 4  # once per optimizer step, not per micro-batch
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for entry in logged:
        assert {"kept_fraction", "mean_tau", "kept_per_module", "tau_per_module"} <= set(entry)
    assert len(read_log(tmp_path / "log")) == 2
    # at train end τ was calibrated in eval mode on the training batches: evaluated the same way, they keep u
    model.eval()
    model.reset_stats()
    with torch.no_grad():
        for f in features:
            model(input_ids=torch.tensor([f["input_ids"]]), attention_mask=torch.tensor([f["attention_mask"]]))
    assert model.kept_fraction() == pytest.approx(0.5, abs=0.02)


def test_unwrap_ts_model(tiny_bert):
    from peft import LoraConfig

    model = get_ts_peft_model(tiny_bert, LoraConfig(r=2, target_modules=["query"]), TokenSelectiveConfig())
    wrapper = torch.nn.Module()
    wrapper.module = model
    assert unwrap_ts_model(wrapper) is model and unwrap_ts_model(model) is model
    assert unwrap_ts_model(torch.nn.Linear(2, 2)) is None


def test_multiple_choice_llama_run(tmp_path, llama_dir):
    data = write_multiple_choice(tmp_path / "mc.jsonl")
    out = tmp_path / "mc"
    metrics = train(TrainConfig(out=str(out), data=str(data), model=str(llama_dir), method="ts-lora", max_steps=3,
                                warmup_steps=1, batch_size=4, logging_steps=1, device="cpu"))
    assert metrics["task_kind"] == "multiple_choice" and metrics["train_steps"] == 3
    assert 0 <= metrics["accuracy"] <= 1 and 0 < metrics["kept_fraction"] <= 1
    assert len(read_log(out)) == 3
    example = json.loads((out / "token_masks.json").read_text())["examples"][0]
    assert example["masks"] and all(len(v) == len(example["tokens"]) for v in example["masks"].values())
    assert evaluate(EvalConfig(adapter=str(out), device="cpu"))["accuracy"] == pytest.approx(metrics["accuracy"])


def test_bf16_run_trains_fp32_weights_and_reevaluates_alike(tmp_path, llama_dir):
    """--bf16 autocasts training and evaluation; adapter weights stay fp32; `eval` reuses the run's precision."""
    data = write_multiple_choice(tmp_path / "mc.jsonl")
    out = tmp_path / "bf16"
    metrics = train(TrainConfig(out=str(out), data=str(data), model=str(llama_dir), method="ts-lora", max_steps=3,
                                warmup_steps=1, batch_size=4, device="cpu", bf16=True))
    assert metrics["bf16"] is True and 0 < metrics["kept_fraction"] <= 1
    fp32 = train(TrainConfig(out=str(tmp_path / "fp32"), data=str(data), model=str(llama_dir), method="ts-lora",
                             max_steps=3, warmup_steps=1, batch_size=4, device="cpu"))
    assert math.isfinite(metrics["final_train_loss"])
    assert metrics["final_train_loss"] != fp32["final_train_loss"]  # autocast really ran in bfloat16
    weights = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items() if "lora_" in k}
    assert weights and all(t.dtype == torch.float32 for t in weights.values())
    again = evaluate(EvalConfig(adapter=str(out), device="cpu"))
    assert again["bf16"] is True and again["accuracy"] == pytest.approx(metrics["accuracy"])
    assert again["kept_fraction"] == pytest.approx(metrics["kept_fraction"])
    assert evaluate(EvalConfig(adapter=str(out), device="cpu", bf16=False))["bf16"] is False


def test_zero_shot_none_llama(tmp_path, llama_dir):
    data = write_multiple_choice(tmp_path / "mc.jsonl")
    metrics = train(TrainConfig(out=str(tmp_path / "zs"), data=str(data), model=str(llama_dir), method="none",
                                device="cpu"))
    assert metrics["zero_shot"] and metrics["train_steps"] == 0 and metrics["kept_fraction"] is None


@pytest.mark.parametrize("method", ["lora", "adapter", "none", "ts-adapter", "ts-dora"])
def test_other_methods_save_and_reload(tmp_path, bert_dir, method):
    data = write_classification(tmp_path / "train.jsonl", n=40)
    out = tmp_path / method
    metrics = train(TrainConfig(out=str(out), data=str(data), model=str(bert_dir), method=method, max_steps=2,
                                warmup_steps=1, batch_size=8, max_length=24, device="cpu"))
    expected = {"none": None, "lora": 1.0, "adapter": 1.0}
    if method in expected:
        assert metrics["kept_fraction"] == expected[method]
        assert not (out / "token_masks.json").exists()
    else:
        assert 0 < metrics["kept_fraction"] <= 1
    assert metrics["trainable_params"] > 0 and len(read_log(out)) >= 1
    assert evaluate(EvalConfig(adapter=str(out), device="cpu"))["accuracy"] == pytest.approx(metrics["accuracy"])


def test_build_model_kinds(tiny_bert):
    import copy

    from peft import PeftModel

    assert isinstance(build_model("ts-lora", copy.deepcopy(tiny_bert), "classification"), TSPeftModel)
    dense = build_model("dora", copy.deepcopy(tiny_bert), "classification")
    assert isinstance(dense, PeftModel) and unwrap_ts_model(dense) is None
    probe = build_model("none", copy.deepcopy(tiny_bert), "classification")
    assert {n.split(".")[0] for n, p in probe.named_parameters() if p.requires_grad} == {"classifier"}
    with pytest.raises(ValueError, match="unknown method"):
        build_model("prefix", tiny_bert, "classification")


def test_trainer_save_model_writes_the_adapter(tmp_path, tiny_bert):
    from peft import LoraConfig

    from tspeft.training.fit import TSTrainer

    model = get_ts_peft_model(tiny_bert, LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"),
                              TokenSelectiveConfig(target_kept=0.5))
    model.set_thresholds(0.25)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to=[], use_cpu=True, save_strategy="no")
    TSTrainer(model=model, args=args).save_model(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "ts_config.json").is_file()
    from transformers import BertConfig, BertForSequenceClassification

    reloaded = TSPeftModel.from_pretrained(BertForSequenceClassification(BertConfig(**tiny_bert.config.to_dict())),
                                           tmp_path / "ckpt")
    assert set(reloaded.thresholds().values()) == {0.25}


def test_calibration_examples_stop_at_the_token_budget():
    """Calibration takes examples until their real tokens reach the budget, counting padding out and every choice
    of a multiple-choice feature in; labels are dropped (τ needs inputs only)."""
    from tspeft.training.fit import calibration_features

    features = [{"input_ids": [1] * 6, "attention_mask": [1] * 4 + [0] * 2, "labels": 0} for _ in range(10)]
    chosen = calibration_features(features, token_budget=10)
    assert len(chosen) == 3 and all("labels" not in f for f in chosen)  # 4 + 4 < 10 ≤ 12
    choices = [{"input_ids": [[1, 1], [1, 1, 1]], "attention_mask": [[1, 1], [1, 1, 1]], "labels": 1}] * 4
    assert len(calibration_features(choices, token_budget=10)) == 2  # 5 tokens per feature
    assert len(calibration_features(features, token_budget=10**6)) == 10
    ids_only = [{"input_ids": [0, 5, 0], "labels": 0}] * 4  # no mask: every id is real, id 0 included
    assert len(calibration_features(ids_only, token_budget=6)) == 2


def test_shipped_task_run_calibrates_on_pool_examples_it_does_not_train_on(tmp_path, bert_dir, monkeypatch):
    """With --n-train below the pool, τ is calibrated on the next pool examples (inputs only), none of which
    the run trains on; evaluated on them the way eval runs, they keep the target."""
    from tspeft.tasks import data as tasks_data

    words = ["good fine", "bad awful"]
    pool = [{"text": f"{words[i % 2]} {i} x{'y' * (i % 7)}", "label": i % 2} for i in range(80)]
    spec = tasks_data.TaskSpec("toy", "classification", lambda: (pool, None), "toy task", ("neg", "pos"))
    monkeypatch.setitem(tasks_data.TASKS, "toy", spec)
    train_set, _ = tasks_data.load_task("toy", n_train=20, n_eval=10, seed=3)
    spare = tasks_data.unused_train_examples("toy", 20, 10, 3, 640)
    assert len(spare) == 50 and not {e["text"] for e in spare} & {e["text"] for e in train_set}
    assert tasks_data.unused_train_examples("toy", None, 10, 3, 640) == []
    out = tmp_path / "toy"
    metrics = train(TrainConfig(out=str(out), task="toy", model=str(bert_dir), method="ts-lora", n_train=20, n_eval=10,
                                seed=3, max_steps=8, warmup_steps=2, target_kept=0.5, batch_size=4, lr=1e-2,
                                max_length=24, device="cpu"))
    assert metrics["calibration_examples"] == 50
    from tspeft.training.build import load_base
    from tspeft.training.run_folder import load_adapter

    base, tokenizer = load_base(str(bert_dir), "classification", 2)
    model = load_adapter(base, out, "ts-lora")
    model.reset_stats()
    with torch.no_grad():
        for example in spare:
            ids = tokenizer(example["text"], truncation=True, max_length=24, return_tensors="pt")
            model(**ids)
    assert model.kept_fraction() == pytest.approx(0.5, abs=0.02)
