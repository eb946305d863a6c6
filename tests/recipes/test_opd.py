"""On-policy distillation's recipe (docs/algorithms.md §7) without Ray: the lmbda schedule, its
stages and roles, and the config errors naming their keys."""

import pytest

from gad_ray import recipes
from gad_ray.config.schema import ConfigError
from gad_ray.recipes.opd import on_policy, teacher_view
from gad_ray.validate import validate_config


def _raw(**opd) -> dict:
    return {
        "model": {"student": {"path": "tiny:tiny"}},
        "algorithm": {
            "name": "opd",
            "grpo": {"n_samples": 2},
            "opd": {"teacher": {"path": "tiny:small"}, "steps": 8, **opd},
        },
        "data": {
            "train_path": "x.jsonl",
            "prompts_per_step": 4,
            "max_prompt_length": 64,
            "max_response_length": 32,
        },
        "learner": {"micro_batch_size": 2},
    }


def _cfg(grpo: dict | None = None, **opd):
    raw = _raw(**opd)
    raw["algorithm"]["grpo"] |= grpo or {}
    return validate_config(raw, check_model_context=False)


@pytest.mark.parametrize(
    ("lmbda", "pattern"),
    [
        (1.0, "PPPPPPPP"),
        (0.0, "SSSSSSSS"),
        (0.5, "SPSPSPSP"),
        (0.25, "SSSPSSSP"),
        (0.75, "SPPPSPPP"),
    ],
)
def test_lmbda_spreads_the_on_policy_steps_evenly(lmbda, pattern):
    assert "".join("P" if on_policy(i, lmbda) else "S" for i in range(8)) == pattern


def test_stages_merge_runs_of_one_kind_and_only_on_policy_ones_sample():
    cfg = _cfg(lmbda=0.75)
    stages = recipes.build(cfg).stages
    assert [(s.name, s.steps) for s in stages] == [
        ("sft", 1),
        ("opd", 3),
        ("sft", 1),
        ("opd", 3),
    ]
    for s in stages:
        assert (s.sampling is not None) == (s.name == "opd")
        assert s.roles == ("rollout", "generator", "teacher_model")
        assert s.checkpoint == ("generator",)  # the frozen teacher is never checkpointed
    sampled = stages[1].sampling.params
    assert (sampled.n, sampled.temperature, sampled.top_p) == (2, 0.8, 1.0)
    assert [s.eval_label for s in stages] == ["before_distill"] + [None] * 3


def test_the_kl_reference_is_held_only_with_a_kl_coef():
    assert not recipes.build(_cfg({"kl_coef": 0.0})).roles["generator"]["with_reference"]
    assert recipes.build(_cfg({"kl_coef": 0.01})).roles["generator"]["with_reference"]
    assert recipes.build(_cfg()).roles["generator"]["total_steps"] == 8


def test_the_teacher_view_puts_the_teacher_in_the_students_place():
    cfg = _cfg(ranks=2)
    view = teacher_view(cfg)
    assert view.model.student.path == "tiny:small" and view.learner.generator_ranks == 2
    assert cfg.model.student.path == "tiny:tiny"  # the run's own config is unchanged


def test_config_errors_name_the_key():
    raw = _raw()
    raw["algorithm"]["opd"]["teacher"] = None
    with pytest.raises(ConfigError, match=r"algorithm\.opd\.teacher is required"):
        validate_config(raw, check_model_context=False)
    with pytest.raises(ConfigError, match=r"algorithm\.grpo\.top_p=0\.9: .*algorithm\.name=opd"):
        _cfg({"top_p": 0.9})
    raw = _raw()
    raw["algorithm"]["opd"]["teacher"]["lora"] = {"rank": 8}
    with pytest.raises(ConfigError, match=r"algorithm\.opd\.teacher\.lora\.rank > 0"):
        validate_config(raw, check_model_context=False)
    with pytest.raises(ConfigError, match=r"lmbda"):
        _cfg(lmbda=1.5)


def test_a_teacher_with_another_tokenizer_is_a_clear_error(tiny_model_dir, tmp_path):
    from gad_ray.models.loading import ModelLoadError
    from gad_ray.models.tiny import build_tiny_model, build_tokenizer
    from gad_ray.recipes.opd import check_teacher_tokenizer

    other = build_tiny_model(tmp_path / "other", size="tiny")
    tok = build_tokenizer()
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(other)
    raw = _raw()
    raw["model"]["student"]["path"] = str(tiny_model_dir)
    raw["algorithm"]["opd"]["teacher"]["path"] = str(other)
    with pytest.raises(
        ModelLoadError, match=r"teacher \(algorithm.opd.teacher.path='.*other'\) tokenizers differ"
    ):
        check_teacher_tokenizer(validate_config(raw, check_model_context=False))
    raw["algorithm"]["opd"]["teacher"]["path"] = str(tiny_model_dir)
    check_teacher_tokenizer(validate_config(raw, check_model_context=False))
