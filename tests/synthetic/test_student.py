"""The testbed's student: its own answer style, its pre-training batches, the build and the
``synthetic:`` model spec. (Its competence after the full build is checked in tests/bench.)"""

import json
import random
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from gad_ray.models.loading import ModelLoadError, load_tokenizer, resolve_model_path
from gad_ray.models.tiny import build_tokenizer
from gad_ray.synthetic.student import (
    HELD_OUT_TASKS,
    IN_DOMAIN_TASKS,
    PRETRAIN_TASKS,
    STUDENT_STYLES,
    STUDENT_VERSION,
    build_student,
    make_batch,
    read_competence,
    student_answer,
)
from gad_ray.synthetic.tasks import FRUITS, TASKS, check, unframe


def test_families_split_into_in_domain_and_held_out() -> None:
    assert set(IN_DOMAIN_TASKS).isdisjoint(HELD_OUT_TASKS)
    assert set(PRETRAIN_TASKS) == set(IN_DOMAIN_TASKS) | set(HELD_OUT_TASKS)
    assert set(PRETRAIN_TASKS) <= set(TASKS)
    for split in (IN_DOMAIN_TASKS, HELD_OUT_TASKS):  # both have a multi-modal family
        assert any(TASKS[t].multimodal for t in split)


def test_student_answers_in_its_own_styles_uniform_over_valid_answers() -> None:
    rng = random.Random(0)
    prompt = "Name a fruit that is red."
    answers = [unframe(student_answer(prompt, rng)) for _ in range(4000)]
    contents = Counter(content for content, _ in answers)
    assert set(contents) == set(FRUITS["red"])  # the teacher: 0.6 on apple
    assert all(abs(c / 4000 - 1 / 3) < 0.04 for c in contents.values())
    styles = Counter(style for _, style in answers)
    assert set(styles) == set(STUDENT_STYLES) and "framed" not in styles  # never the teacher's
    assert abs(styles["plain"] / 4000 - STUDENT_STYLES["plain"]) < 0.04
    assert max(STUDENT_STYLES, key=STUDENT_STYLES.get) == "plain"  # its greedy style
    for _ in range(20):
        verdict = check(
            "Reverse the words: cat dog", student_answer("Reverse the words: cat dog", rng)
        )
        assert verdict.correct and not verdict.framed


def test_pretraining_batch_trains_on_the_answer_and_eos_only() -> None:
    tok = build_tokenizer()
    ids, labels, mask = make_batch(tok, random.Random(1), 16)
    assert ids.shape == labels.shape == mask.shape
    for i in range(16):
        trained = labels[i][labels[i] != -100].tolist()
        assert trained[-1] == tok.eos_token_id
        answer = tok.decode(trained[:-1])
        prompt = tok.decode(ids[i][mask[i].bool()][: len(ids[i]) - len(trained)].tolist())
        user = prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        assert check(user, answer).correct and not answer.startswith("Answer")
        n = int(mask[i].sum())
        assert (labels[i][n:] == -100).all() and (ids[i][n:] == tok.pad_token_id).all()


def test_build_saves_a_loadable_model_and_its_competence(tmp_path) -> None:
    out = build_student(tmp_path / "s", steps=2, log=lambda _: None, competence_n=2)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "qwen2" and model.config.head_dim >= 32  # vLLM-CPU
    assert load_tokenizer(str(out)).get_vocab() == build_tokenizer().get_vocab()
    info = read_competence(out)
    assert info["version"] == STUDENT_VERSION and info["pretrain_s"] > 0
    assert set(info["competence"]) == set(PRETRAIN_TASKS)
    assert json.loads((out / "competence.json").read_text()) == info
    # the spec resolves to the cached build, which is not built again
    cached = tmp_path / "cache" / f"synthetic-student-{STUDENT_VERSION}"
    cached.parent.mkdir()
    out.rename(cached)
    assert resolve_model_path("synthetic:student", cache_dir=str(tmp_path / "cache")) == str(cached)
    # same seed, same weights
    again = build_student(tmp_path / "t", steps=2, log=lambda _: None, competence_n=1)
    a = AutoModelForCausalLM.from_pretrained(again).state_dict()
    b = AutoModelForCausalLM.from_pretrained(cached).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_synthetic_spec_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="'synthetic:nope': unknown"):
        resolve_model_path("synthetic:nope", cache_dir=str(tmp_path))
