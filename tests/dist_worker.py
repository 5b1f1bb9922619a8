"""Worker for tests/test_distributed.py: a few DDP steps of a tiny TS model on CPU (gloo).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py OUT_DIR

Every rank trains on its slice of the same global batch and writes OUT_DIR/rank<k>.json with, per step,
τ, the kept fraction after `reduce_stats()` (global) and before it (local), and the final weights, under
"auto" (`update_thresholds()` reduces its statistics over ranks by itself), and the same under "fsdp": FSDP2
(`fully_shard` on each gated layer and the root, gloo), plus where each rank's parameters and gate buffers live,
the adapter saved by every rank (OUT_DIR/fsdp-rank<k>) and a reloaded, re-sharded model's output.
`run_single(global_batch)` is the single-process reference with the whole global batch.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from peft import LoraConfig
from torch import nn

from models import MLP
from tspeft import TokenSelectiveConfig, get_ts_peft_model

STEPS, GLOBAL_BATCH, SEQ, D = 5, 8, 6, 12


def make_model():
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights=False)
    return get_ts_peft_model(MLP(D), config, TokenSelectiveConfig(target_kept=0.5, warmup_steps=1))


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, SEQ, D, generator=g)
    target = torch.randn(GLOBAL_BATCH, SEQ, D, generator=g) * 0.1
    mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=g) > 0.3).float()
    mask[:, 0] = 1
    return x, target, mask


def train(ts_model, wrapped, rank: int, world: int, all_reduce=None):
    optimizer = torch.optim.SGD([p for p in ts_model.parameters() if p.requires_grad], lr=0.5)
    ts_model.train()
    log = []
    for step in range(STEPS):
        x, target, mask = batch(step)
        rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        x, target, mask = x[rows], target[rows], mask[rows]
        with ts_model.real_tokens(mask):
            out = wrapped(x)
        loss = nn.functional.mse_loss(out, target)  # a per-rank mean: DDP averages the gradients
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ts_model.update_thresholds(all_reduce=all_reduce)
        local = ts_model.kept_fraction()
        local_counts = [g.kept_counts.tolist() for g in ts_model.gates.values()]
        ts_model.reduce_stats()
        log.append({"tau": ts_model.thresholds(), "kept_global": ts_model.kept_fraction(), "kept_local": local,
                    "local_counts": local_counts, "kept_targets": ts_model.allocated_kept(),
                    "slopes": ts_model.loss_slopes(), "loss": loss.item()})
        ts_model.reset_stats()
    weights = {n: whole(p.detach()).flatten().tolist() for n, p in ts_model.named_parameters() if p.requires_grad}
    return {"log": log, "weights": weights}


def whole(tensor):
    """A parameter's full value (FSDP2 keeps each rank's shard in a DTensor; gathering is a collective)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard(ts_model):
    """FSDP2 as users apply it: one unit per gated layer, then the root; τ and the gate's statistics are buffers."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for name in ts_model.gates:
        fully_shard(ts_model.get_base_model().get_submodule(name), mesh=mesh)
    fully_shard(ts_model, mesh=mesh)
    return ts_model


def placement(ts_model) -> dict:
    """Per trainable parameter: (sharded?, local rows, rows); per gate buffer: its type and whether it is whole."""
    from torch.distributed.tensor import DTensor

    params = {n: [isinstance(p, DTensor), (p.to_local() if isinstance(p, DTensor) else p).shape[0], p.shape[0]]
              for n, p in ts_model.named_parameters() if p.requires_grad}
    buffers = {n: [type(b).__name__, list(b.shape)] for n, b in ts_model.named_buffers() if "ts_gate" in n}
    return {"params": params, "buffers": buffers}


def run_fsdp(out_dir: str, rank: int, world: int) -> dict:
    from tspeft import TSPeftModel

    ts_model = shard(make_model())
    result = {"placement": placement(ts_model), **train(ts_model, ts_model, rank, world)}
    folder = os.path.join(out_dir, f"fsdp-rank{rank}")
    ts_model.save_pretrained(folder)  # every rank: the sharded weights are gathered
    torch.manual_seed(0)
    loaded = shard(TSPeftModel.from_pretrained(MLP(), folder, is_trainable=True))
    x, _, _ = batch(STEPS)
    with torch.no_grad():
        ts_model.eval()
        result["loaded_output_equal"] = bool(torch.equal(ts_model(x), loaded(x)))
    result["loaded_tau"] = loaded.thresholds()
    return result


def run_single():
    ts_model = make_model()
    return train(ts_model, ts_model, 0, 1)


def main(out_dir: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.set_num_threads(1)
    result = {"world": world, "backend": torch.distributed.get_backend()}
    for name, all_reduce in (("auto", None),):
        ts_model = make_model()
        ddp = nn.parallel.DistributedDataParallel(ts_model)
        result[name] = train(ts_model, ddp, rank, world, all_reduce)
    result["fsdp"] = run_fsdp(out_dir, rank, world)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
