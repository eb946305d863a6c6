"""What cannot fit on a GPU is refused: colocated roles share each GPU phase by phase, and the
memory plan has no phase where vLLM stays awake while G trains (one-step-off pipeline) or G
and D are resident together (D || G overlap)."""

import pytest

from gad_ray.config.schema import ConfigError
from gad_ray.hydra_app import compose

PRESETS = ["qwen2.5-7b_gpt5chat", "qwen2.5-14b_gpt5chat", "qwen2.5-1.5b_gpt5chat"]
PRESETS += ["qwen2.5-7b-lora_1gpu"]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("overlap", ["trainer.pipeline=one_step_off", "trainer.overlap_d_g=true"])
def test_colocated_gpu_presets_refuse_an_overlap_naming_the_keys(preset, overlap):
    with pytest.raises(ConfigError) as err:
        compose([f"experiment={preset}", overlap])
    msg = str(err.value)
    assert overlap in msg and "cluster.placement=colocated" in msg, msg


@pytest.mark.parametrize("overlap", ["trainer.pipeline=one_step_off", "trainer.overlap_d_g=true"])
def test_the_same_overlap_is_accepted_disaggregated_or_on_cpu(overlap):
    gpu = ["model=tiny", "cluster.gpus_per_node=4", "data.max_prompt_length=64"]
    cfg = compose([*gpu, "cluster.placement=disaggregated", overlap])
    assert cfg.cluster.placement == "disaggregated"
    cfg = compose(["model=tiny", "cluster=local", "data.max_prompt_length=64", overlap])
    assert cfg.cluster.placement == "colocated" and cfg.cluster.gpus_per_node == 0


def test_both_overlaps_are_named_and_auto_overlap_is_fine():
    with pytest.raises(ConfigError) as err:
        compose(
            [
                "experiment=qwen2.5-7b_gpt5chat",
                "trainer.pipeline=one_step_off",
                "trainer.overlap_d_g=true",
            ]
        )
    msg = str(err.value)
    assert "trainer.pipeline=one_step_off" in msg and "trainer.overlap_d_g=true" in msg
    cfg = compose(["experiment=qwen2.5-7b_gpt5chat", "trainer.overlap_d_g=auto"])
    assert cfg.cluster.placement == "colocated" and cfg.trainer.pipeline == "sync"
