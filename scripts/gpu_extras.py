"""The parts of scripts/gpu_check.sh that are Python: environment checks, the sync report, DeepSpeed ZeRO-2 and a
4-bit bitsandbytes base on one GPU, and the summary.

    python scripts/gpu_extras.py env-ok | env-report | pins
    python scripts/gpu_extras.py sync|deepspeed|bnb4bit --out FILE.json
    python scripts/gpu_extras.py summary --steps steps.tsv --seconds N --out gpu_check.json

Each check writes its JSON (status "ok", "failed" with the failed checks, or "skipped" with the reason: no CUDA,
or the optional package is not installed) and exits 1 only when a check failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import math
import os
import platform
import sys
import tempfile
import time
import tomllib
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# GPU_EXTRAS_DEVICE=cpu: a dry run of the deepspeed / bnb4bit code on the CPU (what runs without a GPU at all)
DEVICE = os.environ.get("GPU_EXTRAS_DEVICE", "cuda")
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]


def pinned() -> dict[str, str]:
    """The `name==version` pins of pyproject.toml, torch excluded (the GPU machine brings its own build)."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==", 1) for d in dependencies if "==" in d)
    pins.pop("torch", None)
    return pins


def version_of(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def env_ok() -> int:
    wrong = {name: (version_of(name), want) for name, want in pinned().items() if version_of(name) != want}
    for name in ("pytest", "safetensors", "accelerate"):
        if version_of(name) is None:
            wrong[name] = (None, "any")
    for name, (have, want) in wrong.items():
        print(f"{name}: installed {have}, wanted {want}")
    return 1 if wrong else 0


def env_report() -> dict:
    import torch

    from provenance import code_commit

    names = ["transformers", "peft", "accelerate", "safetensors", "tokenizers", "deepspeed", "bitsandbytes", "numpy"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device_name": device, "packages": {n: version_of(n) for n in names},
            "commit": code_commit(), "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


# ----- models ------------------------------------------------------------------------------------------------------
def tiny_llama(device: str = DEVICE):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    return LlamaForCausalLM(config).to(device)


def llama_batch(device: str = DEVICE, batch: int = 4, seq: int = 32):
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq // 2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def ts_lora(model, target_kept: float = 0.5):
    from peft import LoraConfig

    from tspeft import TokenSelectiveConfig, get_ts_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return get_ts_peft_model(model, config, TokenSelectiveConfig(target_kept=target_kept, warmup_steps=1))


def checked(record: dict, checks: dict[str, bool]) -> int:
    failed = [name for name, ok in checks.items() if not ok]
    record.update({"status": "failed" if failed else "ok", "checks": checks, "failed": failed})
    return 1 if failed else 0


# ----- sync report -------------------------------------------------------------------------------------------------
def sync_report(record: dict) -> int:
    """Where the host syncs of one training step come from, per phase (set_sync_debug_mode("warn"))."""
    import torch

    model = ts_lora(tiny_llama())
    model.train()
    batch = llama_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    phases = {"forward_backward": lambda: model(**batch).loss.backward(), "optimizer_step": optimizer.step,
              "update_thresholds": model.update_thresholds, "zero_grad": optimizer.zero_grad}
    for _ in range(3):
        for run in phases.values():
            run()
    torch.cuda.synchronize()
    report = {}
    for name, run in phases.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
        report[name] = {"syncs": len(syncs), "where": sorted(set(syncs))}
    from_tspeft = [w for phase in ("forward_backward",) for w in report[phase]["where"]
                   if w.split(":")[0] in ("gate.py", "attach.py", "variant.py", "tokens.py", "model.py")]
    record["phases"] = report
    return checked(record, {"no sync from tspeft's gate in forward+backward": not from_tspeft,
                            "the τ rule syncs at most once": report["update_thresholds"]["syncs"] <= 1})


# ----- DeepSpeed ZeRO-2 on one GPU ------------------------------------------------------------------------------
def deepspeed_zero2(record: dict) -> int:
    try:
        import deepspeed
    except Exception as error:  # noqa: BLE001 - not installed, or it cannot load here
        record.update({"status": "skipped", "reason": f"deepspeed unavailable: {type(error).__name__}: {error}"})
        return 0
    import torch

    from tspeft import TSPeftModel

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT", "29533")})
    model = ts_lora(tiny_llama())
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
              "zero_allow_untested_optimizer": True, "steps_per_print": 1000}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    batch, losses = llama_batch(), []
    for _ in range(10):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        model.update_thresholds()
        losses.append(float(loss.detach()))
    taus = model.thresholds()
    model.reset_stats()
    with torch.no_grad():
        engine(**batch)
    kept = model.kept_fraction()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = TSPeftModel.from_pretrained(tiny_llama(), folder)
    gate = next(iter(model.gates.values()))
    record.update({"deepspeed": deepspeed.__version__, "losses": losses, "tau": taus, "kept_fraction": kept})
    return checked(record, {
        "losses finite": all(math.isfinite(v) for v in losses),
        "the gate bites (some τ > 0)": any(t > 0 for t in taus.values()),
        "kept fraction between 0.2 and 0.8": kept is not None and 0.2 < kept < 0.8,
        "τ stays fp32 and the counts fp64 (bf16 engine)":
            gate.tau.dtype == torch.float32 and gate.kept_counts.dtype == torch.float64,
        "saved τ reloads": loaded.thresholds() == taus,
    })


# ----- 4-bit base ----------------------------------------------------------------------------------------------
def bnb_4bit(record: dict) -> int:
    try:
        import bitsandbytes
    except Exception as error:  # noqa: BLE001
        record.update({"status": "skipped", "reason": f"bitsandbytes unavailable: {type(error).__name__}: {error}"})
        return 0
    import torch
    from peft import get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as folder:
        tiny_llama("cpu").save_pretrained(folder)
        where = {"": 0 if DEVICE == "cuda" else "cpu"}
        load = lambda: LlamaForCausalLM.from_pretrained(folder, quantization_config=quantization, device_map=where)  # noqa: E731
        model, reference_base = ts_lora(load()), load()
    reference = get_peft_model(reference_base, model.peft_config)
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    set_peft_model_state_dict(reference, get_peft_model_state_dict(model.model))
    batch = llama_batch()
    hooks = sorted({type(h).__name__ for h in model._attachments
                    if not isinstance(h, torch.utils.hooks.RemovableHandle)})  # 4-bit layers: the hook route
    with torch.no_grad():
        model.eval(), reference.eval()
        same_at_zero = torch.allclose(model(**batch).logits, reference(**batch).logits, atol=1e-3, rtol=1e-3)
        model.set_thresholds(math.inf)
        with reference.disable_adapter():
            same_at_inf = torch.equal(model(**batch).logits, reference(**batch).logits)
        model.set_thresholds(0.0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, every_adapter_weight_trained = [], True
    for _ in range(10):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        # bitsandbytes 0.50.2 on CPU gave no input gradient through 4-bit layers after an eval pass (plain peft too)
        every_adapter_weight_trained &= all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
        optimizer.step()
        model.update_thresholds()
        losses.append(float(loss.detach()))
    record.update({"bitsandbytes": bitsandbytes.__version__, "hooks": hooks, "losses": losses,
                   "tau": model.thresholds()})
    return checked(record, {"τ = 0 equals peft on the 4-bit base": same_at_zero,
                            "τ = ∞ equals the 4-bit base": same_at_inf,
                            "losses finite": all(math.isfinite(v) for v in losses),
                            "every LoRA weight gets a gradient": every_adapter_weight_trained,
                            "the gate bites (some τ > 0)": any(t > 0 for t in model.thresholds().values())})


def summary(steps: Path, seconds: int, out: Path) -> dict:
    rows = [line.split("\t") for line in steps.read_text().splitlines() if line.strip()]
    folder = out.parent
    results = {}
    for name in ("sync", "deepspeed_zero2", "bnb_4bit"):
        path = folder / f"{name}.json"
        if path.exists():
            record = json.loads(path.read_text())
            results[name] = {k: v for k, v in record.items() if k in ("status", "failed", "reason")}
    environment = folder / "environment.json"
    return {"machine": json.loads(environment.read_text()) if environment.exists() else None, "total_seconds": seconds,
            "steps": [{"step": n, "exit": rc, "seconds": int(s)} for n, rc, s in rows], "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["env-ok", "env-report", "pins", "sync", "deepspeed", "bnb4bit", "summary"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--steps", type=Path)
    parser.add_argument("--seconds", type=int, default=0)
    args = parser.parse_args(argv)
    if args.what == "env-ok":
        return env_ok()
    if args.what == "pins":  # what gpu_check.sh asks pip for: the pins, plus what the checks import
        pins = [f"{name}=={version}" for name, version in pinned().items()]
        print(" ".join(pins + ["accelerate", "safetensors", "pytest"]))
        return 0
    if args.what == "env-report":
        print(json.dumps(env_report(), indent=1))
        return 0
    if args.out is None:
        parser.error(f"{args.what}: --out FILE.json is required")
    if args.what == "summary":
        record, rc = summary(args.steps, args.seconds, args.out), 0
    else:
        import torch

        record = {"check": args.what}
        if DEVICE == "cuda" and not torch.cuda.is_available():
            record.update({"status": "skipped", "reason": "no CUDA device"})
            rc = 0
        else:
            started = time.perf_counter()
            rc = {"sync": sync_report, "deepspeed": deepspeed_zero2, "bnb4bit": bnb_4bit}[args.what](record)
            record["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from tspeft.core.io import atomic_write

    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))
    print(json.dumps({k: record.get(k) for k in ("check", "status", "failed", "reason") if k in record}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
