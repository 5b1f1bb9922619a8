"""Two CPU processes (gloo, torchrun) with DistributedDataParallel, and with FSDP2 (`fully_shard`), vs a single
process with the same global batch.

One torchrun launch (tests/dist_worker.py, ~20 s) feeds the DDP and FSDP tests in this module. Tolerances: τ and
kept fractions are compared exactly across ranks; against the single-process run, kept fractions exactly,
weights to 1e-6 absolute (DDP and FSDP average gradients in a different order), τ and loss slopes to 1e-6 relative.
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
    return ranks, dist_worker.run_single(), out


def test_backend_is_gloo_and_tau_is_identical_on_every_rank(runs):
    ranks, _, _ = runs
    assert [r["backend"] for r in ranks] == ["gloo", "gloo"] and ranks[0]["world"] == 2
    for variant in ("auto",):
        for a, b in zip(ranks[0][variant]["log"], ranks[1][variant]["log"]):
            assert a["tau"] == b["tau"] and a["kept_targets"] == b["kept_targets"] and a["slopes"] == b["slopes"]
        assert ranks[0][variant]["weights"] == ranks[1][variant]["weights"]
    assert any(t > 0 for step in ranks[0]["auto"]["log"] for t in step["tau"].values()), "the gate must bite"


def test_reported_kept_fraction_is_the_global_one(runs):
    ranks, single, _ = runs
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
    ranks, single, _ = runs
    _weights_match(ranks[0]["auto"], single)
    for ddp_step, one in zip(ranks[0]["auto"]["log"], single["log"]):
        assert ddp_step["slopes"] == pytest.approx(one["slopes"], rel=1e-6, abs=1e-12)
        assert ddp_step["tau"] == pytest.approx(one["tau"], rel=1e-6, abs=1e-9)


def test_fsdp2_shards_the_adapter_and_keeps_every_gate_buffer_whole_and_equal(runs):
    """FSDP2 shards every parameter on dim 0 (here: half the rows per rank); τ and the τ-rule state are buffers,
    which FSDP never shards, so each rank holds them whole, and the rule keeps them identical on both ranks."""
    ranks, _, _ = runs
    for rank in ranks:
        placement = rank["fsdp"]["placement"]
        assert placement["params"] and all(sharded and 2 * local == rows for sharded, local, rows in
                                           placement["params"].values()), placement["params"]
        gate_fields = {name.rsplit(".", 1)[1] for name in placement["buffers"]}
        assert {"tau", "allocated_kept", "loss_slope", "loss_curve", "kept_counts"} <= gate_fields
        assert all(kind == "Tensor" for kind, _ in placement["buffers"].values())  # not DTensor shards
    for a, b in zip(ranks[0]["fsdp"]["log"], ranks[1]["fsdp"]["log"]):
        assert a["tau"] == b["tau"] and a["kept_targets"] == b["kept_targets"] and a["slopes"] == b["slopes"]
        assert a["kept_global"] == b["kept_global"]
    assert ranks[0]["fsdp"]["weights"] == ranks[1]["fsdp"]["weights"]
    assert any(t > 0 for step in ranks[0]["fsdp"]["log"] for t in step["tau"].values()), "the gate must bite"


def test_fsdp2_matches_single_process(runs):
    ranks, single, _ = runs
    _weights_match(ranks[0]["fsdp"], single)
    for fsdp_step, one in zip(ranks[0]["fsdp"]["log"], single["log"]):
        assert fsdp_step["kept_global"] == one["kept_global"]
        assert fsdp_step["slopes"] == pytest.approx(one["slopes"], rel=1e-6, abs=1e-12)
        assert fsdp_step["tau"] == pytest.approx(one["tau"], rel=1e-6, abs=1e-9)


def test_fsdp2_save_and_reload(runs):
    """Every rank saves (the sharded weights are gathered): both folders hold the same tensors, equal to the
    trained weights; reloaded and re-sharded, the model has the trained τ and gives bit-identical outputs; and
    the folder loads into one unsharded process."""
    from safetensors.torch import load_file

    from tspeft import TSPeftModel

    ranks, _, out = runs
    files = [load_file(next((out / f"fsdp-rank{k}").glob("ts_adapter-*.safetensors"))) for k in range(2)]
    assert files[0].keys() == files[1].keys() and all(torch.equal(files[0][k], files[1][k]) for k in files[0])
    for rank in ranks:
        assert rank["fsdp"]["loaded_output_equal"] is True
        assert rank["fsdp"]["loaded_tau"] == rank["fsdp"]["log"][-1]["tau"]
    loaded = TSPeftModel.from_pretrained(dist_worker.MLP(), out / "fsdp-rank0")
    assert loaded.thresholds() == ranks[0]["fsdp"]["log"][-1]["tau"]
    trained = ranks[0]["fsdp"]["weights"]
    for name, p in loaded.named_parameters():
        if "lora_" in name:
            assert p.detach().flatten().tolist() == trained[name], name


# ------------------------------------------------------------------------------------------------------------
# the CLI / Trainer path under torchrun and accelerate launch, and CLI checkpoint/resume
# ------------------------------------------------------------------------------------------------------------
# Every launch: 2 CPU processes (gloo), ts-lora on a dropout-free tiny BERT, 4 steps of 2 × 4 examples, logging
# every 2 steps, $TSPEFT_DEBUG_RANK_DUMP making every rank write its own τ / metrics. The reference is one
# in-process run with batch 8 (the same global batch and, through accelerate's sharding, the same examples per
# step). Tolerances against it: τ, losses and τ means 1e-5 relative; kept fractions (training log and eval) 1e-6
# absolute (observed: identical). Across ranks: exact equality.

TRAIN_FLAGS = ["--method", "ts-lora", "--max-steps", "4", "--warmup-steps", "1", "--target-kept", "0.5",
               "--max-length", "24", "--lr", "1e-2", "--logging-steps", "2", "--device", "cpu", "--seed", "0"]


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    """A tiny BERT without dropout (so 2 × 4 examples train exactly like 8) and a small classification file."""
    from conftest import _saved, build_tiny_tokenizer
    from models import tiny_bert
    from test_training import write_classification

    folder = tmp_path_factory.mktemp("cli_inputs")
    tokenizer = build_tiny_tokenizer()
    bert = _saved(folder / "bert", tiny_bert(vocab_size=len(tokenizer), intermediate_size=64,
                                             max_position_embeddings=256, dropout=0.0,
                                             pad_token_id=tokenizer.pad_token_id), tokenizer)
    data = write_classification(folder / "train.jsonl", n=40)
    return {"data": str(data), "model": str(bert), "folder": folder}


@pytest.fixture(scope="module")
def one_thread():
    """In-process runs on one thread, as the launched workers (OMP_NUM_THREADS=1): on a busy 2-core machine two
    threads made a 4-step run of the tiny BERT 80 times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_run(cli_inputs, one_thread):
    from tspeft.cli.main import main

    out = cli_inputs["folder"] / "single"
    assert main(["train", "--data", cli_inputs["data"], "--model", cli_inputs["model"], *TRAIN_FLAGS,
                 "--batch-size", "8", "--no-report", "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text()), _read_log(out)


def _launch(launcher: list[str], cli_inputs, name: str) -> dict:
    out, dump = cli_inputs["folder"] / name, cli_inputs["folder"] / f"{name}-ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TSPEFT_DEBUG_RANK_DUMP": str(dump),
           "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    command = [*launcher, "-m", "tspeft.cli.main", "train", "--data", cli_inputs["data"], "--model",
               cli_inputs["model"], *TRAIN_FLAGS, "--batch-size", "4", "--out", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads(path.read_text()) for path in sorted(dump.glob("rank*.json"))]
    return {"out": out, "stdout": result.stdout, "ranks": ranks}


@pytest.fixture(scope="module")
def torchrun_run(cli_inputs):
    bin_dir = Path(sys.executable).parent
    return _launch([str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2"], cli_inputs, "torchrun")


@pytest.fixture(scope="module")
def accelerate_run(cli_inputs):
    # `--multi_gpu` is accelerate's torch.distributed launcher (it runs torchrun); with `--device cpu` the processes
    # train on CPU with gloo. `--cpu --num_processes 2` would start ONE process (accelerate runs several CPU
    # processes only through mpirun, which is not installed): see docs/distributed.md.
    bin_dir = Path(sys.executable).parent
    return _launch([str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", "0"],
                   cli_inputs, "accelerate")


def _saved_taus(out: Path) -> dict[str, float]:
    from safetensors.torch import load_file

    (weights,) = out.glob("ts_adapter-*.safetensors")
    return {key[len("gate."):-len(".tau")]: float(value) for key, value in load_file(weights).items()
            if key.startswith("gate.") and key.endswith(".tau")}


def _check_launch(run, single_run):
    single_metrics, single_log = single_run
    out, ranks = run["out"], run["ranks"]
    # two processes, one main; only the main one printed and wrote (one log line per logged step, no duplicates)
    assert [(r["process_index"], r["world_size"], r["is_main"]) for r in ranks] == [(0, 2, True), (1, 2, False)]
    assert run["stdout"].count("metrics in") == 1 and run["stdout"].count("[tspeft] report:") == 1
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("ts_adapter-")) == [
        "adapter_config.json", "labels.json", "metrics.json", "report", "report.html", "run_state.json",
        "token_masks.json", "token_stats.json", "train_log.jsonl", "ts_config.json"]
    metrics, log = json.loads((out / "metrics.json").read_text()), _read_log(out)
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 8 and metrics["train_steps"] == 4
    # every rank ends with the same τ / rule state, and that is what was saved
    assert ranks[0]["tau"] == ranks[1]["tau"] == metrics["tau_per_module"] == _saved_taus(out)
    assert ranks[0]["kept_targets"] == ranks[1]["kept_targets"] and ranks[0]["rule_step"] == ranks[1]["rule_step"] == 4
    untimed = [{k: v for k, v in m.items() if not k.endswith("_seconds")}
               for m in (ranks[0]["metrics"], ranks[1]["metrics"], metrics)]
    assert untimed[0] == untimed[1] == untimed[2]  # every rank evaluated the whole eval set: same accuracy / kept
    assert any(t > 0 for t in metrics["tau_per_module"].values()), "the gate must bite"
    # the global numbers equal the single-process run with the same global batch
    assert metrics["tau_per_module"] == pytest.approx(single_metrics["tau_per_module"], rel=1e-5, abs=1e-9)
    assert metrics["kept_fraction"] == pytest.approx(single_metrics["kept_fraction"], abs=1e-6)
    assert metrics["accuracy"] == single_metrics["accuracy"]
    assert metrics["final_train_loss"] == pytest.approx(single_metrics["final_train_loss"], rel=1e-5)
    assert [r["step"] for r in log] == [r["step"] for r in single_log] == [1, 2, 4]
    for ddp_line, one in zip(log, single_log):
        assert ddp_line["loss"] == pytest.approx(one["loss"], rel=1e-5)  # not N × the loss
        assert ddp_line["kept_fraction"] == pytest.approx(one["kept_fraction"], abs=1e-6)  # Σkept/Σreal over ranks
        assert ddp_line["mean_tau"] == pytest.approx(one["mean_tau"], rel=1e-5, abs=1e-9)
    assert log[-1]["kept_fraction"] < 1


def test_cli_train_under_torchrun(torchrun_run, single_run):
    _check_launch(torchrun_run, single_run)


def test_cli_train_under_accelerate_launch(accelerate_run, single_run):
    _check_launch(accelerate_run, single_run)


def test_cli_resume_matches_uninterrupted_run(cli_inputs, one_thread, tmp_path, monkeypatch):
    """--save-steps 2 --max-steps 4 stopped by Ctrl-C at step 3, then `--resume-from-checkpoint last` (the newest
    checkpoint of the unfinished run, checkpoint-2), against the same run uninterrupted. Tolerance: none — τ,
    kept fractions, losses and the metrics are identical (CPU, fixed data order)."""
    from tspeft.cli.main import main
    from tspeft.training.callback import ThresholdCallback
    from tspeft.training.staging import staging_folder

    full, out = tmp_path / "full", tmp_path / "run"
    argv = ["train", "--data", cli_inputs["data"], "--model", cli_inputs["model"], *TRAIN_FLAGS, "--batch-size", "4",
            "--logging-steps", "1", "--no-report", "--save-steps", "2"]
    assert main([*argv, "--out", str(full)]) == 0
    full_metrics, full_log = json.loads((full / "metrics.json").read_text()), _read_log(full)
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]

    original = ThresholdCallback.on_step_end

    def stop_at_step_3(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        if state.global_step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(ThresholdCallback, "on_step_end", stop_at_step_3)
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out", str(out)])
    assert info.value.code == 130
    monkeypatch.undo()
    checkpoints = staging_folder(out) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2"] and not out.exists()
    state = json.loads((checkpoints / "checkpoint-2" / "ts_config.json").read_text())
    assert state["gated_modules"] and (checkpoints / "checkpoint-2" / "optimizer.pt").is_file()
    assert main([*argv, "--resume-from-checkpoint", "last", "--out", str(out)]) == 0
    resumed, resumed_log = json.loads((out / "metrics.json").read_text()), _read_log(out)
    assert resumed["resumed_from"] == str(out / "checkpoints" / "checkpoint-2") and resumed["train_steps"] == 4
    assert resumed_log == full_log  # steps 1-2 kept from the interrupted run, 3-4 written again: same τ, kept, loss
    assert [r["step"] for r in resumed_log] == [1, 2, 3, 4] and 0 < resumed_log[-1]["kept_fraction"] < 1
    for key in ("tau_per_module", "kept_fraction", "per_module", "accuracy", "mean_tau"):
        assert resumed[key] == full_metrics[key], key


@pytest.mark.parametrize("spec, message", [
    ("no/such/dir", "no such folder no/such/dir"),
    ("last", "nothing was checkpointed: use --save-steps"),
    ("EMPTY", "holds no Trainer checkpoint"),
])
def test_cli_resume_errors(spec, message, cli_inputs, tmp_path, capsys):
    from tspeft.cli.main import main

    (tmp_path / "empty").mkdir()
    spec = str(tmp_path / "empty") if spec == "EMPTY" else spec
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", cli_inputs["data"], "--model", cli_inputs["model"], "--out", str(tmp_path / "run"),
              "--resume-from-checkpoint", spec])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --resume-from-checkpoint" in err and message in err
