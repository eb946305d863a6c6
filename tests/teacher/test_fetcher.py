import asyncio
import logging
import socket
import time
from collections import Counter

import pytest
import ray

from gad_ray.config.schema import TeacherAPIConfig
from gad_ray.synthetic.server import start_server_thread
from gad_ray.synthetic.tasks import make_dataset
from gad_ray.teacher.cache import ResponseCache, messages_hash
from gad_ray.teacher.fetcher import Fetcher, TeacherError, TeacherFetcher, request_messages

KEY_ENV = "GAD_RAY_TEST_TEACHER_KEY"
SECRET = "sk-gadray-Th1sIsTheSecretValue-0042"
FAST = dict(backoff_base_s=0.005, backoff_max_s=0.05, max_tokens=32)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def _api(server, tmp_path, **kw) -> TeacherAPIConfig:
    opts = dict(base_url=server.base_url, model="m", api_key_env=KEY_ENV, concurrency=32)
    opts["cache_path"] = str(tmp_path / "cache.sqlite")
    return TeacherAPIConfig(**{**opts, **FAST, **kw})


def _prompts(n: int) -> list[str]:
    """``n`` distinct synthetic-task prompts."""
    rows = make_dataset(3 * n + 30, seed=7, min_len=3, max_len=8, with_teacher=False)
    texts = list(dict.fromkeys(r["content"][0]["content"] for r in rows))[:n]
    assert len(texts) == n
    return texts


def _with_budget(api: TeacherAPIConfig, **budget) -> TeacherAPIConfig:
    return TeacherAPIConfig.model_validate({**api.model_dump(), "budget": budget})


def _fetch(api, prompts, samples=None, **kw):
    async def run():
        async with Fetcher(api, **kw) as f:
            return await f.fetch_many(prompts, samples), f.stats()

    return asyncio.run(run())


def _ok_per_prompt(stats: dict) -> Counter:
    return Counter(e["prompt_hash"] for e in stats["events"] if e["outcome"] == "ok")


def test_600_requests_with_injected_faults_store_exactly_one_response_each(tmp_path):
    faults = {"429": 0.03, "500": 0.03, "timeout": 0.03, "drop": 0.03, "malformed": 0.03}
    with start_server_thread(faults=faults, hang_s=2.0, retry_after_s=0.02, seed=1) as server:
        api = _api(server, tmp_path, timeout_s=1.0, max_retries=12)
        prompts = _prompts(600)
        t0 = time.monotonic()
        results, stats = _fetch(api, prompts)
        elapsed = time.monotonic() - t0
        st = server.stats()
        assert [r.status for r in results] == ["ok"] * 600, Counter(r.error for r in results)
        assert all(o in st["outcomes"] and st["outcomes"][o] > 0 for o in faults)
        hashes = [messages_hash(request_messages(api, p)) for p in prompts]
        assert [r.messages_hash for r in results] == hashes
        # every prompt was answered by the server and has exactly one stored row (a request
        # can time out at the client after the server counted it: at-least-once at the server)
        assert set(_ok_per_prompt(st)) == set(hashes)
        assert stats["attempts"] == 600 + stats["retries"] >= st["total_requests"]
        cache = ResponseCache(api.cache_path)
        assert len(cache) == 600 and cache.totals()["ok"] == 600
        assert elapsed < 30
        # a second run is served from the cache: no request reaches the server
        server.reset()
        again, stats2 = _fetch(api, prompts)
        assert server.stats()["total_requests"] == 0 and stats2["cached"] == 600
        assert [r.text for r in again] == [r.text for r in results] and all(r.cached for r in again)


def test_a_request_is_a_prompt_and_its_sample_index(tmp_path):
    with start_server_thread() as server:
        api = _api(server, tmp_path)
        prompts = ["same prompt"] * 6 + ["other"]
        same = messages_hash(request_messages(api, "same prompt"))
        # samples 0, 1, 2 are three requests; each asked twice in one call is still one
        results, stats = _fetch(api, prompts, [0, 1, 2, 0, 1, 2, 0])
        st = server.stats()
        assert st["total_requests"] == 4 and st["per_prompt"][same] == 3
        assert stats["submitted"] == 4 and all(r.status == "ok" for r in results)
        keys = [r.key for r in results]
        assert len(set(keys[:3])) == 3 and keys[3:6] == keys[:3]
        # without sample indices every repeat is sample 0: all cached now
        again, stats = _fetch(api, prompts)
        assert server.stats()["total_requests"] == 4 and stats["cached"] == 7
        assert {r.key for r in again[:6]} == {keys[0]}
        # teacher.api.dedup=true ignores the sample indices
        deduped = api.model_copy(update={"dedup": True})
        again, stats = _fetch(deduped, prompts, [0, 1, 2, 3, 4, 5, 0])
        assert server.stats()["total_requests"] == 4 and stats["cached"] == 7
        assert {r.key for r in again[:6]} == {keys[0]}


def test_permanent_failures_are_stored_with_reason_and_not_retried(tmp_path):
    with start_server_thread(fail_first=1, fail_first_fault="empty") as server:
        api = _api(server, tmp_path)
        system_only = [{"role": "system", "content": "no user message: the server says 400"}]
        results, _ = _fetch(api, [*_prompts(10), system_only])
        assert [r.error for r in results] == ["empty content"] * 10 + [results[-1].error]
        assert results[-1].error.startswith("HTTP 400") and results[-1].attempts == 1
        assert all(r.status == "failed" and r.attempts == 1 for r in results)
        assert server.stats()["total_requests"] == 11
        # a restart does not pay for them again
        again, _ = _fetch(api, [*_prompts(10), system_only])
        assert server.stats()["total_requests"] == 11 and all(r.cached for r in again)
        assert again[0].error == "empty content"
        # unless asked to: fail_first was only the first attempt, so now they succeed
        retried, _ = _fetch(api, _prompts(10), retry_failed=True)
        assert all(r.status == "ok" and not r.cached for r in retried)


def test_exhausted_retries_are_not_stored_and_the_next_run_retries(tmp_path):
    with start_server_thread(fail_first=3, fail_first_fault="500") as server:
        results, _ = _fetch(_api(server, tmp_path, max_retries=1), _prompts(4))
        assert all(r.status == "failed" and not r.permanent for r in results)
        assert results[0].error.startswith("gave up after 2 attempts; last error: HTTP 500")
        assert len(ResponseCache(tmp_path / "cache.sqlite")) == 0
        results, _ = _fetch(_api(server, tmp_path, max_retries=5), _prompts(4))
        assert all(r.status == "ok" and r.attempts == 2 for r in results)  # attempts 3 and 4


def test_retry_after_is_honoured(tmp_path):
    with start_server_thread(fail_first=1, fail_first_fault="429", retry_after_s=0.4) as server:
        results, _ = _fetch(_api(server, tmp_path), _prompts(3))
        assert all(r.status == "ok" and r.attempts == 2 for r in results)
        times: dict[str, list[float]] = {}
        for e in server.stats()["events"]:
            times.setdefault(e["prompt_hash"], []).append(e["t"])
        assert all(t[1] - t[0] >= 0.39 for t in times.values())


def _window_ok(stamps: list[tuple[float, float]], cap: float, rate: float, slack: float) -> bool:
    """Every interval [t_i, t_j] holds at most cap + rate * (t_j - t_i) + slack units."""
    stamps = sorted(stamps)
    for i in range(len(stamps)):
        total = 0.0
        for j in range(i, len(stamps)):
            total += stamps[j][1]
            if total > cap + rate * (stamps[j][0] - stamps[i][0]) + slack:
                return False
    return True


def test_requests_per_minute_holds_at_the_server(tmp_path):
    with start_server_thread() as server:
        results, _ = _fetch(_api(server, tmp_path, requests_per_minute=1800), _prompts(120))
        assert all(r.status == "ok" for r in results)
        stamps = [(e["t"], 1.0) for e in server.stats()["events"]]
        # 30 requests/s with a one-second bucket; 2 of slack for network reordering
        assert _window_ok(stamps, cap=30, rate=30, slack=2)
        assert max(stamps)[0] - min(stamps)[0] >= (120 - 30) / 30 * 0.9


def test_tokens_per_minute_holds_at_the_server(tmp_path):
    with start_server_thread() as server:
        api = _api(server, tmp_path, tokens_per_minute=60 * 300, max_tokens=16)
        prompts = _prompts(80)
        results, _ = _fetch(api, prompts)
        assert all(r.status == "ok" for r in results)
        prompt_tokens = {r.messages_hash: r.usage["prompt_tokens"] for r in results}
        events = server.stats()["events"]
        stamps = [
            (e["t"], prompt_tokens[e["prompt_hash"]] + e["completion_tokens"]) for e in events
        ]
        used = sum(r.usage["total_tokens"] for r in results)
        assert used == sum(s[1] for s in stamps)
        # 300 tokens/s, bucket of 300; slack: one request's reservation
        assert _window_ok(stamps, cap=300, rate=300, slack=60)
        assert max(stamps)[0] - min(stamps)[0] >= (used - 300) / 300 * 0.8


def test_budget_stops_cleanly_and_counts_earlier_runs(tmp_path):
    with start_server_thread() as server:
        api = _api(server, tmp_path, concurrency=4, price_per_1k_completion_tokens=1.0)
        results, stats = _fetch(_with_budget(api, max_requests=25), _prompts(60))
        assert server.stats()["total_requests"] == 25
        assert Counter(r.status for r in results) == {"ok": 25, "failed": 35}
        assert stats["budget_stop"] == "teacher.api.budget.max_requests=25 reached"
        assert all(r.error == f"budget: {stats['budget_stop']}" for r in results[25:])
        spent = stats["spent"]["dollars"]
        assert spent == pytest.approx(sum(r.cost for r in results)) and spent > 0
        # the spend is in the cache: a new run with a dollar budget below it sends nothing new
        capped = _with_budget(api, max_dollars=spent * 0.99)
        results, stats = _fetch(capped, _prompts(60))
        assert server.stats()["total_requests"] == 25 and stats["cached"] == 25
        assert "max_dollars" in stats["budget_stop"]


def test_api_key_never_appears_in_logs_cache_or_errors(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    faults = {"429": 0.1, "500": 0.1, "drop": 0.05, "malformed": 0.05}
    with start_server_thread(api_key=SECRET, faults=faults, retry_after_s=0.01) as server:
        api = _api(server, tmp_path, max_retries=20)
        bad = [{"role": "system", "content": "HTTP 400 please"}]
        results, _ = _fetch(api, [*_prompts(60), bad])
        assert sum(r.status == "ok" for r in results) == 60 and results[-1].error.startswith(
            "HTTP 400"
        )
        assert server.stats()["outcomes"].get("unauthorized", 0) == 0
    errors = []
    with start_server_thread(api_key="sk-the-server-wants-another-key") as server:
        with pytest.raises(TeacherError) as err:
            _fetch(_api(server, tmp_path), _prompts(1))
        errors.append(err.value)
    assert f"rejected the API key from {KEY_ENV} (HTTP 401)" in str(errors[0])
    assert errors[0].__cause__ is None  # the openai error (with its request) is not chained
    texts = [caplog.text, *(r.error or "" for r in results), *map(repr, errors), *map(str, errors)]
    assert len(caplog.records) > 50  # the openai / http debug logs were captured
    assert not any(SECRET in t for t in texts)
    for f in tmp_path.iterdir():
        assert SECRET.encode() not in f.read_bytes(), f


def test_missing_key_fails_fast_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with start_server_thread() as server:
        with pytest.raises(TeacherError, match=f"environment variable {KEY_ENV} is not set"):
            Fetcher(_api(server, tmp_path))


def test_unreachable_endpoint_fails_fast(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = TeacherAPIConfig(
        base_url=f"http://127.0.0.1:{port}/v1",
        model="m",
        api_key_env=KEY_ENV,
        cache_path=str(tmp_path / "c.sqlite"),
    )
    t0 = time.monotonic()
    with pytest.raises(TeacherError, match=f"127.0.0.1:{port}/v1 is unreachable") as err:
        _fetch(api, _prompts(3))
    assert time.monotonic() - t0 < 5 and SECRET not in repr(err.value)


def test_ray_actor_prefetches_batches_ahead_of_training(tmp_path, own_ray):
    # a Ray of its own: the actor inherits the key this module's api_key fixture sets
    own_ray(num_cpus=2, log_to_driver=False)
    try:
        with start_server_thread(latency_ms=50) as server:
            api = _api(server, tmp_path, concurrency=8)
            actor = TeacherFetcher.remote(api.model_dump())
            ray.get(actor.start.remote())
            prompts = _prompts(48)
            batches = [prompts[16 * b : 16 * (b + 1)] for b in range(3)]
            for b, batch in enumerate(batches):
                actor.submit.remote(b, batch)  # returns at once
            waits = []
            for b in range(3):
                time.sleep(0.4)  # "training" on the previous batch
                t0 = time.monotonic()
                results = ray.get(actor.get.remote(b))
                waits.append(time.monotonic() - t0)
                assert [r.status for r in results] == ["ok"] * 16
                assert [r.messages_hash for r in results] == [
                    messages_hash(request_messages(api, p)) for p in batches[b]
                ]
            # 16 prompts / 8 concurrent x 50 ms = 0.1 s per batch: all were ready ahead of time
            assert max(waits) < 0.2, waits
            stats = ray.get(actor.stats.remote())
            assert stats["ok"] == 48 and stats["batches_pending"] == 0
            with pytest.raises(ray.exceptions.RayTaskError, match="was not submitted"):
                ray.get(actor.get.remote(0))
            ray.get(actor.close.remote())
    finally:
        ray.shutdown()
