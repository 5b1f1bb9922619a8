"""Two CPU processes (gloo, torchrun) with DistributedDataParallel vs a single process with the same global batch.

One torchrun launch (tests/dist_worker.py, ~15 s) feeds every test in this module. Tolerances: τ and kept
fractions are compared exactly across ranks; against the single-process run, kept fractions exactly,
weights to 1e-6 absolute (DDP averages gradients in a different order), τ and loss slopes to 1e-6 relative.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).parent / "dist_worker.py"), str(out)]  # --standalone: a free port is picked
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{k}.json").read_text()) for k in range(2)]
    return ranks, dist_worker.run_single()


def test_backend_is_gloo_and_tau_is_identical_on_every_rank(runs):
    ranks, _ = runs
    assert [r["backend"] for r in ranks] == ["gloo", "gloo"] and ranks[0]["world"] == 2
    for variant in ("auto",):
        for a, b in zip(ranks[0][variant]["log"], ranks[1][variant]["log"]):
            assert a["tau"] == b["tau"] and a["kept_targets"] == b["kept_targets"] and a["slopes"] == b["slopes"]
        assert ranks[0][variant]["weights"] == ranks[1][variant]["weights"]
    assert any(t > 0 for step in ranks[0]["auto"]["log"] for t in step["tau"].values()), "the gate must bite"


def test_reported_kept_fraction_is_the_global_one(runs):
    ranks, single = runs
    for k, step in enumerate(ranks[0]["auto"]["log"]):
        other = ranks[1]["auto"]["log"][k]
        assert step["kept_global"] == other["kept_global"] == single["log"][k]["kept_global"]
        # global = Σ kept / Σ real over both ranks' local counts
        kept = sum(c[0] for r in (step, other) for c in r["local_counts"])
        real = sum(c[1] for r in (step, other) for c in r["local_counts"])
        assert step["kept_global"] == pytest.approx(kept / real, abs=1e-12)
    assert any(s["kept_local"] != o["kept_local"] for s, o in zip(ranks[0]["auto"]["log"], ranks[1]["auto"]["log"])), \
        "ranks see different tokens, so their local kept fractions should differ somewhere"


def _weights_match(ddp, single):
    for name, values in single["weights"].items():
        got = ddp["weights"]["model." + name] if "model." + name in ddp["weights"] else ddp["weights"][name]
        assert max(abs(a - b) for a, b in zip(got, values)) < 1e-6, name


def test_ddp_automatic_all_reduce_matches_single_process(runs):
    """update_thresholds()'s automatic all_reduce works with gloo and averages Σc_i over ranks (each rank's
    c_i come from its own mean loss, and DDP averages gradients), so τ matches the single-process run."""
    ranks, single = runs
    _weights_match(ranks[0]["auto"], single)
    for ddp_step, one in zip(ranks[0]["auto"]["log"], single["log"]):
        assert ddp_step["slopes"] == pytest.approx(one["slopes"], rel=1e-6, abs=1e-12)
        assert ddp_step["tau"] == pytest.approx(one["tau"], rel=1e-6, abs=1e-9)
