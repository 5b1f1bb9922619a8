"""Instruction tuning with TRL's SFTTrainer and a token-selective LoRA (tspeft), on the embedded SmolLM2.

    python examples/sft_trl.py --out runs/sft-trl [--max-steps 30]

SFTTrainer gets the transformers model inside the TSPeftModel (`ts_model.get_base_model()`: the LoRA layers
and their gates are in it) so it can patch that model's forward as it patches any causal LM; the
`ThresholdCallback` steps the τ rule after every optimizer step. The data is the shipped ASDiv task as
prompt/completion pairs: TRL masks the prompt tokens from the loss (completion-only loss).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from tspeft import TokenSelectiveConfig, get_ts_peft_model
from tspeft.tasks.data import load_task
from tspeft.tasks.resources import load_model_and_tokenizer
from tspeft.training.callback import ThresholdCallback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/sft-trl")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--n-train", type=int, default=240)
    args = parser.parse_args()

    model, tokenizer = load_model_and_tokenizer("smollm2", "causal_lm")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    ts_model = get_ts_peft_model(model, lora,
                                 TokenSelectiveConfig(target_kept=0.7, warmup_steps=10))
    train, _ = load_task("asdiv", n_train=args.n_train, n_eval=100)
    data = Dataset.from_list([{"prompt": ex["prompt"], "completion": ex["response"]} for ex in train])
    config = SFTConfig(output_dir=str(Path(args.out) / "checkpoints"), max_steps=args.max_steps,
                       per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=5, save_strategy="no",
                       report_to=[], max_length=256)
    trainer = SFTTrainer(model=ts_model.get_base_model(), args=config, train_dataset=data, processing_class=tokenizer,
                         callbacks=[ThresholdCallback(ts_model, out_dir=args.out)])
    trainer.train()
    ts_model.save_pretrained(args.out)  # the adapter and its τ: `tspeft generate --adapter OUT --prompt ...`
    print(f"kept fraction over the last logging window: {trainer.state.log_history[-2].get('kept_fraction')}")
    print(f"adapter saved to {args.out}")


if __name__ == "__main__":
    main()
