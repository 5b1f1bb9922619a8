"""Generation task kind: reading prompt/response and chat rows, response-only labels, chat-template rendering,
exact match with the answer extractor, greedy decoding with the KV cache vs step-by-step gated decoding."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig

from tspeft import TokenSelectiveConfig, get_ts_peft_model
from tspeft.tasks import generation as G
from tspeft.tasks.data import load_file
from tspeft.tasks.decoding import KeptShare, TokenPrinter, evaluate_generation, greedy_generate

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tiny_tokenizer.chat_template = CHAT_TEMPLATE
    return tiny_tokenizer


def test_prompt_tokens_and_padding_are_masked(tiny_tokenizer):
    examples = [{"prompt": "2+2=", "response": "4"}, {"prompt": "10+1=", "response": "11"}]
    features = G.training_features(tiny_tokenizer, examples, max_length=32)
    first = features[0]
    prompt_len = len(tiny_tokenizer("2+2=")["input_ids"])  # <s> and four characters
    assert first["labels"][:prompt_len] == [-100] * prompt_len
    assert first["labels"][prompt_len:] == first["input_ids"][prompt_len:]  # "4" then eos
    assert first["input_ids"][-1] == tiny_tokenizer.eos_token_id
    from tspeft.tasks.multiple_choice import MultipleChoiceCollator

    batch = MultipleChoiceCollator.for_tokenizer(tiny_tokenizer)(features)
    padded = batch["attention_mask"] == 0
    assert padded.any() and (batch["labels"][padded] == -100).all()


def test_chat_rendering_learns_only_assistant_turns(chat_tokenizer):
    example = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    pieces = G.segments(chat_tokenizer, example)
    assert [text for text, learned in pieces if learned] == ["yo</s>\n", "4</s>\n"]
    rendered = chat_tokenizer.apply_chat_template(example["messages"], tokenize=False)
    assert "".join(text for text, _ in pieces) == rendered
    assert G.prompt_text(chat_tokenizer, example).endswith("<s>user\n2+2?</s>\n<s>assistant\n")
    feature = G.training_features(chat_tokenizer, [example], max_length=200)[0]
    learned = chat_tokenizer.decode([t for t, label in zip(feature["input_ids"], feature["labels"]) if label != -100])
    assert learned.replace(" ", "") == "yo</s>\n4</s>\n".replace(" ", "")


@pytest.mark.parametrize("pattern, prediction, reference, expected", [
    (None, "The Answer!", "answer", True),
    (None, "an answer", "answer.", True),
    (None, "answers", "answer", False),
    (r"-?\d+(?:\.\d+)?", "There are 9 apples", " 9 apples", True),
    (r"-?\d+(?:\.\d+)?", "10 then 9", "9 apples", False),
    (r"-?\d+(?:\.\d+)?", "no number here", "9", False),
    (r"\b([A-E])\b", "I think B is right", "B. bank", True),
])
def test_exact_match_and_extractor(pattern, prediction, reference, expected):
    assert G.AnswerExtractor(pattern).matches(prediction, reference) is expected


def test_bad_answer_pattern_is_a_clear_error():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        G.AnswerExtractor("([")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q"}, r"line 2: no response"),
    ({"prompt": "q", "response": "  "}, r"line 2: empty response"),
    ({"prompt": "q", "response": 3}, r"line 2: column 'response' must be text"),
])
def test_bad_prompt_response_rows(tmp_path, row, message):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, row])
    with pytest.raises(ValueError, match=f"d.jsonl: {message}"):
        load_file(path, "generation", {})


def test_chat_without_assistant_turn(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"chat": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"c.jsonl: line 1: the chat has no assistant turn"):
        load_file(path, "generation", {"messages": "chat"})


def test_chat_needs_a_template(tmp_path, tiny_tokenizer):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = _jsonl(tmp_path / "c.jsonl", [{"chat": chat}])
    examples, _ = load_file(path, "generation", {"messages": "chat"})
    tiny_tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"c.jsonl: line 1: chat data needs a tokenizer with a chat template"):
        G.training_features(tiny_tokenizer, examples, 64)


def test_too_long_row_names_file_and_row(tmp_path, tiny_tokenizer):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "x" * 50, "response": "y"}])
    examples, _ = load_file(path, "generation", {})
    too_long = r"d.jsonl: line 1: prompt \+ response are 53 tokens, more than --max-length 20"
    with pytest.raises(ValueError, match=too_long):
        G.training_features(tiny_tokenizer, examples, 20)


def _gated(model, tau=None):
    ts = get_ts_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
                           TokenSelectiveConfig())
    torch.manual_seed(1)
    for name, parameter in ts.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)  # a trained-looking update, so gates have something to drop
    if tau is not None:
        ts.set_thresholds(tau)
    return ts.eval()


def _median_tau(ts, tokenizer):
    """τ per module at its median r over a prompt, so about half the tokens are dropped."""
    ids = torch.tensor([tokenizer("the quick brown fox jumps")["input_ids"]])
    r_values = {}

    def remember(name):
        def hook(module, args):
            r_values[name] = args[0].detach()  # returns None: the gate's inputs stay as they are
        return hook

    handles = [gate.register_forward_pre_hook(remember(name)) for name, gate in ts.gates.items()]
    ts(input_ids=ids, attention_mask=torch.ones_like(ids))
    for h in handles:
        h.remove()
    return {name: float(r.median()) for name, r in r_values.items()}


def test_generate_equals_step_by_step_gated_decoding(tiny_llama, tiny_tokenizer):
    ts = _gated(tiny_llama)
    ts.set_thresholds(_median_tau(ts, tiny_tokenizer))
    prompts = [tiny_tokenizer("ab")["input_ids"], tiny_tokenizer("hello world")["input_ids"]]
    with KeptShare(ts.gates) as kept:
        fast = greedy_generate(ts, tiny_tokenizer, prompts, max_new_tokens=8, kept=kept)
    for prompt, generated in zip(prompts, fast):
        ids = list(prompt)
        for _ in range(8):  # no cache, one sequence at a time: every position recomputed every step
            logits = ts(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
            token = int(logits[0, -1].argmax())
            if token == tiny_tokenizer.eos_token_id:
                break
            ids.append(token)
        assert generated == ids[len(prompt):]
    shares = [s for step in kept.shares for s in step]
    assert kept.shares and any(0 < s < 1 for s in shares)  # the gates dropped some modules' updates


def test_kept_share_follows_tau(tiny_llama, tiny_tokenizer):
    ts = _gated(tiny_llama, tau=float("inf"))
    prompt = [tiny_tokenizer("abc")["input_ids"]]
    with KeptShare(ts.gates) as kept:
        greedy_generate(ts, tiny_tokenizer, prompt, max_new_tokens=3, kept=kept)
    assert kept.shares and all(s == [0.0] for s in kept.shares)
    ts.set_thresholds(0.0)
    written = []
    with KeptShare(ts.gates) as kept:
        greedy_generate(ts, tiny_tokenizer, prompt, max_new_tokens=3, kept=kept,
                        streamer=TokenPrinter(tiny_tokenizer, written.append, kept))
    assert all(s == [1.0] for s in kept.shares)
    assert len(written) == 3 and all(line.startswith(" 1.000  ") and line.endswith("\n") for line in written)


def test_evaluate_generation_reports_score_loss_and_kept(tiny_llama, tiny_tokenizer):
    ts = _gated(tiny_llama, tau=0.0)
    examples = [{"prompt": "1+1=", "response": "2"}, {"prompt": "2+2=", "response": "4"}]
    result = evaluate_generation(ts, tiny_tokenizer, examples, max_length=32, max_new_tokens=4, batch_size=2,
                                 device=torch.device("cpu"), answer_pattern=r"\d")
    assert 0 <= result["accuracy"] <= 1 and result["kept_fraction"] == 1.0
    assert result["perplexity"] == pytest.approx(torch.tensor(result["eval_loss"]).exp().item(), rel=1e-5)
    assert len(result["predictions"]) == 2


def test_chat_file_in_the_default_column_needs_no_flag(tmp_path, chat_tokenizer):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "thanks"}]
    path = _jsonl(tmp_path / "c.jsonl", [{"messages": chat}])
    (example,), _ = load_file(path, "generation", {})
    assert example["messages"][-1] == {"role": "assistant", "content": "4"}  # the trailing user turn is dropped
    assert G.reference_text(example) == "4"
    assert G.prompt_text(chat_tokenizer, example).endswith("<s>user\n2+2?</s>\n<s>assistant\n")
