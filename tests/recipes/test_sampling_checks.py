"""Where samples feed a policy gradient (GAD's GRPO stages), they must come from the distribution
the learner computes: ``algorithm.grpo.top_p < 1`` is a config error naming the key. Proxy-KD's
DPO sampling keeps its top-p (DPO never uses the sampling log-probs)."""

import pytest

from gad_ray.config.schema import ConfigError
from gad_ray.validate import validate_config


def _raw(name: str, **grpo) -> dict:
    return {
        "model": {"student": {"path": "tiny:tiny"}},
        "algorithm": {
            "name": name,
            "grpo": {"n_samples": 4, **grpo},
            "proxy_kd": {"proxy": {"path": "tiny:tiny"}, "dpo_top_p": 0.8},
        },
        "data": {
            "train_path": "x.jsonl",
            "prompts_per_step": 8,
            "max_prompt_length": 64,
            "max_response_length": 32,
        },
        "learner": {"micro_batch_size": 4},
    }


@pytest.mark.parametrize("name", ["gad", "gad_frozen_d"])
def test_grpo_top_p_below_one_is_rejected_by_name(name):
    with pytest.raises(
        ConfigError, match=rf"algorithm\.grpo\.top_p=0\.9: .*algorithm\.name={name}"
    ):
        validate_config(_raw(name, top_p=0.9), check_model_context=False)
    assert validate_config(_raw(name, top_p=1.0), check_model_context=False)


def test_proxy_kd_keeps_its_dpo_top_p():
    cfg = validate_config(_raw("proxy_kd"), check_model_context=False)
    assert cfg.algorithm.proxy_kd.dpo_top_p == 0.8
