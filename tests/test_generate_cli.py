"""`tspeft generate`: a saved TS adapter on its base, streamed greedy output equal to step-by-step gated decoding
(no KV cache), per-token kept shares with --show-kept, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from tspeft import TSPeftModel
from tspeft.cli.main import main
from tspeft.tasks.resources import load_model_and_tokenizer
from tspeft.training.run_config import TrainConfig
from tspeft.training.train import train


@pytest.fixture
def gen_run(tmp_path, llama_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b)})
                              for a in range(5) for b in range(4)) + "\n")
    out = tmp_path / "run"
    train(TrainConfig(model=str(llama_dir), data=str(data), method="ts-lora", max_steps=4, batch_size=4, out=str(out),
                      n_eval=4, max_new_tokens=3, warmup_steps=1, target_kept=0.5,
                      lr=1e-3))  # τ is set while the model barely moved: it still talks
    return out, llama_dir


def _step_by_step(model, tokenizer, prompt: str, n: int) -> list[int]:
    ids = tokenizer(prompt)["input_ids"]
    start = len(ids)
    with torch.no_grad():
        for _ in range(n):
            mask = torch.ones(1, len(ids), dtype=torch.long)
            logits = model(input_ids=torch.tensor([ids]), attention_mask=mask).logits
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            ids.append(token)
    return ids[start:]


def test_generate_streams_what_step_by_step_gated_decoding_gives(gen_run, capsys):
    out, llama_dir = gen_run
    assert any(t > 0 for t in json.loads((out / "metrics.json").read_text())["tau_per_module"].values())
    assert main(["generate", "--adapter", str(out), "--prompt", "3+1=", "--max-new-tokens", "6",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    base, tokenizer = load_model_and_tokenizer(str(llama_dir), "causal_lm")
    model = TSPeftModel.from_pretrained(base, out)
    expected = tokenizer.decode(_step_by_step(model, tokenizer, "3+1=", 6), skip_special_tokens=True)
    assert printed == expected + "\n"

    assert main(["generate", "--adapter", str(out), "--prompt", "3+1=", "--max-new-tokens", "6", "--show-kept"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ids = _step_by_step(model, tokenizer, "3+1=", 6)
    assert len(ids) >= 2  # something to compare
    eos_line = int(len(ids) < 6)  # a stopping eos is printed too
    assert len(lines) == len(ids) + eos_line
    shares = [float(line.split()[0]) for line in lines]
    assert all(0 <= s <= 1 for s in shares)


def test_generate_bad_input(gen_run, tmp_path, capsys):
    out, _ = gen_run
    with pytest.raises(SystemExit):
        main(["generate", "--adapter", str(out), "--prompt", "x", "--chat"])
    assert "--chat: this model's tokenizer has no chat template" in capsys.readouterr().err
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(SystemExit):
        main(["generate", "--adapter", str(out), "--prompts", str(bad)])
    assert "p.jsonl: line 1: expected a JSON object with a text field 'prompt'" in capsys.readouterr().err
    prompts = tmp_path / "p.txt"
    prompts.write_text("1+1=\n2+2=\n")
    assert main(["generate", "--adapter", str(out), "--prompts", str(prompts), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.count("### prompt") == 2
