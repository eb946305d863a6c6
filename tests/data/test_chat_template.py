"""``data.chat_template`` replaces the student tokenizer's template wherever prompts are templated:
training batches, the in-training eval set, gad-eval's prompts, and the exported model's
tokenizer. The last test starts a learner (Ray): run this file through /work/helpers/heavy."""

import json

import pytest
from transformers import AutoTokenizer

from gad_ray.config.schema import ConfigError, DataConfig
from gad_ray.data.dataset import DataError, Example
from gad_ray.data.tokenize import encode_prompt, tokenize_examples
from gad_ray.driver.setup import TeacherData, load_eval_set
from gad_ray.eval.generate import prompt_ids
from gad_ray.eval.sets import EvalItem
from gad_ray.hydra_app import compose
from gad_ray.models.loading import load_tokenizer

TEMPLATE = (
    "{% for m in messages %}<<{{ m.role }}>> {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<<assistant>>{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
RENDERED = "<<system>> Be brief.\n<<user>> Hi there\n<<assistant>>"


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    return str(path)


def test_text_or_file_replaces_the_tokenizers_template(tok, template_file):
    ex = Example("0", MESSAGES, "Hello.", {})
    own, _ = tokenize_examples([ex], tok, DataConfig(train_path="x.jsonl"))
    assert tok.decode(own[0].prompt_ids).startswith("<|im_start|>system\nBe brief.")
    for value in (TEMPLATE, template_file):
        cfg = DataConfig(train_path="x.jsonl", chat_template=value)
        assert cfg.chat_template == TEMPLATE  # a path is read once, at validation
        out, _ = tokenize_examples([ex], tok, cfg)
        assert tok.decode(out[0].prompt_ids) == RENDERED
        assert out[0].prompt_ids == tok.encode(RENDERED, add_special_tokens=False)


def test_config_key_defaults_to_null_and_bad_values_name_it(tmp_path, template_file):
    base = ["data.train_path=x.jsonl"]
    assert compose(base).data.chat_template is None
    assert compose([*base, f"data.chat_template={template_file}"]).data.chat_template == TEMPLATE
    with pytest.raises(ConfigError, match=r"'data.chat_template': .*neither a Jinja template"):
        compose([*base, f"data.chat_template={tmp_path / 'missing.jinja'}"])
    (tmp_path / "plain.txt").write_text("no tags here")
    with pytest.raises(ConfigError, match=r"data.chat_template.*holds no Jinja template"):
        compose([*base, f"data.chat_template={tmp_path / 'plain.txt'}"])


def test_a_template_that_fails_to_render_names_the_key(tok):
    with pytest.raises(DataError, match=r"data.chat_template cannot render a prompt: .*Syntax"):
        encode_prompt(tok, MESSAGES, "{% if x %}")
    with pytest.raises(DataError, match=r"data.chat_template cannot render.*only users"):
        encode_prompt(tok, MESSAGES, "{{ raise_exception('only users') }}")


def test_training_batches_eval_set_and_gad_eval_prompts_use_it(
    tmp_path, tiny_model_dir, tok, template_file
):
    path = tmp_path / "d.jsonl"
    rows = [{"messages": [*MESSAGES, {"role": "assistant", "content": f"Hello {i}."}]}
            for i in range(4)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose(
        [
            f"model.student.path={tiny_model_dir}",
            f"data.train_path={path}",
            f"data.eval_path={path}",
            "data.prompts_per_step=2",
            "learner.micro_batch_size=2",
            "data.shuffle=false",
            f"data.chat_template={template_file}",
        ]
    )
    data = TeacherData(cfg, tok, tmp_path)
    batch = data.batch_for_step(0)
    assert [tok.decode(e.prompt_ids) for e in batch] == [RENDERED] * 2
    assert [e.response for e in batch] == [f"Hello {i}." for i in range(2)]
    eval_set = load_eval_set(cfg, tok)
    assert [tok.decode(e.prompt_ids) for e in eval_set.examples] == [RENDERED] * 4
    item = EvalItem("0", MESSAGES, "Hi there", None, None, None, "x")
    prompts, cut = prompt_ids(cfg, tok, [[item]])
    assert [tok.decode(p) for p in prompts] == [RENDERED] and cut == [False]


def test_the_exported_tokenizer_carries_the_template(tmp_path, tiny_model_dir, ray_session):
    from gad_ray.learner import GeneratorGroup
    from tests.config_builder import make_config

    cfg = make_config(
        hydra=False,
        model__student__path=str(tiny_model_dir),
        algorithm__name="gad",
        data={"train_path": "unused.jsonl", "prompts_per_step": 2, "chat_template": TEMPLATE},
        learner__micro_batch_size=2,
    )
    group = GeneratorGroup(cfg)
    try:
        group.save_pretrained(str(tmp_path / "hf"))
    finally:
        group.shutdown()
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert exported.chat_template == TEMPLATE
    text = exported.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == RENDERED
