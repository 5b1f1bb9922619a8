"""Smoke test of benchmarks/speed.py and benchmarks/speed_table.py at tiny sizes (a few seconds)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
REQUIRED = {"case", "hidden", "tokens", "method", "baseline", "train_step_ratio", "peak_memory_ratio",
            "inference_ratio", "kept_fraction", "machine"}


def _load(name: str):
    if str(BENCHMARKS) not in sys.path:  # the benchmark modules import each other (tau_tables, provenance)
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def speed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    _load("speed").main(["--quick", "--hidden", "32", "--tokens", "128", "--skip-minilm", "--rule-steps", "2",
                         "--min-repeats", "1", "--max-repeats", "2", "--train-budget", "0", "--inference-budget", "0",
                         "--out", str(out)])
    return out


def test_speed_records(speed_run):
    records = json.loads(speed_run.read_text())
    assert {(r["phase"], r["method"]) for r in records} == {
        ("train", "ts-lora"), ("train", "ts-dora"), ("train", "ts-adapter"), ("inference", "lora-merged"),
        ("inference", "ts-lora"), ("inference", "ts-lora-skip")}
    for r in records:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert {"platform", "cpu_count", "torch", "device_name"} <= set(r["machine"])
        if r["phase"] == "train":
            assert r["train_step_ratio"] > 0 and r["peak_memory_ratio"] > 0 and r["inference_ratio"] is None
            assert r["train_step_s"] > 0 and r["peak_memory_bytes"] > 0 and "cpu" in r["memory_measure"]
            assert 0 <= r["kept_fraction"] <= 1
        else:
            assert r["inference_ratio"] > 0 and r["train_step_ratio"] is None
    kept = sorted(r["kept_fraction"] for r in records if r["method"] == "ts-lora" and r["phase"] == "inference")
    assert kept == pytest.approx([0.2, 0.5, 1.0], abs=0.02)  # calibrated thresholds keep the asked fraction


def test_speed_table(speed_run, tmp_path):
    out = tmp_path / "SPEED.md"
    _load("speed_table").main(["--json", str(speed_run), "--out", str(out)])
    text = out.read_text()
    assert "do not edit by hand" in text and "ts-lora-skip" in text and "| synthetic | 32 | 128 |" in text


def test_make_tables_renders_quality_and_importance_verdicts(tmp_path, monkeypatch):
    tables = _load("make_tables")
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    monkeypatch.setattr(tables, "RESULTS", results)
    quality = [{"task": "t", "model": "m", "method": method, "seed": seed, "accuracy": acc, "train_seconds": 1.0,
                "kept_fraction": kept}
               for seed in range(3) for method, acc, kept in [("lora", 0.80 + 0.01 * seed, 1.0),
                                                               ("ts-lora", 0.70 + 0.01 * seed, 0.5)]]
    kinds = {"0": {"special": {"kept_fraction": 0.2, "tokens": 4}, "content": {"kept_fraction": 0.8, "tokens": 9}},
             "1": {"special": {"kept_fraction": 0.4, "tokens": 4}, "content": {"kept_fraction": 0.6, "tokens": 9}}}
    for record in quality:
        if record["method"] == "ts-lora":
            by_position = {"0": {"0": {"kept_fraction": 0.5, "tokens": 2}},
                           "1": {"0": {"kept_fraction": 0.7, "tokens": 2}}}
            record["token_stats"] = {"by_kind": kinds, "by_position": by_position,
                                     "most_kept_tokens": [["great", 0.9 + 0.01 * record["seed"], 3]],
                                     "least_kept_tokens": [["the", 0.2, 9], ["a", 0.1, 4], ["\u0120sun", 0.3, 3]]}
    quality += [{"task": "stuck", "model": "m", "method": method, "seed": seed, "accuracy": 0.6, "train_seconds": 1.0,
                 "kept_fraction": kept} for seed in range(2) for method, kept in [("lora", 1.0), ("ts-lora", 0.7)]]
    quality += [{"task": "stuck", "model": "m", "method": "none", "seed": 0, "accuracy": 0.65, "train_seconds": 0.0,
                 "kept_fraction": None}]
    quality += [{"task": "balance", "model": "m", "method": method, "seed": seed, "accuracy": 0.60 + 0.01 * seed,
                 "train_seconds": 1.0, "kept_fraction": kept, "majority_accuracy": 0.58, "n_eval": 200}
                for seed in range(2) for method, kept in [("lora", 1.0), ("ts-lora", 0.7)]]
    importance = [{"model": "m", "task": task, "k": 2, "n_modules": 8, "criterion": c, "seed": seed,
                   "accuracy": acc + (0.01 * seed if c == "kept_fraction" else 0.0), "sizes": "--n-train 100"}
                  for task in ("t", "u") for seed in range(3)
                  for c, acc in [("kept_fraction", 0.9), ("relative_magnitude", 0.8), ("delta_weight_norm", 0.7),
                                 ("factor_norm", 0.6), ("random", 0.5)]]
    # t is in regime at 100 training examples (dense 0.9 vs probe 0.5); u has no frozen baseline
    controls = [{"task": "t", "arm": arm, "seed": 0, "kept": None, "sizes": "n_train=100", "n_train": 100,
                 "accuracy": acc} for arm, acc in (("probe", 0.5), ("dense", 0.9))]
    (results / "quality.json").write_text(json.dumps(quality))
    (results / "importance.json").write_text(json.dumps(importance))
    (results / "controls.json").write_text(json.dumps(controls))
    tables.main()
    text = (tmp_path / "RESULTS.md").read_text()
    # 10 points lost: the claim fails; no frozen baseline for t: not shown in regime
    assert "| m | t | lora → ts-lora | 0.500 | -10.0 [-10.0, -10.0] (3) | – | flagged: no |" in text
    # stuck: dense 0.6 is below its zero-shot 0.65: flagged; its pair discards 30 % at Δ 0: the claim holds there
    assert "| m | stuck | lora → ts-lora | 0.300 | +0.0 [+0.0, +0.0] (2) | -5.0 | flagged: yes |" in text
    assert ("- m / t, top 2 of 8 modules: learned kept fraction 0.910; − best weight criterion (delta_weight_norm, "
            "0.700) +21.0 [+18.5, +23.5] points (3 seeds); − random (0.500) +41.0 [+38.5, +43.5] points (3 seeds); "
            "mean r 0.800, − delta_weight_norm +10.0 [+10.0, +10.0] points (3 seeds). In regime (dense − frozen "
            "+40.0 points): the claim holds (both intervals above 0).") in text
    assert "- m / u, top 2 of 8 modules" in text and "(no frozen baseline at this size): flagged, no verdict." in text
    assert (tmp_path / "importance.png").is_file()
    assert "| special | 0.20 | 0.40 | 0.30 |" in text and "content tokens are kept most (0.70)" in text
    assert "- Most kept tokens: `great` 0.91" in text
    assert "- Least kept tokens: `a` 0.10, `the` 0.20, `␣sun` 0.30" in text
    assert "m / stuck: all 4 trained runs score exactly 0.600" in text and "m / t: all" not in text
    assert "m / stuck: every fine-tuned method scores below the zero-shot model (0.600 at best vs 0.650)" in text
    assert "| m | balance | majority class (always the most common answer) | – | 0.580 | – | – |" in text
    assert "m / balance: the best fine-tuned mean (0.605) is within one standard error (0.035)" in text
    assert "m / t: the best" not in text  # no majority_accuracy recorded: no row, no flag


def test_token_tables_group_the_layers_of_deep_models():
    tables = _load("make_tables")
    spans = tables.layer_spans([str(i) for i in range(30)])
    assert len(spans) == 8 and [layer for span in spans for layer in span] == [str(i) for i in range(30)]
    assert tables.span_name(spans[0]) == "layers 0–3" and tables.layer_spans(["0", "1"]) == [["0"], ["1"]]


def test_records_name_the_commit_they_ran_on():
    commit = _load("provenance").code_commit()
    head = commit.removesuffix("+dirty") if commit else None
    assert head and all(c in "0123456789abcdef" for c in head), commit  # tests run from a git checkout


def test_importance_selection_refuses_a_source_that_is_not_a_ts_lora_run(tmp_path):
    selection = _load("importance_selection")
    with pytest.raises(SystemExit):
        selection.main(["--suite", "encoder", "--criteria", "kept_fraction,weight_magic"])
    with pytest.raises(SystemExit, match="no metrics.json"):
        selection.main(["--suite", "encoder", "--source", str(tmp_path), "--results", str(tmp_path / "r.json")])
    (tmp_path / "metrics.json").write_text(json.dumps({"task": "rotten_tomatoes", "method": "lora"}))
    with pytest.raises(SystemExit, match="expected a ts-lora run on rotten_tomatoes"):
        selection.main(["--suite", "encoder", "--source", str(tmp_path), "--results", str(tmp_path / "r.json")])


def test_quality_refreshes_token_statistics_from_finished_runs(tmp_path):
    quality = _load("quality")
    records = [{"suite": "decoder", "task": "piqa", "method": "ts-lora", "seed": 1, "target_kept": None},
               {"suite": "decoder", "task": "piqa", "method": "ts-lora", "seed": 0, "target_kept": 0.5},
               {"suite": "decoder", "task": "piqa", "method": "lora", "seed": 0, "target_kept": None}]
    for name in ("ts-lora-s1", "ts-lora@0.5-s0"):
        run = tmp_path / "decoder" / "piqa" / name
        run.mkdir(parents=True)
        (run / "token_stats.json").write_text(json.dumps({"by_kind": {"0": {}}, "most_kept_tokens": [["x", 1.0, 3]],
                                                          "note": "not copied"}))
    assert quality.refresh_token_stats(records, str(tmp_path), "decoder") == 2
    assert records[0]["token_stats"]["most_kept_tokens"] == [["x", 1.0, 3]] and "note" not in records[0]["token_stats"]
    assert "token_stats" in records[1] and "token_stats" not in records[2]


def test_merge_results_adds_new_runs_and_refuses_conflicts(tmp_path):
    merger = _load("merge_results")
    run = {"task": "piqa", "model": "smollm2", "method": "lora", "seed": 0, "target_kept": None, "accuracy": 0.6}
    other = {**run, "seed": 1, "accuracy": 0.7}
    ranked = {"suite": "decoder", "criterion": "random", "k": 3, "seed": 0, "accuracy": 0.5}
    tuned = [{**run, "suite": "decoder", "lr": lr} for lr in (1e-4, 1e-3)]  # one run each: lr tells them apart
    into, a, b = tmp_path / "into.json", tmp_path / "a.json", tmp_path / "b.json"
    into.write_text(json.dumps([run]))
    a.write_text(json.dumps([run, other]))
    b.write_text(json.dumps([ranked, *tuned]))
    merger.main([str(a), str(b), "--into", str(into)])
    assert json.loads(into.read_text()) == [run, other, ranked, *tuned]
    a.write_text(json.dumps([{**run, "accuracy": 0.9}]))
    with pytest.raises(SystemExit, match="two different records for the same run"):
        merger.main([str(a), "--into", str(into)])
    with pytest.raises(SystemExit, match="no such result file"):
        merger.main([str(tmp_path / "nope.json"), "--into", str(into)])


def test_task_flags_join_the_suite_sizes_and_lr_tuning_is_reported():
    quality, tables = _load("quality"), _load("make_tables")
    decoder = quality.SUITES["decoder"]
    assert quality.sizes_of(decoder, "boolq_mc") == [*decoder["flags"], "--bf16"]
    assert quality.sizes_of(decoder, "piqa") == decoder["flags"]
    assert quality.suite_lr(decoder) == 5e-4 and quality.suite_lr(quality.SUITES["encoder"]) == 2e-3
    runs = [{"suite": "decoder", "task": "piqa", "method": "lora", "seed": 0, "lr": lr, "accuracy": acc, "n_eval": 200,
             "sizes": "-"} for lr, acc in ((1e-3, 0.61), (1e-4, 0.64), (5e-4, 0.62))]
    (line,) = [x for x in tables.lr_tuning_lines(runs, {"decoder": 5e-4}) if x]
    assert "0.0001 → 0.640, 0.0005 → 0.620, 0.001 → 0.610; best 0.0001" in line
    assert "lr 0.0005 is within one standard error (0.034) of the best, so it is kept" in line
    far = [{**r, "n_eval": 20000} for r in runs]  # standard error 0.003: 0.620 is now clearly below 0.640
    (line,) = [x for x in tables.lr_tuning_lines(far, {"decoder": 5e-4}) if x]
    assert "use 0.0001 and rerun the suite" in line


def test_majority_class_accuracy_of_eval_sets(monkeypatch):
    from tspeft.tasks.kinds import get_kind

    def majority_accuracy(kind, examples):
        return get_kind(kind).majority_accuracy(examples)

    assert majority_accuracy("classification", [{"label": 1}, {"label": 0}, {"label": 1}, {"label": 1}]) == 0.75
    assert majority_accuracy("multiple_choice", [{"answer": 2}, {"answer": 0}]) == 0.5
    assert majority_accuracy("classification", []) is None
    import tspeft.tasks.data as tasks_data

    loaded = []
    monkeypatch.setattr(tasks_data, "load_task", lambda name, n_train, n_eval: loaded.append((name, n_eval)) or
                        ([], [{"answer": 1}] * 3 + [{"answer": 0}]))
    records = [{"suite": "decoder", "task": "piqa", "n_eval": 4, "seed": seed} for seed in range(3)]
    records += [{"suite": "encoder", "task": "sst2", "n_eval": 4}, {**records[0], "majority_accuracy": 0.5}]
    assert _load("quality").refresh_majority(records, "decoder") == 3
    assert [r.get("majority_accuracy") for r in records] == [0.75, 0.75, 0.75, None, 0.5]
    assert loaded == [("piqa", 4)]  # one eval set per task and size, whatever the seed


def _vision_record(method, seed, accuracy, kept=None, target=None):
    return {"task": "fashion_mnist", "model": "efficientnet-lite0", "method": method, "seed": seed,
            "accuracy": accuracy, "kept_fraction": kept, "train_seconds": 60.0, "trainable_params": 1000,
            "target_kept": target, "target_kept_used": target or (0.7 if method == "ts-lora" else None),
            "n_eval": 1000, "majority_accuracy": 0.1,
            "sizes": "--n-train 3000", "machine": "test", "commit": "abc"}


def test_vision_section_regime_rule_and_paired_intervals():
    sys.path.insert(0, str(BENCHMARKS))
    vision = _load("vision_tables")
    records = [_vision_record("none", s, 0.70) for s in range(3)]
    records += [_vision_record("lora", s, 0.80 + 0.01 * s, 1.0) for s in range(3)]
    records += [_vision_record("ts-lora", s, 0.80 + 0.01 * s - d, 0.7) for s, d in enumerate([0.0, 0.01, 0.02])]
    text = "\n".join(vision.vision_section(records))
    assert "margin +11.0 points: in regime" in text
    # paired differences 0, -0.01, -0.02: mean -0.01, sd 0.01, t(2) = 4.303 -> half-width 0.0248
    assert "| lora → ts-lora | 3 | 0.300 | -0.010 [-0.035, +0.015] | yes |" in text
    records = [r if r["method"] != "lora" else {**r, "accuracy": r["accuracy"] - 0.08} for r in records]
    text = "\n".join(vision.vision_section(records))
    assert "NOT in regime" in text and "| lora → ts-lora | 3 | 0.300 |" in text and text.count("| – |") >= 1
    records.append(_vision_record("ts-lora", 0, 0.75, 0.31, target=0.3))
    text = "\n".join(vision.vision_section(records))
    assert "| 0.3 | 0.310 | 0.750 |" in text and "| 0.7 | 0.700 | 0.800 |" in text


def test_tau_tables_render_calibration_and_lambda_records(tmp_path):
    tables = _load("tau_tables")
    record = {"task": "sst5", "n_train": 500, "epochs": 4, "lr": 2e-3, "target_kept": 0.5, "seed": 0, "commit": "c",
              "records": [{"arm": "uniform", "variant": "held-out, rounds", "rounds_run": 2, "eval_kept": 0.495,
                           "kept_on_train": 0.507, "kept_on_held_out": 0.5, "accuracy": 0.4}]}
    (tmp_path / "tau_calibration.json").write_text(json.dumps(record))
    text = "\n".join(tables.calibration_section([tmp_path / "tau_calibration.json"]))
    assert "| uniform | held-out, rounds | 2 | 0.4950 | 0.5070 | 0.5000 | 0.400 |" in text
    lam = {"task": "sst5", "arm": "learned", "seed": 0, "kept": None, "commit": "c",
           "sizes": 'n_train=500 rule={"sparsity_weight": 1}',
           "rule": {"target_kept": None, "sparsity_weight": 1.0, "slope_momentum": 0.9},
           "kept_fraction": 0.4, "accuracy": 0.41}
    text = "\n".join(tables.lambda_section([lam, {**lam, "arm": "dense"}]))
    assert "| sst5 `n_train=500` | 1 | off, 0.9 | 0 | 0.400 | 0.600 | 0.410 | c |" in text
    assert text.count("| sst5") == 1
    assert "No runs yet" in tables.lambda_section([])[0]


def test_controls_tables_keep_calibration_variants_apart():
    """Runs whose τ was calibrated on unused examples get their own row and are the ones paired with dense."""
    tables = _load("tau_tables")
    base = {"task": "t", "kept": 0.5, "n_train": 10, "sizes": "n_train=10"}
    records = [{**base, "arm": "dense", "kept": None, "seed": s, "accuracy": 0.5, "kept_fraction": 1.0}
               for s in (0, 1)]
    records += [{**base, "arm": "learned", "seed": s, "accuracy": 0.4, "kept_fraction": 0.48} for s in (0, 1)]
    records += [{**base, "arm": "learned", "seed": s, "accuracy": 0.6, "kept_fraction": 0.5,
                 "sizes": "n_train=10 calibrated-on-unused"} for s in (0, 1)]
    text = "\n".join(tables.controls_section(records))
    assert "| learned | 0.5 | 0.400 ± 0.000 | 0.480 | 2 |" in text
    assert "| learned (τ calibrated on unused examples) | 0.5 | 0.600 ± 0.000 | 0.500 | 2 |" in text
    assert "| learned − dense | +10.0" in text and text.count("### t") == 1


def test_same_seed_lines_compare_allocations_of_one_seed_across_rules():
    tables = _load("tau_tables")
    u = {"a": 0.1, "b": 0.5, "c": 0.9}
    run = {"task": "t", "arm": "learned", "kept": 0.5, "sizes": "n=1", "allocation": u}
    mine = [{**run, "seed": 0}, {**run, "seed": 1, "allocation": {"a": 0.9, "b": 0.5, "c": 0.1}}]
    reference = [{**run, "seed": 0, "sizes": "n=1 calibrated-on-unused"}, {**run, "seed": 1}]
    line = tables.same_seed_lines(mine, reference, "ref")[0]
    assert "mean 0.00 over 2 seeds (1.00, -1.00)" in line and "different seeds: 0.00 over 2 pairs" in line
    assert tables.same_seed_lines(mine, [], "ref") == []


def test_controls_learned_prior_arm_runs_the_default_prior():
    """The learned-prior arm of benchmarks/controls.py is the rule tspeft ships: its κ is the config default."""
    from tspeft import TokenSelectiveConfig

    controls = _load("controls")
    assert controls.ARMS["learned-prior"][1]["allocation_prior"] == TokenSelectiveConfig().allocation_prior
    assert controls.ARMS["learned"][1]["allocation_prior"] == 0.0


def test_quality_sweep_runs_controls_through_tspeft_train_flags(tmp_path, monkeypatch):
    quality = _load("quality")
    calls = []

    def fake_train(args):
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True)
        kept = float(args[args.index("--target-kept") + 1]) if "--target-kept" in args else None
        (out / "metrics.json").write_text(json.dumps({"task": "trec_gen", "method": args[args.index("--method") + 1],
                                                      "seed": 0, "accuracy": 0.5, "kept_fraction": kept}))
        calls.append(args)

    monkeypatch.setattr(quality, "tspeft_main", fake_train)
    argv = ["--suite", "decoder", "--sweep", "--sweep-task", "trec_gen", "--sweep-methods", "ts-lora,ts-lora:random",
            "--sweep-kept", "0.5", "--seeds", "0", "--runs-dir", str(tmp_path / "runs"),
            "--results", str(tmp_path / "sweep.json")]
    quality.main(argv)
    records = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["method"], r["target_kept"]) for r in records] == [("lora", None), ("ts-lora", 0.5),
                                                                  ("ts-lora:random", 0.5)]
    random_run = calls[2]
    assert random_run[random_run.index("--method") + 1] == "ts-lora"
    assert random_run[random_run.index("--allocation") + 1] == "uniform"
    assert random_run[random_run.index("--selection") + 1] == "random"
    assert "--allocation" not in calls[1] and "--n-train" in calls[1]  # the plain rule; trec_gen's own sizes
    assert Path(random_run[random_run.index("--out") + 1]).name == "ts-lora_random@0.5-s0"
    quality.main(argv)  # resumable: every run is recorded, nothing is trained again
    assert len(calls) == 3


def test_decoder_sweep_with_controls_joins_the_controls_tables(tmp_path):
    sweep_module, tau_tables = _load("controls_sweep"), _load("tau_tables")
    sizes = "--n-train 480 --max-steps 60"
    run = {"model": "smollm2", "task": "trec_gen", "sizes": sizes, "n_train": 480, "n_eval": 200}
    sweep = [{**run, "method": method, "seed": seed, "target_kept": kept, "accuracy": acc + 0.01 * seed,
              "kept_fraction": kept, "per_module": {"a": 0.4 + 0.1 * seed, "b": 0.6}}
             for method, kept, acc in (("lora", None, 0.78), ("ts-lora", 0.5, 0.77), ("ts-lora:random", 0.5, 0.70))
             for seed in (0, 1)]
    sweep.append({**run, "task": "piqa", "method": "ts-lora", "seed": 0, "target_kept": 0.5, "accuracy": 0.6})
    quality = [{**run, "n_train": 0, "method": method, "seed": 0, "accuracy": acc}
               for method, acc in (("none", 0.0), ("none-3shot", 0.25))]
    quality.append({**run, "sizes": "other", "method": "none-3shot", "seed": 0, "accuracy": 0.9})  # other sizes
    records = sweep_module.sweep_arm_records(sweep, quality)
    assert {r["task"] for r in records} == {"trec_gen"}  # piqa ran no control: not a controls setting
    arms = sorted((r["arm"], r["seed"], r["kept"]) for r in records)
    assert arms == [("dense", 0, None), ("dense", 1, None), ("learned-prior", 0, 0.5), ("learned-prior", 1, 0.5),
                    ("probe", 0, None), ("random", 0, 0.5), ("random", 1, 0.5)]
    assert [r["accuracy"] for r in records if r["arm"] == "probe"] == [0.25]  # the stronger frozen baseline
    text = "\n".join(tau_tables.controls_section(records))
    assert "Dense LoRA − probe: +53.5 points: in regime." in text
    assert "| learned-prior − random | +7.0" in text and "Settings naming smollm2" in text
    assert "Spearman ρ of the per-module u between seeds" in text


def test_target_lines_name_every_run_outside_the_tolerance():
    tau_tables = _load("tau_tables")
    runs = [{"task": "t", "arm": "learned", "seed": s, "kept": 0.5, "kept_fraction": k, "sizes": "n_train=1"}
            for s, k in enumerate((0.5, 0.519, 0.479))]
    runs.append({"task": "t", "arm": "dense", "seed": 0, "kept": None, "kept_fraction": 1.0, "sizes": "n_train=1"})
    (line, _) = tau_tables.target_lines(runs)
    assert line == ("Eval kept fraction within ±0.02 of the target: 2 of 3 ts runs; outside: t learned seed 2 at 0.5: "
                    "0.479 (τ calibrated on its training examples).")
    assert tau_tables.target_lines(runs[3:]) == []


def test_layer_means_group_modules_by_their_layer_index():
    runs = [{"allocation": {"bert.encoder.layer.0.attention.self.query": 0.2, "bert.encoder.layer.1.output.dense": 0.6,
                            "model.layers.1.mlp.up_proj": 0.8, "classifier": 0.5}},
            {"allocation": {"bert.encoder.layer.0.attention.self.query": 0.4}}]
    assert _load("tau_tables").layer_means(runs) == pytest.approx({0: 0.3, 1: 0.7})


def test_targets_table_says_which_target_is_met_and_by_how_much():
    targets = _load("target_tables")
    sizes = "n_train=100 n_eval=50"

    def run(arm, seed, accuracy, kept=None, kept_fraction=None, allocation=None):
        record = {"task": "t", "arm": arm, "seed": seed, "kept": kept, "accuracy": accuracy, "n_train": 100,
                  "sizes": sizes + ("" if arm in ("dense", "probe") else " calibrated-on-unused"),
                  "kept_fraction": kept_fraction}
        return {**record, "allocation": allocation} if allocation else record

    records = [run("probe", 0, 0.5)]
    for seed in range(3):
        records += [run("dense", seed, 0.80 + 0.01 * seed),
                    run("learned-prior", seed, 0.79 + 0.01 * seed, 0.5, 0.51, {"a": 0.2, "b": 0.8, "c": 0.5}),
                    run("uniform", seed, 0.78 + 0.01 * seed, 0.5, 0.5),
                    run("random", seed, 0.70 + 0.01 * seed, 0.5, 0.53),
                    run("learned-prior", seed, 0.80 + 0.01 * seed, 0.7, 0.7)]
    (row,) = [line for line in targets.targets_section(records) if line.startswith("| t ")]
    assert row == ("| t (100 train) | +31.0 | +1.0 [+1.0, +1.0] (3): met | +9.0 [+9.0, +9.0] (3): met | "
                   "-1.0 [-1.0, -1.0] (3): missed by 0.5 | +0.0 [+0.0, +0.0] (3): met | 0.030 (12 runs): missed | "
                   "1.00: met |")


def test_readme_results_block_comes_from_results_md(tmp_path, monkeypatch):
    script = BENCHMARKS.parent / "scripts" / "readme_figures.py"
    spec = importlib.util.spec_from_file_location("_readme_figures", script)
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "RESULTS.md").write_text(
        "# R\n\n## Quality\n\n### Does discarding 30–70 % of token updates keep accuracy?\n\n| claims |\n\n"
        "## τ rule: the targets\n\n| targets |\n\n## Next\n\nnot copied\n")
    (tmp_path / "README.md").write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\nrest\n")
    monkeypatch.setattr(figures, "ROOT", tmp_path)
    figures.main("--results-only")
    readme = (tmp_path / "README.md").read_text()
    assert "| targets |" in readme and "| claims |" in readme and "old" not in readme and "not copied" not in readme
    assert readme.index("| targets |") < readme.index("| claims |") and readme.endswith("rest\n")
    with pytest.raises(SystemExit, match="no compare.md"):
        figures.main("runs/none")


def test_loss_driven_points_sit_beside_target_mode_of_the_same_seed():
    tau_tables = _load("tau_tables")
    sizes = "n_train=100 n_eval=50"
    driven = [{"task": "t", "arm": "learned", "seed": 0, "kept": None, "sizes": f"{sizes} rule={{}}",
               "kept_fraction": k, "accuracy": a} for k, a in ((0.3, 0.8), (0.5, 0.82))]
    target = [{"task": "t", "arm": arm, "seed": seed, "kept": 0.5, "sizes": f"{sizes} calibrated-on-unused",
               "kept_fraction": 0.51, "accuracy": 0.81} for arm, seed in (("learned-prior", 0), ("uniform", 0),
                                                                          ("learned-prior", 1))]
    assert tau_tables.target_mode_lines(driven, target) == [
        "t, seed 0, accuracy at eval kept: loss-driven 0.30 → 0.800, 0.50 → 0.820; target mode (learned-prior, same "
        "seed) 0.51 → 0.810.", ""]
