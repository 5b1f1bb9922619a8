"""Run folders as transactions (issue #14): a run is written into a staging folder and published with one
rename when it finishes; a finished run is never overwritten without --overwrite, which replaces it whole; an
interrupted run keeps its checkpoints in the staging folder, can be resumed, and is refused by eval / report /
importance with what to do instead; a torn newest checkpoint falls back to the newest complete one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cli_helpers import fails_in_one_line, run_cli, sentiment_rows, tiny_bert_folder, tiny_train_flags, write_jsonl
from tspeft.training.callback import ThresholdCallback


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny BERT folder, a data file and one finished ts-lora run (2 steps) to copy from."""
    from tspeft.cli.main import main

    root = tmp_path_factory.mktemp("runs")
    model_dir = tiny_bert_folder(root / "bert")
    data = write_jsonl(root / "train.jsonl", sentiment_rows(32))
    flags = ["--data", data, *tiny_train_flags(model_dir)]
    assert main([str(a) for a in ["train", *flags, "--method", "ts-lora", "--max-steps", "2", "--warmup-steps", "1",
                                  "--out", root / "finished"]]) == 0
    return root, flags


def finished_copy(setup, tmp_path) -> Path:
    root, _ = setup
    out = tmp_path / "run"
    shutil.copytree(root / "finished", out)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def staging_of(out: Path) -> Path:
    from tspeft.training.staging import staging_folder

    return staging_folder(out)


def interrupt_at(monkeypatch, step: int) -> None:
    """Make training stop with Ctrl-C (KeyboardInterrupt) at the end of optimizer step `step`."""
    original = ThresholdCallback.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        if state.global_step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(ThresholdCallback, "on_step_end", on_step_end)


def test_a_finished_run_records_that_it_is_complete(setup):
    root, _ = setup
    state = json.loads((root / "finished" / "run_state.json").read_text())
    assert state["state"] == "complete" and state["method"] == "ts-lora"
    assert not staging_of(root / "finished").exists()


def test_case2_existing_run_is_refused_without_overwrite(setup, tmp_path, capsys):
    _, flags = setup
    out = finished_copy(setup, tmp_path)
    before = snapshot(out)
    line = fails_in_one_line(["train", *flags, "--method", "lora", "--max-steps", "1", "--out", out], capsys)
    assert f"--out {out}: holds a finished run (ts-lora on train); pass --overwrite to replace it" in line
    assert snapshot(out) == before


def test_case2_overwrite_replaces_the_run_whole(setup, tmp_path, capsys):
    _, flags = setup
    out = finished_copy(setup, tmp_path)
    code, _, _ = run_cli(["train", *flags, "--method", "lora", "--max-steps", "1", "--overwrite", "--out", out],
                         capsys)
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert not {"ts_config.json", "token_masks.json", "token_stats.json"} & names
    assert not any(name.startswith("ts_adapter-") for name in names)
    assert json.loads((out / "metrics.json").read_text())["method"] == "lora"
    code, printed, _ = run_cli(["eval", "--adapter", out, "--device", "cpu"], capsys)
    assert code == 0 and "(lora)" in printed


def test_case3_interrupted_rerun_keeps_the_old_run_intact(setup, tmp_path, capsys, monkeypatch):
    _, flags = setup
    out = finished_copy(setup, tmp_path)
    before = snapshot(out)
    interrupt_at(monkeypatch, 1)
    code, _, err = run_cli(["train", *flags, "--method", "ts-lora", "--max-steps", "3", "--overwrite", "--out", out],
                           capsys)
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert snapshot(out) == before  # the old log, metrics and adapter, untouched


def test_killed_run_can_be_resumed_and_is_refused_until_then(setup, tmp_path, capsys, monkeypatch):
    _, flags = setup
    out = tmp_path / "run"
    train = ["train", *flags, "--method", "ts-lora", "--max-steps", "3", "--warmup-steps", "1", "--save-steps", "1"]
    interrupt_at(monkeypatch, 2)
    assert run_cli([*train, "--out", out], capsys)[0] == 130
    monkeypatch.undo()
    staging = staging_of(out)
    assert not out.exists() and (staging / "checkpoints" / "checkpoint-1").is_dir()
    assert json.loads((staging / "run_state.json").read_text())["state"] == "running"

    line = fails_in_one_line(["eval", "--adapter", out, "--device", "cpu"], capsys)
    assert f"this run did not finish; its checkpoints are in {staging / 'checkpoints'}" in line
    assert "--resume-from-checkpoint last" in line
    assert "did not finish" in fails_in_one_line(["eval", "--adapter", staging, "--device", "cpu"], capsys)
    assert "did not finish" in fails_in_one_line(["report", staging], capsys)
    assert "did not finish" in fails_in_one_line(["importance", "--adapter", staging], capsys)
    line = fails_in_one_line([*train, "--out", out], capsys)
    assert "did not finish" in line and "--resume-from-checkpoint last" in line and "--overwrite" in line

    code, _, _ = run_cli([*train, "--resume-from-checkpoint", "last", "--out", out], capsys)
    assert code == 0 and not staging.exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 3 and metrics["resumed_from"].endswith("checkpoint-1")  # step 2 was not saved
    assert json.loads((out / "run_state.json").read_text())["state"] == "complete"


def _interrupted_with_checkpoints(setup, tmp_path, capsys, monkeypatch):
    _, flags = setup
    out = tmp_path / "run"
    train = ["train", *flags, "--method", "ts-lora", "--max-steps", "4", "--warmup-steps", "1", "--save-steps", "1"]
    interrupt_at(monkeypatch, 3)
    assert run_cli([*train, "--out", out], capsys)[0] == 130
    monkeypatch.undo()
    return out, train, staging_of(out) / "checkpoints"


def test_torn_newest_checkpoint_falls_back_to_the_newest_complete_one(setup, tmp_path, capsys, monkeypatch):
    out, train, checkpoints = _interrupted_with_checkpoints(setup, tmp_path, capsys, monkeypatch)
    newest = max(checkpoints.iterdir(), key=lambda p: int(p.name.split("-")[1]))
    (newest / "trainer_state.json").unlink()  # what a Ctrl-C during the save leaves: the state is written last
    code, _, err = run_cli([*train, "--resume-from-checkpoint", "last", "--out", out], capsys)
    assert code == 0
    previous = f"checkpoint-{int(newest.name.split('-')[1]) - 1}"
    assert f"{newest.name} is incomplete" in err and f"resuming from {previous}" in err
    assert json.loads((out / "metrics.json").read_text())["resumed_from"].endswith(previous)


@pytest.mark.parametrize("missing", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_resume_without_optimizer_scheduler_or_rng_state_is_refused(setup, tmp_path, capsys, monkeypatch, missing):
    out, train, checkpoints = _interrupted_with_checkpoints(setup, tmp_path, capsys, monkeypatch)
    for checkpoint in checkpoints.iterdir():
        (checkpoint / missing).unlink()
    line = fails_in_one_line([*train, "--resume-from-checkpoint", "last", "--out", out], capsys)
    assert missing in line and "--resume-from-checkpoint" in line
    assert staging_of(out).is_dir()  # nothing lost


def test_compare_folder_is_refused_then_replaced_whole(setup, tmp_path, capsys):
    _, flags = setup
    out = tmp_path / "cmp"
    compare = ["compare", *flags, "--seeds", "0", "--max-steps", "1"]
    assert run_cli([*compare, "--methods", "lora", "--out", out], capsys)[0] == 0
    before = snapshot(out)
    line = fails_in_one_line([*compare, "--methods", "none", "--out", out], capsys)
    assert f"--out {out}: holds a finished comparison" in line and "--overwrite" in line
    assert snapshot(out) == before
    assert run_cli([*compare, "--methods", "none", "--overwrite", "--out", out], capsys)[0] == 0
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"none-s0"}
    assert json.loads((out / "compare.json").read_text())["methods"] == ["none"]


def test_out_at_a_file_or_in_a_read_only_folder_is_one_line(setup, tmp_path, capsys, monkeypatch):
    _, flags = setup
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    line = fails_in_one_line(["train", *flags, "--method", "lora", "--max-steps", "1", "--out", a_file], capsys)
    assert f"--out {a_file}: is a file" in line and a_file.read_text() == "mine"
    line = fails_in_one_line(["train", *flags, "--method", "lora", "--max-steps", "1", "--out", a_file / "run"],
                             capsys)
    assert str(a_file) in line and "Not a directory" in line and a_file.read_text() == "mine"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root ignores folder permissions: refuse the folder's creation as the OS would
        original = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if Path(self).parent == locked:
                raise PermissionError(13, "Permission denied", str(self))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    try:
        line = fails_in_one_line(["train", *flags, "--method", "lora", "--max-steps", "1", "--out", locked / "run"],
                                 capsys)
        assert "Permission denied" in line and str(locked) in line
    finally:
        monkeypatch.undo()
        locked.chmod(0o700)


@pytest.mark.parametrize("bad", [["--model", "NOT_A_MODEL"], ["--max-length", "1"]])
def test_bad_model_or_length_leaves_no_run_folder(setup, tmp_path, capsys, bad):
    _, flags = setup
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("not a model")
    bad = [str(not_a_model) if b == "NOT_A_MODEL" else b for b in bad]
    out = tmp_path / "run"
    line = fails_in_one_line(["train", *flags, *bad, "--method", "lora", "--max-steps", "1", "--out", out], capsys)
    if bad[0] == "--model":
        assert f"argument --model: {not_a_model} is not a model folder (no config.json)" in line
    else:
        assert "argument --max-length" in line
    assert not out.exists() and not staging_of(out).exists()
