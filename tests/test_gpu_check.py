"""scripts/gpu_check.sh and its Python parts on a machine without CUDA: they parse, skip cleanly and say why."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_extras  # noqa: E402
import trim_wheel  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_env.sh", "fetch_gpu_wheels.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True)


@no_cuda
def test_gpu_check_without_cuda_exits_2_with_one_line():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"gpu_check: no CUDA device visible to {sys.executable} (torch.cuda.is_available() is False): "
        "nothing to check"]


@no_cuda
@pytest.mark.parametrize("check", ["sync", "deepspeed", "bnb4bit"])
def test_checks_are_skipped_without_cuda(check, tmp_path):
    out = tmp_path / f"{check}.json"
    assert gpu_extras.main([check, "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {"check": check, "status": "skipped", "reason": "no CUDA device"}


def test_pins_and_environment_checks(capsys):
    assert gpu_extras.pinned()["transformers"] and "torch" not in gpu_extras.pinned()
    assert gpu_extras.main(["pins"]) == 0
    assert f"peft=={gpu_extras.pinned()['peft']}" in capsys.readouterr().out.split()
    assert gpu_extras.main(["env-ok"]) == 0  # this venv holds the pinned stack
    report = gpu_extras.env_report()
    assert report["torch"] == torch.__version__ and report["packages"]["peft"] == gpu_extras.pinned()["peft"]


def test_summary_collects_steps_and_results(tmp_path):
    (tmp_path / "steps.tsv").write_text("env\t0\t12\ncuda-tests\t1\t80\nbnb-4bit\tskipped: time budget spent\t0\n")
    (tmp_path / "deepspeed_zero2.json").write_text(json.dumps({"status": "failed", "failed": ["x"], "losses": [1.0]}))
    out = tmp_path / "gpu_check.json"
    steps = str(tmp_path / "steps.tsv")
    assert gpu_extras.main(["summary", "--steps", steps, "--seconds", "95", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["steps"][1] == {"step": "cuda-tests", "exit": "1", "seconds": 80} and summary["total_seconds"] == 95
    assert summary["results"] == {"deepspeed_zero2": {"status": "failed", "failed": ["x"]}}


def test_trim_wheel_keeps_one_cuda_library_and_a_valid_record(tmp_path):
    source = tmp_path / "src" / "bitsandbytes-1.0-py3-none-any.whl"
    source.parent.mkdir()
    files = {"bitsandbytes/__init__.py": b"x", "bitsandbytes/libbitsandbytes_cpu.so": b"c",
             "bitsandbytes/libbitsandbytes_cuda130.so": b"k" * 10,
             "bitsandbytes/libbitsandbytes_cuda128.so": b"d" * 99,
             "bitsandbytes/libbitsandbytes_rocm72.so": b"r", "bitsandbytes-1.0.dist-info/RECORD": b"stale"}
    with zipfile.ZipFile(source, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    target = trim_wheel.trim(str(source), str(tmp_path), ["130"])
    with zipfile.ZipFile(target) as wheel:
        names = set(wheel.namelist())
        record = wheel.read("bitsandbytes-1.0.dist-info/RECORD").decode().splitlines()
    assert names == set(files) - {"bitsandbytes/libbitsandbytes_cuda128.so", "bitsandbytes/libbitsandbytes_rocm72.so"}
    assert sorted(line.split(",")[0] for line in record) == sorted(names)
    assert any(line.startswith("bitsandbytes/libbitsandbytes_cuda130.so,sha256=") and line.endswith(",10")
               for line in record)
