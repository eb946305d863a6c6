"""D's input ends every response the same way. With a Qwen2.5-Instruct-like generation config
(sampling stops at <|im_end|> or <|endoftext|>), a student row ending with either id reaches D
ending like a teacher row (re-tokenized text + the tokenizer's EOS): D scores it as the same row
ending with the teacher's id. A truncated row stays as it is; G's batch keeps the sampled ids."""

import json

import pytest
import torch

from gad_ray.config.schema import DataConfig
from gad_ray.data.batch import make_batch
from gad_ray.data.dataset import Example
from gad_ray.data.tokenize import tokenize_examples
from gad_ray.discriminator import DiscriminatorGroup
from gad_ray.discriminator.ends import ResponseEnds
from gad_ray.models.loading import load_tokenizer
from gad_ray.models.tiny import IM_END, PAD_TOKEN, build_tiny_model
from tests.config_builder import learner_config

TEXTS = ["the cat sat", "water is long and very little", "we can do it"]


@pytest.fixture(scope="module")
def qwen_like_dir(tmp_path_factory):
    """A tiny model whose generation config ends sampling at two ids, as Qwen2.5-Instruct's."""
    out = build_tiny_model(tmp_path_factory.mktemp("two-eos"))
    tok = load_tokenizer(str(out))
    gen = json.loads((out / "generation_config.json").read_text())
    gen["eos_token_id"] = [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(PAD_TOKEN)]
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


def rows(model_dir):
    """(the ends, teacher rows as the data pipeline tokenizes them, student response ids
    ending with each end id the sampler stops at, plus a truncated one)"""
    cfg = learner_config(model_dir)
    tok = load_tokenizer(str(model_dir))
    examples = [Example(str(i), [{"role": "user", "content": t}], t) for i, t in enumerate(TEXTS)]
    data = DataConfig(train_path="unused.jsonl", max_prompt_length=64, max_response_length=32)
    teacher, _ = tokenize_examples(examples, tok, data)
    ends = ResponseEnds.of(cfg)
    body = tok.encode("the cat sat", add_special_tokens=False)
    students = [body + [end] for end in sorted(ends.stops)] + [body]  # the last: truncated
    return cfg, ends, teacher, students


def test_ends_are_the_tokenizers_eos_and_the_generation_configs_ids(qwen_like_dir, tmp_path):
    _, ends, teacher, _ = rows(qwen_like_dir)
    tok = load_tokenizer(str(qwen_like_dir))
    im_end, endoftext = tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(PAD_TOKEN)
    assert ends.eos == im_end == tok.eos_token_id
    assert ends.stops == {im_end, endoftext}
    assert {t.response_ids[-1] for t in teacher} == {ends.eos}  # every teacher row
    # without a generation config: the model config's end id
    plain = build_tiny_model(tmp_path / "plain")
    (plain / "generation_config.json").unlink()
    assert ResponseEnds.of(learner_config(plain)).stops == {im_end}


def test_student_rows_end_like_teacher_rows_truncated_ones_as_they_are(qwen_like_dir):
    _, ends, teacher, students = rows(qwen_like_dir)
    prompt = teacher[0].prompt_ids
    batch = make_batch([prompt] * len(students), students, pad_id=0)
    before = batch.input_ids.clone()
    out = ends.normalise(batch)
    assert torch.equal(batch.input_ids, before)  # G's batch keeps the sampled ids
    teacher_end = teacher[0].response_ids[-1]
    for i, ids in enumerate(students[:-1]):  # ended by an end id: the teacher's end
        assert out.response_tokens(i) == ids[:-1] + [teacher_end]
    assert out.response_tokens(len(students) - 1) == students[-1]  # truncated: unchanged
    for name in ("attention_mask", "response_mask", "prompt_lens", "response_lens"):
        assert torch.equal(getattr(out, name), getattr(batch, name)), name


def test_d_scores_a_row_ending_with_any_end_id_as_with_the_teachers(qwen_like_dir, ray_session):
    """What reaches D: the row ending with <|endoftext|> scores exactly as the same row ending
    with <|im_end|> (the teacher's end); the truncated row scores otherwise. A BT step with the
    student rows ending either way is the same step."""
    cfg, ends, teacher, students = rows(qwen_like_dir)
    prompt = teacher[0].prompt_ids
    batch = make_batch([prompt] * len(students), students, pad_id=0)
    tbatch = make_batch([t.prompt_ids for t in teacher], [t.response_ids for t in teacher], 0)
    pairs = torch.zeros(len(students), dtype=torch.long)
    group = DiscriminatorGroup(cfg)
    try:
        scores = group.score(batch)
        as_teacher = make_batch([prompt] * 2, [students[0][:-1] + [ends.eos]] * 2, pad_id=0)
        want = group.score(as_teacher)
        first = group.train_bt(tbatch, batch, pairs)
    finally:
        group.shutdown()
    n = len(ends.stops)
    torch.testing.assert_close(scores[:n], want[:1].expand(n), rtol=0, atol=0)
    assert float((scores[n] - scores[0]).abs()) > 1e-4  # the truncated row: another input
    group = DiscriminatorGroup(cfg)
    try:  # the same step with every ended row ending with the teacher's id
        ended = [ids[:-1] + [ends.eos] for ids in students[:-1]] + [students[-1]]
        second = group.train_bt(tbatch, make_batch([prompt] * len(ended), ended, 0), pairs)
    finally:
        group.shutdown()
    for k in ("d_loss", "student_score_mean", "grad_norm"):
        assert first[k] == pytest.approx(second[k], rel=1e-6, abs=1e-7), k
