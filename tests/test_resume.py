"""Resuming training (state_dict, save_pretrained, Trainer checkpoints) matches an uninterrupted run."""

from __future__ import annotations

import copy

import pytest
import torch

from models import MLP, lora, training_bert, ts_mlp
from tspeft import TokenSelectiveConfig, TSPeftModel, get_ts_peft_model
from tspeft.core.gate import GATE_SAVED

STEPS, SAVE_AT = 12, 5


def _batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 6, 12, generator=g)
    mask = (torch.rand(8, 6, generator=g) > 0.2).float()
    return x, mask


def _train(model, optimizer, steps, log):
    teacher = torch.nn.Linear(12, 12)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        teacher.weight.copy_(torch.randn(12, 12, generator=g) / 4)
        teacher.bias.zero_()
    model.train()
    for step in steps:
        x, mask = _batch(step)
        with model.real_tokens(mask):
            out = model(x)
        loss = (((out - teacher(x)) ** 2).mean(-1) * mask).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.update_thresholds()
        log.append((loss.item(), model.kept_fraction(), model.thresholds(), model.allocated_kept()))
        model.reset_stats()


def _fresh(method):
    model = ts_mlp(method, target_kept=0.5, warmup_steps=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


def _trainable_and_gate_state(model):
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    gate_fields = (*GATE_SAVED, "rule_step")
    return {k: v.clone() for k, v in model.state_dict().items() if k in names or k.endswith(gate_fields)}


@pytest.mark.parametrize("method", ["lora", "dora", "adapter"])
@pytest.mark.parametrize("how", ["state_dict", "save_pretrained"])
def test_resume_matches_uninterrupted_run(method, how, tmp_path):
    """Tolerance: none — every loss, kept fraction and τ is bit-identical (CPU, fixed data order)."""
    model, optimizer = _fresh(method)
    full = []
    _train(model, optimizer, range(STEPS), full)

    model, optimizer = _fresh(method)
    first = []
    _train(model, optimizer, range(SAVE_AT), first)
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    if how == "state_dict":
        state = _trainable_and_gate_state(model)
        assert any(k.endswith("tau") for k in state) and "rule_step" in state
        torch.save({"model": state, "optimizer": optimizer_state}, tmp_path / "ckpt.pt")
        del model, optimizer
        resumed, optimizer = _fresh(method)
        saved = torch.load(tmp_path / "ckpt.pt")
        missing, unexpected = resumed.load_state_dict(saved["model"], strict=False)
        assert not unexpected
        assert not any(k in saved["model"] for k in missing)
    else:
        model.save_pretrained(tmp_path / "adapter")
        del model, optimizer
        torch.manual_seed(0)
        resumed = TSPeftModel.from_pretrained(MLP(), tmp_path / "adapter", is_trainable=True)
        optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
        saved = {"optimizer": optimizer_state}
    optimizer.load_state_dict(saved["optimizer"])
    assert int(resumed.rule_step) == SAVE_AT
    second = []
    _train(resumed, optimizer, range(SAVE_AT, STEPS), second)
    assert first + second == full
    assert any(0 < kept < 1 for _, kept, _, _ in full), "the gate must bite during the run"


def test_trainer_checkpoint_resume_matches_uninterrupted(tmp_path):
    """transformers.Trainer + ThresholdCallback: checkpoint-k → resume_from_checkpoint gives the same τ and losses."""
    from transformers import Trainer, TrainingArguments

    from tspeft.training.callback import ThresholdCallback

    torch.manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 50, (8,)),
             "attention_mask": torch.tensor([1] * (4 + i % 5) + [0] * (4 - i % 5)),
             "labels": torch.tensor(i % 2)} for i in range(32)]

    def run(out_dir, max_steps, resume=None):
        torch.manual_seed(1)
        model = get_ts_peft_model(training_bert(), lora(["query", "value"]),
                                  TokenSelectiveConfig(target_kept=0.5, warmup_steps=2))
        args = TrainingArguments(output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=4,
                                 learning_rate=1e-2, logging_steps=1, save_steps=4, save_strategy="steps",
                                 report_to=[], use_cpu=True, seed=3, data_seed=3, disable_tqdm=True,
                                 dataloader_num_workers=0, lr_scheduler_type="constant",
                                 # TSPeftModel.forward(*args, **kwargs) has no named inputs: keep every column
                                 remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[ThresholdCallback(model)])
        trainer.train(resume_from_checkpoint=resume)
        losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
        return model, losses

    full, full_losses = run(tmp_path / "full", 8)
    first, _ = run(tmp_path / "part", 4)
    checkpoint = tmp_path / "part" / "checkpoint-4"
    assert checkpoint.is_dir()
    resumed, resumed_losses = run(tmp_path / "part", 8, resume=str(checkpoint))
    assert int(resumed.rule_step) == int(full.rule_step) == 8
    assert resumed.thresholds() == pytest.approx(full.thresholds(), rel=1e-5, abs=1e-7)
    assert any(t > 0 for t in full.thresholds().values())
    for step in range(5, 9):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-4), step
