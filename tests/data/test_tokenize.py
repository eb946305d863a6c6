import pytest

from gad_ray.config.schema import DataConfig
from gad_ray.data.dataset import DataError, Example
from gad_ray.data.tokenize import encode_prompt, encode_response, tokenize_examples
from gad_ray.models.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def cfg(**kw) -> DataConfig:
    return DataConfig(train_path="unused.jsonl", **kw)


def example(i: int, prompt: str, response: str | None = "Sure.") -> Example:
    return Example(str(i), [{"role": "user", "content": prompt}], response, {})


def test_chat_template_applied_exactly(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there, model!"},
    ]
    ids = encode_prompt(tok, messages)
    assert isinstance(ids, list) and all(type(t) is int for t in ids)
    assert tok.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello there, model!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_response_ends_with_eos(tok):
    ids, truncated = encode_response(tok, "The answer is 42.", max_len=100)
    assert not truncated
    assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
    assert ids[:-1] == tok.encode("The answer is 42.", add_special_tokens=False)
    assert tok.decode(ids) == "The answer is 42.<|im_end|>"
    assert encode_response(tok, "", max_len=4) == ([tok.eos_token_id], False)


def test_response_truncation_drops_eos(tok):
    text_ids = tok.encode("one two three four five six", add_special_tokens=False)
    n = len(text_ids)
    assert encode_response(tok, "one two three four five six", n + 1) == (
        text_ids + [tok.eos_token_id],
        False,
    )
    # text exactly max_len tokens: EOS does not fit -> cut to max_len, no EOS (like a student
    # sample that hits max_response_length)
    assert encode_response(tok, "one two three four five six", n) == (text_ids, True)
    assert encode_response(tok, "one two three four five six", 3) == (text_ids[:3], True)


def test_tokenize_examples_records_truncated_responses(tok):
    exs = [
        example(0, "hi", "a b c d e f g h i j k l m n o p"),
        example(1, "hi", "ok"),
        example(2, "hi", None),
    ]
    out, stats = tokenize_examples(exs, tok, cfg(max_response_length=4))
    assert stats == {
        "dropped_long_prompts": 0,
        "truncated_prompts": 0,
        "truncated_responses": 1,
        "examples": 3,
    }
    assert [(len(t.response_ids), t.response_truncated) for t in out[:2]] == [(4, True), (2, False)]
    assert out[1].response_ids == tok.encode("ok", add_special_tokens=False) + [tok.eos_token_id]
    assert out[2].response_ids is None and out[2].response is None
    assert out[0].prompt_ids == encode_prompt(tok, exs[0].messages)
    assert (out[0].id, out[0].messages, out[0].response) == ("0", exs[0].messages, exs[0].response)


@pytest.fixture(scope="module")
def long_short(tok):
    long = example(0, "word " * 40)
    short = example(1, "hi")
    n_long = len(encode_prompt(tok, long.messages))
    n_short = len(encode_prompt(tok, short.messages))
    limit = n_short + 3
    assert n_long > limit
    return [long, short], limit, n_long


def test_prompt_truncation_drop(tok, long_short):
    exs, limit, _ = long_short
    out, stats = tokenize_examples(exs, tok, cfg(max_prompt_length=limit))
    assert [t.id for t in out] == ["1"]
    assert stats["dropped_long_prompts"] == 1 and stats["truncated_prompts"] == 0
    assert stats["examples"] == 1


def test_prompt_truncation_left_keeps_generation_prompt(tok, long_short):
    exs, limit, _ = long_short
    out, stats = tokenize_examples(exs, tok, cfg(max_prompt_length=limit, prompt_truncation="left"))
    full = encode_prompt(tok, exs[0].messages)
    assert out[0].prompt_ids == full[-limit:]
    assert tok.decode(out[0].prompt_ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert out[1].prompt_ids == encode_prompt(tok, exs[1].messages)
    assert stats["truncated_prompts"] == 1 and stats["dropped_long_prompts"] == 0
    assert stats["examples"] == 2


def test_prompt_truncation_right_keeps_start(tok, long_short):
    exs, limit, _ = long_short
    out, stats = tokenize_examples(
        exs, tok, cfg(max_prompt_length=limit, prompt_truncation="right")
    )
    assert out[0].prompt_ids == encode_prompt(tok, exs[0].messages)[:limit]
    assert tok.decode(out[0].prompt_ids).startswith("<|im_start|>user\nword word")
    assert stats["truncated_prompts"] == 1 and stats["examples"] == 2


def test_prompt_truncation_error_names_row_and_length(tok, long_short):
    exs, limit, n_long = long_short
    exs = [exs[1], Example("row-7", exs[0].messages, "x", {"origin": "d.jsonl, row 7"})]
    with pytest.raises(DataError) as err:
        tokenize_examples(exs, tok, cfg(max_prompt_length=limit, prompt_truncation="error"))
    msg = str(err.value)
    assert "'row-7'" in msg and "d.jsonl, row 7" in msg
    assert f"{n_long} tokens > data.max_prompt_length={limit}" in msg
