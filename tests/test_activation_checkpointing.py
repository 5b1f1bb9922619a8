"""Activation checkpointing (non-reentrant and reentrant) gives the same gradients and gate statistics."""

from __future__ import annotations

import pytest
import torch

from models import lora, training_bert, training_llama
from tspeft import TokenSelectiveConfig, get_ts_peft_model


def _checkpoint_run(make_base, targets, dora, inputs, checkpointing):
    torch.manual_seed(5)
    model = get_ts_peft_model(make_base(), lora(targets, dora=dora), TokenSelectiveConfig(target_kept=0.5))
    base = model.get_base_model()
    if checkpointing is not None:
        base.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        if checkpointing == "reentrant":
            base.enable_input_require_grads()  # frozen embeddings: reentrant checkpointing needs an input with grad
    model.train()
    with torch.no_grad():
        model(**inputs)
    # median-ish thresholds so about half the tokens are dropped
    model.set_thresholds({n: g.mean_relative_magnitude() for n, g in model.gates.items()})
    for gate in model.gates.values():
        gate.clear_rule_stats()
    model.reset_stats()
    out = model(**inputs)
    out.loss.backward() if out.loss is not None else out.logits.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    stats = {n: (g.kept_counts.clone(), g.r_histogram.clone(), g.change_histogram.clone())
             for n, g in model.gates.items()}
    return grads, stats, model.kept_fraction()


CHECKPOINT_CASES = {
    "bert-lora": (training_bert, ["query", "value", "dense"], False,
                  lambda: {"input_ids": torch.randint(1, 50, (3, 9)), "labels": torch.tensor([0, 1, 1]),
                           "attention_mask": torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 4 + [0] * 5])}),
    "llama-dora": (training_llama, ["q_proj", "v_proj", "down_proj"], True,
                   lambda: {"input_ids": torch.randint(1, 50, (2, 7)), "labels": torch.randint(1, 50, (2, 7)),
                            "attention_mask": torch.tensor([[1] * 7, [0] * 2 + [1] * 5])}),
    "llama-lora": (training_llama, ["q_proj", "o_proj", "up_proj"], False,
                   lambda: {"input_ids": torch.randint(1, 50, (2, 7)), "labels": torch.randint(1, 50, (2, 7))}),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_gradient_checkpointing_gives_same_gradients_and_statistics(case, mode="non_reentrant"):
    make_base, targets, dora, make_inputs = CHECKPOINT_CASES[case]
    torch.manual_seed(9)
    inputs = make_inputs()
    plain_grads, plain_stats, plain_kept = _checkpoint_run(make_base, targets, dora, inputs, None)
    ckpt_grads, ckpt_stats, ckpt_kept = _checkpoint_run(make_base, targets, dora, inputs, mode)
    assert 0 < plain_kept < 1, "thresholds must drop some tokens for the comparison to mean anything"
    assert ckpt_kept == plain_kept
    assert plain_grads.keys() == ckpt_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    for name, (counts, histogram, changes) in plain_stats.items():
        c_counts, c_histogram, c_changes = ckpt_stats[name]
        assert torch.equal(c_counts, counts), f"{name}: kept_counts {c_counts} vs {counts} (double counting?)"
        assert torch.equal(c_histogram, histogram), f"{name}: r histogram differs"
        assert changes.abs().sum() > 0, f"{name}: no loss change recorded"
        torch.testing.assert_close(c_changes, changes, atol=1e-9, rtol=1e-6, msg=f"{name}: loss changes by r bin")


@pytest.mark.parametrize("case", ["bert-lora", "llama-dora"])
def test_reentrant_checkpointing_counts_real_tokens_only(case):
    """use_reentrant=True runs the forward under no_grad and re-runs it in backward, where the loss-change hooks
    are registered; the recomputation must still see the attention mask, or pad tokens' c_i would be recorded.
    Cases without padding (llama-lora) agree."""
    test_gradient_checkpointing_gives_same_gradients_and_statistics(case, mode="reentrant")


def test_reentrant_checkpointing_without_padding_is_exact():
    test_gradient_checkpointing_gives_same_gradients_and_statistics("llama-lora", mode="reentrant")
