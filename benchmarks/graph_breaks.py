"""torch.compile graph breaks of a gated training forward, per method (the table in docs/distributed.md).

    python benchmarks/graph_breaks.py

A tiny MLP with LoRA, DoRA or the bottleneck adapter on both layers, train mode, one forward and the loss, under
`torch._dynamo.explain`; prints graphs, breaks and each distinct break reason with the line that caused it.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from peft import LoraConfig
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from tspeft import BottleneckConfig, TokenSelectiveConfig, get_ts_peft_model  # noqa: E402


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(12, 24), nn.Linear(24, 12)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def main() -> None:
    warnings.simplefilter("ignore")
    for method in ("lora", "dora", "adapter"):
        torch.manual_seed(0)
        config = (BottleneckConfig(target_modules=["lin0", "lin1"], bottleneck_size=4) if method == "adapter" else
                  LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights=False, use_dora=method == "dora"))
        model = get_ts_peft_model(MLP(), config, TokenSelectiveConfig(target_kept=0.5, warmup_steps=0)).train()
        explained = torch._dynamo.explain(lambda x: model(x).pow(2).mean())(torch.randn(2, 5, 12))
        print(f"{method}: {explained.graph_count} graphs, {explained.graph_break_count} breaks")
        for reason in sorted({f"{Path(r.user_stack[-1].filename).name}:{r.user_stack[-1].lineno} "
                              f"{r.reason.splitlines()[0][:100]}" for r in explained.break_reasons}):
            print(f"    {reason}")
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
