"""The tests' config builder (tests/config_builder.py): where each config starts, and how
overrides and keys apply."""

from gad_ray.config.schema import LoraSpec
from gad_ray.validate import validate_config
from tests.config_builder import learner_config, make_config, tiny_run


def test_without_hydra_the_schema_defaults_hold_and_no_preset(tiny_model_dir):
    path = str(tiny_model_dir)
    raw = {"model": {"student": {"path": path}}, "algorithm": {"name": "gad"}}
    raw["data"] = {"train_path": "x.jsonl"}
    cfg = make_config(
        hydra=False, model__student__path=path, algorithm__name="gad", data__train_path="x.jsonl"
    )
    assert cfg == validate_config(raw, check_model_context=False)
    composed = make_config(f"model.student.path={path}", "data.train_path=x.jsonl")
    assert (cfg.name, composed.name) == ("run", "tiny_cpu")  # the tiny_cpu preset's


def test_overrides_and_keys_set_the_same_fields_keys_last(tiny_model_dir, tmp_path):
    base = learner_config(tiny_model_dir)
    by_overrides = make_config("learner.backend=deepspeed", "learner.zero_stage=2", base=base)
    by_keys = make_config(base=base, learner__backend="deepspeed", learner__zero_stage=2)
    assert by_overrides == by_keys
    assert (by_keys.learner.backend, by_keys.learner.zero_stage) == ("deepspeed", 2)
    assert by_keys.model_copy(update={"learner": base.learner}) == base  # nothing else moved
    run = make_config(
        *tiny_run(tmp_path, "learner.micro_batch_size=4"), learner__micro_batch_size=1
    )
    assert run.learner.micro_batch_size == 1
    assert run.data.prompts_per_step == 4 and run.trainer.run_dir == str(tmp_path)


def test_a_dict_key_replaces_the_whole_node(tiny_model_dir):
    lora = make_config(base=learner_config(tiny_model_dir), model__student__lora={"rank": 4})
    assert lora.model.student.lora == LoraSpec(rank=4)  # alpha back to its default
    assert make_config(base=lora, model__student__lora__alpha=8.0).model.student.lora == LoraSpec(
        rank=4, alpha=8.0
    )
