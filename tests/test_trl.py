"""A token-selective model and the τ-rule callback inside TRL's SFTTrainer (prompt/completion data)."""

from __future__ import annotations

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from tspeft import TokenSelectiveConfig, TSPeftModel, get_ts_peft_model
from tspeft.training.callback import ThresholdCallback


def test_sft_trainer_trains_gates_and_saves(tmp_path, tiny_llama, tiny_tokenizer):
    torch.manual_seed(0)
    ts = get_ts_peft_model(tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"),
                           TokenSelectiveConfig(target_kept=0.5, warmup_steps=1))
    data = Dataset.from_list([{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(5) for b in range(5)])
    args = SFTConfig(output_dir=str(tmp_path / "ckpt"), max_steps=5, per_device_train_batch_size=4, logging_steps=1,
                     report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-2, max_length=32, bf16=False)
    trainer = SFTTrainer(model=ts.get_base_model(), args=args, train_dataset=data, processing_class=tiny_tokenizer,
                         callbacks=[ThresholdCallback(ts, out_dir=tmp_path)])
    batch = next(iter(trainer.get_train_dataloader()))
    prompt_len = len(tiny_tokenizer("0+0=")["input_ids"])
    assert (batch["labels"][:, :prompt_len] == -100).all()  # completion-only loss: the prompt is masked
    before = {n: p.detach().clone() for n, p in ts.named_parameters() if "lora_B" in n}
    trainer.train()
    assert int(ts.rule_step) == 5  # the callback stepped the τ rule once per optimizer step
    assert any(t > 0 for t in ts.thresholds().values())
    assert any(not torch.equal(before[n], p) for n, p in ts.named_parameters() if n in before)
    kept = [log["kept_fraction"] for log in trainer.state.log_history if "kept_fraction" in log]
    assert kept and kept[0] == 1.0 and min(kept) < 1.0  # the gate bites after the warm-up
    assert (tmp_path / "train_log.jsonl").is_file()

    ts.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([tiny_tokenizer("3+4=")["input_ids"]])
    ts.eval()
    expected = ts(input_ids=ids).logits
    torch.manual_seed(0)  # the same random base weights as the tiny_llama fixture (training froze them)
    fresh = LlamaForCausalLM(tiny_llama.config).eval()
    loaded = TSPeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
