"""Helpers for the tests that drive the `tspeft` command on tiny models: run it, read what it printed."""

from __future__ import annotations

import json

from tspeft.cli.main import main


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `tspeft argv`; a SystemExit becomes its code."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fails_in_one_line(argv, capsys, code: int = 2) -> str:
    """Run `tspeft argv`, expect exit `code` and a one-line error without a traceback; return that line."""
    got, out, err = run_cli(argv, capsys)
    assert got == code, (got, out[-2000:], err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(path)


def sentiment_rows(n: int, labels=("neg", "pos")) -> list[dict]:
    """`n` rows cycling through `labels`; each label has its own words, so a tiny model can learn them."""
    words = ["bad awful", "good great", "fine okay", "meh so so", "odd weird", "grim sad"]
    return [{"text": f"the film was {words[i % len(labels)]} {i}", "label": labels[i % len(labels)]} for i in range(n)]


def tiny_bert_folder(folder):
    """conftest's tiny BERT (2-class head over the character tokenizer), saved to `folder` as `--model` wants it."""
    from conftest import _saved, build_tiny_tokenizer
    from models import tiny_bert

    tokenizer = build_tiny_tokenizer()
    model = tiny_bert(vocab_size=len(tokenizer), intermediate_size=64, max_position_embeddings=256,
                      pad_token_id=tokenizer.pad_token_id)
    return _saved(folder, model, tokenizer)


def tiny_train_flags(model_dir) -> list[str]:
    """Flags for the shortest useful run of the tiny BERT (1 step unless the caller adds --max-steps)."""
    return ["--model", str(model_dir), "--batch-size", "8", "--max-length", "16", "--device", "cpu", "--no-report"]
