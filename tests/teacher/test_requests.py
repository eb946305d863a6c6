"""Teacher requests (docs/teacher.md "Teacher requests"): extra_body, headers with secrets from
the environment, max_completion_tokens, omitted sampling parameters, and an HTTP 400 naming a
parameter stopping the fetch, against the synthetic server through the real openai client."""

import asyncio
import json
import logging
from collections import Counter

import pytest

from gad_ray.config.schema import ConfigError, TeacherAPIConfig
from gad_ray.hydra_app import compose
from gad_ray.synthetic.server import start_server_thread
from gad_ray.synthetic.tasks import make_dataset, write_dataset
from gad_ray.teacher.cache import ResponseCache
from gad_ray.teacher.cli import default_output, fetch
from gad_ray.teacher.fetcher import Fetcher, TeacherError

KEY_ENV = "GAD_RAY_TEST_TEACHER_KEY"
KEY = "sk-gadray-RequestsKey-1177"
HEADER_ENV = "GAD_RAY_TEST_HEADER_SECRET"
HEADER_SECRET = "hdr-Th1sHeaderIsSecret-5512"


@pytest.fixture(autouse=True)
def secrets(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv(HEADER_ENV, HEADER_SECRET)


def _api(server, tmp_path, **kw) -> TeacherAPIConfig:
    opts = dict(base_url=server.base_url, model="m", api_key_env=KEY_ENV, concurrency=4)
    opts.update(cache_path=str(tmp_path / "cache.sqlite"), backoff_base_s=0.005, max_tokens=32)
    return TeacherAPIConfig(**{**opts, **kw})


def _prompts(n: int) -> list[str]:
    rows = make_dataset(3 * n + 30, seed=11, min_len=3, max_len=8, with_teacher=False)
    texts = list(dict.fromkeys(r["content"][0]["content"] for r in rows))[:n]
    assert len(texts) == n
    return texts


def _fetch(api, prompts, **kw):
    async def run():
        async with Fetcher(api, **kw) as f:
            return await f.fetch_many(prompts), f.stats()

    return asyncio.run(run())


def _cache_rows(path) -> list[tuple[str, str]]:
    cache = ResponseCache(path)
    rows = cache.db.execute("SELECT status, params FROM responses").fetchall()
    cache.close()
    return rows


def test_the_cache_key_of_existing_caches_is_unchanged():
    """Keys computed before these options existed (git 7299c7c): the defaults, and a request
    whose only new option is the name of the length limit, keep them."""
    api = TeacherAPIConfig(base_url="http://127.0.0.1:1/v1", model="gpt-5-chat-latest",
                           api_key_env=KEY_ENV)  # fmt: skip
    prompts = ["What is 2+2?", [{"role": "user", "content": "Hi"}]]
    assert Fetcher(api).keys(prompts, [0, 1]) == [
        "618a96cd0cdd561a2d2cbd706fca69c360ab0b824238bb2503cfcd8711fd163c",
        "192952528eeee1623569a0348ec90d5e51032d4cdc69a2b041f25581193d56da",
    ]
    old = dict(model="m", temperature=0.7, top_p=0.9, max_tokens=64, system_prompt="Be brief.")
    renamed = api.model_copy(update={**old, "max_tokens_param": "max_completion_tokens"})
    headers = {"X-Org": "acme", "X-Api-Key": {"env": HEADER_ENV}}
    with_headers = TeacherAPIConfig.model_validate({**renamed.model_dump(), "headers": headers})
    key = "0f319c46a684a3ace10d99630cfb4a266d3372f08c30dbb550d5dfc6703e0f75"
    assert Fetcher(renamed).keys(["What is 2+2?"]) == [key]
    assert Fetcher(with_headers).keys(["What is 2+2?"]) == [key]  # headers: not in the key
    # a request that can get other answers is another key
    for change in ({"top_p": None}, {"temperature": None}, {"extra_body": {"seed": 1}}):
        assert Fetcher(renamed.model_copy(update=change)).keys(["What is 2+2?"]) != [key]


def test_a_rejected_parameter_stops_the_fetch_and_keeps_what_was_paid_for(tmp_path):
    prompts = _prompts(30)
    with start_server_thread() as server:  # an earlier run fetched the first 10
        first, _ = _fetch(_api(server, tmp_path), prompts[:10])
        assert all(r.status == "ok" for r in first)
    with start_server_thread(reject_params=("top_p",), record_requests=True) as server:
        api = _api(server, tmp_path)
        with pytest.raises(TeacherError) as err:
            _fetch(api, prompts)
        msg = str(err.value)
        assert msg.startswith(
            "the teacher endpoint rejects the request parameter 'top_p' (HTTP 400"
        )
        assert "Unsupported parameter: 'top_p'" in msg
        assert msg.endswith("change teacher.api.top_p (null leaves it out of the request)")
        # no more than the concurrent requests went out; no prompt was cached as failed
        assert server.stats()["outcomes"] == {"rejected_param": len(server.requests())}
        assert len(server.requests()) <= api.concurrency
        rows = _cache_rows(api.cache_path)
        assert [s for s, _ in rows] == ["ok"] * 10
        # top_p: null leaves it out: every prompt is answered (a new request: a new cache key)
        results, _ = _fetch(api.model_copy(update={"top_p": None}), prompts)
        assert [r.status for r in results] == ["ok"] * 30
        sent = [r["body"] for r in server.requests()[-30:]]
        assert all("top_p" not in b and b["temperature"] == 1.0 for b in sent)
        top_p = Counter(json.loads(p).get("top_p") for _, p in _cache_rows(api.cache_path))
        assert top_p == {None: 30, 1.0: 10}  # the earlier 10 are kept under their own key


def test_max_completion_tokens_and_a_content_400_stays_per_prompt(tmp_path):
    system_only = [{"role": "system", "content": "no user message: a 400 without param"}]
    prompts = [*_prompts(6), system_only]
    with start_server_thread(reject_params=("max_tokens",), record_requests=True) as server:
        api = _api(server, tmp_path)
        with pytest.raises(TeacherError, match=r"parameter 'max_tokens'.*teacher.api.max_tokens_p"):
            _fetch(api, prompts)
        assert _cache_rows(api.cache_path) == []
        results, _ = _fetch(api.model_copy(update={"max_tokens_param": "max_completion_tokens"}),
                            prompts)  # fmt: skip
        assert [r.status for r in results] == ["ok"] * 6 + ["failed"]
        assert results[-1].error.startswith("HTTP 400: Invalid request: 'messages' has no user")
        sent = [r["body"] for r in server.requests() if "max_completion_tokens" in r["body"]]
        assert len(sent) == 7 and all(b["max_completion_tokens"] == 32 for b in sent)
        assert not any("max_tokens" in b for b in sent)
        # the content 400 is this prompt's permanent failure, as before these options
        assert sorted(s for s, _ in _cache_rows(api.cache_path)) == ["failed"] + ["ok"] * 6


def test_extra_body_and_headers_reach_the_server_and_the_secret_goes_nowhere(
    tmp_path, caplog, capsys
):
    caplog.set_level(logging.DEBUG)
    headers = {"X-Org": "acme", "X-Api-Key": {"env": HEADER_ENV}}
    extra = {"reasoning_effort": "low", "metadata": {"run": "gad"}}
    errors = []
    with start_server_thread(record_requests=True, reject_params=("reasoning_effort",)) as server:
        api = TeacherAPIConfig.model_validate(
            {**_api(server, tmp_path).model_dump(), "headers": headers, "extra_body": extra}
        )
        with pytest.raises(TeacherError) as err:  # an error path, with the header sent
            _fetch(api, _prompts(3))
        errors.append(err.value)
        assert str(err.value).endswith("change teacher.api.extra_body.reasoning_effort")
        sent = server.requests()
    assert sent and all(r["headers"]["x-api-key"] == HEADER_SECRET for r in sent)
    assert all(r["headers"]["x-org"] == "acme" for r in sent)
    assert all(r["body"]["reasoning_effort"] == "low" for r in sent)
    assert all(r["body"]["metadata"] == {"run": "gad"} for r in sent)
    with start_server_thread(record_requests=True) as server:
        api = api.model_copy(update={"base_url": server.base_url})
        results, _ = _fetch(api, _prompts(3))
        assert [r.status for r in results] == ["ok"] * 3
        assert all(r["headers"]["x-api-key"] == HEADER_SECRET for r in server.requests())
    rows = _cache_rows(api.cache_path)
    assert all(json.loads(p)["extra_body"] == extra for _, p in rows)
    texts = [caplog.text, *map(str, errors), *map(repr, errors), api.model_dump_json(), repr(api)]
    texts.append(capsys.readouterr().err)
    assert len(caplog.records) > 20  # the openai / http debug logs were captured
    assert not any(HEADER_SECRET in t or KEY in t for t in texts)
    for f in tmp_path.rglob("*"):
        assert HEADER_SECRET.encode() not in f.read_bytes(), f


def test_a_missing_header_variable_fails_fast_naming_it(tmp_path, monkeypatch):
    monkeypatch.delenv(HEADER_ENV)
    api = TeacherAPIConfig(base_url="http://127.0.0.1:1/v1", model="m", api_key_env=KEY_ENV,
                           headers={"X-Api-Key": {"env": HEADER_ENV}})  # fmt: skip
    with pytest.raises(TeacherError, match=rf"header X-Api-Key: environment variable {HEADER_ENV}"):
        Fetcher(api)


def test_an_endpoint_message_echoing_a_secret_is_scrubbed():
    """An error text the endpoint sends back (kept in results, logs and exceptions) loses the
    key and every secret header value."""
    api = TeacherAPIConfig(base_url="http://127.0.0.1:1/v1", model="m", api_key_env=KEY_ENV,
                           headers={"X-Org": "acme", "X-Api-Key": {"env": HEADER_ENV}})  # fmt: skip
    scrubbed = Fetcher(api)._scrub(f"bad key {HEADER_SECRET} for {KEY}, org acme")
    assert scrubbed == "bad key [secret] for [secret], org acme"


def test_config_keys_and_their_errors():
    base = ["teacher=api", "data.train_path=x.jsonl"]
    api = compose(base).teacher.api
    assert (api.extra_body, api.headers, api.max_tokens_param) == ({}, {}, "max_tokens")
    api = compose(
        [*base, "teacher.api.temperature=null", "teacher.api.max_tokens_param=max_completion_tokens",
         "teacher.api.extra_body={reasoning_effort: low}",
         f"teacher.api.headers={{X-Org: acme, X-Api-Key: {{env: {HEADER_ENV}}}}}"]
    ).teacher.api  # fmt: skip
    assert api.temperature is None and api.extra_body == {"reasoning_effort": "low"}
    assert api.headers["X-Org"] == "acme" and api.headers["X-Api-Key"].env == HEADER_ENV
    with pytest.raises(ConfigError) as err:  # a credential written into the config
        compose([*base, "teacher.api.headers={Authorization: Bearer sk-plain-123}"])
    assert "teacher.api.headers.Authorization={env: SOME_VAR}" in str(err.value)
    assert "sk-plain-123" not in str(err.value)
    with pytest.raises(ConfigError, match=r"extra_body': .*sets 'max_tokens' itself"):
        compose([*base, "teacher.api.extra_body={max_tokens: 5}"])


def test_gad_fetch_stops_on_a_rejected_parameter_and_writes_what_it_has(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(KEY_ENV, KEY)
    rows = make_dataset(20, seed=5, min_len=3, max_len=6, with_teacher=False)
    write_dataset(tmp_path / "prompts.jsonl", rows)
    overrides = [
        f"data.train_path={tmp_path / 'prompts.jsonl'}",
        "teacher=api",
        "teacher.api.model=m",
        f"teacher.api.api_key_env={KEY_ENV}",
        f"teacher.api.cache_path={tmp_path / 'cache.sqlite'}",
        "teacher.api.max_tokens=32",
        "teacher.api.concurrency=2",
    ]
    with start_server_thread() as server:  # a first run, cut by its budget at 8 rows
        cfg = compose([*overrides, f"teacher.api.base_url={server.base_url}",
                       "teacher.api.budget.max_requests=8"], run_dir=str(tmp_path))  # fmt: skip
        with pytest.raises(SystemExit):
            fetch(cfg)
    with start_server_thread(reject_params=("temperature",)) as server:
        cfg = compose(
            [*overrides, f"teacher.api.base_url={server.base_url}"], run_dir=str(tmp_path)
        )
        with pytest.raises(SystemExit) as exit_:
            fetch(cfg)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "error: the teacher endpoint rejects the request parameter 'temperature'" in err
    assert "teacher.api.temperature (null leaves it out of the request)" in err
    assert "gad-fetch: stopped; the 8 rows with a response are written to" in err
    written = [json.loads(line) for line in default_output(cfg, cfg.data.train_path).open()]
    assert [r["id"] for r in written] == [r["id"] for r in rows[:8]]
    assert all(r["teacher_response"] for r in written)
    assert [s for s, _ in _cache_rows(tmp_path / "cache.sqlite")] == ["ok"] * 8


def test_gad_eval_teacher_row_keeps_omitted_parameters_out(tmp_path):
    """gad-eval asks the teacher at eval.temperature / top_p / max_new_tokens, except for a
    parameter teacher.api leaves out (null): the endpoint does not take it."""
    from gad_ray.eval.generate import generate_api
    from gad_ray.eval.sets import EvalItem

    with start_server_thread(record_requests=True, reject_params=("temperature",)) as server:
        cfg = compose(
            ["teacher=api", "data.train_path=x.jsonl", f"teacher.api.base_url={server.base_url}",
             "teacher.api.model=m", f"teacher.api.api_key_env={KEY_ENV}",
             "teacher.api.temperature=null", "eval.top_p=0.5", "eval.max_new_tokens=7"],
            run_dir=str(tmp_path),
        )  # fmt: skip
        items = [EvalItem("0", [{"role": "user", "content": p}], p, None, None, None, "x")
                 for p in _prompts(2)]  # fmt: skip
        cache = ResponseCache(tmp_path / "eval_cache.sqlite")
        responses = generate_api(cfg, items, cache)
        cache.close()
        assert all(r.text for r in responses)
        bodies = [r["body"] for r in server.requests()]
    assert len(bodies) == 2 and all("temperature" not in b for b in bodies)
    assert all((b["top_p"], b["max_tokens"]) == (0.5, 7) for b in bodies)
