"""Count the aten operations a gated layer and a τ-rule step issue, against plain peft (no timing: a count).

    python benchmarks/op_counts.py            # -> benchmarks/results/op_counts.json
    python benchmarks/op_counts.py --src OTHER_CHECKOUT/src --out benchmarks/results/op_counts_before.json

At small layer sizes a step's cost is mostly per-operation overhead (CPU dispatch, GPU kernel launches), so the
number of operations the gate adds is what the train-step ratio is made of there. Model: MLP 12 → 24 → 12 with
LoRA/DoRA r = 4 on both layers (or the bottleneck adapter), 4 × 6 tokens, train mode; one forward + backward
after three steps, and one `update_thresholds()`, counted by a TorchDispatchMode (views included); and the ops of
one `update_thresholds()` for stacks of 2, 24 and 120 gated layers.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
SRC = Path(sys.argv[sys.argv.index("--src") + 1]) if "--src" in sys.argv else HERE.parent / "src"
sys.path[:0] = [str(HERE), str(SRC)]  # this checkout's code (or --src's), not an installed copy
from provenance import code_commit  # noqa: E402
from tspeft import BottleneckConfig, TokenSelectiveConfig, get_ts_peft_model  # noqa: E402
from tspeft.core.adapter import inject_bottleneck_adapters  # noqa: E402


class Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 12))


def config(method: str):
    if method == "adapter":
        return BottleneckConfig(target_modules=["0", "2"], bottleneck_size=4)
    return LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False, use_dora=method == "dora")


def counted(fn) -> collections.Counter[str]:
    with Counter() as counter:
        fn()
    return counter.ops


def count(method: str) -> dict:
    x = torch.randn(4, 6, 12, generator=torch.Generator().manual_seed(1))
    gated = get_ts_peft_model(mlp(), config(method), TokenSelectiveConfig(target_kept=0.5, warmup_steps=0)).train()
    for _ in range(3):
        gated(x).pow(2).mean().backward()
        gated.update_thresholds()
    if method == "adapter":
        twin = mlp()
        inject_bottleneck_adapters(twin, config(method))
    else:
        twin = get_peft_model(mlp(), config(method))
    twin.train()(x).pow(2).mean().backward()
    gated_ops = counted(lambda: gated(x).pow(2).mean().backward())
    twin_ops = counted(lambda: twin(x).pow(2).mean().backward())
    rule_ops = counted(gated.update_thresholds)
    added = gated_ops.copy()
    added.subtract(twin_ops)
    layers = len(gated.gates)
    return {"method": method, "gated_layers": layers, "forward_backward_ops": sum(gated_ops.values()),
            "twin_forward_backward_ops": sum(twin_ops.values()),
            "added_ops_per_layer": (sum(gated_ops.values()) - sum(twin_ops.values())) / layers,
            "rule_step_ops": sum(rule_ops.values()),
            "added_by_op": {k: v for k, v in sorted(added.items(), key=lambda kv: -kv[1]) if v}}


def rule_ops_by_modules(counts=(2, 24, 120)) -> dict[str, int]:
    """aten ops of one `update_thresholds()` for a stack of `n` gated Linear(12, 12) layers (LoRA r = 4), after two
    rule steps: what the rule's fixed cost per optimizer step grows with (MiniLM has 24 gated layers, SmolLM2 120
    in speed.py)."""
    ops = {}
    for n in counts:
        torch.manual_seed(0)
        stack = nn.Sequential(*[m for _ in range(n) for m in (nn.Linear(12, 12), nn.Tanh())])
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=[str(2 * i) for i in range(n)], init_lora_weights=False)
        gated = get_ts_peft_model(stack, lora, TokenSelectiveConfig(target_kept=0.5, warmup_steps=1)).train()
        x = torch.randn(4, 6, 12, generator=torch.Generator().manual_seed(1))
        for _ in range(2):
            gated(x).pow(2).mean().backward()
            gated.update_thresholds()
        gated(x).pow(2).mean().backward()  # the statistics of the counted step
        ops[str(n)] = sum(counted(gated.update_thresholds).values())
    return ops


def _commit_of(src: Path) -> str | None:
    import subprocess

    done = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "results" / "op_counts.json"))
    parser.add_argument("--src", help="count another checkout's src/ (e.g. main before a change)")
    args = parser.parse_args(argv)
    commit = code_commit() if args.src is None else _commit_of(Path(args.src))
    rule_by_modules = rule_ops_by_modules()
    records = [count(method) | {"commit": commit, "src": str(SRC), "torch": torch.__version__} for method in
               ("lora", "dora", "adapter")]
    records[0]["rule_step_ops_by_gated_layers"] = rule_by_modules  # LoRA stacks of 2, 24, 120 gated layers
    for r in records:
        print(f"{r['method']:8s} fwd+bwd {r['forward_backward_ops']} ops (twin {r['twin_forward_backward_ops']}), "
              f"+{r['added_ops_per_layer']:.0f} per gated layer; τ-rule step {r['rule_step_ops']} ops")
    print(f"τ-rule step ops by gated layers: {rule_by_modules}")
    Path(args.out).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
