"""Self-contained HTML report for one ``tspeft train`` run folder.

Inputs (in ``run_dir``): ``metrics.json``, ``train_log.jsonl`` (at least one of them is
required) and the optional ``token_masks.json``.  Outputs: ``run_dir/report.html`` with
all figures embedded as base64 PNGs, plus the same PNGs in ``run_dir/report/``.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.io import atomic_write
from ..training.run_folder import METRICS, POSITION_MASKS, REPORT, REPORT_FIGURES, TOKEN_MASKS, TOKEN_STATS, TRAIN_LOG
from ..training.staging import require_complete
from . import plots
from .overlays import position_section
from .tokens import group_by_layer, layer_index, layer_token_matrix, module_type, to_float

MAX_TOKEN_EXAMPLES = 4
SUMMARY_KEYS = [
    ("task", "Task"),
    ("model", "Model"),
    ("method", "Method"),
    ("seed", "Seed"),
    ("accuracy", "Accuracy"),
    ("kept_fraction", "Kept fraction (overall)"),
    ("train_seconds", "Train seconds"),
    ("trainable_params", "Trainable params"),
]


@dataclass
class RunData:
    run_dir: Path
    metrics: dict[str, Any] | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    bad_log_lines: int = 0
    token_masks: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def load_run(run_dir: str | os.PathLike) -> RunData:
    """Read the run folder; raises ValueError if neither metrics.json nor train_log.jsonl exists."""
    run_dir = Path(run_dir)
    require_complete(run_dir, "run folder")
    if not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} does not exist or is not a directory")
    mpath, lpath, tpath = run_dir / METRICS, run_dir / TRAIN_LOG, run_dir / TOKEN_MASKS
    if not mpath.is_file() and not lpath.is_file():
        raise ValueError(
            f"{run_dir} is not a tspeft run folder: missing both metrics.json and train_log.jsonl "
            "(at least one is needed to build a report)"
        )
    data = RunData(run_dir=run_dir)
    if mpath.is_file():
        try:
            m = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{mpath} is not valid JSON: {e}") from e
        if not isinstance(m, dict):
            raise ValueError(f"{mpath} must hold a JSON object, got {type(m).__name__}")
        data.metrics = m
    else:
        data.notes.append("metrics.json was not found; the summary table is empty.")
    if lpath.is_file():
        for line in lpath.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                data.bad_log_lines += 1  # e.g. a line cut short by an interrupted run
                continue
            if isinstance(rec, dict):
                data.log.append(rec)
            else:
                data.bad_log_lines += 1
        if data.bad_log_lines:
            data.notes.append(f"train_log.jsonl: skipped {data.bad_log_lines} unreadable line(s).")
        if not data.log:
            data.notes.append("train_log.jsonl holds no usable entries; no training curves.")
    else:
        data.notes.append("train_log.jsonl was not found; no training curves.")
    if tpath.is_file():
        try:
            tm = json.loads(tpath.read_text(encoding="utf-8"))
            data.token_masks = tm if isinstance(tm, dict) else None
            if data.token_masks is None:
                data.notes.append("token_masks.json does not hold a JSON object; ignored.")
        except json.JSONDecodeError as e:
            data.notes.append(f"token_masks.json is not valid JSON ({e}); ignored.")
    return data


# ----------------------------------------------------------------------------- series


def _steps(log: list[dict[str, Any]]) -> list[float]:
    out = []
    for i, rec in enumerate(log):
        s = to_float(rec.get("step"))
        out.append(float(i) if s is None else s)
    return out


def _dict_series(log: list[dict[str, Any]], key: str) -> dict[str, list[float | None]]:
    names: list[str] = []
    seen = set()
    for rec in log:
        d = rec.get(key)
        if isinstance(d, dict):
            for n in d:
                if n not in seen:
                    seen.add(n)
                    names.append(n)
    out = {n: [] for n in names}
    for rec in log:
        d = rec.get(key) if isinstance(rec.get(key), dict) else {}
        for n in names:
            out[n].append(to_float(d.get(n)))
    return out


def _per_layer_series(log: list[dict[str, Any]], key: str) -> dict[int, list[float | None]]:
    per_layer: dict[int, list[float | None]] = {}
    for i, rec in enumerate(log):
        d = rec.get(key)
        means = group_by_layer(d) if isinstance(d, dict) else {}
        for layer in means:
            per_layer.setdefault(layer, [None] * len(log))
        for layer in per_layer:
            per_layer[layer][i] = means.get(layer)
    return dict(sorted(per_layer.items()))


def _overall_series(log: list[dict[str, Any]]) -> list[float | None]:
    out = []
    for rec in log:
        v = to_float(rec.get("kept_fraction"))
        if v is None and isinstance(rec.get("kept_per_module"), dict):
            vals = [to_float(x) for x in rec["kept_per_module"].values()]
            vals = [x for x in vals if x is not None]
            v = sum(vals) / len(vals) if vals else None
        out.append(v)
    return out


# ----------------------------------------------------------------------------- html


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v.is_integer() and abs(v) >= 1000:
            return f"{int(v):,}"
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.1f}"
    if isinstance(v, (dict, list)):
        s = json.dumps(v, ensure_ascii=False)
        return s if len(s) <= 120 else s[:117] + "…"
    return str(v)


def _img_tag(png: Path, alt: str) -> str:
    b64 = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt, quote=True)}">'


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f4f4f4} figure{margin:1em 0} img{max-width:100%;height:auto}
figcaption{color:#444;font-size:.92em;margin-top:.3em}
.note{color:#8a5a00;background:#fff7e6;padding:.4em .6em;border-left:3px solid #e0a000}
code{background:#f4f4f4;padding:0 .2em}
"""


@dataclass
class _Page:
    """What every report section needs: the run, where its figures go, the notes it adds, the log's span."""

    data: RunData
    fig_dir: Path
    notes: list[str]
    steps: list[float]
    span: str

    def figure(self, png: Path, caption: str) -> str:
        return f"<figure>{_img_tag(png, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _kept_and_tau_sections(page: _Page) -> list[str]:
    """1. kept fraction over training; 2. τ trajectories."""
    log, steps, span, sections = page.data.log, page.steps, page.span, []
    if not log:
        return sections
    per_layer = _per_layer_series(log, "kept_per_module")
    target = _per_layer_series(log, "kept_target_per_module")
    overall = _overall_series(log)
    if per_layer or any(v is not None for v in overall):
        png = plots.plot_kept_fraction(steps, overall, per_layer, target or None, page.fig_dir / "kept_fraction.png")
        sections.append("<h2>Kept fraction during training</h2>" + page.figure(
            png,
            "Fraction of tokens whose adapter update was applied (r_i ≥ τ), on the training batches "
            f"of {span}. Thick red: overall kept fraction; thin lines: per-layer mean over that "
            "layer's adapted modules, colored by layer"
            + ("; dotted: per-layer mean of the kept-fraction target." if target else "."),
        ))
    else:
        page.notes.append("train_log.jsonl has no kept_fraction / kept_per_module values.")
    tau = _dict_series(log, "tau_per_module")
    mean_tau = [to_float(r.get("mean_tau")) for r in log]
    if tau:
        png = plots.plot_tau(steps, tau, mean_tau, page.fig_dir / "tau.png")
        sections.append("<h2>Threshold τ per module</h2>" + page.figure(
            png,
            f"τ of each adapted module over {span}; one panel per module type, one thin line per "
            "module colored by its layer; dashed red: mean τ over all modules.",
        ))
    else:
        page.notes.append("train_log.jsonl has no tau_per_module values; no τ plot.")
    return sections


def _module_heatmap_section(page: _Page) -> list[str]:
    """3. final per-module kept fraction heatmap."""
    data, per_module, source = page.data, None, ""
    if data.metrics and isinstance(data.metrics.get("per_module"), dict) and data.metrics["per_module"]:
        per_module, source = data.metrics["per_module"], "metrics.json (per_module)"
    else:
        for rec in reversed(data.log):
            if isinstance(rec.get("kept_per_module"), dict) and rec["kept_per_module"]:
                per_module = rec["kept_per_module"]
                source = f"the last train_log.jsonl entry with per-module values (step {rec.get('step')})"
                break
    if not per_module:
        page.notes.append("No per-module kept fractions recorded; no module heatmap.")
        return []
    png = plots.plot_module_heatmap(per_module, page.fig_dir / "module_heatmap.png",
                                    "Final kept fraction per module")
    n_mod = len(per_module)
    return ["<h2>Final kept fraction per module</h2>" + page.figure(
        png,
        f"Final kept fraction of each of the {n_mod} adapted modules, from {source}, arranged as "
        "layer × module type (gray: no adapted module there). A module that keeps more tokens applies "
        "its update more often, so this also serves as an importance view.",
    )]


def _token_mask_section(page: _Page) -> list[str]:
    """4. token heatmaps."""
    esc, data = html.escape, page.data
    examples = []
    if data.token_masks is not None and isinstance(data.token_masks.get("examples"), list):
        examples = [e for e in data.token_masks["examples"]
                    if isinstance(e, dict) and isinstance(e.get("tokens"), list) and isinstance(e.get("masks"), dict)]
    token_parts = []
    for k, ex in enumerate(examples[:MAX_TOKEN_EXAMPLES]):
        tokens = [str(t) for t in ex["tokens"]]
        layers, mat = layer_token_matrix(tokens, ex["masks"])
        if not layers or not tokens:
            continue
        png = plots.plot_token_heatmap(tokens, layers, mat, page.fig_dir / f"tokens_{k}.png",
                                       f"Example {k + 1}: tokens updated per layer")
        shown = min(len(tokens), plots.MAX_TOKENS)
        text = " ".join(tokens[:shown]) + (" …" if len(tokens) > shown else "")
        cap = (f"Example {k + 1} from token_masks.json ({len(tokens)} tokens"
               + (f", first {shown} shown" if shown < len(tokens) else "")
               + f", {len(ex['masks'])} modules): cell = fraction of that layer's adapted modules whose "
               "update was applied at the token (1 = all kept, 0 = all dropped; gray = not recorded).")
        token_parts.append(page.figure(png, cap) + f"<p><small>Tokens: <code>{esc(text)}</code></small></p>")
    if not token_parts and (data.run_dir / POSITION_MASKS).is_file():
        return []  # an image run: its positions have their own section
    return ["<h2>Which tokens each layer updated</h2>" + (
        "".join(token_parts) if token_parts else
        '<p class="note">No token masks were recorded for this run (token_masks.json is missing or holds no '
        "usable examples), so there are no per-token heatmaps.</p>")]


def _token_stats_section(page: _Page) -> list[str]:
    """4b. token kinds, positions and vocabulary (token_stats.json, written by `tspeft train` for ts-* runs)."""
    esc = html.escape
    stats_path = page.data.run_dir / TOKEN_STATS
    if not stats_path.is_file():
        return []
    try:
        stats = json.loads(stats_path.read_text())
        png = plots.plot_token_kinds(stats["by_kind"], stats["by_position"], page.fig_dir / "token_kinds.png",
                                     "Kept fraction by token kind and position")
        kinds = sorted({k for layer in stats["by_kind"].values() for k in layer})
        head = "".join(f"<th>{esc(k)}</th>" for k in kinds)
        body = "".join(
            f"<tr><th>{esc(layer)}</th>" + "".join(
                f"<td>{esc(_fmt(stats['by_kind'][layer].get(k, {}).get('kept_fraction')))}</td>" for k in kinds)
            + "</tr>" for layer in sorted(stats["by_kind"], key=int))
        vocab = "".join(f"<tr><td>{esc(t)}</td><td>{esc(_fmt(f))}</td><td>{n}</td><td>{esc(t2)}</td>"
                        f"<td>{esc(_fmt(f2))}</td><td>{n2}</td></tr>"
                        for (t, f, n), (t2, f2, n2) in zip(stats["most_kept_tokens"], stats["least_kept_tokens"]))
        return [
            "<h2>Which kinds of tokens are kept</h2>" + page.figure(
                png, f"Kept fraction per layer by token kind and by position, measured on the "
                     f"{esc(stats.get('measured_on', 'eval examples'))} ({esc(stats.get('note', ''))}).")
            + f"<table><tr><th>layer</th>{head}</tr>{body}</table>"
            + "<h3>Most and least kept tokens</h3><table><tr><th>most kept</th><th>kept</th><th>seen</th>"
              f"<th>least kept</th><th>kept</th><th>seen</th></tr>{vocab}</table>"]
    except (ValueError, KeyError, TypeError) as error:
        page.notes.append(f"token_stats.json could not be used ({error}); no token-kind section.")
        return []


def _loss_section(page: _Page) -> list[str]:
    """5. loss."""
    log = page.data.log
    if log and any(to_float(r.get("loss")) is not None for r in log):
        png = plots.plot_loss(page.steps, [to_float(r.get("loss")) for r in log], page.fig_dir / "loss.png")
        return ["<h2>Training loss</h2>" + page.figure(
            png, f"Training loss as logged on the training batches of {page.span}.")]
    if log:
        page.notes.append("train_log.jsonl has no loss values; no loss plot.")
    return []


def _summary(page: _Page) -> str:
    """The summary table (metrics.json) and the last training-log line."""
    esc, m, log = html.escape, page.data.metrics or {}, page.data.log
    rows = "".join(f"<tr><th>{esc(label)}</th><td>{esc(_fmt(m.get(key)))}</td></tr>" for key, label in SUMMARY_KEYS)
    shown_keys = {k for k, _ in SUMMARY_KEYS} | {"per_module"}
    extra = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(_fmt(v))}</td></tr>"
                    for k, v in m.items() if k not in shown_keys)
    summary = ("<h2>Summary</h2><p>Values from <code>metrics.json</code>; accuracy is as recorded by the "
               "training run's evaluation.</p><table>" + rows + "</table>")
    if extra:
        summary += "<details><summary>Other recorded metrics</summary><table>" + extra + "</table></details>"
    if log:
        last = log[-1]
        summary += (f"<p>Training log: {esc(page.span)}; last logged loss {esc(_fmt(to_float(last.get('loss'))))}, "
                    f"kept fraction {esc(_fmt(to_float(last.get('kept_fraction'))))}, "
                    f"mean τ {esc(_fmt(to_float(last.get('mean_tau'))))}.</p>")
    return summary


def _position_section(page: _Page) -> list[str]:
    """4a. image runs: the kept positions of each gated layer drawn over a few eval images."""
    labels = (page.data.metrics or {}).get("label_names")
    return position_section(page.data.run_dir, page.fig_dir, labels, page.notes, page.figure)


SECTIONS = (_kept_and_tau_sections, _module_heatmap_section, _position_section, _token_mask_section,
            _token_stats_section, _loss_section)


def write_report(run_dir: str | os.PathLike) -> Path:
    """Build ``run_dir/report.html`` (images embedded) and PNGs in ``run_dir/report/``.

    Raises ValueError when the folder has neither ``metrics.json`` nor ``train_log.jsonl``.
    """
    data = load_run(run_dir)
    fig_dir = data.run_dir / REPORT_FIGURES
    fig_dir.mkdir(parents=True, exist_ok=True)
    steps = _steps(data.log)
    span = (f"{len(data.log)} logged training steps (step {steps[0]:g} to {steps[-1]:g})" if data.log else "")
    page = _Page(data, fig_dir, list(data.notes), steps, span)
    sections = [html_part for section in SECTIONS for html_part in section(page)]
    summary = _summary(page)
    esc, m = html.escape, data.metrics or {}
    note_html = "".join(f'<p class="note">{esc(n)}</p>' for n in page.notes)
    title = "tspeft run report — " + " / ".join(str(m[k]) for k in ("task", "model", "method") if m.get(k) is not None)
    doc = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1><p>Run folder: <code>{esc(str(data.run_dir))}</code></p>"
        + summary + note_html + "".join(sections) + "</body></html>\n"
    )
    out = data.run_dir / REPORT
    _atomic_write_text(out, doc)
    return out


__all__ = ["write_report", "load_run", "RunData", "layer_index", "module_type"]
