import unicodedata

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from gad_ray.models import tiny
from gad_ray.models.tiny import build_tiny_model, build_tokenizer, count_params, model_config


def test_tokenizer_is_deterministic_across_trainings():
    a = build_tokenizer().backend_tokenizer.to_str()
    tiny._trained_bpe.cache_clear()
    b = build_tokenizer().backend_tokenizer.to_str()
    assert a == b
    assert build_tokenizer() is not build_tokenizer()  # callers may mutate their copy


def test_special_tokens_and_vocab():
    tok = build_tokenizer()
    assert len(tok) == tiny.VOCAB_SIZE
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.encode("<|im_start|>user", add_special_tokens=False)[0] == (
        tok.convert_tokens_to_ids("<|im_start|>")
    )
    assert tok.bos_token is None
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi", add_special_tokens=False)
    # common words are single tokens, so the tokenizer actually compresses text
    assert len(tok.encode(" the model")) == 2


@settings(max_examples=200, deadline=None)
@given(st.text() | st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127)))
def test_tokenizer_round_trips_text(text):
    tok = build_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)  # NFC as in Qwen2


def test_chat_template_is_chatml():
    tok = build_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == expected + "<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert tok.decode(ids) == prompt


def test_chat_template_rejects_unknown_role():
    tok = build_tokenizer()
    try:
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    except Exception as e:  # transformers raises jinja's TemplateError
        assert "tool" in str(e)
    else:
        raise AssertionError("unknown role accepted")


def test_sizes_and_archs_param_counts():
    counts = {}
    for size in tiny.SIZES:
        for arch in tiny.ARCHS:
            config = model_config(size, arch)
            assert config.head_dim >= 32 and config.max_position_embeddings == 2048
            assert config.tie_word_embeddings == (size == "tiny")
            assert config.eos_token_id == 2 and config.pad_token_id == 0
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
            assert (
                type(model).__name__
                == {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
            )
            counts[size, arch] = count_params(model)
    for arch in tiny.ARCHS:
        assert counts["tiny", arch] < 1_000_000
        assert 10e6 <= counts["small", arch] <= 30e6
        assert 2 <= counts["base", arch] / counts["small", arch] <= 3


def _assert_reloads_identically(path, size, arch):
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == arch and model.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.backend_tokenizer.to_str() == build_tokenizer().backend_tokenizer.to_str()
    assert tok.chat_template == tiny.CHAT_TEMPLATE
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    gen = GenerationConfig.from_pretrained(path)
    assert (gen.eos_token_id, gen.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    config = model_config(size, arch)
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(config)
    ids = torch.tensor([tok.encode("Hello world, 123 tokens.")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_build_save_reload_tiny_both_archs(tmp_path):
    for arch in tiny.ARCHS:
        path = build_tiny_model(tmp_path / f"tiny-{arch}", size="tiny", arch=arch)
        _assert_reloads_identically(path, "tiny", arch)


def test_build_save_reload_small(small_model_dir):
    _assert_reloads_identically(small_model_dir, "small", "qwen2")


def test_seed_changes_weights(tmp_path):
    a = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "a", seed=0))
    b = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "b", seed=1))
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_cli_builds_model(tmp_path, capsys):
    out = tmp_path / "cli-model"
    tiny.main(["--size", "tiny", "--arch", "llama", "--out", str(out), "--seed", "3"])
    printed = capsys.readouterr().out
    assert str(out) in printed and "parameters" in printed
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
