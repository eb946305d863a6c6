"""Repeats of a prompt get their own teacher samples, each paid for once (synthetic server)."""

import hashlib
import json

import ray

from gad_ray.driver.setup import TeacherData
from gad_ray.hydra_app import compose
from gad_ray.models.tiny import build_tokenizer
from gad_ray.synthetic.server import start_server_thread
from gad_ray.synthetic.tasks import check, write_dataset
from gad_ray.teacher.cache import ResponseCache, Result, messages_hash
from gad_ray.teacher.cli import fetch

KEY_ENV = "GAD_RAY_TEST_TEACHER_KEY"
FRUIT = "Name a fruit that is red."  # multi-modal: apple 0.6 / cherry 0.25 / strawberry 0.15
SORT = "Sort the numbers: 5 3 9"  # one answer: "3 5 9"
MODEL = "synthetic-teacher"


def _write(path, prompts: list[str]) -> None:
    rows = [{"id": f"r{i}", "content": [_user(p)]} for i, p in enumerate(prompts)]
    write_dataset(path, rows)


def _user(prompt: str) -> dict:
    return {"role": "user", "content": prompt}


def _cfg(tmp_path, base_url: str, *extra: str, cache: str = "cache.sqlite"):
    overrides = [
        f"data.train_path={tmp_path / 'prompts.jsonl'}",
        "teacher=api",
        f"teacher.api.base_url={base_url}",
        f"teacher.api.model={MODEL}",
        f"teacher.api.api_key_env={KEY_ENV}",
        f"teacher.api.cache_path={tmp_path / cache}",
        "teacher.api.max_tokens=32",
        *extra,
    ]
    return compose(overrides, run_dir=str(tmp_path / "run"))


def _fetched(tmp_path) -> list[str]:
    lines = (tmp_path / "prompts.teacher.jsonl").read_text().splitlines()
    return [json.loads(line)["teacher_response"] for line in lines]


def _hash(prompt: str) -> str:
    return messages_hash([_user(prompt)])


def test_gad_fetch_gives_each_repeat_its_own_sample_and_never_pays_twice(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    prompts = [FRUIT, SORT] * 3 + [FRUIT] * 5  # 8 x FRUIT, 3 x SORT
    _write(tmp_path / "prompts.jsonl", prompts)
    with start_server_thread() as server:
        fetch(_cfg(tmp_path, server.base_url))
        st = server.stats()
        assert st["total_requests"] == 11
        assert st["per_prompt"] == {_hash(FRUIT): 8, _hash(SORT): 3}
        texts = _fetched(tmp_path)
        fruit = [t for p, t in zip(prompts, texts, strict=True) if p == FRUIT]
        assert all(check(FRUIT, t).valid for t in fruit) and len(set(fruit)) > 1
        assert {t for p, t in zip(prompts, texts, strict=True) if p == SORT} == {"3 5 9"}
        cache = ResponseCache(tmp_path / "cache.sqlite")
        assert len(cache) == 11
        cache.close()

        # a second run: every row's own sample comes from the cache
        server.reset()
        fetch(_cfg(tmp_path, server.base_url))
        assert server.stats()["total_requests"] == 0 and _fetched(tmp_path) == texts

        # teacher.api.dedup=true (a fresh cache): one request per distinct prompt
        fetch(_cfg(tmp_path, server.base_url, "teacher.api.dedup=true", cache="dedup.sqlite"))
        assert server.stats()["total_requests"] == 2
        deduped = _fetched(tmp_path)
        assert len({t for p, t in zip(prompts, deduped, strict=True) if p == FRUIT}) == 1


def _key_before_sample_indices(model: str, messages: list[dict], params: dict) -> str:
    """``request_key`` as it was before sample indices (the key of an existing cache)."""
    blob = json.dumps([model, messages, params], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def test_a_cache_written_before_sample_indices_serves_first_occurrences(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    params = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 32}  # the fetcher's, from _cfg
    old = ResponseCache(tmp_path / "cache.sqlite")
    for prompt in (FRUIT, SORT):
        msgs = [_user(prompt)]
        key = _key_before_sample_indices(MODEL, msgs, params)
        old.put(Result(key, messages_hash(msgs), "ok", f"old {prompt}"), MODEL, msgs, params)
    old.close()
    _write(tmp_path / "prompts.jsonl", [FRUIT, FRUIT, SORT, FRUIT])
    with start_server_thread() as server:
        fetch(_cfg(tmp_path, server.base_url))
        # only the second and third FRUIT (samples 1 and 2) are asked for
        assert server.stats()["per_prompt"] == {_hash(FRUIT): 2}
    texts = _fetched(tmp_path)
    assert texts[0] == f"old {FRUIT}" and texts[2] == f"old {SORT}"
    assert check(FRUIT, texts[1]).valid and check(FRUIT, texts[3]).valid


def test_teacher_data_samples_follow_file_order_across_epochs_and_resume(
    tmp_path, monkeypatch, own_ray
):
    # a Ray of its own, started after this: the fetcher actor inherits the key
    monkeypatch.setenv(KEY_ENV, "sk-test")
    others = [f"Sort the numbers: {i} 1" for i in range(4)]
    prompts = [FRUIT, others[0], FRUIT, others[1], FRUIT, others[2], FRUIT, others[3]]
    _write(tmp_path / "prompts.jsonl", prompts)
    tokenizer = build_tokenizer()
    with start_server_thread() as server:
        cfg = _cfg(
            tmp_path,
            server.base_url,
            "data.prompts_per_step=4",
            "learner.micro_batch_size=2",
            "teacher.prefetch_batches=1",
        )
        data = TeacherData(cfg, tokenizer, tmp_path / "run")
        samples = {e.id: e.meta["teacher_sample"] for e in data.loader.examples}
        assert samples == {f"r{i}": k for i, k in enumerate([0, 0, 1, 0, 2, 0, 3, 0])}
        own_ray(num_cpus=2, log_to_driver=False)
        try:
            data.start()
            batches = []
            for step in range(4):  # two epochs of two steps, reshuffled
                batches.append([(e.id, e.response) for e in data.batch_for_step(step)])
                if step == 0:
                    after_step0 = data.state_dict()
            data.shutdown()
            st = server.stats()
            assert st["total_requests"] == 8 and st["per_prompt"][_hash(FRUIT)] == 4
            first, second = dict(batches[0] + batches[1]), dict(batches[2] + batches[3])
            assert first == second and len(first) == 8  # epoch 2 reuses each row's response
            fruit = {first[f"r{i}"] for i in (0, 2, 4, 6)}
            assert len(fruit) > 1 and all(check(FRUIT, t).valid for t in fruit)

            resumed = TeacherData(cfg, tokenizer, tmp_path / "run")
            resumed.load_state_dict(after_step0)
            resumed.start()
            again = [[(e.id, e.response) for e in resumed.batch_for_step(s)] for s in (1, 2, 3)]
            resumed.shutdown()
            assert again == batches[1:] and server.stats()["total_requests"] == 8
        finally:
            ray.shutdown()
